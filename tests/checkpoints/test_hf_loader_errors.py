"""Every loader error names the file and tensor, and loads nothing."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.checkpoints.hf_checkpoint import load_hf_weights, read_hf_config

WEIGHTS = "model.safetensors"


def rewrite(directory, edit):
    path = os.path.join(directory, WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as file:
        config = json.load(file)
    config.update(changes)
    with open(path, "w") as file:
        json.dump(config, file)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        Gemma2CausalLM.from_preset("./does-not-exist")


def test_unknown_preset_name():
    with pytest.raises(ValueError, match="gemma3_tiny"):
        Gemma2CausalLM.from_preset("gemma3_tiny")


def test_known_name_without_bundled_weights_explains_what_to_do(monkeypatch):
    # A KerasHub name resolves to its Kaggle handle; offline, the error says
    # what to pass instead (tests/checkpoints/test_keras_hub_names.py).
    monkeypatch.setenv("KERAS_GEMMA2_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="local directory"):
        Gemma2Backbone.from_preset("gemma2_2b_en")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        Gemma2Backbone.from_preset(str(tmp_path))


def test_wrong_model_type(hf_checkpoint):
    directory, _ = hf_checkpoint()
    edit_config(directory, model_type="llama")
    with pytest.raises(ValueError, match="model_type='llama'"):
        Gemma2Backbone.from_preset(directory)


def test_wrong_activation(hf_checkpoint):
    directory, _ = hf_checkpoint()
    edit_config(directory, hidden_activation="silu")
    with pytest.raises(ValueError, match="hidden_activation='silu'"):
        read_hf_config(directory)


def test_missing_weights_file(hf_checkpoint):
    directory, _ = hf_checkpoint()
    os.remove(os.path.join(directory, WEIGHTS))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Gemma2Backbone.from_preset(directory)


def test_missing_shard(hf_checkpoint):
    directory, _ = hf_checkpoint(max_shard_size="40KB")
    shard = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))[-1]
    os.remove(os.path.join(directory, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        Gemma2Backbone.from_preset(directory)


def test_truncated_file(hf_checkpoint):
    directory, _ = hf_checkpoint()
    path = os.path.join(directory, WEIGHTS)
    size = os.path.getsize(path)
    with open(path, "r+b") as file:
        file.truncate(size - 100)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Gemma2Backbone.from_preset(directory)


def test_missing_tensor(hf_checkpoint):
    directory, _ = hf_checkpoint()
    rewrite(directory, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"lacks the tensor `model\.layers\.2\.mlp\.up_proj"
    ):
        Gemma2Backbone.from_preset(directory)


def test_unexpected_tensor(hf_checkpoint):
    directory, _ = hf_checkpoint()

    def add(tensors):
        tensors["model.layers.9.mlp.up_proj.weight"] = np.zeros((2, 2), "float32")

    path = rewrite(directory, add)
    with pytest.raises(
        ValueError, match=r"Unexpected tensor `model\.layers\.9"
    ) as info:
        Gemma2Backbone.from_preset(directory)
    assert path in str(info.value)


def test_wrong_shape_names_tensor_and_file(hf_checkpoint):
    directory, _ = hf_checkpoint()

    def transpose(tensors):
        name = "model.layers.1.self_attn.o_proj.weight"
        tensors[name] = np.ascontiguousarray(tensors[name].T)

    path = rewrite(directory, transpose)
    with pytest.raises(
        ValueError, match=r"o_proj\.weight` in .* has shape \(64, 32\)"
    ) as info:
        Gemma2Backbone.from_preset(directory)
    assert path in str(info.value)


def test_bad_checkpoint_leaves_weights_untouched(hf_checkpoint):
    directory, _ = hf_checkpoint()
    # Break the last tensor the loader would assign.
    rewrite(
        directory, lambda t: t.update({"model.norm.weight": np.zeros((3,), "float32")})
    )
    backbone = Gemma2Backbone(**read_hf_config(directory))
    before = [np.array(w) for w in backbone.get_weights()]
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_hf_weights(backbone, directory)
    for old, new in zip(before, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_unsupported_tensor_dtype(hf_checkpoint):
    directory, _ = hf_checkpoint()

    def to_int(tensors):
        name = "model.norm.weight"
        tensors[name] = tensors[name].astype("int32")

    rewrite(directory, to_int)
    with pytest.raises(ValueError, match="model.norm.weight.*I32"):
        Gemma2Backbone.from_preset(directory)
