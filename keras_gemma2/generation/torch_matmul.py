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


@functools.cache
def _torch():
    import torch

    return torch


def _slices(x, w, axis_size, at_least):
    """How many slices of `axis_size` to multiply `x` by `w` in; 1: don't."""
    torch = _torch()
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if (
        w.device.type != "cpu"
        or w.dtype != torch.float32
        or x.dtype != torch.float32
        or not 0 < rows <= MAX_ROWS
        or w.numel() < MIN_ELEMENTS
        or not w.is_contiguous()
    ):
        return 1
    slices = 1
    threads = max(torch.get_num_threads(), at_least)
    while slices * 2 <= min(threads, MAX_SLICES) and axis_size % (slices * 2) == 0:
        slices *= 2
    return slices


def product(x, w):
    """`x [..., in] @ w [in, out]`, the inner axis split over threads."""
    torch = _torch()
    inner, outer = w.shape
    # One thread gains nothing from splitting a projection.
    slices = _slices(x, w, inner, at_least=1)
    if slices == 1:
        return x @ w
    rows = x.reshape(-1, inner)
    parts = torch.bmm(
        rows.view(rows.shape[0], slices, -1).transpose(0, 1),  # [S, M, in/S]
        w.view(slices, -1, outer),  # [S, in/S, out]
    )
    return parts.sum(0).reshape(*x.shape[:-1], outer)


def transposed_product(x, table):
    """`x [..., in] @ table.T` for `table [out, in]`, output rows split.

    Split even on one thread: the batched kernel alone measured 2.4x
    faster than `x @ table.T` there (the head, 1 thread: 2.5 vs 5.9 ms).
    """
    torch = _torch()
    outer, inner = table.shape
    slices = _slices(x, table, outer, at_least=2)
    if slices == 1:
        return x @ table.T
    rows = x.reshape(-1, inner)
    parts = torch.bmm(
        table.view(slices, -1, inner),  # [S, out/S, in]
        rows.T.expand(slices, inner, rows.shape[0]),  # [S, in, M]
    )  # [S, out/S, M]
    return parts.permute(2, 0, 1).reshape(*x.shape[:-1], outer)
