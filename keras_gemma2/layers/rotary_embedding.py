"""Rotary position embedding, half-split layout (as HF and KerasHub Gemma)."""

from keras import ops

from keras_gemma2.layers.gemma2_math import (
    rope_inverse_frequencies,
    rope_rotate,
    rope_rotation,
)


def rotary_rotation(positions, head_dim, max_wavelength, dtype):
    """RoPE `(cos, signed_sin)`, each `[B or 1, T, 1, H]`, for `rope_rotate`.

    Computed once per call of a layer and applied to its queries and keys
    alike. The angles are computed in float32, then cast to `dtype`.

    Args:
        positions: int tensor `[T]` or `[B, T]`, absolute positions.
        head_dim: int `H`, even.
        max_wavelength: float. RoPE theta.
        dtype: dtype of the result (the compute dtype).
    """
    inverse_frequencies = rope_inverse_frequencies(head_dim, max_wavelength)
    cos, signed_sin = rope_rotation(positions, inverse_frequencies, dtype)
    if len(cos.shape) == 2:  # [T, H]
        cos, signed_sin = cos[None], signed_sin[None]
    # [B or 1, T, 1, H]: one rotation per position, shared by the heads.
    return cos[:, :, None, :], signed_sin[:, :, None, :]


def rotary_embedding(x, positions, max_wavelength=10000.0):
    """Rotate feature pairs `(i, i + H/2)` of `x` by position-dependent angles.

    Args:
        x: tensor `[B, T, N, H]`, `H` even.
        positions: int tensor `[T]` or `[B, T]`, absolute positions.
        max_wavelength: float. RoPE theta.

    Returns:
        Tensor like `x`. The angles are computed in float32.
    """
    x = ops.convert_to_tensor(x)
    rotation = rotary_rotation(positions, x.shape[-1], max_wavelength, x.dtype)
    return rope_rotate(x, rotation)
