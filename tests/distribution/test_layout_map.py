"""`Gemma2Backbone.get_layout_map` on 8 virtual CPU devices, against one device.

Every mesh shape of 8 devices, (batch, model) = (1, 8), (2, 4), (4, 2) and
(8, 1), with key/value heads 1, 2, 4, 8 and query heads the model axis does
not divide (6): the sharded model's logits, one SGD `fit` step (loss and
updated weights) and greedy `generate` equal the unsharded model's; each
weight's shard shape is the one the rule in the docstring gives, written
out by hand here; and the bytes on one device show the sharding is real.
"""

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM

jax_only = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="Keras 3.15 implements keras.distribution for JAX only; "
    "test_get_layout_map_is_jax_only checks the error on the others",
)

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
# (query heads, key/value heads): every kv count of 1-8, and 6 query heads,
# which model axes of 4 and 8 do not divide.
HEADS = [(8, 1), (8, 2), (8, 4), (8, 8), (6, 3)]
BATCH, LENGTH = 8, 12


def _config(num_query_heads, num_key_value_heads):
    return {
        "vocabulary_size": 96,
        "num_layers": 2,
        "num_query_heads": num_query_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_dim": 32,
        "intermediate_dim": 64,
        "head_dim": 8,
        "sliding_window_size": 4,
    }


def _mesh(shape):
    return keras.distribution.DeviceMesh(
        shape, ["batch", "model"], keras.distribution.list_devices()
    )


def _model_parallel(shape):
    layout_map = Gemma2Backbone.get_layout_map(_mesh(shape))
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def _data():
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 96, (BATCH, LENGTH)).astype("int32"),
        "padding_mask": np.ones((BATCH, LENGTH), "int32"),
    }
    y = rng.integers(0, 96, (BATCH, LENGTH)).astype("int32")
    prompt = {
        "token_ids": np.pad(x["token_ids"][:, :5], ((0, 0), (0, LENGTH - 5))),
        "padding_mask": np.pad(np.ones((BATCH, 5), "int32"), ((0, 0), (0, LENGTH - 5))),
    }
    return x, y, prompt


_REFERENCES = {}


def _reference(config, steps):
    """Unsharded initial weights and results (logits; with `steps`, also
    greedy generation, one fit step's loss and the updated weights)."""
    key = (tuple(sorted(config.items())), steps)
    if key not in _REFERENCES:
        keras.utils.set_random_seed(0)
        causal_lm = Gemma2CausalLM(Gemma2Backbone(**config))
        weights = causal_lm.get_weights()
        _REFERENCES[key] = weights, _run(causal_lm, steps)
    return _REFERENCES[key]


def _run(causal_lm, steps):
    x, y, prompt = _data()
    results = {"logits": np.asarray(keras.Model.predict_on_batch(causal_lm, x))}
    if steps:
        causal_lm.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            sampler="greedy",
        )
        # 7 rows: padded to a multiple of the batch axis, then trimmed.
        prompt = {key: value[:7] for key, value in prompt.items()}
        generated = causal_lm.generate(prompt, max_length=LENGTH, stop_token_ids=None)
        assert generated["token_ids"].shape == (7, LENGTH)
        results["generated"] = np.asarray(generated["token_ids"])
        history = causal_lm.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        results["loss"] = history.history["loss"][0]
        results["weights"] = [np.asarray(w) for w in causal_lm.get_weights()]
    return results


def _sharded(config, mesh_shape, weights, steps):
    with _model_parallel(mesh_shape).scope():
        causal_lm = Gemma2CausalLM(Gemma2Backbone(**config))
        causal_lm.set_weights(weights)
        return causal_lm, _run(causal_lm, steps)


