"""Gemma 2 in GGUF files: llama.cpp's `gemma2` tensor names, keys and layouts.

Both directions read this module: `gguf_export` (our weights -> GGUF) and
`gguf_import` (GGUF -> our weights). Each GGUF tensor is one row of
`keras_gemma2.models.weight_table`; its GGUF layout is the Hugging Face one
(a linear weight is the numpy array `[out, in]`, which GGUF records as
`ne = [in, out]`), and an RMS norm's weight is stored as the gain
`1 + scale` in float32, as llama.cpp's `gemma2` graph multiplies by it
directly. Queries and keys are not permuted (llama.cpp's NEOX RoPE matches
Gemma's half-split rotation).

Facts from llama.cpp (`src/llama-model.cpp`, the `gemma2` graph): the
attention and final soft caps are always applied (defaults 50 and 30 when
the keys are missing); even layers use the sliding window (default 4096);
queries are scaled by `1 / sqrt(head_dim)`, except in a 46-layer model
(the 27B), where the scale is `1 / sqrt(hidden // heads)` (integer
division). This module imports no GGUF library: names and keys are
strings.
"""

import numpy as np

from keras_gemma2.models import weight_table

ARCHITECTURE = "gemma2"

# === Metadata keys ===
GENERAL_ARCHITECTURE = "general.architecture"
GENERAL_NAME = "general.name"
GENERAL_FILE_TYPE = "general.file_type"
GENERAL_QUANTIZATION_VERSION = "general.quantization_version"

CONTEXT_LENGTH = "gemma2.context_length"
EMBEDDING_LENGTH = "gemma2.embedding_length"
BLOCK_COUNT = "gemma2.block_count"
FEED_FORWARD_LENGTH = "gemma2.feed_forward_length"
HEAD_COUNT = "gemma2.attention.head_count"
HEAD_COUNT_KV = "gemma2.attention.head_count_kv"
KEY_LENGTH = "gemma2.attention.key_length"
VALUE_LENGTH = "gemma2.attention.value_length"
RMS_EPSILON = "gemma2.attention.layer_norm_rms_epsilon"
SLIDING_WINDOW = "gemma2.attention.sliding_window"
ATTENTION_SOFT_CAP = "gemma2.attn_logit_softcapping"
FINAL_SOFT_CAP = "gemma2.final_logit_softcapping"
ROPE_FREQUENCY_BASE = "gemma2.rope.freq_base"

TOKENIZER_MODEL = "tokenizer.ggml.model"
TOKENIZER_PRE = "tokenizer.ggml.pre"
TOKENS = "tokenizer.ggml.tokens"
SCORES = "tokenizer.ggml.scores"
TOKEN_TYPES = "tokenizer.ggml.token_type"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
UNKNOWN_ID = "tokenizer.ggml.unknown_token_id"
PADDING_ID = "tokenizer.ggml.padding_token_id"
END_OF_TURN_ID = "tokenizer.ggml.eot_token_id"
ADD_BOS = "tokenizer.ggml.add_bos_token"
ADD_EOS = "tokenizer.ggml.add_eos_token"
ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
CHAT_TEMPLATE = "tokenizer.chat_template"

# `tokenizer.ggml.model` of a SentencePiece vocabulary.
SENTENCEPIECE_TOKENIZER = "llama"

# llama.cpp's token types (`llama_token_type`), written per token.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# `general.file_type` (llama.cpp's `llama_ftype`) per export dtype.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
# Gemma 2's context length, written as `gemma2.context_length`.
CONTEXT_LENGTH_VALUE = 8192
# Values llama.cpp's `gemma2` loader uses when a key is missing.
LLAMA_CPP_DEFAULTS = {
    SLIDING_WINDOW: 4096,
    ATTENTION_SOFT_CAP: 50.0,
    FINAL_SOFT_CAP: 30.0,
    ROPE_FREQUENCY_BASE: 10000.0,
}
# The only depth at which llama.cpp scales queries by `hidden // heads`.
LLAMA_CPP_27B_LAYERS = 46

# `(Gemma2Backbone argument, GGUF key, "int" | "float")`: the config a
# GGUF's metadata holds. `head_dim` is both key and value length.
HYPERPARAMETERS = (
    ("hidden_dim", EMBEDDING_LENGTH, "int"),
    ("num_layers", BLOCK_COUNT, "int"),
    ("intermediate_dim", FEED_FORWARD_LENGTH, "int"),
    ("num_query_heads", HEAD_COUNT, "int"),
    ("num_key_value_heads", HEAD_COUNT_KV, "int"),
    ("head_dim", KEY_LENGTH, "int"),
    ("head_dim", VALUE_LENGTH, "int"),
    ("layer_norm_epsilon", RMS_EPSILON, "float"),
    ("sliding_window_size", SLIDING_WINDOW, "int"),
    ("attention_logit_soft_cap", ATTENTION_SOFT_CAP, "float"),
    ("final_logit_soft_cap", FINAL_SOFT_CAP, "float"),
    ("rope_max_wavelength", ROPE_FREQUENCY_BASE, "float"),
)

