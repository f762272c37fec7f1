"""The chunked training loss of `Gemma2CausalLM` (`models/causal_lm_training`).

Inside `fit`/`evaluate` the model returns hidden states and the loss computes
logits chunk by chunk. These tests hold it to a float64 numpy cross-entropy of
the full logits, and to Keras' own loss on the full logits (the plain path).
"""

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.models import causal_lm_training
from tests.conftest import TINY_BACKBONE_CONFIG

VOCABULARY = TINY_BACKBONE_CONFIG["vocabulary_size"]
CHUNKS = 2 if keras.config.backend() == "tensorflow" else 4


@pytest.fixture
def three_token_chunks(monkeypatch):
    """Chunks of 3 tokens per row at batch 2 (12 tokens: 4 chunks).

    TensorFlow traces `fit` with an unknown batch size; chunks are then sized
    for one row: 6 tokens, 2 chunks.
    """
    monkeypatch.setattr(causal_lm_training, "LOSS_CHUNK_BYTES", 2 * 3 * VOCABULARY * 4)


def _causal_lm():
    keras.utils.set_random_seed(5)
    return Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))


def _data(length=12):
    rng = np.random.default_rng(1)
    token_ids = rng.integers(3, VOCABULARY, (2, length)).astype("int32")
    padding_mask = np.ones((2, length), "int32")
    padding_mask[1, length - 5 :] = 0
    labels = rng.integers(0, VOCABULARY, (2, length)).astype("int32")
    # Response-only weights on row 0, padding on row 1.
    weights = padding_mask.astype("float32")
    weights[0, :4] = 0.0
    return {"token_ids": token_ids, "padding_mask": padding_mask}, labels, weights


def _numpy_token_losses(causal_lm, inputs, labels):
    """Float64 cross-entropy of the full logits of a plain call, `[B, T]`."""
    logits = keras.ops.convert_to_numpy(causal_lm(inputs)).astype("float64")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


class _ChunkCounter:
    """Counts how `token_cross_entropy` cut its input (proves the path ran)."""

    def __init__(self, monkeypatch):
        self.chunks = []
        original = Gemma2CausalLM._loss_chunks

        def counting(model, hidden_states):
            pieces = original(model, hidden_states)
            self.chunks.append(len(pieces))
            return pieces

        monkeypatch.setattr(Gemma2CausalLM, "_loss_chunks", counting)


@pytest.mark.parametrize(
    "reduction, divisor",
    [("sum_over_batch_size", "positions"), ("mean_with_sample_weight", "weights")],
)
def test_evaluate_loss_equals_float64_numpy(
    monkeypatch, three_token_chunks, reduction, divisor
):
    counter = _ChunkCounter(monkeypatch)
    causal_lm = _causal_lm()
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=reduction
    )
    causal_lm.compile(loss=loss, weighted_metrics=[])
    inputs, labels, weights = _data()
    result = causal_lm.evaluate(
        inputs, labels, sample_weight=weights, batch_size=2, verbose=0
    )
    assert max(counter.chunks) == CHUNKS  # 12 tokens in chunks of 3 (or 6)

    token_losses = _numpy_token_losses(causal_lm, inputs, labels)
    total = (token_losses * weights).sum()
    expected = total / (weights.size if divisor == "positions" else weights.sum())
    np.testing.assert_allclose(result, expected, rtol=2e-6)


def test_fit_step_equals_the_unchunked_loss(monkeypatch, three_token_chunks):
    """Loss, accuracy and updated weights of two SGD steps, chunked vs plain."""
    counter = _ChunkCounter(monkeypatch)
    inputs, labels, weights = _data()
    histories, weights_after = [], []
    for chunked in (True, False):
        causal_lm = _causal_lm()
        causal_lm.compile(optimizer=keras.optimizers.SGD(0.5))
        if not chunked:
            causal_lm._chunkable_loss = lambda: None  # Keras' own loss, full logits
        history = causal_lm.fit(
            inputs,
            labels,
            sample_weight=weights,
            batch_size=2,
            epochs=2,
            shuffle=False,
            verbose=0,
        )
        histories.append(history.history)
        weights_after.append(causal_lm.get_weights())
        if chunked:
            assert max(counter.chunks) == CHUNKS
            counter.chunks.clear()
    assert not counter.chunks  # the plain run never chunked

    chunked, plain = histories
    assert set(chunked) == set(plain) == {"loss", "sparse_categorical_accuracy"}
    np.testing.assert_allclose(chunked["loss"], plain["loss"], rtol=1e-5)
    assert plain["loss"][1] < plain["loss"][0]  # the step did something
    np.testing.assert_allclose(
        chunked["sparse_categorical_accuracy"],
        plain["sparse_categorical_accuracy"],
        atol=1e-7,
    )
    for after_chunked, after_plain in zip(*weights_after, strict=True):
        np.testing.assert_allclose(after_chunked, after_plain, rtol=0, atol=2e-6)


def test_calling_the_model_still_returns_logits(three_token_chunks):
    causal_lm = _causal_lm()
    causal_lm.compile()
    inputs, labels, _ = _data()
    assert tuple(causal_lm(inputs, training=True).shape) == (2, 12, VOCABULARY)
    assert causal_lm.predict(inputs, batch_size=2, verbose=0).shape == (
        2,
        12,
        VOCABULARY,
    )


@pytest.mark.parametrize(
    "compile_kwargs",
    [
        {
            "loss": keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=0
            )
        },
        {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=False)},
        {"loss": "sparse_categorical_crossentropy"},
        {
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "loss_weights": [0.5],
        },
    ],
    ids=["ignore_class", "probabilities", "string", "loss_weights"],
)
def test_losses_the_chunks_cannot_reproduce_get_full_logits(compile_kwargs):
    causal_lm = _causal_lm()
    causal_lm.compile(**compile_kwargs)
    assert causal_lm._chunkable_loss() is None


def test_a_custom_loss_sees_logits_in_fit():
    """Any other loss gets `[B, T, vocabulary]` logits, as before."""
    shapes = []

    def mean_logit(y_true, y_pred):
        shapes.append(tuple(y_pred.shape))
        return keras.ops.mean(y_pred, axis=-1)

    causal_lm = _causal_lm()
    causal_lm.compile(optimizer="sgd", loss=mean_logit, weighted_metrics=[])
    inputs, labels, weights = _data()
    causal_lm.fit(inputs, labels, batch_size=2, epochs=1, verbose=0)
    assert shapes and all(shape[-1] == VOCABULARY for shape in shapes)


def test_token_cross_entropy_matches_numpy_per_token(three_token_chunks):
    causal_lm = _causal_lm()
    inputs, labels, _ = _data()
    hidden_states = causal_lm.backbone(inputs)
    chunked = keras.ops.convert_to_numpy(
        causal_lm.token_cross_entropy(hidden_states, labels)
    )
    assert chunked.shape == (2, 12) and chunked.dtype == np.float32
    np.testing.assert_allclose(
        chunked, _numpy_token_losses(causal_lm, inputs, labels), rtol=2e-6, atol=2e-6
    )


def test_loss_chunk_length_keeps_chunks_within_the_budget():
    for batch, vocabulary in [(1, 32000), (4, 256000), (8, 96), (3, 7)]:
        tokens = causal_lm_training.loss_chunk_length(batch, vocabulary)
        assert tokens * batch * vocabulary * 4 <= causal_lm_training.LOSS_CHUNK_BYTES
        assert (
            tokens + 1
        ) * batch * vocabulary * 4 > causal_lm_training.LOSS_CHUNK_BYTES
