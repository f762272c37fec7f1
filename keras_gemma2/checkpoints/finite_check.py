"""Refuse checkpoint tensors that hold NaN or Inf, as they stream in.

A NaN in one weight makes every logit NaN, silently. Each loader calls
`check_finite` on the array it has just read, before assigning it: one
pass over memory that is being read anyway, in blocks, so no full-size
temporary is allocated. On a 1 GB bfloat16 checkpoint this costs about
0.15 s (`benchmarks/finite_check.py`).

The check is on by default. To load a broken checkpoint on purpose (to
debug it), pass `check_finite=False` to `from_preset` / `convert`, or set
the environment variable `KERAS_GEMMA2_CHECK_FINITE=0`, which also covers
`keras.models.load_model` and `load_weights`.

`.keras` files and `.weights.h5` files are scanned before Keras assigns a
value: `Gemma2Backbone.load_own_variables` (Keras loads a parent layer
before its sublayers) and `load_weights` (which scans the whole file first,
because Keras keeps loading sublayers after a parent failed).
"""

import contextlib
import contextvars
import json
import os
import weakref
import zipfile

import ml_dtypes
import numpy as np

ENVIRONMENT_VARIABLE = "KERAS_GEMMA2_CHECK_FINITE"
_OFF = ("0", "false", "no", "off")
# Elements per block: temporaries stay at a few MB whatever the tensor size.
_BLOCK = 1 << 20
# Exponent bits of 2-byte floats: all ones means Inf or NaN.
_EXPONENT_MASKS = {"bfloat16": 0x7F80, "float16": 0x7C00}
# Set by `store_check` around a loader's own Keras loads (`None`: follow the
# environment variable).
_STORE_CHECK = contextvars.ContextVar("keras_gemma2_store_check", default=None)


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


def check_keras_store_finite(layer, store):
    """Scan the weights Keras is about to load into `layer` for NaN/Inf.

    Keras loads a `.keras` file (or `.weights.h5`) parent first: a layer's
    `load_own_variables(store)` runs before any of its sublayers read their
    values. Called there, this reads every float dataset under the layer's
    part of the file, in blocks of rows, and raises before a single
    variable is assigned, so a failed `keras.models.load_model` returns
    nothing and a failed `load_weights` leaves the model as it was.

    Keras may visit the same layer twice in one load (as a layer of the
    functional graph and as an attribute of the task) and forgets the first
    failure when the second visit succeeds, so the outcome is remembered
    per store and repeated.

    Args:
        layer: the Keras layer whose `load_own_variables` is running.
        store: the store Keras passes to it (an `H5IOStore` or
            `ShardedH5IOStore`; other stores are not scanned).
    """
    enabled = _STORE_CHECK.get()
    if not (finite_check_enabled() if enabled is None else enabled):
        return
    previous = getattr(layer, "_keras_gemma2_finite_scan", None)
    if previous is not None and previous[0]() is store:
        if previous[1] is not None:
            raise previous[1]
        return
    error = None
    try:
        _check_store(store, getattr(store, "_h5_entry_path", None))
    except ValueError as raised:
        error = raised
    # Not a tracked attribute: Keras must not serialise or track it.
    object.__setattr__(layer, "_keras_gemma2_finite_scan", (weakref.ref(store), error))
    if error is not None:
        raise error


@contextlib.contextmanager
def checked_weights_file(filepath):
    """Scan a weights file for NaN/Inf, then run the block's load unchecked.

    For `load_weights` on an existing model: Keras keeps loading sublayers
    after a parent layer's `load_own_variables` failed, so the scan in
    `check_keras_store_finite` alone could leave a model half-loaded. This
    reads the whole file first (`.weights.h5`, `.weights.json` shards, or a
    `.keras` archive's `model.weights.h5`) and raises before Keras starts.

    Args:
        filepath: string or path, as given to `load_weights`.
    """
    enabled = _STORE_CHECK.get()
    if finite_check_enabled() if enabled is None else enabled:
        for label, h5_file in _weights_file_h5(os.fspath(filepath)):
            with h5_file:
                _check_h5_group(h5_file, label)
    with store_check(False):
        yield


