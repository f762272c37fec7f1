"""Export a Gemma 2 model as a Hugging Face `transformers` checkpoint.

The directory written loads with `transformers.AutoModelForCausalLM
.from_pretrained(directory)` (as `Gemma2ForCausalLM`) and, when a tokenizer is
exported, `transformers.AutoTokenizer.from_pretrained(directory)` (as
`GemmaTokenizer`). Tensor names and layouts come from
`keras_gemma2.models.weight_table`, the table the HF loader reads too.
"""

import json
import os

import keras_hub
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from keras_gemma2.checkpoints.atomic import atomic_directory
from keras_gemma2.checkpoints.hf_checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_WEIGHTS_FILE,
)
from keras_gemma2.models import weight_table
from keras_gemma2.models.architecture import layer_is_local
from keras_gemma2.models.backbone import Gemma2Backbone
from keras_gemma2.models.quantization import float_weight

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# Matches the `keras-gemma2 convert --max-shard-gb 5` default.
DEFAULT_MAX_SHARD_SIZE_BYTES = 5 * 2**30
# Gemma 2's context length; HF needs a value, our backbone has no limit.
MAX_POSITION_EMBEDDINGS = 8192
_NUMPY_DTYPES = {
    "float32": np.dtype("float32"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
# Gemma's ids when no tokenizer says otherwise.
_DEFAULT_SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2}
_DEFAULT_PIECES = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}
_TOKENIZER_ATTRIBUTES = {"bos": "start_token", "eos": "end_token", "pad": "pad_token"}
_TURN_PIECES = ("<start_of_turn>", "<end_of_turn>")
# The chat template of Google's Gemma 2 instruction checkpoints: no system
# role, roles alternate, "assistant" is written "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim "
    "+ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def _number(value):
    """`144` for `144.0`: HF configs hold ints where the value is integral."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_dtype(dtype, backbone):
    if dtype is None:
        variable_dtype = backbone.dtype_policy.variable_dtype
        return variable_dtype if variable_dtype in _NUMPY_DTYPES else "float32"
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(
            "Received an invalid value for `dtype`, expected one of "
            f"{sorted(_NUMPY_DTYPES)} or None (float16 overflows on Gemma 2). "
            f"Received: dtype={dtype!r}"
        )
    return dtype


def transformers_config(backbone, dtype="float32", special_token_ids=None):
    """Return the HF `Gemma2Config` dict (`config.json`) describing `backbone`.

    Args:
        backbone: `Gemma2Backbone`.
        dtype: string. `"float32"` or `"bfloat16"`, the stored dtype.
        special_token_ids: optional dict with keys `"bos"`, `"eos"`, `"pad"`.
            Defaults to Gemma's `{"bos": 2, "eos": 1, "pad": 0}`.
    """
    ids = {**_DEFAULT_SPECIAL_IDS, **(special_token_ids or {})}
    rope_theta = float(backbone.rope_max_wavelength)
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": backbone.vocabulary_size,
        "hidden_size": backbone.hidden_dim,
        "intermediate_size": backbone.intermediate_dim,
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads,
        "head_dim": backbone.head_dim,
        "query_pre_attn_scalar": _number(backbone.query_pre_attn_scalar),
        "sliding_window": backbone.sliding_window_size,
        "layer_types": [
            "sliding_attention" if layer_is_local(i) else "full_attention"
            for i in range(backbone.num_layers)
        ],
        "attn_logit_softcapping": backbone.attention_logit_soft_cap,
        "final_logit_softcapping": backbone.final_logit_soft_cap,
        "rms_norm_eps": backbone.layer_norm_epsilon,
        # transformers >= 5 reads `rope_parameters`; 4.x reads `rope_theta`.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": backbone.dropout,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def transformers_tensors(backbone, dtype="float32"):
    """Yield `(hf_name, array)` for every weight, one at a time, in HF layout.

    Args:
        backbone: `Gemma2Backbone`.
        dtype: string. `"float32"` or `"bfloat16"`.
    """
    numpy_dtype = _NUMPY_DTYPES[_check_dtype(dtype, backbone)]
    sizes = weight_table.dimensions(backbone)
    for weight, layer, owner in weight_table.model_weights(backbone):
        # Quantized layers are dequantized, one tensor at a time.
        value = float_weight(weight, owner)
        array = weight_table.convert(value, weight.axes, weight.hf_axes, sizes)
        yield weight.hf_name(layer), np.ascontiguousarray(array.astype(numpy_dtype))


def _shard_names(backbone, itemsize, max_shard_size_bytes):
    """Group the tensor names into shards of at most `max_shard_size_bytes`.

    A tensor larger than the limit gets a shard of its own.
    """
    shards, current, current_size = [], [], 0
    sizes = weight_table.dimensions(backbone)
    for weight, layer, _ in weight_table.model_weights(backbone):
        name = weight.hf_name(layer)
        shape = weight_table.shape(weight.hf_axes, sizes)
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        if current and current_size + size > max_shard_size_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    shards.append(current)
    return shards


def _write_json(path, value):
    with open(path, "w") as file:
        json.dump(value, file, indent=2)
        file.write("\n")


def _write_weights(backbone, directory, dtype, max_shard_size_bytes):
    """Write `model.safetensors`, or numbered shards and their index."""
    itemsize = _NUMPY_DTYPES[dtype].itemsize
    shards = _shard_names(backbone, itemsize, max_shard_size_bytes)
    if len(shards) == 1:
        files = [SINGLE_WEIGHTS_FILE]
    else:
        files = [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            for i in range(1, len(shards) + 1)
        ]
    weight_map, total_size = {}, 0
    tensors = transformers_tensors(backbone, dtype)
    for names, file in zip(shards, files, strict=True):
        shard = {}
        for expected in names:
            name, array = next(tensors)
            # Both walk `model_weights` in order; a mismatch is a bug here.
            if name != expected:
                raise RuntimeError(f"Shard plan out of order: {name} != {expected}")
            shard[name] = array
            weight_map[name] = file
            total_size += array.nbytes
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        del shard
    if len(files) > 1:
        _write_json(
            os.path.join(directory, INDEX_FILE),
            {"metadata": {"total_size": total_size}, "weight_map": weight_map},
        )


def exported_backbone(causal_lm):
    """The `Gemma2Backbone` of the model an exporter was given, or `TypeError`."""
    backbone = getattr(causal_lm, "backbone", causal_lm)
    if not isinstance(backbone, Gemma2Backbone):
        raise TypeError(
            "Received an invalid value for `causal_lm`, expected a "
            "`Gemma2CausalLM` or `Gemma2Backbone`. "
            f"Received: causal_lm={type(causal_lm).__name__}"
        )
    return backbone


def _find_tokenizer(causal_lm, tokenizer):
    """The tokenizer to export: the argument, else the model's preprocessor's."""
    if tokenizer is None:
        preprocessor = getattr(causal_lm, "preprocessor", None)
        tokenizer = getattr(preprocessor, "tokenizer", None)
        if tokenizer is None:
            return None
    if not isinstance(tokenizer, keras_hub.tokenizers.SentencePieceTokenizer):
        raise TypeError(
            "Received an invalid value for `tokenizer`, expected a "
            "`keras_hub.tokenizers.SentencePieceTokenizer` (e.g. Gemma2Tokenizer) "
            f"or None. Received: tokenizer={type(tokenizer).__name__}"
        )
    if not isinstance(tokenizer.proto, bytes) or not tokenizer.proto:
        raise ValueError(
            "Received a `tokenizer` without a SentencePiece model: its `proto` is "
            f"{type(tokenizer.proto).__name__}, expected the model's bytes. "
            "Construct it with `proto=` (bytes or a .model file path)."
        )
    return tokenizer


class _TokenizerSpec:
    """The special pieces and ids of a SentencePiece tokenizer, checked."""

    def __init__(self, tokenizer, vocabulary_size):
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.proto)
        size = processor.get_piece_size()
        if size > vocabulary_size:
            raise ValueError(
                f"Received a `tokenizer` with {size} pieces for a model with "
                f"vocabulary_size={vocabulary_size}: ids past the embedding would "
                "have no row. Expected at most vocabulary_size pieces."
            )

        def piece_id(piece):
            index = processor.piece_to_id(piece)
            if processor.id_to_piece(index) != piece:
                return None
            return index

        self.pieces, self.ids = {}, {}
        for role, default in _DEFAULT_PIECES.items():
            # Gemma2Tokenizer names them like KerasHub: start/end/pad_token.
            piece = getattr(tokenizer, _TOKENIZER_ATTRIBUTES[role], None) or default
            index = piece_id(piece)
            if index is None:
                raise ValueError(
                    f"The `tokenizer`'s SentencePiece model has no {role} piece "
                    f"{piece!r}; expected Gemma's {_DEFAULT_PIECES}."
                )
            self.pieces[role], self.ids[role] = piece, index
        unk_id = processor.unk_id()
        self.unk = processor.id_to_piece(unk_id) if unk_id >= 0 else None
        self.mask = "<mask>" if piece_id("<mask>") is not None else None
        self.turns = all(piece_id(piece) is not None for piece in _TURN_PIECES)
        self.end_of_turn_id = piece_id(_TURN_PIECES[1]) if self.turns else None


def _write_tokenizer(tokenizer, spec, directory):
    with open(os.path.join(directory, TOKENIZER_MODEL_FILE), "wb") as file:
        file.write(tokenizer.proto)
    special = {
        "bos_token": spec.pieces["bos"],
        "eos_token": spec.pieces["eos"],
        "pad_token": spec.pieces["pad"],
        "unk_token": spec.unk,
    }
    if spec.mask is not None:
        special["mask_token"] = spec.mask
    if spec.turns:
        special["additional_special_tokens"] = list(_TURN_PIECES)
    _write_json(os.path.join(directory, SPECIAL_TOKENS_MAP_FILE), special)
    config = {
        "tokenizer_class": "GemmaTokenizer",
        **special,
        # Without this, transformers adds a "<mask>" past the vocabulary.
        "mask_token": spec.mask,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "sp_model_kwargs": {},
    }
    if spec.turns:
        config["chat_template"] = GEMMA_CHAT_TEMPLATE
    _write_json(os.path.join(directory, TOKENIZER_CONFIG_FILE), config)


def export_to_transformers(
    causal_lm,
    directory,
    tokenizer=None,
    max_shard_size_bytes=DEFAULT_MAX_SHARD_SIZE_BYTES,
    dtype=None,
    overwrite=False,
):
    """Write `causal_lm` as a Hugging Face `Gemma2ForCausalLM` checkpoint.

    Writes `config.json`, `generation_config.json` and the weights as
    safetensors: `model.safetensors`, or `model-0000i-of-0000n.safetensors`
    shards with `model.safetensors.index.json` past `max_shard_size_bytes`.
    Weights are converted and written tensor by tensor, so memory holds one
    shard beyond the model. An int8- or int4-quantized model is written
    dequantized (`keras_gemma2.models.quantization.dequantize`): the float
    weights its quantized forward computes with, QLoRA adapters added.
    With a tokenizer it also writes `tokenizer.model`,
    `tokenizer_config.json` (with Gemma's chat template when the vocabulary
    has `<start_of_turn>`/`<end_of_turn>`) and `special_tokens_map.json`.

    Everything is written into a temporary sibling of `directory` and renamed
    into place at the end: a failure leaves neither a partial checkpoint nor
    the temporary directory.

    Args:
        causal_lm: `Gemma2CausalLM` (or a bare `Gemma2Backbone`).
        directory: string. Destination directory.
        tokenizer: optional `keras_hub.tokenizers.SentencePieceTokenizer`
            (e.g. `Gemma2Tokenizer`). Defaults to the tokenizer of
            `causal_lm.preprocessor`, if any; without one no tokenizer files
            are written.
        max_shard_size_bytes: int. Largest size of one weights file in
            bytes; a tensor larger than this gets a file of its own.
            Defaults to 5 GiB.
        dtype: string. `"float32"` or `"bfloat16"`. Defaults to the model's
            variable dtype (float32 if that is neither).
        overwrite: bool. Replace an existing `directory`. Defaults to `False`
            (an existing directory raises `FileExistsError`).

    Example:

    ```python
    causal_lm = Gemma2CausalLM.from_preset("/path/to/gemma2_2b_en")
    export_to_transformers(causal_lm, "/path/to/gemma-2-2b-hf", dtype="bfloat16")

    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        "/path/to/gemma-2-2b-hf", attn_implementation="eager")
    ```
    """
    backbone = exported_backbone(causal_lm)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            "Received an invalid value for `directory`, expected a string or "
            f"path. Received: directory={directory!r}"
        )
    if (
        isinstance(max_shard_size_bytes, bool)
        or not isinstance(max_shard_size_bytes, int)
        or max_shard_size_bytes <= 0
    ):
        raise ValueError(
            "Received an invalid value for `max_shard_size_bytes`, expected a "
            f"positive integer. Received: max_shard_size_bytes={max_shard_size_bytes!r}"
        )
    dtype = _check_dtype(dtype, backbone)
    tokenizer = _find_tokenizer(causal_lm, tokenizer)
    spec = None
    special_ids = dict(_DEFAULT_SPECIAL_IDS)
    if tokenizer is not None:
        spec = _TokenizerSpec(tokenizer, backbone.vocabulary_size)
        special_ids = spec.ids
    eos = special_ids["eos"]
    if spec is not None and spec.end_of_turn_id is not None:
        # Instruction-tuned Gemma ends its turns with <end_of_turn>.
        eos = [eos, spec.end_of_turn_id]

    with atomic_directory(directory, overwrite=overwrite) as staging:
        _write_json(
            os.path.join(staging, CONFIG_FILE),
            transformers_config(backbone, dtype, special_ids),
        )
        _write_json(
            os.path.join(staging, GENERATION_CONFIG_FILE),
            {
                "bos_token_id": special_ids["bos"],
                "eos_token_id": eos,
                "pad_token_id": special_ids["pad"],
            },
        )
        if spec is not None:
            _write_tokenizer(tokenizer, spec, staging)
        _write_weights(backbone, staging, dtype, max_shard_size_bytes)
