"""Tanh soft-capping as a function and as layers.

The formula itself, `cap * tanh(x / cap)`, is `gemma2_math.soft_cap`, which
the attention kernels, the output head and `TorchDecoder` all call.
"""

import keras
from keras import ops

from keras_gemma2.layers.gemma2_math import soft_cap as capped


def soft_cap(x, cap):
    """Squash `x` smoothly into the open interval `(-cap, cap)`.

    Gemma 2 applies this to attention logits (cap 50) and final logits (cap 30).
    Near zero it is the identity; large values saturate at `+-cap`.

    Args:
        x: tensor. Values to cap.
        cap: float or `None`. The bound. `None` returns `x` unchanged.

    Example:

    >>> import numpy as np
    >>> y = soft_cap(np.array([0.0, 100.0], "float32"), 30.0)
    >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(y)]
    [0.0, 29.924]
    """
    if cap is None:
        return x
    return capped(ops.convert_to_tensor(x), validate_soft_cap(cap, "cap"))


def validate_soft_cap(value, name):
    """Return `value` as a positive float or `None`; raise `ValueError` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive number "
            f"or None. Received: {name}={value!r}"
        )
    return float(value)


@keras.saving.register_keras_serializable(package="keras_gemma2")
class SoftCap(keras.layers.Layer):
    """Layer form of `soft_cap`, for functional models.

    Args:
        cap: float or `None`. The bound; `None` makes the layer the identity.

    Example:

    >>> import numpy as np
    >>> layer = SoftCap(cap=2.0)
    >>> out = layer(np.array([[10.0]], "float32"))
    >>> round(float(keras.ops.convert_to_numpy(out)[0, 0]), 4)
    1.9998
    """

    def __init__(self, cap=None, **kwargs):
        super().__init__(**kwargs)
        self.cap = validate_soft_cap(cap, "cap")

    def call(self, inputs):
        return soft_cap(inputs, self.cap)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "cap": self.cap}


@keras.saving.register_keras_serializable(package="keras_gemma2")
class SoftCappedDense(keras.layers.Dense):
    """A `keras.layers.Dense` whose outputs are tanh soft-capped.

    Being a `Dense`, it keeps Keras' LoRA (`enable_lora`) and quantization
    hooks. The cap is applied after the bias and activation.

    `Gemma2CausalLM` does not use it: Gemma 2's output head is the token
    embedding itself, transposed (`ReversibleEmbedding(reverse=True)`), so
    its soft cap is the `SoftCap` layer over the tied logits. This layer is
    for heads with weights of their own, e.g. a classifier or a value head
    on `Gemma2Backbone`, or an untied student head in distillation.

    Args:
        units: int. Output width.
        soft_cap: float or `None`. The bound applied to the outputs.
            `None` makes the layer a plain `Dense`. Defaults to `None`.
        **kwargs: all other `keras.layers.Dense` arguments.

    Example:

    >>> import numpy as np
    >>> layer = SoftCappedDense(4, soft_cap=1.0, kernel_initializer="ones")
    >>> out = layer(np.full((1, 3), 0.5, "float32"))
    >>> [round(float(v), 4) for v in keras.ops.convert_to_numpy(out)[0]]
    [0.9051, 0.9051, 0.9051, 0.9051]
    """

    def __init__(self, units, soft_cap=None, **kwargs):
        super().__init__(units, **kwargs)
        self.soft_cap = validate_soft_cap(soft_cap, "soft_cap")

    def call(self, inputs, training=None):
        return soft_cap(super().call(inputs, training=training), self.soft_cap)

    def get_config(self):
        return {**super().get_config(), "soft_cap": self.soft_cap}
