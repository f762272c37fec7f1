"""`generate` takes what KerasHub's takes; unsupported samplers are refused at compile.

The reference for every prompt form is the same model's output for a plain
Python list of the same strings (greedy decoding, so deterministic), and,
for token-id dicts, the same dicts given directly.
"""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from tests.text_fixtures import make_text_causal_lm

# Every form below reaches the model in batches of two prompts, so all the
# tests share one compiled generation program.
PROMPTS = ["x = 1", "for item in range(10):", "def f():", "import os"]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def text_lm(gemma_vocabulary):
    keras.utils.set_random_seed(0)
    causal_lm = make_text_causal_lm(gemma_vocabulary, sequence_length=MAX_LENGTH)
    causal_lm.compile(sampler="greedy")
    return causal_lm


@pytest.fixture(scope="module")
def expected(text_lm):
    outputs = generate(text_lm, PROMPTS[:2]) + generate(text_lm, PROMPTS[2:])
    assert len(outputs) == 4 and all(
        out.startswith(p) and len(out) > len(p)
        for out, p in zip(outputs, PROMPTS, strict=True)
    )
    return outputs


def make_causal_lm():
    """Two layers, random weights: a generation program compiles in seconds."""
    keras.utils.set_random_seed(1)
    backbone = Gemma2Backbone(
        vocabulary_size=64, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8,
        sliding_window_size=4,
    )  # fmt: skip
    return Gemma2CausalLM(backbone)


def generate(causal_lm, inputs):
    return causal_lm.generate(inputs, max_length=MAX_LENGTH, stop_token_ids=None)


@pytest.mark.parametrize(
    "make_inputs",
    [
        lambda: np.array(PROMPTS[:2]),  # unicode array
        lambda: np.array([p.encode() for p in PROMPTS[:2]], dtype=object),  # bytes
        lambda: tf.constant(PROMPTS[:2]),
        lambda: tf.data.Dataset.from_tensor_slices(PROMPTS).batch(2),  # 2 batches
    ],
    ids=["numpy_str", "numpy_bytes", "tf_tensor", "tf_dataset"],
)
def test_string_forms_equal_a_list(text_lm, expected, make_inputs):
    inputs = make_inputs()
    outputs = generate(text_lm, inputs)
    assert outputs == expected[: len(outputs)]
    assert len(outputs) == (4 if isinstance(inputs, tf.data.Dataset) else 2)


def test_scalar_string_forms_give_one_string(text_lm, expected):
    # A batch of one prompt: its own compiled program, once.
    single = generate(text_lm, PROMPTS[1])
    assert single == expected[1]
    assert generate(text_lm, np.array(PROMPTS[1])) == single
    assert generate(text_lm, tf.constant(PROMPTS[1])) == single


def test_dataset_of_token_dicts_equals_the_dicts():
    causal_lm = make_causal_lm()
    causal_lm.compile(sampler="greedy")
    token_ids = np.zeros((4, 8), "int32")
    mask = np.zeros((4, 8), "int32")
    for row, length in enumerate([2, 4, 3, 2]):
        token_ids[row, :length] = np.arange(2, 2 + length) + row
        mask[row, :length] = 1
    inputs = {"token_ids": token_ids, "padding_mask": mask}
    halves = [
        causal_lm.generate(
            {key: value[rows] for key, value in inputs.items()}, stop_token_ids=None
        )
        for rows in (slice(0, 2), slice(2, 4))
    ]
    dataset = tf.data.Dataset.from_tensor_slices(inputs).batch(2)
    outputs = causal_lm.generate(dataset, stop_token_ids=None)
    for key in ("token_ids", "padding_mask"):
        expected = np.concatenate([np.asarray(half[key]) for half in halves])
        np.testing.assert_array_equal(outputs[key], expected)
    # Generation happened: the masks grew past the prompts.
    assert (np.asarray(outputs["padding_mask"]).sum(axis=1) > mask.sum(axis=1)).all()


def test_every_dataset_batch_is_checked_before_any_runs():
    causal_lm = make_causal_lm()
    causal_lm.compile(sampler="greedy")
    vocabulary_size = causal_lm.backbone.vocabulary_size
    token_ids = np.full((3, 6), 2, "int32")
    token_ids[2, 1] = vocabulary_size  # in the second batch
    mask = np.zeros((3, 6), "int32")
    mask[:, :2] = 1
    dataset = tf.data.Dataset.from_tensor_slices(
        {"token_ids": token_ids, "padding_mask": mask}
    ).batch(2)
    calls = []
    causal_lm.generate_function = lambda *args, **kwargs: calls.append(args)
    with pytest.raises(
        ValueError, match=r"Received: token_ids\[0, 1\]=" + str(vocabulary_size)
    ):
        causal_lm.generate(dataset, stop_token_ids=None)
    assert calls == []  # the first, valid batch never ran


def test_bad_prompt_forms(text_lm):
    with pytest.raises(ValueError, match="rank-1 array of strings"):
        generate(text_lm, np.array([PROMPTS[:2], PROMPTS[2:]]))
    with pytest.raises(ValueError, match="at least one batch"):
        generate(text_lm, tf.data.Dataset.from_tensor_slices(PROMPTS).take(0))
    with pytest.raises(ValueError, match="one string prompt"):
        text_lm.generate(tf.data.Dataset.from_tensor_slices(PROMPTS), stream=True)


@pytest.mark.parametrize(
    "sampler, name",
    [
        (lambda: keras_hub.samplers.BeamSampler(num_beams=2), "BeamSampler"),
        (lambda: keras_hub.samplers.ContrastiveSampler(), "ContrastiveSampler"),
        (lambda: "beam", "'beam'"),
        (lambda: "contrastive", "'contrastive'"),
    ],
    ids=["beam", "contrastive", "beam_name", "contrastive_name"],
)
def test_unsupported_samplers_are_refused_at_compile(sampler, name):
    causal_lm = make_causal_lm()
    causal_lm.compile(sampler="greedy")
    with pytest.raises(ValueError, match=f"does not implement the search of {name}"):
        causal_lm.compile(sampler=sampler())
    # Refused before anything changed: the greedy sampler is still in place.
    assert isinstance(causal_lm.sampler, keras_hub.samplers.GreedySampler)


def test_a_sampler_overriding_get_next_token_is_accepted():
    class ArgMinSampler(keras_hub.samplers.Sampler):
        def get_next_token(self, probabilities):
            return keras.ops.argmin(probabilities, axis=-1)

    causal_lm = make_causal_lm()
    causal_lm.compile(sampler=ArgMinSampler())
    token_ids = np.zeros((1, 6), "int32")
    mask = np.zeros((1, 6), "int32")
    token_ids[0, :2], mask[0, :2] = [2, 7], 1
    inputs = {"token_ids": token_ids, "padding_mask": mask}
    outputs = causal_lm.generate(inputs, stop_token_ids=None)
    # The least likely token at each step, by the model's own forward pass.
    generated = np.asarray(outputs["token_ids"])
    logits = keras.ops.convert_to_numpy(
        causal_lm({"token_ids": generated, "padding_mask": np.ones_like(generated)})
    )
    np.testing.assert_array_equal(generated[0, 2:], logits[0, 1:-1].argmin(-1))
