"""Masks against literal 0/1 matrices."""

import numpy as np
from keras import ops

from keras_gemma2.layers import (
    attention_mask,
    causal_mask,
    sliding_window_mask,
    visible_key_counts,
)


def as_int(mask):
    return ops.convert_to_numpy(mask).astype(int)


def positions(n, start=0):
    return ops.arange(start, start + n, dtype="int32")


def test_causal_mask():
    expected = [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]
    np.testing.assert_array_equal(
        as_int(causal_mask(positions(4), positions(4))), expected
    )


def test_sliding_window_mask_sees_itself_and_window_minus_one_before():
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    mask = sliding_window_mask(positions(5), positions(5), window_size=2)
    np.testing.assert_array_equal(as_int(mask), expected)


def test_sliding_window_mask_with_offset_queries_against_a_cache():
    # Two new queries at positions 4 and 5 against six cached keys, window 3.
    expected = [
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]
    mask = sliding_window_mask(positions(2, start=4), positions(6), window_size=3)
    np.testing.assert_array_equal(as_int(mask), expected)


def test_window_none_is_causal():
    mask = sliding_window_mask(positions(3), positions(3), window_size=None)
    np.testing.assert_array_equal(as_int(mask), [[1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_padding_masks_keys_per_batch_row():
    padding = np.array([[1, 1, 0], [1, 1, 1]], "int32")
    mask = attention_mask(
        positions(3), positions(3), window_size=2, padding_mask=padding
    )
    expected = [
        [[1, 0, 0], [1, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]],
    ]
    np.testing.assert_array_equal(as_int(mask), expected)


def test_visible_key_counts_sum_the_mask_rows():
    padding = np.array([[0, 1, 1, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1]], "int32")
    # Window 2: row i counts real keys among i - 1 and i.
    expected = [[0, 1, 2, 1, 0, 0, 1], [1, 2, 2, 2, 2, 2, 2]]
    counts = visible_key_counts(padding, window_size=2)
    np.testing.assert_array_equal(as_int(counts), expected)
    full = attention_mask(positions(7), positions(7), 2, padding)
    np.testing.assert_array_equal(as_int(full).sum(-1), expected)
    causal = [[0, 1, 2, 2, 2, 2, 3], [1, 2, 3, 4, 5, 6, 7]]
    np.testing.assert_array_equal(as_int(visible_key_counts(padding)), causal)
