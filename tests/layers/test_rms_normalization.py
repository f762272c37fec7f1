"""Gemma RMS norm against a float64 numpy computation."""

import ml_dtypes
import numpy as np
import pytest
from keras import ops

from keras_gemma2.layers import Gemma2RMSNormalization


def numpy_rms_norm(x, scale, epsilon):
    x = x.astype("float64")
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + epsilon) * (1.0 + scale)


def test_matches_numpy_with_nonzero_scale():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(2, 3, 8)).astype("float32") * 3
    layer = Gemma2RMSNormalization(epsilon=0.1)
    layer.build(x.shape)
    scale = rng.normal(size=(8,)).astype("float32")
    layer.scale.assign(scale)
    actual = ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(
        actual, numpy_rms_norm(x, scale, 0.1), rtol=1e-5, atol=1e-6
    )


def test_scale_initialises_to_zero_so_gain_is_one():
    x = np.array([[3.0, 4.0]], "float32")
    actual = ops.convert_to_numpy(Gemma2RMSNormalization(epsilon=0.0)(x))
    np.testing.assert_allclose(actual, x / np.sqrt(12.5), rtol=1e-6)


def test_bfloat16_input_is_normalised_in_float32():
    """Rounded once, at the end: equal to float64 math on the bf16 input.

    Normalising in bfloat16 itself (squares and mean in bf16) differs from
    that reference in 317 of these 1024 values; float32 math then one
    rounding matches it exactly.
    """
    rng = np.random.RandomState(0)
    x = (rng.normal(size=(4, 256)) * np.linspace(1, 100, 256)).astype("float32")
    layer = Gemma2RMSNormalization(dtype="bfloat16")
    out = layer(ops.cast(x, "bfloat16"))
    assert "bfloat16" in str(out.dtype)
    x16 = x.astype(ml_dtypes.bfloat16)
    expected = numpy_rms_norm(x16, 0.0, 1e-6).astype(ml_dtypes.bfloat16)
    actual = ops.convert_to_numpy(ops.cast(out, "float32")).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(actual, expected)


def test_negative_epsilon_is_rejected():
    with pytest.raises(ValueError, match="epsilon"):
        Gemma2RMSNormalization(epsilon=-1.0)
