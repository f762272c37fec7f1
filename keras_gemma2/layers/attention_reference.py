"""Masked full attention: the definition every other attention kernel equals."""

from keras import ops

from keras_gemma2.layers.attention_probabilities import masked_probabilities


def reference_attention(query, key, value, mask, soft_cap=None, dropout=None):
    """Grouped-query attention over full `[T, S]` logits under a boolean mask.

    Each of the `K` key/value heads serves `N / K` consecutive query heads.

    Args:
        query: `[B, T, N, H]` (scaled).
        key, value: `[B, S, K, H]`.
        mask: bool `[B or 1, T, S]`, true where a query may see a key.
        soft_cap: float or `None`.
        dropout: optional callable on the probabilities.

    Returns:
        `[B, T, N, H]`.
    """
    batch_size = ops.shape(query)[0]
    length = ops.shape(query)[1]
    num_heads, head_dim = query.shape[2], query.shape[3]
    kv_heads = key.shape[2]
    query = ops.reshape(
        query, (batch_size, length, kv_heads, num_heads // kv_heads, head_dim)
    )  # [B, T, K, G, H]
    logits = ops.einsum("btkgh,bskh->bkgts", query, key)  # [B, K, G, T, S]
    probabilities = masked_probabilities(
        logits, mask[:, None, None], soft_cap, value.dtype, dropout
    )
    attended = ops.einsum("bkgts,bskh->btkgh", probabilities, value)
    return ops.reshape(attended, (batch_size, length, num_heads, head_dim))
