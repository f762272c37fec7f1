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

So generation computes each attention layer's matrices (`matrices`): its
query, key and value kernels concatenated into one `[hidden, (heads + 2
kv_heads) head_dim]` matrix when that is at most `FUSE_LIMIT_BYTES` (a
copy, made once per call in the prefill program and handed to every decode
loop; else each reshaped to 2-D), and its output kernel as a `[heads
head_dim, hidden]` matrix. A reshape costs nothing inside a program (XLA
passes it into the loop as a bitcast), so each program makes its own. The
loop carries them as loop variables, so inside it each is a plain operand
with no producer to fuse. The layer reads them while `carried(...)` is
active (`lookup`); anywhere else it uses its kernels as before. Only float
kernels read as stored qualify: no LoRA, no quantization, no bias, the
kernel in the compute dtype.

Measured in one process, models alternating (case (a) of
`benchmarks/vs_llamacpp.py`: 32-token prompt, 64 new tokens, float32):
TensorFlow 581 -> 537 ms a call, jax 569 -> 549 ms; bfloat16 4-5% faster on
both (`docs/decode_speed.md`).

bfloat16 kernels: XLA (CPU) multiplies them as float32 copies, which it
made again in every program of a generation (the prefill and each decode
loop; for the tied head a transposed copy too), 30-40 ms a program on the
mid model. So `matrices(..., dtype="float32")` converts the attention
kernels, `feed_forward_matrices` the feed-forward's and `head_matrices` the
tied embedding; generation builds them once per call, in its prefill
(`decode.prefill_and_choose`). Products through them return the input's
dtype, as the layers' own do: one row, case (a), bfloat16, jax 780 -> 630
ms a call, TensorFlow 728 -> 552 ms.

The tied head and the feed-forward's down kernels: XLA (CPU) streams a
one-row product fastest when the matrix is stored with the wider of its
two axes last. The tied `[vocabulary, hidden]` table, contracted over its
last axis, streamed at 26 GB/s and the same table stored `[hidden,
vocabulary]` at 34-35; a `[2048, 512]` down kernel as stored at 20-21 GB/s
and transposed, contracted over its last axis, at 33-35 (jax 0.10, mid
model, float32, `jax.jit` chains). So `head_matrices` hands generation the
table as columns and `feed_forward_matrices` the down kernels as rows, made
once per call in the prefill: within the float32 conversion of bfloat16
kernels (no extra memory), and for kernels kept in their dtype only while
all those copies together (`layout_copy_bytes`) fit
`LAYOUT_COPY_LIMIT_BYTES`, since they live for the call (the mid model's
come to 99 MB; Gemma 2 2B's float32 ones, 4.6 GB, are read in place).
Case (a), float32, one process alternating: jax 527 -> 505 ms, TensorFlow
532 -> 491 ms for the down kernels (`docs/decode_speed.md`).
"""

import contextlib
import math
import threading

import keras
from keras import ops

from keras_gemma2.layers.last_axis_product import last_axis_product
from keras_gemma2.layers.projection import linear_einsum

# The largest fused query-key-value matrix, in bytes. Fusing helps matrices
# that are too small to stream at full speed on their own (measured up to
# 2 MiB fused); it costs one copy of the three kernels per decode loop, so
# larger ones (Gemma 2 2B's are 19 MiB in float32) keep their own products.
FUSE_LIMIT_BYTES = 8 * 1024 * 1024

# The most bytes a generation call copies to read kernels kept in their own
# dtype in a faster layout (`layout_copy_bytes`: the tied head's table as
# columns, the feed-forward's down kernels as rows). The copies live for the
# call. Converted kernels (bfloat16 to float32) are copies anyway and take
# the faster layout whatever their size.
LAYOUT_COPY_LIMIT_BYTES = 256 * 1024 * 1024

# The fewest decode steps a call must have room for to make those copies:
# on the mid model they cost about 21 ms a call and save about 0.95 ms a
# token (jax, float32: 8 new tokens 86 -> 102 ms with them, 24 new tokens
# 232 -> 225 ms, 64 new tokens 527 -> 505 ms).
LAYOUT_COPY_MIN_STEPS = 32

# Bytes per element of the kernel dtypes that qualify.
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

_STATE = threading.local()


def _plain_kernel(layer):
    """Whether `layer` is an `EinsumDense` whose kernel is used as stored."""
    if not linear_einsum(layer) or getattr(layer, "lora_enabled", False):
        return False
    kernel_dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
    return kernel_dtype == layer.compute_dtype and kernel_dtype in _ITEMSIZE


def _convert(kernel, dtype):
    """`kernel` as a tensor, converted to `dtype` (`None`: kept)."""
    return ops.convert_to_tensor(kernel) if dtype is None else ops.cast(kernel, dtype)


def _in_part(name, copied, part):
    """Whether the matrix `name` belongs to `part` (`"all"`, `"copies"`: the
    names in `copied`, `"views"`: the others)."""
    return part == "all" or (name in copied) == (part == "copies")


def matrices(attention, dtype=None, part="all"):
    """The carried matrices of a `SlidingWindowAttention`, or `None`.

    Returns a dict: `"qkv"`, `[hidden, (heads + 2 kv_heads) head_dim]`
    (query, key and value columns in that order) when at most
    `FUSE_LIMIT_BYTES`, else `"query"`, `"key"` and `"value"` (each
    `[hidden, heads head_dim]`, a reshape); and `"output"`, `[heads
    head_dim, hidden]`. `None` when any of the four kernels does not qualify
    (see the module docstring). `dtype`: the matrices' dtype (a converted
    copy); `None` keeps the kernels'. `part`: `"all"`, `"copies"` (only
    the matrices that copy a kernel: worth building once and handing to
    several programs) or `"views"` (the reshapes, free inside a program but
    a copy when a program returns them).

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
    hidden = layers[0].kernel.shape[0]
    width = sum(math.prod(layer.kernel.shape[1:]) for layer in layers[:3])
    stored = keras.backend.standardize_dtype(layers[0].kernel.dtype)
    itemsize = _ITEMSIZE[dtype or stored]
    fused = hidden * width * itemsize <= FUSE_LIMIT_BYTES
    names = ("qkv", "output") if fused else ("query", "key", "value", "output")
    # Without a conversion, only the fused matrix is a copy; the rest are
    # reshapes of the kernels.
    copied = {name for name in names if dtype is not None or name == "qkv"}
    names = [name for name in names if _in_part(name, copied, part)]

    def matrix(layer):
        kernel = _convert(layer.kernel, dtype)
        if layer is attention.output_dense:
            return ops.reshape(kernel, (-1, kernel.shape[-1]))
        return ops.reshape(kernel, (hidden, -1))

    result = {}
    for name in names:
        if name == "qkv":
            result[name] = ops.concatenate([matrix(x) for x in layers[:3]], axis=1)
        else:
            result[name] = matrix(getattr(attention, f"{name}_dense"))
    return result


