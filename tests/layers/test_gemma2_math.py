"""Gemma 2's arithmetic against float64 numpy, through both ops namespaces.

Every function of `gemma2_math` runs once with `keras.ops` (the layers'
path, on the current backend) and once with `TORCH_OPS` on raw torch
tensors (`TorchDecoder`'s path; torch is installed under every backend), and
both are compared with a float64 numpy formula written here from the Gemma 2
definitions (GEMMA2.md), and with each other in bfloat16.
"""

import math as python_math

import keras
import ml_dtypes
import numpy as np
import pytest
from keras import ops

from keras_gemma2.layers import gemma2_math
from keras_gemma2.layers.torch_ops import TORCH_OPS

RNG = np.random.default_rng(0)


def keras_tensor(array, dtype="float32"):
    return ops.cast(ops.convert_to_tensor(np.asarray(array, "float32")), dtype)


def torch_tensor(array, dtype="float32"):
    import torch

    return torch.tensor(np.asarray(array, "float32")).to(getattr(torch, dtype))


def to_numpy(x):
    if hasattr(x, "detach"):  # a torch tensor, under any backend
        return x.detach().float().numpy().astype("float64")
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), "float64")


NAMESPACES = {"keras_ops": (ops, keras_tensor), "torch_ops": (TORCH_OPS, torch_tensor)}


def run(namespace, function, *arrays, dtype="float32", **kwargs):
    """`function(*tensors, ..., ops=namespace)` as float64 numpy."""
    ops_namespace, tensor = NAMESPACES[namespace]
    tensors = [tensor(a, dtype) if isinstance(a, np.ndarray) else a for a in arrays]
    return to_numpy(function(*tensors, ops=ops_namespace, **kwargs))


