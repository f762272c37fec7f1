"""Held-out perplexity of a causal language model."""

import math

import keras
import numpy as np

from keras_gemma2.data.corpus_windows import window_inputs_and_labels
from keras_gemma2.layers.validation import positive_int


def held_out_perplexity(causal_lm, windows, batch_size=8):
    """Perplexity of a causal language model on windows of held-out tokens.

    The exponential of the mean next-token negative log-likelihood over
    every label position of every window (`window[1:]` given `window[:-1]`),
    computed from the model's logits in float64. Token ids go straight to
    the network: a preprocessor attached to `causal_lm` is set aside for the
    call and put back after.

    Args:
        causal_lm: `Gemma2CausalLM`, or any Keras model whose
            `predict_on_batch` maps `{"token_ids", "padding_mask"}` of shape
            `[batch, sequence_length]` to logits
            `[batch, sequence_length, vocabulary_size]`.
        windows: integer numpy array `[num_windows, sequence_length + 1]`,
            e.g. from `sequential_windows`.
        batch_size: int. Windows per forward pass. Defaults to `8`.

    Returns:
        float. 1 for a model sure of every label, `vocabulary_size` for one
        that spreads its probability evenly.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_gemma2.data import held_out_perplexity
    >>> token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    >>> padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    >>> logits = keras.layers.Embedding(10, 10, embeddings_initializer="zeros")(
    ...     token_ids
    ... )
    >>> uniform = keras.Model(
    ...     {"token_ids": token_ids, "padding_mask": padding_mask}, logits
    ... )
    >>> round(held_out_perplexity(uniform, np.array([[1, 2, 3], [4, 5, 6]])), 6)
    10.0
    """
    positive_int(batch_size, "batch_size")
    total, count = 0.0, 0
    for begin in range(0, len(windows), batch_size):
        inputs, labels = window_inputs_and_labels(windows[begin : begin + batch_size])
        # Token ids already: `keras.Model.predict_on_batch` skips KerasHub's
        # preprocessing (no need to set the preprocessor aside, which fails on
        # torch after `quantize`).
        logits = keras.Model.predict_on_batch(causal_lm, inputs)
        total += _negative_log_likelihood(logits, labels)
        count += labels.size
    return math.exp(total / count)


def _negative_log_likelihood(logits, labels):
    """Summed `-log softmax(logits)[label]` of logits `[B, T, V]`, labels `[B, T]`."""
    logits = np.asarray(logits, "float64")
    logits = logits - logits.max(axis=-1, keepdims=True)
    log_normalizer = np.log(np.exp(logits).sum(axis=-1))  # [B, T]
    label_logits = np.take_along_axis(logits, labels[..., None], -1)[..., 0]  # [B, T]
    return float((log_normalizer - label_logits).sum())
