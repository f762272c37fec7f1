"""Resolve a preset handle to a built, loaded `Gemma2Backbone`."""

import os

from keras_gemma2.checkpoints.hf_checkpoint import (
    is_hf_checkpoint,
    load_hf_weights,
    read_hf_config,
)
from keras_gemma2.models.presets import PRESET_CONFIGS


def load_backbone(backbone_cls, preset, load_weights=True, **overrides):
    """Build `backbone_cls` from `preset` and load its weights.

    Args:
        backbone_cls: `Gemma2Backbone` or a subclass.
        preset: string. A local HF Gemma 2 checkpoint directory.
        load_weights: bool. Load the checkpoint's weights.
        **overrides: constructor arguments replacing the checkpoint's
            (typically `dtype`).
    """
    if not isinstance(preset, (str, os.PathLike)):
        raise TypeError(
            "Received an invalid value for `preset`, expected a string or path. "
            f"Received: preset={preset!r}"
        )
    preset = os.fspath(preset)
    if os.path.isdir(preset):
        if is_hf_checkpoint(preset):
            config = {**read_hf_config(preset), **overrides}
            backbone = backbone_cls(**config)
            if load_weights:
                load_hf_weights(backbone, preset)
            return backbone
        raise ValueError(
            f"The directory {preset} is not a Gemma 2 checkpoint: it has no "
            "config.json naming a model_type."
        )
    if preset in PRESET_CONFIGS:
        raise ValueError(
            f"The weights of {preset!r} are not bundled with keras_gemma2. Download "
            "the Hugging Face checkpoint (e.g. google/gemma-2-2b) and pass its "
            "local directory: Gemma2CausalLM.from_preset('/path/to/gemma-2-2b')."
        )
    if os.sep in preset or preset.startswith("."):
        raise FileNotFoundError(f"The preset directory {preset} does not exist.")
    raise ValueError(
        "Received an unknown preset. Expected a local Hugging Face Gemma 2 "
        f"checkpoint directory. Received: preset={preset!r}"
    )
