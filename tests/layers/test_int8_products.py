"""The int8 products of XLA's decode step (`layers/int8_products.py`).

References are independent of the code under test: float64 numpy for the
three-term split and the head's logits, and the Keras layers' own quantized
forward pass (`layer(x)`, `embedding(x, reverse=True)`) for what a decode
step must reproduce.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_gemma2.layers import int8_products, projection
from keras_gemma2.layers.int8_products import int8_head_logits, split_int8
from keras_gemma2.layers.projection import project

XLA = keras.config.backend() in ("jax", "tensorflow")
SPLIT_BOUND = 2e-7  # of each row's max |x|; measured worst 1.3e-7


def _rows(rng):
    """Rows of very different magnitudes, a zero row and a spiky one."""
    x = rng.normal(0.0, 1.0, (6, 257)) * np.array([1e-7, 1e-2, 1, 1, 30, 1e5])[:, None]
    x[3] = 0.0
    x[2, 5] = 40.0  # one large entry: the rest of the row is small
    return x.astype("float32")


def test_split_int8_restores_each_row_within_the_bound():
    x = _rows(np.random.RandomState(0))
    codes, scale = split_int8(x)
    codes = ops.convert_to_numpy(codes)
    assert codes.dtype == np.int8 and codes.shape == (6, 3, 257)
    assert np.abs(codes.astype("int32")).max() <= 127
    terms = codes.astype("float64")
    restored = ops.convert_to_numpy(scale).astype("float64") * (
        terms[:, 0] + terms[:, 1] / 254 + terms[:, 2] / 254**2
    )
    exact = x.astype("float64")
    peak = np.abs(exact).max(axis=-1)
    error = np.abs(restored - exact).max(axis=-1)
    assert error[3] == 0.0  # the zero row
    nonzero = peak > 0
    assert np.all(error[nonzero] <= SPLIT_BOUND * peak[nonzero]), error / peak
    # Control: the first term alone (plain per-row int8) is ~1e4x coarser.
    one_term = ops.convert_to_numpy(scale).astype("float64") * terms[:, 0]
    assert np.abs(one_term - exact).max(axis=-1)[2] > 100 * SPLIT_BOUND * peak[2]


def _int8_head(vocabulary=40, hidden=24, seed=1):
    """A tied embedding quantized as `Gemma2CausalLM.quantize` does its head."""
    from keras_gemma2.models.quantization import layer_schemes

    embedding = keras.layers.ReversibleEmbedding(vocabulary, hidden, tie_weights=True)
    embedding.build((None,))
    rng = np.random.RandomState(seed)
    embedding.embeddings.assign(rng.normal(0, 0.05, (vocabulary, hidden)))
    mode, config, _ = layer_schemes("int8", None)
    embedding.quantize(mode, config=config)
    return embedding


def test_int8_head_logits_against_float64_and_the_layer():
    embedding = _int8_head()
    hidden = np.random.RandomState(2).normal(0, 3, (2, 5, 24)).astype("float32")
    logits = ops.convert_to_numpy(int8_head_logits(hidden, embedding))
    assert logits.shape == (2, 5, 40) and logits.dtype == np.float32
    codes = ops.convert_to_numpy(embedding._embeddings).astype("float64")
    scale = ops.convert_to_numpy(embedding.embeddings_scale).astype("float64")
    weights = codes / scale.reshape(-1, 1)  # [V, D], what the codes stand for
    exact = hidden.astype("float64") @ weights.T
    error = np.abs(logits - exact).max()
    print(f"MEASURED int8 head vs float64: {error:.2e} of {np.abs(exact).max():.2f}")
    assert error <= 1e-6 * np.abs(exact).max()
    layer = ops.convert_to_numpy(embedding(hidden, reverse=True))
    np.testing.assert_allclose(logits, layer, rtol=0, atol=1e-5 * np.abs(layer).max())


def test_int8_head_applies_to_the_weight_only_head_on_xla():
    embedding = _int8_head()
    assert int8_products.int8_head_applies(embedding) == XLA
    float_embedding = keras.layers.ReversibleEmbedding(40, 24, tie_weights=True)
    float_embedding.build((None,))
    assert not int8_products.int8_head_applies(float_embedding)
    # Int8 activations (Keras' default head) round the input: not this path.
    default = keras.layers.ReversibleEmbedding(40, 24, tie_weights=True)
    default.build((None,))
    default.quantize("int8")
    assert not int8_products.int8_head_applies(default)


def _int8_projection(config=None):
    dense = keras.layers.EinsumDense("btd,dnh->btnh", (None, 3, 8))
    dense.build((None, None, 16))
    rng = np.random.RandomState(3)
    dense.kernel.assign(rng.normal(0, 0.25, (16, 3, 8)))
    dense.quantize("int8", config=config)
    return dense


@pytest.mark.parametrize("batch", [1, 2])
def test_project_of_an_int8_row_equals_the_layer_bit_for_bit(batch):
    dense = _int8_projection()
    x = np.random.RandomState(4).normal(0, 2, (batch, 1, 16)).astype("float32")
    duplicated = projection._int8_duplicated(dense, ops.convert_to_tensor(x))
    assert duplicated == (XLA and batch == 1)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(project(dense, x)), ops.convert_to_numpy(dense(x))
    )


def test_output_projection_rows_count_without_the_contracted_axes():
    """`[B, N, H] x [N, H, D]`: one row when B is 1, whatever N is."""
    dense = keras.layers.EinsumDense("bnh,nhd->bd", (8,))
    dense.build((None, 3, 4))
    dense.quantize("int8")
    x = ops.convert_to_tensor(np.ones((1, 3, 4), "float32"))
    assert projection._int8_duplicated(dense, x) == XLA
    np.testing.assert_array_equal(
        ops.convert_to_numpy(project(dense, x)), ops.convert_to_numpy(dense(x))
    )


def test_weight_only_int8_projection_is_not_duplicated():
    """Float rows times int8 codes: two rows would only double the float work."""
    config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    dense = _int8_projection(config)
    x = ops.convert_to_tensor(np.ones((1, 1, 16), "float32"))
    assert not projection._int8_duplicated(dense, x)


def test_duplicate_row_refuses_more_than_one_row():
    dense = keras.layers.Dense(3)
    with pytest.raises(ValueError, match=r"one row.*\(2, 4\)"):
        int8_products.duplicate_row(dense, np.ones((2, 4), "float32"))
