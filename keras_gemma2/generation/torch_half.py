"""Few-row bfloat16 products of `TorchDecoder` on FBGEMM's float16 kernels.

A bfloat16 decode step streams every kernel once per token, and torch's
own bfloat16 one-row products stream slowly on CPU. One row times 40
distinct matrices cycled (so each streams from memory), medians, in
gigabytes of bfloat16 weights per second:

| matrix | `x @ w` bfloat16 | `F.linear` bfloat16 `[out, in]` | FBGEMM float16 pack |
|---|---|---|---|
| `[512, 2048]` (gate, up) | 9.1 | 9.3 | 30.9 |
| `[2048, 512]` (down) | 11.1 | 16.5 | 31.0 |
| head `[512, 32000]` | 14.6 | 14.7 | 29.2 |

(Prepacked oneDNN bfloat16 measured 19.5 GB/s at stop 30.) FBGEMM's
float16 kernel (`quantized::linear_dynamic_fp16`, x86) multiplies float32
rows by float16 weights, widening them to float32 and summing in float32,
as a bfloat16 matrix product sums. A bfloat16 weight is a float16 one
exactly when its magnitude is at most 65504 (float16's largest) and at
least 2**-17 (below that, float16's subnormals keep fewer than bfloat16's
8 significant bits; such a weight moves by at most 2**-25, 3e-8, to the
nearest one). So `half_products` packs the `[out, in]` rows of a group's
matrices side by side, in float16, when every weight is finite and at most
65504; a product is then the float32 sums of the bfloat16 rows with the
weights, rounded to bfloat16 once, as the layers' product is, up to the
order of the sums and those tiny weights.

`tests/generation/test_half_decode.py` holds the products to float64 and
the decoder's logits to the layers'. In a compiled step (`jit_compile=True`)
the same packs are reached through `torch_matmul.fbgemm_product`.
"""

from keras_gemma2.generation import torch_matmul
from keras_gemma2.layers.torch_ops import torch_module as _torch

# At most this many rows take the packs; more rows make a matrix product
# that torch's own bfloat16 kernels spread over the threads.
MAX_ROWS = 8
# The largest finite float16.
FLOAT16_MAX = 65504.0


def _can_pack():
    """Whether this torch has FBGEMM's float16 kernels (x86)."""
    torch = _torch()
    ops = torch.ops.quantized
    return (
        torch_matmul.fbgemm_engine()
        and hasattr(ops, "linear_prepack_fp16")
        and hasattr(ops, "linear_dynamic_fp16")
    )


class HalfRowProduct(torch_matmul.SideBySide):
    """Few bfloat16 rows times a group of matrices, on one float16 pack.

    Calling it on rows that `takes` gives the products side by side,
    `[M, sum of outs]`, in bfloat16 (see the module docstring).
    """

    __slots__ = ("pack", "sizes", "width", "slot")

    def __init__(self, pack, sizes):
        self.pack = pack
        self.sizes = sizes
        self.width = sum(sizes)
        self.slot = None  # its pack's number in a compiled step (`number_packs`)

    @staticmethod
    def takes(x):
        """Whether `x` is `[M, in]` bfloat16 with at most `MAX_ROWS` rows."""
        return (
            x.dim() == 2 and x.dtype == _torch().bfloat16 and 0 < x.shape[0] <= MAX_ROWS
        )

    def __call__(self, x):
        """`[M, sum of outs]`: `x [M, in]`'s products, side by side."""
        product = torch_matmul.fbgemm_product(
            torch_matmul.HALF, x.float(), self.pack, self.slot, self.width
        )
        return product.to(_torch().bfloat16)


def _packable(rows, source):
    torch = _torch()
    return (
        source is not None
        and not source.is_inference()
        and torch.is_tensor(rows)
        and rows.dim() == 2
        and rows.dtype == torch.bfloat16
        and rows.device.type == "cpu"
    )


def _in_range(rows):
    """Whether every weight of `rows` is finite and float16 can hold it."""
    # In float32: compared in bfloat16, 65504 itself rounds to 65536.
    return bool(rows.abs().amax().float() <= FLOAT16_MAX)  # NaN: False


def half_products(groups):
    """A `HalfRowProduct` for each group that can have one, else `None`.

    Args:
        groups: lists of `(rows, source)` pairs: `rows [out, in]` a
            bfloat16 CPU matrix (a projection kernel's transpose, or the
            tied head's table), `source` the variable's tensor behind it
            (`None`: never packed, e.g. a LoRA-merged kernel made per
            call). A group's matrices multiply the same rows.

    A group is packed when torch has FBGEMM's float16 kernels, every
    matrix is packable with a source, and its weights are in float16's
    range. The packs are copies, as large as the bfloat16 kernels, made
    while they total at most `torch_matmul.COPY_BYTES` (Gemma 2 2B would
    need 5.2 GB); cached per variable across calls and made again when a
    variable changes (`torch_matmul.cached_pack`).
    """
    torch = _torch()
    results = [None] * len(groups)
    if not _can_pack():
        return results
    chosen = torch_matmul.within_copy_limit(
        groups, lambda pair: _packable(*pair), lambda pair: pair[0].numel() * 2
    )
    for index in chosen:
        group = groups[index]

        def make(group=group):
            rows = torch.cat([rows for rows, _ in group])
            if not _in_range(rows):
                return None  # cached too: checked once per variable version
            return torch.ops.quantized.linear_prepack_fp16(rows.float(), None)

        sources = [source for _, source in group]
        pack = torch_matmul.cached_pack("float16", sources, make)
        if pack is not None:
            sizes = [rows.shape[0] for rows, _ in group]
            results[index] = HalfRowProduct(pack, sizes)
    return results
