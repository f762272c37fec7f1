"""RoPE against a complex-number numpy reference."""

import numpy as np
from keras import ops

from keras_gemma2.layers import rotary_embedding


def numpy_rope(x, positions, theta):
    # Pair feature i with feature i + H/2 as the complex number (x_i, x_{i+H/2})
    # and multiply by exp(1j * position * theta ** (-2i / H)).
    half = x.shape[-1] // 2
    frequencies = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    angles = positions[:, None] * frequencies[None]  # [T, H/2]
    z = x[..., :half] + 1j * x[..., half:]
    z = z * np.exp(1j * angles)[None, :, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def test_matches_complex_rotation():
    x = np.random.RandomState(0).normal(size=(2, 6, 3, 8)).astype("float32")
    positions = np.arange(6) + 5
    actual = ops.convert_to_numpy(
        rotary_embedding(x, ops.convert_to_tensor(positions, "int32"), 123.0)
    )
    np.testing.assert_allclose(actual, numpy_rope(x, positions, 123.0), atol=1e-5)


def test_position_zero_is_identity():
    x = np.random.RandomState(1).normal(size=(1, 1, 2, 4)).astype("float32")
    out = rotary_embedding(x, ops.zeros((1,), "int32"))
    np.testing.assert_allclose(ops.convert_to_numpy(out), x, atol=1e-7)
