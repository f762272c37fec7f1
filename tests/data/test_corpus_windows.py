"""sequential_windows, random_windows and window_inputs_and_labels on literal arrays."""

import numpy as np
import pytest

from keras_gemma2.data import (
    random_windows,
    sequential_windows,
    window_inputs_and_labels,
)


def test_sequential_windows_share_one_token():
    stream = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], "int32")
    windows = sequential_windows(stream, 3)
    assert windows.tolist() == [
        [10, 11, 12, 13],
        [13, 14, 15, 16],
        [16, 17, 18, 19],
    ]
    assert windows.dtype == np.int32
    # Every token after the first is a label exactly once (but the tail).
    assert windows[:, 1:].ravel().tolist() == list(range(11, 20))


def test_sequential_windows_max_tokens():
    stream = np.arange(20)
    assert sequential_windows(stream, 4, max_tokens=8).tolist() == [
        [0, 1, 2, 3, 4],
        [4, 5, 6, 7, 8],
    ]
    # 7 labels make one whole window of 4 and a dropped tail.
    assert sequential_windows(stream, 4, max_tokens=7).tolist() == [[0, 1, 2, 3, 4]]
    assert len(sequential_windows(stream, 4, max_tokens=1000)) == 4


def test_sequential_windows_need_one_window():
    assert sequential_windows(np.arange(4), 3).tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="3 tokens.*sequence_length=3"):
        sequential_windows(np.arange(3), 3)
    with pytest.raises(ValueError, match="max_tokens=2"):
        sequential_windows(np.arange(10), 3, max_tokens=2)


def test_random_windows_are_slices_of_the_stream():
    stream = np.arange(1000, 1050)
    windows = random_windows(stream, 64, 6, seed=3)
    assert windows.shape == (64, 7)
    starts = windows[:, 0] - 1000
    # Each row is stream[start : start + 7], start in 0 .. 50 - 6 - 2.
    np.testing.assert_array_equal(windows, 1000 + starts[:, None] + np.arange(7))
    assert starts.min() >= 0 and starts.max() <= 42
    # The draw is numpy's default_rng(seed) (the shipped preset was trained
    # on these windows).
    expected = np.random.default_rng(3).integers(0, 43, 64)
    np.testing.assert_array_equal(starts, expected)


def test_random_windows_follow_the_seed():
    stream = np.arange(500)
    first = random_windows(stream, 8, 16, seed=0)
    np.testing.assert_array_equal(first, random_windows(stream, 8, 16, seed=0))
    assert not np.array_equal(first, random_windows(stream, 8, 16, seed=1))


def test_random_windows_need_room():
    # 5 tokens: starts from 0 .. 0, one window of 3 inputs plus a label.
    assert random_windows(np.arange(5), 2, 3, seed=0).tolist() == [[0, 1, 2, 3]] * 2
    with pytest.raises(ValueError, match="4 tokens.*at least 5"):
        random_windows(np.arange(4), 2, 3, seed=0)


def test_window_inputs_and_labels():
    windows = np.array([[5, 6, 7, 8], [1, 2, 3, 4]], "int32")
    x, y = window_inputs_and_labels(windows)
    assert sorted(x) == ["padding_mask", "token_ids"]
    assert x["token_ids"].tolist() == [[5, 6, 7], [1, 2, 3]]
    assert x["padding_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert y.tolist() == [[6, 7, 8], [2, 3, 4]]
    assert x["token_ids"].dtype == y.dtype == np.int32


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sequential_windows(np.arange(10), 0), "sequence_length=0"),
        (lambda: sequential_windows(np.arange(10), 2.5), "sequence_length=2.5"),
        (lambda: random_windows(np.arange(10), 2, True, 0), "sequence_length=True"),
        (lambda: sequential_windows(np.zeros((2, 5)), 2), r"stream.*\(2, 5\)"),
        (lambda: window_inputs_and_labels(np.arange(4)), r"windows.*\(4,\)"),
        (lambda: window_inputs_and_labels(np.zeros((2, 1))), r"\(2, 1\)"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
