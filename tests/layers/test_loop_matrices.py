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
@pytest.mark.parametrize(
    "fits, min_steps", [(True, 1), (False, 1), (True, 8), (True, 9)]
)
def test_compiled_decode_loops_carry_every_attention_layer_and_the_head(
    monkeypatch, fits, min_steps
):
    """Attention always; the tied head and the feed-forward layers (read
    through transposed copies) while those copies fit the limit and the
    call has room for at least `LAYOUT_COPY_MIN_STEPS` decode steps past
    its prefill (here 8: a 24-token `max_length` after the 16 positions of
    the shortest prefill bucket)."""
    from tests.generation.test_generate import make_causal_lm

    causal_lm = make_causal_lm()
    backbone = causal_lm.backbone
    expected = {id(block.attention) for block in backbone.transformer_layers}
    if fits and min_steps <= 8:
        expected.add(id(backbone.token_embedding))
        expected |= {id(block.ffw) for block in backbone.transformer_layers}
    limit = loop_matrices.layout_copy_bytes(backbone) - (0 if fits else 1)
    monkeypatch.setattr(loop_matrices, "LAYOUT_COPY_LIMIT_BYTES", limit)
    monkeypatch.setattr(loop_matrices, "LAYOUT_COPY_MIN_STEPS", min_steps)
    hits = set()
    lookup = loop_matrices.lookup

    def spy(layer):
        found = lookup(layer)
        if found is not None:
            hits.add(id(layer))
        return found

    monkeypatch.setattr(loop_matrices, "lookup", spy)
    token_ids = np.zeros((1, 24), "int32")
    token_ids[0, :3] = [2, 7, 9]
    causal_lm.generate(
        {"token_ids": token_ids, "padding_mask": token_ids > 0},
        stop_token_ids=None,
    )
    assert hits == expected


def _names(found):
    return set(found) if found is not None else None


def test_copies_and_views_split_the_matrices(monkeypatch):
    layer = built_layer()
    parts = {p: loop_matrices.matrices(layer, part=p) for p in ("copies", "views")}
    # Fused: only the concatenation copies; the output kernel is a reshape.
    assert _names(parts["copies"]) == {"qkv"}
    assert _names(parts["views"]) == {"output"}
    monkeypatch.setattr(loop_matrices, "FUSE_LIMIT_BYTES", 0)
    assert loop_matrices.matrices(layer, part="copies") == {}
    assert _names(loop_matrices.matrices(layer, part="views")) == {
        "query",
        "key",
        "value",
        "output",
    }
    # Converted, every matrix is a copy.
    converted = loop_matrices.matrices(layer, "float16", part="copies")
    assert _names(converted) == {"query", "key", "value", "output"}
    assert loop_matrices.matrices(layer, "float16", part="views") == {}
    assert all(
        keras.backend.standardize_dtype(m.dtype) == "float16"
        for m in converted.values()
    )


def _bfloat16_feed_forward():
    from keras_gemma2.layers import Gemma2FeedForward

    layer = Gemma2FeedForward(
        intermediate_dim=24, kernel_initializer="random_normal", dtype="bfloat16"
    )
    layer(inputs())
    return layer


def test_feed_forward_matrices_are_its_kernels_in_float32():
    layer = _bfloat16_feed_forward()
    found = loop_matrices.feed_forward_matrices(layer, "float32")
    assert set(found) == {"gate", "up", "down_rows"}
    for name, expected in (
        ("gate", kernel(layer.gate_dense)),
        ("up", kernel(layer.up_dense)),
        ("down_rows", kernel(layer.down_dense).T),
    ):
        matrix = ops.convert_to_numpy(found[name])
        assert matrix.dtype == np.float32
        np.testing.assert_array_equal(matrix, expected.astype("float32"))
    # Converted, all three are copies.
    copies = loop_matrices.feed_forward_matrices(layer, "float32", part="copies")
    assert set(copies) == {"gate", "up", "down_rows"}
    assert loop_matrices.feed_forward_matrices(layer, "float32", part="views") == {}
    # Nothing to convert: carried only to read the down kernel transposed.
    assert loop_matrices.feed_forward_matrices(layer, "bfloat16") is None
    kept = loop_matrices.feed_forward_matrices(layer, None, relayout=True)
    assert set(kept) == {"gate", "up", "down_rows"}
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.cast(kept["down_rows"], "float32")),
        kernel(layer.down_dense).T.astype("float32"),
    )
    assert set(
        loop_matrices.feed_forward_matrices(layer, None, part="copies", relayout=True)
    ) == {"down_rows"}
    assert set(
        loop_matrices.feed_forward_matrices(layer, None, part="views", relayout=True)
    ) == {"gate", "up"}
    # Not read as stored: not carried.
    layer.up_dense.enable_lora(2)
    assert loop_matrices.feed_forward_matrices(layer, "float32") is None
    assert loop_matrices.feed_forward_matrices(layer, None, relayout=True) is None


