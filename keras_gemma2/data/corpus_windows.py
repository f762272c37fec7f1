"""Cut a token stream into training and evaluation windows."""

import numpy as np

from keras_gemma2.layers.validation import positive_int


def sequential_windows(stream, sequence_length, max_tokens=None):
    """Cut a token stream into consecutive windows of inputs plus one label.

    Window `i` is `stream[i * sequence_length : (i + 1) * sequence_length + 1]`:
    `sequence_length` inputs and, one to the right, `sequence_length`
    labels. Neighbouring windows share one token (the last label of one is
    the first input of the next), so every token after the first is scored
    exactly once; a tail too short for a whole window is dropped. This is
    the fixed set to measure held-out loss or perplexity on.

    Args:
        stream: 1D integer numpy array. Token ids, e.g. from `token_stream`.
        sequence_length: int. Inputs per window.
        max_tokens: int or `None`. Use only the first `max_tokens` labels
            (`max_tokens + 1` tokens) of the stream. Defaults to `None`
            (all of it).

    Returns:
        numpy array `[num_windows, sequence_length + 1]` of the stream's dtype.

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.data import sequential_windows
    >>> sequential_windows(np.arange(10), 3).tolist()
    [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    >>> sequential_windows(np.arange(10), 3, max_tokens=7).tolist()
    [[0, 1, 2, 3], [3, 4, 5, 6]]
    """
    stream = _check_stream(stream, sequence_length)
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    count = (len(stream) - 1) // sequence_length
    if count == 0:
        kept = "" if max_tokens is None else f" (kept by `max_tokens={max_tokens}`)"
        raise ValueError(
            f"Received a `stream` of {len(stream)} tokens{kept}, fewer than one "
            f"window of `sequence_length={sequence_length}` inputs plus a label."
        )
    starts = np.arange(count) * sequence_length  # [num_windows]
    return stream[starts[:, None] + np.arange(sequence_length + 1)]


def random_windows(stream, num_windows, sequence_length, seed):
    """Draw windows of inputs plus one label at random places of a stream.

    Window starts are drawn uniformly, with replacement, from
    `0 .. len(stream) - sequence_length - 2` by
    `numpy.random.default_rng(seed)`, so a seed gives the same windows on
    every machine. Pretraining on random windows of a document stream needs
    no padding: every position of every window is a real token.

    Args:
        stream: 1D integer numpy array. Token ids, e.g. from `token_stream`.
        num_windows: int. Windows to draw (e.g. steps times batch size).
        sequence_length: int. Inputs per window.
        seed: int. Seed of the generator that draws the starts.

    Returns:
        numpy array `[num_windows, sequence_length + 1]` of the stream's dtype.

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.data import random_windows
    >>> windows = random_windows(np.arange(100), 4, 8, seed=0)
    >>> windows.shape
    (4, 9)
    >>> bool((np.diff(windows, axis=1) == 1).all())
    True
    """
    stream = _check_stream(stream, sequence_length)
    if len(stream) < sequence_length + 2:
        raise ValueError(
            f"Received a `stream` of {len(stream)} tokens, too few to draw "
            f"windows of `sequence_length={sequence_length}` inputs plus a "
            f"label from it; expected at least {sequence_length + 2} tokens."
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - sequence_length - 1, num_windows)
    return stream[starts[:, None] + np.arange(sequence_length + 1)]


def window_inputs_and_labels(windows):
    """Split windows into model inputs and next-token labels.

    Args:
        windows: integer numpy array `[batch, sequence_length + 1]`, e.g.
            from `sequential_windows` or `random_windows`.

    Returns:
        A tuple `(x, y)`: `x` is a dict of `"token_ids"` (the first
        `sequence_length` tokens) and `"padding_mask"` (all ones), as
        `Gemma2CausalLM` takes them without its preprocessor; `y` is
        `[batch, sequence_length]`, the tokens one to the right.

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.data import window_inputs_and_labels
    >>> x, y = window_inputs_and_labels(np.array([[5, 6, 7, 8]]))
    >>> x["token_ids"].tolist(), x["padding_mask"].tolist(), y.tolist()
    ([[5, 6, 7]], [[1, 1, 1]], [[6, 7, 8]])
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(
            "Received an invalid value for `windows`, expected an array of "
            "shape `[batch, sequence_length + 1]` with at least 2 columns. "
            f"Received: shape={windows.shape}"
        )
    inputs = windows[:, :-1]
    return {"token_ids": inputs, "padding_mask": np.ones_like(inputs)}, windows[:, 1:]


def _check_stream(stream, sequence_length):
    """The stream as a 1D numpy array, after checking both arguments."""
    positive_int(sequence_length, "sequence_length")
    stream = np.asarray(stream)
    if stream.ndim != 1:
        raise ValueError(
            "Received an invalid value for `stream`, expected a 1D array of "
            f"token ids. Received: shape={stream.shape}"
        )
    return stream
