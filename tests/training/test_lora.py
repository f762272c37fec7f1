"""LoRA on Gemma2Backbone: targets, parameter counts, merge, `.lora.h5` files.

References: literal parameter-count formulas (`rank * (in + out)` per
projection and block), a float64 numpy product for the adapter's update, and
the model's own logits before a transformation that must not change them
(merge, save/load).
"""

import os

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.training import lora
from tests.conftest import TINY_BACKBONE_CONFIG, random_token_ids, randomize_weights

# float32 logits of the same computation arranged differently (merged kernel
# vs kernel + update at call time) agree to rounding.
MERGE_TOLERANCE = 1e-5

HIDDEN = TINY_BACKBONE_CONFIG["hidden_dim"]  # 32
HEADS = TINY_BACKBONE_CONFIG["num_query_heads"]  # 4
KV_HEADS = TINY_BACKBONE_CONFIG["num_key_value_heads"]  # 2
HEAD_DIM = TINY_BACKBONE_CONFIG["head_dim"]  # 16
INTERMEDIATE = TINY_BACKBONE_CONFIG["intermediate_dim"]  # 48
LAYERS = TINY_BACKBONE_CONFIG["num_layers"]  # 4

# (in, out) of each projection, written from the architecture.
MATRIX = {
    "query": (HIDDEN, HEADS * HEAD_DIM),
    "key": (HIDDEN, KV_HEADS * HEAD_DIM),
    "value": (HIDDEN, KV_HEADS * HEAD_DIM),
    "attention_output": (HEADS * HEAD_DIM, HIDDEN),
    "gate": (HIDDEN, INTERMEDIATE),
    "up": (HIDDEN, INTERMEDIATE),
    "down": (INTERMEDIATE, HIDDEN),
}


def make_causal_lm(seed=0):
    causal_lm = Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    randomize_weights(causal_lm, seed)
    return causal_lm


def logits(model, token_ids):
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return keras.ops.convert_to_numpy(model(inputs))


def randomize_adapters(backbone, seed=1):
    rng = np.random.RandomState(seed)
    for _, _, layer in lora.adapted_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            shape = tuple(variable.shape)
            variable.assign(rng.normal(0, 0.3, shape).astype("float32"))


def snapshot(backbone):
    return (
        [keras.ops.convert_to_numpy(v).copy() for v in backbone.weights],
        [v.trainable for v in backbone.weights],
        [type(layer).__name__ for _, _, layer, _ in _all_projections(backbone)],
    )


def _all_projections(backbone):
    return lora.adapter_plan(backbone, tuple(MATRIX))


def assert_unchanged(backbone, before):
    weights, trainable, classes = snapshot(backbone)
    assert lora.lora_state(backbone) is None
    assert len(weights) == len(before[0])
    for old, new in zip(before[0], weights, strict=True):
        np.testing.assert_array_equal(old, new)
    assert trainable == before[1]
    assert classes == before[2] == ["EinsumDense"] * len(classes)


@pytest.fixture(scope="module")
def backbone_factory():
    def make():
        return randomize_weights(Gemma2Backbone(**TINY_BACKBONE_CONFIG))

    return make


@pytest.mark.parametrize(
    "targets, kwargs, expected",
    [
        (None, {}, ["query", "value"]),
        ("all", {}, list(MATRIX)),
        # our names, KerasHub Gemma's, PEFT's and the weight table's, mixed
        (["q_proj", "ffw_gating", "ffw_linear", "output"], {}, None),
        (None, {"target_layer_names": ["k_proj", "up"]}, ["key", "up"]),
    ],
)
def test_trainable_parameters_follow_the_formula(
    backbone_factory, targets, kwargs, expected
):
    if expected is None:
        expected = ["query", "attention_output", "gate", "down"]
    backbone = backbone_factory()
    rank = 3
    backbone.enable_lora(rank, targets, **kwargs)
    counted = sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
    formula = LAYERS * sum(rank * sum(MATRIX[name]) for name in expected)
    assert counted == formula
    assert lora.lora_state(backbone).targets == tuple(expected)
    # Only adapters train; base kernels, norms and the embedding are frozen.
    assert {v.name for v in backbone.trainable_weights} == {
        "lora_kernel_a",
        "lora_kernel_b",
    }


