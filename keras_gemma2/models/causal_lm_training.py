"""Training-time methods of `Gemma2CausalLM`: a loss that never holds all logits.

A training step of a causal LM over `T` tokens ends in a `[batch, T,
vocabulary]` tensor of logits. At `T=4096` and a 32000-token vocabulary that
is 0.52 GB in float32, and the tied projection, the soft cap, the softmax and
their gradients keep several such copies alive at once (measured with XLA's
memory analysis on the mid config of `benchmarks/train.py`: 0.9 GB of the
2.7 GB of temporaries of one LoRA step with `remat=True`). With Gemma 2's
256000-token vocabulary it is 4.2 GB per copy.

So, inside `fit` and `evaluate`, the model returns its final hidden states
instead of logits, and the loss computes the logits and the cross-entropy
chunk by chunk along the sequence, each chunk under `keras.remat`: the
backward pass recomputes one chunk's logits at a time. Only `[batch, T]`
per-token losses and the `[batch, T, hidden_dim]` hidden states stay alive.
The number is the same as Keras' own loss on the full logits (the sum runs
in another order: float32 rounding only), with the same reduction, sample
weights and `add_loss` terms; `tests/models/test_chunked_loss.py` checks it
against a float64 numpy cross-entropy and against the plain path.

It applies when the compiled loss is a
`keras.losses.SparseCategoricalCrossentropy(from_logits=True)` (the default
of `compile`) with no `ignore_class` and no `loss_weights`. Any other loss
gets the full logits, as before. Compiled metrics (by default a weighted
sparse categorical accuracy) are updated chunk by chunk, inside the loss, from
logits that take no part in the gradient. Calling the model yourself (`causal_lm(x)`,
`predict`) always returns logits.
"""

import contextlib
import contextvars

import keras
from keras import ops

# Float32 logits per chunk: 64 MiB, about 520 tokens of a 32000-token
# vocabulary, 64 of Gemma 2's 256000.
LOSS_CHUNK_BYTES = 2**26

_REDUCTIONS = ("sum", "sum_over_batch_size", "mean", "mean_with_sample_weight")

# The models whose train or test step is being traced or run right now.
_STEPPING = contextvars.ContextVar("keras_gemma2_stepping", default=())


