"""int8 projections of `TorchDecoder`: Keras' own codes, torch's int8 kernels.

A layer quantized by `Gemma2CausalLM.quantize("int8")` holds int8 codes and
a float scale per output channel (`w = codes / scale`). `Int8Matrix` reads
them in place (a reshaped view, never a float copy) and multiplies the way
the layer's forward does:

- Projections quantize their input per row to int8 (Keras' default
  `AbsMaxQuantizer`): the same rounding here, then the exact integer sums
  of int8 x int8, then one division by both scales, so the product equals
  the layer's to float rounding. The sums come from `torch._int_mm`, or,
  for few rows on x86 CPUs, from FBGEMM's int8 kernels on a packed copy
  of the codes (`packed_products`; the same sums, twice as fast).
- Weight-only layers (the tied output head of `Gemma2CausalLM.quantize`),
  whose codes are `[out, in]` rows (the embedding table): in bfloat16,
  torch's weight-only kernel `torch.ops.aten._weight_int8pack_mm`; its
  float32 variant measured 10-50x slower than a float32 matmul on 2 CPU
  cores, so a float32 input is split into three int8 terms instead (see
  `_weight_only_product`), multiplied in one product of exact sums.
  Other weight-only codes are dequantized per call, as Keras' torch path
  does.

`tests/generation/test_int8_decode.py` holds the decoder's logits to the
quantized layers': max difference 2.4e-7 in float32, 0 in bfloat16; and
the FBGEMM products to `torch._int_mm`'s, bit for bit.

Measured (mid config, one decode token, same process, alternating):
8.2-8.7 ms on `torch._int_mm`, 5.2-5.6 ms on FBGEMM's packs (float32 6.0).

A QLoRA adapter (`keras_gemma2.training.lora`) adds its low-rank product.
In a compiled step (`jit_compile=True`) the same packs are reached through
`torch_matmul.fbgemm_product`.
"""

import warnings

from keras_gemma2.generation import torch_matmul
from keras_gemma2.layers.torch_ops import torch_module as _torch

# Products of at most this many int8 rows go through FBGEMM's kernels on
# the packs `packed_products` made (x86 CPUs). One row, one matrix again
# and again (medians): `[512, 2048]` 53 -> 35 us, `[2048, 512]` 33 -> 26
# us, the head `[512, 32000]` with its three rows 979 -> 192 us; at 8 rows
# the two are level, at 32 `torch._int_mm` leads. In the decode step
# (mid config, one token): 4.6 ms of `_int_mm` -> 2.2 ms.
PACKED_ROWS = 8


def quantize_rows(x, quantizer):
    """`(codes int8, scale)` of `x [..., in]`, one scale per row.

    Keras' `abs_max_quantize` (the `AbsMaxQuantizer` of an int8 layer) in
    the same order of operations and dtype: `scale = high / (max |x| +
    epsilon)`, codes `clip(round(x * scale))`.
    """
    codes, scale = _rounded(x, *quantizer.value_range, quantizer.epsilon)
    return codes.to(_torch().int8), scale


def _rounded(x, low, high, epsilon):
    """`quantize_rows` with the codes left in `x`'s dtype (whole numbers)."""
    torch = _torch()
    # max |x| as `abs` then `amax`: `vector_norm(x, inf)` gives the same
    # in one call but runs 1.3x (one row) to 10x (32 rows of 512) slower.
    # Then, in place on this call's own tensors, the same roundings as out
    # of place.
    peak = x.abs().amax(dim=-1, keepdim=True)
    # `torch.divide`, not `high / tensor`: torch computes the latter as
    # `reciprocal * high`, rounding twice in bfloat16.
    scale = torch.divide(high, peak.add_(epsilon))
    if scale.dtype != x.dtype:
        scale = scale.to(x.dtype)
    codes = torch.mul(x, scale).round_()
    if x.dtype != torch.float32 or low != -high:
        # In float32, |x * scale| <= high (1 + 2**-23) for every row, so a
        # symmetric range clips nothing; bfloat16's coarser scale can
        # round a code to high + 1.
        codes.clamp_(low, high)
    return codes, scale


