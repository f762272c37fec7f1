"""Resolve a preset handle to a local directory and load what it holds.

Three directory formats are recognised:

- `"keras_gemma2"`: saved by our `save_to_preset` (KerasHub's preset layout
  with our registered classes);
- `"keras_hub_gemma"`: a KerasHub / Kaggle `GemmaBackbone` preset with the
  Gemma 2 settings;
- `"transformers"`: a Hugging Face `config.json` + safetensors checkpoint.

A path to a `.gguf` file (llama.cpp's format) loads through
`keras_gemma2.checkpoints.gguf_import`.
"""

import contextlib
import json
import os

import keras
import keras_hub

from keras_gemma2.checkpoints import gguf_import, handles
from keras_gemma2.checkpoints.finite_check import (
    finite_check_enabled,
    store_check,
)
from keras_gemma2.checkpoints.hf_checkpoint import (
    build_for_loading,
    load_hf_weights,
    read_hf_config,
)
from keras_gemma2.checkpoints.unallocated import build_zero_initialized
from keras_gemma2.models.backbone import BACKBONE_CONSTRUCTION
from keras_gemma2.models.json_file import read_json
from keras_gemma2.models.presets import KERAS_HUB_PRESETS, bundled_presets
from keras_gemma2.models.quantization import (
    packed_int4_kernels,
    restore_quantization,
)

KERAS_GEMMA2 = "keras_gemma2"
KERAS_HUB_GEMMA = "keras_hub_gemma"
TRANSFORMERS = "transformers"


def resolve_preset(preset):
    """Return the local directory (or `.gguf` file) that `preset` names.

    Remote handles are downloaded first.
    """
    if not isinstance(preset, (str, os.PathLike)):
        raise TypeError(
            "Received an invalid value for `preset`, expected a string or path. "
            f"Received: preset={preset!r}"
        )
    preset = os.fspath(preset)
    if os.path.isdir(preset):
        return preset
    scheme, _ = handles.split_handle(preset)
    if scheme is not None:
        return handles.resolve_handle(preset)
    if gguf_import.is_gguf_file(preset):
        if not os.path.isfile(preset):
            raise FileNotFoundError(f"The GGUF file {preset} does not exist.")
        return preset
    bundled = bundled_presets()
    if preset in bundled:
        return bundled[preset]["path"]
    if preset in KERAS_HUB_PRESETS:
        # KerasHub's name (e.g. "gemma2_2b_en"): its Kaggle handle.
        return handles.resolve_keras_hub_preset(preset)
    if os.sep in preset or preset.startswith("."):
        raise FileNotFoundError(f"The preset directory {preset} does not exist.")
    raise ValueError(
        "Received an unknown preset. Expected a local preset directory, a handle "
        "('hf://owner/name', 'kaggle://owner/model/keras/variation/version') or a "
        f"bundled preset name {sorted(bundled)}, or a KerasHub Gemma 2 preset name "
        f"{sorted(KERAS_HUB_PRESETS)}. Received: preset={preset!r}"
    )


