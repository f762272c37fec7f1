"""The primitives `gemma2_math` uses, as raw torch functions.

`keras.ops` on the torch backend computes the same with the same torch
kernels, but pays Keras' dispatch on every call; `TorchDecoder`'s decode
step calls these instead. Each primitive takes the arguments its `keras.ops`
namesake takes, in the way `gemma2_math` calls it.
"""

import functools
import types


def torch_module():
    """`torch`, imported on first use (this module loads on every backend).

    Not `functools.cache`d: `torch.compile` traces the compiled decode step
    through these helpers, and warns about every cache wrapper it meets;
    an `import` of a loaded module costs about as little.
    """
    import torch

    return torch


_torch = torch_module


def _dtype(dtype):
    """`torch.float32` for `"float32"` (or for `torch.float32`)."""
    torch = _torch()
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def cast(x, dtype):
    """`x` (tensor, number or list of numbers) as a tensor of `dtype`."""
    torch = _torch()
    if isinstance(x, torch.Tensor):
        dtype = _dtype(dtype)
        # `x` itself when it has the dtype, as `to` returns it, without
        # `to`'s call (about 1 us; a decode step casts about 70 times).
        return x if x.dtype == dtype else x.to(dtype)
    return torch.tensor(x, dtype=_dtype(dtype))


def rms_normalization(x, scale, epsilon):
    """`x * rsqrt(mean(x**2, -1) + epsilon) * scale`, one torch kernel."""
    return _torch().rms_norm(x, (x.shape[-1],), scale, epsilon)


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
    sigmoid=_unary("sigmoid"),
    multiply=lambda x, y: _torch().multiply(x, y),
    add=lambda x, y: _torch().add(x, y),
)


def softmax_in_place(x, axis):
    """`softmax(x, axis)` written over `x` on CPU; a new tensor elsewhere.

    Torch's CPU kernel reads each row's maximum, then writes `exp(x - max)`
    element by element and scales the row by its sum, so its output may be
    its input (`tests/layers/test_torch_ops.py` holds it to `torch.softmax`
    bit for bit). Other devices' kernels are not relied on for that.
    """
    torch = _torch()
    if x.device.type != "cpu":
        return torch.softmax(x, dim=axis)
    # `softmax`'s `out=` reaches the same `_softmax.out` kernel as
    # `torch.ops.aten._softmax.out`, in 3.9 against 5.5 us of dispatch.
    return torch.softmax(x, dim=axis, out=x)


@functools.lru_cache(maxsize=256)
def _float32_scalar(value):
    """A 0-d float32 CPU tensor of `value`, made once."""
    return _torch().tensor(value, dtype=_torch().float32)


def _operand(x, y):
    """`y` for an in-place op on `x`: a Python float as a cached 0-d tensor.

    Only for float32 `x`, where torch rounds a Python scalar to float32
    just as the tensor holds it (bit for bit the same product); a scalar
    operand costs 2.4 us a call against 0.9 us for a 0-d tensor.
    """
    if isinstance(y, float) and x.dtype == _torch().float32:
        return _float32_scalar(y)
    return y


# `TORCH_OPS` whose elementwise arithmetic (`multiply`, `add`, `sigmoid`)
# and (on CPU) `softmax` write into their first argument, which must be a
# tensor the caller owns and may lose (a fresh product, or a scratch buffer)
# and at least as large as the result. On the prompt's attention logits
# (4.2M float32 per block on the mid config) `math.biased_softmax` measured
# 3.0 ms in place against 9.0 ms allocating each intermediate; a fresh
# tensor of that size is also page-faulted in as it is first written (see
# `TorchDecoder.write_prompt`).
TORCH_OPS_IN_PLACE = types.SimpleNamespace(
    **{
        **vars(TORCH_OPS),
        "multiply": lambda x, y: x.mul_(_operand(x, y)),
        "add": lambda x, y: x.add_(_operand(x, y)),
        "sigmoid": lambda x: x.sigmoid_(),
        "softmax": softmax_in_place,
    }
)
