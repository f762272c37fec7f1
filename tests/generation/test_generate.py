"""Cached generation equals full forward passes, past the window, padded."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.generation.kv_cache import decode_cache, empty_cache, ring_size
from keras_gemma2.models.architecture import layer_is_local
from tests.conftest import TINY_BACKBONE_CONFIG

MAX_LENGTH = 24  # prompts <= 16 prefill in one bucket; decode crosses to 24


def make_causal_lm():
    causal_lm = Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    rng = np.random.RandomState(0)
    for variable in causal_lm.weights:
        shape = tuple(variable.shape)
        if "scale" in variable.path:
            std = 0.3
        elif "embeddings" in variable.path:
            # A small embedding keeps the tied head from just echoing the input.
            std = 0.05
        else:
            std = 1.0 / np.sqrt(shape[0])
        variable.assign(rng.normal(0.0, std, shape).astype("float32"))
    causal_lm.compile(sampler="greedy")
    return causal_lm


@pytest.fixture(scope="module")
def causal_lm():
    return make_causal_lm()


def full_logits(causal_lm, token_ids):
    token_ids = np.asarray(token_ids, "int32")
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return ops.convert_to_numpy(causal_lm(inputs))


def ragged_prompts():
    token_ids = np.zeros((2, MAX_LENGTH), "int32")
    padding_mask = np.zeros((2, MAX_LENGTH), "int32")
    for row, prompt in enumerate([[2, 5, 7], [2, 9, 4, 4, 8, 1, 3]]):
        token_ids[row, : len(prompt)] = prompt
        padding_mask[row, : len(prompt)] = 1
    return token_ids, padding_mask


def assert_greedy(causal_lm, token_ids, padding_mask, end=None):
    """Each generated token is the argmax of a full forward pass over its prefix.

    One full (uncached) forward pass over the finished sequences is the
    reference: with causal attention, its logits at position i - 1 are those
    of the prefix ending there.
    """
    logits = full_logits(causal_lm, token_ids)
    for row in range(token_ids.shape[0]):
        stop = MAX_LENGTH if end is None else end[row]
        for i in range(int(padding_mask[row].sum()), stop):
            assert token_ids[row, i] == logits[row, i - 1].argmax(), (row, i)


def test_cached_logits_equal_full_forward_at_every_position(causal_lm):
    backbone = causal_lm.backbone
    length, prompt_length = 20, 3  # window is 5: decoding runs far past it
    token_ids = np.random.RandomState(1).randint(0, 96, (2, length)).astype("int32")
    expected = full_logits(causal_lm, token_ids)

    # Prefill with linear caches, then keep window-sized rings for local layers.
    cache = empty_cache(backbone, 2, prompt_length, prompt_length)
    logits, _, cache = causal_lm.call_with_cache(token_ids[:, :prompt_length], cache, 0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(logits), expected[:, :prompt_length], atol=1e-4
    )
    ring = ring_size(backbone, length)
    assert ring == TINY_BACKBONE_CONFIG["sliding_window_size"]
    cache = decode_cache(backbone, cache, prompt_length - 1, length)
    for position in range(prompt_length, length):
        logits, _, cache = causal_lm.call_with_cache(
            token_ids[:, position : position + 1], cache, position
        )
        np.testing.assert_allclose(
            ops.convert_to_numpy(logits)[:, 0], expected[:, position], atol=1e-4
        )
    for i, (key_cache, _) in enumerate(cache):
        # Local layers never grew past the window; global ones hold every slot.
        assert key_cache.shape[2] == (ring if layer_is_local(i) else length)


def test_greedy_generation_matches_full_forward_reference(causal_lm):
    token_ids, padding_mask = ragged_prompts()
    outputs = causal_lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )
    generated = ops.convert_to_numpy(outputs["token_ids"])
    np.testing.assert_array_equal(
        generated[padding_mask == 1], token_ids[padding_mask == 1]
    )
    assert_greedy(causal_lm, generated, padding_mask)
    assert ops.convert_to_numpy(outputs["padding_mask"]).all()
    assert len(set(generated[1, 7:].tolist())) > 3  # not a degenerate repeat


def test_stop_token_masks_what_follows(causal_lm):
    token_ids, padding_mask = ragged_prompts()
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    unstopped = ops.convert_to_numpy(
        causal_lm.generate(inputs, stop_token_ids=None)["token_ids"]
    )
    stop = int(unstopped[1, 9])  # the third token row 1 generates
    outputs = causal_lm.generate(inputs, stop_token_ids=(stop,))
    mask = ops.convert_to_numpy(outputs["padding_mask"])
    generated = ops.convert_to_numpy(outputs["token_ids"])
    ends = []
    for row in range(2):
        start = int(padding_mask[row].sum())
        hits = [i for i in range(start, MAX_LENGTH) if unstopped[row, i] == stop]
        end = hits[0] + 1 if hits else MAX_LENGTH
        ends.append(end)
        np.testing.assert_array_equal(generated[row, :end], unstopped[row, :end])
        assert mask[row, :end].all() and not mask[row, end:].any()
    assert ends[1] == 10
    assert_greedy(causal_lm, generated, padding_mask, end=ends)


@pytest.mark.skipif(
    keras.config.backend() == "torch",
    reason="torch traces nothing by default: prefill and decode run eagerly on "
    "raw tensors; its jit_compile path has its own once-per-shape test "
    "(tests/generation/test_torch_decode.py)",
)
def test_compiled_once_per_shape(monkeypatch):
    """A second call with the same shapes traces no phase again."""
    from keras_gemma2.generation import compiled

    causal_lm = make_causal_lm()
    traces = []
    for name in ("prefill_and_choose", "decode_segment"):
        original = getattr(compiled, name)

        def counting(*args, original=original, name=name, **kwargs):
            traces.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(compiled, name, counting)
    token_ids, padding_mask = ragged_prompts()
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    first = causal_lm.generate(inputs, stop_token_ids=None)
    traced = list(traces)
    # One prefill and one loop per bucket edge (16, then 24).
    assert traced == ["prefill_and_choose", "decode_segment", "decode_segment"]
    second = causal_lm.generate(inputs, stop_token_ids=None)
    assert traces == traced
    np.testing.assert_array_equal(
        ops.convert_to_numpy(first["token_ids"]),
        ops.convert_to_numpy(second["token_ids"]),
    )


def test_phases_equal_the_portable_program(causal_lm):
    """The host-driven, separately compiled phases give `generate_step`'s tokens.

    Three bucket edges (16, 32, 40): TensorFlow once failed to compile three
    loops in one program, which is why the phases are separate.
    """
    token_ids = np.zeros((2, 40), "int32")
    padding_mask = np.zeros((2, 40), "int32")
    token_ids[0, :3], token_ids[1, :7] = [2, 5, 7], [2, 9, 4, 4, 8, 1, 3]
    padding_mask[0, :3], padding_mask[1, :7] = 1, 1
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    phases = causal_lm.generate(inputs, stop_token_ids=None)
    portable = causal_lm.generate_step(
        {key: ops.convert_to_tensor(value) for key, value in inputs.items()},
        prefill_length=16,
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(phases["token_ids"]),
        ops.convert_to_numpy(portable["token_ids"]),
    )


def test_prefill_chooses_the_first_token(causal_lm):
    """The prefill writes the token at the shortest prompt's end, from its own pass.

    Row 0's prompt ends at 3: its token is the full forward pass's argmax at
    position 2. Row 1's prompt is longer, so position 3 keeps its prompt
    token, and a stop token there does not end the row.
    """
    from keras_gemma2.generation.decode import prefill_and_choose

    token_ids, padding_mask = ragged_prompts()
    expected = full_logits(causal_lm, token_ids[:1, :3])[0, 2].argmax()
    args = [ops.convert_to_tensor(token_ids), ops.convert_to_tensor(padding_mask)]
    stops = (int(expected), int(token_ids[1, 3]))
    (prompt, _, index, done), token, _ = prefill_and_choose(causal_lm, *args, 16, stops)
    prompt = ops.convert_to_numpy(prompt)
    assert ops.convert_to_numpy(token).tolist() == [expected, token_ids[1, 3]]
    assert prompt[0, 3] == expected and prompt[0, 4] == 0
    np.testing.assert_array_equal(prompt[1], token_ids[1])
    assert int(ops.convert_to_numpy(index)) == 4
    assert ops.convert_to_numpy(done).tolist() == [True, False]


def test_prompt_filling_max_length_writes_nothing(causal_lm):
    """`generate` refuses such a row (`inputs.py`); the phase still stays in bounds."""
    from keras_gemma2.generation.decode import prefill_and_choose

    token_ids = np.random.RandomState(3).randint(1, 96, (1, 16)).astype("int32")
    args = [ops.convert_to_tensor(token_ids), ops.ones((1, 16), "int32")]
    (prompt, _, index, done), _, _ = prefill_and_choose(causal_lm, *args, 16, None)
    np.testing.assert_array_equal(ops.convert_to_numpy(prompt), token_ids)
    assert int(ops.convert_to_numpy(index)) == 16
    assert not ops.convert_to_numpy(done).any()


def test_first_token_a_stop_token_ends_generation(causal_lm):
    token_ids = np.zeros((1, MAX_LENGTH), "int32")
    token_ids[0, :3] = [2, 5, 7]
    padding_mask = (token_ids != 0).astype("int32")
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    unstopped = ops.convert_to_numpy(
        causal_lm.generate(inputs, stop_token_ids=None)["token_ids"]
    )
    outputs = causal_lm.generate(inputs, stop_token_ids=(int(unstopped[0, 3]),))
    mask = ops.convert_to_numpy(outputs["padding_mask"])
    assert mask[0].tolist() == [True] * 4 + [False] * (MAX_LENGTH - 4)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(outputs["token_ids"])[0, :4], unstopped[0, :4]
    )
