"""Gemma's GeGLU feed-forward network."""

import keras
from keras import ops

from keras_gemma2.layers import loop_matrices
from keras_gemma2.layers.gemma2_math import geglu
from keras_gemma2.layers.projection import project
from keras_gemma2.layers.validation import positive_int


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2FeedForward(keras.layers.Layer):
    """`down(gelu_tanh(gate(x)) * up(x))`, with the tanh-approximate GELU.

    Args:
        intermediate_dim: int. Width of each of the gate and up branches
            (HF `intermediate_size`).
        kernel_initializer: initializer for the three projections. Defaults to
            `"glorot_uniform"`.

    Example:

    >>> import numpy as np
    >>> ffw = Gemma2FeedForward(intermediate_dim=32)
    >>> tuple(ffw(np.ones((1, 3, 8), "float32")).shape)
    (1, 3, 8)
    """

    def __init__(self, intermediate_dim, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.intermediate_dim = positive_int(intermediate_dim, "intermediate_dim")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]

        def projection(name, output_dim):
            return keras.layers.EinsumDense(
                "btd,df->btf",
                output_shape=(None, output_dim),
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name=name,
            )

        self.gate_dense = projection("gate", self.intermediate_dim)
        self.gate_dense.build(input_shape)
        self.up_dense = projection("up", self.intermediate_dim)
        self.up_dense.build(input_shape)
        self.down_dense = projection("down", hidden_dim)
        self.down_dense.build((None, None, self.intermediate_dim))
        self.built = True

    def call(self, x):
        carried = loop_matrices.lookup(self)  # set inside generation
        if carried is None:
            gated = geglu(project(self.gate_dense, x), project(self.up_dense, x))
            return project(self.down_dense, gated)
        shape = ops.shape(x)

        def through(rows, name):
            product = loop_matrices.product(rows, carried[name])
            return ops.reshape(product, (*shape[:-1], -1))

        gated = geglu(through(x, "gate"), through(x, "up"))
        if "down_rows" in carried:
            product = loop_matrices.row_product(gated, carried["down_rows"])
            return ops.reshape(product, (*shape[:-1], -1))
        return through(gated, "down")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
