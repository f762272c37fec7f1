"""Gemma 2 networks and tasks."""

from keras_gemma2.models.backbone import Gemma2Backbone
from keras_gemma2.models.causal_lm import Gemma2CausalLM
from keras_gemma2.models.chat_template import format_chat
from keras_gemma2.models.preprocessor import Gemma2CausalLMPreprocessor
from keras_gemma2.models.presets import PRESET_CONFIGS, get_preset_config
from keras_gemma2.models.sft_rows import format_chat_segments
from keras_gemma2.models.tokenizer import Gemma2Tokenizer

__all__ = [
    "PRESET_CONFIGS",
    "Gemma2Backbone",
    "Gemma2CausalLM",
    "Gemma2CausalLMPreprocessor",
    "Gemma2Tokenizer",
    "format_chat",
    "format_chat_segments",
    "get_preset_config",
]
