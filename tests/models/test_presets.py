"""Preset configs: parameter counts of the released sizes, without allocating them."""

import keras
import pytest

from keras_gemma2 import PRESET_CONFIGS, Gemma2Backbone, get_preset_config
from keras_gemma2.checkpoints.unallocated import forget_pending, pending_variables

# Parameter counts of the released checkpoints (tied embedding counted once),
# from ../shared/GEMMA2.md.
EXPECTED = {"2b": 2_614_341_888, "9b": 9_241_705_984, "27b": 27_227_128_320}


@pytest.mark.parametrize("name", sorted(PRESET_CONFIGS))
def test_parameter_count(name):
    # Inside a StatelessScope Keras records variable shapes and defers their
    # initialisation; `initialize_variables=False` keeps it deferred on exit,
    # so even the 27B costs no memory here.
    with keras.StatelessScope(initialize_variables=False):
        backbone = Gemma2Backbone(**get_preset_config(name))
        count = backbone.count_params()
    # Keras keeps deferred variables in a global list and allocates them all
    # when a later model initialises its own: drop these (up to 27B values).
    forget_pending(backbone.weights)
    assert not set(map(id, pending_variables())) & set(map(id, backbone.weights))
    size = name.split("_")[-2]
    assert count == EXPECTED[size]


def test_27b_scales_queries_by_hidden_over_heads():
    config = get_preset_config("gemma2_27b_en")
    assert (
        config["query_pre_attn_scalar"]
        == config["hidden_dim"] / config["num_query_heads"]
    )
    assert config["query_pre_attn_scalar"] != config["head_dim"]


def test_unknown_preset_name():
    with pytest.raises(ValueError, match="gemma2_2b_en"):
        get_preset_config("gemma2_3b_en")
