"""`loop_matrices`: the attention matrices a decode loop carries.

The matrices are checked against the layer's kernels rearranged in numpy,
and attention that reads them against the float64 numpy attention of
`test_sliding_window_attention`. `tests/generation/test_generate.py` holds
the decode loops that carry them to the full forward pass's tokens; the
last test here checks that those loops do carry them.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_gemma2.layers import loop_matrices
from tests.layers.test_sliding_window_attention import (
    inputs,
    make_layer,
    numpy_attention,
)


def built_layer(**kwargs):
    layer = make_layer(**kwargs)
    layer(inputs())
    return layer


def kernel(dense):
    return ops.convert_to_numpy(dense.kernel)


def test_fused_matrix_is_the_three_kernels_side_by_side():
    layer = built_layer()
    found = loop_matrices.matrices(layer)
    assert set(found) == {"qkv", "output"}
    hidden = 16
    expected = np.concatenate(
        [
            kernel(dense).reshape(hidden, -1)
            for dense in (layer.query_dense, layer.key_dense, layer.value_dense)
        ],
        axis=1,
    )
    np.testing.assert_array_equal(ops.convert_to_numpy(found["qkv"]), expected)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(found["output"]),
        kernel(layer.output_dense).reshape(4 * 8, hidden),
    )


def test_over_the_limit_each_kernel_is_its_own_matrix(monkeypatch):
    layer = built_layer()
    # The fused float32 matrix is 16 x 64 x 4 bytes; one byte less is over.
    monkeypatch.setattr(loop_matrices, "FUSE_LIMIT_BYTES", 16 * 64 * 4 - 1)
    found = loop_matrices.matrices(layer)
    assert set(found) == {"query", "key", "value", "output"}
    for name, dense in (
        ("query", layer.query_dense),
        ("key", layer.key_dense),
        ("value", layer.value_dense),
    ):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(found[name]), kernel(dense).reshape(16, -1)
        )
    monkeypatch.setattr(loop_matrices, "FUSE_LIMIT_BYTES", 16 * 64 * 4)
    assert "qkv" in loop_matrices.matrices(layer)


@pytest.mark.parametrize("fuse_limit", [loop_matrices.FUSE_LIMIT_BYTES, 0])
@pytest.mark.parametrize("window", [3, None])
def test_attention_through_carried_matrices_matches_numpy(
    monkeypatch, fuse_limit, window
):
    monkeypatch.setattr(loop_matrices, "FUSE_LIMIT_BYTES", fuse_limit)
    x = inputs() * 3
    layer = built_layer(sliding_window_size=window)
    found = loop_matrices.matrices(layer)
    assert ("qkv" in found) == bool(fuse_limit)
    # Read with the kernels scaled by 2 in numpy: the layer must use what is
    # carried, not its own kernels.
    doubled = {name: ops.convert_to_numpy(m) * 2 for name, m in found.items()}
    with loop_matrices.carried({id(layer): doubled}):
        assert loop_matrices.lookup(layer) is doubled
        actual = ops.convert_to_numpy(layer(x))
    assert loop_matrices.lookup(layer) is None
    for dense in (
        layer.query_dense,
        layer.key_dense,
        layer.value_dense,
        layer.output_dense,
    ):
        dense.kernel.assign(dense.kernel * 2)
    np.testing.assert_allclose(actual, numpy_attention(layer, x), rtol=1e-4, atol=1e-4)


def test_carried_nests_and_restores():
    first, second = built_layer(), built_layer()
    outer = {id(first): {"output": 1}}
    with loop_matrices.carried(outer):
        with loop_matrices.carried({id(second): {"output": 2}}):
            assert loop_matrices.lookup(first) is None
            assert loop_matrices.lookup(second) == {"output": 2}
        assert loop_matrices.lookup(first) == {"output": 1}
    assert loop_matrices.lookup(first) is None


def _lora(layer):
    layer.query_dense.enable_lora(2)


def _int8(layer):
    layer.value_dense.quantize("int8")


@pytest.mark.parametrize("change", [_lora, _int8], ids=["lora", "int8"])
def test_kernels_not_used_as_stored_are_not_carried(change):
    layer = built_layer()
    assert loop_matrices.matrices(layer) is not None
    change(layer)
    assert loop_matrices.matrices(layer) is None


def test_kernels_cast_to_the_compute_dtype_are_not_carried():
    layer = make_layer(dtype="mixed_bfloat16")
    layer(inputs())
    assert keras.backend.standardize_dtype(layer.query_dense.kernel.dtype) == (
        "float32"
    )
    assert loop_matrices.matrices(layer) is None


@pytest.mark.skipif(
    keras.config.backend() == "torch",
    reason="torch decodes with TorchDecoder, which carries nothing",
)
def test_compiled_decode_loops_carry_every_attention_layer(monkeypatch):
    from tests.generation.test_generate import make_causal_lm

    causal_lm = make_causal_lm()
    attention_layers = {
        id(block.attention) for block in causal_lm.backbone.transformer_layers
    }
    hits = set()
    lookup = loop_matrices.lookup

    def spy(attention):
        found = lookup(attention)
        if found is not None:
            hits.add(id(attention))
        return found

    monkeypatch.setattr(loop_matrices, "lookup", spy)
    causal_lm.generate(
        {
            "token_ids": np.array([[2, 7, 9, 0, 0, 0]]),
            "padding_mask": np.array([[1, 1, 1, 0, 0, 0]]),
        },
        stop_token_ids=None,
    )
    assert hits == attention_layers
