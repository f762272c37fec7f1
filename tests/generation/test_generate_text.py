"""Text in, text out: strings, streaming, and every bad input named."""

import math

import keras
import numpy as np
import pytest

from keras_gemma2 import (
    Gemma2Backbone,
    Gemma2CausalLM,
    Gemma2CausalLMPreprocessor,
    Gemma2Tokenizer,
)
from tests.conftest import TINY_BACKBONE_CONFIG
from tests.generation.test_generate import make_causal_lm
from tests.text_fixtures import make_text_causal_lm


@pytest.fixture(scope="module")
def text_lm(gemma_vocabulary):
    keras.utils.set_random_seed(0)
    causal_lm = make_text_causal_lm(gemma_vocabulary, sequence_length=24)
    causal_lm.compile(sampler="greedy")
    return causal_lm


def test_string_generation_and_streaming_agree(text_lm):
    prompt = "def add(a, b):"
    text = text_lm.generate(prompt, max_length=20, stop_token_ids=None)
    assert isinstance(text, str) and text.startswith(prompt)
    pieces = list(
        text_lm.generate(prompt, max_length=20, stop_token_ids=None, stream=True)
    )
    assert len(pieces) > 1  # it streamed, not one final chunk
    assert prompt + "".join(pieces) == text


def test_batch_of_prompts_of_different_lengths(text_lm):
    prompts = ["x = 1", "for item in range(10):"]
    batch = text_lm.generate(prompts, max_length=20, stop_token_ids=None)
    singles = [text_lm.generate(p, max_length=20, stop_token_ids=None) for p in prompts]
    assert batch == singles


@pytest.mark.parametrize(
    "inputs, kwargs, message",
    [
        ("def f():", {"max_length": 3}, "max_length=3"),
        ("def f():", {"max_length": 9000}, "max_length"),
        ("", {}, "Prompt 0 is empty"),
        (["ok", ""], {}, "Prompt 1 is empty"),
    ],
)
def test_bad_text_inputs(text_lm, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        text_lm.generate(inputs, **kwargs)


def test_bad_token_dicts():
    causal_lm = make_causal_lm()
    token_ids = np.zeros((1, 8), "int32")
    mask = np.zeros((1, 8), "int32")
    mask[0, :2] = 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        causal_lm.generate(
            {"token_ids": token_ids + 500, "padding_mask": mask}, stop_token_ids=None
        )
    with pytest.raises(ValueError, match="padding_mask` is empty"):
        causal_lm.generate(
            {"token_ids": token_ids, "padding_mask": mask * 0}, stop_token_ids=None
        )
    with pytest.raises(ValueError, match="needs a preprocessor"):
        causal_lm.generate({"token_ids": token_ids, "padding_mask": mask})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "beam_me_up"}, "unknown sampler"),
        ({"sampler": "top_k", "temperature": -0.5}, "temperature"),
        ({"sampler": "random", "temperature": 0}, "temperature"),
    ],
)
def test_bad_sampler_settings(kwargs, message):
    causal_lm = make_causal_lm()
    with pytest.raises(ValueError, match=message):
        causal_lm.compile(**kwargs)


def test_sampling_follows_the_seed():
    causal_lm = make_causal_lm()
    token_ids = np.zeros((1, 12), "int32")
    mask = np.zeros((1, 12), "int32")
    token_ids[0, :2], mask[0, :2] = [2, 7], 1
    inputs = {"token_ids": token_ids, "padding_mask": mask}
    temperature = 10.0

    # Chance that two independent samples collide: the final soft cap keeps
    # every logit in [-cap, cap], so no token has probability above
    # exp(2 cap / T) / V at any step, and two runs of n tokens agree with
    # probability sum_s P(s)^2 <= max_s P(s) <= (exp(2 cap / T) / V) ** n.
    cap = TINY_BACKBONE_CONFIG["final_logit_soft_cap"]
    vocabulary_size = TINY_BACKBONE_CONFIG["vocabulary_size"]
    new_tokens = token_ids.shape[1] - 2
    collision = (math.exp(2 * cap / temperature) / vocabulary_size) ** new_tokens
    assert collision < 1e-12  # 0.0346 ** 10 = 2.5e-15

    def sample(seed):
        causal_lm.compile(sampler="random", temperature=temperature, seed=seed)
        outputs = causal_lm.generate(inputs, stop_token_ids=None)
        return np.asarray(outputs["token_ids"])[0, 2:]

    first = sample(1234)
    np.testing.assert_array_equal(sample(1234), first)  # the seed repeats
    assert not np.array_equal(sample(4321), first)  # and it is not ignored


def test_tokenizer_must_match_the_embedding(gemma_vocabulary):
    tokenizer = Gemma2Tokenizer(proto=gemma_vocabulary)
    pieces = tokenizer.vocabulary_size()
    backbone = Gemma2Backbone(
        vocabulary_size=pieces + 8,
        num_layers=1,
        num_query_heads=1,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=8,
        head_dim=8,
    )
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=8)
    with pytest.raises(
        ValueError, match=f"{pieces} pieces.*vocabulary_size={pieces + 8}"
    ):
        Gemma2CausalLM(backbone, preprocessor)
