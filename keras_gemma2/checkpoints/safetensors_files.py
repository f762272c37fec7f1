"""Tensor-by-tensor reading of safetensors files, bfloat16 included.

`safetensors` validates each file and reads float32 tensors; numpy has no
bfloat16, so those are read from the file's byte layout (an 8-byte
little-endian header length, a JSON header of dtypes, shapes and byte
offsets, then the data) and viewed as `ml_dtypes.bfloat16`.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open

_NUMPY_DTYPES = {
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class TensorEntry:
    """Where one tensor lives: file, dtype string, shape and byte range."""

    def __init__(self, name, path, dtype, shape, begin, end):
        self.name = name
        self.path = path
        self.dtype = dtype
        self.shape = tuple(shape)
        self.begin = begin
        self.end = end


def read_header(path):
    """Return `{name: TensorEntry}` of one safetensors file, checking its layout.

    Raises `ValueError` naming the file when it is truncated, corrupt or holds
    a dtype other than float32, float16 or bfloat16.
    """
    size = os.path.getsize(path)
    try:
        # safetensors checks the header and that every byte range fits the file.
        with safe_open(path, framework="numpy"):
            pass
    except Exception as error:  # its exception types vary between versions
        raise ValueError(
            f"The safetensors file {path} is truncated or corrupt "
            f"({size} bytes): {error}"
        ) from None
    with open(path, "rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_length))
    data_start = 8 + header_length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _NUMPY_DTYPES:
            raise ValueError(
                f"Tensor `{name}` in {path} has dtype {info['dtype']}; expected "
                f"one of {sorted(_NUMPY_DTYPES)}."
            )
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(
            name,
            path,
            info["dtype"],
            info["shape"],
            data_start + begin,
            data_start + end,
        )
    return entries


def read_tensor(entry):
    """Read one tensor into a new numpy array of its stored dtype."""
    dtype = _NUMPY_DTYPES[entry.dtype]
    count = int(np.prod(entry.shape, dtype=np.int64))
    # Read straight into a writable array: no intermediate bytes object.
    array = np.empty(entry.shape, dtype=dtype)
    with open(entry.path, "rb") as file:
        file.seek(entry.begin)
        read = file.readinto(memoryview(array.reshape(-1).view(np.uint8)))
    if read != count * dtype.itemsize:
        raise ValueError(
            f"Tensor `{entry.name}` in {entry.path}: read {read} bytes, "
            f"expected {count * dtype.itemsize}. The file is truncated."
        )
    return array
