"""Gemma 2 in Keras 3, on JAX, TensorFlow and PyTorch.

`import keras_gemma2` imports the public API below (and so Keras and
KerasHub), which registers the classes for `keras.models.load_model`.
Inside the `keras-gemma2` command the names load on first use instead: the
command picks the Keras backend, its logging and its compilation cache
before Keras is imported, and `keras-gemma2 --help` imports no Keras at all.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

# Public name -> the subpackage that defines it.
_PUBLIC = {
    "Gemma2DecoderBlock": "keras_gemma2.layers",
    "Gemma2FeedForward": "keras_gemma2.layers",
    "Gemma2RMSNormalization": "keras_gemma2.layers",
    "SlidingWindowAttention": "keras_gemma2.layers",
    "SoftCap": "keras_gemma2.layers",
    "SoftCappedDense": "keras_gemma2.layers",
    "soft_cap": "keras_gemma2.layers",
    "PRESET_CONFIGS": "keras_gemma2.models",
    "Gemma2Backbone": "keras_gemma2.models",
    "Gemma2CausalLM": "keras_gemma2.models",
    "Gemma2CausalLMPreprocessor": "keras_gemma2.models",
    "Gemma2Tokenizer": "keras_gemma2.models",
    "format_chat": "keras_gemma2.models",
    "format_chat_segments": "keras_gemma2.models",
    "get_preset_config": "keras_gemma2.models",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    """Import a public name on first use (inside the `keras-gemma2` command)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'keras_gemma2' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


def _is_cli_process(argv):
    """Whether `argv` (`sys.orig_argv`) starts the `keras-gemma2` command.

    Either its console script or `python [options] -m keras_gemma2.cli`.

    >>> _is_cli_process(["python", "-X", "importtime", "-m", "keras_gemma2.cli"])
    True
    >>> _is_cli_process(["/venv/bin/python", "/venv/bin/keras-gemma2", "--help"])
    True
    >>> _is_cli_process(["python", "-m", "pytest", "keras-gemma2"])
    False
    """
    words = iter(argv[1:])
    for word in words:
        if word in ("-X", "-W", "--check-hash-based-pycs"):
            next(words, None)  # the option's value
        elif word == "-m":
            return next(words, None) == "keras_gemma2.cli"
        elif word in ("-c", "-"):
            return False
        elif not word.startswith("-"):
            name = os.path.basename(word).lower()
            name = name.removesuffix(".exe").removesuffix("-script.py")
            return name == "keras-gemma2"
    return False


if not _is_cli_process(getattr(sys, "orig_argv", ())):
    import keras as _keras

    from keras_gemma2.generation.host_memory import keep_freed_host_memory

    # Before anything runs on JAX: XLA's worker threads take their malloc
    # arenas on their first allocation (generation/host_memory.py).
    keep_freed_host_memory(_keras.config.backend())
    del _keras, keep_freed_host_memory
    for _name in _PUBLIC:
        __getattr__(_name)
    del _name
