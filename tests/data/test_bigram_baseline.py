"""Add-k bigram counts and perplexity against hand-computed and dense references."""

import math

import numpy as np
import pytest

from keras_gemma2.data import (
    BIGRAM_K_GRID,
    best_bigram_perplexity,
    bigram_perplexity,
    count_bigrams,
)


def test_counts_of_a_literal_stream():
    counts = count_bigrams(np.array([0, 1, 0, 1, 2], "int32"), vocabulary_size=4)
    # Pairs (0,1) x2, (1,0), (1,2); codes previous * 4 + next.
    assert counts.pair_codes.tolist() == [1, 4, 6]
    assert counts.pair_counts.tolist() == [2, 1, 1]
    assert counts.context_counts.tolist() == [2, 2, 0, 0]
    assert counts.vocabulary_size == 4


def test_perplexity_by_hand():
    counts = count_bigrams(np.array([0, 1, 0, 1, 2]), vocabulary_size=3)
    # p(1 | 0) = (2 + k) / (2 + 3k), p(2 | 1) = (1 + k) / (2 + 3k).
    windows = np.array([[0, 1, 2]])
    assert bigram_perplexity(counts, windows, 1.0) == pytest.approx(
        (3 / 5 * 2 / 5) ** -0.5, rel=1e-12
    )
    # Unseen pair (2, 0) after a token never seen as a context: 1 / V.
    assert bigram_perplexity(counts, np.array([[2, 0]]), 0.5) == pytest.approx(3.0)


def dense_reference(stream, windows, vocabulary_size, k):
    """Perplexity from a dense float64 `[V, V]` count table."""
    table = np.zeros((vocabulary_size, vocabulary_size))
    np.add.at(table, (stream[:-1], stream[1:]), 1.0)
    context = table.sum(axis=1, keepdims=True)  # [V, 1]
    probabilities = (table + k) / (context + k * vocabulary_size)
    log_probabilities = [
        math.log(probabilities[a, b])
        for window in windows
        for a, b in zip(window[:-1], window[1:], strict=True)
    ]
    return math.exp(-sum(log_probabilities) / len(log_probabilities))


@pytest.mark.parametrize("k", [1e-3, 0.1, 2.0])
def test_matches_a_dense_table(k):
    rng = np.random.default_rng(0)
    vocabulary_size = 13
    # Skewed draws, so some pairs are frequent and many are never seen.
    stream = (rng.zipf(1.5, 400) - 1) % vocabulary_size
    windows = ((rng.zipf(1.5, (6, 9)) - 1) % vocabulary_size).astype("int32")
    counts = count_bigrams(stream, vocabulary_size)
    assert bigram_perplexity(counts, windows, k) == pytest.approx(
        dense_reference(stream, windows, vocabulary_size, k), rel=1e-12
    )


def test_best_k_is_the_minimum_over_the_grid():
    rng = np.random.default_rng(1)
    stream = rng.integers(0, 7, 300)
    windows = rng.integers(0, 7, (4, 10))
    counts = count_bigrams(stream, 7)
    perplexity, k = best_bigram_perplexity(counts, windows)
    scores = {g: dense_reference(stream, windows, 7, g) for g in BIGRAM_K_GRID}
    assert k == min(scores, key=scores.get)
    assert perplexity == pytest.approx(scores[k], rel=1e-12)
    assert best_bigram_perplexity(counts, windows, k_grid=[0.5])[1] == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="from 0 to 5.*vocabulary_size=5"):
        count_bigrams(np.array([0, 5, 1]), vocabulary_size=5)
    with pytest.raises(ValueError, match="from -1"):
        count_bigrams(np.array([0, -1, 1]), vocabulary_size=5)
    with pytest.raises(ValueError, match=r"stream.*\(1,\)"):
        count_bigrams(np.array([0]), vocabulary_size=5)
    counts = count_bigrams(np.array([0, 1, 0]), vocabulary_size=2)
    with pytest.raises(ValueError, match="k=0"):
        bigram_perplexity(counts, np.array([[0, 1]]), k=0)
