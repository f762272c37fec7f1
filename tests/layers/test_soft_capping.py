"""Soft-capping against numpy."""

import numpy as np
import pytest
from keras import ops

from keras_gemma2.layers import SoftCap, SoftCappedDense, soft_cap


def test_soft_cap_matches_numpy():
    x = np.linspace(-200, 200, 41).astype("float32")
    actual = ops.convert_to_numpy(soft_cap(x, 30.0))
    np.testing.assert_allclose(actual, 30.0 * np.tanh(x / 30.0), rtol=1e-6, atol=1e-5)
    assert np.abs(actual).max() < 30.0


def test_soft_cap_none_is_identity():
    x = np.array([1e4, -3.0], "float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(soft_cap(x, None)), x)


def test_soft_capped_dense_matches_numpy():
    x = np.random.RandomState(0).normal(size=(2, 3, 5)).astype("float32") * 10
    layer = SoftCappedDense(4, soft_cap=2.5, use_bias=True, bias_initializer="ones")
    actual = ops.convert_to_numpy(layer(x))
    kernel = ops.convert_to_numpy(layer.kernel)
    expected = 2.5 * np.tanh((x @ kernel + 1.0) / 2.5)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_soft_capped_dense_round_trips_config():
    layer = SoftCappedDense(3, soft_cap=7.0)
    clone = SoftCappedDense.from_config(layer.get_config())
    assert clone.soft_cap == 7.0 and clone.units == 3


@pytest.mark.parametrize("cap", [0, -1.0, "50", True])
def test_invalid_cap_is_rejected_with_its_name(cap):
    with pytest.raises(ValueError, match="soft_cap"):
        SoftCappedDense(3, soft_cap=cap)
    with pytest.raises(ValueError, match="cap"):
        SoftCap(cap)
