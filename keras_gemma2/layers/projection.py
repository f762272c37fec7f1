"""Bias-free `EinsumDense` projections, with a TensorFlow path for one row.

A decode step with batch 1 projects a single row through every kernel.
TensorFlow 2.21's XLA (CPU) fuses such a matrix-vector product into the loop
fusion of its elementwise neighbours (the RMS norm before it, the residual
add after it) and emits it as a naive single-threaded loop: on a 2-core CPU a
`[1, 512] x [512, 512]` projection in a chain of eight, each behind a norm,
took 0.20 ms, against 0.05 ms when nothing was fused around it. A two-row
product is not a matrix-vector product, so XLA leaves it to its matmul
kernel: the same chain took 0.04 ms per projection (`benchmarks/generate.py`
shows what it does to whole decode steps). `project` therefore duplicates a
lone row on TensorFlow and keeps the first result row. Elsewhere, and for any
other input, it is `layer(x)`. JAX's XLA does not fuse this way (0.05 ms per
projection in the same chain).

What XLA fuses into a matrix-vector product is the producer of its matrix:
the reshape of a 3-D kernel (query, key, value, attention output) to 2-D,
or the cast or LoRA sum of a kernel computed in the graph. A float32 kernel
that is already a matrix and read as stored (the feed-forward's gate, up
and down) has no producer to fuse, and its one-row product runs on XLA's
matrix-vector kernel, faster than two rows: a 4 MB `[512, 2048]` kernel in
a chain of norms and products took 159 us per product as one row against
246 us as two (TensorFlow 2.21, 2 CPU cores); whole decode steps of the
benchmark's mid model, processes alternating, 9.9-10.8 -> 8.4-8.9 ms per
token. Those kernels take one row (`_duplicates_one_row`).

Inside a decode loop on XLA (CPU), attention layers multiply by matrices
the loop carries instead (`loop_matrices`): one row, no producer.

int8 layers that quantize their input (Keras' default int8) take the two-row
path on jax and TensorFlow alike, through the layer itself
(`int8_products.duplicate_row`): XLA multiplies int8 on its int8 kernels
only with two or more rows.
"""

import math

import keras
from keras import ops

from keras_gemma2.layers.int8_products import duplicate_row, xla_int8_backend


def _contracted_axes(equation):
    """How many leading kernel axes `equation` contracts, or `None`.

    Only equations `"<rows><c>,<c><outputs>-><rows><outputs>"` qualify: the
    input's last axes are the kernel's first ones, in order, and the output
    keeps the input's other axes followed by the kernel's remaining ones.
    """
    try:
        operands, output = equation.replace(" ", "").split("->")
        inputs, kernel = operands.split(",")
    except ValueError:
        return None
    contracted = "".join(c for c in kernel if c not in output)
    count = len(contracted)
    if (
        not count
        or not kernel.startswith(contracted)
        or not inputs.endswith(contracted)
        or output != inputs[:-count] + kernel[count:]
    ):
        return None
    return count


def linear_einsum(layer):
    """Whether `layer` is a built `EinsumDense` computing `x @ kernel` alone:
    no bias, no quantization, no activation."""
    if not isinstance(layer, keras.layers.EinsumDense) or not layer.built:
        return False
    if layer.quantization_mode is not None or layer.bias is not None:
        return False
    return layer.activation in (None, keras.activations.linear)


def _single_row_axes(layer, x):
    """Contracted axes if `layer(x)` may take the two-row path, else `None`."""
    if keras.config.backend() != "tensorflow" or not linear_einsum(layer):
        return None
    count = _contracted_axes(layer.equation)
    shape = tuple(x.shape)
    if count is None or any(not isinstance(d, int) for d in shape):
        return None
    if math.prod(shape[:-count]) != 1:
        return None
    return count


def _duplicates_one_row(layer):
    """Whether a lone row goes through `layer`'s kernel as two rows (above)."""
    kernel = layer.kernel
    return not (
        len(kernel.shape) == 2
        and not getattr(layer, "lora_enabled", False)
        and keras.backend.standardize_dtype(kernel.dtype) == "float32"
        and layer.compute_dtype == "float32"
    )


def _int8_duplicated(layer, x):
    """Whether `layer(x)` should run as two rows on XLA's int8 kernels."""
    if not xla_int8_backend() or not isinstance(layer, keras.layers.EinsumDense):
        return False
    if getattr(layer, "quantization_mode", None) != "int8":
        return False
    if not getattr(layer, "inputs_quantizer", None):
        return False  # float rows times int8 weights: no int8 product
    count = _contracted_axes(layer.equation)
    shape = tuple(x.shape)
    if count is None or any(not isinstance(d, int) for d in shape):
        return False
    return math.prod(shape[:-count]) == 1


def project(layer, x):
    """`layer(x)` for an `EinsumDense` layer; one row may go two-row (see above).

    Args:
        layer: a built `keras.layers.EinsumDense` (any other layer is called).
        x: the input tensor.

    Returns:
        `layer(x)`, in the layer's compute dtype.

    Example:

    >>> import numpy as np
    >>> dense = keras.layers.EinsumDense("btd,dnh->btnh", (None, 2, 3))
    >>> x = np.ones((1, 1, 4), "float32")
    >>> dense.build(x.shape)
    >>> to_numpy = keras.ops.convert_to_numpy
    >>> bool(np.allclose(to_numpy(project(dense, x)), to_numpy(dense(x))))
    True
    """
    if _int8_duplicated(layer, x):
        return duplicate_row(layer, x)
    count = _single_row_axes(layer, x)
    if count is None:
        return layer(x)
    import tensorflow as tf

    dtype = layer.compute_dtype
    kernel = ops.cast(layer.kernel, dtype)  # with LoRA merged when enabled
    contracted = math.prod(kernel.shape[:count])
    outputs = tuple(kernel.shape[count:])
    row = tf.reshape(ops.cast(x, dtype), (1, contracted))
    if _duplicates_one_row(layer):
        row = tf.concat([row, row], axis=0)
    product = tf.matmul(row, tf.reshape(kernel, (contracted, -1)))[:1]
    return tf.reshape(product, tuple(x.shape[:-count]) + outputs)


__all__ = ["linear_einsum", "project"]