class Int8Matrix:
    """One int8 projection, multiplied without a dequantized copy.

    Args:
        codes: int8 `[in, out]` tensor (a view of the layer's variable).
        scale: float `[out]`, Keras' scale (`w = codes / scale`).
        quantizer: the layer's activation quantizer, or `None` (weight-only).
        dtype: torch dtype of the products (the model's compute dtype).
        lora: `None`, or `(a [in, rank], b [rank, out], factor)`.
    """

    def __init__(self, codes, scale, quantizer, dtype, lora=None, source=None):
        torch = _torch()
        self.codes = codes
        self.source = source  # the variable's tensor, for the packs' cache
        self.fbgemm = None  # FBGEMM's packed codes (`packed_products`), or None
        self.slot = None  # that pack's number in a compiled step (`number_packs`)
        self.scale = scale
        self.quantizer = quantizer
        self.dtype = dtype
        self.lora = lora
        rows = codes.T  # [out, in]
        self.packed = None
        if quantizer is None and rows.is_contiguous():
            self.packed = rows
            self.ones = torch.ones(
                rows.shape[0], dtype=torch.bfloat16, device=rows.device
            )

    @classmethod
    def of_dense(cls, layer, shape, dtype):
        """The matrix `[in, out]` (`shape`) of an int8 `EinsumDense`."""
        from keras import ops

        source = ops.convert_to_tensor(layer._kernel)
        codes = source.detach().reshape(shape)
        # Keras keeps the scale in the output's layout; flat, it is `[out]`.
        scale = ops.convert_to_tensor(layer.kernel_scale).detach().reshape(-1)
        if scale.shape[0] != shape[1]:
            raise ValueError(
                f"Layer {layer.name!r} has {scale.shape[0]} int8 scales; "
                f"TorchDecoder expects one per output channel ({shape[1]})."
            )
        lora = None
        if hasattr(layer, "_lora_update"):  # keras_gemma2.training.lora
            a = ops.convert_to_tensor(layer.lora_kernel_a).detach()
            b = ops.convert_to_tensor(layer.lora_kernel_b).detach()
            lora = (a, b, layer.lora_alpha / layer.lora_rank)
        return cls(codes, scale, layer.inputs_quantizer, dtype, lora, source)

    @classmethod
    def of_embedding(cls, layer, dtype):
        """The tied head `[hidden, vocabulary]` of an int8 embedding layer."""
        from keras import ops

        source = ops.convert_to_tensor(layer._embeddings)
        codes = source.detach()  # [V, D]
        scale = ops.convert_to_tensor(layer.embeddings_scale).detach()  # [V]
        return cls(codes.T, scale, layer.inputs_quantizer, dtype, source=source)

    def lookup(self, token):
        """Embedding rows of `token [...]`: `[..., hidden]`, as Keras looks up."""
        rows = self.codes.T[token].to(self.dtype)
        return rows / self.scale[token].unsqueeze(-1)


# CUDA's `torch._int_mm` (cuBLASLt, torch 2.11 on an H200) wants more than
# 16 rows in its first operand, and inner and output sizes that are
# multiples of 8; with a row-major second operand (Keras' int8 kernels) it
# failed with CUBLAS_STATUS_NOT_SUPPORTED for inner sizes 32 and 64. The
# transposed product `(matrix.T @ rows.T).T` passes the weight as a
# column-major first operand and the (padded) rows as the second, which it
# took at every size tried; the CPU kernel takes any.
_CUDA_ALIGNMENT = 8
_CUDA_MIN_OUTPUTS = 17


def int_mm(codes, matrix_codes):
    """`codes [M, in] int8 @ matrix_codes [in, out] int8`, exact, int32.

    `torch._int_mm`; on CUDA as `(matrix_codes.T @ codes.T).T`, the rows
    padded with zero rows to a multiple of 8, and in float64 (exact for
    int8 products summed over fewer than 2**38 terms) where the sizes do not
    suit its kernel.
    """
    torch = _torch()
    if codes.device.type != "cuda":
        return torch._int_mm(codes, matrix_codes)
    rows, inner = codes.shape
    outputs = matrix_codes.shape[1]
    if inner % _CUDA_ALIGNMENT or outputs < _CUDA_MIN_OUTPUTS:
        product = codes.to(torch.float64) @ matrix_codes.to(torch.float64)
        return product.to(torch.int32)
    padded_rows = -(-rows // _CUDA_ALIGNMENT) * _CUDA_ALIGNMENT
    if padded_rows != rows:
        codes = torch.cat([codes, codes.new_zeros((padded_rows - rows, inner))])
    return torch._int_mm(matrix_codes.T, codes.T).T[:rows]


def _can_pack():
    """Whether this torch multiplies packed int8 codes on FBGEMM (x86)."""
    torch = _torch()
    return torch_matmul.fbgemm_engine() and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"
    )


