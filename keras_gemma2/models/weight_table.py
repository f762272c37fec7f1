"""Every Gemma 2 weight, described once: our variable and its name elsewhere.

One row per weight gives where the variable lives in `Gemma2Backbone`, its
name in a Hugging Face checkpoint and in a KerasHub `GemmaBackbone`, and its
layout in each of them, written as named axes. Layouts are converted by
`convert`, which reads the axes, so no reader or writer spells out a
transpose of its own. The Hugging Face loader and exporter, the KerasHub
loader and `TorchDecoder` all read this table; `tests/models/
test_weight_table.py` walks it against a built model.

Axis names and the backbone argument that sizes them:

| axis | size |
|---|---|
| `vocabulary` | `vocabulary_size` |
| `hidden` | `hidden_dim` |
| `heads` | `num_query_heads` |
| `kv_heads` | `num_key_value_heads` |
| `head_dim` | `head_dim` |
| `intermediate` | `intermediate_dim` (one GeGLU branch) |

A layout is a tuple of axis groups, one group per array axis; a group of
several names is those axes flattened, the first outermost. So HF's
`q_proj.weight`, `[heads * head_dim, hidden]`, is
`(("heads", "head_dim"), ("hidden",))`.

This module imports nothing of keras_gemma2: `models`, `generation` and
`checkpoints` all read it.
"""

import dataclasses

import numpy as np


def _axes(*names):
    """A layout of one axis per name: `("hidden", "heads")` -> `(("hidden",), ...)`."""
    return tuple((name,) for name in names)


@dataclasses.dataclass(frozen=True)
class Weight:
    """One weight: where our model keeps it and how other formats store it.

    Attributes:
        name: string. Its role, e.g. `"query"`; also the attribute holding
            it in `TorchDecoder`'s layers.
        attribute: tuple of attribute names leading from its owner (the
            backbone, or one decoder block) to the variable, e.g.
            `("attention", "query_dense", "kernel")`. Read through the
            layer's own attribute, so a LoRA-enabled kernel reads merged.
        axes: layout of our variable.
        hf: Hugging Face tensor name; `{layer}` stands for the block index.
        hf_axes: layout of the Hugging Face tensor (torch `Linear` weights
            are `[out, in]`).
        keras_hub: variable path in a KerasHub `GemmaBackbone`.
        keras_hub_axes: layout of the KerasHub variable.
        matrix_axes: the layout `TorchDecoder` multiplies with: `[in, out]`
            for projections, a reshape of ours (never a transpose), so the
            decoder holds views of the variables.
        padded: whether a checkpoint may hold more rows than the model
            (released Gemma 2 checkpoints pad the vocabulary to 256128
            rows; the extra rows are never used).
    """

    name: str
    attribute: tuple
    axes: tuple
    hf: str
    hf_axes: tuple
    keras_hub: str
    keras_hub_axes: tuple
    matrix_axes: tuple
    padded: bool = False

    def hf_name(self, layer=None):
        """The Hugging Face tensor name, for block `layer` if per block."""
        return self.hf.format(layer=layer)

    def keras_hub_name(self, layer=None):
        """The KerasHub variable path, for block `layer` if per block."""
        return self.keras_hub.format(layer=layer)

    def layout(self, file_format):
        """This weight's layout in `file_format` (`"hf"` or `"keras_hub"`)."""
        return getattr(self, f"{_check_format(file_format)}_axes")

    @property
    def is_norm_scale(self):
        """Whether this is an RMS norm's `scale` (Gemma's gain is `1 + scale`)."""
        return self.attribute[-1] == "scale"

    def variable(self, owner):
        """The variable (or LoRA-merged kernel) of this weight in `owner`."""
        value = owner
        for name in self.attribute:
            value = getattr(value, name)
        return value


def _norm(name, hf, keras_hub):
    return Weight(
        name=name,
        attribute=(name, "scale"),
        axes=_axes("hidden"),
        hf=hf,
        hf_axes=_axes("hidden"),
        keras_hub=keras_hub,
        keras_hub_axes=_axes("hidden"),
        matrix_axes=_axes("hidden"),
    )


