"""Write a `Gemma2CausalLM` as a KerasHub `GemmaCausalLM` preset.

KerasHub describes Gemma 2 with its Gemma class (`GemmaBackbone` with
`use_post_attention_norm`, `use_post_ffw_norm` and
`use_sliding_window_attention`), which computes a narrower family than
`Gemma2Backbone`. A model is written only when KerasHub computes it
exactly:

- queries scaled by `head_dim ** -0.5`: KerasHub 0.32's decoder block passes
  `query_head_dim_normalize=True` to its attention whatever the backbone
  says, so the 27B's `query_pre_attn_scalar = hidden_dim / num_query_heads`
  (144, not `head_dim` 128) cannot be expressed;
- `rope_max_wavelength` 10000 (hard-coded in KerasHub's attention);
- `layer_norm_epsilon` 1e-6 (KerasHub's blocks ignore the backbone's value
  and use 1e-6).

Every released 2B and 9B Gemma 2 fits; the 27B does not.
"""

import os

import keras_hub
import numpy as np

from keras_gemma2.checkpoints.atomic import atomic_directory
from keras_gemma2.models import weight_table
from keras_gemma2.models.quantization import float_weight

_ROPE_MAX_WAVELENGTH = 10000.0
_LAYER_NORM_EPSILON = 1e-6
_DTYPES = ("float32", "bfloat16")


