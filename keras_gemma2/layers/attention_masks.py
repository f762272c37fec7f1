"""Attention masks as pure functions. `True` means "may attend"."""

from keras import ops


def causal_mask(query_positions, key_positions):
    """Mask `[Tq, Tk]`: query at position i sees keys at positions 0 <= j <= i.

    Args:
        query_positions: int tensor `[Tq]`.
        key_positions: int tensor `[Tk]`. Negative positions mark empty
            cache slots and are never visible.
    """
    key_positions = ops.expand_dims(key_positions, 0)
    visible = ops.expand_dims(query_positions, -1) >= key_positions
    return ops.logical_and(visible, key_positions >= 0)


def sliding_window_mask(query_positions, key_positions, window_size):
    """Mask `[Tq, Tk]`: keys j with `i - window_size < j <= i`.

    A query sees itself and the `window_size - 1` tokens before it.
    `window_size=None` gives the plain causal mask.
    """
    mask = causal_mask(query_positions, key_positions)
    if window_size is None:
        return mask
    distance = ops.expand_dims(query_positions, -1) - ops.expand_dims(key_positions, 0)
    return ops.logical_and(mask, distance < window_size)


def attention_mask(query_positions, key_positions, window_size=None, padding_mask=None):
    """Combined mask `[B or 1, Tq, Tk]` of window/causal and key padding.

    Args:
        query_positions: int tensor `[Tq]`.
        key_positions: int tensor `[Tk]`.
        window_size: int or `None` (global attention).
        padding_mask: optional tensor `[B, Tk]`, nonzero/True for real tokens.
    """
    mask = sliding_window_mask(query_positions, key_positions, window_size)[None]
    if padding_mask is not None:
        keys_valid = ops.cast(padding_mask, "bool")[:, None, :]  # [B, 1, Tk]
        mask = ops.logical_and(mask, keys_valid)
    return mask


def visible_key_counts(padding_mask, window_size=None):
    """Int `[B, T]`: how many keys each query of a self-attention sees.

    Query `i` sees the keys `j` with `i - window_size < j <= i` that are real
    tokens (`padding_mask[j]` nonzero). A count of 0 marks a row with no
    visible key, which the masked softmax turns into a uniform average. Runs
    in `O(T)` (a running sum), never building the `[T, T]` mask.

    Args:
        padding_mask: tensor `[B, T]`, nonzero/True for real tokens.
        window_size: int or `None` (causal attention over all earlier keys).
    """
    real = ops.cast(ops.cast(padding_mask, "bool"), "int32")
    seen = ops.cumsum(real, axis=1)  # [B, T]: real keys at positions <= i
    if window_size is None:
        return seen
    length = ops.shape(seen)[1]
    # Real keys at positions <= i - window_size: the running sum shifted right.
    before_window = ops.pad(seen, [[0, 0], [window_size, 0]])[:, :length]
    return seen - before_window
