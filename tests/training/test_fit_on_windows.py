"""fit_on_windows: the batches each `fit` gets; the curve against float64 numpy."""

import keras
import numpy as np
import pytest

from keras_gemma2.data import window_inputs_and_labels
from keras_gemma2.training import fit_on_windows

VOCABULARY_SIZE = 11


class RecordingModel:
    """Records the batches and arguments of each `fit`; reports made-up losses."""

    def __init__(self):
        self.preprocessor = "a preprocessor"
        self.calls = []

    def fit(self, batches, **kwargs):
        # Token ids go past the preprocessor (`keras.Model.fit`), which stays.
        assert self.preprocessor == "a preprocessor"
        rows = [
            (x["token_ids"].tolist(), y.tolist())
            for x, y in batches.as_numpy_iterator()
        ]
        self.calls.append((rows, kwargs))
        history = keras.callbacks.History()
        history.history = {"loss": [len(self.calls)], "val_loss": [-len(self.calls)]}
        return history


@pytest.fixture(autouse=True)
def recording_fit(monkeypatch):
    """`keras.Model.fit(model, ...)` on a `RecordingModel` records the call."""
    original = keras.Model.fit

    def fit(model, *args, **kwargs):
        if isinstance(model, RecordingModel):
            return model.fit(*args, **kwargs)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)


def test_consecutive_batches_one_fit_per_point():
    windows = np.arange(30).reshape(10, 3)  # 5 steps of 2 windows
    validation = np.array([[7, 8, 9]])
    model = RecordingModel()
    curve = fit_on_windows(model, windows, 2, 2, validation, verbose=0)
    assert curve == [
        {"step": 2, "loss": 1, "held_out_loss": -1},
        {"step": 4, "loss": 2, "held_out_loss": -2},
        {"step": 5, "loss": 3, "held_out_loss": -3},
    ]
    # Steps 1-2, 3-4, then 5: each batch is 2 windows, inputs and next tokens.
    assert [rows for rows, _ in model.calls] == [
        [([[0, 1], [3, 4]], [[1, 2], [4, 5]]), ([[6, 7], [9, 10]], [[7, 8], [10, 11]])],
        [
            ([[12, 13], [15, 16]], [[13, 14], [16, 17]]),
            ([[18, 19], [21, 22]], [[19, 20], [22, 23]]),
        ],
        [([[24, 25], [27, 28]], [[25, 26], [28, 29]])],
    ]
    for _, kwargs in model.calls:
        x, y = kwargs["validation_data"]
        assert x["token_ids"].tolist() == [[7, 8]] and y.tolist() == [[8, 9]]
        assert kwargs["validation_batch_size"] == 2 and kwargs["verbose"] == 0
    assert model.preprocessor == "a preprocessor"


def test_without_validation_and_with_log_every_past_the_end():
    model = RecordingModel()
    curve = fit_on_windows(model, np.zeros([6, 4], "int32"), 3, 10)
    assert curve == [{"step": 2, "loss": 1}]
    assert model.calls[0][1]["validation_data"] is None


@pytest.mark.parametrize("count", [0, 5])
def test_windows_must_fill_whole_batches(count):
    with pytest.raises(ValueError, match=f"Received {count} `windows`"):
        fit_on_windows(RecordingModel(), np.zeros([count, 4], "int32"), 2, 1)


@pytest.mark.parametrize("name", ["batch_size", "log_every"])
def test_bad_counts(name):
    arguments = {"batch_size": 2, "log_every": 1, name: 0}
    with pytest.raises(ValueError, match=f"{name}=0"):
        fit_on_windows(RecordingModel(), np.zeros([2, 4], "int32"), **arguments)


def tiny_model():
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    hidden = keras.layers.Embedding(VOCABULARY_SIZE, 8)(token_ids)
    logits = keras.layers.Dense(VOCABULARY_SIZE)(hidden)
    model = keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, logits)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def float64_loss(model, windows):
    """Mean next-token cross-entropy of `model` on windows, in float64 numpy."""
    x, labels = window_inputs_and_labels(windows)
    logits = np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(x)), "f8")
    log_normalizer = np.logaddexp.reduce(logits, axis=-1)  # [B, T]
    label_logits = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    return float(np.mean(log_normalizer - label_logits))


def test_curve_against_step_by_step_float64_reference():
    rng = np.random.default_rng(0)
    windows = rng.integers(0, VOCABULARY_SIZE, (10, 6)).astype("int32")  # 5 steps
    validation = rng.integers(0, VOCABULARY_SIZE, (4, 6)).astype("int32")
    keras.utils.set_random_seed(0)
    model, twin = tiny_model(), tiny_model()
    twin.set_weights(model.get_weights())
    curve = fit_on_windows(model, windows, 2, 2, validation, verbose=0)

    # The twin takes the same steps one `train_on_batch` at a time; the loss
    # of a step is the float64 cross-entropy of the batch before the update.
    expected, step_losses = [], []
    for step in range(5):
        batch = windows[2 * step : 2 * step + 2]
        step_losses.append(float64_loss(twin, batch))
        twin.train_on_batch(*window_inputs_and_labels(batch))
        if step + 1 in (2, 4, 5):
            held_out = float64_loss(twin, validation)
            expected.append((step + 1, np.mean(step_losses), held_out))
            step_losses = []
    assert [point["step"] for point in curve] == [2, 4, 5]
    for point, (_, loss, held_out) in zip(curve, expected, strict=True):
        assert point["loss"] == pytest.approx(loss, rel=1e-5)
        assert point["held_out_loss"] == pytest.approx(held_out, rel=1e-5)
    for ours, theirs in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
