"""Weight quantization of a Gemma 2 model: which layers, which scheme, checks first.

Keras quantizes a model by calling `quantize` on every leaf layer. A
`Gemma2CausalLM` also tracks its preprocessor, whose tokenizer is an unbuilt
layer, so a plain `Model.quantize` stops there on jax and tensorflow. Here
only the backbone's layers are visited: the token embedding (which is also
the tied output head) and the seven projections of every decoder block.

The schemes (measured on `gemma2_tiny_python`, 1024 positions of Python
source, against float32; the same on jax, tensorflow and torch):

| scheme | max abs diff / std | mean | top-1 |
|---|---|---|---|
| `"int8"` (below) | 0.117-0.127 | 0.008 | 0.987 |
| int8 everywhere, Keras' default (int8 head activations) | 0.118 | 0.011 | 0.980 |
| int4 everywhere, per-channel weights | 1.026 | 0.096 | 0.844 |
| int4 everywhere, Keras' default (blocks of 128) | 0.938 | 0.078 | 0.876 |
| `"int4"` (below): blocks of 128, int8 weight-only head | 0.395 | 0.029 | 0.941 |
| as `"int4"` with blocks of 32 | 0.335 | 0.025 | 0.949 |
| as `"int4"` with per-channel int4 | 0.477 | 0.040 | 0.917 |

(int8 projections use Keras' default: per-channel weights and per-token
int8 activations.)

So `"int4"` keeps the embedding, which is also the output projection, in
int8 and quantizes the projections to int4 in blocks of 128 along the input
axis, weight-only (Keras' `Int4QuantizationConfig` default). Smaller blocks
gain little and store 4x more scales and zero points.
"""

import keras

SUPPORTED_MODES = ("int8", "int4")
INT4_BLOCK_SIZE = 128
# The Keras layers with int8 and int4 kernels.
QUANTIZABLE = (
    keras.layers.EinsumDense,
    keras.layers.Dense,
    keras.layers.Embedding,
    keras.layers.ReversibleEmbedding,
)


def quantize_backbone_layers(causal_lm, mode, config, filters, type_check):
    """Quantize `causal_lm.backbone`'s layers in place; check everything first.

    Args:
        causal_lm: a built `Gemma2CausalLM`.
        mode: `"int8"`, `"int4"` or `None` (then `config.mode`).
        config: optional `keras.quantizers.QuantizationConfig`.
        filters: optional Keras filter (regex, list of regexes or callable
            on a layer) narrowing the backbone layers quantized.
        type_check: bool, passed to each layer's `quantize`.

    Returns:
        The mode applied.
    """
    mode = resolve_mode(mode, config)
    backbone = causal_lm.backbone
    _check_not_quantized(backbone, mode)
    _check_no_lora(backbone)
    _check_filters(filters)

    embedding = backbone.token_embedding
    embedding_mode, embedding_config, config = layer_schemes(mode, config)
    targets = [
        layer
        for layer in _leaf_layers(backbone)
        if isinstance(layer, QUANTIZABLE) and _matches(layer, filters)
    ]
    if type_check:
        subclassed = [layer.name for layer in targets if type(layer) not in QUANTIZABLE]
        if subclassed:
            raise ValueError(
                f"Layers {subclassed} subclass a Keras layer whose `quantize` "
                "does not know the subclass; pass `type_check=False` to "
                "quantize them as their Keras base class."
            )
    for layer in targets:
        if layer is embedding:
            layer.quantize(
                embedding_mode, type_check=type_check, config=embedding_config
            )
        else:
            layer.quantize(mode, type_check=type_check, config=config)
    return mode


def layer_schemes(mode, config):
    """`(embedding mode, embedding config, projection config)` of one scheme.

    The embedding is also the tied output head. It stays int8 under
    `"int4"` (the module table), and its weights alone are quantized: Keras'
    int8 head rounds its input activations with no straight-through
    gradient, so the loss gradient would stop at the head and LoRA layers
    below it would barely train (measured: QLoRA loss 3.93 -> 3.88 in 6
    steps, against 3.93 -> 3.69 for float and for a weight-only head).
    """
    embedding_config = keras.quantizers.Int8QuantizationConfig(
        activation_quantizer=None
    )
    if mode == "int4":
        if config is None:
            config = keras.quantizers.Int4QuantizationConfig(block_size=INT4_BLOCK_SIZE)
        return "int8", embedding_config, config
    return mode, embedding_config, config


