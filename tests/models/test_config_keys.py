"""Every config key reaches the code that uses it (the bug class of KerasHub's 27B)."""

import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2RMSNormalization
from tests.conftest import TINY_BACKBONE_CONFIG, random_token_ids, randomize_weights

LENGTH = 13  # longer than the window of 5


def logits_for(config, weights=None, training=False, seed=0):
    causal_lm = Gemma2CausalLM(Gemma2Backbone(**config))
    if weights is None:
        randomize_weights(causal_lm, seed)
    else:
        causal_lm.set_weights(weights)
    token_ids = random_token_ids(2, LENGTH, config["vocabulary_size"])
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    logits = causal_lm(inputs, training=training)
    return _numpy(logits), causal_lm


def _numpy(x):
    from keras import ops

    return ops.convert_to_numpy(x)


# Keys that leave the weight shapes alone: same weights, different output.
SHAPE_NEUTRAL = {
    "query_pre_attn_scalar": 3.0,
    "attention_logit_soft_cap": 1.0,
    "final_logit_soft_cap": 2.0,
    "sliding_window_size": 2,
    "layer_norm_epsilon": 1.0,
    "rope_max_wavelength": 7.0,
}


@pytest.mark.parametrize("key", sorted(SHAPE_NEUTRAL))
def test_setting_modifies_output(key):
    base, causal_lm = logits_for(TINY_BACKBONE_CONFIG)
    changed, _ = logits_for(
        {**TINY_BACKBONE_CONFIG, key: SHAPE_NEUTRAL[key]},
        weights=causal_lm.get_weights(),
    )
    assert np.abs(base - changed).max() > 1e-2, key


@pytest.mark.parametrize("key", ["attention_logit_soft_cap", "final_logit_soft_cap"])
def test_soft_cap_none_modifies_output(key):
    base, causal_lm = logits_for(TINY_BACKBONE_CONFIG)
    changed, _ = logits_for(
        {**TINY_BACKBONE_CONFIG, key: None}, weights=causal_lm.get_weights()
    )
    assert np.abs(base - changed).max() > 1e-2


def test_dropout_modifies_training_output_only():
    config = {**TINY_BACKBONE_CONFIG, "dropout": 0.5}
    inference, causal_lm = logits_for(config)
    weights = causal_lm.get_weights()
    reference, _ = logits_for(TINY_BACKBONE_CONFIG, weights=weights)
    np.testing.assert_allclose(inference, reference, atol=1e-6)
    training, _ = logits_for(config, weights=weights, training=True)
    assert np.abs(training - inference).max() > 1e-2


def test_sliding_window_only_on_even_layers():
    backbone = Gemma2Backbone(**TINY_BACKBONE_CONFIG)
    windows = [
        block.attention.sliding_window_size for block in backbone.transformer_layers
    ]
    assert windows == [5, None, 5, None]


def test_epsilon_reaches_every_norm():
    backbone = Gemma2Backbone(**{**TINY_BACKBONE_CONFIG, "layer_norm_epsilon": 0.25})
    norms = [
        layer
        for layer in backbone._flatten_layers()
        if isinstance(layer, Gemma2RMSNormalization)
    ]
    assert len(norms) == 4 * 4 + 1
    assert {norm.epsilon for norm in norms} == {0.25}


def test_attention_settings_reach_every_block():
    backbone = Gemma2Backbone(**TINY_BACKBONE_CONFIG)
    for block in backbone.transformer_layers:
        attention = block.attention
        assert attention.query_pre_attn_scalar == 12
        assert attention.attention_logit_soft_cap == 4.0
        assert attention.rope_max_wavelength == 500.0


# Keys that set weight shapes: each shows up in the shape of the layer using it.
def test_structural_keys_shape_the_weights():
    config = {
        **TINY_BACKBONE_CONFIG,
        "vocabulary_size": 50,
        "num_layers": 3,
        "num_query_heads": 6,
        "num_key_value_heads": 3,
        "hidden_dim": 40,
        "intermediate_dim": 56,
        "head_dim": 10,
    }
    causal_lm = Gemma2CausalLM(Gemma2Backbone(**config))
    backbone = causal_lm.backbone
    assert tuple(backbone.token_embedding.embeddings.shape) == (50, 40)
    assert len(backbone.transformer_layers) == 3
    block = backbone.transformer_layers[0]
    assert tuple(block.attention.query_dense.kernel.shape) == (40, 6, 10)
    assert tuple(block.attention.key_dense.kernel.shape) == (40, 3, 10)
    assert tuple(block.attention.output_dense.kernel.shape) == (6, 10, 40)
    assert tuple(block.ffw.gate_dense.kernel.shape) == (40, 56)
    assert tuple(block.ffw.down_dense.kernel.shape) == (56, 40)
    token_ids = np.zeros((1, 4), "int32")
    logits = causal_lm.predict(
        {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}, verbose=0
    )
    assert logits.shape == (1, 4, 50)


def test_attention_implementation_reaches_every_block():
    backbone = Gemma2Backbone(
        **{**TINY_BACKBONE_CONFIG, "attention_implementation": "reference"}
    )
    assert backbone.get_config()["attention_implementation"] == "reference"
    assert [
        block.attention.attention_implementation
        for block in backbone.transformer_layers
    ] == ["reference"] * 4
    with pytest.raises(ValueError, match="attention_implementation"):
        Gemma2Backbone(**{**TINY_BACKBONE_CONFIG, "attention_implementation": "x"})


@pytest.mark.parametrize("implementation", ["auto", "blocked"])
def test_attention_implementation_keeps_the_logits(implementation):
    # 40 tokens: several windows of 5, so "auto" runs the blocked kernel on
    # the local layers; padding holes make some rows see no key at all.
    causal_lm = Gemma2CausalLM(
        Gemma2Backbone(
            **{**TINY_BACKBONE_CONFIG, "attention_implementation": "reference"}
        )
    )
    randomize_weights(causal_lm, 3)
    other = Gemma2CausalLM(
        Gemma2Backbone(
            **{**TINY_BACKBONE_CONFIG, "attention_implementation": implementation}
        )
    )
    other.set_weights(causal_lm.get_weights())
    token_ids = random_token_ids(2, 40, TINY_BACKBONE_CONFIG["vocabulary_size"])
    padding_mask = np.ones_like(token_ids)
    padding_mask[0, :9] = 0
    padding_mask[1, 20:27] = 0
    # A second length makes TensorFlow's predict retrace with an unknown
    # length, where the kernel is chosen at run time.
    for length in (40, 36):
        inputs = {
            "token_ids": token_ids[:, :length],
            "padding_mask": padding_mask[:, :length],
        }
        expected = causal_lm.predict(inputs, verbose=0)
        actual = other.predict(inputs, verbose=0)
        np.testing.assert_allclose(actual, expected, atol=1e-4)
