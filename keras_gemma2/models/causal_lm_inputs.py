"""Input checks of `Gemma2CausalLM`: token ids and masks, on the host, per backend.

An id outside `[0, vocabulary_size)` does something different on each backend
(JAX's gather returns NaN rows, TensorFlow and PyTorch raise their own errors
from deep inside the embedding, TensorFlow on a GPU returns zeros, and `-1`
silently reads the last row on all three). So ids are checked in numpy before
anything runs, and every backend raises the same `ValueError`, naming the
id, its `[row, column]` and the vocabulary size:

- `causal_lm(x)` and `causal_lm.score(...)` with concrete values (numpy, an
  eager JAX, TensorFlow or PyTorch tensor): checked in `__call__`. Ids on an
  accelerator are copied to the host for it (`[batch, T]` integers, one
  small transfer per call). Keras' own steps skip it (their data were
  checked already), and `generate`'s decode loop never calls `__call__`.
- `fit`, `evaluate`, `predict` and `*_on_batch` with arrays: the whole of
  `x["token_ids"]` (and integer labels `y`) before the data pipeline is
  built, with positions in the caller's arrays.
- `tf.data.Dataset` inputs: each batch on its way through the pipeline
  (`preprocess_samples`, host-side `tf.numpy_function`), positions within
  the batch; the pipeline's error is turned back into the same `ValueError`.
- `generate`: see `keras_gemma2.generation.inputs`.

Shapes and dtypes (rank 2, integer ids, a `padding_mask` of the same shape)
are static facts, checked the same way for symbolic and traced inputs too,
at trace time, before any backend op.

Symbolic or traced inputs (inside `jax.jit`, `tf.function`, `torch.compile`,
or a functional model built on `keras.Input`) have no values to check: their
ids pass unchecked, and an out-of-range id then does whatever the backend's
gather does. Inside Keras' own `fit`/`predict` steps this cannot happen, as
the data were checked on the host first.
"""

import contextlib
import contextvars
import re
import sys

import keras

from keras_gemma2.layers.validation import (
    check_token_shapes,
    check_token_values,
    host_values,
)

# True while a Keras train/test/predict step runs on data already checked by
# `fit`/`predict` (so the eager PyTorch step does not copy ids to the host).
_CHECKED_DATA = contextvars.ContextVar("keras_gemma2_checked_data", default=False)

# A `ValueError` of ours that a `tf.data` pipeline reported as an op error.
_OUR_MESSAGE = re.compile(r"(Received an invalid value for `(?:token_ids|y)`[^\n]*)")


