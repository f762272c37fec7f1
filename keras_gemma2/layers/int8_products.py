"""int8 products of a decode step that XLA (CPU) runs on its int8 kernels.

XLA:CPU (jax 0.10, TensorFlow 2.21) multiplies `int8 x int8 -> int32` with
YNNPACK's int8 kernels, but only when both operands are matrices: a
one-row product (`m == 1`, a decode step at batch 1) is lowered to its own
loop over an `s32` copy of the weights. On the mid-size weights of
`benchmarks/matmul_floor.py`, the 57 int8 products of one token took 68-73 ms
as one-row products and 4.1-4.6 ms as two-row ones (float32 one-row: 6.9 ms),
with XLA's default flags. So:

- `duplicate_row` sends a lone row through a layer as two equal rows and
  keeps the first result. Keras' int8 layers quantize each row on its own
  (per-token scales) and accumulate in int32, so the kept row is the
  one-row result bit for bit.
- `int8_head_logits` multiplies a float hidden state by the int8 tied
  embedding (quantized weight-only, see `models/quantization.py`). The
  hidden row is written as three int8 rows, `h = s (q1 + q2 / 254 +
  q3 / 254**2)` with `s = max|h| / 127`: each row quantizes what the rows
  before it left, so the three together carry about 21 bits: within
  `1.3e-7 max|h|` of `h` (the worst of 1280 rows measured; a float32 value
  rounds at `6e-8` of itself). One three-row int8 product then gives the
  head's float logits.
"""

import keras
from keras import ops

# `q2` and `q3` scale the remainders (at most 0.5 in magnitude) to +-127.
_REMAINDER_SCALE = 254.0
_INT8_MAX = 127.0


def xla_int8_backend():
    """Whether this backend compiles generation with XLA (jax, tensorflow)."""
    return keras.config.backend() in ("jax", "tensorflow")


def duplicate_row(layer, x):
    """`layer(x)` for a one-row `x`, computed as two equal rows.

    Args:
        layer: a layer whose output keeps `x`'s first (batch) axis and whose
            rows do not interact (an `EinsumDense` projection).
        x: a tensor with a static first axis of 1.

    Returns:
        The first row of `layer(concatenate([x, x]))`, i.e. `layer(x)`.

    Example:

    >>> import numpy as np
    >>> dense = keras.layers.Dense(3)
    >>> x = np.ones((1, 1, 4), "float32")
    >>> tuple(duplicate_row(dense, x).shape)
    (1, 1, 3)
    """
    if x.shape[0] != 1:
        raise ValueError(
            f"`duplicate_row` takes one row (batch axis 1); received `x` of "
            f"shape {tuple(x.shape)}."
        )
    return layer(ops.concatenate([x, x], axis=0))[:1]


def split_int8(x):
    """Three int8 tensors and a scale that together restore a float `x`.

    Args:
        x: float tensor `[..., D]`.

    Returns:
        `(codes, scale)`: int8 `codes [..., 3, D]` and float32 `scale
        [..., 1]`, with `x ~= scale * (codes[..., 0, :] + codes[..., 1, :] /
        254 + codes[..., 2, :] / 254**2)`, to within about `1.3e-7` of each
        row's `max|x|` (`tests/layers/test_int8_products.py` asserts
        `2e-7`).

    Example:

    >>> import numpy as np
    >>> x = np.array([[0.3, -1.7, 2.25]], "float32")
    >>> codes, scale = split_int8(x)
    >>> codes = keras.ops.convert_to_numpy(codes).astype("float64")
    >>> scale = keras.ops.convert_to_numpy(scale)
    >>> restored = scale * (codes[:, 0] + codes[:, 1] / 254 + codes[:, 2] / 254**2)
    >>> bool(np.abs(restored - x).max() < 1e-6)
    True
    """
    x = ops.cast(x, "float32")
    peak = ops.max(ops.abs(x), axis=-1, keepdims=True)
    scale = ops.where(peak > 0, peak / _INT8_MAX, ops.ones_like(peak))
    rest = x / scale
    codes = []
    for _ in range(3):
        code = ops.clip(ops.round(rest), -_INT8_MAX, _INT8_MAX)
        codes.append(ops.cast(code, "int8"))
        rest = (rest - code) * _REMAINDER_SCALE
    return ops.stack(codes, axis=-2), scale


def _int8_rows_times_table(codes, table):
    """int32 `codes [..., R, D] . table [V, D]` over `D`: `[..., R, V]`."""
    table = ops.convert_to_tensor(table)
    if not xla_int8_backend():
        # Exact, without int8 kernels (torch decodes with `TorchDecoder`).
        return ops.einsum(
            "...rd,vd->...rv", ops.cast(codes, "int32"), ops.cast(table, "int32")
        )
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        rows = tf.reshape(codes, (-1, codes.shape[-1]))
        product = tf.matmul(rows, table, transpose_b=True, output_type=tf.int32)
        return tf.reshape(product, tuple(codes.shape[:-1]) + (table.shape[0],))
    import jax

    return jax.lax.dot_general(
        codes,
        table,
        ((((codes.ndim - 1),), (1,)), ((), ())),
        preferred_element_type="int32",
    )


def int8_head_logits(hidden_states, embedding):
    """The tied int8 head's logits, `hidden_states . E^T`, from int8 products.

    Args:
        hidden_states: float `[batch, T, D]`.
        embedding: a `ReversibleEmbedding` with tied weights quantized to
            int8 weight-only (no input quantizer): `_embeddings` int8
            `[V, D]`, `embeddings_scale` `[V]`.

    Returns:
        Logits `[batch, T, V]` in the embedding's compute dtype, as
        `embedding(hidden_states, reverse=True)` computes them, up to the
        split's rounding (`split_int8`).
    """
    codes, scale = split_int8(hidden_states)  # [B, T, 3, D], [B, T, 1]
    parts = ops.cast(_int8_rows_times_table(codes, embedding._embeddings), "float32")
    combined = (
        parts[..., 0, :]
        + parts[..., 1, :] / _REMAINDER_SCALE
        + parts[..., 2, :] / (_REMAINDER_SCALE * _REMAINDER_SCALE)
    )
    weight_scale = ops.reshape(ops.cast(embedding.embeddings_scale, "float32"), (-1,))
    logits = combined * (scale / weight_scale)
    return ops.cast(logits, embedding.compute_dtype)


def int8_head_applies(embedding):
    """Whether `int8_head_logits` computes `embedding`'s reverse call here."""
    return (
        xla_int8_backend()
        and embedding.quantization_mode == "int8"
        and getattr(embedding, "tie_weights", False)
        and not getattr(embedding, "inputs_quantizer", None)
        and getattr(embedding, "logit_soft_cap", None) is None
    )


__all__ = [
    "duplicate_row",
    "int8_head_applies",
    "int8_head_logits",
    "split_int8",
    "xla_int8_backend",
]
