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

import contextlib
import gc

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
    with _one_garbage_collection():
        for layer in targets:
            if layer is embedding:
                layer.quantize(
                    embedding_mode, type_check=type_check, config=embedding_config
                )
            else:
                layer.quantize(mode, type_check=type_check, config=config)
    _record_policies(backbone)
    return mode


def _record_policies(backbone):
    """Make the backbone's dtype policy a map of its quantized layers' policies.

    KerasHub's `Backbone.get_config` otherwise builds that map itself, with
    no default policy, and serializing such a map sets every quantized
    layer's source dtype to `None`, in place: a bfloat16 model quantized and
    saved reloaded computing in float32 (the `keras.config` default). With
    the backbone's own policy as the default, the map is saved as it is.
    """
    policy = backbone.dtype_policy
    policies = {
        layer.path: layer.dtype_policy
        for layer in _leaf_layers(backbone)
        if getattr(layer, "quantization_mode", None) is not None
    }
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        for path, layer_policy in policies.items():
            if path not in policy:
                policy[path] = layer_policy
        return
    # The backbone is a layer of the model, not a quantized one: its own
    # mode (the map's default) stays `None`.
    backbone._dtype_policy = keras.dtype_policies.DTypePolicyMap(
        default_policy=policy.name, policy_map=policies
    )


@contextlib.contextmanager
def _one_garbage_collection():
    """Run Python's garbage collector once, after the block, not per layer.

    Each layer's `quantize` deletes its float kernel, and Keras'
    `Layer.__delattr__` runs a full `gc.collect()` for every deleted
    variable so that its buffer is freed. With tensorflow, torch and jax
    imported a collection takes about half a second (measured): 14 s of the
    15 s `quantize` took on `gemma2_tiny_python` (29 layers), minutes on a
    9B model. The float kernels are freed by the one collection at the end.
    (A `gc.collect()` from another thread during the block is skipped too.)
    """
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        gc.collect()


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
    own_policies(backbone)
    _, embedding_config, config = layer_schemes(mode, config)
    for layer in _leaf_layers(backbone):
        if getattr(layer, "quantization_mode", None) is None:
            continue
        layer_config = embedding_config if layer is backbone.token_embedding else config
        if layer_config is not None:
            layer.quantization_config = layer_config
            # Keras' int8/int4 calls read this attribute (no public setter).
            layer.inputs_quantizer = layer_config.activation_quantizer


def restore_quantization(backbone, record):
    """Finish a quantized backbone rebuilt from a saved config.

    Args:
        backbone: a `Gemma2Backbone`, quantized or not.
        record: `None`, or what `Gemma2CausalLM.get_config` writes under
            `"quantization"`: `{"mode": ..., "config": serialized
            QuantizationConfig or None}`. Without it the layers keep Keras'
            default activation quantizers.
    """
    if record is None:
        own_policies(backbone)
        return
    config = keras.saving.deserialize_keras_object(record["config"])
    restore_activation_quantizers(backbone, record["mode"], config)


class _PackedKernelEinsumDense(keras.layers.EinsumDense):
    """An int4 `EinsumDense` whose `kernel` is its packed variable."""

    @property
    def kernel(self):
        return self._kernel


@contextlib.contextmanager
def packed_int4_kernels(backbone):
    """Within the block, each int4 projection's `kernel` is its packed codes.

    Keras' weight loading reads every attribute of every layer to find the
    sublayers it holds. On an int4 `EinsumDense`, `kernel` is a property
    that unpacks the whole kernel to int8: one transient copy per layer,
    about 12 s and, as the copies fragment the heap, 0.6 GB of resident
    memory more than the 0.17 GB the int4 weights of a ~1 GB model need
    (measured on torch, `benchmarks/quantized_memory.py`). Keras' int4
    loading itself reads only the variables.

    Args:
        backbone: a `Gemma2Backbone`.
    """
    layers = [
        layer
        for layer in _leaf_layers(backbone)
        if type(layer) is keras.layers.EinsumDense and layer.quantization_mode == "int4"
    ]
    for layer in layers:
        layer.__class__ = _PackedKernelEinsumDense
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = keras.layers.EinsumDense


def own_policies(backbone):
    """Give each quantized layer of a rebuilt backbone its own dtype policy.

    A backbone rebuilt from a saved config (`from_preset`, `load_model`)
    hands every layer the backbone's whole `DTypePolicyMap`. Each layer finds
    its entry by path for `quantization_mode`, but the Keras code that
    writes quantized weights (`Embedding._get_embeddings_with_merged_lora`,
    `EinsumDense._get_kernel_with_merged_lora`) asks the map itself, whose
    mode is `None`: it then writes a missing scale, and saving a reloaded
    quantized model again failed with "Invalid dtype: object". A layer
    quantized in place holds its own policy; this gives a reloaded one the
    same. Float layers and layers that already hold their own are left
    alone.

    Args:
        backbone: a `Gemma2Backbone`.
    """
    for layer in _leaf_layers(backbone):
        policy = layer.dtype_policy
        if (
            isinstance(policy, keras.dtype_policies.DTypePolicyMap)
            and layer.quantization_mode is not None
        ):
            # The public setter writes into the shared map instead.
            layer._dtype_policy = policy[layer.path]


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


