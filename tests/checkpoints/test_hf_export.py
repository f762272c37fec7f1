"""Export to HF transformers: HF's Gemma2ForCausalLM and tokenizer load it exactly.

Reference: `transformers.AutoModelForCausalLM.from_pretrained` (eager,
float32) on the exported directory, and `AutoTokenizer` on its tokenizer
files; never our own reader alone.
"""

import json
import os

import keras
import keras_hub
import ml_dtypes
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.checkpoints import hf_export
from keras_gemma2.checkpoints.hf_checkpoint import read_hf_config
from keras_gemma2.checkpoints.hf_export import export_to_transformers
from keras_gemma2.checkpoints.safetensors_files import read_header
from tests.checkpoints.tiny_sentencepiece import train_sentencepiece
from tests.conftest import (
    TINY_BACKBONE_CONFIG,
    hf_logits,
    random_token_ids,
    randomize_weights,
)

TOLERANCE = 1e-4
VOCABULARY = TINY_BACKBONE_CONFIG["vocabulary_size"]


@pytest.fixture(scope="module")
def causal_lm():
    return randomize_weights(Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG)))


def make_inputs(seed=0):
    # 13 tokens: longer than the window (5); the first row right-padded.
    token_ids = random_token_ids(2, 13, VOCABULARY, seed=seed)
    padding_mask = np.ones_like(token_ids)
    padding_mask[0, 10:] = 0
    token_ids[padding_mask == 0] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def our_logits(model, inputs):
    # An eager call: `predict` would compile every model anew.
    return np.asarray(keras.ops.convert_to_numpy(model(inputs)), "float32")


def transformers_logits(directory, inputs, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", **kwargs
    ).eval()
    assert type(model).__name__ == "Gemma2ForCausalLM"
    if "dtype" in kwargs:
        assert model.dtype == kwargs["dtype"]
    return hf_logits(model, inputs["token_ids"], inputs["padding_mask"]), model


def max_valid_difference(actual, expected, inputs):
    assert actual.shape == expected.shape
    valid = inputs["padding_mask"].astype(bool)
    return float(np.abs(actual - expected)[valid].max())


def assert_same_weights(actual, expected):
    for a, b in zip(actual.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_array_equal(np.asarray(a, "float32"), b)


@pytest.mark.parametrize(
    "max_shard_size_bytes", [None, 40_000], ids=["single", "sharded"]
)
def test_round_trip_through_transformers(causal_lm, tmp_path, max_shard_size_bytes):
    directory = str(tmp_path / "hf")
    kwargs = {}
    if max_shard_size_bytes is not None:
        kwargs["max_shard_size_bytes"] = max_shard_size_bytes
    export_to_transformers(causal_lm, directory, **kwargs)
    files = sorted(os.listdir(directory))
    if max_shard_size_bytes is None:
        assert files == ["config.json", "generation_config.json", "model.safetensors"]
    else:
        shards = [name for name in files if name.endswith(".safetensors")]
        # ~45k float32 parameters = 180 KB in 40 KB shards.
        assert len(shards) > 2
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        with open(os.path.join(directory, "model.safetensors.index.json")) as file:
            index = json.load(file)
        assert sorted(set(index["weight_map"].values())) == shards
        sizes = [os.path.getsize(os.path.join(directory, name)) for name in shards]
        # Header bytes aside, no shard holds more than the limit unless it
        # is a single tensor (the 96 x 32 embedding is 12 KB, so none is).
        assert max(sizes) < max_shard_size_bytes + 4_000

    inputs = make_inputs()
    expected, model = transformers_logits(directory, inputs)
    assert model.config.tie_word_embeddings
    difference = max_valid_difference(our_logits(causal_lm, inputs), expected, inputs)
    print(f"PARITY export {files[-1]}: max|dlogit|={difference:.2e}")
    assert difference <= TOLERANCE

    restored = Gemma2CausalLM.from_preset(directory)
    assert_same_weights(restored, causal_lm)


def test_bfloat16_export(causal_lm, tmp_path):
    import torch

    directory = str(tmp_path / "bf16")
    export_to_transformers(causal_lm, directory, dtype="bfloat16")
    header = read_header(os.path.join(directory, "model.safetensors"))
    assert {entry.dtype for entry in header.values()} == {"BF16"}
    with open(os.path.join(directory, "config.json")) as file:
        assert json.load(file)["torch_dtype"] == "bfloat16"

    # Our model with the weights rounded to bfloat16, as stored.
    rounded = Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    rounded.set_weights(
        [
            np.asarray(w).astype(ml_dtypes.bfloat16).astype("float32")
            for w in causal_lm.get_weights()
        ]
    )
    inputs = make_inputs(seed=1)
    expected, _ = transformers_logits(directory, inputs, dtype=torch.float32)
    difference = max_valid_difference(our_logits(rounded, inputs), expected, inputs)
    print(f"PARITY export bfloat16: max|dlogit|={difference:.2e}")
    assert difference <= TOLERANCE
    # transformers' default keeps the stored dtype.
    _, model = transformers_logits(directory, inputs)
    assert model.dtype == torch.bfloat16
    assert_same_weights(Gemma2CausalLM.from_preset(directory), rounded)


def test_config_json(causal_lm, tmp_path):
    from transformers import AutoConfig

    directory = str(tmp_path / "hf")
    export_to_transformers(causal_lm, directory)
    with open(os.path.join(directory, "config.json")) as file:
        written = json.load(file)
    assert written["model_type"] == "gemma2"
    assert written["architectures"] == ["Gemma2ForCausalLM"]
    assert written["hidden_activation"] == "gelu_pytorch_tanh"
    assert written["tie_word_embeddings"] is True
    assert written["dtype"] == written["torch_dtype"] == "float32"
    config = AutoConfig.from_pretrained(directory)
    assert config.query_pre_attn_scalar == 12
    assert config.head_dim == 16
    assert config.sliding_window == 5
    assert config.attn_logit_softcapping == 4.0
    assert config.final_logit_softcapping == 6.0
    assert config.rms_norm_eps == 1e-5
    assert config.rope_parameters["rope_theta"] == 500.0
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, 1, 0)
    # Our HF reader maps it back to the same constructor arguments.
    arguments = read_hf_config(directory)
    for key, value in TINY_BACKBONE_CONFIG.items():
        assert arguments[key] == value, key
    with open(os.path.join(directory, "generation_config.json")) as file:
        generation = json.load(file)
    assert generation == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


