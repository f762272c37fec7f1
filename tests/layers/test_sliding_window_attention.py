"""SlidingWindowAttention against a float64 numpy implementation."""

import numpy as np
import pytest
from keras import ops

from keras_gemma2.layers import SlidingWindowAttention
from tests.layers.test_rotary_embedding import numpy_rope


def numpy_attention(layer, x, padding_mask=None):
    """Gemma 2 attention written out in float64 with explicit loops over heads."""
    weights = {
        name: ops.convert_to_numpy(dense.kernel).astype("float64")
        for name, dense in (
            ("q", layer.query_dense),
            ("k", layer.key_dense),
            ("v", layer.value_dense),
            ("o", layer.output_dense),
        )
    }
    x = x.astype("float64")
    batch, length, _ = x.shape
    positions = np.arange(length)
    q = numpy_rope(
        np.einsum("btd,dnh->btnh", x, weights["q"]),
        positions,
        layer.rope_max_wavelength,
    )
    k = numpy_rope(
        np.einsum("btd,dnh->btnh", x, weights["k"]),
        positions,
        layer.rope_max_wavelength,
    )
    v = np.einsum("btd,dnh->btnh", x, weights["v"])
    group = layer.num_query_heads // layer.num_key_value_heads
    window = layer.sliding_window_size or length + 1
    out = np.zeros((batch, length, layer.num_query_heads, layer.head_dim))
    for b in range(batch):
        for n in range(layer.num_query_heads):
            kv = n // group
            logits = q[b, :, n] @ k[b, :, kv].T / np.sqrt(layer.query_pre_attn_scalar)
            cap = layer.attention_logit_soft_cap
            if cap is not None:
                logits = cap * np.tanh(logits / cap)
            i, j = np.meshgrid(positions, positions, indexing="ij")
            visible = (j <= i) & (i - j < window)
            if padding_mask is not None:
                visible &= padding_mask[b][None, :].astype(bool)
            logits = np.where(visible, logits, -np.inf)
            probabilities = np.exp(logits - logits.max(-1, keepdims=True))
            probabilities /= probabilities.sum(-1, keepdims=True)
            out[b, :, n] = probabilities @ v[b, :, kv]
    return np.einsum("btnh,nhd->btd", out, weights["o"])


def make_layer(**kwargs):
    config = dict(
        num_query_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=6.0,
        attention_logit_soft_cap=3.0,
        sliding_window_size=3,
        rope_max_wavelength=77.0,
        kernel_initializer="random_normal",
    )
    config.update(kwargs)
    return SlidingWindowAttention(**config)


def inputs(batch=2, length=9, hidden=16, seed=0):
    return (
        np.random.RandomState(seed)
        .normal(size=(batch, length, hidden))
        .astype("float32")
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"sliding_window_size": None},
        {"num_key_value_heads": 4},
        {"num_key_value_heads": 1, "attention_logit_soft_cap": None},
    ],
    ids=["local", "global", "mha", "mqa_uncapped"],
)
def test_matches_numpy(overrides):
    x = inputs() * 3
    layer = make_layer(**overrides)
    actual = ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(actual, numpy_attention(layer, x), rtol=1e-4, atol=1e-4)


def test_padding_mask_hides_keys():
    x = inputs(seed=1) * 3
    padding = np.ones((2, 9), "int32")
    padding[0, 5:] = 0
    padding[1, ::3] = 0  # holes, not only right padding
    padding[1, 0] = 1
    layer = make_layer()
    actual = ops.convert_to_numpy(layer(x, padding_mask=padding))
    expected = numpy_attention(layer, x, padding)
    visible_rows = padding.astype(bool)
    np.testing.assert_allclose(actual[visible_rows], expected[visible_rows], atol=1e-4)


@pytest.mark.parametrize("window", [3, None])
def test_cache_prefill_then_single_steps_equal_full_pass(window):
    x = inputs(batch=2, length=10, seed=2)
    layer = make_layer(sliding_window_size=window)
    full = ops.convert_to_numpy(layer(x))
    cache = ops.zeros((2, 2, 10, 2, 8))
    prefill, cache = layer(x[:, :4], cache=cache, cache_update_index=0)
    outputs = [ops.convert_to_numpy(prefill)]
    for index in range(4, 10):
        step, cache = layer(
            x[:, index : index + 1], cache=cache, cache_update_index=index
        )
        outputs.append(ops.convert_to_numpy(step))
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), full, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_query_heads": 3}, "num_key_value_heads"),
        ({"head_dim": 7}, "head_dim"),
        ({"sliding_window_size": 0}, "sliding_window_size"),
        ({"query_pre_attn_scalar": -2}, "query_pre_attn_scalar"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_invalid_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_layer(**kwargs)


def test_ring_cache_of_window_size_equals_full_pass():
    # A local layer's cache needs only `window` slots: position p in slot p % window.
    x = inputs(batch=2, length=11, seed=3)
    layer = make_layer(sliding_window_size=3)
    full = ops.convert_to_numpy(layer(x))
    cache = ops.zeros((2, 2, 3, 2, 8))
    steps = []
    for index in range(11):
        step, cache = layer(
            x[:, index : index + 1], cache=cache, cache_update_index=index
        )
        steps.append(ops.convert_to_numpy(step))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