def test_adapter_adds_the_scaled_low_rank_update(backbone_factory):
    backbone = backbone_factory()
    backbone.enable_lora(2, ["down"], alpha=5.0)
    randomize_adapters(backbone)
    layer = backbone.transformer_layers[1].ffw.down_dense
    x = np.random.RandomState(3).normal(size=(2, 3, INTERMEDIATE)).astype("float32")
    kernel = keras.ops.convert_to_numpy(
        next(v for v in layer.weights if v.name == "kernel")
    ).astype("float64")
    a = keras.ops.convert_to_numpy(layer.lora_kernel_a).astype("float64")
    b = keras.ops.convert_to_numpy(layer.lora_kernel_b).astype("float64")
    expected = x.astype("float64") @ (kernel + (5.0 / 2) * a @ b)
    actual = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": -2}, "rank=-2"),
        ({"rank": 2.5}, "rank=2.5"),
        ({"rank": True}, "rank=True"),
        ({"rank": 2, "target_names": ["ffw_linear", "mlp"]}, "'mlp'"),
        ({"rank": 2, "target_names": "embeddings"}, "embeddings"),
        ({"rank": 2, "target_names": []}, "target_names=\\[\\]"),
        ({"rank": 2, "alpha": 0}, "alpha=0"),
        (
            {"rank": 2, "target_names": ["query"], "target_layer_names": ["key"]},
            "not both",
        ),
    ],
)
def test_bad_arguments_change_nothing(backbone_factory, kwargs, match):
    backbone = backbone_factory()
    before = snapshot(backbone)
    with pytest.raises(ValueError, match=match):
        backbone.enable_lora(**kwargs)
    assert_unchanged(backbone, before)


def test_enable_twice_and_merge_without_lora_raise(backbone_factory):
    backbone = backbone_factory()
    with pytest.raises(ValueError, match="enable_lora"):
        backbone.merge_lora()
    with pytest.raises(ValueError, match="enable_lora"):
        backbone.save_lora_weights("x.lora.h5")
    backbone.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        backbone.enable_lora(4, "all")
    assert lora.lora_state(backbone).rank == 2


def test_merge_keeps_logits_and_saves_as_a_plain_model(tmp_path):
    causal_lm = make_causal_lm()
    backbone = causal_lm.backbone
    token_ids = random_token_ids(2, 12, TINY_BACKBONE_CONFIG["vocabulary_size"])
    base = logits(causal_lm, token_ids)
    backbone.token_embedding.trainable = False  # a user's choice, kept by merge
    flags = [v.trainable for v in backbone.weights]
    backbone.enable_lora(3, "all", alpha=6)
    randomize_adapters(backbone)
    adapted = logits(causal_lm, token_ids)
    assert np.abs(adapted - base).max() > 0.1  # the adapters matter

    backbone.merge_lora()
    merged = logits(causal_lm, token_ids)
    assert np.abs(merged - adapted).max() <= MERGE_TOLERANCE
    assert not any("lora" in v.path for v in causal_lm.weights)
    assert [v.trainable for v in backbone.weights] == flags
    assert lora.lora_state(backbone) is None

    causal_lm.save(tmp_path / "merged.keras")
    loaded = keras.models.load_model(tmp_path / "merged.keras")
    assert np.abs(logits(loaded, token_ids) - merged).max() <= MERGE_TOLERANCE
    backbone.save_to_preset(tmp_path / "preset")
    reloaded = Gemma2Backbone.from_preset(str(tmp_path / "preset"))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded.token_embedding.embeddings),
        keras.ops.convert_to_numpy(backbone.token_embedding.embeddings),
    )
    for (_, _, ours, _), (_, _, theirs, _) in zip(
        _all_projections(backbone), _all_projections(reloaded), strict=True
    ):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(theirs.kernel),
            keras.ops.convert_to_numpy(ours.kernel),
            atol=1e-6,
        )
    # Enabling again after a merge works (the layers are plain again).
    backbone.enable_lora(2)
    assert lora.lora_state(backbone).rank == 2


def test_keras_save_with_adapters_writes_merged_kernels(tmp_path):
    causal_lm = make_causal_lm()
    causal_lm.backbone.enable_lora(2, ["value", "gate"])
    randomize_adapters(causal_lm.backbone)
    token_ids = random_token_ids(2, 12, TINY_BACKBONE_CONFIG["vocabulary_size"])
    expected = logits(causal_lm, token_ids)
    causal_lm.save(tmp_path / "adapted.keras")
    loaded = keras.models.load_model(tmp_path / "adapted.keras")
    assert lora.lora_state(loaded.backbone) is None
    assert np.abs(logits(loaded, token_ids) - expected).max() <= MERGE_TOLERANCE


