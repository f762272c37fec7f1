"""Tensor-by-tensor reading of Keras `.weights.h5` files, single or sharded.

The one module that knows how Keras 3 lays out a weights file:

- `model.weights.h5` is an HDF5 file with one dataset per variable;
  bfloat16 variables are stored as 2-byte opaque values tagged with the
  attribute `dtype="bfloat16"`.
- A sharded save writes `model.weights.json` (`{"weight_map": {"/<group>":
  "<shard file>"}}`, `<group>` being a dataset's parent group) and the shard
  files it names.

Which dataset holds which variable is NOT hard-coded here: `probe_layout`
learns it from the installed Keras by saving a tiny model of the same
structure with a distinct marker value in every variable. The tests compare
everything read here with KerasHub's own loading of the same preset, so a
change in the format fails them loudly.
"""

import os
import tempfile

import ml_dtypes
import numpy as np

from keras_gemma2.checkpoints.shard_index import index_shards

SINGLE_FILE = "model.weights.h5"
SHARD_INDEX_FILE = "model.weights.json"

_BFLOAT16_TAG = "bfloat16"


class H5Tensor:
    """One dataset of a weights file: file path, dataset name, shape, dtype."""

    def __init__(self, path, dataset, shape, dtype):
        self.path = path
        self.dataset = dataset
        self.shape = tuple(shape)
        self.dtype = dtype

    def read(self):
        """Return the dataset as a new numpy array (bfloat16 via `ml_dtypes`)."""
        import h5py

        with h5py.File(self.path, "r") as file:
            return _read_dataset(file[self.dataset], self.path)


def _read_dataset(dataset, path):
    """`[...]` numpy value of one h5 dataset, decoding Keras's bfloat16 tag."""
    array = np.asarray(dataset[()])
    if dataset.attrs.get("dtype") == _BFLOAT16_TAG:
        if array.dtype.itemsize != 2:
            raise ValueError(
                f"Dataset `{dataset.name}` in {path} is tagged bfloat16 but holds "
                f"{array.dtype.itemsize}-byte values; expected 2-byte values."
            )
        array = array.view(ml_dtypes.bfloat16)
    return array


def _dataset_dtype(dataset):
    if dataset.attrs.get("dtype") == _BFLOAT16_TAG:
        return _BFLOAT16_TAG
    return dataset.dtype.name


def _list_datasets(path):
    """`{dataset name: H5Tensor}` of every dataset in one h5 file."""
    import h5py

    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(
            f"The weights file {path} is not a readable HDF5 file: {error}"
        ) from None
    tensors = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            tensors[name] = H5Tensor(path, name, item.shape, _dataset_dtype(item))

    with file:
        file.visititems(visit)
    return tensors


def index_weights(directory):
    """Return `{dataset name: H5Tensor}` over a preset's single or sharded weights.

    Args:
        directory: a preset directory holding `model.weights.h5`, or
            `model.weights.json` and the shards it names (keyed by each
            dataset's parent group, `"/<group>"`).

    Raises:
        FileNotFoundError: no weights file, or a shard named in the index is
            missing.
        ValueError: a file is unreadable, the index is malformed, or a dataset
            is not in the shard the index names.
    """
    tensors, _ = index_shards(
        directory,
        SINGLE_FILE,
        SHARD_INDEX_FILE,
        _list_datasets,
        lambda name: "/" + name.rsplit("/", 1)[0],
    )
    return tensors


def probe_layout(model):
    """Return `{variable.path: dataset name}` as Keras saves `model`'s weights.

    Overwrites every variable of `model` with a marker (its index + 1), saves
    the weights to a temporary file and reads back which dataset holds which
    marker. Pass a throwaway model of the same structure as the one that
    wrote the file to read; tiny layer sizes keep this fast.

    Raises:
        ValueError: a dataset holds no single marker, or two variables share
            a path (the layout cannot be learned).
    """
    variables = list(model.weights)
    paths = [variable.path for variable in variables]
    if len(set(paths)) != len(paths):
        raise ValueError(
            f"The probe model {model.name} has repeated variable paths; its "
            "weights file layout cannot be learned."
        )
    for marker, variable in enumerate(variables, start=1):
        variable.assign(np.full(tuple(variable.shape), marker, "float32"))
    with tempfile.TemporaryDirectory(prefix="keras-gemma2-probe-") as directory:
        path = os.path.join(directory, SINGLE_FILE)
        model.save_weights(path)
        import h5py

        layout = {}
        with h5py.File(path, "r") as file:
            for name in _list_datasets(path):
                values = np.unique(_read_dataset(file[name], path).astype("float32"))
                marker = int(values[0]) if values.size == 1 else 0
                if not 1 <= marker <= len(variables) or values[0] != marker:
                    raise ValueError(
                        f"Probe dataset `{name}` holds {values[:4]}, not one "
                        "variable's marker; the weights file layout cannot be "
                        "learned."
                    )
                layout[paths[marker - 1]] = name
    missing = sorted(set(paths) - set(layout))
    if missing:
        raise ValueError(
            f"Keras saved no dataset for the probe variable `{missing[0]}`; the "
            "weights file layout cannot be learned."
        )
    return layout