def preset_format(directory):
    """Name the format of a local preset directory, or raise `ValueError`."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"The directory {directory} is not a Gemma 2 preset: it has no config.json."
        )
    config = read_json(path)
    if "model_type" in config:
        return TRANSFORMERS
    registered = config.get("registered_name") or ""
    if config.get("module", "").startswith("keras_gemma2") or registered.startswith(
        "keras_gemma2>"
    ):
        return KERAS_GEMMA2
    if registered == "keras_hub>GemmaBackbone" or config.get("class_name") == (
        "GemmaBackbone"
    ):
        return KERAS_HUB_GEMMA
    raise ValueError(
        f"{path} describes neither a Hugging Face Gemma 2 checkpoint (no model_type) "
        "nor a KerasHub Gemma or keras_gemma2 preset (class "
        f"{config.get('class_name')!r})."
    )


def load_backbone(
    backbone_cls,
    preset,
    load_weights=True,
    progress=None,
    check_finite=None,
    **overrides,
):
    """Build `backbone_cls` from `preset` and load its weights.

    Args:
        backbone_cls: `Gemma2Backbone` or a subclass.
        preset: string. A local preset directory (any of the three formats),
            a `.gguf` file, a remote handle, or a bundled preset name.
        load_weights: bool. Load the preset's weights.
        progress: optional callable `progress(done, total, name)`, called per
            tensor when loading a Hugging Face checkpoint.
        check_finite: bool or `None`. Raise a `ValueError` naming the file and
            tensor when a weight holds NaN or Inf (no backbone is returned).
            `False` loads such weights anyway, for debugging a broken
            checkpoint; `None` follows the environment variable
            `KERAS_GEMMA2_CHECK_FINITE` (on unless it is `0`).
        **overrides: constructor arguments replacing the preset's (typically
            `dtype`).
    """
    check = finite_check_enabled(check_finite)
    directory = resolve_preset(preset)
    if gguf_import.is_gguf_file(directory):
        return gguf_import.load_gguf_backbone(
            backbone_cls,
            directory,
            load_weights=load_weights,
            progress=progress,
            check_finite_values=check,
            **overrides,
        )
    kind = preset_format(directory)
    if kind == TRANSFORMERS:
        config = {**read_hf_config(directory), **overrides}
        if not load_weights:
            return backbone_cls(**config)
        backbone = build_for_loading(backbone_cls, config)
        load_hf_weights(
            backbone, directory, progress=progress, check_finite_values=check
        )
        return backbone
    if kind == KERAS_HUB_GEMMA:
        from keras_gemma2.checkpoints.keras_hub_preset import load_keras_hub_backbone

        return load_keras_hub_backbone(
            backbone_cls,
            directory,
            load_weights=load_weights,
            progress=progress,
            check_finite_values=check,
            **overrides,
        )
    with _zero_initialized(load_weights):  # every weight is loaded next
        backbone = keras_hub.models.Backbone.from_preset.__func__(
            backbone_cls,
            directory,
            load_weights=False,
            **_keep_quantized_dtype(directory, overrides),
        )
    # A quantized preset: each layer its own policy, and the activation
    # scheme the causal LM recorded (a causal LM restores both itself).
    restore_quantization(backbone, _task_quantization(directory))
    if load_weights:
        with store_check(check):  # scanned before Keras assigns a value
            _load_preset_weights(backbone, directory)
    return backbone


@contextlib.contextmanager
def _zero_initialized(enabled):
    """Backbones built from a config in here start from zeros, not random.

    For one of our presets whose weights are loaded right after: drawing
    random initial values was about half of `gemma2_tiny_python`'s load
    (JAX compiles a program per shape for it), and the load replaces them.
    """
    if not enabled:
        yield
        return
    token = BACKBONE_CONSTRUCTION.set(build_zero_initialized)
    try:
        yield
    finally:
        BACKBONE_CONSTRUCTION.reset(token)


def _load_preset_weights(backbone, directory):
    """Load one of our presets' weights (one file or shards) into `backbone`.

    What KerasHub's loader does, with every int4 layer's `kernel` left
    packed while Keras walks the layers (see `packed_int4_kernels`): on a
    ~1 GB model, unpacking them there raised the int4 load's resident
    memory from 0.19 to 0.79 GB (torch).
    """
    with packed_int4_kernels(backbone):
        backbone.load_weights(_weights_file(directory))


def _keep_quantized_dtype(directory, overrides):
    """`overrides` with a quantized preset's saved dtypes as its `dtype`.

    A quantized preset's layers load in the dtypes they were saved with: its
    config holds a `DTypePolicyMap` (per layer: int8 or int4, and the float
    dtype it computes in). KerasHub's backbone loader replaced it with the
    caller's `dtype` (`None` when not given), built a float backbone, and
    the int8/int4 weights did not load ("expected 1 variables, but received
    0"); its task loader keeps it only when no `dtype` is given. A float
    preset's overrides are left to KerasHub.

    Raises:
        ValueError: `dtype` asks a quantized preset for another compute
            dtype than it was saved with.
    """
    saved = read_json(os.path.join(directory, "config.json"))["config"].get("dtype")
    if not (isinstance(saved, dict) and saved.get("class_name") == "DTypePolicyMap"):
        return overrides
    dtype = overrides.get("dtype")
    if dtype is not None:
        saved_dtype = keras.dtype_policies.deserialize(saved).compute_dtype
        if keras.dtype_policies.get(dtype).compute_dtype != saved_dtype:
            raise ValueError(
                f"Received dtype={dtype!r} for the quantized preset {directory}, "
                f"whose int8/int4 layers compute in {saved_dtype!r}: a quantized "
                "preset loads with the dtypes it was saved with. Load it without "
                "`dtype`, or quantize a model loaded with that dtype and save it."
            )
    return {**overrides, "dtype": saved}


def _task_quantization(directory):
    """The `quantize` record in the preset's `task.json`, or `None`."""
    path = os.path.join(directory, "task.json")
    if not os.path.isfile(path):
        return None
    return read_json(path).get("config", {}).get("quantization")


def load_causal_lm(
    causal_lm_cls,
    preset,
    load_weights=True,
    progress=None,
    check_finite=None,
    **kwargs,
):
    """Build `causal_lm_cls` (backbone and, when the preset has one, tokenizer).

    As in KerasHub, `preprocessor=` (when given, `None` included) replaces
    the preset's preprocessor; the other `kwargs` override backbone
    arguments (e.g. `dtype`). `check_finite` is `load_backbone`'s.
    """
    _check_preprocessor(causal_lm_cls, kwargs.get("preprocessor"))
    directory = resolve_preset(preset)
    if gguf_import.is_gguf_file(directory):
        return gguf_import.load_gguf_causal_lm(
            causal_lm_cls,
            directory,
            load_weights=load_weights,
            progress=progress,
            check_finite_values=finite_check_enabled(check_finite),
            **kwargs,
        )
    kind = preset_format(directory)
    if kind == KERAS_GEMMA2:
        kwargs = _keep_quantized_dtype(directory, kwargs)
        # KerasHub's task loader honours `preprocessor=` itself. A preset
        # without task weights gets its backbone weights from us.
        own_loading = load_weights and not os.path.isfile(
            os.path.join(directory, "task.weights.h5")
        )
        # NaN/Inf are refused before Keras assigns a value (the backbone's
        # `load_own_variables` scans its part of the weights file).
        check = store_check(finite_check_enabled(check_finite))
        # Every weight is loaded (by KerasHub or below).
        with check, _zero_initialized(load_weights):
            causal_lm = keras_hub.models.CausalLM.from_preset.__func__(
                causal_lm_cls,
                directory,
                load_weights=load_weights and not own_loading,
                **kwargs,
            )
            if own_loading:
                _load_preset_weights(causal_lm.backbone, directory)
        return causal_lm
    given = "preprocessor" in kwargs
    preprocessor = kwargs.pop("preprocessor", None)
    backbone = load_backbone(
        causal_lm_cls.backbone_cls,
        directory,
        load_weights=load_weights,
        progress=progress,
        check_finite=check_finite,
        **kwargs,
    )
    wanted = not given and causal_lm_cls.preprocessor_cls is not None
    if wanted and _has_tokenizer(directory):
        preprocessor = causal_lm_cls.preprocessor_cls.from_preset(directory)
    return causal_lm_cls(backbone=backbone, preprocessor=preprocessor)


def _check_preprocessor(causal_lm_cls, preprocessor):
    """Refuse a `preprocessor=` that is neither `None` nor a preprocessor."""
    if preprocessor is None or isinstance(
        preprocessor, keras_hub.models.CausalLMPreprocessor
    ):
        return
    raise TypeError(
        f"Received an invalid value for `preprocessor`, expected `None` or a "
        f"`keras_hub.models.CausalLMPreprocessor` (e.g. "
        f"{getattr(causal_lm_cls.preprocessor_cls, '__name__', 'one')}). "
        f"Received: preprocessor={preprocessor!r}"
    )


def _weights_file(directory):
    """The weights file (or shard index) of one of our presets, for messages."""
    for name in ("model.weights.json", "model.weights.h5"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return directory


def _has_tokenizer(directory):
    """A SentencePiece model (HF layout) or a Keras tokenizer config."""
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        return True
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as file:
            return "class_name" in json.load(file)  # HF's tokenizer.json has none
    except (OSError, ValueError):
        return False
