"""Causal (global-layer) attention in query blocks: the logit triangle only."""

from keras import ops

from keras_gemma2.layers.attention_masks import attention_mask
from keras_gemma2.layers.attention_policy import GLOBAL_BLOCK_SIZE
from keras_gemma2.layers.attention_reference import reference_attention


def causal_blocked_attention(
    query,
    key,
    value,
    padding_mask=None,
    soft_cap=None,
    dropout=None,
    block_size=None,
):
    """Causal (global-layer) self-attention in query blocks: half the logits.

    Query block `b` (positions `[b * block, (b + 1) * block)`) attends to the
    keys `[0, (b + 1) * block)`, so the blocks together compute the causal
    triangle, `T * (T + block) / 2` logits instead of `T^2`, and at most
    `block * T` of them exist at once instead of `T^2`. Each block is the
    reference computation on its key prefix (every key a query may see is in
    it), so its softmax is exact. Blocks have different shapes: the length
    must be static (the loop is unrolled). Rows with no visible key are fixed
    by the caller.

    Args:
        query: `[B, T, N, H]` (scaled).
        key, value: `[B, T, K, H]`, the same positions as the queries.
        padding_mask: optional `[B, T]`.
        soft_cap: float or `None`.
        dropout: optional callable on the probabilities.
        block_size: optional int; defaults to `GLOBAL_BLOCK_SIZE`.

    Returns:
        `[B, T, N, H]`.
    """
    length = query.shape[1]
    if not isinstance(length, int):
        raise ValueError(
            "The causal blocked kernel needs a static sequence length. "
            f"Received: query of shape {tuple(query.shape)}"
        )
    block = block_size or GLOBAL_BLOCK_SIZE
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
        outputs.append(
            reference_attention(
                query[:, start:end],
                key[:, :end],
                value[:, :end],
                mask,
                soft_cap,
                dropout,
            )
        )
    return ops.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]
