"""The primitives `gemma2_math` uses, as raw torch functions.

`keras.ops` on the torch backend computes the same with the same torch
kernels, but pays Keras' dispatch on every call; `TorchDecoder`'s decode
step calls these instead. Each primitive takes the arguments its `keras.ops`
namesake takes, in the way `gemma2_math` calls it.
"""

import functools
import types


@functools.cache
def _torch():
    import torch

    return torch


@functools.cache
def _dtype(dtype):
    """`torch.float32` for `"float32"` (or for `torch.float32`)."""
    torch = _torch()
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def cast(x, dtype):
    """`x` (tensor, number or list of numbers) as a tensor of `dtype`."""
    torch = _torch()
    if isinstance(x, torch.Tensor):
        return x.to(_dtype(dtype))
    return torch.tensor(x, dtype=_dtype(dtype))


def rms_normalization(x, scale, epsilon):
    """`x * rsqrt(mean(x**2, -1) + epsilon) * scale`, one torch kernel."""
    torch = _torch()
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight=scale, eps=epsilon)


def concatenate(tensors, axis):
    return _torch().cat(tensors, dim=axis)


def roll(x, shift, axis):
    return x.roll(shift, axis)


def gelu(x, approximate):
    mode = "tanh" if approximate else "none"
    return _torch().nn.functional.gelu(x, approximate=mode)


def where(condition, x, y):
    return _torch().where(condition, x, y)


def softmax(x, axis):
    return _torch().softmax(x, dim=axis)


def _unary(name):
    def apply(x):
        return getattr(_torch(), name)(x)

    apply.__name__ = name
    return apply


TORCH_OPS = types.SimpleNamespace(
    cast=cast,
    rms_normalization=rms_normalization,
    concatenate=concatenate,
    roll=roll,
    gelu=gelu,
    where=where,
    softmax=softmax,
    cos=_unary("cos"),
    sin=_unary("sin"),
    tanh=_unary("tanh"),
)