# === Tensor names ===
# `weight_table` row name -> GGUF tensor name; `{layer}` is the block index.
TENSOR_NAMES = {
    "token_embedding": "token_embd.weight",
    "pre_attention_norm": "blk.{layer}.attn_norm.weight",
    "post_attention_norm": "blk.{layer}.post_attention_norm.weight",
    "pre_ffw_norm": "blk.{layer}.ffn_norm.weight",
    "post_ffw_norm": "blk.{layer}.post_ffw_norm.weight",
    "query": "blk.{layer}.attn_q.weight",
    "key": "blk.{layer}.attn_k.weight",
    "value": "blk.{layer}.attn_v.weight",
    "output": "blk.{layer}.attn_output.weight",
    "gate": "blk.{layer}.ffn_gate.weight",
    "up": "blk.{layer}.ffn_up.weight",
    "down": "blk.{layer}.ffn_down.weight",
    "final_norm": "output_norm.weight",
}
_ROWS = {
    row.name: row
    for row in (weight_table.EMBEDDING, *weight_table.BLOCK_WEIGHTS)
    + (weight_table.FINAL_NORM,)
}


def tensor_name(weight, layer=None):
    """The GGUF tensor name of a `weight_table` row, for block `layer`.

    Example:

    >>> from keras_gemma2.models import weight_table
    >>> tensor_name(weight_table.BLOCK_WEIGHTS[0], layer=3)
    'blk.3.attn_norm.weight'
    """
    return TENSOR_NAMES[weight.name].format(layer=layer)


def parse_tensor_name(name):
    """`(weight_table row, layer index or None)` of a GGUF tensor name.

    Returns `None` for a name that is not a Gemma 2 weight (e.g. llama.cpp's
    optional `rope_freqs.weight`).

    Example:

    >>> weight, layer = parse_tensor_name("blk.12.ffn_down.weight")
    >>> weight.name, layer
    ('down', 12)
    >>> parse_tensor_name("output.weight") is None
    True
    """
    for row_name, pattern in TENSOR_NAMES.items():
        if "{layer}" not in pattern:
            if name == pattern:
                return _ROWS[row_name], None
            continue
        prefix, suffix = pattern.split("{layer}")
        middle = name[len(prefix) : len(name) - len(suffix)]
        if (
            name.startswith(prefix)
            and name.endswith(suffix)
            and middle.isdigit()
            and str(int(middle)) == middle
        ):
            return _ROWS[row_name], int(middle)
    return None


def layout(weight):
    """The GGUF layout of `weight` (numpy axis order; `[out, in]` for linears)."""
    return weight.hf_axes


def norm_shift(weight):
    """What GGUF adds to our stored value: 1.0 for an RMS norm scale, else 0."""
    return 1.0 if weight.is_norm_scale else 0.0


def to_gguf(array, weight, sizes):
    """Our variable's value -> the float32 numpy array GGUF stores.

    Args:
        array: numpy array in our layout (`weight.axes`).
        weight: its `weight_table` row.
        sizes: `{axis name: size}` from `weight_table.dimensions`.

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.models import weight_table
    >>> to_gguf(np.array([0.0, -0.5]), weight_table.FINAL_NORM, {"hidden": 2})
    array([1. , 0.5], dtype=float32)
    """
    moved = weight_table.convert(
        np.asarray(array, dtype=np.float32), weight.axes, layout(weight), sizes
    )
    if weight.is_norm_scale:
        moved = moved + np.float32(1.0)
    return np.ascontiguousarray(moved, dtype=np.float32)


def from_gguf(array, weight, sizes):
    """A GGUF tensor (float, numpy `[out, in]`) -> our variable's layout.

    The inverse of `to_gguf`: norms lose the `+ 1`, axes move back.

    Args:
        array: numpy array in GGUF layout (`layout(weight)`), dequantized.
        weight: its `weight_table` row.
        sizes: `{axis name: size}` from `weight_table.dimensions`.

    Example:

    >>> import numpy as np
    >>> from keras_gemma2.models import weight_table
    >>> from_gguf(np.array([1.0, 0.5]), weight_table.FINAL_NORM, {"hidden": 2})
    array([ 0. , -0.5], dtype=float32)
    """
    value = np.asarray(array, dtype=np.float32)
    if weight.is_norm_scale:
        value = value - np.float32(1.0)
    return np.ascontiguousarray(
        weight_table.convert(value, layout(weight), weight.axes, sizes)
    )


def tensor_plan(backbone):
    """List `(gguf_name, weight, layer, owner, shape)` for every weight.

    In `weight_table.model_weights` order; `shape` is the numpy shape of the
    GGUF tensor and `weight.variable(owner)` our variable.

    Args:
        backbone: a built `Gemma2Backbone`.
    """
    sizes = weight_table.dimensions(backbone)
    return [
        (
            tensor_name(weight, layer),
            weight,
            layer,
            owner,
            weight_table.shape(layout(weight), sizes),
        )
        for weight, layer, owner in weight_table.model_weights(backbone)
    ]


def llama_cpp_query_pre_attn_scalar(num_layers, hidden_dim, num_query_heads, head_dim):
    """The `query_pre_attn_scalar` llama.cpp's `gemma2` graph computes with.

    `hidden_dim // num_query_heads` for a 46-layer model (the 27B), else
    `head_dim`; llama.cpp has no key for it.

    Example:

    >>> llama_cpp_query_pre_attn_scalar(46, 4608, 32, 128)
    144
    >>> llama_cpp_query_pre_attn_scalar(26, 2304, 8, 256)
    256
    """
    if num_layers == LLAMA_CPP_27B_LAYERS:
        return hidden_dim // num_query_heads
    return head_dim