class Gemma2InputChecks:
    """Mixin of `Gemma2CausalLM` checking token ids and masks before any compute."""

    # === Direct calls ===

    def __call__(self, *args, **kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        self._check_token_dict(inputs, values=not _CHECKED_DATA.get())
        with _checked_data():  # the backbone need not copy the ids again
            return super().__call__(*args, **kwargs)

    def call(self, inputs, training=None, mask=None, **kwargs):
        # `stateless_call` (the JAX trainer) reaches `call` without `__call__`.
        self._check_token_dict(inputs, values=False)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def _check_token_dict(self, inputs, values):
        check_token_dict(inputs, self.backbone.vocabulary_size, values)

    # === Keras' steps: data checked already ===

    def train_step(self, *args, **kwargs):
        with _checked_data():
            return super().train_step(*args, **kwargs)

    def test_step(self, *args, **kwargs):
        with _checked_data():
            return super().test_step(*args, **kwargs)

    def predict_step(self, *args, **kwargs):
        with _checked_data():
            return super().predict_step(*args, **kwargs)

    # === fit, evaluate, predict ===

    def fit(self, x=None, y=None, *args, **kwargs):
        self._check_data(x, y)
        validation_data = kwargs.get("validation_data")
        if isinstance(validation_data, (tuple, list)):
            vx, vy, _ = keras.utils.unpack_x_y_sample_weight(tuple(validation_data))
            self._check_data(vx, vy)
        with self._pipeline_errors(kwargs):
            return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        self._check_data(x, y)
        with self._pipeline_errors():
            return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        self._check_data(x, None)
        with self._pipeline_errors():
            return super().predict(x, *args, **kwargs)

    def train_on_batch(self, x, y=None, *args, **kwargs):
        self._check_data(x, y)
        return super().train_on_batch(x, y, *args, **kwargs)

    def test_on_batch(self, x, y=None, *args, **kwargs):
        self._check_data(x, y)
        return super().test_on_batch(x, y, *args, **kwargs)

    def predict_on_batch(self, x, *args, **kwargs):
        self._check_data(x, None)
        return super().predict_on_batch(x, *args, **kwargs)

    @contextlib.contextmanager
    def _pipeline_errors(self, fit_kwargs=None):
        """Re-raise our check's `ValueError` that a `tf.data` pipeline reported
        as an op error (`InvalidArgumentError`), so every backend raises the
        same, and leave the model usable.

        Keras' JAX trainer detaches the variables' values while it loops and
        reattaches them at the end, which an error mid-loop skips (before the
        first batch of `fit`, or anywhere in `evaluate`/`predict`). So the
        last finished batch's state is reattached, and the values from
        before the call (kept by reference, no copy) where no batch
        finished. In `fit` the references are dropped after the first batch,
        so they never hold the pre-training weights alive.
        """
        kept = []
        on_jax = keras.config.backend() == "jax"
        if on_jax:
            optimizer = getattr(self, "optimizer", None)
            variables = {
                id(variable): variable
                for variable in self.variables
                + self.metrics_variables
                + (list(optimizer.variables) if optimizer is not None else [])
            }
            kept = [(variable, variable.value) for variable in variables.values()]
            if fit_kwargs is not None:
                fit_kwargs["callbacks"] = list(fit_kwargs.get("callbacks") or [])
                fit_kwargs["callbacks"].append(_Forget(kept))
        try:
            yield
        except Exception as error:
            if on_jax:
                # The state of the last finished batch, if any (its step
                # donated the earlier arrays), then the kept values.
                self.jax_state_sync()
                self._jax_state = None
            for variable, value in kept:
                if getattr(variable, "_value", True) is None:
                    variable._value = value
            tf = sys.modules.get("tensorflow")
            if tf is None or not isinstance(error, tf.errors.OpError):
                raise
            match = _OUR_MESSAGE.search(error.message or "")
            if match is None:
                raise
            raise ValueError(match.group(1)) from None
        finally:
            kept.clear()

    def _check_data(self, x, y):
        """Check array data whole, before KerasHub batches it (`[row, column]`
        in the caller's arrays). Datasets are checked batch by batch."""
        if not isinstance(x, dict) or "token_ids" not in x:
            return
        token_ids = host_values(x["token_ids"])
        if token_ids is None:
            return
        padding_mask = x.get("padding_mask")
        check_token_shapes(token_ids, padding_mask)
        vocabulary_size = self.backbone.vocabulary_size
        check_token_values(token_ids, vocabulary_size)
        labels = host_values(y)
        if _are_label_ids(labels):
            check_token_values(labels, vocabulary_size, name="y")

    def preprocess_samples(self, x, y=None, sample_weight=None):
        """KerasHub's per-batch preprocessing, then the token checks."""
        data = super().preprocess_samples(x, y, sample_weight)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, dict) and "token_ids" in x:
            check_token_shapes(x["token_ids"], x.get("padding_mask"))
            x = {**x, "token_ids": self._checked_ids(x["token_ids"], y)}
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def _checked_ids(self, token_ids, labels):
        """`token_ids`, checked now (host values) or as the batch flows (tf.data)."""
        vocabulary_size = self.backbone.vocabulary_size

        def check(ids, label_ids=None):
            check_token_values(ids, vocabulary_size)
            if _are_label_ids(label_ids):
                check_token_values(label_ids, vocabulary_size, name="y")
            return ids

        values = host_values(token_ids)
        if values is not None:
            check(values, host_values(labels))
            return token_ids
        tf = sys.modules.get("tensorflow")
        if tf is None or not tf.is_tensor(token_ids):
            return token_ids
        # Inside `Dataset.map`: run the numpy check on the host, as each batch
        # passes; the ids flow through it so the check cannot be pruned.
        arguments = [token_ids]
        if labels is not None and tf.is_tensor(labels) and labels.dtype.is_integer:
            arguments.append(labels)
        checked = tf.numpy_function(check, arguments, token_ids.dtype)
        return tf.ensure_shape(checked, token_ids.shape)


def check_token_dict(inputs, vocabulary_size, values=None):
    """Check a `{"token_ids", "padding_mask"}` input of a direct call.

    Shapes and dtypes always; the ids themselves when `values` (default: not
    inside a step whose data `fit`/`predict` checked already) and they are
    on the host (symbolic and traced inputs are checked at shape level only).
    Anything but such a dict is left to Keras.
    """
    if not isinstance(inputs, dict) or "token_ids" not in inputs:
        return
    token_ids = inputs["token_ids"]
    check_token_shapes(token_ids, inputs.get("padding_mask"))
    if values is None:
        values = not _CHECKED_DATA.get()
    if values:
        ids = host_values(token_ids)
        if ids is not None:
            check_token_values(ids, vocabulary_size)


def _are_label_ids(labels):
    """Integer `[batch, T]` labels: next-token ids to check (not other targets)."""
    return labels is not None and labels.ndim == 2 and labels.dtype.kind in "iu"


@contextlib.contextmanager
def _checked_data():
    token = _CHECKED_DATA.set(True)
    try:
        yield
    finally:
        _CHECKED_DATA.reset(token)


class _Forget(keras.callbacks.Callback):
    """Drops `_pipeline_errors`' references after the first training batch."""

    def __init__(self, kept):
        super().__init__()
        self.kept = kept

    def on_train_batch_end(self, batch, logs=None):
        self.kept.clear()
