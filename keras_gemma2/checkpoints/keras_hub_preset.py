"""Load a KerasHub / Kaggle Gemma 2 preset directory into `Gemma2Backbone`.

Such a directory holds `config.json` (a serialized
`keras_hub>GemmaBackbone`, or `keras_nlp>GemmaBackbone` in presets saved
before the rename) and `model.weights.h5` (or `model.weights.json` with
shards). KerasHub describes Gemma 1 and Gemma 2 with the same class; the
Gemma 2 settings are `use_post_attention_norm`, `use_post_ffw_norm` and
`use_sliding_window_attention`, all `True`.

Weights are streamed from the file one tensor at a time (memory holds one
tensor beyond our model), not loaded into a KerasHub model first.
"""

import json
import os

import keras
import keras_hub

from keras_gemma2.checkpoints import keras_h5_weights
from keras_gemma2.checkpoints.finite_check import check_finite
from keras_gemma2.checkpoints.hf_checkpoint import as_assignable, build_for_loading
from keras_gemma2.checkpoints.unallocated import (
    fill,
    forget_pending,
    pending_set_aside,
)
from keras_gemma2.models import weight_table
from keras_gemma2.models.json_file import read_json

CONFIG_FILE = "config.json"
_CLASS_NAMES = ("keras_hub>GemmaBackbone", "keras_nlp>GemmaBackbone")
TOKENIZER_CONFIG_FILE = "tokenizer.json"
TOKENIZER_VOCABULARY_FILE = ("assets", "tokenizer", "vocabulary.spm")
_TOKENIZER_NAMES = ("keras_hub>GemmaTokenizer", "keras_nlp>GemmaTokenizer")
_GEMMA2_FLAGS = (
    "use_post_attention_norm",
    "use_post_ffw_norm",
    "use_sliding_window_attention",
)
_REQUIRED_KEYS = (
    "vocabulary_size",
    "num_layers",
    "num_query_heads",
    "num_key_value_heads",
    "hidden_dim",
    "intermediate_dim",
    "head_dim",
)
# KerasHub `GemmaBackbone` constructor defaults, for keys a config leaves out.
_KERAS_HUB_DEFAULTS = {
    "query_head_dim_normalize": True,
    "attention_logit_soft_cap": None,
    "final_logit_soft_cap": None,
    "sliding_window_size": 4096,
    "layer_norm_epsilon": 1e-6,
    "dropout": 0.0,
}
# KerasHub's Gemma attention hard-codes RoPE's max wavelength.
_ROPE_MAX_WAVELENGTH = 10000.0
# Preset dtype policies passed on to our backbone; others (float16 overflows
# on Gemma 2) fall back to the Keras default unless `dtype=` is given.
_KEPT_DTYPES = ("float32", "bfloat16", "mixed_bfloat16")


def _check_directory(directory):
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            "Received an invalid value for `directory`, expected a string or "
            f"path. Received: directory={directory!r}"
        )
    return os.fspath(directory)


def _class_name(config):
    registered = config.get("registered_name")
    if registered:
        return registered
    module = config.get("module") or ""
    return f"{module.split('.')[0]}>{config.get('class_name')}"


def is_keras_hub_gemma_preset(directory):
    """True when `directory` holds a KerasHub/Kaggle `GemmaBackbone` preset.

    Gemma 1 presets count too (same class): `load_keras_hub_backbone` then
    refuses them with an error that says why.

    Args:
        directory: string or path. A local directory.

    Example:

    >>> is_keras_hub_gemma_preset("/no/such/directory")
    False
    """
    directory = _check_directory(directory)
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as file:
            config = json.load(file)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and _class_name(config) in _CLASS_NAMES