def _expected_shard_shapes(config, mesh_shape):
    """The rule of `get_layout_map`, written out per weight for this test."""
    batch, model = mesh_shape
    hidden, vocabulary = config["hidden_dim"], config["vocabulary_size"]
    heads, kv_heads = config["num_query_heads"], config["num_key_value_heads"]

    def split(size, parts):  # a dimension is split only when divisible
        return size // parts if size % parts == 0 else size

    h, heads_part = split(hidden, batch), split(heads, model)
    return {
        "token_embedding/embeddings": (split(vocabulary, model), h),
        "decoder_block_0/attention/query/kernel": (h, heads_part, 8),
        "decoder_block_0/attention/key/kernel": (h, split(kv_heads, model), 8),
        "decoder_block_1/attention/value/kernel": (h, split(kv_heads, model), 8),
        "decoder_block_1/attention/attention_output/kernel": (heads_part, 8, h),
        "decoder_block_0/ffw/gate/kernel": (h, split(64, model)),
        "decoder_block_1/ffw/up/kernel": (h, split(64, model)),
        "decoder_block_1/ffw/down/kernel": (split(64, model), h),
        "decoder_block_1/post_ffw_norm/scale": (hidden,),
        "final_norm/scale": (hidden,),
    }


def _bytes_per_device(variables):
    totals = {}
    for variable in variables:
        for shard in variable.value.addressable_shards:
            totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
    return totals


@jax_only
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"mesh{s[0]}x{s[1]}")
def test_every_head_layout_shards_and_matches_one_device(mesh_shape):
    for heads in HEADS:
        config = _config(*heads)
        # Logits on every head layout; generate and fit on one per mesh.
        steps = heads == HEADS[MESHES.index(mesh_shape) + 1]
        weights, expected = _reference(config, steps)
        causal_lm, results = _sharded(config, mesh_shape, weights, steps)
        np.testing.assert_allclose(
            results["logits"], expected["logits"], atol=2e-5, err_msg=str(heads)
        )
        if steps:
            np.testing.assert_array_equal(results["generated"], expected["generated"])
            assert abs(results["loss"] - expected["loss"]) <= 1e-5
            for ours, theirs in zip(
                results["weights"], expected["weights"], strict=True
            ):
                np.testing.assert_allclose(ours, theirs, atol=1e-5)

        variables = {v.path: v for v in causal_lm.backbone.weights}
        for path, shard_shape in _expected_shard_shapes(config, mesh_shape).items():
            variable = variables[path]
            assert variable.value.sharding.shard_shape(variable.shape) == shard_shape, (
                path,
                heads,
            )
            assert len(variable.value.sharding.device_set) == 8
        per_device = _bytes_per_device(causal_lm.backbone.weights)
        total = sum(int(np.prod(v.shape)) * 4 for v in causal_lm.backbone.weights)
        line = f"MEASURED mesh {mesh_shape} heads {heads}: max|d logits| " + (
            f"{np.abs(results['logits'] - expected['logits']).max():.2e}"
        )
        if steps:
            pairs = zip(results["weights"], expected["weights"], strict=True)
            line += (
                f", |d loss| {abs(results['loss'] - expected['loss']):.1e}, "
                f"max|d weights| {max(np.abs(a - b).max() for a, b in pairs):.1e}"
            )
        print(f"{line}, bytes/device {max(per_device.values())} of {total}")
        assert sorted(per_device) == list(range(8))
        # The biggest weights are split on every mesh: at most half the model
        # per device even where the heads stay whole.
        assert max(per_device.values()) <= total / 2, (per_device, total)
        if heads == (8, 8) and mesh_shape != (8, 1):
            # Everything but the norm scales split 8 ways.
            norms = sum(
                int(np.prod(v.shape)) * 4
                for v in causal_lm.backbone.weights
                if v.path.endswith("scale")
            )
            assert max(per_device.values()) == (total - norms) / 8 + norms


