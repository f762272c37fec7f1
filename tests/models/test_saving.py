"""`.keras` save/load and config round trips give identical logits."""

import keras
import numpy as np

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from tests.conftest import TINY_BACKBONE_CONFIG, random_token_ids, randomize_weights


def make_inputs():
    token_ids = random_token_ids(2, 9, TINY_BACKBONE_CONFIG["vocabulary_size"], seed=4)
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def test_keras_file_round_trip(tmp_path):
    causal_lm = randomize_weights(
        Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    )
    expected = causal_lm.predict(make_inputs(), verbose=0)
    path = str(tmp_path / "gemma2.keras")
    causal_lm.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, Gemma2CausalLM)
    np.testing.assert_array_equal(restored.predict(make_inputs(), verbose=0), expected)


def test_backbone_config_round_trip():
    backbone = Gemma2Backbone(**TINY_BACKBONE_CONFIG, dtype="bfloat16")
    config = backbone.get_config()
    for key, value in TINY_BACKBONE_CONFIG.items():
        assert config[key] == value, key
    clone = Gemma2Backbone.from_config(config)
    assert clone.get_config() == config
    assert clone.dtype_policy.compute_dtype == "bfloat16"


def test_causal_lm_config_round_trip():
    causal_lm = randomize_weights(
        Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    )
    clone = Gemma2CausalLM.from_config(causal_lm.get_config())
    clone.set_weights(causal_lm.get_weights())
    np.testing.assert_array_equal(
        clone.predict(make_inputs(), verbose=0),
        causal_lm.predict(make_inputs(), verbose=0),
    )
