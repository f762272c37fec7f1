"""Old import path of the attention core, which now lives in `attention_*` modules.

Kept only so that importers not yet moved keep working: each name below
resolves, on first access, to the module that now holds it. Import from
those modules instead, and delete this file once nothing imports it.
"""

import importlib

_MOVED_TO = {
    "ATTENTION_IMPLEMENTATIONS": "attention_dispatch",
    "attention": "attention_dispatch",
    "choose_implementation": "attention_dispatch",
    "validate_attention_implementation": "attention_dispatch",
    "FLEX_MIN_LENGTH": "attention_policy",
    "GLOBAL_BLOCK_SIZE": "attention_policy",
    "default_block_size": "attention_policy",
    "MASKED_LOGIT": "attention_probabilities",
    "masked_probabilities": "attention_probabilities",
    "reference_attention": "attention_reference",
    "blocked_attention": "attention_blocked",
    "blocked_pays_off": "attention_blocked",
    "causal_blocked_attention": "attention_causal_blocked",
    "fused_attention": "attention_fused",
}


def __getattr__(name):
    if name not in _MOVED_TO:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"keras_gemma2.layers.{_MOVED_TO[name]}")
    return getattr(module, name)


def __dir__():
    return sorted(_MOVED_TO)