def test_lora_h5_round_trip_restores_targets_rank_and_alpha(tmp_path):
    source = make_causal_lm()
    source.backbone.enable_lora(3, ["key", "ffw_gating_2", "o_proj"], alpha=1.5)
    randomize_adapters(source.backbone)
    path = str(tmp_path / "adapter.lora.h5")
    source.backbone.save_lora_weights(path)
    token_ids = random_token_ids(2, 12, TINY_BACKBONE_CONFIG["vocabulary_size"])

    target = make_causal_lm()  # same base weights, no LoRA yet
    target.backbone.load_lora_weights(path)
    state = lora.lora_state(target.backbone)
    assert (state.targets, state.rank, state.alpha) == (
        ("key", "attention_output", "up"),
        3,
        1.5,
    )
    np.testing.assert_allclose(
        logits(target, token_ids), logits(source, token_ids), atol=MERGE_TOLERANCE
    )
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_bad_lora_h5_loads_change_nothing(tmp_path):
    source = make_causal_lm()
    source.backbone.enable_lora(2)
    path = str(tmp_path / "adapter.lora.h5")
    source.backbone.save_lora_weights(path)
    with pytest.raises(ValueError, match="must end in `.lora.h5`"):
        source.backbone.save_lora_weights(str(tmp_path / "adapter.h5"))

    other = Gemma2Backbone(**{**TINY_BACKBONE_CONFIG, "hidden_dim": 24})
    before = snapshot(other)
    with pytest.raises(ValueError, match="another model or another rank"):
        other.load_lora_weights(path)
    assert_unchanged(other, before)

    with pytest.raises(FileNotFoundError, match="missing.lora.h5"):
        other.load_lora_weights(str(tmp_path / "missing.lora.h5"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        other.load_lora_weights(str(tmp_path))
    (tmp_path / "adapter.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="filepath="):
        other.load_lora_weights(str(tmp_path / "adapter.bin"))
    assert_unchanged(other, before)

    enabled = make_causal_lm().backbone
    enabled.enable_lora(4)
    randomize_adapters(enabled)
    kept = snapshot(enabled)[0]
    with pytest.raises(ValueError, match="rank 2 .* rank 4"):
        enabled.load_lora_weights(path)
    for old, new in zip(kept, snapshot(enabled)[0], strict=True):
        np.testing.assert_array_equal(old, new)
    assert lora.lora_state(enabled).rank == 4


def test_int8_projection_adds_the_adapter_and_refuses_to_merge(backbone_factory):
    backbone = backbone_factory()
    layer = backbone.transformer_layers[0].attention.query_dense
    layer.quantize("int8")
    x = np.random.RandomState(4).normal(size=(1, 3, HIDDEN)).astype("float32")
    quantized = keras.ops.convert_to_numpy(layer(x)).astype("float64")
    backbone.enable_lora(2, ["query"], alpha=4)
    randomize_adapters(backbone)
    a = keras.ops.convert_to_numpy(layer.lora_kernel_a).astype("float64")
    b = keras.ops.convert_to_numpy(layer.lora_kernel_b).astype("float64")
    update = (x.astype("float64") @ (2.0 * a @ b)).reshape(1, 3, HEADS, HEAD_DIM)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), quantized + update, atol=1e-4
    )
    with pytest.raises(ValueError, match="int8"):
        backbone.merge_lora()
    assert lora.lora_state(backbone).rank == 2  # nothing changed
    assert type(layer).__name__ == "LoraEinsumDense"


def test_fit_trains_only_the_adapters():
    causal_lm = make_causal_lm()
    backbone = causal_lm.backbone
    backbone.enable_lora(2, ["query", "down"])
    frozen = [
        (v, keras.ops.convert_to_numpy(v).copy())
        for v in causal_lm.weights
        if "lora" not in v.path
    ]
    causal_lm.compile(optimizer=keras.optimizers.Adam(0.02), sampler="greedy")
    token_ids = random_token_ids(4, 10, TINY_BACKBONE_CONFIG["vocabulary_size"])
    x = {"token_ids": token_ids[:, :-1], "padding_mask": np.ones_like(token_ids[:, 1:])}
    losses = [float(causal_lm.train_on_batch(x, token_ids[:, 1:])[0]) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
    for variable, value in frozen:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
    b_norms = [
        float(np.abs(keras.ops.convert_to_numpy(layer.lora_kernel_b)).max())
        for _, _, layer in lora.adapted_layers(backbone)
    ]
    assert min(b_norms) > 0  # every adapter moved off its zero start
