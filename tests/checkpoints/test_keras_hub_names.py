"""KerasHub users' names work: `keras_nlp>` presets, KerasHub preset names,
and `preprocessor=` in `from_preset` for every preset format.

The `keras_nlp>` preset is a KerasHub preset written by KerasHub itself, its
class names rewritten as KerasNLP wrote them before the rename; the reference
for its logits and token ids is KerasHub's own model and tokenizer.
"""

import os
import shutil
import socket

import kagglehub
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
from keras_gemma2.checkpoints import handles
from keras_gemma2.checkpoints.preset_loading import resolve_preset
from keras_gemma2.models.presets import KERAS_HUB_PRESETS
from tests.checkpoints.test_keras_hub_preset import randomize_keras_hub
from tests.conftest import random_token_ids

TEXT = "def add(a, b):\n    return a + b  # ∑ 🙂"
SEQUENCE_LENGTH = 24
TOLERANCE = 1e-4


def keras_hub_gemma2(vocabulary):
    """A random 2-layer KerasHub `GemmaCausalLM` with the Gemma 2 settings."""
    tokenizer = keras_hub.models.GemmaTokenizer(proto=vocabulary)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=48,
        head_dim=8,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=4.0,
        final_logit_soft_cap=6.0,
        use_sliding_window_attention=True,
        sliding_window_size=4,
    )
    causal_lm = keras_hub.models.GemmaCausalLM(backbone, preprocessor)
    return randomize_keras_hub(causal_lm, seed=3)


def rename_to_keras_nlp(source, destination):
    """Copy a KerasHub preset, its JSON written as KerasNLP wrote it."""
    shutil.copytree(source, destination)
    for name in os.listdir(destination):
        if not name.endswith(".json"):
            continue
        path = os.path.join(destination, name)
        with open(path) as file:
            text = file.read()
        text = (
            text.replace('"keras_hub>', '"keras_nlp>')
            .replace('"keras_hub.src.', '"keras_nlp.src.')
            .replace('"keras_hub_version"', '"keras_nlp_version"')
        )
        assert "keras_hub" not in text, (path, text)
        with open(path, "w") as file:
            file.write(text)


@pytest.fixture(scope="module")
def presets(gemma_vocabulary, tmp_path_factory):
    """`(reference KerasHub model, keras_nlp> preset directory)`."""
    reference = keras_hub_gemma2(gemma_vocabulary)
    root = tmp_path_factory.mktemp("keras_nlp_names")
    reference.save_to_preset(str(root / "keras_hub"))
    rename_to_keras_nlp(str(root / "keras_hub"), str(root / "keras_nlp"))
    return reference, str(root / "keras_nlp")


def logits(model, token_ids):
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return np.asarray(ops.convert_to_numpy(model(inputs)), dtype="float32")


def test_keras_nlp_names_load_everywhere(presets):
    reference, preset = presets
    with open(os.path.join(preset, "preprocessor.json")) as file:
        assert '"keras_nlp>GemmaCausalLMPreprocessor"' in file.read()
    token_ids = random_token_ids(2, 9, reference.backbone.vocabulary_size, seed=1)
    expected = logits(reference, token_ids)

    backbone = Gemma2Backbone.from_preset(preset)
    difference = float(
        np.abs(logits(Gemma2CausalLM(backbone), token_ids) - expected).max()
    )
    assert difference <= TOLERANCE

    text_ids = ops.convert_to_numpy(reference.preprocessor.tokenizer(TEXT))
    tokenizer = Gemma2Tokenizer.from_preset(preset)
    np.testing.assert_array_equal(ops.convert_to_numpy(tokenizer(TEXT)), text_ids)
    assert tokenizer.end_of_turn_token_id == 107

    preprocessor = Gemma2CausalLMPreprocessor.from_preset(preset)
    assert preprocessor.sequence_length == SEQUENCE_LENGTH
    packed = preprocessor.generate_preprocess([TEXT])
    expected_packed = reference.preprocessor.generate_preprocess([TEXT])
    for key in ("token_ids", "padding_mask"):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(packed[key]),
            ops.convert_to_numpy(expected_packed[key]),
        )

    causal_lm = Gemma2CausalLM.from_preset(preset)
    assert causal_lm.preprocessor.sequence_length == SEQUENCE_LENGTH
    difference = float(np.abs(logits(causal_lm, token_ids) - expected).max())
    assert difference <= TOLERANCE


