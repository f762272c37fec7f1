"""Soft cap, mask and float32 softmax: logits to attention probabilities.

Shared by every kernel that forms explicit probabilities (the reference, the
blocked kernels, `cached_attention`), so that all of them agree to the bit
on the soft cap, the masked value and the softmax precision. The formula is
`gemma2_math.masked_softmax`, which `TorchDecoder` calls too.
"""

import types

from keras import ops

from keras_gemma2.layers.gemma2_math import MASKED_LOGIT, masked_softmax

__all__ = ["MASKED_LOGIT", "masked_probabilities"]


def _softmax(x, axis=-1):
    """`keras.ops.softmax`; over more than 5 axes through a 2-D view.

    TensorFlow's CPU softmax takes at most 5-D tensors.
    """
    if len(x.shape) <= 5:
        return ops.softmax(x, axis=axis)
    shape = ops.shape(x)
    flat = ops.softmax(ops.reshape(x, (-1, x.shape[-1])), axis=-1)
    return ops.reshape(flat, shape)


# `keras.ops` with the softmax above, for `masked_softmax`.
_KERAS_OPS = types.SimpleNamespace(
    cast=ops.cast, tanh=ops.tanh, where=ops.where, softmax=_softmax
)


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
    probabilities = masked_softmax(logits, mask, soft_cap, _KERAS_OPS)
    probabilities = ops.cast(probabilities, dtype)
    if dropout is not None:
        probabilities = dropout(probabilities)
    return probabilities
