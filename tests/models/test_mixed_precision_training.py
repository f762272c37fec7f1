"""`fit` under `dtype="mixed_bfloat16"`: float32 variables, bfloat16 compute.

Tolerance: the forward runs in bfloat16 (8 significant bits) over 4 blocks
with soft caps small enough to bite; `test_bfloat16.py` bounds the logits'
error at 0.1 std of the logits. The mean cross-entropy averages that error
over every position, so we bound each step's loss at 2% of the float32 loss
(measured: under 0.5% on every backend). A layer computing in the wrong
dtype, a float16 cast or float32 updates lost to bfloat16 rounding break it.
"""

import keras
import numpy as np

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from tests.conftest import TINY_BACKBONE_CONFIG, random_token_ids, randomize_weights

STEPS = 3


def _fit_losses(causal_lm, token_ids):
    causal_lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    inputs = {
        "token_ids": np.repeat(token_ids[:, :-1], STEPS, axis=0),
        "padding_mask": np.ones((2 * STEPS, token_ids.shape[1] - 1), "int32"),
    }
    labels = np.repeat(token_ids[:, 1:], STEPS, axis=0)
    losses = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    causal_lm.fit(
        inputs,
        labels,
        batch_size=2,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
    )
    return np.array(losses)


def test_mixed_bfloat16_fit_matches_float32():
    float32_lm = randomize_weights(
        Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    )
    mixed_lm = Gemma2CausalLM(
        Gemma2Backbone(**TINY_BACKBONE_CONFIG, dtype="mixed_bfloat16")
    )
    mixed_lm.set_weights(float32_lm.get_weights())
    block = mixed_lm.backbone.transformer_layers[0]
    assert block.compute_dtype == "bfloat16"
    assert {v.dtype for v in mixed_lm.weights} == {"float32"}
    before = [np.array(w) for w in mixed_lm.get_weights()]

    token_ids = random_token_ids(2, 17, TINY_BACKBONE_CONFIG["vocabulary_size"], seed=5)
    float32_losses = _fit_losses(float32_lm, token_ids)
    mixed_losses = _fit_losses(mixed_lm, token_ids)
    print("float32", float32_losses, "mixed_bfloat16", mixed_losses)

    assert np.all(np.isfinite(mixed_losses))
    np.testing.assert_allclose(mixed_losses, float32_losses, rtol=0.02)
    # Training did something: the loss fell, the float32 weights moved.
    assert mixed_losses[-1] < mixed_losses[0] - 0.05
    assert {v.dtype for v in mixed_lm.weights} == {"float32"}
    moved = [
        np.abs(np.array(w) - b).max() > 0
        for w, b in zip(mixed_lm.get_weights(), before, strict=True)
    ]
    assert all(moved)