def feed_forward_matrices(feed_forward, dtype, part="all", relayout=False):
    """A `Gemma2FeedForward`'s kernels for a decode loop, or `None`.

    Returns `{"gate", "up", "down_rows"}`: the gate and up kernels (2-D
    already) and the down kernel transposed, `[hidden, intermediate]`, which
    XLA (CPU) streams faster one row at a time (`[2048, 512]` in a `jax.jit`
    chain: 198-209 us as stored, 121-128 us transposed). `dtype`: all three
    converted to it; `None` (or the kernels' dtype) keeps theirs, and then
    only with `relayout` (see `LAYOUT_COPY_LIMIT_BYTES`), since the
    transposed kernel is then a copy of its own. `None` when a kernel is not
    read as stored (LoRA, quantized). `part="copies"`: only the copies (all
    three when converted, else `"down_rows"`); `"views"`: the rest.

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.layers import Gemma2FeedForward
    >>> feed_forward = Gemma2FeedForward(intermediate_dim=32, dtype="bfloat16")
    >>> x = np.ones((1, 1, 8), "float32")
    >>> _ = feed_forward(x)
    >>> found = feed_forward_matrices(feed_forward, "float32")
    >>> sorted(found), keras.backend.standardize_dtype(found["gate"].dtype)
    (['down_rows', 'gate', 'up'], 'float32')
    >>> to_numpy = keras.ops.convert_to_numpy
    >>> with carried({id(feed_forward): found}):
    ...     through_matrices = to_numpy(feed_forward(x))
    >>> bool((through_matrices == to_numpy(feed_forward(x))).all())
    True
    """
    layers = (feed_forward.gate_dense, feed_forward.up_dense, feed_forward.down_dense)
    if not all(_plain_kernel(layer) for layer in layers):
        return None
    if dtype == keras.backend.standardize_dtype(layers[0].kernel.dtype):
        dtype = None
    if dtype is None and not relayout:
        return None
    gate, up, down = layers
    build = {
        "gate": lambda: _convert(gate.kernel, dtype),
        "up": lambda: _convert(up.kernel, dtype),
        "down_rows": lambda: ops.transpose(_convert(down.kernel, dtype)),
    }
    copied = set(build) if dtype is not None else {"down_rows"}
    return {n: b() for n, b in build.items() if _in_part(n, copied, part)}