@jax_only
def test_from_preset_under_model_parallel_loads_sharded_weights():
    reference = Gemma2CausalLM.from_preset("gemma2_tiny_python")
    x = {
        "token_ids": np.arange(2 * 16).reshape(2, 16).astype("int32") + 2,
        "padding_mask": np.ones((2, 16), "int32"),
    }
    expected = np.asarray(keras.Model.predict_on_batch(reference, x))
    with _model_parallel((2, 4)).scope():
        causal_lm = Gemma2CausalLM.from_preset("gemma2_tiny_python")
        logits = np.asarray(keras.Model.predict_on_batch(causal_lm, x))
        causal_lm.compile(sampler="greedy")
        # One prompt on a batch axis of 2: padded to two rows, then trimmed.
        text = causal_lm.generate("def fibonacci(n):", max_length=24)
    np.testing.assert_allclose(logits, expected, atol=2e-5)
    reference.compile(sampler="greedy")
    assert text == reference.generate("def fibonacci(n):", max_length=24)
    query = causal_lm.backbone.get_layer("decoder_block_0").attention.query_dense
    config = causal_lm.backbone.get_config()
    hidden, heads = config["hidden_dim"], config["num_query_heads"]
    assert query.kernel.value.sharding.shard_shape(query.kernel.shape) == (
        hidden // 2,
        heads // 4 if heads % 4 == 0 else heads,
        config["head_dim"],
    )


@jax_only
def test_keras_hub_preset_under_model_parallel_loads_sharded_weights(tmp_path):
    """A KerasHub/Kaggle preset, loaded under `ModelParallel`: its weights
    sharded as the layout map says, its logits those of the one-device
    load. (The loader's throwaway KerasHub probe had initialised the
    backbone's variables, unsharded, before the load filled them.)"""
    from tests.checkpoints.test_keras_hub_preset import (
        GEMMA2_SETTINGS,
        keras_hub_causal_lm,
        make_inputs,
    )

    preset = str(tmp_path / "preset")
    keras_hub_causal_lm(seed=3, **GEMMA2_SETTINGS).save_to_preset(preset)
    x = make_inputs()
    expected = np.asarray(Gemma2CausalLM.from_preset(preset)(x))
    with _model_parallel((2, 4)).scope():
        causal_lm = Gemma2CausalLM.from_preset(preset)
        got = np.asarray(causal_lm(x))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    query = causal_lm.backbone.get_layer("decoder_block_0").attention.query_dense
    hidden, heads = GEMMA2_SETTINGS["hidden_dim"], GEMMA2_SETTINGS["num_query_heads"]
    assert query.kernel.value.sharding.shard_shape(query.kernel.shape) == (
        hidden // 2,
        heads // 4,
        GEMMA2_SETTINGS["head_dim"],
    )


@jax_only
def test_bad_meshes_and_foreign_layout_maps_are_refused():
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ["data", "tensor"], keras.distribution.list_devices()
    )
    with pytest.raises(ValueError, match=r"no axis 'model'.*\['data', 'tensor'\]"):
        Gemma2Backbone.get_layout_map(mesh)
    layout_map = Gemma2Backbone.get_layout_map(mesh, "tensor", "data")
    assert isinstance(layout_map, keras.distribution.LayoutMap)
    with pytest.raises(TypeError, match="device_mesh"):
        Gemma2Backbone.get_layout_map((2, 4))

    # KerasHub's Gemma rule (heads over the model axis, always): 2 key/value
    # heads on a model axis of 8 cannot be split, and the error names the weight.
    mesh = _mesh((1, 8))
    fixed = keras.distribution.LayoutMap(mesh)
    fixed[".*attention/(query|key|value)/kernel"] = ("batch", "model", None)
    with keras.distribution.ModelParallel(layout_map=fixed).scope():
        with pytest.raises(ValueError, match=r"'decoder_block_0/attention/key/kernel'"):
            Gemma2Backbone(**_config(8, 2))
    # A layout map written for another model's weights.
    other = keras.distribution.LayoutMap(mesh)
    other["dense_.*/kernel"] = ("batch", "model")
    with keras.distribution.ModelParallel(layout_map=other).scope():
        with pytest.raises(ValueError, match="for another model"):
            Gemma2Backbone(**_config(8, 2))


def test_get_layout_map_is_jax_only():
    if keras.config.backend() == "jax":
        layout_map = Gemma2Backbone.get_layout_map(_mesh((2, 4)))
        assert isinstance(layout_map, keras.distribution.LayoutMap)
        return
    # No mesh can be built without the JAX backend's devices: the backend
    # check comes first, whatever the argument.
    with pytest.raises(
        NotImplementedError, match=r"JAX backend only.*'(tensorflow|torch)'"
    ):
        Gemma2Backbone.get_layout_map(None)