def restore_activation_quantizers(backbone, mode, config):
    """Give a reloaded quantized backbone the activation quantizers it had.

    Saving keeps each layer's dtype policy (mode and int4 block size) but
    not its `QuantizationConfig`, and a layer rebuilt from its policy
    quantizes its inputs to int8: that would turn a weight-only int4
    projection or head into W4A8 after `load_model` and change the logits.

    Args:
        backbone: a `Gemma2Backbone` whose layers are already quantized.
        mode, config: what `quantize` was called with (`config` may be
            `None`).
    """
    _, embedding_config, config = layer_schemes(mode, config)
    for layer in _leaf_layers(backbone):
        if getattr(layer, "quantization_mode", None) is None:
            continue
        layer_config = embedding_config if layer is backbone.token_embedding else config
        if layer_config is not None:
            layer.quantization_config = layer_config
            # Keras' int8/int4 calls read this attribute (no public setter).
            layer.inputs_quantizer = layer_config.activation_quantizer


def resolve_mode(mode, config):
    """The mode `quantize` applies; a clear error for anything unsupported."""
    if config is not None and not isinstance(
        config, keras.quantizers.QuantizationConfig
    ):
        raise TypeError(
            "Received an invalid value for `config`, expected a "
            "`keras.quantizers.QuantizationConfig` or `None`. "
            f"Received: config={config!r}"
        )
    if mode is None:
        if config is None:
            raise ValueError(
                "Pass a quantization `mode` (one of "
                f"{', '.join(map(repr, SUPPORTED_MODES))}) or a `config`. "
                "Received: mode=None, config=None"
            )
        mode = config.mode
    if not isinstance(mode, str) or mode not in SUPPORTED_MODES:
        raise ValueError(
            "Received an invalid value for `mode`, expected one of "
            f"{', '.join(map(repr, SUPPORTED_MODES))}. Received: mode={mode!r}"
        )
    if config is not None and config.mode != mode:
        raise ValueError(
            f"`mode` and `config` disagree: mode={mode!r} but config is a "
            f"{type(config).__name__} (mode {config.mode!r})."
        )
    return mode


def _check_not_quantized(backbone, mode):
    quantized = {
        layer.name: layer.quantization_mode
        for layer in _leaf_layers(backbone)
        if getattr(layer, "quantization_mode", None) is not None
    }
    if quantized:
        name, current = next(iter(quantized.items()))
        raise ValueError(
            f"The model is already quantized ({len(quantized)} layers, e.g. "
            f"{name!r} is {current!r}); it can be quantized only once. Load "
            f"the float weights again to quantize to mode={mode!r}."
        )


def _check_no_lora(backbone):
    adapted = [
        layer.name
        for layer in _leaf_layers(backbone)
        # Keras' adapters and ours (`keras_gemma2.training.lora`) alike.
        if hasattr(layer, "lora_kernel_a")
    ]
    if adapted:
        raise ValueError(
            f"LoRA is enabled on {len(adapted)} layers (e.g. {adapted[0]!r}); "
            "quantize the base model first, then call `enable_lora` (QLoRA), "
            "or merge the adapters into the kernels before quantizing."
        )


def _check_filters(filters):
    if filters is None or isinstance(filters, str) or callable(filters):
        return
    if isinstance(filters, (list, tuple)) and all(
        isinstance(pattern, str) for pattern in filters
    ):
        return
    raise TypeError(
        "Received an invalid value for `filters`, expected a regex string, a "
        "list of regex strings or a callable taking a layer. "
        f"Received: filters={filters!r}"
    )


def _matches(layer, filters):
    import re

    if filters is None:
        return True
    if isinstance(filters, str):
        return re.search(filters, layer.name) is not None
    if callable(filters):
        return bool(filters(layer))
    return any(re.search(pattern, layer.name) for pattern in filters)


def _leaf_layers(backbone):
    """Backbone layers without sublayers: the ones that own weights."""
    return [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if not list(layer._flatten_layers(include_self=False))
    ]