def _attention_in(name, heads, hf, keras_hub):
    """Query, key or value: ours `[hidden, heads, head_dim]`."""
    return Weight(
        name=name,
        attribute=("attention", f"{name}_dense", "kernel"),
        axes=_axes("hidden", heads, "head_dim"),
        hf=hf,
        hf_axes=((heads, "head_dim"), ("hidden",)),
        keras_hub=keras_hub,
        keras_hub_axes=_axes(heads, "hidden", "head_dim"),
        matrix_axes=(("hidden",), (heads, "head_dim")),
    )


def _feed_forward(name, layer, source, target, hf, keras_hub):
    """Gate, up or down projection: ours `[source, target]`."""
    return Weight(
        name=name,
        attribute=("ffw", layer, "kernel"),
        axes=_axes(source, target),
        hf=hf,
        hf_axes=_axes(target, source),
        keras_hub=keras_hub,
        keras_hub_axes=_axes(source, target),
        matrix_axes=_axes(source, target),
    )


# Owned by the backbone, before the blocks.
EMBEDDING = Weight(
    name="token_embedding",
    attribute=("token_embedding", "embeddings"),
    axes=_axes("vocabulary", "hidden"),
    hf="model.embed_tokens.weight",
    hf_axes=_axes("vocabulary", "hidden"),
    keras_hub="token_embedding/embeddings",
    keras_hub_axes=_axes("vocabulary", "hidden"),
    matrix_axes=_axes("vocabulary", "hidden"),
    padded=True,
)

# Owned by each decoder block, in Hugging Face checkpoint order. KerasHub
# computes the feed-forward as `ffw_linear(gelu(ffw_gating(x)) *
# ffw_gating_2(x))`.
BLOCK_WEIGHTS = (
    _norm(
        "pre_attention_norm",
        "model.layers.{layer}.input_layernorm.weight",
        "decoder_block_{layer}/pre_attention_norm/scale",
    ),
    _norm(
        "post_attention_norm",
        "model.layers.{layer}.post_attention_layernorm.weight",
        "decoder_block_{layer}/post_attention_norm/scale",
    ),
    _norm(
        "pre_ffw_norm",
        "model.layers.{layer}.pre_feedforward_layernorm.weight",
        "decoder_block_{layer}/pre_ffw_norm/scale",
    ),
    _norm(
        "post_ffw_norm",
        "model.layers.{layer}.post_feedforward_layernorm.weight",
        "decoder_block_{layer}/post_ffw_norm/scale",
    ),
    _attention_in(
        "query",
        "heads",
        "model.layers.{layer}.self_attn.q_proj.weight",
        "decoder_block_{layer}/attention/query/kernel",
    ),
    _attention_in(
        "key",
        "kv_heads",
        "model.layers.{layer}.self_attn.k_proj.weight",
        "decoder_block_{layer}/attention/key/kernel",
    ),
    _attention_in(
        "value",
        "kv_heads",
        "model.layers.{layer}.self_attn.v_proj.weight",
        "decoder_block_{layer}/attention/value/kernel",
    ),
    Weight(
        name="output",
        attribute=("attention", "output_dense", "kernel"),
        axes=_axes("heads", "head_dim", "hidden"),
        hf="model.layers.{layer}.self_attn.o_proj.weight",
        hf_axes=(("hidden",), ("heads", "head_dim")),
        keras_hub="decoder_block_{layer}/attention/attention_output/kernel",
        keras_hub_axes=_axes("heads", "head_dim", "hidden"),
        matrix_axes=(("heads", "head_dim"), ("hidden",)),
    ),
    _feed_forward(
        "gate",
        "gate_dense",
        "hidden",
        "intermediate",
        "model.layers.{layer}.mlp.gate_proj.weight",
        "decoder_block_{layer}/ffw_gating/kernel",
    ),
    _feed_forward(
        "up",
        "up_dense",
        "hidden",
        "intermediate",
        "model.layers.{layer}.mlp.up_proj.weight",
        "decoder_block_{layer}/ffw_gating_2/kernel",
    ),
    _feed_forward(
        "down",
        "down_dense",
        "intermediate",
        "hidden",
        "model.layers.{layer}.mlp.down_proj.weight",
        "decoder_block_{layer}/ffw_linear/kernel",
    ),
)