def test_keras_hub_preset_names_match_keras_hub_registry():
    registry = keras_hub.models.GemmaCausalLM.presets
    gemma2 = {name for name in registry if name.startswith("gemma2_")}
    assert gemma2 <= set(KERAS_HUB_PRESETS)
    for name, (handle, _) in KERAS_HUB_PRESETS.items():
        assert registry[name]["kaggle_handle"] == handle, name


def test_keras_hub_preset_name_downloads_its_kaggle_handle(presets, monkeypatch):
    # No network here: kagglehub's download is replaced by a local copy, and
    # the handle it was asked for is recorded.
    _, preset = presets
    asked = []

    def download(handle, *args, **kwargs):
        asked.append(handle)
        return preset

    monkeypatch.delenv(handles.OFFLINE_VARIABLE, raising=False)
    monkeypatch.setattr(handles, "host_reachable", lambda host, timeout=3.0: True)
    monkeypatch.setattr(kagglehub, "model_download", download)
    causal_lm = Gemma2CausalLM.from_preset("gemma2_instruct_2b_en")
    assert causal_lm.preprocessor is not None
    assert asked[0] == "keras/gemma2/keras/gemma2_instruct_2b_en/2"
    asked.clear()
    for name in sorted(KERAS_HUB_PRESETS):
        assert resolve_preset(name) == preset
    assert asked == [
        KERAS_HUB_PRESETS[name][0].removeprefix("kaggle://")
        for name in sorted(KERAS_HUB_PRESETS)
    ]


def test_keras_hub_preset_name_offline_says_what_to_pass(monkeypatch):
    def refuse(address, timeout=None):
        raise OSError("network is unreachable")

    monkeypatch.delenv(handles.OFFLINE_VARIABLE, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(ConnectionError) as caught:
        Gemma2CausalLM.from_preset("gemma2_instruct_9b_en")
    message = str(caught.value)
    assert "\n" not in message
    assert "kaggle://keras/gemma2/keras/gemma2_instruct_9b_en/4" in message
    assert "www.kaggle.com is unreachable" in message
    assert "local directory" in message and "google/gemma-2-9b-it" in message


def test_failed_download_is_one_clear_line(monkeypatch):
    def download(handle, *args, **kwargs):
        raise OSError("401 Client Error: Unauthorized\nfor url ...")

    monkeypatch.delenv(handles.OFFLINE_VARIABLE, raising=False)
    monkeypatch.setattr(handles, "host_reachable", lambda host, timeout=3.0: True)
    monkeypatch.setattr(kagglehub, "model_download", download)
    with pytest.raises(ConnectionError) as caught:
        Gemma2Tokenizer.from_preset("gemma2_2b_en")
    message = str(caught.value)
    assert "\n" not in message
    assert "401 Client Error" in message and "KAGGLE_USERNAME" in message
    assert isinstance(caught.value.__cause__, OSError)


@pytest.fixture(scope="module")
def preset_formats(presets, gemma_vocabulary, tmp_path_factory):
    """One directory per format, each holding a tokenizer."""
    from tests.conftest import make_hf_model

    reference, keras_nlp = presets
    root = tmp_path_factory.mktemp("formats")
    ours = str(root / "keras_gemma2")
    Gemma2CausalLM.from_preset(keras_nlp).save_to_preset(ours)
    transformers = str(root / "transformers")
    vocabulary_size = reference.backbone.vocabulary_size
    make_hf_model(seed=0, vocab_size=vocabulary_size).save_pretrained(transformers)
    shutil.copy(gemma_vocabulary, os.path.join(transformers, "tokenizer.model"))
    return {"keras_hub": keras_nlp, "keras_gemma2": ours, "transformers": transformers}


@pytest.mark.parametrize("kind", ["keras_hub", "keras_gemma2", "transformers"])
def test_preprocessor_argument_is_honoured(preset_formats, gemma_vocabulary, kind):
    preset = preset_formats[kind]
    assert Gemma2CausalLM.from_preset(preset).preprocessor is not None
    assert Gemma2CausalLM.from_preset(preset, preprocessor=None).preprocessor is None
    custom = Gemma2CausalLMPreprocessor(
        Gemma2Tokenizer(proto=gemma_vocabulary), sequence_length=7
    )
    causal_lm = Gemma2CausalLM.from_preset(preset, preprocessor=custom)
    assert causal_lm.preprocessor is custom
    with pytest.raises(TypeError, match="`preprocessor`.*Received: preprocessor='x'"):
        Gemma2CausalLM.from_preset(preset, preprocessor="x")
    keras.backend.clear_session()
