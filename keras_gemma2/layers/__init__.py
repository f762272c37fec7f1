"""Backend-agnostic Gemma 2 layers."""

from keras_gemma2.layers.attention_masks import (
    attention_mask,
    causal_mask,
    sliding_window_mask,
    visible_key_counts,
)
from keras_gemma2.layers.decoder_block import Gemma2DecoderBlock
from keras_gemma2.layers.feed_forward import Gemma2FeedForward
from keras_gemma2.layers.rms_normalization import Gemma2RMSNormalization
from keras_gemma2.layers.rotary_embedding import rotary_embedding
from keras_gemma2.layers.sliding_window_attention import SlidingWindowAttention
from keras_gemma2.layers.soft_capping import SoftCap, SoftCappedDense, soft_cap

__all__ = [
    "Gemma2DecoderBlock",
    "Gemma2FeedForward",
    "Gemma2RMSNormalization",
    "SlidingWindowAttention",
    "SoftCap",
    "SoftCappedDense",
    "attention_mask",
    "causal_mask",
    "rotary_embedding",
    "sliding_window_mask",
    "soft_cap",
    "visible_key_counts",
]