def _numpy_feed_forward(layer, x, scale):
    """float64 GeGLU (tanh GELU) of `scale` times the layer's kernels."""
    gate, up, down = (
        kernel(dense).astype("float64") * scale
        for dense in (layer.gate_dense, layer.up_dense, layer.down_dense)
    )
    g = x @ gate
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    return (gelu * (x @ up)) @ down


def test_feed_forward_through_carried_matrices_matches_numpy():
    layer = _bfloat16_feed_forward()
    x = inputs()
    found = loop_matrices.feed_forward_matrices(layer, "float32")
    doubled = {name: ops.convert_to_numpy(m) * 2 for name, m in found.items()}
    with loop_matrices.carried({id(layer): doubled}):
        actual = ops.convert_to_numpy(ops.cast(layer(x), "float32"))
    rounded = ops.convert_to_numpy(ops.cast(ops.cast(x, "bfloat16"), "float32"))
    expected = _numpy_feed_forward(layer, rounded.astype("float64"), 2.0)
    # bfloat16 between the products: a few of its steps (2**-8) of the scale.
    np.testing.assert_allclose(actual, expected, atol=0.05 * np.abs(expected).max())
    assert np.abs(actual - _numpy_feed_forward(layer, rounded, 1.0)).max() > 0.3 * (
        np.abs(expected).max()
    )


def _bfloat16_causal_lm():
    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
    from tests.generation.test_generate import make_causal_lm

    float32_lm = make_causal_lm()
    config = {**float32_lm.backbone.get_config(), "dtype": "bfloat16"}
    causal_lm = Gemma2CausalLM(Gemma2Backbone.from_config(config))
    causal_lm.set_weights(float32_lm.get_weights())
    return causal_lm


def test_float32_feed_forward_through_carried_rows_matches_numpy():
    from keras_gemma2.layers import Gemma2FeedForward

    layer = Gemma2FeedForward(intermediate_dim=24, kernel_initializer="random_normal")
    x = inputs()
    layer(x)
    found = loop_matrices.feed_forward_matrices(layer, None, relayout=True)
    doubled = {name: ops.convert_to_numpy(m) * 2 for name, m in found.items()}
    with loop_matrices.carried({id(layer): doubled}):
        actual = ops.convert_to_numpy(layer(x))
    expected = _numpy_feed_forward(
        layer, ops.convert_to_numpy(x).astype("float64"), 2.0
    )
    np.testing.assert_allclose(
        actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )
    undoubled = _numpy_feed_forward(layer, ops.convert_to_numpy(x), 1.0)
    assert np.abs(actual - undoubled).max() > 0.3 * np.abs(expected).max()


def test_head_columns_are_the_table_transposed():
    from tests.generation.test_generate import make_causal_lm

    embedding = make_causal_lm().backbone.token_embedding
    table = ops.convert_to_numpy(embedding.embeddings)
    found = loop_matrices.head_matrices(embedding, None, relayout=True)
    np.testing.assert_array_equal(ops.convert_to_numpy(found["columns"]), table.T)
    views = loop_matrices.head_matrices(embedding, None, part="views", relayout=True)
    assert views == {}
    # Kept in its own dtype, the copy is extra memory: only with `relayout`.
    assert loop_matrices.head_matrices(embedding, None) is None
    assert loop_matrices.head_matrices(embedding, "float32") is None
    # A bfloat16 table converted to float32 is a copy anyway.
    bfloat16_embedding = _bfloat16_causal_lm().backbone.token_embedding
    converted = loop_matrices.head_matrices(bfloat16_embedding, "float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(converted["columns"]),
        ops.convert_to_numpy(ops.cast(bfloat16_embedding.embeddings, "float32")).T,
    )


