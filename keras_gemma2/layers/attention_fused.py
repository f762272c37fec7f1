"""Attention through `keras.ops.dot_product_attention`, and where it is exact."""

import keras
from keras import ops

from keras_gemma2.layers.attention_masks import attention_mask, visible_key_counts

_SOFT_CAP_ONLY_ON_TPU = (
    "keras.ops.dot_product_attention applies a soft cap only with JAX on TPU"
)


def fused_unavailable_reason(query, soft_cap=None, padding=False):
    """Why `fused_attention` would not give the reference's result, or `None`.

    Args:
        query: tensor `[B, T, N, H]` with a static length `T`.
        soft_cap: float or `None`.
        padding: bool. Whether a key padding mask is given.
    """
    if soft_cap is None:
        return None
    if keras.config.backend() != "jax":
        return _SOFT_CAP_ONLY_ON_TPU
    import jax

    if jax.devices()[0].platform != "tpu":
        return _SOFT_CAP_ONLY_ON_TPU
    if padding:
        # Keras' TPU path keeps only batch row 0 of a mask.
        return "the TPU kernel takes one mask for the whole batch, not a padding mask"
    if query.shape[0] is None:
        return "the TPU kernel needs a static batch size"
    if query.shape[1] % 128 or query.shape[-1] % 128:
        # Keras catches the Splash kernel's error and silently runs XLA
        # attention without the cap instead; refuse before that happens.
        return "the TPU kernel needs a length and head_dim that are multiples of 128"
    return None


def fused_attention(
    query, key, value, padding_mask=None, sliding_window_size=None, soft_cap=None
):
    """Self-attention through `keras.ops.dot_product_attention`.

    With a soft cap this runs only with JAX on TPU (Keras' Splash kernel,
    which applies `cap * tanh(logits / cap)`); the mask is then a concrete
    host array, because Keras falls back to XLA attention without the cap
    when it is traced, and `scale=None`, because that path multiplies the
    queries by `scale * sqrt(head_dim)` while Splash itself does not scale.
    Keras runs XLA attention without the cap whenever Splash raises, so
    callers check `fused_unavailable_reason` first (untested here: no TPU;
    `test_fused_with_soft_cap_equals_reference` runs on one). Without a soft
    cap it runs on every backend with `scale=1`.

    query: `[B, T, N, H]` (scaled); key, value: `[B, T, K, H]`;
    padding_mask: optional `[B, T]` (not with a soft cap). Returns
    `[B, T, N, H]`; rows with no visible key are fixed by the caller.
    """
    length = query.shape[1]
    if soft_cap is not None:
        import numpy as np

        positions = np.arange(length)
        distance = positions[:, None] - positions[None, :]
        visible = distance >= 0
        if sliding_window_size is not None:
            visible &= distance < sliding_window_size
        mask = np.broadcast_to(visible, (query.shape[0], length, length))
        return ops.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            scale=None,
            attn_logits_soft_cap=soft_cap,
        )
    positions = ops.arange(length, dtype="int32")
    mask = attention_mask(positions, positions, sliding_window_size, padding_mask)
    if padding_mask is not None:
        # A row with no visible key gets its own key, so no kernel sees an
        # empty row (some return NaN there); the caller overwrites it.
        empty = visible_key_counts(padding_mask, sliding_window_size) == 0
        diagonal = ops.eye(length, dtype="bool")
        mask = ops.logical_or(mask, ops.logical_and(empty[:, :, None], diagonal[None]))
    outputs = ops.dot_product_attention(
        query, key, value, mask=mask[:, None], scale=1.0
    )
    return ops.cast(outputs, value.dtype)
