"""Attention of new queries over a KV cache laid out `[batch, kv_heads, slots, H]`.

Heads before slots is the layout whose attention products need no copy of
the cache: both einsums are batched over `(batch, kv_head)` and contract the
cache's own last axes. With `[batch, slots, kv_heads, H]`, XLA on CPU
transposed every layer's whole cache at every decode step. A single new
query (`T == 1`, every decode step) also drops the time axis, so the result
is already in the `[batch, heads, H]` order the output projection reads (with
a time axis XLA folded the transpose into that projection and copied its
kernel at every step).
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
