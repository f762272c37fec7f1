"""KV cache layout: window-sized rings for local layers, linear for global.

A cache is a pair `(local_cache, global_cache)`:

- `local_cache`: `[batch, num_local_layers, 2, ring, kv_heads, head_dim]` with
  `ring = min(sliding_window_size, max_length)`; position `p` lives in slot
  `p % ring`, so a local layer never stores or reads more than its window.
- `global_cache`: `[batch, num_global_layers, 2, length, kv_heads, head_dim]`,
  position `p` in slot `p`. Decoding reads only a prefix of it (see
  `decode.py`).
"""

from keras import ops

from keras_gemma2.models.backbone import layer_is_local


def layer_counts(backbone):
    """`(num_local_layers, num_global_layers)` of `backbone`."""
    local = sum(layer_is_local(i) for i in range(backbone.num_layers))
    return local, backbone.num_layers - local


def empty_cache(backbone, batch_size, local_slots, global_slots, dtype=None):
    """Zero cache with the given slot counts."""
    num_local, num_global = layer_counts(backbone)
    dtype = dtype or backbone.compute_dtype
    tail = (2, None, backbone.num_key_value_heads, backbone.head_dim)

    def zeros(layers, slots):
        shape = (batch_size, layers) + tail[:1] + (slots,) + tail[2:]
        return ops.zeros(shape, dtype=dtype)

    return zeros(num_local, local_slots), zeros(num_global, global_slots)


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


def ring_from_linear(linear_cache, last_position, ring):
    """Rebuild a ring of `ring` slots from a linear cache.

    Slot `s` receives the latest position `<= last_position` congruent to `s`
    modulo `ring`; slots that no such position reaches get position 0 (they
    are masked as empty when attended to).

    Args:
        linear_cache: `[batch, layers, 2, length, kv_heads, head_dim]`, position
            `p` in slot `p`.
        last_position: int scalar tensor, the newest position to keep.
        ring: int, slots of the result.
    """
    slots = ops.arange(ring, dtype="int32")
    positions = last_position - ops.mod(last_position - slots, ring)  # [ring]
    length = ops.shape(linear_cache)[3]
    positions = ops.clip(positions, 0, length - 1)
    return ops.take(linear_cache, positions, axis=3)
