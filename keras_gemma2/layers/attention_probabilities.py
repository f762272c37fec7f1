"""Soft cap, mask and float32 softmax: logits to attention probabilities.

Shared by every kernel that forms explicit probabilities (the reference, the
blocked kernels, `cached_attention`), so that all of them agree to the bit
on the soft cap, the masked value and the softmax precision.
"""

from keras import ops

from keras_gemma2.layers.soft_capping import soft_cap as apply_soft_cap

# Logits of masked positions. Finite so that a row with no visible key (a
# padded query) gives a uniform softmax instead of NaN.
MASKED_LOGIT = -1e9


def masked_probabilities(logits, mask, soft_cap, dtype, dropout):
    """Soft cap, mask and float32 softmax over the last axis, cast to `dtype`.

    Args:
        logits: `[..., S]` attention logits.
        mask: bool, broadcastable to `logits`; false logits become
            `MASKED_LOGIT`.
        soft_cap: float or `None`.
        dtype: dtype of the returned probabilities.
        dropout: optional callable applied to the probabilities.

    Returns:
        `[..., S]` probabilities in `dtype`.

    Example:

    >>> import numpy as np
    >>> logits = np.array([[0.0, 0.0, 5.0]], "float32")
    >>> mask = np.array([[True, True, False]])
    >>> p = masked_probabilities(logits, mask, None, "float32", None)
    >>> [round(float(x), 3) for x in ops.convert_to_numpy(p)[0]]
    [0.5, 0.5, 0.0]
    """
    logits = apply_soft_cap(ops.cast(logits, "float32"), soft_cap)
    logits = ops.where(mask, logits, MASKED_LOGIT)
    if len(logits.shape) > 5:
        # TensorFlow's CPU softmax takes at most 5-D: use a 2-D view.
        shape = ops.shape(logits)
        logits = ops.reshape(logits, (-1, logits.shape[-1]))
        probabilities = ops.reshape(ops.softmax(logits, axis=-1), shape)
    else:
        probabilities = ops.softmax(logits, axis=-1)
    probabilities = ops.cast(probabilities, dtype)
    if dropout is not None:
        probabilities = dropout(probabilities)
    return probabilities
