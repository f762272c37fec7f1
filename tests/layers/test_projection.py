"""`project`: the same result as calling the `EinsumDense` layer, on every backend."""

import keras
import numpy as np
import pytest

from keras_gemma2.layers import projection
from keras_gemma2.layers.projection import project

BACKEND = keras.config.backend()

# The model's projections: (equation, output_shape, input shape of one row).
EQUATIONS = {
    "query": ("btd,dnh->btnh", (None, 4, 3), (1, 1, 8)),
    "key_value": ("bsd,dkh->bskh", (None, 2, 3), (1, 1, 8)),
    "attention_output": ("btah,ahd->btd", (None, 8), (1, 1, 4, 3)),
    "feed_forward": ("btd,df->btf", (None, 16), (1, 1, 8)),
}


def dense_for(name, dtype=None, seed=0):
    equation, output_shape, shape = EQUATIONS[name]
    layer = keras.layers.EinsumDense(
        equation,
        output_shape,
        kernel_initializer=keras.initializers.RandomNormal(seed=seed),
        dtype=dtype,
    )
    layer.build(shape)
    return layer, shape


@pytest.mark.parametrize("name", sorted(EQUATIONS))
@pytest.mark.parametrize("rows", [(1, 1), (3, 1), (1, 5)])
def test_project_equals_the_layer(name, rows):
    layer, shape = dense_for(name)
    x = np.random.RandomState(1).normal(size=rows + shape[2:]).astype("float32")
    got = keras.ops.convert_to_numpy(project(layer, x))
    want = keras.ops.convert_to_numpy(layer(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_project_keeps_lora_and_the_compute_dtype():
    layer, shape = dense_for("query", dtype="mixed_bfloat16")
    layer.enable_lora(2, b_initializer="ones")
    x = np.random.RandomState(2).normal(size=shape).astype("float32")
    got = project(layer, x)
    want = layer(x)
    assert keras.backend.standardize_dtype(got.dtype) == "bfloat16"
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(got, "float32")),
        keras.ops.convert_to_numpy(keras.ops.cast(want, "float32")),
        rtol=1e-2,
        atol=1e-2,
    )
    # Against numpy: kernel plus the LoRA product.
    kernel = keras.ops.convert_to_numpy(layer._kernel) + (
        layer.lora_alpha / layer.lora_rank
    ) * (
        keras.ops.convert_to_numpy(layer.lora_kernel_a)
        @ keras.ops.convert_to_numpy(layer.lora_kernel_b)
    )
    expected = np.einsum("btd,dnh->btnh", x, kernel)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(got, "float32")),
        expected,
        rtol=2e-2,
        atol=5e-2,
    )


def test_only_one_row_on_tensorflow_takes_the_two_row_path():
    layer, shape = dense_for("attention_output")
    one_row = keras.ops.zeros(shape)
    expected = 2 if BACKEND == "tensorflow" else None
    assert projection._single_row_axes(layer, one_row) == expected
    assert projection._single_row_axes(layer, keras.ops.zeros((2,) + shape[1:])) is None
    symbolic = keras.KerasTensor((None, None) + shape[2:])
    assert projection._single_row_axes(layer, symbolic) is None


def test_only_stored_float32_matrices_take_one_row():
    """What XLA would fuse into a one-row product keeps the two-row path."""
    matrix, _ = dense_for("feed_forward")
    assert not projection._duplicates_one_row(matrix)
    for name in ("query", "key_value", "attention_output"):  # 3-D: reshaped
        assert projection._duplicates_one_row(dense_for(name)[0])
    mixed, _ = dense_for("feed_forward", dtype="mixed_bfloat16")  # cast
    assert projection._duplicates_one_row(mixed)
    lora, _ = dense_for("feed_forward")
    lora.enable_lora(2)  # kernel plus the LoRA product
    assert projection._duplicates_one_row(lora)


def test_layers_it_cannot_reproduce_are_called():
    with_bias = keras.layers.EinsumDense("btd,df->btf", (None, 4), bias_axes="f")
    with_bias.build((1, 1, 8))
    activated = keras.layers.EinsumDense("btd,df->btf", (None, 4), activation="relu")
    activated.build((1, 1, 8))
    quantized, _ = dense_for("feed_forward")
    quantized.quantize("int8")
    x = keras.ops.zeros((1, 1, 8))
    for layer in (with_bias, activated, quantized):
        assert projection._single_row_axes(layer, x) is None
    assert projection._single_row_axes(keras.layers.Dense(4), x) is None


@pytest.mark.parametrize(
    "equation, expected",
    [
        ("btd,dnh->btnh", 1),
        ("btah,ahd->btd", 2),
        ("btd,df->btf", 1),
        ("btd,fd->btf", None),  # contracts the kernel's last axis
        ("abd,dn->abn", 1),
        ("btd,dn->bn", None),  # reduces an input axis
        ("ab,bc", None),  # no output
    ],
)
def test_contracted_axes(equation, expected):
    assert projection._contracted_axes(equation) == expected
