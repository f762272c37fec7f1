"""The Keras internals `unallocated.py` relies on still behave as it assumes."""

import keras
import numpy as np
import pytest

from keras_gemma2.checkpoints.hf_checkpoint import as_assignable
from keras_gemma2.checkpoints.unallocated import (
    build_unallocated,
    fill,
    forget_pending,
    pending_variables,
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unallocated_variables_are_filled_then_forgotten(dtype):
    def factory():
        dense = keras.layers.Dense(3, dtype=dtype)
        dense.build((None, 2))
        return dense

    layer = build_unallocated(factory)
    assert any(v is layer.kernel for v in pending_variables())
    kernel = np.arange(6, dtype="float32").reshape(2, 3)
    fill(layer.kernel, as_assignable(kernel, layer.kernel.dtype))
    fill(layer.bias, as_assignable(np.ones(3, "float32"), layer.bias.dtype))
    forget_pending(layer.weights)
    assert not any(v is layer.kernel for v in pending_variables())
    with keras.StatelessScope():  # closing one initialises pending variables
        pass
    value = keras.ops.convert_to_numpy(keras.ops.cast(layer.kernel, "float32"))
    np.testing.assert_array_equal(value, kernel)
    assert layer.kernel.dtype == dtype
    out = layer(np.ones((1, 2), "float32"))
    expected = np.ones((1, 2)) @ kernel + 1
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")), expected
    )


def test_fill_assigns_allocated_variables():
    layer = keras.layers.Dense(2)
    layer.build((None, 2))
    fill(layer.kernel, np.eye(2, dtype="float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), np.eye(2))
