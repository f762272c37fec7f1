"""Greedy generation to the full 8192-token context with the released 4096 window.

HF, KerasHub and vLLM each broke generation past 4096 tokens (sliding-window
cache indexing). Here a narrow model with the released window decodes from a
short prompt to 8192 tokens through `generate` (the backend's compiled
segments, or torch's `TorchDecoder`): local layers wrap their 4096-slot rings
once, and global layers cross every segment edge up to 8192. One uncached
forward pass over the finished sequence is the reference: with causal
attention its logits at position i - 1 are those of the prefix that produced
token i, so every generated position is checked, not a sample.

`generate` returns tokens, not logits, so the check is on the argmax (with a
near-tie margin); the cached logits themselves are compared with uncached ones
past the window in `tests/generation/test_generate.py`.

Runtime on a shared, loaded 2-core CPU: 30-55 s on jax and tensorflow,
80-140 s on torch (8192 eager decode steps); hence the `slow` mark.
"""

import numpy as np
import pytest
from keras import ops

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from tests.conftest import randomize_weights

WINDOW = 4096  # the released sliding window
LENGTH = 8192  # the released context
PROMPT_LENGTH = 5
# Cached and uncached sums round differently: a generated token whose
# reference logit is within this of the maximum counts as the argmax.
TIE_MARGIN = 1e-4


def make_causal_lm(sliding_window_size):
    """A narrow model; the uncached forward uses the reference attention.

    `"reference"` is the full masked computation that defines the result
    (`keras_gemma2.layers.attention_dispatch`); decoding reads the cache
    whatever the implementation, and the 5-token prefill takes the
    reference path anyway.
    """
    backbone = Gemma2Backbone(
        vocabulary_size=64,
        num_layers=2,  # layer 0 local, layer 1 global
        num_query_heads=1,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        sliding_window_size=sliding_window_size,
        attention_implementation="reference",
    )
    causal_lm = Gemma2CausalLM(backbone)
    randomize_weights(causal_lm, seed=0)
    # A small tied embedding and strong projections keep greedy decoding
    # varied over 8192 tokens instead of settling on one repeated token.
    for variable in causal_lm.weights:
        if "embeddings" in variable.path:
            variable.assign(variable * 0.05)
        elif "scale" not in variable.path:
            variable.assign(variable * 2.0)
    causal_lm.compile(sampler="greedy")
    return causal_lm


def full_logits(causal_lm, token_ids):
    """Uncached logits `[1, T, V]` of one forward pass."""
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return ops.convert_to_numpy(causal_lm(inputs))


@pytest.mark.slow
def test_greedy_generation_to_8192_equals_uncached_forward():
    causal_lm = make_causal_lm(WINDOW)
    token_ids = np.zeros((1, LENGTH), "int32")
    padding_mask = np.zeros((1, LENGTH), "int32")
    prompt = np.random.RandomState(1).randint(0, 64, PROMPT_LENGTH)
    token_ids[0, :PROMPT_LENGTH] = prompt
    padding_mask[0, :PROMPT_LENGTH] = 1
    outputs = causal_lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )
    generated = ops.convert_to_numpy(outputs["token_ids"])
    assert generated.shape == (1, LENGTH)
    np.testing.assert_array_equal(generated[0, :PROMPT_LENGTH], prompt)
    # Guards the test design: a sequence stuck on a few tokens would hide
    # cache errors past the window.
    assert len(set(generated[0, WINDOW:].tolist())) >= 8

    logits = full_logits(causal_lm, generated)[0]  # [T, V]
    positions = np.arange(PROMPT_LENGTH, LENGTH)
    previous = logits[positions - 1]  # [T - P, V]
    margins = (
        previous.max(axis=-1)
        - previous[np.arange(len(positions)), generated[0, positions]]
    )
    wrong = positions[margins > TIE_MARGIN]
    assert wrong.size == 0, (
        f"{wrong.size} generated tokens are not the uncached argmax; first at "
        f"positions {wrong[:10].tolist()} (window {WINDOW})"
    )

    # Guards the test design: the window changes the reference past 4096, so
    # a cache that attended to every earlier token on the local layer would
    # have generated other tokens. Before the window fills, nothing changes.
    unwindowed = make_causal_lm(LENGTH)
    unwindowed_logits = full_logits(unwindowed, generated)[0]
    np.testing.assert_allclose(
        unwindowed_logits[:WINDOW], logits[:WINDOW], atol=1e-5, rtol=0
    )
    changed = unwindowed_logits[WINDOW:-1].argmax(-1) != logits[WINDOW:-1].argmax(-1)
    assert changed.sum() > 10