# Owned by the backbone, after the blocks.
FINAL_NORM = _norm("final_norm", "model.norm.weight", "final_normalization/scale")


def dimensions(backbone):
    """`{axis name: size}` of a `Gemma2Backbone`."""
    return {
        "vocabulary": backbone.vocabulary_size,
        "hidden": backbone.hidden_dim,
        "heads": backbone.num_query_heads,
        "kv_heads": backbone.num_key_value_heads,
        "head_dim": backbone.head_dim,
        "intermediate": backbone.intermediate_dim,
    }


def shape(layout, sizes):
    """The array shape of `layout` under `sizes` (from `dimensions`)."""
    return tuple(int(np.prod([sizes[name] for name in group])) for group in layout)


def convert(array, source, target, sizes):
    """Move `array` from layout `source` to layout `target`.

    Splits `source`'s grouped axes, permutes the named axes into `target`'s
    order and groups them as `target` says. Works on numpy arrays and on
    anything else with numpy-style `reshape` and `transpose`.

    Args:
        array: array in layout `source`.
        source, target: layouts over the same axis names.
        sizes: `{axis name: size}`, from `dimensions`.

    Example:

    >>> import numpy as np
    >>> sizes = {"hidden": 2, "heads": 3, "head_dim": 1}
    >>> ours = np.arange(6).reshape(2, 3, 1)  # [hidden, heads, head_dim]
    >>> convert(ours, ((("hidden",), ("heads",), ("head_dim",))),
    ...         (("heads", "head_dim"), ("hidden",)), sizes)
    array([[0, 3],
           [1, 4],
           [2, 5]])
    """
    names = [name for group in source for name in group]
    order = [name for group in target for name in group]
    if sorted(names) != sorted(order):
        raise ValueError(
            f"Layouts {source} and {target} do not hold the same axes; a weight "
            "cannot move between them."
        )
    split = array.reshape(tuple(sizes[name] for name in names))
    moved = split.transpose(tuple(names.index(name) for name in order))
    return moved.reshape(shape(target, sizes))


def model_weights(backbone):
    """Yield `(weight, layer_index, owner)` for every weight of `backbone`.

    In Hugging Face checkpoint order: the embedding, each block's weights in
    `BLOCK_WEIGHTS` order, the final norm. `layer_index` is `None` for the
    backbone's own weights; `weight.variable(owner)` is the variable.
    """
    yield EMBEDDING, None, backbone
    for index, block in enumerate(backbone.transformer_layers):
        for weight in BLOCK_WEIGHTS:
            yield weight, index, block
    yield FINAL_NORM, None, backbone


FORMATS = ("hf", "keras_hub")


def _check_format(file_format):
    if file_format not in FORMATS:
        raise ValueError(
            f"Received an invalid value for `file_format`, expected one of "
            f"{FORMATS}. Received: file_format={file_format!r}"
        )
    return file_format


def checkpoint_plan(backbone, file_format):
    """List `(name, weight, variable, shape)` for every weight, in model order.

    Args:
        backbone: a built `Gemma2Backbone`.
        file_format: `"hf"` (Hugging Face names and layouts) or
            `"keras_hub"` (KerasHub `GemmaBackbone` variable paths and
            layouts).

    Returns:
        One tuple per weight: its name in `file_format`, its row of this
        table, our variable, and its shape in `file_format`.
    """
    sizes = dimensions(backbone)
    field = _check_format(file_format)
    return [
        (
            getattr(weight, field).format(layer=layer),
            weight,
            weight.variable(owner),
            shape(weight.layout(field), sizes),
        )
        for weight, layer, owner in model_weights(backbone)
    ]