def _packed(rows):
    """FBGEMM's packed form of the int8 codes `rows [out, in]`, scale 1."""
    torch = _torch()
    outputs = rows.shape[0]
    with warnings.catch_warnings():
        # The packing API is made of quantized tensors, which torch marks
        # deprecated; only this short-lived one is made, with unit scales.
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(
            rows.contiguous(),
            torch.ones(outputs, dtype=torch.float64),
            torch.zeros(outputs, dtype=torch.int64),
            0,
        )
    return torch.ops.quantized.linear_prepack(weight, None)


def _packable(matrix):
    return (
        isinstance(matrix, Int8Matrix)
        and matrix.source is not None
        and not matrix.source.is_inference()
        and matrix.codes.device.type == "cpu"
    )


def _pack_of(matrices):
    """The cached FBGEMM pack of `matrices`' codes side by side, `[outs, in]`."""
    torch = _torch()

    def make():
        return _packed(torch.cat([m.codes.T for m in matrices]))

    return torch_matmul.cached_pack("int8", [m.source for m in matrices], make)


def packed_products(groups):
    """A `RowProduct` for each group of `groups` that can have one, else `None`.

    Args:
        groups: lists of matrices (`Int8Matrix` or tensors); each group's
            matrices multiply the same rows.

    Where torch has FBGEMM's int8 kernels (x86 CPUs), every group made
    only of CPU `Int8Matrix`es with a variable behind them is packed:

    - matrices that quantize their input, by one quantizer and without
      LoRA: one pack of the group's codes side by side, multiplied by the
      group's `RowProduct` (one product and one division for query, key
      and value);
    - the others (the weight-only head, LoRA): a pack each (`.fbgemm`),
      which `products` takes for few rows.

    Few rows (at most `PACKED_ROWS`) then run on FBGEMM's kernels instead
    of `torch._int_mm`: the same exact integer sums. The packs are copies
    (the mid config: 48 MB beside 42 MB of codes), made while they total
    at most `torch_matmul.COPY_BYTES`, cached per variable across calls
    and made again when a variable changes (`torch_matmul.clear_copies`
    frees them).
    """
    results = [None] * len(groups)
    if not _can_pack():
        return results
    for index in torch_matmul.within_copy_limit(groups, _packable, _code_bytes):
        group = groups[index]
        quantizers = {_quantizer_key(m.quantizer) for m in group}
        if None not in quantizers and len(quantizers) == 1:
            if all(m.lora is None for m in group):
                results[index] = RowProduct(_pack_of(group), group)
                continue
        for matrix in group:
            matrix.fbgemm = _pack_of([matrix])
    return results


def _code_bytes(matrix):
    return matrix.codes.numel()


def _quantizer_key(quantizer):
    if quantizer is None:
        return None
    return tuple(quantizer.value_range), quantizer.epsilon


class RowProduct(torch_matmul.SideBySide):
    """Few rows times a group of int8 matrices, on one FBGEMM pack.

    The group's matrices quantize their input with one quantizer (query,
    key and value; gate and up; or one matrix). What `products` does for
    them, with the group's checks made once and one product, one division
    for all: `split(x)` is bit for bit `products(x, *group)`, the same
    rounding of the rows, the same integer sums (`exact_product`), the
    same division by `scale * matrix.scale` per element.
    """

    __slots__ = (
        "pack",
        "scale",
        "sizes",
        "width",
        "slot",
        "low",
        "high",
        "epsilon",
        "dtype",
    )

    def __init__(self, pack, matrices):
        torch = _torch()
        self.pack = pack
        self.scale = torch.cat([m.scale for m in matrices])
        self.sizes = [m.codes.shape[1] for m in matrices]
        self.width = sum(self.sizes)
        self.slot = None  # its pack's number in a compiled step (`number_packs`)
        self.low, self.high = matrices[0].quantizer.value_range
        self.epsilon = matrices[0].quantizer.epsilon
        self.dtype = matrices[0].dtype

    @staticmethod
    def takes(x):
        """Whether `x` is `[M, in]` with at most `PACKED_ROWS` rows."""
        return x.dim() == 2 and 0 < x.shape[0] <= PACKED_ROWS

    def __call__(self, x):
        """`[M, sum of outs]`: `x [M, in]`'s products, side by side."""
        torch = _torch()
        codes, scale = _rounded(x, self.low, self.high, self.epsilon)
        if codes.dtype != torch.float32:
            codes = codes.float()
        sums = torch_matmul.fbgemm_product(
            torch_matmul.INT8, codes, self.pack, self.slot, self.width
        )
        if self.dtype != torch.float32:
            sums = sums.to(self.dtype)
        return sums.div_(scale * self.scale)