def keras_hub_tokenizer_file(directory):
    """Path of the SentencePiece model of a KerasHub Gemma preset, or `None`.

    KerasHub saves its `GemmaTokenizer` as `tokenizer.json` (a Keras config,
    not an HF fast tokenizer) plus `assets/tokenizer/vocabulary.spm`, the
    SentencePiece model bytes that a `SentencePieceTokenizer(proto=...)`
    takes.

    Args:
        directory: string or path. A local preset directory.

    Example:

    >>> keras_hub_tokenizer_file("/no/such/directory") is None
    True
    """
    directory = _check_directory(directory)
    try:
        with open(os.path.join(directory, TOKENIZER_CONFIG_FILE)) as file:
            config = json.load(file)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or _class_name(config) not in _TOKENIZER_NAMES:
        return None
    path = os.path.join(directory, *TOKENIZER_VOCABULARY_FILE)
    return path if os.path.isfile(path) else None


def read_keras_hub_config(directory):
    """Return the raw KerasHub `GemmaBackbone` config of a Gemma 2 preset.

    Raises:
        FileNotFoundError: no `config.json` in `directory`.
        ValueError: the file is not JSON, describes another class, lacks a
            required key, or describes a Gemma 1 model.
    """
    directory = _check_directory(directory)
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in the KerasHub preset directory {directory}."
        )
    serialized = read_json(path)
    name = _class_name(serialized) if isinstance(serialized, dict) else None
    if name not in _CLASS_NAMES:
        raise ValueError(
            f"{path} describes {name!r}; expected one of {list(_CLASS_NAMES)} "
            "(a KerasHub/Kaggle Gemma preset)."
        )
    config = serialized.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{path} has no `config` object.")
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"{path} lacks the required keys {missing}.")
    flags = {flag: bool(config.get(flag, False)) for flag in _GEMMA2_FLAGS}
    if not all(flags.values()):
        settings = ", ".join(f"{flag}={value}" for flag, value in flags.items())
        kind = "a Gemma 1 model" if not any(flags.values()) else "no Gemma 2 model"
        raise ValueError(
            f"{path} describes {kind} ({settings}); Gemma2Backbone needs all "
            f"three set to True. Load Gemma 1 presets with "
            "keras_hub.models.GemmaBackbone.from_preset instead."
        )
    if config["intermediate_dim"] % 2:
        raise ValueError(
            f"{path} has intermediate_dim={config['intermediate_dim']}; KerasHub "
            "counts both GeGLU branches, so it must be even."
        )
    return {**_KERAS_HUB_DEFAULTS, **config}


