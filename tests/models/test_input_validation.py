"""Bad token ids and masks: the same `ValueError` on every backend, before compute.

Issue 15's table: an id >= vocabulary size, an id of -1, and a `padding_mask`
of another shape gave NaN logits (JAX), raw backend errors (TensorFlow,
PyTorch) or silently finite logits (-1 everywhere). Each entry point is
checked here with the exact message, naming the id, its position and the
vocabulary size.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.layers.validation import host_values

VOCABULARY_SIZE = 64
ROWS, LENGTH = 5, 6


@pytest.fixture(scope="module")
def causal_lm():
    backbone = Gemma2Backbone(
        vocabulary_size=VOCABULARY_SIZE, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8,
        sliding_window_size=4,
    )  # fmt: skip
    causal_lm = Gemma2CausalLM(backbone)
    causal_lm.compile(optimizer="sgd", sampler="greedy")
    return causal_lm


def token_dict(bad_value=None, position=(4, 2)):
    """`[ROWS, LENGTH]` valid ids (prompts of 3 tokens), one replaced."""
    token_ids = np.arange(ROWS * LENGTH, dtype="int32").reshape(ROWS, LENGTH) % 50
    padding_mask = np.zeros((ROWS, LENGTH), "int32")
    padding_mask[:, :3] = 1
    if bad_value is not None:
        token_ids[position] = bad_value
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def message(name, position, value):
    row, column = position
    return (
        rf"Received an invalid value for `{name}`, expected ids in \[0, 64\) "
        rf"\(the vocabulary size is 64; {value} is outside the vocabulary\)\. "
        rf"Received: {name}\[{row}, {column}\]={value}$"
    )


def labels(x):
    return np.roll(x["token_ids"], -1, axis=1)


ENTRY_POINTS = {
    "call_numpy": lambda lm, x: lm(x),
    "call_tensor": lambda lm, x: lm(
        {key: keras.ops.convert_to_tensor(value) for key, value in x.items()}
    ),
    "predict": lambda lm, x: lm.predict(x, batch_size=2, verbose=0),
    "predict_on_batch": lambda lm, x: lm.predict_on_batch(x),
    "fit": lambda lm, x: lm.fit(x, labels(x), batch_size=2, verbose=0),
    "evaluate": lambda lm, x: lm.evaluate(x, labels(x), batch_size=2, verbose=0),
    "train_on_batch": lambda lm, x: lm.train_on_batch(x, labels(x)),
    "score": lambda lm, x: lm.score(x["token_ids"], x["padding_mask"]),
    "generate": lambda lm, x: lm.generate(x, stop_token_ids=None),
    "backbone_numpy": lambda lm, x: lm.backbone(x),
    "backbone_tensor": lambda lm, x: lm.backbone(
        {key: keras.ops.convert_to_tensor(value) for key, value in x.items()}
    ),
}


@pytest.mark.parametrize("bad_value", [VOCABULARY_SIZE, 1000, -1])
@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_out_of_range_ids_name_id_position_and_vocabulary(
    causal_lm, entry_point, bad_value
):
    x = token_dict(bad_value, position=(4, 2))
    with pytest.raises(ValueError, match=message("token_ids", (4, 2), bad_value)):
        ENTRY_POINTS[entry_point](causal_lm, x)


def test_refused_fit_changes_nothing(causal_lm):
    before = [keras.ops.convert_to_numpy(v).copy() for v in causal_lm.weights]
    iterations = int(keras.ops.convert_to_numpy(causal_lm.optimizer.iterations))
    x = token_dict(VOCABULARY_SIZE, position=(4, 0))  # the last batch
    with pytest.raises(ValueError, match=message("token_ids", (4, 0), 64)):
        causal_lm.fit(x, labels(x), batch_size=2, verbose=0)
    y = labels(token_dict())
    y[3, 5] = -1
    with pytest.raises(ValueError, match=message("y", (3, 5), -1)):
        causal_lm.fit(token_dict(), y, batch_size=2, verbose=0)
    with pytest.raises(ValueError, match=message("token_ids", (1, 1), 99)):
        causal_lm.fit(
            token_dict(),
            labels(token_dict()),
            validation_data=(token_dict(99, (1, 1)), labels(token_dict())),
            verbose=0,
        )
    after = [keras.ops.convert_to_numpy(v) for v in causal_lm.weights]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)
    assert int(keras.ops.convert_to_numpy(causal_lm.optimizer.iterations)) == (
        iterations
    )


def test_dataset_batches_are_checked_as_they_pass(causal_lm):
    # Positions are within the batch: row 4 is row 0 of the third batch.
    x = token_dict(VOCABULARY_SIZE, position=(4, 1))
    dataset = tf.data.Dataset.from_tensor_slices((x, labels(x))).batch(2)
    with pytest.raises(ValueError, match=message("token_ids", (0, 1), 64)):
        causal_lm.fit(dataset, verbose=0)
    with pytest.raises(ValueError, match=message("token_ids", (0, 1), 64)):
        causal_lm.predict(dataset.map(lambda x, y: x), verbose=0)
    y = labels(token_dict())
    y[1, 3] = -1
    dataset = tf.data.Dataset.from_tensor_slices((token_dict(), y)).batch(2)
    with pytest.raises(ValueError, match=message("y", (1, 3), -1)):
        causal_lm.evaluate(dataset, verbose=0)
    first_bad = token_dict(-1, position=(0, 0))
    dataset = tf.data.Dataset.from_tensor_slices((first_bad, labels(x))).batch(2)
    with pytest.raises(ValueError, match=message("token_ids", (0, 0), -1)):
        causal_lm.fit(dataset, verbose=0)
    # The model is intact after the refusals (on JAX, Keras detaches the
    # variables while it loops).
    valid = token_dict()
    np.testing.assert_allclose(
        causal_lm.predict(valid, verbose=0),
        keras.ops.convert_to_numpy(causal_lm(valid)),
        atol=1e-5,
    )


BAD_SHAPES = {
    "mask_longer": (
        {"padding_mask": np.ones((ROWS, LENGTH + 1), "int32")},
        r"`padding_mask`, expected the shape of `token_ids`, \(5, 6\)\. "
        r"Received: padding_mask.shape=\(5, 7\)",
    ),
    "mask_rank_1": (
        {"padding_mask": np.ones((LENGTH,), "int32")},
        r"Received: padding_mask.shape=\(6,\)",
    ),
    "rank_1": (
        {"token_ids": np.arange(LENGTH), "padding_mask": np.ones(LENGTH, "int32")},
        r"`token_ids`, expected a rank-2 \[batch, sequence_length\] tensor\. "
        r"Received: token_ids.shape=\(6,\)",
    ),
    "rank_3": (
        {
            "token_ids": np.zeros((1, ROWS, LENGTH), "int32"),
            "padding_mask": np.ones((1, ROWS, LENGTH), "int32"),
        },
        r"Received: token_ids.shape=\(1, 5, 6\)",
    ),
    "float_ids": (
        {"token_ids": np.ones((ROWS, LENGTH), "float32")},
        r"`token_ids`, expected an integer dtype\. Received: token_ids.dtype=float32",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
@pytest.mark.parametrize(
    "entry_point",
    ["call_numpy", "call_tensor", "predict", "fit", "score", "generate"]
    + ["backbone_numpy", "backbone_tensor"],
)
def test_bad_shapes_and_dtypes(causal_lm, entry_point, case):
    change, expected = BAD_SHAPES[case]
    x = {**token_dict(), **change}
    if entry_point == "fit":
        run = lambda: causal_lm.fit(x, np.zeros((ROWS, LENGTH), "int32"), verbose=0)  # noqa: E731
    else:
        run = lambda: ENTRY_POINTS[entry_point](causal_lm, x)  # noqa: E731
    with pytest.raises(ValueError, match=expected):
        run()


def test_symbolic_inputs_get_shape_checks_only(causal_lm):
    token_ids = keras.Input(shape=(7,), dtype="int32")
    # Values unknown: a functional model builds.
    outputs = causal_lm({"token_ids": token_ids, "padding_mask": token_ids})
    assert tuple(outputs.shape) == (None, 7, VOCABULARY_SIZE)
    # Static shapes known: a mismatch is refused while building.
    with pytest.raises(ValueError, match=r"padding_mask.shape=\(None, 8\)"):
        causal_lm(
            {
                "token_ids": token_ids,
                "padding_mask": keras.Input(shape=(8,), dtype="int32"),
            }
        )
    with pytest.raises(ValueError, match="integer dtype"):
        causal_lm({"token_ids": keras.Input(shape=(7,)), "padding_mask": token_ids})


def test_host_values_per_backend():
    # Concrete values of every kind have host values; traced ones do not.
    ids = np.array([[1, 2]], "int32")
    for value in (
        ids,
        ids.tolist(),
        keras.ops.convert_to_tensor(ids),
        tf.constant(ids),
    ):
        np.testing.assert_array_equal(host_values(value), ids)
    assert host_values(keras.KerasTensor((1, 2), "int32")) is None
    seen = []
    tf.function(lambda x: seen.append(host_values(x)) or x)(tf.constant(ids))
    assert seen == [None]
    if keras.config.backend() == "jax":
        import jax

        jax.jit(lambda x: seen.append(host_values(x)) or x)(ids)
        assert seen == [None, None]
