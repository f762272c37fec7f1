"""The weight table against a built model, HF's Gemma2 and KerasHub's Gemma.

References: our built `Gemma2Backbone` (every variable mapped exactly once),
`transformers.Gemma2ForCausalLM`'s own parameter names and shapes, and
KerasHub's `GemmaBackbone`'s own variable paths and shapes. Layout
conversions are checked by what each format computes with the weight (a
torch `Linear` multiplies by `W.T`), not by our own inverse.
"""

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone
from keras_gemma2.models import weight_table

CONFIGS = {
    "gqa_2": dict(num_query_heads=4, num_key_value_heads=2, head_dim=8),
    "gqa_1": dict(num_query_heads=2, num_key_value_heads=2, head_dim=4),
    "multi_query": dict(num_query_heads=4, num_key_value_heads=1, head_dim=6),
}


def make_backbone(num_layers=3, **heads):
    return Gemma2Backbone(
        vocabulary_size=40,
        num_layers=num_layers,
        hidden_dim=12,
        intermediate_dim=20,
        sliding_window_size=4,
        **heads,
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_variable_is_mapped_once_with_its_shape(name):
    backbone = make_backbone(**CONFIGS[name])
    sizes = weight_table.dimensions(backbone)
    mapped = []
    for weight, _, owner in weight_table.model_weights(backbone):
        variable = weight.variable(owner)
        assert tuple(variable.shape) == weight_table.shape(weight.axes, sizes), (
            weight.name
        )
        mapped.append(id(variable))
    assert len(mapped) == len(set(mapped)), "a variable is mapped twice"
    assert sorted(mapped) == sorted(id(v) for v in backbone.weights)


def test_names_are_unique_per_format():
    backbone = make_backbone(num_layers=4, **CONFIGS["gqa_2"])
    rows = list(weight_table.model_weights(backbone))
    hf = [weight.hf_name(layer) for weight, layer, _ in rows]
    keras_hub = [weight.keras_hub_name(layer) for weight, layer, _ in rows]
    assert len(set(hf)) == len(hf) == 2 + 11 * 4
    assert len(set(keras_hub)) == len(keras_hub)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_names_and_shapes_are_transformers_own(name):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    heads = CONFIGS[name]
    backbone = make_backbone(**heads)
    config = Gemma2Config(
        vocab_size=40,
        hidden_size=12,
        intermediate_size=20,
        num_hidden_layers=3,
        num_attention_heads=heads["num_query_heads"],
        num_key_value_heads=heads["num_key_value_heads"],
        head_dim=heads["head_dim"],
    )
    state = Gemma2ForCausalLM(config).state_dict()
    state.pop("lm_head.weight", None)  # tied to the embedding
    sizes = weight_table.dimensions(backbone)
    table = {
        weight.hf_name(layer): weight_table.shape(weight.hf_axes, sizes)
        for weight, layer, _ in weight_table.model_weights(backbone)
    }
    assert table == {key: tuple(value.shape) for key, value in state.items()}


def test_keras_hub_paths_and_shapes_are_keras_hub_own():
    import keras_hub

    heads = CONFIGS["gqa_2"]
    backbone = make_backbone(**heads)
    reference = keras_hub.models.GemmaBackbone(
        vocabulary_size=40,
        num_layers=3,
        num_query_heads=heads["num_query_heads"],
        num_key_value_heads=heads["num_key_value_heads"],
        hidden_dim=12,
        intermediate_dim=40,  # KerasHub counts both GeGLU branches
        head_dim=heads["head_dim"],
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=4,
    )
    sizes = weight_table.dimensions(backbone)
    table = {
        weight.keras_hub_name(layer): weight_table.shape(weight.keras_hub_axes, sizes)
        for weight, layer, _ in weight_table.model_weights(backbone)
    }
    assert table == {v.path: tuple(v.shape) for v in reference.weights}


def _apply_ours(weight, kernel, x):
    """What our layer computes with `kernel` on `x`, by einsum over its axes."""
    equations = {
        "query": "d,dnh->nh",
        "key": "d,dnh->nh",
        "value": "d,dnh->nh",
        "output": "nh,nhd->d",
        "gate": "d,df->f",
        "up": "d,df->f",
        "down": "f,fd->d",
    }
    return np.einsum(equations[weight.name], x, kernel).reshape(-1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_projections_compute_the_same_in_every_layout(name):
    """HF `Linear` (`x @ W.T`), KerasHub and the decoder's matrix agree with ours."""
    backbone = make_backbone(**CONFIGS[name])
    sizes = weight_table.dimensions(backbone)
    rng = np.random.default_rng(0)
    checked = set()
    for weight in weight_table.BLOCK_WEIGHTS:
        if weight.is_norm_scale:
            continue
        kernel = rng.normal(size=weight_table.shape(weight.axes, sizes))
        x = rng.normal(size=kernel.shape[: len(weight.matrix_axes[0])])
        ours = _apply_ours(weight, kernel, x)
        hf = weight_table.convert(kernel, weight.axes, weight.hf_axes, sizes)
        np.testing.assert_allclose(hf @ x.reshape(-1), ours, rtol=1e-12)
        keras_hub = weight_table.convert(
            kernel, weight.axes, weight.keras_hub_axes, sizes
        )
        back = weight_table.convert(
            keras_hub, weight.keras_hub_axes, weight.axes, sizes
        )
        np.testing.assert_array_equal(back, kernel)
        matrix = weight_table.convert(kernel, weight.axes, weight.matrix_axes, sizes)
        np.testing.assert_allclose(x.reshape(-1) @ matrix, ours, rtol=1e-12)
        # The decoder's matrix is a view: a reshape of ours, no transpose.
        np.testing.assert_array_equal(matrix, kernel.reshape(matrix.shape))
        checked.add(weight.name)
    assert checked == {"query", "key", "value", "output", "gate", "up", "down"}


def test_keras_hub_query_layout_is_heads_first():
    """KerasHub stores query kernels `[heads, hidden, head_dim]` (literal case)."""
    sizes = {"hidden": 2, "heads": 3, "head_dim": 1}
    query = next(w for w in weight_table.BLOCK_WEIGHTS if w.name == "query")
    ours = np.arange(6).reshape(2, 3, 1)  # [hidden, heads, head_dim]
    keras_hub = weight_table.convert(ours, query.axes, query.keras_hub_axes, sizes)
    expected = np.array([[[0], [3]], [[1], [4]], [[2], [5]]])
    np.testing.assert_array_equal(keras_hub, expected)


def test_convert_refuses_layouts_of_other_axes():
    with pytest.raises(ValueError, match="same axes"):
        weight_table.convert(
            np.zeros((2, 3)), (("hidden",), ("heads",)), (("hidden",),), {}
        )


def test_lora_kernels_read_merged():
    backbone = make_backbone(**CONFIGS["gqa_2"])
    block = backbone.transformer_layers[0]
    query = next(w for w in weight_table.BLOCK_WEIGHTS if w.name == "query")
    before = keras.ops.convert_to_numpy(query.variable(block))
    block.attention.query_dense.enable_lora(2)
    block.attention.query_dense.lora_kernel_b.assign(
        np.ones(tuple(block.attention.query_dense.lora_kernel_b.shape), "float32")
    )
    merged = keras.ops.convert_to_numpy(query.variable(block))
    assert np.abs(merged - before).max() > 0