def test_existing_destination_is_refused_unless_overwrite(causal_lm, tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_to_transformers(causal_lm, str(directory))
    assert sorted(os.listdir(directory)) == ["keep.txt"]
    export_to_transformers(causal_lm, str(directory), overwrite=True)
    assert not (directory / "keep.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["hf"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failure_mid_write_leaves_nothing(causal_lm, tmp_path, monkeypatch, existing):
    directory = tmp_path / "hf"
    if existing:
        directory.mkdir()
        (directory / "keep.txt").write_text("user data")
    original = hf_export.save_file
    calls = []

    def fail_on_second_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        original(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_export, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        export_to_transformers(
            causal_lm, str(directory), max_shard_size_bytes=40_000, overwrite=existing
        )
    assert len(calls) == 2
    if existing:
        assert sorted(os.listdir(tmp_path)) == ["hf"]
        assert sorted(os.listdir(directory)) == ["keep.txt"]
    else:
        assert os.listdir(tmp_path) == []


def test_tokenizer_files_load_in_transformers(causal_lm, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = keras_hub.tokenizers.SentencePieceTokenizer(proto=train_sentencepiece())
    directory = str(tmp_path / "hf")
    export_to_transformers(causal_lm, directory, tokenizer=tokenizer)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(directory, name)), name

    loaded = AutoTokenizer.from_pretrained(directory)
    assert type(loaded).__name__.startswith("GemmaTokenizer")
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        "<bos>",
        "<eos>",
        "<pad>",
    )
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (2, 1, 0)
    # No token past the vocabulary (transformers would add a "<mask>").
    assert len(loaded) == tokenizer.vocabulary_size() == 90
    for text in ["the quick fox", "gemma  keras 2024 model ", "<start_of_turn>dog"]:
        expected = [2] + [int(i) for i in keras.ops.convert_to_numpy(tokenizer(text))]
        assert loaded(text).input_ids == expected, text
        assert loaded.decode(expected[1:]) == text
    prompt = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    with open(os.path.join(directory, "generation_config.json")) as file:
        end_of_turn = tokenizer.token_to_id("<end_of_turn>")
        assert json.load(file)["eos_token_id"] == [1, end_of_turn]


def test_bad_arguments_write_nothing(causal_lm, tmp_path):
    directory = str(tmp_path / "hf")
    with pytest.raises(ValueError, match="dtype.*float16"):
        export_to_transformers(causal_lm, directory, dtype="float16")
    with pytest.raises(ValueError, match="max_shard_size_bytes=0"):
        export_to_transformers(causal_lm, directory, max_shard_size_bytes=0)
    with pytest.raises(TypeError, match="causal_lm.*Sequential"):
        export_to_transformers(keras.Sequential(), directory)
    with pytest.raises(TypeError, match="tokenizer.*str"):
        export_to_transformers(causal_lm, directory, tokenizer="tokenizer.model")
    big = keras_hub.tokenizers.SentencePieceTokenizer(proto=train_sentencepiece(120))
    with pytest.raises(ValueError, match="120 pieces .*vocabulary_size=96"):
        export_to_transformers(causal_lm, directory, tokenizer=big)
    assert os.listdir(tmp_path) == []
