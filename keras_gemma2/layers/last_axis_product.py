"""Products contracting the last axis of both operands, without copying either.

`einsum("...d,...sd->...s")` is the natural way to write attention logits
(`q . k`) and tied-embedding logits (`h . E`). Keras's TensorFlow einsum
rewrites such equations as `transpose(y)` then `matmul`, and XLA
materialises the transpose: a copy of the whole key cache per layer, and of
the whole embedding table, at every decode step. On TensorFlow this function
calls `tf.matmul(..., transpose_b=True)`, which reads `y` in place (as a
2-D product when `y` is a matrix); on the
other backends it is the einsum (JAX folds it into one dot, PyTorch into a
strided matmul).
"""

import keras
from keras import ops


def last_axis_product(equation, x, y):
    """`ops.einsum(equation, x, y)` for an equation contracting both last axes.

    Args:
        equation: the einsum, e.g. `"btd,vd->btv"` or `"bkgh,bksh->bkgs"`:
            `x [..., T, D]` and `y [..., S, D]` (batch axes of `y` equal to
            `x`'s or absent) to `[..., T, S]`.
        x, y: tensors.

    Example:

    >>> import numpy as np
    >>> x, y = np.ones((2, 3, 4), "float32"), np.ones((5, 4), "float32")
    >>> tuple(last_axis_product("btd,vd->btv", x, y).shape)
    (2, 3, 5)
    """
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
        y = ops.cast(y, x.dtype)
        if len(y.shape) == 2 and len(x.shape) > 2:
            # A 2-D product: XLA lowered the broadcast batch matmul of a
            # decode step's `[1, 1, D]` row to a loop fusion that copied the
            # transposed table each time.
            rows = tf.reshape(x, (-1, x.shape[-1]))
            product = tf.matmul(rows, y, transpose_b=True)
            shape = tuple(x.shape[:-1]) + (y.shape[0],)
            if any(not isinstance(d, int) for d in shape):
                shape = tf.concat([tf.shape(x)[:-1], tf.shape(y)[:1]], 0)
            return tf.reshape(product, shape)
        return tf.matmul(x, y, transpose_b=True)
    return ops.einsum(equation, x, y)
