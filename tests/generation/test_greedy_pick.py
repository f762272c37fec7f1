"""The greedy pick: `decode.first_max_index` and `decode.choose_token`.

`first_max_index` is held to numpy's `argmax` (the first largest value, or
the first NaN), and `choose_token` with a greedy sampler to KerasHub's own
`GreedySampler.get_next_token(compute_probabilities(logits))`, on logits
made to tie after the softmax.
"""

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_gemma2.generation import decode


def _numpy(x):
    return ops.convert_to_numpy(x)


def test_first_max_index_is_numpys_argmax():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 300)).astype("float32")
    values[1, [7, 40, 299]] = values[1].max() + 1.0  # a three-way tie
    values[2, 0] = values[2].max() + 1.0  # at the first position
    values[3, 299] = values[3].max() + 1.0  # at the last
    values[4, [5, 90]] = np.nan  # NaN wins, the first of them
    values[5] = -np.inf  # every value equal
    actual = _numpy(decode.first_max_index(values))
    np.testing.assert_array_equal(actual, np.argmax(values, axis=-1))
    assert actual.tolist()[1:] == [7, 0, 299, 5, 0]
    assert keras.backend.standardize_dtype(actual.dtype) == "int32"


def test_first_max_index_keeps_leading_axes():
    values = np.random.default_rng(1).normal(size=(2, 3, 50)).astype("float32")
    np.testing.assert_array_equal(
        _numpy(decode.first_max_index(values)), np.argmax(values, axis=-1)
    )


def test_only_kerashubs_own_greedy_sampler_is_plain():
    class Shifted(keras_hub.samplers.GreedySampler):
        def get_next_token(self, probabilities):
            return ops.argmax(probabilities[..., 1:], axis=-1) + 1

    assert decode.plain_greedy(keras_hub.samplers.GreedySampler(temperature=0.5))
    assert not decode.plain_greedy(Shifted())
    assert not decode.plain_greedy(keras_hub.samplers.TopKSampler(k=2))


def _near_ties(rng, batch, vocabulary):
    """Logits whose largest two are one float32 step apart in some rows:
    the softmax rounds their probabilities to one value, and the sampler
    then picks the first of them (the smaller logit when it comes first)."""
    logits = rng.normal(size=(batch, vocabulary)).astype("float32") * 4
    logits[::2] -= 40.0
    top = np.float32(1e-3)
    logits[::2, 3] = top
    logits[::2, 9] = np.nextafter(top, np.float32(np.inf))
    return logits


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_greedy_choose_token_is_kerashubs_pick(temperature):
    sampler = keras_hub.samplers.GreedySampler(temperature=temperature)
    rng = np.random.default_rng(2)
    batch, vocabulary, length = 6, 40, 5
    prompt = rng.integers(0, vocabulary, (batch, length)).astype("int32")
    prompt_mask = np.zeros((batch, length), bool)
    prompt_mask[0, :3] = True  # row 0 keeps its own token at index 2
    index = 2
    tie_rows_differ = 0
    for _ in range(5):
        logits = _near_ties(rng, batch, vocabulary)
        expected = _numpy(sampler.get_next_token(sampler.compute_probabilities(logits)))
        tie_rows_differ += int((expected != np.argmax(logits, axis=-1)).sum())
        expected = np.where(prompt_mask[:, index], prompt[:, index], expected)
        written, done, token = decode.choose_token(
            sampler,
            logits,
            prompt,
            prompt_mask,
            index,
            np.zeros((batch,), bool),
            (int(expected[1]),),
        )
        np.testing.assert_array_equal(_numpy(token), expected)
        np.testing.assert_array_equal(_numpy(written)[:, index], expected)
        # Row 1 picked a stop token; row 0 kept its prompt token.
        assert _numpy(done)[1] and not _numpy(done)[0]
    # The near ties made the sampler's pick differ from `argmax(logits)`.
    assert tie_rows_differ > 0
