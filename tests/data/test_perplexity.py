"""held_out_perplexity against hand-computed values and a float64 numpy reference."""

import math

import keras
import numpy as np
import pytest

from keras_gemma2.data import held_out_perplexity
from keras_gemma2.models import (
    Gemma2Backbone,
    Gemma2CausalLM,
    Gemma2CausalLMPreprocessor,
    Gemma2Tokenizer,
)
from tests.conftest import TINY_BACKBONE_CONFIG, randomize_weights


class FixedLogits:
    """Returns the same logits for every position; records its batches."""

    def __init__(self, logits):
        self.logits = np.asarray(logits, "float32")  # [V]
        self.preprocessor = "a preprocessor"
        self.batches = []

    def predict_on_batch(self, inputs):
        # Token ids go past the preprocessor (`keras.Model.predict_on_batch`),
        # which stays attached.
        assert self.preprocessor == "a preprocessor"
        self.batches.append(inputs["token_ids"].tolist())
        batch, length = inputs["token_ids"].shape
        return np.broadcast_to(self.logits, (batch, length, len(self.logits)))


@pytest.fixture(autouse=True)
def recording_predict(monkeypatch):
    """`keras.Model.predict_on_batch(model, x)` on `FixedLogits` calls it."""
    original = keras.Model.predict_on_batch

    def predict_on_batch(model, *args, **kwargs):
        if isinstance(model, FixedLogits):
            return model.predict_on_batch(*args, **kwargs)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "predict_on_batch", predict_on_batch)


def test_fixed_distribution_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; labels 1, 0, 1, 1, 0, 0.
    model = FixedLogits([0.0, math.log(3.0)])
    windows = np.array([[0, 1, 0], [1, 1, 1], [1, 0, 0]])
    perplexity = held_out_perplexity(model, windows, batch_size=2)
    expected = math.exp(-(3 * math.log(3 / 4) + 3 * math.log(1 / 4)) / 6)
    assert perplexity == pytest.approx(expected, rel=1e-6)
    # Batches of 2, the last one short.
    assert model.batches == [[[0, 1], [1, 1]], [[1, 0]]]
    assert model.preprocessor == "a preprocessor"


def test_uniform_logits_give_the_vocabulary_size():
    model = FixedLogits(np.full([7], 3.5))
    windows = np.arange(15).reshape(3, 5) % 7
    assert held_out_perplexity(model, windows) == pytest.approx(7.0, rel=1e-6)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
        held_out_perplexity(FixedLogits([0.0]), np.array([[0, 0]]), batch_size)


def float64_perplexity(logits, labels):
    """exp(mean -log p(label)), log-softmax by `np.logaddexp.reduce` in float64."""
    logits = np.asarray(logits, "float64")
    log_normalizer = np.logaddexp.reduce(logits, axis=-1)  # [B, T]
    label_logits = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    return math.exp(np.mean(log_normalizer - label_logits))


def test_gemma2_causal_lm_against_float64_numpy(gemma_vocabulary):
    tokenizer = Gemma2Tokenizer(proto=gemma_vocabulary)
    backbone = Gemma2Backbone(
        **{**TINY_BACKBONE_CONFIG, "vocabulary_size": tokenizer.vocabulary_size()}
    )
    randomize_weights(backbone, seed=0)
    causal_lm = Gemma2CausalLM(backbone)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, tokenizer.vocabulary_size(), (4, 9)).astype("int32")
    logits = causal_lm.predict_on_batch(
        {"token_ids": windows[:, :-1], "padding_mask": np.ones_like(windows[:, :-1])}
    )
    expected = float64_perplexity(logits, windows[:, 1:])
    # With a text preprocessor attached, as a preset loads.
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=8)
    causal_lm.preprocessor = preprocessor
    perplexity = held_out_perplexity(causal_lm, windows, batch_size=4)
    assert perplexity == pytest.approx(expected, rel=1e-6)
    assert causal_lm.preprocessor is preprocessor
