"""KerasHub/Kaggle Gemma 2 presets load into Gemma2Backbone with equal logits.

References: KerasHub's own `GemmaCausalLM` on the saved preset (2B/9B-style
query scaling) and HF `Gemma2ForCausalLM` (eager) for the 27B-style scaling,
which KerasHub 0.32's decoder block does not apply.
"""

import json
import os

import keras
import keras_hub
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.checkpoints.hf_export import (
    transformers_config,
    transformers_tensors,
)
from keras_gemma2.checkpoints.keras_hub_preset import (
    backbone_arguments,
    is_keras_hub_gemma_preset,
    keras_hub_backbone_config,
    keras_hub_tokenizer_file,
    keras_hub_weight_plan,
    load_keras_hub_backbone,
)
from tests.checkpoints.tiny_sentencepiece import train_sentencepiece
from tests.conftest import hf_logits, random_token_ids

TOLERANCE = 1e-4
# Gemma 2 settings on, window (5) shorter than the test sequences (13),
# GQA, caps small enough to bite, heads * head_dim (32) != hidden (48).
# KerasHub's intermediate_dim counts both GeGLU branches: 96 is 48 per
# branch. Every test uses these shapes, so JAX compiles its ops once.
GEMMA2_SETTINGS = {
    "vocabulary_size": 96,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 48,
    "intermediate_dim": 96,
    "head_dim": 8,
    "query_head_dim_normalize": True,
    "use_post_ffw_norm": True,
    "use_post_attention_norm": True,
    "attention_logit_soft_cap": 4.0,
    "final_logit_soft_cap": 6.0,
    "use_sliding_window_attention": True,
    "sliding_window_size": 5,
}
# 27B-style: queries scaled by hidden / heads (48 / 4 = 12), not head_dim (8).
STYLE_27B = {**GEMMA2_SETTINGS, "query_head_dim_normalize": False}


def randomize_keras_hub(model, seed):
    """Every KerasHub weight random, norms included, scaled by its fan-in."""
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        path = variable.path
        if path.endswith("scale"):
            std = 0.5
        elif path.endswith("embeddings"):
            std = 1.0
        elif path.endswith(("query/kernel", "key/kernel", "value/kernel")):
            std = 1.5 / np.sqrt(shape[1])  # [heads, hidden, head_dim]
        elif path.endswith("attention_output/kernel"):
            std = 1.5 / np.sqrt(shape[0] * shape[1])  # [heads, head_dim, hidden]
        else:
            std = 1.5 / np.sqrt(shape[0])  # [in, out]
        variable.assign(rng.normal(0.0, std, shape).astype("float32"))
    return model


def keras_hub_causal_lm(seed=0, dtype=None, **settings):
    backbone = keras_hub.models.GemmaBackbone(**settings, dtype=dtype)
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    return randomize_keras_hub(causal_lm, seed)


def make_inputs(seed=0):
    token_ids = random_token_ids(2, 13, GEMMA2_SETTINGS["vocabulary_size"], seed=seed)
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def logits(model, inputs):
    # An eager call: `predict` would compile every model anew.
    return np.asarray(keras.ops.convert_to_numpy(model(inputs)), dtype="float32")


