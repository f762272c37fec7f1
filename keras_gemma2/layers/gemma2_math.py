"""Gemma 2's arithmetic, written once over an ops namespace.

The layers call these functions with `keras.ops` (the default);
`keras_gemma2.generation.torch_decode.TorchDecoder` calls them with
`keras_gemma2.layers.torch_ops.TORCH_OPS`, the same primitives as raw torch
functions without Keras' per-call dispatch (which costs more than the
arithmetic of one decode step). The formula is therefore one text, so the
decoder cannot drift from the layers; `tests/layers/test_gemma2_math.py`
checks each function against float64 numpy and both namespaces against each
other in float32 and bfloat16.

Only these primitives of the namespace are used: `cast`, `rms_normalization`,
`cos`, `sin`, `concatenate`, `roll`, `tanh`, `gelu`, `where` and `softmax`,
plus Python arithmetic operators on tensors.
"""

import math

import numpy as np
from keras import ops as keras_ops


def embedding_scale(hidden_dim, dtype, ops=keras_ops):
    """`sqrt(hidden_dim)` rounded to `dtype` first, as Gemma does (bf16: 48.0).

    Example:

    >>> float(embedding_scale(2304, "bfloat16"))
    48.0
    """
    return ops.cast(math.sqrt(hidden_dim), dtype)


def rms_norm(x, gain, epsilon, ops=keras_ops):
    """`x * rsqrt(mean(x**2, -1) + epsilon) * gain` in float32, cast back.

    Args:
        x: tensor `[..., D]` in any float dtype.
        gain: float32 `[D]`, Gemma's `1 + scale`.
        epsilon: float added to the mean square.
        ops: the ops namespace. Defaults to `keras.ops`.

    Example:

    >>> import numpy as np
    >>> y = rms_norm(np.array([[3.0, 4.0]], "float32"), np.ones(2, "float32"), 0.0)
    >>> [round(float(v), 4) for v in keras_ops.convert_to_numpy(y)[0]]
    [0.8485, 1.1314]
    """
    normed = ops.rms_normalization(ops.cast(x, "float32"), gain, epsilon=epsilon)
    return ops.cast(normed, x.dtype)


def rope_inverse_frequencies(head_dim, max_wavelength, ops=keras_ops):
    """`max_wavelength ** (-2i / head_dim)` for `i < head_dim / 2`, float32.

    Example:

    >>> [float(v) for v in keras_ops.convert_to_numpy(
    ...     rope_inverse_frequencies(4, 100.0))]
    [1.0, 0.10000000149011612]
    """
    # Computed as HF does, in float32: 1 / theta ** (arange(0, H, 2) / H).
    exponents = np.arange(0, head_dim, 2, dtype="float32") / np.float32(head_dim)
    inverse = np.float32(1.0) / np.power(np.float32(max_wavelength), exponents)
    return ops.cast(inverse, "float32")


def rope_rotation(positions, inverse_frequencies, dtype, ops=keras_ops):
    """`(cos, signed_sin)` `[..., H]` at `positions` (any shape), in `dtype`.

    The angles are computed in float32, then cast. `signed_sin` is `[-sin,
    sin]` over the two halves of the head, so that `rope_rotate` is one
    `roll`: feature pairs `(i, i + H/2)` rotate together (the half-split
    layout of HF and KerasHub Gemma).
    """
    positions = ops.cast(positions, "float32")
    angles = positions[..., None] * inverse_frequencies  # [..., H/2], float32
    cos, sin = ops.cos(angles), ops.sin(angles)
    cos = ops.concatenate([cos, cos], axis=-1)
    signed_sin = ops.concatenate([-sin, sin], axis=-1)
    return ops.cast(cos, dtype), ops.cast(signed_sin, dtype)