def loss_chunk_length(batch_size, vocabulary_size, budget=None):
    """Tokens per row in one loss chunk: float32 logits within `budget` bytes.

    `budget` defaults to `LOSS_CHUNK_BYTES`. An unknown `batch_size` (a
    TensorFlow graph traced for any batch) counts as one row.

    Example:

    >>> loss_chunk_length(1, 32000)
    524
    >>> loss_chunk_length(4, 256000)
    16
    >>> loss_chunk_length(None, 10**9)  # never below one token
    1
    """
    rows = batch_size or 1
    budget = LOSS_CHUNK_BYTES if budget is None else budget
    return max(1, budget // (rows * vocabulary_size * 4))


class _PerTokenValues(keras.losses.Loss):
    """A Keras loss whose `call` returns the per-token values it is given.

    Calling it runs Keras' own weighting and reduction (`sample_weight`,
    `reduction`, `dtype`) over values computed elsewhere.
    """

    def call(self, y_true, y_pred):
        del y_true
        return y_pred


class Gemma2TrainingMethods:
    """Mixin holding `Gemma2CausalLM`'s training overrides (the chunked loss)."""

    # === The step: hidden states out, chunked loss in ===

    def train_step(self, *args, **kwargs):
        with self._stepping():
            return super().train_step(*args, **kwargs)

    def test_step(self, *args, **kwargs):
        with self._stepping():
            return super().test_step(*args, **kwargs)

    @contextlib.contextmanager
    def _stepping(self):
        token = _STEPPING.set(_STEPPING.get() + (id(self),))
        try:
            yield
        finally:
            _STEPPING.reset(token)

    def _loss_reads_hidden_states(self):
        """True inside this model's train/test step with a chunkable loss."""
        return id(self) in _STEPPING.get() and self._chunkable_loss() is not None

    def _chunkable_loss(self):
        """The compiled loss if the chunked computation equals it, else None."""
        loss = getattr(self, "loss", None)
        if not isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
            return None
        config = loss.get_config()
        if (
            not config.get("from_logits")
            or config.get("ignore_class") is not None
            or config.get("axis", -1) != -1
            or loss.reduction not in _REDUCTIONS
            or getattr(self, "_loss_weights_argument", None) is not None
        ):
            return None
        return loss

    def call(self, inputs, training=None, mask=None, **kwargs):
        if self._loss_reads_hidden_states():
            return self.backbone(inputs, training=training)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if not self._loss_reads_hidden_states():
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        loss = self._chunkable_loss()
        per_token = self.token_cross_entropy(y_pred, y)
        reducer = _PerTokenValues(
            name="token_cross_entropy", reduction=loss.reduction, dtype=loss.dtype
        )
        losses = [reducer(y, per_token, sample_weight)]
        losses.extend(self._aggregate_additional_loss(term) for term in self.losses)
        # Here, not in `compute_metrics`: the trainers call that after the
        # optimizer update, and the logits must come from the weights the loss
        # saw.
        self._update_compiled_metrics(y, y_pred, sample_weight)
        return losses[0] if len(losses) == 1 else ops.sum(ops.stack(losses))

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if not self._loss_reads_hidden_states():
            return super().compute_metrics(x, y, y_pred, sample_weight)
        return self.get_metrics_result()

    def _update_compiled_metrics(self, y, hidden_states, sample_weight):
        """Update `compile`'s metrics chunk by chunk, from gradient-free logits.

        Keras' metrics accumulate sums (totals and counts), so updating them
        once per chunk equals one update over the whole batch.
        """
        if self._compile_metrics is None:
            return
        hidden_states = ops.stop_gradient(hidden_states)
        for start, stop in self._loss_chunks(hidden_states):
            weights = None
            if sample_weight is not None:
                weights = sample_weight[:, start:stop]
            logits = self.logits_from_hidden_states(hidden_states[:, start:stop])
            self._compile_metrics.update_state(
                y[:, start:stop], ops.stop_gradient(logits), weights
            )

    # === The pieces ===

    def logits_from_hidden_states(self, hidden_states):
        """Soft-capped logits of final hidden states (the model's last layers).

        `causal_lm(x)` is `logits_from_hidden_states(causal_lm.backbone(x))`.
        """
        logits = self.backbone.token_embedding(hidden_states, reverse=True)
        return self.logit_soft_cap(logits)

    def token_cross_entropy(self, hidden_states, labels):
        """Per-token cross-entropy `[batch, T]` (float32) of next-token labels.

        Computes the logits of `hidden_states` (`[batch, T, hidden_dim]`, the
        backbone's output) in chunks of `loss_chunk_length` tokens, each under
        `keras.remat`, so that the backward pass holds one chunk's logits at
        a time. `labels` are `[batch, T]` token ids.

        Example:

        >>> import numpy as np
        >>> from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
        >>> causal_lm = Gemma2CausalLM(Gemma2Backbone(
        ...     vocabulary_size=64, num_layers=2, num_query_heads=2,
        ...     num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
        ...     head_dim=8, sliding_window_size=4))
        >>> x = {"token_ids": np.array([[2, 5, 9, 7]]),
        ...      "padding_mask": np.ones((1, 4), bool)}
        >>> hidden = causal_lm.backbone(x)
        >>> tuple(causal_lm.token_cross_entropy(hidden, np.array([[5, 9, 7, 1]])).shape)
        (1, 4)
        """
        labels = ops.convert_to_tensor(labels, "int32")
        pieces = []
        for start, stop in self._loss_chunks(hidden_states):

            def chunk_loss(hidden, labels=labels[:, start:stop]):
                logits = self.logits_from_hidden_states(hidden)
                logits = ops.cast(logits, "float32")
                picked = ops.take_along_axis(
                    logits, ops.expand_dims(labels, -1), axis=-1
                )
                return ops.logsumexp(logits, axis=-1) - picked[..., 0]

            chunk = hidden_states[:, start:stop]
            if (start, stop) == (0, hidden_states.shape[1]):
                pieces.append(chunk_loss(chunk))
            else:
                pieces.append(keras.remat(chunk_loss)(chunk))
        if len(pieces) == 1:
            return pieces[0]
        return ops.concatenate(pieces, axis=1)

    def _loss_chunks(self, hidden_states):
        """`(start, stop)` slices along the sequence; one if `T` is not static."""
        length = hidden_states.shape[1]
        if length is None:
            return [(0, None)]
        step = loss_chunk_length(hidden_states.shape[0], self.backbone.vocabulary_size)
        return [(start, min(start + step, length)) for start in range(0, length, step)]