def _weights_file_h5(path):
    """(label, open h5py file) for each weights file `load_weights` would read."""
    import h5py

    if path.endswith(".keras") and zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        if "model.weights.h5" not in archive.namelist():
            return []
        member = archive.open("model.weights.h5")
        return [(f"{path} (model.weights.h5)", h5py.File(member, "r"))]
    if path.endswith(".json") and os.path.isfile(path):
        with open(path) as file:
            weight_map = json.load(file).get("weight_map", {})
        names = sorted(set(_shard_names(weight_map)))
        folder = os.path.dirname(path)
        shards = [os.path.join(folder, name) for name in names]
        return [(shard, h5py.File(shard, "r")) for shard in shards]
    if path.endswith(".h5") and os.path.isfile(path):
        return [(path, h5py.File(path, "r"))]
    return []  # Keras itself reports a missing or unknown file


@contextlib.contextmanager
def store_check(enabled):
    """Within the block, `check_keras_store_finite` scans only if `enabled`.

    For loaders that take a `check_finite` argument and load through Keras
    (`load_weights`), so that the argument wins over the environment.

    Example:

    >>> with store_check(False):
    ...     pass
    """
    token = _STORE_CHECK.set(bool(enabled))
    try:
        yield
    finally:
        _STORE_CHECK.reset(token)


def _check_store(store, owner):
    """Scan `owner`'s group in each file of `store` (the whole file without one)."""
    files = _store_h5_files(store)
    if not owner or not any(owner in h5_file for _, h5_file in files):
        owner = None
    for label, h5_file in files:
        if owner is None:
            _check_h5_group(h5_file, label)
        elif owner in h5_file:
            _check_h5_group(h5_file[owner], label)


def _store_h5_files(store):
    """(label, open h5py file) pairs of a Keras weights store, or none."""
    sharding = getattr(store, "sharding_config", None)
    if sharding is not None and hasattr(store, "path"):
        import h5py

        names = sorted(set(_shard_names(sharding.get("weight_map", {}))))
        return [
            (str(store.path.with_name(name)), h5py.File(store.path.with_name(name)))
            for name in names
        ]
    h5_file = getattr(store, "h5_file", None)
    if h5_file is None or not hasattr(h5_file, "visititems"):
        return []
    archive = getattr(store, "archive", None)
    label = getattr(archive, "filename", None) or getattr(h5_file, "filename", "")
    if not os.path.isfile(str(label)):
        # `load_model` reads the archive's weights into memory (or a temporary
        # directory): the archive's own name does not reach the store.
        label = "model.weights.h5 of the .keras file being loaded"
    return [(str(label), h5_file)]


def _shard_names(weight_map):
    for value in weight_map.values():
        yield from value if isinstance(value, list) else [value]


def _check_h5_group(group, label):
    """`check_finite` on each float dataset under `group`, a block of rows at a time."""
    datasets = []
    group.visititems(
        lambda name, item: datasets.append(item) if hasattr(item, "dtype") else None
    )
    for dataset in datasets:
        bfloat16 = dataset.attrs.get("dtype") == "bfloat16"  # Keras' marker
        if dataset.shape is None or not (bfloat16 or dataset.dtype.kind == "f"):
            continue
        if dataset.ndim == 0:
            check_finite(_as_float(dataset[()], bfloat16), dataset.name, label)
            continue
        row_size = max(1, int(np.prod(dataset.shape[1:])))
        rows = max(1, _BLOCK // row_size)
        for start in range(0, dataset.shape[0], rows):
            block = _as_float(dataset[start : start + rows], bfloat16)
            check_finite(block, dataset.name, label)


def _as_float(values, bfloat16):
    """Keras writes bfloat16 as 2-byte opaque data; give it back its dtype."""
    values = np.asarray(values)
    return values.view(ml_dtypes.bfloat16) if bfloat16 else values
