"""Gemma's RMS normalization."""

import keras
from keras import ops

from keras_gemma2.layers.gemma2_math import rms_norm
from keras_gemma2.layers.validation import non_negative_number


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2RMSNormalization(keras.layers.Layer):
    """RMS normalization with a zero-initialised `1 + scale` gain.

    Computes `x * rsqrt(mean(x**2, axis=-1) + epsilon) * (1 + scale)` in
    float32 whatever the compute dtype, then casts back, as Gemma 2 does.

    Args:
        epsilon: float. Added to the mean square. Defaults to `1e-6`.

    Example:

    >>> import numpy as np
    >>> norm = Gemma2RMSNormalization()
    >>> out = norm(np.array([[3.0, 4.0]], "float32"))
    >>> [round(float(v), 4) for v in keras.ops.convert_to_numpy(out)[0]]
    [0.8485, 1.1314]
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = non_negative_number(epsilon, "epsilon")

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale",
            shape=(input_shape[-1],),
            initializer="zeros",
        )
        self.built = True

    def call(self, x):
        return rms_norm(x, 1.0 + ops.cast(self.scale, "float32"), self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