def backbone_arguments(config):
    """Map a raw KerasHub Gemma 2 config to `Gemma2Backbone` arguments.

    - `intermediate_dim`: KerasHub counts both GeGLU branches (each of its
      `ffw_gating` kernels is `[hidden, intermediate_dim // 2]`); ours is the
      width of one branch (HF `intermediate_size`), so it is halved.
    - `query_pre_attn_scalar`: `query_head_dim_normalize=True` means
      `head_dim`; `False` means `hidden_dim // num_query_heads` (KerasHub's
      definition; the 27B's 144). KerasHub 0.32's decoder block ignores the
      flag and always uses `head_dim`; we honour it, as HF does.
    - `layer_norm_epsilon` reaches all our norms (KerasHub's blocks ignore it
      and use 1e-6; every released preset uses 1e-6).
    - `rope_max_wavelength` is 10000, hard-coded in KerasHub.
    - `dtype`: the preset's policy when it is float32 or bfloat16.

    Args:
        config: dict. The `config` of a KerasHub `GemmaBackbone`, as returned
            by `read_keras_hub_config`.
    """
    if config["query_head_dim_normalize"]:
        scalar = config["head_dim"]
    else:
        scalar = config["hidden_dim"] // config["num_query_heads"]
    arguments = {
        "vocabulary_size": config["vocabulary_size"],
        "num_layers": config["num_layers"],
        "num_query_heads": config["num_query_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "hidden_dim": config["hidden_dim"],
        "intermediate_dim": config["intermediate_dim"] // 2,
        "head_dim": config["head_dim"],
        "query_pre_attn_scalar": scalar,
        "attention_logit_soft_cap": config["attention_logit_soft_cap"],
        "final_logit_soft_cap": config["final_logit_soft_cap"],
        "sliding_window_size": config["sliding_window_size"],
        "layer_norm_epsilon": config["layer_norm_epsilon"],
        "rope_max_wavelength": _ROPE_MAX_WAVELENGTH,
        "dropout": config["dropout"],
    }
    dtype = _policy_name(config.get("dtype"))
    if dtype in _KEPT_DTYPES:
        arguments["dtype"] = dtype
    return arguments


def keras_hub_backbone_config(directory):
    """`Gemma2Backbone` arguments of a KerasHub/Kaggle Gemma 2 preset directory.

    `backbone_arguments(read_keras_hub_config(directory))`: raises like
    `read_keras_hub_config` (Gemma 1 presets included).

    Args:
        directory: string or path. A local preset directory.
    """
    return backbone_arguments(read_keras_hub_config(directory))


def _policy_name(dtype):
    """`"bfloat16"` from `"bfloat16"` or a serialized `DTypePolicy` dict."""
    if isinstance(dtype, str):
        return dtype
    if isinstance(dtype, dict):
        config = dtype.get("config")
        if isinstance(config, dict) and isinstance(config.get("name"), str):
            return config["name"]
    return None


def keras_hub_weight_plan(backbone):
    """List `(keras_hub_path, weight, variable, keras_hub_shape)` per weight.

    `keras_hub_path` is the variable's path in a KerasHub `GemmaBackbone`
    (e.g. `decoder_block_0/attention/query/kernel`); `weight` is the row of
    `keras_gemma2.models.weight_table` describing it, whose
    `keras_hub_axes` give the KerasHub layout.
    """
    return weight_table.checkpoint_plan(backbone, "keras_hub")


def _probe_layout(config):
    """`keras_h5_weights.probe_layout` of a KerasHub backbone like the preset's.

    The probe is built apart from the backbone being loaded:
    - with the loaded backbone's unallocated variables set aside
      (`unallocated.pending_set_aside`): building a Keras model closes
      `StatelessScope`s, and each would initialise them at random before
      the load, outside any layout the load gives them;
    - outside the caller's `keras.distribution`: a `ModelParallel` would
      lay the probe's 2-wide kernels out on its mesh, where the model axis
      does not divide them.
    """
    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        with pending_set_aside():
            return keras_h5_weights.probe_layout(_layout_probe(config))
    finally:
        keras.distribution.set_distribution(current)


def _layout_probe(config):
    """A float32 KerasHub `GemmaBackbone` with the preset's structure, tiny sizes."""
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=2,
        num_layers=config["num_layers"],
        num_query_heads=1,
        num_key_value_heads=1,
        hidden_dim=2,
        intermediate_dim=2,
        head_dim=2,
        query_head_dim_normalize=config["query_head_dim_normalize"],
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=config["attention_logit_soft_cap"],
        final_logit_soft_cap=config["final_logit_soft_cap"],
        use_sliding_window_attention=True,
        sliding_window_size=config["sliding_window_size"],
        dtype="float32",
    )


def load_keras_hub_weights(
    backbone, directory, progress=None, check_finite_values=True
):
    """Check every tensor of a KerasHub Gemma 2 preset, then assign them.

    Names, shapes and files are all checked before the first assignment, so
    a bad preset raises without touching `backbone`'s weights. Tensors are
    read and assigned one at a time.

    Args:
        backbone: a built `Gemma2Backbone` whose config matches the preset.
        directory: string. The preset directory.
        progress: optional callable `progress(done, total, name)` called after
            each tensor.
        check_finite_values: bool. Refuse a tensor holding NaN or Inf with a
            `ValueError` naming its dataset and file, as it is read (before
            it is assigned); `backbone` is then partly filled and must be
            discarded. Defaults to `True`.
    """
    try:
        _load_keras_hub_weights(backbone, directory, progress, check_finite_values)
    finally:
        # A backbone from `build_for_loading`: loaded or discarded now.
        forget_pending(backbone.weights)


