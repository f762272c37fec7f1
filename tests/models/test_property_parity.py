"""Property-based parity: random small configs against HF, cached against uncached.

Hypothesis draws small Gemma 2 configs: query and key-value heads in any
valid grouping, `head_dim`, `hidden_size` (a multiple of the heads, not
necessarily `heads * head_dim`), `query_pre_attn_scalar`, a sliding window
shorter or longer than the sequence, each soft cap on or off, RoPE theta,
RMS-norm epsilon, 1 or 2 layers (layer 0 local, layer 1 global), sequence
lengths and right-padding patterns.

- `test_random_configs_match_transformers`: `Gemma2CausalLM.from_preset` on a
  random HF checkpoint gives the logits of `transformers.Gemma2ForCausalLM`
  (eager attention, float32) within 1e-4 on every non-padded position.
- `test_cached_greedy_generation_equals_uncached_forward`: greedy `generate`
  (prefill, rings, decode segments, the backend's compiled or fast path)
  writes at each position the argmax of one uncached forward pass over the
  finished sequences, for random prompts, batch compositions and lengths.

Every backend runs the same draw (`derandomize=True`, no example database).
Each example builds and compiles a new model, so the default counts keep each
test well under a minute per backend; `KERAS_GEMMA2_PROPERTY_EXAMPLES=N` runs
N examples of each instead. Shrinking is off (one example costs seconds); a
failure prints the drawn config with `note()` and in the assertion message,
so `tests/models/test_hf_parity.py`-style code can replay it.
"""

import os
import tempfile

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from keras import ops

from keras_gemma2 import Gemma2CausalLM
from tests.conftest import hf_logits, make_hf_model, randomize_hf_model

TOLERANCE = 1e-4
# Greedy near-ties: a generated token whose reference (HF) logit is within
# this of the reference maximum is accepted, since our logits may differ from
# HF's by up to TOLERANCE each way.
TIE_MARGIN = 2 * TOLERANCE
PARITY_EXAMPLES = 6
GENERATION_EXAMPLES = 3
# Input draws per example, run on the one model (and compiled program) the
# example built: more cases for little more time.
CASES_PER_EXAMPLE = 3
# Prompts stay within one prefill bucket (`decode.MIN_PREFILL_BUCKET`), so
# every case of a generation example reuses its compiled programs.
MAX_PROMPT_LENGTH = 16


def example_count(default):
    """`default`, or `KERAS_GEMMA2_PROPERTY_EXAMPLES` when it is set."""
    value = os.environ.get("KERAS_GEMMA2_PROPERTY_EXAMPLES")
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            "Received an invalid value for `KERAS_GEMMA2_PROPERTY_EXAMPLES`, "
            f"expected a positive integer. Received: {value!r}"
        )
    return int(value)


def property_settings(default_examples):
    return settings(
        max_examples=example_count(default_examples),
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )


def demanding_first(values):
    """Draw from `values`; Hypothesis's first (simplest) draw is `values[0]`.

    With a handful of examples the simplest one must still exercise
    something, so each list starts with its most demanding value.
    """
    return st.sampled_from(list(values))


