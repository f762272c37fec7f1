"""Transparent huge pages for the weights that a CPU decode step streams.

A decode step reads every weight once per token: on the benchmarks' mid
config in float32, 185 MB, as `[512, 2048]`-sized matrices one after
another. With the kernel's default 4 KiB pages that is 47000 pages per
token, each one a TLB miss and a page-table walk. With 2 MiB pages it is
about 90. Measured on the project's 2-core machine (AMD EPYC, Linux 6.18,
THP `madvise`), torch float32:

| what | 4 KiB pages | 2 MiB pages |
|---|---|---|
| one-row `bmm` over 40 `[2048, 512]` tables, cycled | 41-42 GB/s | 51-52 GB/s |
| `TorchDecoder.append`, one token, mid config | 7.43 ms | 5.97-6.09 ms |

Linux gives a process huge pages for its anonymous memory where it asks
(`madvise`), or for all of it (`/sys/kernel/mm/transparent_hugepage/enabled`
set to `always`; on this machine it is `madvise`, the common default).
This module asks, best effort and never changing a byte:

- `empty(...)`: a new torch tensor in a mapping of its own, starting on a
  huge-page boundary and advised `MADV_HUGEPAGE` before it is first
  written, so its pages fault in huge (`torch_matmul`'s `[out, in]` copies live in one
  such arena).
- `collapse(tensors)`: `MADV_COLLAPSE` (Linux 6.1 and later) over tensors
  that already hold data (the model's own variables): the kernel moves the
  whole huge pages inside each tensor's bytes into huge pages, in place.
  It copies the memory once (0.9 ms per MB here; the mid config's 172 MB
  in 0.15 s, on the first `generate` only); asking again for memory that is
  already huge costs about 1 ms for all of them.

Where the platform or kernel cannot (not Linux, an older kernel, THP set to
`never`, no free huge pages), nothing happens and nothing fails. Setting
`KERAS_GEMMA2_HUGE_PAGES=0` in the environment turns it off.

Only torch's decode path uses it: the jax and TensorFlow decode steps are
XLA programs over buffers XLA allocates. Collapsing the jax model's
variables in the same way measured 0.579 -> 0.566 s on the benchmark's case
(a), within this machine's noise, so it is not done there.
"""

import ctypes
import functools
import math
import mmap
import sys

from keras_gemma2.generation.switches import switched_on

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
# Smaller tensors hold no whole huge page, or too few to matter.
MIN_BYTES = 4 << 20


@functools.cache
def huge_page_size():
    """Bytes of a transparent huge page here, or 0 where there are none."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as file:
            size = int(file.read())
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            setting = file.read()
    except (OSError, ValueError):
        return 0
    return 0 if "[never]" in setting else size


VARIABLE = "KERAS_GEMMA2_HUGE_PAGES"


def enabled():
    """Whether to ask for huge pages (Linux with THP, not turned off).

    `KERAS_GEMMA2_HUGE_PAGES`: unset, empty or `1` to ask, `0` not to; any
    other value is refused, not read as either.
    """
    return switched_on(VARIABLE) and huge_page_size() > 0


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    function = libc.madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _whole_pages(address, size):
    """`(start, length)` of the huge pages lying wholly in the bytes given."""
    page = huge_page_size()
    start = -(-address // page) * page
    end = (address + size) // page * page
    return start, max(0, end - start)


def _advise(address, size, advice):
    """`madvise` over the whole huge pages in the range; True if it took."""
    start, length = _whole_pages(address, size)
    return length > 0 and _madvise()(start, length, advice) == 0


def _cpu_bytes(tensor):
    """`(address, bytes)` of a CPU torch tensor's whole storage, else `None`."""
    if tensor.device.type != "cpu":
        return None
    storage = tensor.untyped_storage()
    size = storage.nbytes()
    return (storage.data_ptr(), size) if size >= MIN_BYTES else None


def collapse(tensors):
    """Move the memory of `tensors` (torch, CPU) into huge pages, in place.

    Each tensor's whole storage (a view's: the tensor it views). Best
    effort: storages smaller than `MIN_BYTES` or not on the CPU are left
    alone, and so is everything where `enabled()` is false. Values never
    change. Returns the bytes of the whole huge pages it was granted.
    """
    if not enabled():
        return 0
    asked = 0
    seen = set()
    for tensor in tensors:
        found = _cpu_bytes(tensor)
        if found is None or found in seen:
            continue
        seen.add(found)
        # Refused (an older kernel without it, a huge page with no page
        # written yet, no free huge page now): the tensor stays as it was.
        if _advise(*found, MADV_COLLAPSE):
            asked += _whole_pages(*found)[1]
    return asked


def empty(shape, dtype):
    """`torch.empty(shape, dtype)`, its memory advised into huge pages.

    Where `enabled()`: a fresh private anonymous mapping of its own (never
    memory the allocator reused, whose pages may already be small), one
    huge page longer than the data, which starts on a huge-page boundary,
    advised `MADV_HUGEPAGE` before anything is written, so its pages fault
    in huge. The tensor keeps the mapping; it is unmapped with the last
    view. Elsewhere, or under `MIN_BYTES`, a plain `torch.empty`.
    """
    import torch

    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not enabled() or size < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    page = huge_page_size()
    mapping = mmap.mmap(-1, size + page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    offset = -raw.data_ptr() % page
    data = raw[offset : offset + size]
    _advise(data.data_ptr(), size, MADV_HUGEPAGE)
    return data.view(dtype).view(shape)
