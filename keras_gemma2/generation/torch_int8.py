"""int8 projections of `TorchDecoder`: Keras' own codes, torch's int8 kernels.

A layer quantized by `Gemma2CausalLM.quantize("int8")` holds int8 codes and
a float scale per output channel (`w = codes / scale`). `Int8Matrix` reads
them in place (a reshaped view, never a float copy) and multiplies the way
the layer's forward does:

- Projections quantize their input per row to int8 (Keras' default
  `AbsMaxQuantizer`): the same rounding here, then `torch._int_mm` (int8
  x int8 -> int32) on the layer's `[in, out]` codes, then one division by
  both scales, so the product equals the layer's to float rounding.
- Weight-only layers (the tied output head of `Gemma2CausalLM.quantize`),
  whose codes are `[out, in]` rows (the embedding table): in bfloat16,
  torch's weight-only kernel `torch.ops.aten._weight_int8pack_mm`; its
  float32 variant measured 10-50x slower than a float32 matmul on 2 CPU
  cores, so a float32 input is split into three int8 terms instead (see
  `_weight_only_product`), multiplied by `torch._int_mm` in one call.
  Other weight-only codes are dequantized per call, as Keras' torch path
  does.

`tests/generation/test_int8_decode.py` holds the decoder's logits to the
quantized layers': max difference 2.4e-7 in float32, 0 in bfloat16.

Measured (`benchmarks/generate.py --dtypes int8,bfloat16_int8 --cases a
--peers none`, mid config, 2 shared CPU cores, each int8 model interleaved
with its unquantized self): torch 88.6 tokens/s int8 against 45.8 float32
(1.94x), 89.9 against 72.0 in bfloat16 (1.25x).

A QLoRA adapter (`keras_gemma2.training.lora`) adds its low-rank product.
"""

import functools

from keras_gemma2.generation import torch_matmul


@functools.cache
def _torch():
    import torch

    return torch


def quantize_rows(x, quantizer):
    """`(codes int8, scale)` of `x [..., in]`, one scale per row.

    Keras' `abs_max_quantize` (the `AbsMaxQuantizer` of an int8 layer) in
    the same order of operations and dtype: `scale = high / (max |x| +
    epsilon)`, codes `clip(round(x * scale))`.
    """
    torch = _torch()
    low, high = quantizer.value_range
    # `torch.divide`, not `high / tensor`: torch computes the latter as
    # `reciprocal * high`, rounding twice in bfloat16.
    scale = torch.divide(high, x.abs().amax(dim=-1, keepdim=True) + quantizer.epsilon)
    codes = torch.clamp(torch.round(x * scale.to(x.dtype)), low, high)
    return codes.to(torch.int8), scale.to(x.dtype)


class Int8Matrix:
    """One int8 projection, multiplied without a dequantized copy.

    Args:
        codes: int8 `[in, out]` tensor (a view of the layer's variable).
        scale: float `[out]`, Keras' scale (`w = codes / scale`).
        quantizer: the layer's activation quantizer, or `None` (weight-only).
        dtype: torch dtype of the products (the model's compute dtype).
        lora: `None`, or `(a [in, rank], b [rank, out], factor)`.
    """

    def __init__(self, codes, scale, quantizer, dtype, lora=None):
        torch = _torch()
        self.codes = codes
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

        codes = ops.convert_to_tensor(layer._kernel).detach().reshape(shape)
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
        return cls(codes, scale, layer.inputs_quantizer, dtype, lora)

    @classmethod
    def of_embedding(cls, layer, dtype):
        """The tied head `[hidden, vocabulary]` of an int8 embedding layer."""
        from keras import ops

        codes = ops.convert_to_tensor(layer._embeddings).detach()  # [V, D]
        scale = ops.convert_to_tensor(layer.embeddings_scale).detach()  # [V]
        return cls(codes.T, scale, layer.inputs_quantizer, dtype)

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
            key = tuple(matrix.quantizer.value_range), matrix.quantizer.epsilon
            if key not in quantized:
                quantized[key] = quantize_rows(rows, matrix.quantizer)
            codes, scale = quantized[key]
            product = int_mm(codes, matrix.codes).to(matrix.dtype)
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
        for _ in range(3):
            codes, scale = quantize_rows(residual, _RowQuantizer)
            residual = residual - codes.to(rows.dtype) / scale
            terms.append(codes)
            scales.append(scale)
        parts = int_mm(torch.cat(terms), matrix.codes).to(dtype)
        parts = parts.view(3, rows.shape[0], -1)  # [3, M, out]
        product = parts[0] / scales[0] + parts[1] / scales[1] + parts[2] / scales[2]
        return product / matrix.scale
    return rows.to(dtype) @ (matrix.codes.to(dtype) / matrix.scale)
