"""Few-row float32 products of `TorchDecoder` on CPU, one slice per thread.

A decode step multiplies one row (one per sequence) by every weight matrix.
On CPU, torch hands such a product to MKL's matrix-vector kernel, which
runs on one core and, for some layouts, well below the memory bandwidth.
Measured on the project's 2-core machine, float32, mid config of
`benchmarks/generate.py`, medians of 100 calls:

| product | `x @ w` | as below |
|---|---|---|
| head `x @ table.T`, table `[32000, 512]` | 5.9 ms | 1.1-1.9 ms |
| `[1, 512] @ [512, 2048]` (gate, up) | 187-202 us | 110-138 us |
| `[1, 2048] @ [2048, 512]` (down) | 353 us | 184-189 us |

So the weights are cut into equal slices along their leading (contiguous)
axis, viewed, never copied, and multiplied by one `torch.bmm`, which runs
the slices on torch's threads:

- `product(x, w)`, `w [in, out]`: slices of the inner axis; their partial
  products are summed (the sum's order differs from one `x @ w`, so
  results differ from it by float32 rounding).
- `transposed_product(x, table)`, `table [out, in]` (the tied head): slices
  of the output axis, laid side by side: no sum, the same sums as
  `x @ table.T` up to the kernel's own order.

Only float32 CPU weights of at least `MIN_ELEMENTS` multiplied by at most
`MAX_ROWS` rows take these paths: bfloat16 products measured no faster
split, and many-row products (long prompts) are matrix-matrix products that MKL
already spreads over threads. Everything else is `x @ w`.
"""

import functools
import weakref

# Above this many rows, `x @ w` is a matrix product that runs on all
# threads by itself.
MAX_ROWS = 8
# Smaller weights gain nothing from slicing. `[512, 256]` (key, value)
# measured the same either way with the weights in cache, and faster
# sliced inside the decode step, where they are not.
MIN_ELEMENTS = 2**17
# More slices than threads measured no faster (4 slices on 2 threads);
# past 16 each slice gets too thin to stream well.
MAX_SLICES = 16


# `(id(weight), at_least) -> (threads, slices)`, so a decode step does not redo the
# weight's checks 57 times a token. An entry leaves with its weight.
_SLICES = {}


@functools.cache
def _torch():
    import torch

    return torch


def _sliced(x, w, at_least):
    """`w` viewed as `[slices, -1, columns]` to multiply `x` by, or `None`.

    `None`: multiply plainly (see the module docstring for when). Slices
    cut `w`'s leading axis, as many as torch has threads (at least
    `at_least`), a power of two that divides the axis.
    """
    torch = _torch()
    if (
        x.dtype != torch.float32
        or x.dim() == 0
        or not 0 < x.numel() // x.shape[-1] <= MAX_ROWS
    ):
        return None
    threads = torch.get_num_threads()
    key = id(w), at_least
    known = _SLICES.get(key)
    if known is None or known[0] != threads:
        slices = 1
        if (
            w.device.type == "cpu"
            and w.dtype == torch.float32
            and w.numel() >= MIN_ELEMENTS
            and w.is_contiguous()
        ):
            most = min(max(threads, at_least), MAX_SLICES)
            while slices * 2 <= most and w.shape[0] % (slices * 2) == 0:
                slices *= 2
        if known is None:
            weakref.finalize(w, _SLICES.pop, key, None)
        known = _SLICES[key] = (threads, slices)
    slices = known[1]
    return w.view(slices, -1, w.shape[1]) if slices > 1 else None


def product(x, w):
    """`x [..., in] @ w [in, out]`, the inner axis split over threads."""
    torch = _torch()
    # One thread gains nothing from splitting a projection.
    sliced = _sliced(x, w, at_least=1)
    if sliced is None:
        return x @ w
    slices = sliced.shape[0]
    if x.dim() == 2 and x.shape[0] == 1:  # one decode row: [S, 1, in/S]
        return torch.bmm(x.view(slices, 1, -1), sliced).sum(0)
    rows = x.reshape(-1, x.shape[-1])
    parts = torch.bmm(
        rows.view(rows.shape[0], slices, -1).transpose(0, 1),  # [S, M, in/S]
        sliced,  # [S, in/S, out]
    )
    return parts.sum(0).reshape(*x.shape[:-1], w.shape[1])


def transposed_product(x, table):
    """`x [..., in] @ table.T` for `table [out, in]`, output rows split.

    Split even on one thread: the batched kernel alone measured 2.4x
    faster than `x @ table.T` there (the head, 1 thread: 2.5 vs 5.9 ms).
    """
    torch = _torch()
    sliced = _sliced(x, table, at_least=2)
    if sliced is None:
        return x @ table.T
    outer, inner = table.shape
    rows = x.reshape(-1, inner)
    parts = torch.bmm(
        sliced,  # [S, out/S, in]
        rows.T.expand(sliced.shape[0], inner, rows.shape[0]),  # [S, in, M]
    )  # [S, out/S, M]
    return parts.permute(2, 0, 1).reshape(*x.shape[:-1], outer)
