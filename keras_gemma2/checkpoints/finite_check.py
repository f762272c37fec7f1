"""Refuse checkpoint tensors that hold NaN or Inf, as they stream in.

A NaN in one weight makes every logit NaN, silently. Each loader calls
`check_finite` on the array it has just read, before assigning it: one
pass over memory that is being read anyway, in blocks, so no full-size
temporary is allocated. On a 1 GB bfloat16 checkpoint this costs about
0.15 s (`benchmarks/finite_check.py`).

The check is on by default. To load a broken checkpoint on purpose (to
debug it), pass `check_finite=False` to `from_preset` / `convert`, or set
the environment variable `KERAS_GEMMA2_CHECK_FINITE=0`, which also covers
`keras.models.load_model`.
"""

import os

import keras
import numpy as np

ENVIRONMENT_VARIABLE = "KERAS_GEMMA2_CHECK_FINITE"
_OFF = ("0", "false", "no", "off")
# Elements per block: temporaries stay at a few MB whatever the tensor size.
_BLOCK = 1 << 20
# Exponent bits of 2-byte floats: all ones means Inf or NaN.
_EXPONENT_MASKS = {"bfloat16": 0x7F80, "float16": 0x7C00}


def finite_check_enabled(check_finite=None):
    """Whether loaders check weights for NaN/Inf.

    Args:
        check_finite: `True`, `False`, or `None` to follow the environment
            variable `KERAS_GEMMA2_CHECK_FINITE` (unset means `True`; `0`,
            `false`, `no` or `off` mean `False`).

    Example:

    >>> finite_check_enabled(False)
    False
    """
    if check_finite is None:
        value = os.environ.get(ENVIRONMENT_VARIABLE, "1")
        return value.strip().lower() not in _OFF
    if not isinstance(check_finite, bool):
        raise TypeError(
            "Received an invalid value for `check_finite`, expected True, False or "
            f"None. Received: check_finite={check_finite!r}"
        )
    return check_finite


def is_finite(array):
    """True when no element of the numpy float `array` is NaN or Inf.

    Example:

    >>> is_finite(np.array([1.0, np.inf], "float32"))
    False
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    mask = _EXPONENT_MASKS.get(str(flat.dtype))
    if mask is not None:
        # numpy has no fast isfinite for ml_dtypes' bfloat16; bits do.
        bits = flat.view(np.uint16)
        return not any(
            ((bits[i : i + _BLOCK] & mask) == mask).any()
            for i in range(0, bits.size, _BLOCK)
        )
    if not np.issubdtype(flat.dtype, np.floating):
        return True
    return all(
        np.isfinite(flat[i : i + _BLOCK]).all() for i in range(0, flat.size, _BLOCK)
    )


def check_finite(array, name, path):
    """Raise `ValueError` if `array`, tensor `name` of file `path`, is not finite.

    The message counts the NaN and Inf values and says how to load anyway.

    Args:
        array: numpy array, the tensor as read.
        name: string. The tensor's name in the file.
        path: string. The file it was read from.

    Example:

    >>> check_finite(np.ones(3, "float32"), "lm_head", "model.safetensors")
    """
    if is_finite(array):
        return
    values = np.asarray(array, dtype="float32")
    nan = int(np.isnan(values).sum())
    inf = int(np.isinf(values).sum())
    raise ValueError(
        f"Tensor `{name}` in {path} holds non-finite values ({nan} NaN, {inf} Inf "
        f"of {values.size}); the checkpoint is broken. Loading stopped; no model "
        "was returned. To load it anyway (to debug it), pass check_finite=False or set "
        f"{ENVIRONMENT_VARIABLE}=0."
    )


def check_variables_finite(model, path):
    """Raise `ValueError` naming the first variable of `model` that is not finite.

    For weights that Keras itself loaded (our presets): one pass over the
    loaded variables, on the device that holds them.

    Args:
        model: a Keras model or layer.
        path: string. The file its weights were loaded from, for the message.
    """
    for variable in model.weights:
        if not keras.backend.is_float_dtype(variable.dtype):
            continue
        finite = keras.ops.all(keras.ops.isfinite(variable.value))
        if not bool(keras.ops.convert_to_numpy(finite)):
            check_finite(
                keras.ops.convert_to_numpy(keras.ops.cast(variable.value, "float32")),
                variable.path,
                path,
            )
