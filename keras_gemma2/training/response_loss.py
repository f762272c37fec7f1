"""Fine-tuning rows as packed arrays, and the mean cross-entropy on response tokens."""

import contextlib

import keras
import numpy as np

from keras_gemma2.layers.validation import positive_int
from keras_gemma2.training.sft_jsonl import preprocessor_inputs


def preprocess_rows(preprocessor, rows, sequence_length=None, chunk_size=64):
    """Pack fine-tuning rows into numpy arrays for `fit`.

    The rows go through `preprocessor` (a `Gemma2CausalLMPreprocessor`)
    `chunk_size` at a time, eagerly; `sample_weight` is 1 on response
    tokens only (for chats, on every model turn). Positions that are
    padding in every row are dropped from the end, which changes no loss
    (attention is causal and padding has weight 0) and saves compute when
    `sequence_length` is generous.

    Args:
        preprocessor: `Gemma2CausalLMPreprocessor`.
        rows: list of row dicts of one kind (`{"prompt", "response"}` or
            `{"messages"}`), e.g. from `read_sft_jsonl`.
        sequence_length: int or `None`. Packed length before trimming;
            defaults to the preprocessor's. Rows that do not fit follow the
            preprocessor's `truncate` policy.
        chunk_size: int. Rows per preprocessor call. Defaults to `64`.

    Returns:
        `(x, y, sample_weight)`: `x` a dict of `"token_ids"` and
        `"padding_mask"`, each `[len(rows), length]`, `y` and
        `sample_weight` `[len(rows), length]`.
    """
    positive_int(chunk_size, "chunk_size")
    if sequence_length is not None:
        positive_int(sequence_length, "sequence_length")
    parts = []
    for start in range(0, len(rows), chunk_size):
        inputs = preprocessor_inputs(rows[start : start + chunk_size])
        x, y, sample_weight = preprocessor(inputs, sequence_length=sequence_length)
        parts.append(
            [
                _numpy(x["token_ids"]),
                _numpy(x["padding_mask"]),
                _numpy(y),
                _numpy(sample_weight),
            ]
        )
    token_ids, padding_mask, labels, weights = (
        np.concatenate(arrays) for arrays in zip(*parts, strict=True)
    )
    used = int(np.flatnonzero(padding_mask.any(axis=0)).max()) + 1
    x = {"token_ids": token_ids[:, :used], "padding_mask": padding_mask[:, :used]}
    return x, labels[:, :used], weights[:, :used].astype("float32")


def response_loss(causal_lm, rows, sequence_length=None, batch_size=8):
    """Mean cross-entropy of a causal LM on the response tokens of `rows`.

    The rows are packed by the model's preprocessor (`preprocess_rows`);
    the loss is `sum(weight * -log p(label)) / sum(weight)` over every
    position, computed in float64 from the model's logits, so prompts,
    user turns and padding (weight 0) add nothing. It is the held-out
    measure of an instruction or chat fine-tune: it falls when the model
    learns to answer, whatever it does with the prompts.

    Args:
        causal_lm: `Gemma2CausalLM` with a preprocessor.
        rows: list of row dicts of one kind, e.g. from `read_sft_jsonl`.
        sequence_length: int or `None`; see `preprocess_rows`.
        batch_size: int. Rows per forward pass. Defaults to `8`.

    Returns:
        The mean response-token cross-entropy in nats, a float.

    Example:

    ```python
    rows = read_sft_jsonl(bundled_dataset_path("python_instructions", "held_out"))
    causal_lm = Gemma2CausalLM.from_preset("gemma2_tiny_python")
    print(response_loss(causal_lm, rows))
    ```
    """
    positive_int(batch_size, "batch_size")
    if causal_lm.preprocessor is None:
        raise ValueError(
            "Received a `causal_lm` without a preprocessor, expected one that "
            "can pack text rows (a preset with a tokenizer)."
        )
    x, labels, weights = preprocess_rows(
        causal_lm.preprocessor, rows, sequence_length=sequence_length
    )
    return weighted_cross_entropy(causal_lm, x, labels, weights, batch_size)


def weighted_cross_entropy(causal_lm, x, labels, weights, batch_size=8):
    """`sum(weights * -log p(labels)) / sum(weights)` from the model's logits.

    Args:
        causal_lm: a model mapping `x` to logits `[batch, length, vocab]`.
        x: dict of `"token_ids"` and `"padding_mask"` arrays `[rows, length]`.
        labels: int array `[rows, length]`.
        weights: float array `[rows, length]`.
        batch_size: int. Rows per forward pass.

    Returns:
        The weighted mean cross-entropy in nats, a float.
    """
    total = weight = 0.0
    # Eager forward passes: compiling `predict` for two batch shapes takes
    # longer on CPU than scoring a held-out set.
    with _no_gradients():
        for start in range(0, len(labels), batch_size):
            batch = {key: value[start : start + batch_size] for key, value in x.items()}
            logits = keras.ops.convert_to_numpy(causal_lm(batch, training=False))
            logits = logits.astype(np.float64)
            peak = logits.max(axis=-1, keepdims=True)
            log_normalizer = peak[..., 0] + np.log(np.exp(logits - peak).sum(axis=-1))
            label_logits = np.take_along_axis(
                logits, labels[start : start + batch_size, :, None], axis=-1
            )[..., 0]
            batch_weights = weights[start : start + batch_size]
            total += float((batch_weights * (log_normalizer - label_logits)).sum())
            weight += float(batch_weights.sum())
    if weight == 0:
        raise ValueError(
            "The rows have no response tokens (every sample weight is 0), "
            "expected at least one token to score."
        )
    return total / weight


def _numpy(value):
    return keras.ops.convert_to_numpy(value)


def _no_gradients():
    """`torch.no_grad()` on torch (no autograd graph kept), else nothing."""
    if keras.config.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
