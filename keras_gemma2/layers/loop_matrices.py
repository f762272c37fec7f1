"""Attention kernels as matrices that an XLA decode loop carries.

A decode step at batch 1 multiplies one row by each attention kernel. On
XLA (CPU) two things made those products slow on the benchmark's mid model
(hidden 512, 8/4 heads of 64; jax 0.10, TensorFlow 2.21, 2 cores):

- The kernels are 3-D (`[hidden, heads, head_dim]`) and the product reads
  them through a reshape. TensorFlow's XLA fuses that producer into a
  one-row product as a naive loop, which is why `projection.project` sends
  a lone row through them as two rows; the two-row products streamed 8-12
  GB/s (`[512, 256]`, `[512, 512]`), against 31 GB/s for the feed-forward's
  stored `[512, 2048]` matrices.
- Small matrices stream slowly even as one row: `[512, 256]` 10 GB/s,
  `[512, 512]` 16 GB/s, the same three fused as one `[512, 1024]` product
  23 GB/s (a `tf.profiler` trace of the decode loop, medians of 64 steps).

So before its loop, `decode.decode_segment` computes each attention layer's
matrices (`matrices`): its query, key and value kernels concatenated into
one `[hidden, (heads + 2 kv_heads) head_dim]` matrix when that is at most
`FUSE_LIMIT_BYTES` (a copy, once per loop; else each reshaped to 2-D), and
its output kernel as a `[heads head_dim, hidden]` matrix. A reshape costs
nothing: XLA passes it into the loop as a bitcast. The loop carries them as
loop variables, so inside it each is a plain operand with no producer to
fuse. The layer reads them while
`carried(...)` is active (`lookup`); anywhere else it uses its kernels as
before. Only float kernels read as stored qualify: no LoRA, no
quantization, no bias, the kernel in the compute dtype.

Measured in one process, models alternating (case (a) of
`benchmarks/vs_llamacpp.py`: 32-token prompt, 64 new tokens, float32):
TensorFlow 581 -> 537 ms a call, jax 569 -> 549 ms; bfloat16 4-5% faster on
both (`docs/decode_speed.md`).
"""

import contextlib
import math
import threading

import keras
from keras import ops

from keras_gemma2.layers.projection import linear_einsum

# The largest fused query-key-value matrix, in bytes. Fusing helps matrices
# that are too small to stream at full speed on their own (measured up to
# 2 MiB fused); it costs one copy of the three kernels per decode loop, so
# larger ones (Gemma 2 2B's are 19 MiB in float32) keep their own products.
FUSE_LIMIT_BYTES = 8 * 1024 * 1024

# Bytes per element of the kernel dtypes that qualify.
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

_STATE = threading.local()


def _plain_kernel(layer):
    """Whether `layer` is an `EinsumDense` whose kernel is used as stored."""
    if not linear_einsum(layer) or getattr(layer, "lora_enabled", False):
        return False
    kernel_dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
    return kernel_dtype == layer.compute_dtype and kernel_dtype in _ITEMSIZE


def matrices(attention):
    """The carried matrices of a `SlidingWindowAttention`, or `None`.

    Returns a dict: `"qkv"`, `[hidden, (heads + 2 kv_heads) head_dim]`
    (query, key and value columns in that order) when at most
    `FUSE_LIMIT_BYTES`, else `"query"`, `"key"` and `"value"` (each
    `[hidden, heads head_dim]`, a reshape); and `"output"`, `[heads
    head_dim, hidden]`. `None` when any of the four kernels does not qualify
    (see the module docstring).

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.layers import SlidingWindowAttention
    >>> attention = SlidingWindowAttention(4, 2, 8)
    >>> x = np.ones((1, 3, 16), "float32")
    >>> _ = attention(x)
    >>> found = matrices(attention)
    >>> sorted(found), tuple(found["qkv"].shape), tuple(found["output"].shape)
    (['output', 'qkv'], (16, 64), (32, 16))
    >>> to_numpy = keras.ops.convert_to_numpy
    >>> with carried({id(attention): found}):
    ...     through_matrices = to_numpy(attention(x))
    >>> bool(np.allclose(through_matrices, to_numpy(attention(x)), atol=1e-5))
    True
    """
    layers = (
        attention.query_dense,
        attention.key_dense,
        attention.value_dense,
        attention.output_dense,
    )
    if not all(_plain_kernel(layer) for layer in layers):
        return None
    query, key, value, output = (layer.kernel for layer in layers)
    hidden = query.shape[0]
    parts = [ops.reshape(kernel, (hidden, -1)) for kernel in (query, key, value)]
    width = sum(part.shape[1] for part in parts)
    itemsize = _ITEMSIZE[keras.backend.standardize_dtype(query.dtype)]
    result = {"output": ops.reshape(output, (-1, output.shape[-1]))}
    if hidden * width * itemsize <= FUSE_LIMIT_BYTES:
        result["qkv"] = ops.concatenate(parts, axis=1)
    else:
        result.update(zip(("query", "key", "value"), parts, strict=True))
    return result


@contextlib.contextmanager
def carried(mapping):
    """While open, attention layers read these matrices (`lookup`).

    Args:
        mapping: dict from `id()` of a `SlidingWindowAttention` to its
            `matrices`.
    """
    outer = getattr(_STATE, "mapping", None)
    _STATE.mapping = mapping
    try:
        yield
    finally:
        _STATE.mapping = outer


def lookup(attention):
    """The carried `matrices` of `attention`, or `None` outside `carried`."""
    mapping = getattr(_STATE, "mapping", None)
    if not mapping:
        return None
    return mapping.get(id(attention))


def product(x, matrix, axes=1):
    """`x`'s rows times `matrix`: `[rows, matrix columns]`, one 2-D product.

    A row holds `x`'s last `axes` axes, flattened; `rows` is the product of
    the others.
    """
    rows = ops.reshape(x, (-1, math.prod(x.shape[-axes:])))
    return ops.matmul(ops.cast(rows, matrix.dtype), matrix)


__all__ = ["FUSE_LIMIT_BYTES", "carried", "lookup", "matrices", "product"]
