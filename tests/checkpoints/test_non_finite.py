"""A checkpoint tensor holding NaN or Inf is refused, naming file and tensor.

Every loader (HF safetensors, KerasHub presets, our presets) raises a
`ValueError` and returns no model; `check_finite=False` and
`KERAS_GEMMA2_CHECK_FINITE=0` load such a checkpoint anyway, and the NaN it
then carries into every logit proves the opt-out really skipped the check.
"""

import os

import keras
import keras_hub
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.checkpoints.finite_check import (
    ENVIRONMENT_VARIABLE,
    check_finite,
    finite_check_enabled,
    is_finite,
)
from tests.checkpoints.test_keras_hub_preset import GEMMA2_SETTINGS
from tests.conftest import TINY_BACKBONE_CONFIG, random_token_ids, randomize_weights

BAD_VALUES = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
def test_is_finite_finds_one_bad_value_anywhere(dtype, bad):
    # 2**20 + 7 elements: a second block, and the bad value in its tail.
    rng = np.random.RandomState(0)
    values = rng.normal(0.0, 100.0, 2**20 + 7)
    values[:4] = [0.0, -0.0, 6.0e4, -6.0e4]  # large but finite in float16
    numpy_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    array = values.astype(numpy_dtype)
    assert is_finite(array)
    for position in (0, 2**20 - 1, 2**20 + 6):
        broken = array.copy()
        broken[position] = bad
        # The reference: numpy's isfinite in float64.
        assert not np.isfinite(broken.astype("float64")).all()
        assert not is_finite(broken.reshape(-1, 1))


def test_integer_tensors_count_as_finite():
    assert is_finite(np.arange(6, dtype="int32").reshape(2, 3))


def test_check_finite_message_names_tensor_file_and_opt_out():
    array = np.array([[1.0, np.nan], [np.inf, np.nan]], "float32")
    with pytest.raises(ValueError) as error:
        check_finite(array, "model.norm.weight", "/ckpt/model.safetensors")
    message = str(error.value)
    assert "`model.norm.weight`" in message
    assert "/ckpt/model.safetensors" in message
    assert "2 NaN, 1 Inf of 4" in message
    assert "check_finite=False" in message and ENVIRONMENT_VARIABLE in message


def test_opt_out_switches(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    assert finite_check_enabled() is True
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, off)
        assert finite_check_enabled() is False
        assert finite_check_enabled(True) is True  # an argument wins
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    assert finite_check_enabled() is True
    assert finite_check_enabled(False) is False
    with pytest.raises(TypeError, match="check_finite=0"):
        finite_check_enabled(0)


def _assert_refused(load, names):
    with pytest.raises(ValueError, match="non-finite") as error:
        load()
    for name in names:
        assert name in str(error.value)


def _assert_all_logits_nan(causal_lm):
    token_ids = random_token_ids(1, 4, causal_lm.backbone.vocabulary_size)
    logits = causal_lm(
        {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    )
    assert np.isnan(keras.ops.convert_to_numpy(logits)).all()


def test_hf_checkpoint_with_nan_is_refused(hf_checkpoint, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    directory, _ = hf_checkpoint(seed=3)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.post_feedforward_layernorm.weight"
    tensors[name][2] = np.nan
    save_file(tensors, path, metadata={"format": "pt"})

    _assert_refused(lambda: Gemma2CausalLM.from_preset(directory), [name, path])
    _assert_refused(lambda: Gemma2Backbone.from_preset(directory), [name, path])
    _assert_all_logits_nan(Gemma2CausalLM.from_preset(directory, check_finite=False))
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")
    _assert_all_logits_nan(Gemma2CausalLM.from_preset(directory))


def test_keras_hub_preset_with_inf_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    backbone = keras_hub.models.GemmaBackbone(**GEMMA2_SETTINGS)
    variable = next(v for v in backbone.weights if v.path.endswith("query/kernel"))
    value = keras.ops.convert_to_numpy(variable)
    value[0, 1, 2] = np.inf
    variable.assign(value)
    preset = str(tmp_path / "keras_hub")
    backbone.save_to_preset(preset)

    _assert_refused(
        lambda: Gemma2Backbone.from_preset(preset),
        [variable.path, os.path.join(preset, "model.weights.h5"), "1 Inf"],
    )
    loaded = Gemma2Backbone.from_preset(preset, check_finite=False)
    assert (
        sum(np.isinf(keras.ops.convert_to_numpy(v)).sum() for v in loaded.weights) == 1
    )


def test_our_preset_with_nan_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    backbone = randomize_weights(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    variable = backbone.weights[-1]
    value = keras.ops.convert_to_numpy(variable)
    value.reshape(-1)[-1] = np.nan
    variable.assign(value)
    preset = str(tmp_path / "ours")
    Gemma2CausalLM(backbone).save_to_preset(preset)

    weights = os.path.join(preset, "model.weights.h5")
    names = [variable.path, weights, "1 NaN"]
    _assert_refused(lambda: Gemma2Backbone.from_preset(preset), names)
    _assert_refused(lambda: Gemma2CausalLM.from_preset(preset), names)
    _assert_all_logits_nan(Gemma2CausalLM.from_preset(preset, check_finite=False))