def exact_product(codes, matrix):
    """`codes [M, in] @ matrix`'s codes, exact: int32, or float32 where the
    sums come from `matrix`'s FBGEMM pack (exactly the int32 sums rounded
    to float32, as `.to(torch.float32)` rounds them).

    `codes` are int8, or integers in a float dtype (one conversion fewer
    for FBGEMM, which reads float rows and rounds them to its codes).
    """
    torch = _torch()
    if matrix.fbgemm is not None and codes.shape[0] <= PACKED_ROWS:
        return torch_matmul.fbgemm_product(
            torch_matmul.INT8,
            codes.to(torch.float32),
            matrix.fbgemm,
            matrix.slot,
            matrix.codes.shape[1],
        )
    return int_mm(codes.to(torch.int8), matrix.codes)


def products(x, *matrices):
    """`x @ matrix` for each of `matrices` (`Int8Matrix` or tensors).

    The int8 ones that quantize their input share one quantization of `x`
    (query, key and value read the same rows; so do gate and up). Results
    take the dtypes the Keras layers' products take.
    """
    stacked = torch_matmul.stacked_products(x, matrices)
    if stacked is not None:
        return stacked
    quantized = {}
    results = []
    rows = None  # [M, in], only for int8 matrices
    for matrix in matrices:
        if not isinstance(matrix, Int8Matrix):
            results.append(torch_matmul.product(x, matrix))
            continue
        if rows is None:
            rows = x.reshape(-1, x.shape[-1])
        if matrix.quantizer is not None:
            key = _quantizer_key(matrix.quantizer)
            if key not in quantized:
                quantized[key] = quantize_rows(rows, matrix.quantizer)
            codes, scale = quantized[key]
            product = exact_product(codes, matrix).to(matrix.dtype)
            product = product / (scale * matrix.scale)
        else:
            product = _weight_only_product(rows, matrix)
        if matrix.lora is not None:
            a, b, factor = matrix.lora
            update = ((rows.to(a.dtype) @ a) @ b * factor).to(matrix.dtype)
            product = product + update
        results.append(product.reshape(*x.shape[:-1], -1))
    return results


class _RowQuantizer:
    """Per-row int8 rounding of the residual splits (Keras' defaults)."""

    value_range = (-127, 127)
    epsilon = 1e-7


def _weight_only_product(rows, matrix):
    """`rows [M, in] @ matrix` for a layer that keeps its input in float.

    Keras multiplies the float input by the dequantized kernel. Here:

    - bfloat16 input: torch's weight-only int8 kernel (bfloat16 out).
    - float32 input, codes `[out, in]` rows: the input as a sum of three
      int8 terms (each rounding the residual of the ones before, so the
      sum carries ~21 bits, float32's 24 less the last rounding) in one
      `torch._int_mm` call of `3 M` rows: int8 bytes read once, the
      exact int32 products recombined in float32.
    - otherwise (codes `[in, out]`, weight-only by the user's config): the
      kernel converted per call, as Keras' torch path does.
    """
    torch = _torch()
    dtype = matrix.dtype
    if matrix.packed is not None and rows.dtype == torch.bfloat16:
        product = torch.ops.aten._weight_int8pack_mm(rows, matrix.packed, matrix.ones)
        return product.to(dtype) / matrix.scale
    if matrix.packed is not None and rows.dtype == torch.float32:
        terms, scales, residual = [], [], rows
        low, high = _RowQuantizer.value_range
        for index in range(3):
            codes, scale = _rounded(residual, low, high, _RowQuantizer.epsilon)
            if index < 2:  # the last residual is not needed
                residual = residual - codes / scale
            terms.append(codes)
            scales.append(scale)
        parts = exact_product(torch.cat(terms), matrix)
        if parts.dtype != dtype:
            parts = parts.to(dtype)
        parts = parts.view(3, rows.shape[0], -1)  # [3, M, out]
        product = parts[0] / scales[0] + parts[1] / scales[1] + parts[2] / scales[2]
        return product / matrix.scale
    return rows.to(dtype) @ (matrix.codes.to(dtype) / matrix.scale)
