"""`last_axis_product` against numpy, with and without batch axes on `y`."""

import numpy as np
from keras import ops

from keras_gemma2.layers.last_axis_product import last_axis_product


def test_shared_table_equals_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 3, 8)), rng.normal(size=(5, 8))
    actual = last_axis_product("btd,vd->btv", x.astype("float32"), y.astype("float32"))
    np.testing.assert_allclose(
        ops.convert_to_numpy(actual), np.einsum("btd,vd->btv", x, y), atol=1e-5
    )


def test_batched_keys_equal_numpy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 4, 3, 8)), rng.normal(size=(2, 4, 7, 8))
    actual = last_axis_product(
        "bkgh,bksh->bkgs", x.astype("float32"), y.astype("float32")
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(actual), np.einsum("bkgh,bksh->bkgs", x, y), atol=1e-5
    )


def test_shared_table_in_a_graph_with_unknown_rows():
    import keras
    import pytest

    if keras.config.backend() != "tensorflow":
        pytest.skip("only TensorFlow graphs trace with unknown dimensions")
    import tensorflow as tf

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    y = rng.normal(size=(5, 8)).astype("float32")
    traced = tf.function(
        lambda x: last_axis_product("btd,vd->btv", x, y),
        input_signature=[tf.TensorSpec((None, None, 8), "float32")],
    )
    np.testing.assert_allclose(
        traced(x).numpy(), np.einsum("btd,vd->btv", x, y), atol=1e-5
    )
