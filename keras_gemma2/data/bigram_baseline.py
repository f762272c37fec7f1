"""A count-based add-k bigram model: the baseline a trained model must beat."""

import collections
import math

import numpy as np

from keras_gemma2.layers.validation import positive_number

# Smoothing constants tried by `best_bigram_perplexity`.
BIGRAM_K_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)

BigramCounts = collections.namedtuple(
    "BigramCounts", ["pair_codes", "pair_counts", "context_counts", "vocabulary_size"]
)
BigramCounts.__doc__ = """Sparse bigram counts of a token stream.

Fields: `pair_codes` (sorted `previous * vocabulary_size + next` of every pair
seen), `pair_counts` (how often each was seen), `context_counts` (`[V]`, how
often each token is followed by another) and `vocabulary_size`.
"""


def count_bigrams(stream, vocabulary_size):
    """Count the bigrams (pairs of neighbouring tokens) of a token stream.

    The counts are sparse, so they fit for any vocabulary: a `V x V` table
    of a 256k vocabulary would not.

    Args:
        stream: 1D integer numpy array. Token ids below `vocabulary_size`,
            e.g. the train split from `token_stream`.
        vocabulary_size: int. Number of token ids.

    Returns:
        `BigramCounts`.

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.data import count_bigrams
    >>> counts = count_bigrams(np.array([0, 1, 0, 1, 2]), vocabulary_size=3)
    >>> counts.pair_codes.tolist(), counts.pair_counts.tolist()
    ([1, 3, 5], [2, 1, 1])
    >>> counts.context_counts.tolist()
    [2, 2, 0]
    """
    stream = np.asarray(stream)
    if stream.ndim != 1 or stream.size < 2:
        raise ValueError(
            "Received an invalid value for `stream`, expected a 1D array of at "
            f"least 2 token ids. Received: shape={stream.shape}"
        )
    if stream.min() < 0 or stream.max() >= vocabulary_size:
        raise ValueError(
            f"Received token ids from {stream.min()} to {stream.max()}, expected "
            f"ids in [0, vocabulary_size) with vocabulary_size={vocabulary_size}."
        )
    codes = stream[:-1].astype("int64") * vocabulary_size + stream[1:]
    pair_codes, pair_counts = np.unique(codes, return_counts=True)
    context_counts = np.bincount(stream[:-1], minlength=vocabulary_size)
    return BigramCounts(pair_codes, pair_counts, context_counts, vocabulary_size)


def bigram_perplexity(counts, windows, k):
    """Perplexity of the add-k bigram model on windows of held-out tokens.

    The model gives `next` after `previous` the probability
    `(c(previous, next) + k) / (c(previous) + k V)`, with `c` the counts and
    `V` the vocabulary size; every label position of every window is scored
    given the token before it, as `held_out_perplexity` scores a network.

    Args:
        counts: `BigramCounts`, from `count_bigrams`.
        windows: integer numpy array `[num_windows, sequence_length + 1]`,
            e.g. from `sequential_windows`.
        k: float. Smoothing added to every count; positive.

    Returns:
        float.

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.data import bigram_perplexity, count_bigrams
    >>> counts = count_bigrams(np.array([0, 1, 0, 1, 2]), vocabulary_size=3)
    >>> # p(1 | 0) = (2 + 1) / (2 + 3) and p(2 | 1) = (1 + 1) / (2 + 3).
    >>> round(bigram_perplexity(counts, np.array([[0, 1, 2]]), k=1.0), 6)
    2.041241
    """
    positive_number(k, "k")
    pair_codes, pair_counts, context_counts, vocabulary_size = counts
    windows = np.asarray(windows)
    previous = windows[:, :-1].ravel().astype("int64")
    following = windows[:, 1:].ravel()
    codes = previous * vocabulary_size + following
    index = np.minimum(np.searchsorted(pair_codes, codes), len(pair_codes) - 1)
    joint = np.where(pair_codes[index] == codes, pair_counts[index], 0)
    probability = (joint + k) / (context_counts[previous] + k * vocabulary_size)
    return math.exp(-np.log(probability).mean())


def best_bigram_perplexity(counts, windows, k_grid=BIGRAM_K_GRID):
    """The lowest add-k bigram perplexity over a grid of `k`, and its `k`.

    Picking `k` on the windows scored makes the baseline as strong as an
    add-k bigram gets, so a model that beats it has learned more than pair
    statistics.

    Args:
        counts: `BigramCounts`, from `count_bigrams`.
        windows: integer numpy array `[num_windows, sequence_length + 1]`.
        k_grid: sequence of positive floats. Defaults to `BIGRAM_K_GRID`
            (1e-4 to 1, three steps a decade).

    Returns:
        A tuple `(perplexity, k)`.

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.data import best_bigram_perplexity, count_bigrams
    >>> counts = count_bigrams(np.array([0, 1, 0, 1, 2]), vocabulary_size=3)
    >>> # The unseen pair (0, 2) favours the largest k.
    >>> perplexity, k = best_bigram_perplexity(counts, np.array([[0, 1, 0, 2]]))
    >>> round(perplexity, 4), k
    (2.7516, 1.0)
    """
    return min((bigram_perplexity(counts, windows, k), k) for k in k_grid)
