"""Gemma 2 networks and tasks."""

from keras_gemma2.models.backbone import Gemma2Backbone
from keras_gemma2.models.causal_lm import Gemma2CausalLM
from keras_gemma2.models.presets import PRESET_CONFIGS, get_preset_config

__all__ = ["PRESET_CONFIGS", "Gemma2Backbone", "Gemma2CausalLM", "get_preset_config"]
