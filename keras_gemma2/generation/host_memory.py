"""Freed host memory kept for reuse, so XLA (CPU) on JAX stops faulting it in.

Every run of a JAX program on CPU allocates the program's working memory
(all its intermediate buffers, as one block) and frees it when the run
ends. The block is large: 129 MB for one global layer's attention over a
2048-token prompt (8 / 4 heads of 64), about 300 MB for the whole prompt
pass of `benchmarks/vs_llamacpp.py`'s case (b). glibc's `malloc` hands
blocks that large out of a fresh `mmap` and unmaps them on `free`, so each
run faults every page in again and the kernel zeroes it: 33,000 minor page
faults and 65 ms of system time per run of that attention layer, 77,000 per
prompt pass (`resource.getrusage`, jax 0.10, glibc 2.36). TensorFlow's XLA
runs the same programs through its own allocator, which keeps the memory: 4
faults per run. (The worker threads of XLA's CPU client allocate from
per-thread `malloc` arenas, whose heaps are at most 64 MB, so a larger
block is always a new mapping there, whatever `M_MMAP_THRESHOLD` says.)

`keep_freed_host_memory("jax")` asks glibc (`mallopt`) for one arena
(`M_ARENA_MAX=1`), no mappings for large blocks (`M_MMAP_MAX=0`) and no
returning of freed memory at the top of the heap below 2 GiB
(`M_TRIM_THRESHOLD`): a freed block then stays in the process, already
faulted in, for the next run. Measured on the project's 2-core machine,
processes with and without it alternating (mid config of the benchmarks,
float32):

default against kept:

- one global layer's attention, 2048 tokens: 83-91 ms and 33,400 faults a
  run against 45-55 ms and 0-3,400 faults;
- case (b), `generate` of 2048 + 128 tokens, medians of 5, three pairs of
  processes: 2.39 / 2.32 / 2.55 s against 2.23 / 2.25 / 2.45 s;
- case (a), 32 + 64 tokens, medians of 15, five pairs: 0.540-0.591 s
  against 0.566-0.615 s, unchanged within this machine's noise;
- an 8000-token prompt through `generate`: 7.4-7.5 s against 5.9-6.6 s,
  peak resident 3.63 GB against 3.49-3.52 GB;
- `benchmarks/prefill.py` at 8192 tokens: 7.93-8.03 s against 6.77-6.92 s
  (one run 9.0 s), peak resident 3.54-3.57 GB against 3.56-6.69 GB.

The price is memory:

- freed memory stays with the process (its resident set between calls is
  its peak, as under TensorFlow's allocator) until more than 2 GiB of it
  sits at the top of the heap;
- large blocks no longer come and go as mappings of their own, so the heap
  can fragment: in three of four `prefill.py` runs at 8192 tokens, whose
  window includes the XLA compilation, the peak rose by 1.4-3.1 GB. Loading
  (`benchmarks/load_memory.py`) peaked the same (float32 1.11x / 1.10x of
  the checkpoint, bfloat16 1.15x / 1.13x).

So it is done only where it pays: the JAX backend on CPU alone, that is with
no accelerator plugin of JAX installed (`jax_plugins` entry points or
`libtpu`) or with `JAX_PLATFORMS=cpu`, and glibc. `import keras_gemma2` calls
it when Keras' backend is JAX, and `keras-gemma2` once it has picked its
backend. Arenas are taken per thread on a thread's first allocation, so the
setting reaches XLA's worker threads only if it comes before JAX runs its
first computation: import `keras_gemma2` before running anything on JAX.
TensorFlow and torch (whose decode paths fault no pages in a call) are left
alone. Setting `KERAS_GEMMA2_KEEP_HOST_MEMORY=0` in the environment turns it
off.
"""

import ctypes
import os
import sys

from keras_gemma2.generation.switches import switched_on

ENVIRONMENT_VARIABLE = "KERAS_GEMMA2_KEEP_HOST_MEMORY"

# `mallopt` parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Freed memory at the top of the heap beyond this goes back to the system.
TRIM_THRESHOLD_BYTES = 2**31 - 1


def _jax_on_cpu_alone():
    """Whether JAX will run on CPU only (no accelerator plugin, or told so)."""
    platforms = os.environ.get("JAX_PLATFORMS")
    if platforms:
        return platforms.strip().lower() == "cpu"
    from importlib import metadata, util

    if util.find_spec("libtpu") is not None:
        return False
    return not list(metadata.entry_points(group="jax_plugins"))


def _glibc():
    """The C library through `ctypes` if it is glibc, else `None`."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        # glibc's own function: absent from musl and other C libraries.
        return libc if hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def keep_freed_host_memory(backend):
    """Keep freed host memory for reuse (see the module docstring).

    Args:
        backend: the Keras backend's name. Only `"jax"` changes anything.

    Returns:
        True when glibc took the three settings; False where nothing was
        changed (another backend, JAX with an accelerator,
        `KERAS_GEMMA2_KEEP_HOST_MEMORY=0`, no glibc).

    Raises:
        ValueError: `KERAS_GEMMA2_KEEP_HOST_MEMORY` is set, not empty,
            and neither 0 nor 1.

    Example:

    >>> keep_freed_host_memory("tensorflow")
    False
    """
    if not switched_on(ENVIRONMENT_VARIABLE) or backend != "jax":
        return False
    if not _jax_on_cpu_alone():
        return False
    libc = _glibc()
    if libc is None:
        return False
    settings = (
        (_M_ARENA_MAX, 1),
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
    )
    return all([libc.mallopt(parameter, value) == 1 for parameter, value in settings])


__all__ = ["ENVIRONMENT_VARIABLE", "keep_freed_host_memory"]
