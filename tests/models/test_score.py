"""`Gemma2CausalLM.score` against KerasHub's `GemmaCausalLM.score` and our forward.

The KerasHub twin is a 2B-style Gemma 2 `GemmaCausalLM` (queries scaled by
`head_dim`, which KerasHub computes exactly); its random weights are copied
into ours by this file's own name mapping (`KERAS_HUB_NAMES`), so no loader
of this package takes part. Losses are also checked against a float64 numpy
cross-entropy of the logits.
"""

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from tests.checkpoints.test_keras_hub_preset import (
    GEMMA2_SETTINGS,
    KERAS_HUB_NAMES,
    as_float32,
    keras_hub_causal_lm,
)

TOLERANCE = 1e-4
BATCH, LENGTH = 2, 9  # longer than the window (5): local layers mask


def ours_from_keras_hub(keras_hub_lm):
    settings = GEMMA2_SETTINGS
    backbone = Gemma2Backbone(
        vocabulary_size=settings["vocabulary_size"],
        num_layers=settings["num_layers"],
        num_query_heads=settings["num_query_heads"],
        num_key_value_heads=settings["num_key_value_heads"],
        hidden_dim=settings["hidden_dim"],
        intermediate_dim=settings["intermediate_dim"] // 2,  # per GeGLU branch
        head_dim=settings["head_dim"],
        query_pre_attn_scalar=settings["head_dim"],
        attention_logit_soft_cap=settings["attention_logit_soft_cap"],
        final_logit_soft_cap=settings["final_logit_soft_cap"],
        sliding_window_size=settings["sliding_window_size"],
        layer_norm_epsilon=keras_hub_lm.backbone.layer_norm_epsilon,
    )
    reference = {v.path: v for v in keras_hub_lm.backbone.weights}
    for variable in backbone.weights:
        path = variable.path
        for our_name, keras_hub_name in KERAS_HUB_NAMES.items():
            path = path.replace(our_name + "/", keras_hub_name + "/")
        value = as_float32(reference[path])
        if path.endswith(("query/kernel", "key/kernel", "value/kernel")):
            value = value.transpose(1, 0, 2)  # [heads, hidden, hd] -> [hidden, ...]
        variable.assign(value)
    return Gemma2CausalLM(backbone)


@pytest.fixture(scope="module")
def models():
    keras_hub_lm = keras_hub_causal_lm(seed=3, **GEMMA2_SETTINGS)
    return ours_from_keras_hub(keras_hub_lm), keras_hub_lm


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    token_ids = rng.randint(0, GEMMA2_SETTINGS["vocabulary_size"], (BATCH, LENGTH))
    token_ids = token_ids.astype("int32")
    padding_mask = np.ones((BATCH, LENGTH), "int32")
    padding_mask[1, 6:] = 0  # right padding
    return token_ids, padding_mask, np.roll(token_ids, -1, axis=1)


def numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), "float64")


def test_logits_and_losses_equal_keras_hub(models, batch):
    ours, keras_hub_lm = models
    token_ids, padding_mask, targets = batch
    real = padding_mask.astype(bool)
    logits = numpy(ours.score(token_ids, padding_mask))
    expected = numpy(keras_hub_lm.score(token_ids, padding_mask))
    assert logits.shape == (BATCH, LENGTH, GEMMA2_SETTINGS["vocabulary_size"])
    difference = np.abs(logits - expected)[real].max()
    print(f"PARITY score logits vs keras_hub: max|d|={difference:.2e}")
    assert difference <= TOLERANCE
    # The final cap bites, so a missing cap would fail.
    assert np.abs(expected).max() > 0.5 * GEMMA2_SETTINGS["final_logit_soft_cap"]

    losses = numpy(
        ours.score(token_ids, padding_mask, scoring_mode="loss", target_ids=targets)
    )
    expected_losses = numpy(
        keras_hub_lm.score(
            token_ids, padding_mask, scoring_mode="loss", target_ids=targets
        )
    )
    assert losses.shape == (BATCH, LENGTH)
    assert np.abs(losses - expected_losses)[real].max() <= TOLERANCE


