"""Architecture configs of every released Gemma 2 size, as data.

Numbers from the Gemma 2 paper (arXiv:2408.00118, Table 1) and the released
HF `config.json` files; the 27B's `query_pre_attn_scalar` is
`hidden_dim / num_query_heads = 144`, not `head_dim`.
"""

import copy
import json
import os

_COMMON = {
    "vocabulary_size": 256000,
    "attention_logit_soft_cap": 50.0,
    "final_logit_soft_cap": 30.0,
    "sliding_window_size": 4096,
    "layer_norm_epsilon": 1e-6,
    "rope_max_wavelength": 10000.0,
    "dropout": 0.0,
}

_SIZES = {
    "2b": {
        "num_layers": 26,
        "num_query_heads": 8,
        "num_key_value_heads": 4,
        "hidden_dim": 2304,
        "intermediate_dim": 9216,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
    },
    "9b": {
        "num_layers": 42,
        "num_query_heads": 16,
        "num_key_value_heads": 8,
        "hidden_dim": 3584,
        "intermediate_dim": 14336,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
    },
    "27b": {
        "num_layers": 46,
        "num_query_heads": 32,
        "num_key_value_heads": 16,
        "hidden_dim": 4608,
        "intermediate_dim": 36864,
        "head_dim": 128,
        "query_pre_attn_scalar": 144,
    },
}

PRESET_CONFIGS = {
    f"gemma2_{kind}{size}_en": {**_COMMON, **_SIZES[size]}
    for size in _SIZES
    for kind in ("", "instruct_")
}


# KerasHub's names of Gemma 2 presets -> (Kaggle handle, Hugging Face
# repository of the same weights or None). Handles as in keras_hub 0.32's
# registry (`keras_hub.models.GemmaCausalLM.presets`); a test compares them.
KERAS_HUB_PRESETS = {
    "gemma2_2b_en": ("kaggle://keras/gemma2/keras/gemma2_2b_en/2", "google/gemma-2-2b"),
    "gemma2_instruct_2b_en": (
        "kaggle://keras/gemma2/keras/gemma2_instruct_2b_en/2",
        "google/gemma-2-2b-it",
    ),
    "gemma2_9b_en": ("kaggle://keras/gemma2/keras/gemma2_9b_en/4", "google/gemma-2-9b"),
    "gemma2_instruct_9b_en": (
        "kaggle://keras/gemma2/keras/gemma2_instruct_9b_en/4",
        "google/gemma-2-9b-it",
    ),
    "gemma2_27b_en": (
        "kaggle://keras/gemma2/keras/gemma2_27b_en/3",
        "google/gemma-2-27b",
    ),
    "gemma2_instruct_27b_en": (
        "kaggle://keras/gemma2/keras/gemma2_instruct_27b_en/3",
        "google/gemma-2-27b-it",
    ),
    "shieldgemma_2b_en": (
        "kaggle://google/shieldgemma/keras/shieldgemma_2b_en/2",
        "google/shieldgemma-2b",
    ),
    "shieldgemma_9b_en": (
        "kaggle://google/shieldgemma/keras/shieldgemma_9b_en/2",
        "google/shieldgemma-9b",
    ),
    "shieldgemma_27b_en": (
        "kaggle://google/shieldgemma/keras/shieldgemma_27b_en/2",
        "google/shieldgemma-27b",
    ),
    "c2s_scale_gemma_2_2b_en": (
        "kaggle://keras/cell2sentence/keras/c2s_scale_gemma_2_2b_en/1",
        None,
    ),
    "c2s_scale_gemma_2_27b_en": (
        "kaggle://keras/cell2sentence/keras/c2s_scale_gemma_2_27b_en/1",
        None,
    ),
}


def keras_hub_preset_handle(name):
    """The Kaggle handle of KerasHub's Gemma 2 preset `name`, or `None`.

    Example:

    >>> keras_hub_preset_handle("gemma2_instruct_9b_en")
    'kaggle://keras/gemma2/keras/gemma2_instruct_9b_en/4'
    >>> keras_hub_preset_handle("gemma_2b_en") is None  # Gemma 1
    True
    """
    entry = KERAS_HUB_PRESETS.get(name)
    return None if entry is None else entry[0]


def get_preset_config(name):
    """Return a copy of the `Gemma2Backbone` arguments of preset `name`.

    Example:

    >>> get_preset_config("gemma2_27b_en")["query_pre_attn_scalar"]
    144
    """
    if name not in PRESET_CONFIGS:
        raise ValueError(
            "Received an unknown Gemma 2 preset name. Expected one of "
            f"{sorted(PRESET_CONFIGS)}. Received: preset={name!r}"
        )
    return copy.deepcopy(PRESET_CONFIGS[name])


# Presets shipped inside the package (trained by this project), one directory
# each under keras_gemma2/presets/, in our own preset format.
BUNDLED_PRESETS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "presets"
)


def bundled_presets():
    """`{name: {"path": directory, "metadata": dict}}` of the shipped presets."""
    presets = {}
    if not os.path.isdir(BUNDLED_PRESETS_DIR):
        return presets
    for name in sorted(os.listdir(BUNDLED_PRESETS_DIR)):
        directory = os.path.join(BUNDLED_PRESETS_DIR, name)
        metadata_path = os.path.join(directory, "metadata.json")
        if os.path.isfile(metadata_path):
            with open(metadata_path) as file:
                presets[name] = {"path": directory, "metadata": json.load(file)}
    return presets


class classproperty:  # noqa: N801 - named like the builtin decorators
    """A read-only property of the class (as `presets` is on KerasHub models)."""

    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)
