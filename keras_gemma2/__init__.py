"""Gemma 2 in Keras 3, on JAX, TensorFlow and PyTorch."""

from keras_gemma2.layers import (
    Gemma2DecoderBlock,
    Gemma2FeedForward,
    Gemma2RMSNormalization,
    SlidingWindowAttention,
    SoftCap,
    SoftCappedDense,
    soft_cap,
)
from keras_gemma2.models import (
    PRESET_CONFIGS,
    Gemma2Backbone,
    Gemma2CausalLM,
    Gemma2CausalLMPreprocessor,
    Gemma2Tokenizer,
    format_chat,
    format_chat_segments,
    get_preset_config,
)

__version__ = "0.1.0"

__all__ = [
    "PRESET_CONFIGS",
    "Gemma2Backbone",
    "Gemma2CausalLM",
    "Gemma2CausalLMPreprocessor",
    "Gemma2DecoderBlock",
    "Gemma2FeedForward",
    "Gemma2RMSNormalization",
    "Gemma2Tokenizer",
    "SlidingWindowAttention",
    "SoftCap",
    "SoftCappedDense",
    "format_chat",
    "format_chat_segments",
    "get_preset_config",
    "soft_cap",
]
