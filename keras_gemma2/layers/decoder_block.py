"""One Gemma 2 transformer block."""

import keras

from keras_gemma2.layers.feed_forward import Gemma2FeedForward
from keras_gemma2.layers.rms_normalization import Gemma2RMSNormalization
from keras_gemma2.layers.sliding_window_attention import SlidingWindowAttention


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2DecoderBlock(keras.layers.Layer):
    """Attention and GeGLU feed-forward, each wrapped in pre- and post-norms.

    ```
    x = x + post_attention_norm(attention(pre_attention_norm(x)))
    x = x + post_ffw_norm(ffw(pre_ffw_norm(x)))
    ```

    Args:
        intermediate_dim: int. Width of each GeGLU branch.
        num_query_heads: int. Query heads.
        num_key_value_heads: int. Key/value heads.
        head_dim: int. Width of one head.
        query_pre_attn_scalar: float. Queries are scaled by its `** -0.5`.
        attention_logit_soft_cap: float or `None`. Cap on attention logits.
        sliding_window_size: int or `None`. Local window; `None` is global.
        layer_norm_epsilon: float. Epsilon of the four RMS norms.
            Defaults to `1e-6`.
        rope_max_wavelength: float. RoPE theta. Defaults to `10000.0`.
        dropout: float. Attention-probability dropout. Defaults to `0.0`.
        kernel_initializer: initializer of all projections.
        attention_implementation: string. How attention is computed; see
            `SlidingWindowAttention`. Defaults to `"auto"`.
        remat: bool. Rematerialize the block in training: the backward pass
            recomputes the block's activations from its input (`keras.remat`)
            instead of keeping them, so a training step holds one
            `[batch, T, hidden_dim]` tensor per block plus one block's
            activations at a time. Same results, roughly one more forward
            pass of compute. Cached calls (generation) never rematerialize.
            Defaults to `False`.

    Call arguments:
        hidden_states: `[batch, T, hidden_dim]`.
        padding_mask, cache, cache_update_index, training: as in
            `SlidingWindowAttention`.

    Example:

    >>> import numpy as np
    >>> block = Gemma2DecoderBlock(
    ...     intermediate_dim=32, num_query_heads=4, num_key_value_heads=2,
    ...     head_dim=8, query_pre_attn_scalar=8, attention_logit_soft_cap=50.0,
    ...     sliding_window_size=4)
    >>> tuple(block(np.ones((1, 6, 16), "float32")).shape)
    (1, 6, 16)
    """

    def __init__(
        self,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar,
        attention_logit_soft_cap,
        sliding_window_size,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000.0,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        attention_implementation="auto",
        remat=False,
        **kwargs,
    ):
        if not isinstance(remat, bool):
            raise TypeError(
                "Received an invalid value for `remat`, expected a bool. "
                f"Received: remat={remat!r}"
            )
        super().__init__(**kwargs)
        self.remat = remat
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        def norm(name):
            return Gemma2RMSNormalization(
                epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name=name
            )

        self.pre_attention_norm = norm("pre_attention_norm")
        self.attention = SlidingWindowAttention(
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=query_pre_attn_scalar,
            attention_logit_soft_cap=attention_logit_soft_cap,
            sliding_window_size=sliding_window_size,
            rope_max_wavelength=rope_max_wavelength,
            dropout=dropout,
            kernel_initializer=self.kernel_initializer,
            attention_implementation=attention_implementation,
            remat=remat,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.post_attention_norm = norm("post_attention_norm")
        self.pre_ffw_norm = norm("pre_ffw_norm")
        self.ffw = Gemma2FeedForward(
            intermediate_dim,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="ffw",
        )
        self.post_ffw_norm = norm("post_ffw_norm")

    def build(self, input_shape):
        for layer in (
            self.pre_attention_norm,
            self.attention,
            self.post_attention_norm,
            self.pre_ffw_norm,
            self.ffw,
            self.post_ffw_norm,
        ):
            layer.build(input_shape)
        self.built = True

    def call(
        self,
        hidden_states,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        training=None,
    ):
        if self.remat and cache is None:
            # Only the hidden states cross the `keras.remat` boundary: jax
            # traces every argument (`training` must stay a Python bool) and
            # tensorflow would watch the integer mask.
            def forward(hidden_states):
                return self._forward(
                    hidden_states, padding_mask=padding_mask, training=training
                )

            return keras.remat(forward)(hidden_states)
        return self._forward(
            hidden_states,
            padding_mask=padding_mask,
            cache=cache,
            cache_update_index=cache_update_index,
            training=training,
        )

    def _forward(
        self,
        hidden_states,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        training=None,
    ):
        attended = self.attention(
            self.pre_attention_norm(hidden_states),
            padding_mask=padding_mask,
            cache=cache,
            cache_update_index=cache_update_index,
            training=training,
        )
        if cache is not None:
            attended, cache = attended
        x = hidden_states + self.post_attention_norm(attended)
        x = x + self.post_ffw_norm(self.ffw(self.pre_ffw_norm(x)))
        if cache is not None:
            return x, cache
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        attention = self.attention
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "num_query_heads": attention.num_query_heads,
            "num_key_value_heads": attention.num_key_value_heads,
            "head_dim": attention.head_dim,
            "query_pre_attn_scalar": attention.query_pre_attn_scalar,
            "attention_logit_soft_cap": attention.attention_logit_soft_cap,
            "sliding_window_size": attention.sliding_window_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "rope_max_wavelength": attention.rope_max_wavelength,
            "dropout": attention.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "attention_implementation": attention.attention_implementation,
            "remat": self.remat,
        }
