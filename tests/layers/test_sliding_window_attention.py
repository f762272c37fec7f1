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


def empty_cache(slots):
    """`(key_cache, value_cache)` for `make_layer()`: batch 2, 2 kv heads of 8."""
    return ops.zeros((2, 2, slots, 8)), ops.zeros((2, 2, slots, 8))


@pytest.mark.parametrize("window", [3, None])
def test_cache_prefill_then_single_steps_equal_full_pass(window):
    x = inputs(batch=2, length=10, seed=2)
    layer = make_layer(sliding_window_size=window)
    full = ops.convert_to_numpy(layer(x))
    cache = empty_cache(slots=10)
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
        ({"attention_implementation": "fast"}, "attention_implementation"),
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
    cache = empty_cache(slots=3)
    steps = []
    for index in range(11):
        step, cache = layer(
            x[:, index : index + 1], cache=cache, cache_update_index=index
        )
        steps.append(ops.convert_to_numpy(step))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def _same_weights(source, **overrides):
    layer = make_layer(**overrides)
    layer.build((None, None, 16))
    layer.set_weights(source.get_weights())
    return layer


@pytest.mark.parametrize("implementation", ["blocked", "auto"])
def test_implementations_agree(implementation):
    # Long enough (30 > 3 windows) for "auto" to pick the blocked kernel.
    x = inputs(batch=2, length=30, seed=4) * 3
    padding = np.ones((2, 30), "int32")
    padding[0, :7] = 0  # left padding: rows 0..6 see no key
    padding[1, 12:16] = 0
    reference = make_layer(attention_implementation="reference")
    expected = ops.convert_to_numpy(reference(x, padding_mask=padding))
    layer = _same_weights(reference, attention_implementation=implementation)
    actual = ops.convert_to_numpy(layer(x, padding_mask=padding))
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    visible = padding.astype(bool)
    np.testing.assert_allclose(
        actual[visible], numpy_attention(layer, x, padding)[visible], atol=1e-4
    )


@pytest.mark.parametrize("window", [3, None])
def test_prefill_into_a_cache_of_its_own_length_equals_full_pass(window):
    # The generation prefill: T tokens written at 0 into T slots. The keys are
    # then exactly the new tokens, so the blocked kernel serves it.
    x = inputs(batch=2, length=20, seed=5)
    reference = make_layer(sliding_window_size=window)
    full = ops.convert_to_numpy(reference(x))
    layer = _same_weights(
        reference, sliding_window_size=window, attention_implementation="blocked"
    )
    prefill, cache = layer(x, cache=empty_cache(slots=20), cache_update_index=0)
    np.testing.assert_allclose(ops.convert_to_numpy(prefill), full, atol=1e-5)
    _, expected_cache = reference(x, cache=empty_cache(slots=20), cache_update_index=0)
    for array, expected in zip(cache, expected_cache, strict=True):
        np.testing.assert_allclose(
            ops.convert_to_numpy(array), ops.convert_to_numpy(expected), atol=1e-6
        )


def test_config_round_trip_keeps_attention_implementation():
    layer = make_layer(attention_implementation="blocked")
    config = layer.get_config()
    assert config["attention_implementation"] == "blocked"
    clone = SlidingWindowAttention.from_config(config)
    assert clone.attention_implementation == "blocked"
