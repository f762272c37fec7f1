"""KV cache layout: window-sized rings for local layers, linear for global.

A cache is a tuple with one `(key_cache, value_cache)` pair per layer, each
`[batch, kv_heads, slots, head_dim]` (heads before slots, so attention reads
it in place; see `keras_gemma2.layers.cached_attention`). Separate arrays per
layer let a compiled decode loop update each in place, where one stacked
array was sliced and re-stacked at every step.

- Local layers: `slots = min(sliding_window_size, max_length)`, position `p`
  in slot `p % slots`, so a local layer never stores or reads more than its
  window.
- Global layers: position `p` in slot `p`. Decoding reads only a prefix of
  the cache (see `decode.py`).
"""

from keras import ops

from keras_gemma2.models.architecture import layer_is_local


def layer_counts(backbone):
    """`(num_local_layers, num_global_layers)` of `backbone`."""
    local = sum(layer_is_local(i) for i in range(backbone.num_layers))
    return local, backbone.num_layers - local


def empty_cache(backbone, batch_size, local_slots, global_slots, dtype=None):
    """Zero cache with the given slot counts for local and global layers."""
    dtype = dtype or backbone.compute_dtype
    caches = []
    for index in range(backbone.num_layers):
        slots = local_slots if layer_is_local(index) else global_slots
        shape = (batch_size, backbone.num_key_value_heads, slots, backbone.head_dim)
        caches.append((ops.zeros(shape, dtype=dtype), ops.zeros(shape, dtype=dtype)))
    return tuple(caches)


def ring_size(backbone, max_length):
    """Slots of a local layer's ring for sequences of `max_length`."""
    return min(backbone.sliding_window_size, max_length)


def cache_bytes(backbone, batch_size, max_length, dtype_bytes=4):
    """Bytes of a generation cache (rings for local layers) and of a full one."""
    num_local, num_global = layer_counts(backbone)
    per_slot = 2 * backbone.num_key_value_heads * backbone.head_dim * dtype_bytes
    ours = num_local * ring_size(backbone, max_length) + num_global * max_length
    full = backbone.num_layers * max_length
    return batch_size * per_slot * ours, batch_size * per_slot * full


def ring_positions(last_position, slots, ring):
    """Position each ring slot holds once `last_position` is written.

    Slot `s` holds the latest position `<= last_position` congruent to `s`
    modulo `ring`; a negative result means the slot was never written.
    Plain operators, so it serves every backend's tensors and Python ints.

    Example:

    >>> import numpy as np
    >>> ring_positions(5, np.arange(4), 4).tolist()
    [4, 5, 2, 3]
    """
    return last_position - (last_position - slots) % ring


def ring_from_linear(linear_cache, last_position, ring):
    """Rebuild a ring of `ring` slots from one linear cache array.

    Slot `s` receives the latest position `<= last_position` congruent to `s`
    modulo `ring`; slots that no such position reaches get position 0 (they
    are masked as empty when attended to).

    Args:
        linear_cache: `[batch, kv_heads, length, head_dim]`, position `p` in
            slot `p`.
        last_position: int scalar tensor, the newest position to keep.
        ring: int, slots of the result.
    """
    positions = ring_positions(last_position, ops.arange(ring, dtype="int32"), ring)
    length = ops.shape(linear_cache)[2]
    positions = ops.clip(positions, 0, length - 1)
    return ops.take(linear_cache, positions, axis=2)


def decode_cache(backbone, prefilled, last_position, max_length):
    """The decode layout of a cache that a prefill filled linearly.

    Local layers become rings of `ring_size(backbone, max_length)` slots
    holding the window that ends at `last_position`; global layers are
    padded with empty slots to `max_length`.

    Args:
        backbone: the `Gemma2Backbone` the cache belongs to.
        prefilled: one `(key, value)` pair per layer, every array holding
            positions `0 .. L - 1` in slots `0 .. L - 1`.
        last_position: int scalar tensor, the newest position the rings keep.
        max_length: int, the total sequence length.
    """
    ring = ring_size(backbone, max_length)
    length = prefilled[0][0].shape[2]
    grow = [[0, 0], [0, 0], [0, max_length - length], [0, 0]]
    return tuple(
        tuple(
            ring_from_linear(array, last_position, ring)
            if layer_is_local(index)
            else ops.pad(array, grow)
            for array in pair
        )
        for index, pair in enumerate(prefilled)
    )