def hf_reference(backbone, **config_overrides):
    """HF `Gemma2ForCausalLM` (eager, float32) holding `backbone`'s weights."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**{**transformers_config(backbone), **config_overrides})
    config._attn_implementation = "eager"
    model = Gemma2ForCausalLM(config).eval()
    state = {
        name: torch.from_numpy(array)
        for name, array in transformers_tensors(backbone, "float32")
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    return model


def as_float32(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), "float32")


def assert_weights_equal(ours, reference_backbone):
    """Our variables equal the reference KerasHub variables, mapped."""
    reference = {variable.path: variable for variable in reference_backbone.weights}
    for path, variable, _, to_ours in keras_hub_weight_plan(ours):
        expected = to_ours(as_float32(reference[path]))
        np.testing.assert_array_equal(as_float32(variable), expected, err_msg=path)


@pytest.fixture(scope="module")
def keras_hub_2b_style():
    return keras_hub_causal_lm(seed=1, **GEMMA2_SETTINGS)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_logits_equal_keras_hub(keras_hub_2b_style, tmp_path, sharded):
    preset = str(tmp_path / "preset")
    if sharded:
        # ~60k float32 parameters = 240 KB; 0.00005 GB shards give several.
        keras_hub_2b_style.backbone.save_to_preset(preset, max_shard_size=0.00005)
        shards = [name for name in os.listdir(preset) if name.endswith(".h5")]
        assert len(shards) > 1 and "model.weights.json" in os.listdir(preset)
    else:
        keras_hub_2b_style.save_to_preset(preset)
    assert is_keras_hub_gemma_preset(preset)

    calls = []
    backbone = load_keras_hub_backbone(
        Gemma2Backbone, preset, progress=lambda *args: calls.append(args)
    )
    assert len(calls) == len(keras_hub_weight_plan(backbone)) == 2 + 11 * 2
    assert backbone.intermediate_dim == 48
    assert backbone.query_pre_attn_scalar == 8  # head_dim
    # Everything streamed from the h5 file(s) equals KerasHub's own loading
    # of the preset; this fails loudly if the Keras weights layout moves.
    assert_weights_equal(backbone, keras_hub.models.GemmaBackbone.from_preset(preset))
    ours = logits(Gemma2CausalLM(backbone), make_inputs())
    expected = logits(keras_hub_2b_style, make_inputs())
    difference = float(np.abs(ours - expected).max())
    print(f"PARITY keras_hub 2b-style sharded={sharded}: max|dlogit|={difference:.2e}")
    assert difference <= TOLERANCE
    # The caps bite: logits reach well into the final cap.
    assert np.abs(expected).max() > 0.5 * GEMMA2_SETTINGS["final_logit_soft_cap"]


def test_27b_style_scaling_matches_transformers(tmp_path):
    keras_hub_lm = keras_hub_causal_lm(seed=2, **STYLE_27B)
    preset = str(tmp_path / "preset")
    keras_hub_lm.save_to_preset(preset)
    backbone = load_keras_hub_backbone(Gemma2Backbone, preset)
    assert backbone.query_pre_attn_scalar == 12  # hidden / heads, not head_dim
    inputs = make_inputs(seed=2)
    ours = logits(Gemma2CausalLM(backbone), inputs)

    reference = hf_logits(hf_reference(backbone), inputs["token_ids"])
    assert reference.shape == ours.shape
    difference = float(np.abs(ours - reference).max())
    print(f"PARITY keras_hub 27b-style vs HF: max|dlogit|={difference:.2e}")
    assert difference <= TOLERANCE

    # The test can tell the two scalings apart: HF with head_dim scaling
    # (what KerasHub's block hard-codes) is far from ours.
    head_dim_scaled = hf_logits(
        hf_reference(backbone, query_pre_attn_scalar=STYLE_27B["head_dim"]),
        inputs["token_ids"],
    )
    assert np.abs(ours - head_dim_scaled).max() > 100 * TOLERANCE

    # KerasHub 0.32 ignores query_head_dim_normalize=False (its decoder block
    # passes True): it is far from HF and equal to HF with head_dim scaling.
    keras_hub_logits = logits(keras_hub_lm, inputs)
    keras_hub_difference = float(np.abs(keras_hub_logits - reference).max())
    head_dim_difference = float(np.abs(keras_hub_logits - head_dim_scaled).max())
    print(
        "MEASURED keras_hub GemmaCausalLM, 27b-style (query_head_dim_normalize="
        f"False): max|dlogit| vs HF={keras_hub_difference:.3f}, vs HF with "
        f"query_pre_attn_scalar=head_dim={head_dim_difference:.1e}"
    )


def test_bfloat16_preset_streams_exactly(keras_hub_2b_style, tmp_path):
    float32_preset = str(tmp_path / "float32")
    keras_hub_2b_style.backbone.save_to_preset(float32_preset)
    keras_hub_bfloat16 = keras_hub.models.GemmaBackbone.from_preset(
        float32_preset, dtype="bfloat16"
    )
    preset = str(tmp_path / "bfloat16")
    keras_hub_bfloat16.save_to_preset(preset)
    # By default the model takes the preset's dtype.
    assert keras_hub_backbone_config(preset)["dtype"] == "bfloat16"
    # Loaded into float32 (exact for bfloat16 values, and no bfloat16 model to
    # build), the weights equal KerasHub's bfloat16 ones.
    backbone = load_keras_hub_backbone(Gemma2Backbone, preset, dtype="float32")
    assert backbone.dtype_policy.name == "float32"
    assert_weights_equal(backbone, keras_hub_bfloat16)


def test_gemma1_preset_is_refused(tmp_path):
    # Gemma 1: no post norms, no sliding window, no caps.
    gemma1 = keras_hub.models.GemmaBackbone(
        **{
            **GEMMA2_SETTINGS,
            "use_post_ffw_norm": False,
            "use_post_attention_norm": False,
            "use_sliding_window_attention": False,
            "attention_logit_soft_cap": None,
            "final_logit_soft_cap": None,
        }
    )
    preset = str(tmp_path / "gemma1")
    gemma1.save_to_preset(preset)
    assert is_keras_hub_gemma_preset(preset)
    with pytest.raises(ValueError, match="Gemma 1 model .*use_post_ffw_norm=False"):
        load_keras_hub_backbone(Gemma2Backbone, preset)
    # Through the public entry point too.
    with pytest.raises(ValueError, match="config.json describes a Gemma 1"):
        Gemma2CausalLM.from_preset(preset)


def test_config_mapping():
    config = {
        **STYLE_27B,
        "layer_norm_epsilon": 1e-5,
        "dropout": 0.1,
        "dtype": {"module": "keras", "class_name": "DTypePolicy",
                  "config": {"name": "bfloat16"}},
    }  # fmt: skip
    arguments = backbone_arguments(config)
    assert arguments == {
        "vocabulary_size": 96,
        "num_layers": 2,
        "num_query_heads": 4,
        "num_key_value_heads": 2,
        "hidden_dim": 48,
        "intermediate_dim": 48,
        "head_dim": 8,
        "query_pre_attn_scalar": 12,
        "attention_logit_soft_cap": 4.0,
        "final_logit_soft_cap": 6.0,
        "sliding_window_size": 5,
        "layer_norm_epsilon": 1e-5,
        "rope_max_wavelength": 10000.0,
        "dropout": 0.1,
        "dtype": "bfloat16",
    }
    assert (
        backbone_arguments({**config, "query_head_dim_normalize": True})[
            "query_pre_attn_scalar"
        ]
        == 8
    )
    # float16 overflows on Gemma 2: such a preset loads in the Keras default.
    assert "dtype" not in backbone_arguments({**config, "dtype": "float16"})


def test_is_keras_hub_gemma_preset(tmp_path, hf_checkpoint):
    assert not is_keras_hub_gemma_preset(str(tmp_path / "missing"))
    hf_directory, _ = hf_checkpoint(seed=0)
    assert not is_keras_hub_gemma_preset(hf_directory)
    (tmp_path / "config.json").write_text("{not json")
    assert not is_keras_hub_gemma_preset(str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps({"class_name": "GemmaBackbone", "module": "keras_nlp.src.models"})
    )
    assert is_keras_hub_gemma_preset(str(tmp_path))
    with pytest.raises(TypeError, match="directory"):
        is_keras_hub_gemma_preset(3)


def test_bad_presets_name_the_file(keras_hub_2b_style, tmp_path):
    preset = str(tmp_path / "preset")
    keras_hub_2b_style.backbone.save_to_preset(preset)
    config_path = os.path.join(preset, "config.json")
    with open(config_path) as file:
        serialized = json.load(file)
    serialized["config"]["vocabulary_size"] = 100
    with open(config_path, "w") as file:
        json.dump(serialized, file)
    with pytest.raises(ValueError, match=r"token_embedding/embeddings.*\(96, 48\)"):
        load_keras_hub_backbone(Gemma2Backbone, preset)
    # Without weights the config alone still builds.
    backbone = load_keras_hub_backbone(Gemma2Backbone, preset, load_weights=False)
    assert backbone.vocabulary_size == 100

    os.remove(os.path.join(preset, "model.weights.h5"))
    with pytest.raises(FileNotFoundError, match="model.weights.h5"):
        load_keras_hub_backbone(Gemma2Backbone, preset)
    del serialized["config"]["head_dim"]
    with open(config_path, "w") as file:
        json.dump(serialized, file)
    with pytest.raises(ValueError, match=r"config.json lacks .*head_dim"):
        load_keras_hub_backbone(Gemma2Backbone, preset)


def test_keras_hub_tokenizer_file(tmp_path):
    proto = train_sentencepiece()
    keras_hub.models.GemmaTokenizer(proto=proto).save_to_preset(str(tmp_path))
    path = keras_hub_tokenizer_file(str(tmp_path))
    assert path == os.path.join(str(tmp_path), "assets", "tokenizer", "vocabulary.spm")
    with open(path, "rb") as file:
        assert file.read() == proto
    assert keras_hub_tokenizer_file(str(tmp_path / "missing")) is None
    (tmp_path / "tokenizer.json").write_text('{"class_name": "BertTokenizer"}')
    assert keras_hub_tokenizer_file(str(tmp_path)) is None