def _load_keras_hub_weights(backbone, directory, progress, check_finite_values):
    """`load_keras_hub_weights` without the pending-variable cleanup."""
    directory = _check_directory(directory)
    config = read_keras_hub_config(directory)
    plan = keras_hub_weight_plan(backbone)
    sizes = weight_table.dimensions(backbone)
    tensors = keras_h5_weights.index_weights(directory)
    layout = _probe_layout(config)
    planned = [path for path, *_ in plan]
    if sorted(layout) != sorted(planned):
        # KerasHub's GemmaBackbone no longer has the variables this module maps.
        changed = sorted(set(layout) ^ set(planned))
        raise ValueError(
            "keras_hub.models.GemmaBackbone's variables differ from those "
            f"keras_gemma2 maps (e.g. `{changed[0]}`); keras_hub "
            f"{keras_hub.__version__} is not supported by this loader."
        )
    unexpected = sorted(set(tensors) - set(layout.values()))
    if unexpected:
        name = unexpected[0]
        raise ValueError(
            f"Unexpected dataset `{name}` in {tensors[name].path}: it has no place "
            "in a Gemma 2 GemmaBackbone with "
            f"num_layers={config['num_layers']} (a quantized or modified preset?)."
        )
    for path, _, _, shape in plan:
        dataset = layout[path]
        if dataset not in tensors:
            raise ValueError(
                f"The preset in {directory} lacks the weights of `{path}` "
                f"(dataset `{dataset}`)."
            )
        stored = tensors[dataset].shape
        if stored != shape:
            raise ValueError(
                f"The weights of `{path}` (dataset `{dataset}` in "
                f"{tensors[dataset].path}) have shape {stored}; expected {shape} "
                f"from {CONFIG_FILE}."
            )
    for done, (path, weight, variable, _) in enumerate(plan, start=1):
        tensor = tensors[layout[path]]
        array = tensor.read()
        if check_finite_values:
            check_finite(array, f"{tensor.dataset}` (`{path}", tensor.path)
        array = weight_table.convert(array, weight.keras_hub_axes, weight.axes, sizes)
        fill(variable, as_assignable(array, variable.dtype))
        del array
        if progress is not None:
            progress(done, len(plan), path)


def load_keras_hub_backbone(
    backbone_cls,
    directory,
    load_weights=True,
    progress=None,
    check_finite_values=True,
    **overrides,
):
    """Build `backbone_cls` from a local KerasHub/Kaggle Gemma 2 preset.

    The preset's `GemmaBackbone` config is mapped to our arguments (see
    `backbone_arguments`; notably `intermediate_dim` is halved and
    `query_head_dim_normalize` becomes `query_pre_attn_scalar`), then the
    weights are streamed in. Gemma 1 presets are refused with a
    `ValueError`.

    Args:
        backbone_cls: `Gemma2Backbone` or a subclass.
        directory: string. A local preset directory (`config.json` and
            `model.weights.h5`, or `model.weights.json` with shards).
        load_weights: bool. Load the weights; if `False` they stay randomly
            initialised. Defaults to `True`.
        progress: optional callable `progress(done, total, name)` called after
            each tensor.
        check_finite_values: bool. Raise a `ValueError` naming the dataset
            and file of a tensor holding NaN or Inf (no backbone is
            returned). Defaults to `True`.
        **overrides: constructor arguments replacing the preset's, e.g.
            `dtype="bfloat16"`.

    Example:

    ```python
    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM

    backbone = load_keras_hub_backbone(Gemma2Backbone, "/kaggle/input/gemma2_2b_en")
    causal_lm = Gemma2CausalLM(backbone)
    ```
    """
    directory = _check_directory(directory)
    config = {**keras_hub_backbone_config(directory), **overrides}
    if not load_weights:
        return backbone_cls(**config)
    # On JAX, no random initial weights are allocated: the load fills them.
    backbone = build_for_loading(backbone_cls, config)
    load_keras_hub_weights(
        backbone,
        directory,
        progress=progress,
        check_finite_values=check_finite_values,
    )
    return backbone
