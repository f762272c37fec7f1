"""`keras.distribution.DataParallel` `fit` on 8 virtual CPU devices, against one.

`tests/conftest.py` gives the JAX test process 8 CPU devices. The same
`Gemma2CausalLM` (the tiny config, every Gemma 2 feature on, random weights
big enough for the caps to bite) trains three SGD-with-momentum steps on
one global batch of 16 rows, with padding and response-only sample weights:
once with no distribution (one device) and once under `DataParallel` over
all 8 devices. The loss of every step and the final weights must agree to
float32 rounding. Two further tests show the run really spanned 8 devices:
every variable (model and optimizer) lives replicated on all 8, and each
batch reached the step split 2 rows per device.
"""

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from tests.conftest import (
    TINY_BACKBONE_CONFIG,
    VIRTUAL_DEVICES,
    random_token_ids,
    randomize_weights,
)

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="Keras 3.15 implements keras.distribution for JAX only "
    "(keras.src.backend sets distribution_lib = None on torch; tensorflow's "
    "is an unused prototype), so there is no data-parallel fit to compare",
)

ROWS, LENGTH, STEPS = 16, 12, 3
VOCABULARY = TINY_BACKBONE_CONFIG["vocabulary_size"]


class RecordingDataParallel(keras.distribution.DataParallel):
    """`DataParallel` that records the layout it gives each input tensor."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.data_layouts = []

    def get_data_layout(self, data_shape):
        layout = super().get_data_layout(data_shape)
        self.data_layouts.append((tuple(data_shape), layout))
        return layout


def _batch():
    """16 rows of 12 tokens: two padded rows, prompt tokens weighted 0."""
    token_ids = random_token_ids(ROWS, LENGTH, VOCABULARY, seed=4)
    padding_mask = np.ones((ROWS, LENGTH), "int32")
    padding_mask[3, 7:] = 0
    padding_mask[12, 4:] = 0
    labels = random_token_ids(ROWS, LENGTH, VOCABULARY, seed=5)
    sample_weight = padding_mask.astype("float32")
    sample_weight[::2, :3] = 0.0
    return {"token_ids": token_ids, "padding_mask": padding_mask}, labels, sample_weight


def _train(causal_lm):
    """Three SGD steps, one per epoch; returns the losses and final weights."""
    causal_lm.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    inputs, labels, sample_weight = _batch()
    history = causal_lm.fit(
        inputs,
        labels,
        sample_weight=sample_weight,
        batch_size=ROWS,
        epochs=STEPS,
        shuffle=False,
        verbose=0,
    )
    return np.asarray(history.history["loss"]), [
        keras.ops.convert_to_numpy(v) for v in causal_lm.weights
    ]


@pytest.fixture(autouse=True)
def no_distribution_left_behind():
    """Every test starts and ends with no global distribution."""
    earlier = keras.distribution.distribution()
    assert earlier is None, f"An earlier test left a distribution set: {earlier}"
    yield
    leaked = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    assert leaked is None, f"A test left a distribution set: {leaked}"


@pytest.fixture(scope="module")
def runs():
    """The same model trained on one device and under `DataParallel` on 8."""
    devices = keras.distribution.list_devices()
    assert len(devices) == VIRTUAL_DEVICES, devices
    keras.utils.set_random_seed(0)
    single = Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    randomize_weights(single, seed=1)
    initial_weights = single.get_weights()
    single_losses, single_weights = _train(single)

    distribution = RecordingDataParallel(devices=devices)
    try:
        with distribution.scope():
            parallel = Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
            parallel.set_weights(initial_weights)
            parallel_losses, parallel_weights = _train(parallel)
    finally:
        keras.distribution.set_distribution(None)
    return {
        "single": (single_losses, single_weights),
        "parallel": (parallel_losses, parallel_weights),
        "model": parallel,
        "distribution": distribution,
        "initial_weights": initial_weights,
    }


def test_losses_of_every_step_equal_one_device(runs):
    single_losses, _ = runs["single"]
    parallel_losses, _ = runs["parallel"]
    assert len(single_losses) == STEPS
    # Training moved the loss, so equal losses are not equal constants.
    assert abs(single_losses[-1] - single_losses[0]) > 0.05, single_losses
    np.testing.assert_allclose(parallel_losses, single_losses, rtol=1e-5, atol=0)


def test_final_weights_equal_one_device(runs):
    _, single_weights = runs["single"]
    _, parallel_weights = runs["parallel"]
    moved = [
        np.abs(after - before).max()
        for after, before in zip(single_weights, runs["initial_weights"], strict=True)
    ]
    assert min(moved) > 1e-4, "some weight did not train"
    for path, single, parallel in zip(
        (v.path for v in runs["model"].weights),
        single_weights,
        parallel_weights,
        strict=True,
    ):
        np.testing.assert_allclose(parallel, single, rtol=0, atol=1e-5, err_msg=path)


def test_every_variable_is_replicated_on_all_eight_devices(runs):
    model = runs["model"]
    variables = model.weights + model.optimizer.variables
    assert len(model.optimizer.variables) > len(model.weights)  # momentum too
    for variable in variables:
        sharding = variable.value.sharding
        assert len(sharding.device_set) == VIRTUAL_DEVICES, variable.path
        assert sharding.is_fully_replicated, variable.path


def test_each_batch_is_split_across_the_eight_devices(runs):
    layouts = runs["distribution"].data_layouts
    # token_ids, padding_mask, labels and sample weights of the global batch.
    shapes = sorted({shape for shape, _ in layouts})
    assert shapes == [(ROWS, LENGTH)], shapes
    for shape, layout in layouts:
        assert layout.axes == ("batch", None)
        sharding = layout.backend_layout
        assert len(sharding.device_set) == VIRTUAL_DEVICES
        assert sharding.shard_shape(shape) == (ROWS // VIRTUAL_DEVICES, LENGTH)
