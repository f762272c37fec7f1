"""The Keras internals `unallocated.py` relies on still behave as it assumes."""

import keras
import numpy as np

from keras_gemma2.checkpoints.unallocated import (
    build_unallocated,
    forget_pending,
    pending_variables,
)


def test_deferred_variables_are_listed_then_forgotten():
    def factory():
        dense = keras.layers.Dense(3)
        dense.build((None, 2))
        return dense

    layer = build_unallocated(factory)
    assert any(v is layer.kernel for v in pending_variables())
    if keras.config.backend() == "jax":
        # JAX assigns by replacing the value: no random weights ever existed.
        layer.kernel.assign(np.ones((2, 3), "float32"))
        layer.bias.assign(np.zeros((3,), "float32"))
    forget_pending(layer.weights)
    assert not any(v is layer.kernel for v in pending_variables())
    if keras.config.backend() == "jax":
        with keras.StatelessScope():  # closing it initialises pending variables
            pass
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), 1.0)
