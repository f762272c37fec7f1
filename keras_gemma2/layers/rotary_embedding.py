"""Rotary position embedding, half-split layout (as HF and KerasHub Gemma)."""

from keras import ops


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
    head_dim = x.shape[-1]
    half = head_dim // 2
    exponents = ops.arange(0, head_dim, 2, dtype="float32") / float(head_dim)
    inverse_frequencies = 1.0 / ops.power(float(max_wavelength), exponents)  # [H/2]
    positions = ops.cast(positions, "float32")
    angles = ops.expand_dims(positions, -1) * inverse_frequencies  # [..., T, H/2]
    angles = ops.concatenate([angles, angles], axis=-1)  # [..., T, H]
    if len(angles.shape) == 2:
        angles = angles[None]  # [1, T, H]
    cos = ops.cast(ops.cos(angles), x.dtype)[:, :, None, :]  # [B, T, 1, H]
    sin = ops.cast(ops.sin(angles), x.dtype)[:, :, None, :]
    first, second = x[..., :half], x[..., half:]
    rotated = ops.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin
