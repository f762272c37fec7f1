"""Attention of new queries over a KV cache laid out `[batch, kv_heads, slots, H]`.

Heads before slots is the layout whose attention products need no copy of
the cache: both einsums are batched over `(batch, kv_head)` and contract the
cache's own last axes. With `[batch, slots, kv_heads, H]`, XLA on CPU
transposed every layer's whole cache at every decode step. A single new
query (`T == 1`, every decode step) also drops the time axis, so the result
is already in the `[batch, heads, H]` order the output projection reads (with
a time axis XLA folded the transpose into that projection and copied its
kernel at every step).

A decode step (`cached_attention_step`) reads the caches as they were before
the step wrote its own key and value, and takes that key and value
directly. Inside a compiled decode loop the cache write then has no reader
but the next step, so XLA (CPU) can update the loop's caches in place: when
the attention read the freshly written cache, XLA duplicated the write into
both consumers and copied every cache several times per step (measured on
jax 0.10: 40 copies of the eight `[1, 4, 2113, 64]` caches per token, 3 of
15 ms per token at a 2048-token context).
"""

from keras import ops

# The reference's soft cap, mask and float32 softmax, shared so both agree.
from keras_gemma2.layers.attention_probabilities import masked_probabilities
from keras_gemma2.layers.last_axis_product import last_axis_product


def cached_attention(query, key_cache, value_cache, mask, soft_cap=None):
    """Grouped-query attention of `query` over cached keys and values.

    Args:
        query: `[B, T, N, H]`, rotated and scaled.
        key_cache, value_cache: `[B, K, S, H]`, `K` dividing `N`.
        mask: bool `[B or 1, T, S]`, true where a query may see a slot.
        soft_cap: float or `None`, the attention-logit cap.

    Returns:
        `[B, T, N, H]`, as `attention_reference.reference_attention` computes
        for the same keys in `[B, S, K, H]` layout.
    """
    batch_size, length = ops.shape(query)[0], query.shape[1]
    num_heads, head_dim = query.shape[2], query.shape[3]
    kv_heads = key_cache.shape[1]
    groups = num_heads // kv_heads
    if length == 1:
        query = ops.reshape(query, (batch_size, kv_heads, groups, head_dim))
        logits = last_axis_product("bkgh,bksh->bkgs", query, key_cache)  # [B,K,G,S]
        probabilities = masked_probabilities(
            logits, mask[:, None], soft_cap, value_cache.dtype, None
        )
        attended = ops.einsum("bkgs,bksh->bkgh", probabilities, value_cache)
        return ops.reshape(attended, (batch_size, 1, num_heads, head_dim))
    length = ops.shape(query)[1]
    query = ops.reshape(query, (batch_size, length, kv_heads, groups, head_dim))
    logits = ops.einsum("btkgh,bksh->bkgts", query, key_cache)  # [B, K, G, T, S]
    probabilities = masked_probabilities(
        logits, mask[:, None, None], soft_cap, value_cache.dtype, None
    )
    attended = ops.einsum("bkgts,bksh->btkgh", probabilities, value_cache)
    return ops.reshape(attended, (batch_size, length, num_heads, head_dim))


def cached_attention_step(
    query, key_cache, value_cache, key, value, mask, slot, soft_cap=None
):
    """One new query over the caches before its write, plus its own key.

    Equal to `cached_attention(query, written_key_cache, written_value_cache,
    mask, soft_cap)`, where the written caches hold `key` and `value` at
    `slot`; the softmax simply runs over the old slots (the one at `slot`
    masked out) and the new key together.

    Args:
        query: `[B, 1, N, H]`, rotated and scaled.
        key_cache, value_cache: `[B, K, S, H]`, before this step's write.
        key, value: `[B, 1, K, H]`, this step's key (rotated) and value.
        mask: bool `[B or 1, 1, S]`, the mask over the written caches.
        slot: int scalar, where this step's key and value are written.
        soft_cap: float or `None`, the attention-logit cap.

    Returns:
        `[B, 1, N, H]`.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q = rng.normal(size=(1, 1, 4, 8)).astype("float32")
    >>> k, v = rng.normal(size=(2, 1, 1, 2, 8)).astype("float32")
    >>> caches = rng.normal(size=(2, 1, 2, 5, 8)).astype("float32")
    >>> mask = np.array([[[True, True, True, False, False]]])
    >>> written = caches.copy()
    >>> written[0][:, :, 2], written[1][:, :, 2] = k[:, 0], v[:, 0]
    >>> expected = cached_attention(q, written[0], written[1], mask)
    >>> step = cached_attention_step(q, caches[0], caches[1], k, v, mask, 2)
    >>> bool(np.allclose(step, expected, atol=1e-6))
    True
    """
    batch_size = ops.shape(query)[0]
    num_heads, head_dim = query.shape[2], query.shape[3]
    kv_heads, slots = key_cache.shape[1], key_cache.shape[2]
    groups = num_heads // kv_heads
    query = ops.reshape(query, (batch_size, kv_heads, groups, head_dim))
    old_logits = last_axis_product("bkgh,bksh->bkgs", query, key_cache)  # [B,K,G,S]
    # The new key's logit, accumulated in float32 like the softmax after it.
    key = ops.cast(ops.cast(key, key_cache.dtype), "float32")  # as cached
    key = ops.reshape(key, (batch_size, kv_heads, 1, head_dim))
    new_logit = ops.sum(ops.cast(query, "float32") * key, axis=-1, keepdims=True)
    logits = ops.concatenate([ops.cast(old_logits, "float32"), new_logit], axis=-1)
    positions = ops.arange(slots, dtype="int32")
    old_mask = ops.logical_and(mask, ops.not_equal(positions, slot))
    new_visible = ops.take(mask, slot, axis=-1)[..., None]  # [B or 1, 1, 1]
    mask = ops.concatenate([old_mask, new_visible], axis=-1)  # [B or 1, 1, S + 1]
    probabilities = masked_probabilities(
        logits, mask[:, None], soft_cap, value_cache.dtype, None
    )  # [B, K, G, S + 1]
    attended = ops.einsum(
        "bkgs,bksh->bkgh", probabilities[..., :slots], value_cache
    ) + probabilities[..., slots:] * ops.reshape(
        ops.cast(value, value_cache.dtype), (batch_size, kv_heads, 1, head_dim)
    )
    return ops.reshape(attended, (batch_size, 1, num_heads, head_dim))
