"""`keras-gemma2 convert --to keras_hub` writes a KerasHub `GemmaCausalLM` preset.

Reference: KerasHub's own `GemmaCausalLM.from_preset` on the written preset,
its logits and token ids against ours. Configurations KerasHub cannot compute
exactly (the 27B's query scaling, another RoPE wavelength or epsilon) are
refused before anything is written.
"""

import os

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_gemma2 import (
    Gemma2Backbone,
    Gemma2CausalLM,
    Gemma2CausalLMPreprocessor,
    Gemma2Tokenizer,
)
from keras_gemma2.checkpoints.keras_hub_export import (
    export_to_keras_hub,
    keras_hub_backbone_arguments,
)
from keras_gemma2.cli import main
from tests.conftest import random_token_ids, randomize_weights

TEXT = "def add(a, b):\n    return a + b"
TOLERANCE = 1e-5
# KerasHub-computable: query_pre_attn_scalar == head_dim, theta 10000,
# epsilon 1e-6; window (5) shorter than the sequence (11), GQA, biting caps.
SETTINGS = {
    "num_layers": 3,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 32,
    "intermediate_dim": 40,
    "head_dim": 8,
    "query_pre_attn_scalar": 8,
    "attention_logit_soft_cap": 4.0,
    "final_logit_soft_cap": 6.0,
    "sliding_window_size": 5,
}


def make_causal_lm(vocabulary, **overrides):
    tokenizer = Gemma2Tokenizer(proto=vocabulary)
    backbone = Gemma2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), **{**SETTINGS, **overrides}
    )
    randomize_weights(backbone, seed=5)
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=20)
    return Gemma2CausalLM(backbone, preprocessor)


def logits(model, token_ids):
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return np.asarray(ops.convert_to_numpy(model(inputs)), dtype="float32")


def test_convert_to_keras_hub_matches_keras_hub(gemma_vocabulary, tmp_path):
    ours = make_causal_lm(gemma_vocabulary)
    source, destination = str(tmp_path / "ours"), str(tmp_path / "keras_hub")
    ours.save_to_preset(source)
    argv = ["convert", source, destination, "--to", "keras_hub", "--dtype", "float32"]
    assert main(argv) == 0

    reference = keras_hub.models.GemmaCausalLM.from_preset(destination)
    assert isinstance(reference.backbone, keras_hub.models.GemmaBackbone)
    token_ids = random_token_ids(2, 11, ours.backbone.vocabulary_size, seed=2)
    expected = logits(reference, token_ids)
    difference = float(np.abs(logits(ours, token_ids) - expected).max())
    print(f"PARITY convert --to keras_hub: max|dlogit|={difference:.2e}")
    assert difference <= TOLERANCE
    # The caps bite: logits reach well into the final cap.
    assert np.abs(expected).max() > 0.5 * SETTINGS["final_logit_soft_cap"]

    assert reference.preprocessor.sequence_length == 20
    np.testing.assert_array_equal(
        ops.convert_to_numpy(reference.preprocessor.tokenizer(TEXT)),
        ops.convert_to_numpy(ours.preprocessor.tokenizer(TEXT)),
    )
    # And back: the KerasHub preset loads into ours with the same logits.
    again = Gemma2CausalLM.from_preset(destination)
    np.testing.assert_allclose(logits(again, token_ids), expected, atol=TOLERANCE)
    keras.backend.clear_session()


def test_bfloat16_export_holds_the_rounded_weights(gemma_vocabulary, tmp_path):
    ours = make_causal_lm(gemma_vocabulary)
    destination = str(tmp_path / "bf16")
    export_to_keras_hub(ours, destination, dtype="bfloat16")
    with open(os.path.join(destination, "config.json")) as file:
        assert '"name": "bfloat16"' in file.read()
    # KerasHub loads into the default float32, holding bfloat16's values.
    reference = keras_hub.models.GemmaBackbone.from_preset(destination)
    embedding = ops.convert_to_numpy(
        ops.cast(reference.token_embedding.embeddings, "float32")
    )
    ours_embedding = ops.convert_to_numpy(
        ops.cast(
            ops.cast(ours.backbone.token_embedding.embeddings, "bfloat16"), "float32"
        )
    )
    np.testing.assert_array_equal(embedding, ours_embedding)


def test_27b_style_scaling_is_refused_before_writing(
    gemma_vocabulary, tmp_path, capsys
):
    # hidden_dim / num_query_heads = 8 != head_dim 4: the 27B's kind.
    ours = make_causal_lm(gemma_vocabulary, head_dim=4, query_pre_attn_scalar=8)
    source, destination = str(tmp_path / "ours"), str(tmp_path / "keras_hub")
    ours.save_to_preset(source)
    argv = ["convert", source, destination, "--to", "keras_hub"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "query_pre_attn_scalar=8 (27B-style scaling" in err
    assert "head_dim=4" in err and "query_head_dim_normalize=True" in err
    assert not os.path.exists(destination)
    with pytest.raises(ValueError, match="27B-style"):
        export_to_keras_hub(ours, destination)
    assert not os.path.exists(destination)


def test_hf_checkpoint_is_checked_before_loading(hf_checkpoint, tmp_path, capsys):
    directory, _ = hf_checkpoint()  # query_pre_attn_scalar 12, head_dim 16
    destination = str(tmp_path / "keras_hub")
    assert main(["convert", directory, destination, "--to", "keras_hub"]) == 2
    err = capsys.readouterr().err
    assert "query_pre_attn_scalar=12 differs from head_dim=16" in err
    assert "Loading" not in err and not os.path.exists(destination)


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("rope_max_wavelength", 500.0, "rope_max_wavelength=500.*hard-codes 10000"),
        ("layer_norm_epsilon", 1e-5, "layer_norm_epsilon=1e-05.*always use 1e-06"),
    ],
)
def test_settings_keras_hub_hard_codes_are_refused(setting, value, message):
    config = {**SETTINGS, "vocabulary_size": 8, setting: value}
    with pytest.raises(ValueError, match=message):
        keras_hub_backbone_arguments(config)
    assert (
        keras_hub_backbone_arguments({**SETTINGS, "vocabulary_size": 8})[
            "intermediate_dim"
        ]
        == 2 * SETTINGS["intermediate_dim"]
    )
