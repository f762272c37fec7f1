"""`torch_ops.softmax_in_place`: written over its input, as `torch.softmax`."""

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="torch_ops serves TorchDecoder, the torch backend's decode path",
)

RNG = np.random.default_rng(7)


@pytest.mark.parametrize(
    "shape",
    [(3, 5), (1, 4, 2, 256, 512), (2, 3, 10000)],  # short, prompt-like, long rows
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_softmax_in_place_is_torch_softmax_over_its_input(shape, dtype):
    import torch

    from keras_gemma2.layers.torch_ops import softmax_in_place

    values = RNG.normal(0, 8, shape)
    values[..., 1::3] = -1e9  # masked logits, as the prompt's bias makes them
    given = torch.tensor(values, dtype=getattr(torch, dtype))
    expected = torch.softmax(given, dim=-1)
    rounded = given.double().numpy()  # the logits as `dtype` holds them
    pointer = given.data_ptr()
    actual = softmax_in_place(given, -1)
    assert actual.data_ptr() == pointer
    assert actual.dtype == given.dtype and actual.shape == given.shape
    # Bit for bit the out-of-place kernel...
    assert torch.equal(actual, expected)
    # ...and a softmax (float64 reference, at the dtype's rounding).
    exact = np.exp(rounded - rounded.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    tolerance = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(actual.float().numpy(), exact, rtol=tolerance, atol=1e-7)


def test_softmax_in_place_on_a_middle_axis():
    import torch

    from keras_gemma2.layers.torch_ops import softmax_in_place

    given = torch.tensor(RNG.normal(0, 3, (4, 6, 5)), dtype=torch.float32)
    expected = torch.softmax(given, dim=1)
    assert torch.equal(softmax_in_place(given, 1), expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["multiply", "add"])
def test_in_place_scalar_operands_round_as_python_scalars(name, dtype):
    """A float operand becomes a cached 0-d float32 tensor (float32 only).

    Bit for bit what the op gives with the Python float itself, written
    over the first operand.
    """
    import torch

    from keras_gemma2.layers.torch_ops import TORCH_OPS_IN_PLACE

    op = getattr(TORCH_OPS_IN_PLACE, name)
    reference = torch.mul if name == "multiply" else torch.add
    for scalar in (2.0 / 50.0, 2.0 * 30.0, 1.0 / 3.0, -1e9):
        given = torch.tensor(RNG.normal(0, 8, (3, 7)), dtype=getattr(torch, dtype))
        expected = reference(given, scalar)
        exact = reference(given.double(), scalar)  # float64, before the op
        pointer = given.data_ptr()
        actual = op(given, scalar)
        assert actual.data_ptr() == pointer and actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
        tolerance = 1e-6 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(
            actual.double().numpy(), exact.numpy(), rtol=tolerance, atol=1e-6
        )