@st.composite
def hf_configs(draw, length):
    """An HF `Gemma2Config` dict for sequences of `length` tokens.

    The simplest draw has both layer kinds, grouped-query attention, caps on,
    a one-token window and `query_pre_attn_scalar != head_dim`.
    """
    num_key_value_heads = draw(demanding_first([2, 1, 3]))
    num_attention_heads = num_key_value_heads * draw(demanding_first([2, 1, 3]))
    # HF requires hidden_size % num_attention_heads == 0; heads * head_dim
    # need not equal hidden_size (as in the 27B).
    smallest = max(1, -(-4 // num_attention_heads))
    per_head = draw(st.integers(smallest, max(smallest, 36 // num_attention_heads)))
    return {
        "vocab_size": draw(st.integers(8, 64)),
        "hidden_size": num_attention_heads * per_head,
        "intermediate_size": draw(st.integers(2, 40)),
        "num_hidden_layers": draw(demanding_first([2, 1])),
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": draw(demanding_first([8, 2, 4, 6, 12, 16])),
        "query_pre_attn_scalar": draw(st.integers(1, 512)),
        # From 1 (each token sees only itself) to past the sequence.
        "sliding_window": draw(st.integers(1, length + 4)),
        "attn_logit_softcapping": draw(st.floats(0.5, 60.0) | st.none()),
        "final_logit_softcapping": draw(st.floats(0.5, 40.0) | st.none()),
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.1])),
        "rope_theta": draw(st.floats(10.0, 1e6)),
        "max_position_embeddings": max(length, 2),
    }


def right_padded(draw, batch_size, length, vocabulary_size, max_prompt=None):
    """`(token_ids, padding_mask)` `[batch, length]`: random row lengths.

    Padded slots hold random ids, not zeros: they must not reach any
    non-padded position.
    """
    max_prompt = length if max_prompt is None else max_prompt
    lengths = [draw(st.integers(1, max_prompt)) for _ in range(batch_size)]
    seed = draw(st.integers(0, 2**31 - 1))
    token_ids = np.random.RandomState(seed).randint(
        0, vocabulary_size, (batch_size, length)
    )
    padding_mask = np.arange(length)[None, :] < np.array(lengths)[:, None]
    return token_ids.astype("int32"), padding_mask.astype("int32")


def forward(causal_lm, token_ids, padding_mask):
    """Uncached logits `[B, T, V]` as numpy.

    JAX compiles the whole forward once (`predict`) rather than every op of
    an eager call: several seconds less per config. Elsewhere the eager call
    is the cheaper one.
    """
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if keras.config.backend() == "jax":
        return causal_lm.predict(inputs, batch_size=len(token_ids), verbose=0)
    return ops.convert_to_numpy(causal_lm(inputs))


@given(data=st.data())
@property_settings(PARITY_EXAMPLES)
def test_random_configs_match_transformers(data):
    length = data.draw(demanding_first(range(24, 0, -1)), label="length")
    batch_size = data.draw(demanding_first([3, 1, 2]), label="batch_size")
    hf_config = data.draw(hf_configs(length), label="hf_config")
    seed = data.draw(st.integers(0, 2**16), label="weights_seed")
    note(f"config={hf_config!r} seed={seed}")
    model = make_hf_model(seed=seed, **hf_config)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        causal_lm = Gemma2CausalLM.from_preset(directory)
    for case in range(CASES_PER_EXAMPLE):
        token_ids, padding_mask = right_padded(
            data.draw, batch_size, length, hf_config["vocab_size"]
        )
        expected = hf_logits(model, token_ids, padding_mask)
        actual = forward(causal_lm, token_ids, padding_mask)
        valid = padding_mask.astype(bool)
        difference = float(np.abs(actual - expected)[valid].max())
        assert difference <= TOLERANCE, (
            f"max |logit difference| {difference:.3g} > {TOLERANCE} against HF "
            f"for config={hf_config!r}, weights seed={seed}, case {case}, "
            f"token_ids={token_ids.tolist()}, padding_mask={padding_mask.tolist()}"
        )


def randomize_for_generation(model, seed):
    """HF weights that keep greedy decoding varied, not one repeated token.

    `randomize_hf_model`'s weights with a 20x smaller tied embedding (the
    head stops echoing its input) and 2x stronger projections (the next
    token keeps depending on the context).
    """
    import torch

    randomize_hf_model(model, seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed" in name:
                parameter.mul_(0.05)
            elif "norm" not in name:
                parameter.mul_(2.0)
    return model


def greedy_mismatches(generated, prompt_mask, reference_logits):
    """`(row, position, token, argmax, margin)` where a token is not the argmax.

    A token counts as the argmax when its reference logit at the previous
    position is within `TIE_MARGIN` of the maximum there.
    """
    mismatches = []
    for row in range(generated.shape[0]):
        for position in range(int(prompt_mask[row].sum()), generated.shape[1]):
            logits = reference_logits[row, position - 1]
            token = int(generated[row, position])
            margin = float(logits.max() - logits[token])
            if margin > TIE_MARGIN:
                mismatches.append((row, position, token, int(logits.argmax()), margin))
    return mismatches


@given(data=st.data())
@property_settings(GENERATION_EXAMPLES)
def test_cached_greedy_generation_equals_uncached_forward(data):
    # Up to 32: decoding crosses the first segment edge (16).
    max_length = data.draw(demanding_first(range(32, 1, -1)), label="max_length")
    batch_size = data.draw(demanding_first([3, 1, 2, 4]), label="batch_size")
    hf_config = data.draw(hf_configs(max_length), label="hf_config")
    seed = data.draw(st.integers(0, 2**16), label="weights_seed")
    note(f"config={hf_config!r} seed={seed}")
    model = randomize_for_generation(make_hf_model(**hf_config), seed)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        causal_lm = Gemma2CausalLM.from_preset(directory)
    causal_lm.compile(sampler="greedy")
    max_prompt = min(max_length - 1, MAX_PROMPT_LENGTH)
    for case in range(CASES_PER_EXAMPLE):
        token_ids, padding_mask = right_padded(
            data.draw, batch_size, max_length, hf_config["vocab_size"], max_prompt
        )
        outputs = causal_lm.generate(
            {"token_ids": token_ids, "padding_mask": padding_mask},
            stop_token_ids=None,
        )
        generated = ops.convert_to_numpy(outputs["token_ids"])
        prompt = padding_mask.astype(bool)
        np.testing.assert_array_equal(generated[prompt], token_ids[prompt])
        # HF's uncached forward over the finished sequences: its logits at
        # position i - 1 are those of the prefix that produced token i.
        reference = hf_logits(model, generated)
        mismatches = greedy_mismatches(generated, padding_mask, reference)
        assert not mismatches, (
            f"cached greedy tokens differ from the uncached argmax at (row, "
            f"position, token, argmax, margin) {mismatches[:5]} for "
            f"config={hf_config!r}, weights seed={seed}, case {case}, "
            f"prompts={token_ids.tolist()}, padding_mask={padding_mask.tolist()}"
        )


@pytest.mark.parametrize("default", [PARITY_EXAMPLES, GENERATION_EXAMPLES])
def test_example_count_reads_the_environment(monkeypatch, default):
    monkeypatch.delenv("KERAS_GEMMA2_PROPERTY_EXAMPLES", raising=False)
    assert example_count(default) == default
    monkeypatch.setenv("KERAS_GEMMA2_PROPERTY_EXAMPLES", "40")
    assert example_count(default) == 40
    monkeypatch.setenv("KERAS_GEMMA2_PROPERTY_EXAMPLES", "many")
    with pytest.raises(ValueError, match="KERAS_GEMMA2_PROPERTY_EXAMPLES"):
        example_count(default)