def head_matrices(embedding, dtype, part="all", relayout=False):
    """A tied embedding's table as `[hidden, vocabulary]` columns, or `None`.

    Returns `{"columns": [hidden, vocabulary]}`, the table transposed (and
    converted to `dtype`; `None` keeps its own), or `None` when the table is
    quantized, not a float in `_ITEMSIZE`, or kept in its own dtype without
    `relayout` (see `LAYOUT_COPY_LIMIT_BYTES`). It is a copy: `part="views"`
    gives `{}`.
    """
    if embedding.quantization_mode is not None:
        return None
    table = embedding.embeddings
    table_dtype = keras.backend.standardize_dtype(table.dtype)
    if table_dtype not in _ITEMSIZE:
        return None
    if (dtype is None or dtype == table_dtype) and not relayout:
        return None
    if part == "views":
        return {}
    return {"columns": ops.transpose(_convert(table, dtype))}


def layout_copy_bytes(backbone):
    """Bytes of the copies that read a backbone's tied head and down kernels
    in the faster layout (`head_matrices`, `feed_forward_matrices`), as
    stored; compared with `LAYOUT_COPY_LIMIT_BYTES`.

    Example:

    >>> from keras_gemma2 import Gemma2Backbone
    >>> backbone = Gemma2Backbone(vocabulary_size=64, num_layers=2,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=4)
    >>> layout_copy_bytes(backbone) == (64 * 8 + 2 * 16 * 8) * 4
    True
    """
    kernels = [backbone.token_embedding.embeddings]
    kernels += [block.ffw.down_dense.kernel for block in backbone.transformer_layers]
    # Kernels not in a float dtype (quantized) are not copied.
    return sum(
        math.prod(k.shape) * _ITEMSIZE.get(keras.backend.standardize_dtype(k.dtype), 0)
        for k in kernels
    )


@contextlib.contextmanager
def carried(mapping):
    """While open, attention layers read these matrices (`lookup`).

    Args:
        mapping: dict from `id()` of a layer to its matrices: a
            `SlidingWindowAttention`'s `matrices`, a `Gemma2FeedForward`'s
            `feed_forward_matrices`, a tied embedding's `head_matrices`.
    """
    outer = getattr(_STATE, "mapping", None)
    _STATE.mapping = mapping
    try:
        yield
    finally:
        _STATE.mapping = outer


def lookup(layer):
    """The carried matrices of `layer`, or `None` (outside `carried`, or none)."""
    mapping = getattr(_STATE, "mapping", None)
    if not mapping:
        return None
    return mapping.get(id(layer))


def row_product(x, rows):
    """`x`'s rows times `rows` transposed: `rows` is `[out, in]`, contracted
    over its last axis. Runs in `rows`' dtype and returns `x`'s."""
    flat = ops.reshape(x, (-1, x.shape[-1]))
    flat = ops.cast(flat, rows.dtype)
    return ops.cast(last_axis_product("rd,od->ro", flat, rows), x.dtype)


def product(x, matrix, axes=1):
    """`x`'s rows times `matrix`: `[rows, matrix columns]`, one 2-D product.

    A row holds `x`'s last `axes` axes, flattened; `rows` is the product of
    the others. The product runs in `matrix`'s dtype and returns `x`'s.
    """
    rows = ops.reshape(x, (-1, math.prod(x.shape[-axes:])))
    return ops.cast(ops.matmul(ops.cast(rows, matrix.dtype), matrix), x.dtype)


__all__ = [
    "FUSE_LIMIT_BYTES",
    "LAYOUT_COPY_LIMIT_BYTES",
    "LAYOUT_COPY_MIN_STEPS",
    "carried",
    "feed_forward_matrices",
    "head_matrices",
    "layout_copy_bytes",
    "lookup",
    "matrices",
    "product",
    "row_product",
]
