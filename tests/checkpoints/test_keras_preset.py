"""Our own preset format: atomic, sharded, identical logits after a round trip."""

import os

import keras
import keras_hub
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from tests.conftest import TINY_BACKBONE_CONFIG, random_token_ids, randomize_weights


def make_inputs():
    token_ids = random_token_ids(2, 11, TINY_BACKBONE_CONFIG["vocabulary_size"], seed=2)
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


@pytest.fixture
def causal_lm():
    return randomize_weights(Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG)))


def test_causal_lm_round_trip_with_shards(causal_lm, tmp_path):
    preset = str(tmp_path / "preset")
    # ~45k float32 parameters = 180 KB; 0.00005 GB shards give several files.
    causal_lm.save_to_preset(preset, max_shard_size=0.00005)
    shards = [name for name in os.listdir(preset) if name.endswith(".weights.h5")]
    assert len(shards) > 1
    restored = Gemma2CausalLM.from_preset(preset)
    assert isinstance(restored, Gemma2CausalLM)
    np.testing.assert_array_equal(
        restored.predict(make_inputs(), verbose=0),
        causal_lm.predict(make_inputs(), verbose=0),
    )


def test_backbone_round_trip_and_dtype_override(causal_lm, tmp_path):
    preset = str(tmp_path / "backbone")
    causal_lm.backbone.save_to_preset(preset)
    restored = Gemma2Backbone.from_preset(preset)
    for expected, actual in zip(
        causal_lm.backbone.get_weights(), restored.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(actual, expected)
    bfloat16 = Gemma2Backbone.from_preset(preset, dtype="bfloat16")
    assert bfloat16.dtype_policy.compute_dtype == "bfloat16"


def test_existing_destination_is_refused_unless_overwrite(causal_lm, tmp_path):
    preset = tmp_path / "preset"
    preset.mkdir()
    (preset / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        causal_lm.save_to_preset(str(preset))
    assert (preset / "keep.txt").read_text() == "user data"
    causal_lm.save_to_preset(str(preset), overwrite=True)
    assert not (preset / "keep.txt").exists()
    assert (preset / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["preset"]


def test_interrupted_save_leaves_nothing(causal_lm, tmp_path, monkeypatch):
    original = keras_hub.models.Backbone.save_to_preset

    def save_then_fail(self, preset_dir, max_shard_size=10):
        original(self, preset_dir, max_shard_size=max_shard_size)
        raise KeyboardInterrupt("interrupted after writing the weights")

    monkeypatch.setattr(keras_hub.models.Backbone, "save_to_preset", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        causal_lm.save_to_preset(str(tmp_path / "preset"))
    assert os.listdir(tmp_path) == []


def test_directory_of_unknown_format(tmp_path):
    (tmp_path / "config.json").write_text('{"class_name": "BertBackbone"}')
    with pytest.raises(ValueError, match="BertBackbone"):
        Gemma2Backbone.from_preset(str(tmp_path))


@pytest.mark.parametrize("cls", [Gemma2CausalLM, Gemma2Backbone])
def test_load_starts_from_zeros_yet_every_weight_is_the_saved_one(
    causal_lm, tmp_path, cls
):
    # `from_preset` builds without random initial values (they would be
    # replaced), so every weight must come from the file; without weights,
    # the initializers still run.
    preset = str(tmp_path / "preset")
    causal_lm.save_to_preset(preset)
    loaded = cls.from_preset(preset)
    backbone = loaded if cls is Gemma2Backbone else loaded.backbone
    saved = causal_lm.backbone.get_weights()
    assert len(saved) == len(backbone.weights)
    for expected, actual in zip(saved, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)
    fresh = cls.from_preset(preset, load_weights=False)
    fresh_backbone = fresh if cls is Gemma2Backbone else fresh.backbone
    kernel = fresh_backbone.transformer_layers[0].attention.query_dense.kernel
    assert np.count_nonzero(keras.ops.convert_to_numpy(kernel)) > 0
