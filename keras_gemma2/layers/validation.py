"""Argument checks shared by the layers; each error names the argument."""


def _is_number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive_int(value, name):
    """Return `value` if it is a positive int, else raise `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer. Received: {name}={value!r}"
        )
    return value


def positive_number(value, name):
    """Return `value` as a float if it is a positive number, else raise."""
    if not _is_number(value) or value <= 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"number. Received: {name}={value!r}"
        )
    return float(value)


def non_negative_number(value, name):
    """Return `value` as a float if it is a number >= 0, else raise."""
    if not _is_number(value) or value < 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a non-negative "
            f"number. Received: {name}={value!r}"
        )
    return float(value)


def unit_rate(value, name):
    """Return `value` as a float in [0, 1), else raise."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a number in "
            f"[0, 1). Received: {name}={value!r}"
        )
    return float(value)


# === Token ids and padding masks ===


def host_values(value):
    """`value` as a numpy array if its values exist on the host now, else `None`.

    Numpy arrays, Python lists and eager tensors of every backend (JAX
    arrays, TensorFlow eager tensors, PyTorch tensors, copied to the host)
    have values. Symbolic and traced values do not: a `keras.KerasTensor`, a
    JAX tracer (inside `jax.jit`), a TensorFlow graph tensor (inside
    `tf.function` or `tf.data`), a tensor under `torch.compile`.

    Example:

    >>> host_values([[2, 5]]).tolist()
    [[2, 5]]
    >>> import keras
    >>> host_values(keras.KerasTensor((1, 3), "int32")) is None
    True
    """
    import numpy as np

    if value is None:
        return None
    if isinstance(value, (np.ndarray, np.generic, list, tuple, int)):
        return np.asarray(value)
    module = type(value).__module__ or ""
    if module.startswith("keras"):
        return None
    if module.startswith("jax"):
        import jax

        if isinstance(value, jax.core.Tracer):
            return None
        return np.asarray(value)
    if module.startswith("tensorflow"):
        import tensorflow as tf

        if tf.is_symbolic_tensor(value) or not hasattr(value, "numpy"):
            return None
        return value.numpy()
    if module.startswith("torch"):
        import torch

        compiling = getattr(torch.compiler, "is_compiling", lambda: False)
        if compiling():
            return None
        return value.detach().cpu().numpy()
    return None


def _static_shape(value):
    shape = getattr(value, "shape", None)
    if shape is None:
        import numpy as np

        shape = np.shape(value)
    return tuple(None if size is None else int(size) for size in shape)


def _dtype_name(value):
    import keras

    dtype = getattr(value, "dtype", None)
    if dtype is None:
        import numpy as np

        dtype = np.asarray(value).dtype
    return keras.backend.standardize_dtype(dtype)


def check_token_shapes(token_ids, padding_mask=None, mask_name="padding_mask"):
    """Raise `ValueError` unless `token_ids` is an int `[batch, T]` tensor and
    `padding_mask` (if given) has the same shape.

    Reads only static shapes and dtypes, so it serves concrete, symbolic and
    traced values alike (dimensions unknown at trace time match anything).

    Example:

    >>> import numpy as np
    >>> check_token_shapes(np.zeros((1, 3), "int32"), np.ones((1, 4), "int32"))
    Traceback (most recent call last):
    ...
    ValueError: Received an invalid value for `padding_mask`, expected the shape of `token_ids`, (1, 3). Received: padding_mask.shape=(1, 4)
    """  # noqa: E501
    shape = _static_shape(token_ids)
    if len(shape) != 2:
        raise ValueError(
            "Received an invalid value for `token_ids`, expected a rank-2 "
            f"[batch, sequence_length] tensor. Received: token_ids.shape={shape}"
        )
    dtype = _dtype_name(token_ids)
    if "int" not in dtype:
        raise ValueError(
            "Received an invalid value for `token_ids`, expected an integer "
            f"dtype. Received: token_ids.dtype={dtype}"
        )
    if padding_mask is None:
        return
    mask_shape = _static_shape(padding_mask)
    same = len(mask_shape) == 2 and all(
        a is None or b is None or a == b for a, b in zip(shape, mask_shape, strict=True)
    )
    if not same:
        raise ValueError(
            f"Received an invalid value for `{mask_name}`, expected the shape of "
            f"`token_ids`, {shape}. Received: {mask_name}.shape={mask_shape}"
        )


def check_token_values(token_ids, vocabulary_size, name="token_ids"):
    """Raise `ValueError` naming the first id outside `[0, vocabulary_size)`.

    `token_ids` is a host numpy array `[batch, T]` (see `host_values`); the
    message gives the id, its `[row, column]` and the vocabulary size. One
    vectorized comparison: about 1 ms per million ids.

    Example:

    >>> import numpy as np
    >>> check_token_values(np.array([[2, 5], [7, -1]]), 64)
    Traceback (most recent call last):
    ...
    ValueError: Received an invalid value for `token_ids`, expected ids in [0, 64) (the vocabulary size is 64; -1 is outside the vocabulary). Received: token_ids[1, 1]=-1
    """  # noqa: E501
    import numpy as np

    token_ids = np.asarray(token_ids)
    bad = (token_ids < 0) | (token_ids >= vocabulary_size)
    if not bad.any():
        return
    position = tuple(int(i) for i in np.argwhere(bad)[0])
    value = int(token_ids[position])
    index = ", ".join(str(i) for i in position)
    raise ValueError(
        f"Received an invalid value for `{name}`, expected ids in "
        f"[0, {vocabulary_size}) (the vocabulary size is {vocabulary_size}; "
        f"{value} is outside the vocabulary). Received: {name}[{index}]={value}"
    )


def check_token_inputs(token_ids, padding_mask, vocabulary_size):
    """Shapes and dtype always; ids too when `token_ids` has host values.

    Returns `True` if the ids were checked, `False` if they were symbolic or
    traced (then only shapes and dtypes were).

    Example:

    >>> import numpy as np
    >>> check_token_inputs(np.array([[2, 5]]), np.ones((1, 2)), 64)
    True
    """
    check_token_shapes(token_ids, padding_mask)
    values = host_values(token_ids)
    if values is None:
        return False
    check_token_values(values, vocabulary_size)
    return True