def test_layout_copy_bytes_counts_the_table_and_down_kernels():
    from tests.generation.test_generate import make_causal_lm

    causal_lm = make_causal_lm()
    backbone = causal_lm.backbone
    expected = ops.convert_to_numpy(backbone.token_embedding.embeddings).nbytes
    for block in backbone.transformer_layers:
        expected += kernel(block.ffw.down_dense).nbytes
    assert loop_matrices.layout_copy_bytes(backbone) == expected
    causal_lm.quantize("int8")
    assert loop_matrices.layout_copy_bytes(backbone) == 0


def test_quantized_head_is_not_carried():
    from tests.generation.test_generate import make_causal_lm

    causal_lm = make_causal_lm()
    causal_lm.quantize("int8")
    embedding = causal_lm.backbone.token_embedding
    assert loop_matrices.head_matrices(embedding, None, relayout=True) is None
    assert loop_matrices.head_matrices(embedding, "float32") is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_through_carried_columns(dtype):
    from tests.generation.test_generate import make_causal_lm

    causal_lm = _bfloat16_causal_lm() if dtype == "bfloat16" else make_causal_lm()
    embedding = causal_lm.backbone.token_embedding
    table = ops.convert_to_numpy(ops.cast(embedding.embeddings, "float32"))
    hidden = ops.cast(inputs(batch=1, length=2, hidden=table.shape[1]), dtype)
    # The carried columns, doubled, so reading the table itself fails.
    with loop_matrices.carried({id(embedding): {"columns": table.T * 2}}):
        actual = ops.convert_to_numpy(
            ops.cast(causal_lm.head_logits(hidden), "float32")
        )
    rows = ops.convert_to_numpy(ops.cast(hidden, "float32")).astype("float64")
    cap = causal_lm.backbone.final_logit_soft_cap
    expected = cap * np.tanh(rows @ (table.astype("float64") * 2).T / cap)
    tolerance = 0.02 * cap if dtype == "bfloat16" else 1e-4 * cap
    np.testing.assert_allclose(actual, expected, atol=tolerance)
    undoubled = cap * np.tanh(rows @ table.astype("float64").T / cap)
    assert np.abs(actual - undoubled).max() > 0.1


@pytest.mark.skipif(
    keras.config.backend() == "torch",
    reason="torch decodes with TorchDecoder, which carries nothing",
)
def test_bfloat16_generation_carries_float32_copies(monkeypatch):
    """Every attention, feed-forward and the head read float32 copies; the
    tokens are those of XLA's own bfloat16 products (nothing carried)."""
    from keras_gemma2.generation import decode
    from tests.generation.test_generate import ragged_prompts

    def bfloat16_lm():
        causal_lm = _bfloat16_causal_lm()
        causal_lm.compile(sampler="greedy")
        return causal_lm

    token_ids, padding_mask = ragged_prompts()
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    causal_lm = bfloat16_lm()
    backbone = causal_lm.backbone
    expected_ids = {id(backbone.token_embedding)}
    for block in backbone.transformer_layers:
        expected_ids |= {id(block.attention), id(block.ffw)}
    hits, dtypes = set(), set()
    lookup = loop_matrices.lookup

    def spy(layer):
        found = lookup(layer)
        if found is not None:
            hits.add(id(layer))
            dtypes.update(
                keras.backend.standardize_dtype(m.dtype) for m in found.values()
            )
        return found

    monkeypatch.setattr(loop_matrices, "lookup", spy)
    carried = ops.convert_to_numpy(
        causal_lm.generate(inputs, stop_token_ids=None)["token_ids"]
    )
    assert hits == expected_ids and dtypes == {"float32"}
    monkeypatch.setattr(decode, "_loop_candidates", lambda causal_lm, relayout=True: [])
    hits.clear()
    own = ops.convert_to_numpy(
        bfloat16_lm().generate(inputs, stop_token_ids=None)["token_ids"]
    )
    assert not hits
    np.testing.assert_array_equal(carried, own)
    assert len(set(carried[1, 7:].tolist())) > 3  # not a degenerate repeat