def bfloat16(array):
    """`array` rounded to bfloat16, as float64."""
    return np.asarray(array, "float32").astype(ml_dtypes.bfloat16).astype("float64")


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_rms_norm(namespace):
    x = RNG.normal(0, 3, (3, 8))
    gain = 1.0 + RNG.normal(0, 0.5, 8)
    epsilon = 1e-2  # large enough to matter
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + epsilon) * gain
    gain32 = np.asarray(gain, "float32")
    actual = run(namespace, gemma2_math.rms_norm, x, gain32, epsilon)
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-6)
    # bfloat16 input: normalised in float32, rounded back once.
    low = run(namespace, gemma2_math.rms_norm, x, gain32, epsilon, dtype="bfloat16")
    x16 = bfloat16(x)
    expected16 = x16 / np.sqrt((x16**2).mean(-1, keepdims=True) + epsilon) * gain
    np.testing.assert_allclose(low, bfloat16(expected16), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_rope(namespace):
    head_dim, theta = 8, 500.0
    positions = np.array([0.0, 1.0, 7.0, 300.0])
    x = RNG.normal(size=(4, 2, head_dim))  # [T, heads, H]
    half = head_dim // 2
    inverse = theta ** (-np.arange(half) * 2.0 / head_dim)
    angles = positions[:, None, None] * inverse  # [T, 1, H/2]
    x1, x2 = x[..., :half], x[..., half:]
    expected = np.concatenate(
        [
            x1 * np.cos(angles) - x2 * np.sin(angles),
            x2 * np.cos(angles) + x1 * np.sin(angles),
        ],
        axis=-1,
    )
    ops_namespace, tensor = NAMESPACES[namespace]
    frequencies = gemma2_math.rope_inverse_frequencies(head_dim, theta, ops_namespace)
    np.testing.assert_allclose(to_numpy(frequencies), inverse, rtol=1e-6)
    rotation = gemma2_math.rope_rotation(
        tensor(positions[:, None]), frequencies, "float32", ops_namespace
    )
    actual = gemma2_math.rope_rotate(tensor(x), rotation, ops_namespace)
    np.testing.assert_allclose(to_numpy(actual), expected, atol=2e-4)


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_soft_cap(namespace):
    x = np.array([-300.0, -3.0, 0.0, 0.5, 40.0])
    actual = run(namespace, gemma2_math.soft_cap, x, 30.0)
    np.testing.assert_allclose(actual, 30.0 * np.tanh(x / 30.0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(run(namespace, gemma2_math.soft_cap, x, None), x)


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_geglu_uses_the_tanh_gelu(namespace):
    gate, up = RNG.normal(0, 2, (2, 6)), RNG.normal(size=(2, 6))
    tanh_gelu = (
        0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    )
    actual = run(namespace, gemma2_math.geglu, gate, up)
    np.testing.assert_allclose(actual, tanh_gelu * up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_masked_softmax(namespace):
    logits = RNG.normal(0, 20, (3, 5))
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    capped = 4.0 * np.tanh(logits / 4.0)
    masked = np.where(mask, capped, -1e9)
    expected = np.exp(masked - masked.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(expected[1], 0.2)  # no visible key: uniform
    ops_namespace, tensor = NAMESPACES[namespace]
    if namespace == "torch_ops":
        import torch

        mask_tensor = torch.tensor(mask)
    else:
        mask_tensor = ops.convert_to_tensor(mask)
    actual = gemma2_math.masked_softmax(tensor(logits), mask_tensor, 4.0, ops_namespace)
    np.testing.assert_allclose(to_numpy(actual), expected, rtol=1e-5, atol=1e-7)
    unmasked = gemma2_math.masked_softmax(tensor(logits), None, None, ops_namespace)
    plain = np.exp(logits - logits.max(-1, keepdims=True))
    plain /= plain.sum(-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(unmasked), plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("namespace", sorted(NAMESPACES) + ["torch_ops_in_place"])
@pytest.mark.parametrize("cap", [4.0, 50.0, None])
def test_biased_softmax(namespace, cap):
    """The sigmoid soft cap and the added mask against float64 tanh and where."""
    logits = RNG.normal(0, 20, (3, 7, 9))
    mask = RNG.random((7, 9)) < 0.5
    mask[:, 0] = True  # every row sees a key
    capped = logits if cap is None else cap * np.tanh(logits / cap)
    masked = np.where(mask, capped, -1e9)
    expected = np.exp(masked - masked.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    if namespace == "torch_ops_in_place":
        import torch

        from keras_gemma2.layers.torch_ops import TORCH_OPS_IN_PLACE

        ops_namespace = TORCH_OPS_IN_PLACE
        given = torch.tensor(logits, dtype=torch.float32)
        bias = gemma2_math.masking_bias(torch.tensor(mask), ops_namespace)
    else:
        ops_namespace, tensor = NAMESPACES[namespace]
        given = tensor(logits)
        mask_tensor = ops.convert_to_tensor(mask)
        if namespace == "torch_ops":
            import torch

            mask_tensor = torch.tensor(mask)
        bias = gemma2_math.masking_bias(mask_tensor, ops_namespace)
    assert set(np.unique(to_numpy(bias))) == {0.0, np.float32(-1e9)}
    actual = gemma2_math.biased_softmax(given, bias, cap, ops_namespace)
    assert actual.shape == logits.shape
    np.testing.assert_allclose(to_numpy(actual), expected, rtol=1e-5, atol=1e-7)
    if namespace == "torch_ops_in_place":
        # On CPU every step, the softmax too, writes over the logits.
        assert actual.data_ptr() == given.data_ptr()
    # No bias: every key visible.
    capped_all = np.exp(capped - capped.max(-1, keepdims=True))
    capped_all /= capped_all.sum(-1, keepdims=True)
    if namespace == "torch_ops_in_place":
        given = torch.tensor(logits, dtype=torch.float32)
    else:
        given = tensor(logits)
    unbiased = gemma2_math.biased_softmax(given, None, cap, ops_namespace)
    # More visible keys than above, so more float32 sigmoid rounding (TF: 1.4e-5).
    np.testing.assert_allclose(to_numpy(unbiased), capped_all, rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_embedding_scale_is_rounded_to_the_compute_dtype(namespace):
    ops_namespace, _ = NAMESPACES[namespace]
    # GEMMA2.md: bf16 scales 48.0, 59.75, 68.0 for the 2B, 9B and 27B.
    for hidden, rounded in ((2304, 48.0), (3584, 59.75), (4608, 68.0)):
        scale = gemma2_math.embedding_scale(hidden, "bfloat16", ops_namespace)
        assert to_numpy(scale) == rounded
        scale = gemma2_math.embedding_scale(hidden, "float32", ops_namespace)
        assert to_numpy(scale) == np.float32(python_math.sqrt(hidden))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_two_namespaces_agree(dtype):
    """The layers' and the decoder's primitives give the same numbers."""
    x = RNG.normal(0, 2, (4, 16))
    gain = np.asarray(1.0 + RNG.normal(0, 0.5, 16), "float32")
    # Across backends bf16 kernels may round intermediates differently (jax's
    # GELU rounds each step); on torch both namespaces run the same kernels.
    if keras.config.backend() == "torch":
        tolerance = dict(rtol=0, atol=0)
    elif dtype == "float32":
        tolerance = dict(rtol=1e-6, atol=1e-6)
    else:
        tolerance = dict(rtol=2e-2, atol=1e-2)  # one or two bf16 steps
    for function, args in (
        (gemma2_math.rms_norm, (x, gain, 1e-6)),
        (gemma2_math.soft_cap, (x, 3.0)),
        (gemma2_math.geglu, (x, x[::-1].copy())),
    ):
        a = run("keras_ops", function, *args, dtype=dtype)
        b = run("torch_ops", function, *args, dtype=dtype)
        np.testing.assert_allclose(a, b, **tolerance, err_msg=function.__name__)
