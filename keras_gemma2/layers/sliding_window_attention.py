"""Gemma 2 attention: grouped-query, soft-capped, local (sliding) or global."""

import functools

import keras
from keras import ops

from keras_gemma2.layers import loop_matrices
from keras_gemma2.layers.attention_dispatch import (
    attention,
    validate_attention_implementation,
)
from keras_gemma2.layers.attention_masks import attention_mask
from keras_gemma2.layers.cached_attention import (
    cached_attention,
    cached_attention_step,
)
from keras_gemma2.layers.gemma2_math import rope_rotate
from keras_gemma2.layers.projection import project
from keras_gemma2.layers.rotary_embedding import rotary_rotation
from keras_gemma2.layers.soft_capping import validate_soft_cap
from keras_gemma2.layers.validation import positive_int, positive_number, unit_rate


@keras.saving.register_keras_serializable(package="keras_gemma2")
class SlidingWindowAttention(keras.layers.Layer):
    """Grouped-query self-attention with Gemma 2's scaling, soft-cap and window.

    Queries are rotated (RoPE) and scaled by `query_pre_attn_scalar ** -0.5`;
    the logits `q . k` are soft-capped with `cap * tanh(logits / cap)`, then
    masked (causal, optional sliding window, optional key padding) and
    normalised with a float32 softmax. Each of the `num_key_value_heads`
    key/value heads serves `num_query_heads // num_key_value_heads`
    consecutive query heads.

    Args:
        num_query_heads: int. Number of query heads.
        num_key_value_heads: int. Number of key/value heads; divides
            `num_query_heads`.
        head_dim: int. Width of one head (even, for RoPE).
        query_pre_attn_scalar: float. Queries are multiplied by
            `query_pre_attn_scalar ** -0.5`. Defaults to `head_dim`.
        attention_logit_soft_cap: float or `None`. Defaults to `50.0`.
        sliding_window_size: int or `None`. A query at position `i` sees keys
            `j` with `i - sliding_window_size < j <= i`. `None` means global
            (causal) attention. Defaults to `None`.
        rope_max_wavelength: float. RoPE theta. Defaults to `10000.0`.
        dropout: float. Dropout rate on the attention probabilities during
            training. Defaults to `0.0`.
        kernel_initializer: initializer for the projections. Defaults to
            `"glorot_uniform"`.
        attention_implementation: string. How the attention core is computed:
            `"reference"` (masked full `[T, S]` logits), `"blocked"` (query
            blocks that read only the keys their window reaches: `O(T *
            window)` for local layers; on global layers each block reads
            the keys up to its end, half the logits), `"flex"` (PyTorch
            `flex_attention`), `"fused"` (`keras.ops.dot_product_attention`;
            with a soft cap only JAX on TPU) or `"auto"`, the fastest exact
            one for the backend. All give the reference's result. A fast
            path that does not apply (a global layer of unknown length for
            `"blocked"`, a cached decode step, an unsupported backend) uses
            the portable one. See
            `keras_gemma2.layers.attention_dispatch`. Defaults to `"auto"`.
        remat: bool. In training (without dropout), rematerialize each query
            block of a global layer's causal blocked kernel, so the backward
            pass holds one block's logits at a time, not the whole triangle.
            `Gemma2DecoderBlock(remat=True)` sets it. Defaults to `False`.

    Call arguments:
        hidden_states: float tensor `[batch, T, hidden_dim]`.
        padding_mask: optional tensor `[batch, S]`, 1 for real tokens and 0
            for padding, over the keys (`S = T` without a cache, the cache
            length with one).
        cache: optional pair `(key_cache, value_cache)` of float tensors
            `[batch, num_key_value_heads, S, head_dim]` (heads before slots:
            see `cached_attention`). It is a ring buffer: position `p` is
            stored in slot `p % S`, so `S` may be the full sequence length (a
            linear cache) or, for a local layer, just `sliding_window_size`.
            A call with several tokens must not wrap around the end of the
            ring.
        cache_update_index: int or int scalar tensor. With a cache: the
            position of the first of the `T` new tokens; their keys and
            values are written there. Without a cache: the position of the
            first token (for RoPE). Defaults to `0`.
        training: bool. Enables dropout.

    Returns:
        `[batch, T, hidden_dim]` outputs, or `(outputs, (key_cache,
        value_cache))` when a cache is passed.

    Example:

    >>> import numpy as np
    >>> layer = SlidingWindowAttention(
    ...     num_query_heads=4, num_key_value_heads=2, head_dim=8,
    ...     sliding_window_size=3)
    >>> tuple(layer(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar=None,
        attention_logit_soft_cap=50.0,
        sliding_window_size=None,
        rope_max_wavelength=10000.0,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        attention_implementation="auto",
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(remat, bool):
            raise TypeError(
                "Received an invalid value for `remat`, expected a bool. "
                f"Received: remat={remat!r}"
            )
        self.remat = remat
        self.attention_implementation = validate_attention_implementation(
            attention_implementation
        )
        self.num_query_heads = positive_int(num_query_heads, "num_query_heads")
        self.num_key_value_heads = positive_int(
            num_key_value_heads, "num_key_value_heads"
        )
        if self.num_query_heads % self.num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads`. "
                f"Received: num_query_heads={num_query_heads}, "
                f"num_key_value_heads={num_key_value_heads}"
            )
        self.head_dim = positive_int(head_dim, "head_dim")
        if self.head_dim % 2:
            raise ValueError(
                "Received an invalid value for `head_dim`, expected an even "
                f"integer (RoPE rotates pairs). Received: head_dim={head_dim}"
            )
        if query_pre_attn_scalar is None:
            query_pre_attn_scalar = self.head_dim
        self.query_pre_attn_scalar = positive_number(
            query_pre_attn_scalar, "query_pre_attn_scalar"
        )
        self.attention_logit_soft_cap = validate_soft_cap(
            attention_logit_soft_cap, "attention_logit_soft_cap"
        )
        if sliding_window_size is not None:
            sliding_window_size = positive_int(
                sliding_window_size, "sliding_window_size"
            )
        self.sliding_window_size = sliding_window_size
        self.rope_max_wavelength = positive_number(
            rope_max_wavelength, "rope_max_wavelength"
        )
        self.dropout = unit_rate(dropout, "dropout")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.groups = self.num_query_heads // self.num_key_value_heads

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        heads, kv_heads, head_dim = (
            self.num_query_heads,
            self.num_key_value_heads,
            self.head_dim,
        )

        def projection(name, equation, output_shape):
            return keras.layers.EinsumDense(
                equation,
                output_shape=output_shape,
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name=name,
            )

        # Names "query" and "value" are the ones KerasHub's enable_lora targets.
        self.query_dense = projection("query", "btd,dnh->btnh", (None, heads, head_dim))
        self.query_dense.build(input_shape)
        self.key_dense = projection("key", "bsd,dkh->bskh", (None, kv_heads, head_dim))
        self.key_dense.build(input_shape)
        self.value_dense = projection(
            "value", "bsd,dkh->bskh", (None, kv_heads, head_dim)
        )
        self.value_dense.build(input_shape)
        # `a` indexes the query heads: jnp.einsum orders contracted axes by
        # label, and with `n` (after `h`) it transposed the kernel at every
        # call, a full copy per decode step under XLA.
        self.output_dense = projection(
            "attention_output", "btah,ahd->btd", (None, hidden_dim)
        )
        self.output_dense.build((None, None, heads, head_dim))
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.built = True

    def call(
        self,
        hidden_states,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        training=None,
    ):
        length = ops.shape(hidden_states)[1]
        query_positions = ops.arange(length, dtype="int32") + ops.cast(
            cache_update_index, "int32"
        )

        carried = loop_matrices.lookup(self)  # set inside a decode loop
        query, key, value = self._project_qkv(hidden_states, carried)
        # One rotation for queries and keys: the angles are computed once.
        rotation = rotary_rotation(
            query_positions, self.head_dim, self.rope_max_wavelength, query.dtype
        )
        query, key = rope_rotate(query, rotation), rope_rotate(key, rotation)
        query = query * ops.cast(self.query_pre_attn_scalar**-0.5, query.dtype)

        dropout = None
        if training and self.dropout > 0:
            dropout = functools.partial(self.dropout_layer, training=training)
        fresh = cache is None
        if cache is not None:
            # The cache is a ring of S slots: position p lives in slot p % S.
            # With S >= every position this is a plain linear cache; with
            # S = sliding_window_size it holds exactly a local layer's window.
            # A multi-token update must not wrap (prefill starts at slot 0).
            key_cache, value_cache = cache  # [B, K, S, H] each
            previous_cache = cache
            cache_length = ops.shape(key_cache)[2]
            start_position = ops.cast(cache_update_index, "int32")
            start = [0, 0, ops.mod(start_position, cache_length), 0]
            key_cache = ops.slice_update(
                key_cache,
                start,
                ops.cast(ops.transpose(key, (0, 2, 1, 3)), key_cache.dtype),
            )
            value_cache = ops.slice_update(
                value_cache,
                start,
                ops.cast(ops.transpose(value, (0, 2, 1, 3)), value_cache.dtype),
            )
            cache = (key_cache, value_cache)
            # A prefill (T tokens written from 0 into T slots) leaves exactly
            # the new tokens in the cache: plain self-attention, fast paths on.
            fresh = _is_fresh_prefill(cache_update_index, key_cache, length)
        if fresh:
            attended = attention(
                query,
                key,
                value,
                padding_mask=padding_mask,
                sliding_window_size=self.sliding_window_size,
                soft_cap=self.attention_logit_soft_cap,
                implementation=self.attention_implementation,
                dropout=dropout,
                remat=self.remat and bool(training),
            )  # [B, T, N, H]
        else:
            last_position = start_position + length - 1
            slots = ops.arange(cache_length, dtype="int32")
            # Position held by each slot: the latest one <= last_position that
            # maps there; negative means the slot was never written.
            key_positions = last_position - ops.mod(last_position - slots, cache_length)
            mask = attention_mask(
                query_positions, key_positions, self.sliding_window_size, padding_mask
            )  # [B or 1, T, S]
            cache_dtype = keras.backend.standardize_dtype(key_cache.dtype)
            float32_cache = cache_dtype == "float32"
            if hidden_states.shape[1] == 1 and float32_cache:
                # A decode step reads the caches before its own write (see
                # `cached_attention_step`): XLA then writes them in place.
                # Float32 caches only: with bfloat16 caches XLA (CPU)
                # converts each cache to float32 for the products either
                # way, and this form measured 2-3 ms per token slower there
                # (jax 0.10, 2048-token context).
                attended = cached_attention_step(
                    query,
                    *previous_cache,
                    key,
                    value,
                    mask,
                    start[2],
                    self.attention_logit_soft_cap,
                )
            else:
                attended = cached_attention(
                    query, key_cache, value_cache, mask, self.attention_logit_soft_cap
                )  # [B, T, N, H]
        if carried is None:
            outputs = project(self.output_dense, attended)  # [B, T, D]
        else:
            outputs = ops.reshape(
                loop_matrices.product(attended, carried["output"], axes=2),
                ops.shape(hidden_states),
            )
        if cache is not None:
            return outputs, cache
        return outputs

    def _project_qkv(self, hidden_states, carried):
        """Query `[B, T, N, H]`, key and value `[B, T, K, H]`.

        Through the layers' kernels, or through the `carried` matrices of a
        decode loop (`loop_matrices`).
        """
        if carried is None:
            return (
                project(self.query_dense, hidden_states),
                project(self.key_dense, hidden_states),
                project(self.value_dense, hidden_states),
            )
        batch, length = ops.shape(hidden_states)[0], ops.shape(hidden_states)[1]
        heads, kv_heads = self.num_query_heads, self.num_key_value_heads
        if "qkv" in carried:
            fused = loop_matrices.product(hidden_states, carried["qkv"])
            width = self.head_dim
            split = [heads * width, (heads + kv_heads) * width]
            parts = ops.split(fused, split, axis=-1)
        else:
            parts = [
                loop_matrices.product(hidden_states, carried[name])
                for name in ("query", "key", "value")
            ]
        return tuple(
            ops.reshape(part, (batch, length, count, self.head_dim))
            for part, count in zip(parts, (heads, kv_heads, kv_heads), strict=True)
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "sliding_window_size": self.sliding_window_size,
            "rope_max_wavelength": self.rope_max_wavelength,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "attention_implementation": self.attention_implementation,
            "remat": self.remat,
        }


def _is_fresh_prefill(cache_update_index, cache, length):
    """Whether `length` tokens written at slot 0 fill the whole cache.

    Decided on static values only: the Python int 0 as the index and equal
    static lengths. Anything traced keeps the general cached path.
    """
    cache_length = cache.shape[2]
    return (
        isinstance(cache_update_index, int)
        and not isinstance(cache_update_index, bool)
        and cache_update_index == 0
        and isinstance(length, int)
        and isinstance(cache_length, int)
        and cache_length == length
    )