def weight_layer(weight, owner):
    """The layer holding `weight` (a `weight_table` row) in `owner`.

    `owner` is the backbone or the decoder block that the row's
    `attribute` path starts from.
    """
    layer = owner
    for name in weight.attribute[:-1]:
        layer = getattr(layer, name)
    return layer


def float_weight(weight, owner):
    """The float32 value of one weight, dequantized when its layer is quantized.

    What writers of float checkpoints (`export_to_transformers`) read in
    place of `weight.variable(owner)`, which on a quantized layer is the
    integer codes. A float layer's variable (or LoRA-merged kernel) comes
    back as it is.

    Args:
        weight: a row of `keras_gemma2.models.weight_table`.
        owner: the backbone or decoder block holding it.

    Returns:
        A numpy array in the variable's layout (`weight.axes`).
    """
    layer = weight_layer(weight, owner)
    if getattr(layer, "quantization_mode", None) is None:
        return keras.ops.convert_to_numpy(weight.variable(owner))
    return dequantize(layer)


def dequantize(layer):
    """The float32 kernel (or embedding matrix) a quantized layer computes with.

    Keras' arithmetic for the schemes `quantize` applies: int8 codes over a
    per-channel scale; int4 codes over a per-channel scale, or per block of
    input rows with a zero point. A LoRA adapter of
    `keras_gemma2.training.lora` (QLoRA) is added to the dequantized
    kernel, as the layer's forward adds it to the quantized product. The
    int8 activation rounding of an int8 projection is a property of the
    forward pass, not of the weights: a float model holding these weights
    computes the weight-only int8 forward.

    Args:
        layer: an int8- or int4-quantized `EinsumDense` or `Embedding`
            (`ReversibleEmbedding`).

    Returns:
        A float32 numpy array of the layer's float kernel shape.
    """
    mode = layer.quantization_mode
    if mode not in SUPPORTED_MODES or not isinstance(
        layer, (keras.layers.EinsumDense, keras.layers.Embedding)
    ):
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) is quantized with "
            f"mode={mode!r}; only {', '.join(map(repr, SUPPORTED_MODES))} "
            "`EinsumDense` and `Embedding` weights can be dequantized."
        )
    lora = getattr(layer, "_lora_update", None)  # keras_gemma2.training.lora
    if getattr(layer, "lora_enabled", False) and lora is None:
        raise ValueError(
            f"Layer {layer.name!r} holds a Keras LoRA adapter over {mode} "
            "weights, which cannot be dequantized with it. Use "
            "`backbone.enable_lora` (QLoRA adapters that export) instead."
        )
    numpy = keras.ops.convert_to_numpy
    if isinstance(layer, keras.layers.Embedding):
        codes = numpy(layer._embeddings)
        scale = numpy(layer.embeddings_scale)
        if mode == "int8":
            return codes.astype("float32") / scale[:, None]
        codes = numpy(
            keras.quantizers.unpack_int4(codes, layer._orig_output_dim, axis=-1)
        )
        block_size = getattr(layer, "_int4_block_size", None)
        if block_size in (None, -1):
            return codes.astype("float32") / scale[:, None]
        groups = numpy(layer.g_idx).astype("int64")  # [output_dim]
        zero = numpy(layer.embeddings_zero)[:, groups].astype("float32")
        return (codes.astype("float32") - zero) * scale[:, groups]
    if mode == "int8":
        # Keras' per-channel scale, moved back to the kernel's axes.
        scale = numpy(layer._adjust_scale_for_dequant(layer.kernel_scale))
        kernel = numpy(layer._kernel).astype("float32") / scale
    else:
        # Keras stores int4 kernels as [rows, columns / 2]: reduced axes are
        # the rows, two codes per byte along the columns.
        codes = keras.quantizers.unpack_int4(
            layer._kernel, layer._int4_unpacked_column_size, axis=-1
        )
        codes = numpy(codes).astype("float32")  # [rows, columns]
        scale = numpy(layer.kernel_scale)
        block_size = getattr(layer, "_int4_block_size", None)
        if block_size in (None, -1):
            kernel = codes / scale  # scale: [columns]
        else:
            groups = numpy(layer.g_idx).astype("int64")  # [rows]
            zero = numpy(layer.kernel_zero)[groups].astype("float32")
            kernel = (codes - zero) * scale[groups]
        kernel = kernel.reshape(tuple(layer.original_kernel_shape))
    if lora is not None:
        kernel = kernel + numpy(lora()).astype("float32")
    return kernel
