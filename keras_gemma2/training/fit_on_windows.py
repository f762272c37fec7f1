"""Fit a causal language model on token windows, one loss-curve point per interval."""

import keras
import numpy as np

from keras_gemma2.data.corpus_windows import window_inputs_and_labels
from keras_gemma2.layers.validation import positive_int


def fit_on_windows(
    causal_lm,
    windows,
    batch_size,
    log_every,
    validation_windows=None,
    verbose="auto",
):
    """Fit a compiled causal language model on windows, in order, with a loss curve.

    Each optimizer step takes the next `batch_size` windows (`window[:-1]`
    in, `window[1:]` as labels), so step `s` sees rows
    `s * batch_size .. (s + 1) * batch_size - 1`. Every `log_every` steps
    (and after the last one) the curve gets a point: the mean training loss
    of the steps since the previous point and, with `validation_windows`,
    the loss on those windows. Token ids go straight to the network: a
    preprocessor attached to `causal_lm` is set aside for the fit and put
    back after.

    Args:
        causal_lm: compiled `Gemma2CausalLM`, or any compiled Keras model
            that maps `{"token_ids", "padding_mask"}` of shape
            `[batch, sequence_length]` to logits for a loss that takes
            next-token labels.
        windows: integer numpy array `[steps * batch_size, sequence_length + 1]`,
            e.g. from `random_windows`.
        batch_size: int. Windows per optimizer step.
        log_every: int. Steps per point of the curve.
        validation_windows: integer numpy array
            `[num_windows, sequence_length + 1]` or `None`. Windows to
            measure the loss on at each point, e.g. a fixed few from
            `sequential_windows` over held-out text. Defaults to `None`.
        verbose: `"auto"`, 0, 1 or 2. Passed to `fit`. Defaults to `"auto"`.

    Returns:
        List of dicts, one a point: `"step"` (steps done), `"loss"` and,
        with `validation_windows`, `"held_out_loss"`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_gemma2.data import random_windows
    >>> from keras_gemma2.training import fit_on_windows
    >>> class Bigram(keras.Model):  # logits from the current token alone
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.table = keras.layers.Embedding(10, 10, "zeros")
    ...
    ...     def call(self, inputs):
    ...         return self.table(inputs["token_ids"])
    >>> model = Bigram()
    >>> model.compile(
    ...     optimizer="sgd",
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ... )
    >>> windows = random_windows(np.arange(20) % 5, 6, 4, seed=0)
    >>> curve = fit_on_windows(
    ...     model, windows, batch_size=2, log_every=1, validation_windows=windows[:2],
    ...     verbose=0,
    ... )
    >>> [point["step"] for point in curve], sorted(curve[0])
    ([1, 2, 3], ['held_out_loss', 'loss', 'step'])
    >>> round(curve[0]["loss"], 4)  # zero logits before the first update: ln 10
    2.3026
    """
    import tensorflow as tf

    positive_int(batch_size, "batch_size")
    positive_int(log_every, "log_every")
    windows = np.asarray(windows)
    if len(windows) == 0 or len(windows) % batch_size:
        raise ValueError(
            f"Received {len(windows)} `windows`, expected a positive multiple of "
            f"`batch_size={batch_size}` (one batch a step)."
        )
    validation = None
    if validation_windows is not None:
        validation = window_inputs_and_labels(validation_windows)
    steps = len(windows) // batch_size
    curve = []
    for start in range(0, steps, log_every):
        end = min(start + log_every, steps)
        rows = windows[start * batch_size : end * batch_size]
        # One `fit` a point: its single epoch's loss is the interval's mean.
        # `tf.data` (installed with keras_hub) rather than numpy arrays: on
        # jax they differ in the last bit of the validation loss, and the
        # shipped `gemma2_tiny_python` curve was made with `tf.data`.
        batches = tf.data.Dataset.from_tensor_slices(
            window_inputs_and_labels(rows)
        ).batch(batch_size)
        # The windows are token ids already: `keras.Model.fit` skips the
        # preprocessing KerasHub's `fit` adds (setting the preprocessor
        # aside instead fails on torch after `quantize`, which locks the
        # model's attributes).
        history = keras.Model.fit(
            causal_lm,
            batches,
            shuffle=False,
            validation_data=validation,
            validation_batch_size=batch_size,
            verbose=verbose,
        ).history
        point = {"step": end, "loss": history["loss"][0]}
        if validation is not None:
            point["held_out_loss"] = history["val_loss"][0]
        curve.append(point)
    return curve
