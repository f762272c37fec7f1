"""Causal (global-layer) attention in query blocks: the logit triangle only."""

import keras
from keras import ops

from keras_gemma2.layers.attention_masks import attention_mask
from keras_gemma2.layers.attention_policy import GLOBAL_BLOCK_SIZE
from keras_gemma2.layers.attention_probabilities import masked_probabilities


def causal_blocked_attention(
    query,
    key,
    value,
    padding_mask=None,
    soft_cap=None,
    dropout=None,
    block_size=None,
    remat=False,
):
    """Causal (global-layer) self-attention in query blocks: half the logits.

    Query block `b` (positions `[b * block, (b + 1) * block)`) attends to the
    keys `[0, (b + 1) * block)`, so the blocks together compute the causal
    triangle, `T * (T + block) / 2` logits instead of `T^2`, and at most
    `block * T` of them exist at once instead of `T^2`. Each block is the
    reference computation (`attention_reference`: the same soft cap, mask
    and float32 softmax) on its key prefix, in a heads-first layout; every
    key a query may see is in the prefix, so its softmax is exact. Blocks
    have different shapes: the length must be static (the loop is unrolled).
    Rows with no visible key are fixed by the caller.

    Args:
        query: `[B, T, N, H]` (scaled).
        key, value: `[B, T, K, H]`, the same positions as the queries.
        padding_mask: optional `[B, T]`.
        soft_cap: float or `None`.
        dropout: optional callable on the probabilities.
        block_size: optional int; defaults to `GLOBAL_BLOCK_SIZE`.
        remat: bool. Wrap each query block in `keras.remat`, so that a
            backward pass holds one block's `[B, N, block, end]` logits and
            probabilities at a time instead of the whole triangle's (training
            with `Gemma2Backbone(remat=True)`). Needs `dropout=None`: the
            recomputation would draw another dropout mask.

    Returns:
        `[B, T, N, H]`.
    """
    length = query.shape[1]
    if not isinstance(length, int):
        raise ValueError(
            "The causal blocked kernel needs a static sequence length. "
            f"Received: query of shape {tuple(query.shape)}"
        )
    if remat and dropout is not None:
        raise ValueError("`remat=True` needs `dropout=None`.")
    block = block_size or GLOBAL_BLOCK_SIZE
    batch_size = ops.shape(query)[0]
    num_heads, head_dim = query.shape[2], query.shape[3]
    kv_heads = key.shape[2]
    groups = num_heads // kv_heads
    # Heads lead, once for all blocks: each block's queries and keys are then
    # contiguous slices, and both products are plain batched matmuls over
    # (B, K). Slicing the [B, T, N, H] layout block by block made XLA (jax,
    # CPU) transpose every block's keys and logits again: 142 -> 86-97 ms per
    # global layer at 2048 tokens (8 / 4 heads, head_dim 64).
    query = ops.reshape(query, (batch_size, length, kv_heads, groups, head_dim))
    query = ops.transpose(query, (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    key = ops.transpose(key, (0, 2, 1, 3))  # [B, K, T, H]
    value = ops.transpose(value, (0, 2, 1, 3))
    positions = ops.arange(length, dtype="int32")
    outputs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        mask = attention_mask(
            positions[start:end],
            positions[:end],
            None,
            None if padding_mask is None else padding_mask[:, :end],
        )

        def block_attention(query, key, value, mask=mask):
            logits = ops.einsum("bkgth,bksh->bkgts", query, key)
            probabilities = masked_probabilities(
                logits, mask[:, None, None], soft_cap, value.dtype, dropout
            )
            return ops.einsum("bkgts,bksh->bkgth", probabilities, value)

        if remat:
            block_attention = keras.remat(block_attention)
        outputs.append(
            block_attention(
                query[:, :, :, start:end], key[:, :, :end], value[:, :, :end]
            )
        )
    attended = ops.concatenate(outputs, axis=3) if len(outputs) > 1 else outputs[0]
    attended = ops.transpose(attended, (0, 3, 1, 2, 4))  # [B, T, K, G, H]
    return ops.reshape(attended, (batch_size, length, num_heads, head_dim))
