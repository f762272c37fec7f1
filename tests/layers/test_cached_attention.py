"""`cached_attention_step` (a decode step over the caches before its write)
equals attention over the written caches, computed here in float64 numpy."""

import numpy as np
import pytest
from keras import ops

from keras_gemma2.layers.cached_attention import cached_attention_step

BATCH, HEADS, KV_HEADS, SLOTS, DIM = 2, 4, 2, 7, 8


def numpy_written_attention(query, key_cache, value_cache, key, value, mask, slot, cap):
    """Float64 grouped-query attention of one query over the written caches."""
    key_cache, value_cache = key_cache.astype("float64"), value_cache.astype("float64")
    key_cache[:, :, slot] = key[:, 0]
    value_cache[:, :, slot] = value[:, 0]
    groups = HEADS // KV_HEADS
    query = query.astype("float64").reshape(BATCH, KV_HEADS, groups, DIM)
    logits = np.einsum("bkgh,bksh->bkgs", query, key_cache)
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    logits = np.where(mask[:, None], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    attended = np.einsum("bkgs,bksh->bkgh", weights, value_cache)
    return attended.reshape(BATCH, 1, HEADS, DIM)


def random_inputs(seed):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(BATCH, 1, HEADS, DIM))
    key_cache, value_cache = rng.normal(size=(2, BATCH, KV_HEADS, SLOTS, DIM))
    key, value = rng.normal(size=(2, BATCH, 1, KV_HEADS, DIM))
    return [x.astype("float32") for x in (query, key_cache, value_cache, key, value)]


@pytest.mark.parametrize("slot", [0, 3, SLOTS - 1])
@pytest.mark.parametrize("cap", [None, 2.0])
def test_step_equals_attention_over_the_written_caches(slot, cap):
    query, key_cache, value_cache, key, value = random_inputs(slot)
    # Row 0 sees every slot; row 1 has two slots hidden (a ring's unwritten
    # or out-of-window slots), one of them next to the new key's slot.
    mask = np.ones((BATCH, 1, SLOTS), bool)
    mask[1, 0, [(slot + 1) % SLOTS, (slot + 4) % SLOTS]] = False
    expected = numpy_written_attention(
        query, key_cache, value_cache, key, value, mask, slot, cap
    )
    step = cached_attention_step(
        query, key_cache, value_cache, key, value, mask, slot, cap
    )
    np.testing.assert_allclose(ops.convert_to_numpy(step), expected, atol=2e-6)


def test_stale_slot_is_replaced_not_attended():
    """The old contents of the new key's slot never reach the output."""
    query, key_cache, value_cache, key, value = random_inputs(7)
    mask = np.ones((BATCH, 1, SLOTS), bool)
    slot = 2
    poisoned_keys, poisoned_values = key_cache.copy(), value_cache.copy()
    poisoned_keys[:, :, slot] = 1e3
    poisoned_values[:, :, slot] = 1e3
    clean = cached_attention_step(
        query, key_cache, value_cache, key, value, mask, slot, 2.0
    )
    poisoned = cached_attention_step(
        query, poisoned_keys, poisoned_values, key, value, mask, slot, 2.0
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(poisoned), ops.convert_to_numpy(clean), atol=1e-6
    )


def test_bfloat16_caches_stay_close_to_float64():
    query, key_cache, value_cache, key, value = random_inputs(11)
    mask = np.ones((1, 1, SLOTS), bool)
    inputs = (query, key_cache, value_cache, key, value)
    cast = [ops.cast(x, "bfloat16") for x in inputs]
    step = cached_attention_step(*cast, mask, 4, 2.0)
    assert ops.dtype(step) == "bfloat16"
    rounded = [ops.convert_to_numpy(ops.cast(x, "float32")) for x in cast]
    every_row = np.broadcast_to(mask, (BATCH, 1, SLOTS))
    expected = numpy_written_attention(*rounded, every_row, 4, 2.0)
    got = ops.convert_to_numpy(ops.cast(step, "float32"))
    # bfloat16 keeps 8 mantissa bits: values of size ~1 within ~1e-2.
    np.testing.assert_allclose(got, expected, atol=3e-2)