def keras_hub_backbone_arguments(config):
    """`keras_hub.models.GemmaBackbone` arguments computing a model exactly.

    Args:
        config: a `Gemma2Backbone`, or a dict of its arguments (e.g. from
            `get_config()` or a checkpoint's config, checked before loading
            any weight).

    Raises:
        ValueError: KerasHub cannot compute this configuration (the message
            names the setting, its value and why).

    Example:

    >>> from keras_gemma2 import get_preset_config
    >>> arguments = keras_hub_backbone_arguments(get_preset_config("gemma2_2b_en"))
    >>> arguments["intermediate_dim"], arguments["query_head_dim_normalize"]
    (18432, True)
    >>> try:
    ...     keras_hub_backbone_arguments(get_preset_config("gemma2_27b_en"))
    ... except ValueError as error:
    ...     print(str(error)[48:116])
    query_pre_attn_scalar=144 (27B-style scaling, hidden_dim / num_query
    """
    if not isinstance(config, dict):
        config = config.get_config()
    head_dim = config["head_dim"]
    scalar = config.get("query_pre_attn_scalar") or head_dim  # None: head_dim
    if scalar != head_dim:
        style = ""
        if scalar == config["hidden_dim"] // config["num_query_heads"]:
            style = " (27B-style scaling, hidden_dim / num_query_heads)"
        raise ValueError(
            "KerasHub cannot compute this model exactly: its query_pre_attn_scalar="
            f"{scalar:g}{style} differs from head_dim={head_dim}, and KerasHub "
            "0.32's GemmaDecoderBlock always scales queries by head_dim ** -0.5 "
            "(it hard-codes query_head_dim_normalize=True), so its logits would "
            "differ. Export this model with --to transformers or --to keras "
            "instead."
        )
    rope = float(config.get("rope_max_wavelength", _ROPE_MAX_WAVELENGTH))
    if rope != _ROPE_MAX_WAVELENGTH:
        raise ValueError(
            "KerasHub cannot compute this model exactly: its rope_max_wavelength="
            f"{rope:g}, and KerasHub's Gemma attention hard-codes "
            f"{_ROPE_MAX_WAVELENGTH:g}."
        )
    epsilon = float(config.get("layer_norm_epsilon", _LAYER_NORM_EPSILON))
    if epsilon != _LAYER_NORM_EPSILON:
        raise ValueError(
            "KerasHub cannot compute this model exactly: its layer_norm_epsilon="
            f"{epsilon:g}, and KerasHub's Gemma decoder blocks always use "
            f"{_LAYER_NORM_EPSILON:g}."
        )
    return {
        "vocabulary_size": config["vocabulary_size"],
        "num_layers": config["num_layers"],
        "num_query_heads": config["num_query_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "hidden_dim": config["hidden_dim"],
        # KerasHub counts both GeGLU branches.
        "intermediate_dim": 2 * config["intermediate_dim"],
        "head_dim": head_dim,
        "query_head_dim_normalize": True,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "attention_logit_soft_cap": config.get("attention_logit_soft_cap", 50.0),
        "final_logit_soft_cap": config.get("final_logit_soft_cap", 30.0),
        "use_sliding_window_attention": True,
        "sliding_window_size": config.get("sliding_window_size", 4096),
        "layer_norm_epsilon": _LAYER_NORM_EPSILON,
        "dropout": config.get("dropout", 0.0),
    }


def check_preset_exportable(preset):
    """Raise `ValueError` if KerasHub cannot compute the model `preset` holds.

    Reads only the preset's config (no weights), so a model KerasHub cannot
    compute is refused before a long load.

    Args:
        preset: string. Anything `Gemma2CausalLM.from_preset` takes.
    """
    from keras_gemma2.checkpoints import preset_loading
    from keras_gemma2.models.json_file import read_json

    directory = preset_loading.resolve_preset(preset)
    from keras_gemma2.checkpoints import gguf_import

    if gguf_import.is_gguf_file(directory):
        keras_hub_backbone_arguments(
            gguf_import.read_gguf_config(gguf_import.GGUFFile(directory))
        )
        return
    kind = preset_loading.preset_format(directory)
    if kind == preset_loading.TRANSFORMERS:
        from keras_gemma2.checkpoints.hf_checkpoint import read_hf_config

        config = read_hf_config(directory)
    elif kind == preset_loading.KERAS_HUB_GEMMA:
        from keras_gemma2.checkpoints.keras_hub_preset import (
            keras_hub_backbone_config,
        )

        config = keras_hub_backbone_config(directory)
    else:
        config = read_json(os.path.join(directory, "config.json"))["config"]
    keras_hub_backbone_arguments(config)


def _check_no_lora(backbone):
    enabled = [
        variable.path for variable in backbone.weights if "lora" in variable.path
    ]
    if enabled:
        raise ValueError(
            f"The model has unmerged LoRA adapters (e.g. on `{enabled[0]}`); "
            "KerasHub's preset would lose them. Merge them into the weights "
            "first (keras_gemma2.training merge_lora) or save with "
            "save_to_preset."
        )


def to_keras_hub_backbone(backbone, dtype="float32"):
    """A `keras_hub.models.GemmaBackbone` holding `backbone`'s weights.

    Args:
        backbone: a `Gemma2Backbone` that KerasHub computes exactly (see
            `keras_hub_backbone_arguments`). Quantized layers are
            dequantized.
        dtype: string. `"float32"` or `"bfloat16"`. Defaults to `"float32"`.
    """
    if dtype not in _DTYPES:
        raise ValueError(
            f"Received an invalid value for `dtype`, expected one of "
            f"{list(_DTYPES)}. Received: dtype={dtype!r}"
        )
    arguments = keras_hub_backbone_arguments(backbone)
    _check_no_lora(backbone)
    target = keras_hub.models.GemmaBackbone(**arguments, dtype=dtype)
    variables = {variable.path: variable for variable in target.weights}
    sizes = weight_table.dimensions(backbone)
    plan = [
        (weight.keras_hub_name(layer), weight, owner)
        for weight, layer, owner in weight_table.model_weights(backbone)
    ]
    planned = {path for path, *_ in plan}
    if planned != set(variables):
        changed = sorted(planned ^ set(variables))
        raise ValueError(
            "keras_hub.models.GemmaBackbone's variables differ from those "
            f"keras_gemma2 maps (e.g. `{changed[0]}`); keras_hub "
            f"{keras_hub.__version__} is not supported by this writer."
        )
    for path, weight, owner in plan:
        # Quantized layers are dequantized, one tensor at a time.
        value = float_weight(weight, owner)
        array = weight_table.convert(value, weight.axes, weight.keras_hub_axes, sizes)
        # A float32 array; `assign` casts it to the variable's dtype.
        variables[path].assign(np.asarray(array, dtype="float32"))
    return target


def export_to_keras_hub(
    causal_lm, preset_dir, dtype="float32", max_shard_size=5, overwrite=False
):
    """Write `causal_lm` as a KerasHub `GemmaCausalLM` preset, atomically.

    The preset loads with `keras_hub.models.GemmaCausalLM.from_preset` (and
    with `Gemma2CausalLM.from_preset`). The tokenizer and preprocessor
    settings (`sequence_length`, `add_start_token`, `add_end_token`) come
    along when `causal_lm` has a preprocessor.

    Args:
        causal_lm: a `Gemma2CausalLM`.
        preset_dir: string. Directory to write.
        dtype: string. `"float32"` or `"bfloat16"` weights. Defaults to
            `"float32"`.
        max_shard_size: float. Weight files are split past this many GB.
            Defaults to `5`.
        overwrite: bool. Replace an existing `preset_dir`. Defaults to
            `False`.

    Raises:
        ValueError: KerasHub cannot compute the model exactly (e.g. the 27B's
            query scaling); nothing is written.

    Example:

    ```python
    causal_lm = Gemma2CausalLM.from_preset("/path/to/gemma-2-2b")
    export_to_keras_hub(causal_lm, "./gemma2_2b_keras_hub")
    keras_hub.models.GemmaCausalLM.from_preset("./gemma2_2b_keras_hub")
    ```
    """
    # Checked before anything is built or written.
    keras_hub_backbone_arguments(causal_lm.backbone)
    _check_no_lora(causal_lm.backbone)
    backbone = to_keras_hub_backbone(causal_lm.backbone, dtype=dtype)
    preprocessor = None
    ours = causal_lm.preprocessor
    if ours is not None:
        tokenizer = keras_hub.models.GemmaTokenizer(proto=ours.tokenizer.proto)
        preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
            tokenizer,
            sequence_length=ours.sequence_length,
            add_start_token=ours.add_start_token,
            add_end_token=ours.add_end_token,
        )
    task = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    with atomic_directory(preset_dir, overwrite=overwrite) as staging:
        task.save_to_preset(staging, max_shard_size=max_shard_size)