def rope_rotate(x, rotation, ops=keras_ops):
    """Rotate `x [..., H]` by `rotation = (cos, signed_sin)`, broadcast.

    `roll(x, H/2)` is `[x2, x1]`, so this is `[x1 cos - x2 sin, x2 cos + x1
    sin]`.
    """
    cos, signed_sin = rotation
    return x * cos + ops.roll(x, x.shape[-1] // 2, axis=-1) * signed_sin


def soft_cap(x, cap, ops=keras_ops):
    """`cap * tanh(x / cap)`; the identity when `cap` is `None`.

    `cap` must be a positive float; `keras_gemma2.layers.soft_capping`
    validates user values.
    """
    if cap is None:
        return x
    return ops.tanh(x / cap) * cap


def geglu(gate, up, ops=keras_ops):
    """Gemma's gated unit: `gelu_tanh(gate) * up` (tanh-approximate GELU)."""
    return ops.gelu(gate, approximate=True) * up


# Logits of masked positions. Finite so that a row with no visible key (a
# padded query) gives a uniform softmax instead of NaN.
MASKED_LOGIT = -1e9


def masked_softmax(logits, mask, cap, ops=keras_ops):
    """Attention probabilities: soft cap, mask, softmax, all in float32.

    Args:
        logits: `[..., S]` attention logits, any float dtype.
        mask: bool, broadcastable to `logits`, true where a key is visible;
            or `None` (every key visible). Masked logits become
            `MASKED_LOGIT`.
        cap: float or `None`, the attention-logit soft cap.
        ops: the ops namespace. Defaults to `keras.ops`.

    Returns:
        float32 `[..., S]` probabilities.
    """
    logits = soft_cap(ops.cast(logits, "float32"), cap, ops)
    if mask is not None:
        logits = ops.where(mask, logits, MASKED_LOGIT)
    return ops.softmax(logits, axis=-1)


def masking_bias(mask, ops=keras_ops):
    """float32 `0` where the bool `mask` is true, `MASKED_LOGIT` elsewhere."""
    return ops.cast(ops.where(mask, 0.0, MASKED_LOGIT), "float32")


def biased_softmax(logits, bias, cap, ops=keras_ops):
    """`masked_softmax` in fewer, cheaper passes, for rows with a visible key.

    The same probabilities up to float32 rounding, from two identities:

    - `cap * tanh(x / cap) = 2 cap * sigmoid(2 x / cap) - cap`, and a
      softmax ignores a constant added to every logit, so the soft cap
      becomes `2 cap * sigmoid(2 x / cap)` (torch's CPU `tanh` measured 9x
      slower than its `sigmoid`: 10.3 against 1.15 ms on 4.2M logits);
    - the mask becomes an added `bias` (`masking_bias`): `MASKED_LOGIT`
      plus a logit still underflows to probability 0 (a broadcast `where`
      measured 5.3 ms there, an add 0.4).

    A row whose keys are all masked (a padded query) does not come out
    uniform here, as it does from `masked_softmax`; callers pass only rows
    that see at least one key.

    Args:
        logits: `[..., S]` attention logits, any float dtype.
        bias: float32, broadcastable to `logits`: 0 or `MASKED_LOGIT`; or
            `None` (every key visible).
        cap: float or `None`, the attention-logit soft cap.
        ops: the ops namespace. Defaults to `keras.ops`. It may be one
            that overwrites `logits` (`torch_ops.TORCH_OPS_IN_PLACE`).

    Example:

    >>> import numpy as np
    >>> logits = np.array([[1.0, 30.0, -2.0]], "float32")
    >>> mask = np.array([[True, True, False]])
    >>> fast = biased_softmax(logits, masking_bias(mask), 50.0)
    >>> exact = masked_softmax(logits, mask, 50.0)
    >>> bool(np.allclose(keras_ops.convert_to_numpy(fast),
    ...                  keras_ops.convert_to_numpy(exact), atol=1e-6))
    True
    """
    logits = ops.cast(logits, "float32")
    # Named ops, not operators: `TORCH_OPS_IN_PLACE` runs them in place.
    if cap is not None:
        logits = ops.multiply(ops.sigmoid(ops.multiply(logits, 2.0 / cap)), 2.0 * cap)
    if bias is not None:
        logits = ops.add(logits, bias)
    return ops.softmax(logits, axis=-1)
