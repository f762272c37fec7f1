"""Sliding-window attention in query blocks: `O(T * window)` logits, not `T^2`."""

from keras import ops

from keras_gemma2.layers.attention_masks import sliding_window_mask
from keras_gemma2.layers.attention_policy import default_block_size
from keras_gemma2.layers.attention_probabilities import masked_probabilities


def _block_geometry(length, sliding_window_size, block_size):
    """`(block, num_blocks, previous_blocks)` for `length` queries.

    `length` may be a Python int or a scalar tensor (dynamic shapes on
    TensorFlow); only a static length shrinks the block to the sequence.
    """
    block = block_size or default_block_size(sliding_window_size)
    static = isinstance(length, int)
    if static:
        block = min(block, length)
    num_blocks = (length + block - 1) // block
    previous = -(-(sliding_window_size - 1) // block)
    if static:
        previous = min(previous, num_blocks - 1)
    return block, num_blocks, previous


def blocked_pays_off(length, sliding_window_size, block_size=None):
    """Whether the blocked kernel computes fewer logits than the reference.

    For a Python int, compares `padded_length * (previous_blocks + 1) *
    block` with `length ** 2`. For a scalar tensor (dynamic length), uses
    `length > (previous_blocks + 2) * block`, which implies it.

    Example:

    >>> blocked_pays_off(40, 16), blocked_pays_off(39, 16)  # 48*32 vs 40**2
    (True, False)
    """
    if isinstance(length, int):
        block, num_blocks, previous = _block_geometry(
            length, sliding_window_size, block_size
        )
        return num_blocks * block * (previous + 1) * block < length * length
    block = block_size or default_block_size(sliding_window_size)
    previous = -(-(sliding_window_size - 1) // block)
    return length > (previous + 2) * block


def blocked_attention(
    query,
    key,
    value,
    padding_mask=None,
    sliding_window_size=None,
    soft_cap=None,
    dropout=None,
    block_size=None,
):
    """Sliding-window self-attention in query blocks: `O(T * window)` logits.

    The `T` queries are padded to `num_blocks * block`. Block `b` covers
    positions `[b * block, (b + 1) * block)` and needs keys from
    `b * block - (window - 1)` on: its own block and the `previous` blocks
    before it (`previous = ceil((window - 1) / block)`). Relative to the
    block, a query at `previous * block + qi` and a key at `si` are as far
    apart in every block, so one static `[block, (previous + 1) * block]`
    window mask serves all blocks; keys before 0, past `T` or padded are
    masked per block. Rows with no visible key are fixed by the caller.

    Args:
        query: `[B, T, N, H]` (scaled).
        key, value: `[B, T, K, H]`, the same positions as the queries.
        padding_mask: optional `[B, T]`.
        sliding_window_size: int, the window.
        soft_cap: float or `None`.
        dropout: optional callable on the probabilities.
        block_size: optional int; see `default_block_size`.

    Returns:
        `[B, T, N, H]`.
    """
    if sliding_window_size is None:
        raise ValueError(
            "The blocked kernel serves sliding-window layers only. Received: "
            "sliding_window_size=None"
        )
    batch_size = ops.shape(query)[0]
    length = query.shape[1]
    if not isinstance(length, int):
        length = ops.shape(query)[1]  # dynamic (TensorFlow graphs)
    num_heads, head_dim = query.shape[2], query.shape[3]
    kv_heads = key.shape[2]
    groups = num_heads // kv_heads
    block, num_blocks, previous = _block_geometry(
        length, sliding_window_size, block_size
    )
    span = (previous + 1) * block  # keys seen by one query block
    tail = num_blocks * block - length

    # Heads lead and each block's queries are contiguous, so both products
    # are plain batched matmuls over (B, K, nb), forward and backward (an
    # einsum over the [B, nb, c, K, G, H] layout was 3x slower in torch's
    # backward).
    query = ops.pad(query, [[0, 0], [0, tail], [0, 0], [0, 0]])
    query = ops.reshape(
        query, (batch_size, num_blocks, block, kv_heads, groups, head_dim)
    )
    query = ops.transpose(query, (0, 3, 1, 4, 2, 5))  # [B, K, nb, G, c, H]
    query = ops.reshape(
        query, (batch_size, kv_heads, num_blocks, groups * block, head_dim)
    )  # [B, K, nb, G*c, H]

    def key_windows(x):
        """`[B, K, T, ...]` -> `[B, K, nb, span, ...]`: each query block's keys."""
        rest = [[0, 0]] * (len(x.shape) - 3)
        x = ops.pad(x, [[0, 0], [0, 0], [previous * block, tail]] + rest)
        x = ops.reshape(
            x,
            (ops.shape(x)[0], x.shape[1], num_blocks + previous, block)
            + tuple(x.shape[3:]),
        )  # [B, K, nb + previous, c, ...]
        parts = [x[:, :, s : s + num_blocks] for s in range(previous + 1)]
        return ops.concatenate(parts, axis=3) if previous else parts[0]

    keys = key_windows(ops.transpose(key, (0, 2, 1, 3)))  # [B, K, nb, span, H]
    values = key_windows(ops.transpose(value, (0, 2, 1, 3)))  # [B, K, nb, span, H]
    if padding_mask is None:
        real = ops.ones((1, 1, length), "int32")
    else:
        real = ops.cast(ops.cast(padding_mask, "bool"), "int32")[:, None]
    keys_real = ops.cast(key_windows(real), "bool")  # [B or 1, 1, nb, span]
    window = sliding_window_mask(
        ops.arange(block, dtype="int32") + previous * block,
        ops.arange(span, dtype="int32"),
        sliding_window_size,
    )  # [c, span]
    window = ops.tile(window, (groups, 1))  # [G*c, span]: rows g*c + qi
    mask = ops.logical_and(window, keys_real[:, :, :, None, :])

    logits = ops.matmul(query, ops.swapaxes(keys, -1, -2))  # [B, K, nb, G*c, span]
    probabilities = masked_probabilities(logits, mask, soft_cap, value.dtype, dropout)
    attended = ops.matmul(probabilities, values)  # [B, K, nb, G*c, H]
    attended = ops.reshape(
        attended, (batch_size, kv_heads, num_blocks, groups, block, head_dim)
    )
    attended = ops.transpose(attended, (0, 2, 4, 1, 3, 5))  # [B, nb, c, K, G, H]
    attended = ops.reshape(
        attended, (batch_size, num_blocks * block, num_heads, head_dim)
    )
    return attended[:, :length]
