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


def _h5_non_finite_datasets(path):
    """Names of the datasets of `path` (an .h5 file) holding NaN or Inf, by h5py."""
    import h5py

    found = []

    def visit(name, item):
        if not isinstance(item, h5py.Dataset):
            return
        values = np.asarray(item[()])
        if item.attrs.get("dtype") == "bfloat16":
            values = values.view(ml_dtypes.bfloat16)
        if values.dtype.kind in "fV" and not np.isfinite(values.astype("f4")).all():
            found.append(name)

    with h5py.File(path, "r") as file:
        file.visititems(visit)
    return found


def _poisoned_backbone(dtype="float32", bad=np.nan, index=5):
    """A random tiny backbone with one `bad` value in its `index`-th weight."""
    backbone = randomize_weights(Gemma2Backbone(**TINY_BACKBONE_CONFIG, dtype=dtype))
    variable = backbone.weights[index]
    value = keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32"))
    value.reshape(-1)[-1] = bad
    variable.assign(value)
    return backbone


def test_our_preset_with_nan_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    backbone = _poisoned_backbone(index=-1)
    preset = str(tmp_path / "ours")
    Gemma2CausalLM(backbone).save_to_preset(preset)

    weights = os.path.join(preset, "model.weights.h5")
    (bad,) = _h5_non_finite_datasets(weights)
    names = [bad, weights, "1 NaN"]
    _assert_refused(lambda: Gemma2Backbone.from_preset(preset), names)
    _assert_refused(lambda: Gemma2CausalLM.from_preset(preset), names)
    _assert_all_logits_nan(Gemma2CausalLM.from_preset(preset, check_finite=False))
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")
    _assert_all_logits_nan(Gemma2CausalLM.from_preset(preset))
    # The argument wins over the environment.
    _assert_refused(lambda: Gemma2CausalLM.from_preset(preset, check_finite=True), [])


def test_keras_file_with_nan_is_refused_by_load_model(tmp_path, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    path = str(tmp_path / "model.keras")
    Gemma2CausalLM(_poisoned_backbone()).save(path)
    import zipfile

    with zipfile.ZipFile(path) as archive:
        archive.extract("model.weights.h5", tmp_path)
    (bad,) = _h5_non_finite_datasets(tmp_path / "model.weights.h5")

    _assert_refused(
        lambda: keras.models.load_model(path), [bad, "model.weights.h5", "1 NaN"]
    )
    target = Gemma2CausalLM(randomize_weights(Gemma2Backbone(**TINY_BACKBONE_CONFIG)))
    before = [keras.ops.convert_to_numpy(v) for v in target.weights]
    _assert_refused(lambda: target.load_weights(path), [bad, path])
    for variable, value in zip(target.weights, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)

    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")
    _assert_all_logits_nan(keras.models.load_model(path))


def test_load_weights_with_inf_leaves_the_model_unchanged(tmp_path, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    path = str(tmp_path / "bad.weights.h5")
    _poisoned_backbone("bfloat16", bad=np.inf, index=3).save_weights(path)
    (bad,) = _h5_non_finite_datasets(path)

    target = randomize_weights(Gemma2Backbone(**TINY_BACKBONE_CONFIG, dtype="bfloat16"))
    before = [keras.ops.convert_to_numpy(v) for v in target.weights]
    _assert_refused(lambda: target.load_weights(path), [bad, path, "1 Inf"])
    for variable, value in zip(target.weights, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