def test_score_equals_the_forward_pass(models, batch):
    ours, _ = models
    token_ids, padding_mask, targets = batch
    forward = numpy(ours({"token_ids": token_ids, "padding_mask": padding_mask}))
    logits = numpy(ours.score(token_ids, padding_mask))
    np.testing.assert_allclose(logits, forward, atol=1e-5)
    # Default mask: all ones.
    all_ones = numpy(ours({"token_ids": token_ids, "padding_mask": padding_mask**0}))
    np.testing.assert_allclose(numpy(ours.score(token_ids)), all_ones, atol=1e-5)

    # Per-token loss: float64 cross-entropy of the forward logits.
    shifted = forward - forward.max(-1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probabilities, targets[..., None], -1)[..., 0]
    losses = numpy(
        ours.score(token_ids, padding_mask, scoring_mode="loss", target_ids=targets)
    )
    np.testing.assert_allclose(losses, expected, atol=1e-5)


def test_layer_intercept_fn_sees_and_replaces_activations(models, batch):
    ours, keras_hub_lm = models
    token_ids, padding_mask, _ = batch
    num_layers = GEMMA2_SETTINGS["num_layers"]

    def recorder(seen):
        def intercept(x, index):
            seen.append((index, numpy(x)))
            return x

        return intercept

    ours_seen, keras_hub_seen = [], []
    ours.score(token_ids, padding_mask, layer_intercept_fn=recorder(ours_seen))
    keras_hub_lm.score(
        token_ids, padding_mask, layer_intercept_fn=recorder(keras_hub_seen)
    )
    indices = [index for index, _ in ours_seen]
    assert indices == [index for index, _ in keras_hub_seen]
    assert indices == list(range(-1, num_layers))
    for (index, ours_x), (_, keras_hub_x) in zip(
        ours_seen, keras_hub_seen, strict=True
    ):
        assert np.abs(ours_x - keras_hub_x).max() <= TOLERANCE, index

    # Replacing block 0's output changes the logits the same way in both.
    def halve_block_0(x, index):
        return x * 0.5 if index == 0 else x

    changed = numpy(ours.score(token_ids, layer_intercept_fn=halve_block_0))
    expected = numpy(keras_hub_lm.score(token_ids, layer_intercept_fn=halve_block_0))
    assert np.abs(changed - expected).max() <= TOLERANCE
    assert np.abs(changed - numpy(ours.score(token_ids))).max() > 0.1

    # At -1 the returned embeddings are used (KerasHub 0.32 drops them):
    # other tokens' embeddings give the other tokens' logits.
    other_ids = (token_ids + 1) % GEMMA2_SETTINGS["vocabulary_size"]

    def swap_embeddings(x, index):
        return ours.backbone.token_embedding(other_ids) if index == -1 else x

    swapped = numpy(ours.score(token_ids, layer_intercept_fn=swap_embeddings))
    np.testing.assert_allclose(swapped, numpy(ours.score(other_ids)), atol=1e-5)


def test_bad_arguments(models, batch):
    ours, _ = models
    token_ids, padding_mask, targets = batch
    vocabulary_size = GEMMA2_SETTINGS["vocabulary_size"]
    with pytest.raises(ValueError, match="`scoring_mode`.*Received: scoring_mode='x'"):
        ours.score(token_ids, scoring_mode="x")
    with pytest.raises(ValueError, match="needs `target_ids`"):
        ours.score(token_ids, scoring_mode="loss")
    with pytest.raises(ValueError, match="`layer_intercept_fn`"):
        ours.score(token_ids, layer_intercept_fn=3)
    bad = token_ids.copy()
    bad[1, 4] = vocabulary_size
    with pytest.raises(ValueError, match=rf"token_ids\[1, 4\]={vocabulary_size}$"):
        ours.score(bad, padding_mask)
    bad_targets = targets.copy()
    bad_targets[0, 2] = -1
    with pytest.raises(ValueError, match=r"Received: target_ids\[0, 2\]=-1$"):
        ours.score(token_ids, scoring_mode="loss", target_ids=bad_targets)
    with pytest.raises(ValueError, match=r"target_ids.shape=\(2, 8\)"):
        ours.score(token_ids, scoring_mode="loss", target_ids=targets[:, 1:])
    with pytest.raises(ValueError, match=r"padding_mask.shape=\(2, 8\)"):
        ours.score(token_ids, padding_mask[:, 1:])
