"""Export a Gemma 2 model as a GGUF file for llama.cpp and Ollama.

The file holds llama.cpp's `gemma2` architecture: the weights under the
names of `keras_gemma2.checkpoints.gguf_names`, the hyper-parameters as
`gemma2.*` keys and the SentencePiece vocabulary as `tokenizer.ggml.*`
keys. Beside it an Ollama `Modelfile` can be written (`FROM`, Gemma's turn
template, stop tokens, sampling defaults), so that
`ollama create NAME -f Modelfile && ollama run NAME` runs the model.
"""

import os

import keras
import numpy as np

from keras_gemma2.checkpoints import gguf_names
from keras_gemma2.checkpoints.atomic import atomic_file
from keras_gemma2.checkpoints.hf_export import (
    _TURN_PIECES,
    GEMMA_CHAT_TEMPLATE,
    _find_tokenizer,
    _TokenizerSpec,
    exported_backbone,
)
from keras_gemma2.models import weight_table
from keras_gemma2.models.quantization import float_weight

DTYPES = ("f32", "f16", "bf16", "q8_0")
MODELFILE_NAME = "Modelfile"
# Values one Q8_0 block covers, and its bytes (an fp16 scale, 32 int8 codes).
_Q8_0_BLOCK_VALUES = 32
_Q8_0_BLOCK_BYTES = 34
# Rows of a tensor converted at once: the write holds one chunk of this many
# float32 bytes beside the variable, never a whole converted copy of it.
_CHUNK_BYTES = 8 * 2**20
# The Gemma team's recommended sampling for its instruction-tuned models
# (temperature 1.0, top-k 64, top-p 0.95; Gemma 2 ships no sampling config).
SAMPLING_DEFAULTS = (("temperature", 1.0), ("top_k", 64), ("top_p", 0.95))
# Ollama's template for Gemma's turns (Go `text/template`). Gemma has no
# system role: a system message becomes a user turn. `<bos>` is not in it:
# llama.cpp adds it (`tokenizer.ggml.add_bos_token`).
OLLAMA_TEMPLATE = (
    "{{- range $i, $message := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    '{{- if eq $message.Role "assistant" }}<start_of_turn>model\n'
    "{{ $message.Content }}{{ if not $last }}<end_of_turn>\n"
    "{{ end }}\n"
    "{{- else }}<start_of_turn>user\n"
    "{{ $message.Content }}<end_of_turn>\n"
    "{{ if $last }}<start_of_turn>model\n"
    "{{ end }}\n"
    "{{- end }}\n"
    "{{- end }}"
)


def _check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(
            f"Received an invalid value for `dtype`, expected one of {list(DTYPES)}. "
            f"Received: dtype={dtype!r}"
        )
    return dtype


def check_expressible(backbone):
    """Raise `ValueError` if llama.cpp's `gemma2` graph cannot compute `backbone`.

    llama.cpp always soft-caps attention logits and final logits (its GGUF
    keys set the caps, not their presence), and scales queries by
    `1 / sqrt(head_dim)`, or `1 / sqrt(hidden_dim // num_query_heads)` at 46
    layers, with no key to choose another `query_pre_attn_scalar`. Local
    layers (0, 2, 4, ...) and the RoPE base match ours by construction.

    Args:
        backbone: `Gemma2Backbone`.

    Example:

    ```python
    backbone = Gemma2Backbone(..., head_dim=16, query_pre_attn_scalar=12)
    check_expressible(backbone)  # ValueError: ... Expected query_pre_attn_scalar=16
    ```
    """
    expected = gguf_names.llama_cpp_query_pre_attn_scalar(
        backbone.num_layers,
        backbone.hidden_dim,
        backbone.num_query_heads,
        backbone.head_dim,
    )
    if float(backbone.query_pre_attn_scalar) != float(expected):
        rule = (
            "hidden_dim // num_query_heads"
            if backbone.num_layers == gguf_names.LLAMA_CPP_27B_LAYERS
            else "head_dim"
        )
        raise ValueError(
            "This model cannot be exported to GGUF: llama.cpp's gemma2 graph "
            f"scales queries by 1/sqrt({rule}) for a model with "
            f"num_layers={backbone.num_layers} (by hidden_dim // num_query_heads "
            f"only at {gguf_names.LLAMA_CPP_27B_LAYERS} layers, else by head_dim) "
            "and GGUF has no key to change it. Expected "
            f"query_pre_attn_scalar={expected}. Received: "
            f"query_pre_attn_scalar={backbone.query_pre_attn_scalar}"
        )
    for name in ("attention_logit_soft_cap", "final_logit_soft_cap"):
        if getattr(backbone, name) is None:
            raise ValueError(
                f"This model cannot be exported to GGUF: it has {name}=None, but "
                "llama.cpp's gemma2 graph always applies both soft caps (50.0 and "
                "30.0 when the file names none). Expected a positive number. "
                f"Received: {name}=None"
            )


def tensor_type(shape, dtype):
    """The GGUF type name (`"F32"`, `"F16"`, `"BF16"`, `"Q8_0"`) of one tensor.

    Norms and other 1-D tensors stay F32, as llama.cpp keeps them. Under
    `"q8_0"` a matrix whose rows are not whole 32-value blocks is written
    F16 (llama.cpp's converter does the same).

    Example:

    >>> tensor_type((64,), "q8_0"), tensor_type((64, 64), "q8_0")
    ('F32', 'Q8_0')
    >>> tensor_type((64, 48), "q8_0")
    'F16'
    """
    if len(shape) < 2 or dtype == "f32":
        return "F32"
    if dtype == "q8_0":
        return "Q8_0" if shape[-1] % _Q8_0_BLOCK_VALUES == 0 else "F16"
    return dtype.upper()


def _nbytes(shape, type_name):
    values = int(np.prod(shape, dtype=np.int64))
    if type_name == "Q8_0":
        return values // _Q8_0_BLOCK_VALUES * _Q8_0_BLOCK_BYTES
    return values * {"F32": 4, "F16": 2, "BF16": 2}[type_name]


def _encode(rows, type_name):
    """float32 rows -> the bytes (as a numpy array) GGUF stores for them."""
    import gguf

    if type_name == "F32":
        return rows
    if type_name == "F16":
        return rows.astype(np.float16)
    return gguf.quants.quantize(rows, gguf.GGMLQuantizationType[type_name])


def _row_reader(weight, owner, sizes):
    """`(rows, read)`: the weight's GGUF row count and `read(start, stop)`.

    A float variable stored in the same layout (the embedding, the norms) is
    sliced on the backend chunk by chunk, never copied whole; any other (one
    block's matrix, or a quantized layer) is read, dequantized and
    transposed whole, then sliced.
    """
    layer = owner
    for name in weight.attribute[:-1]:
        layer = getattr(layer, name)
    layout = gguf_names.layout(weight)
    if getattr(layer, "quantization_mode", None) is None and weight.axes == layout:
        variable = weight.variable(owner)
        return int(variable.shape[0]), lambda start, stop: keras.ops.convert_to_numpy(
            variable[start:stop]
        )
    moved = weight_table.convert(
        float_weight(weight, owner), weight.axes, layout, sizes
    )
    return moved.shape[0], lambda start, stop: moved[start:stop]


def _write_tensor(file, weight, owner, sizes, shape, type_name):
    """Convert and write one weight in row chunks; returns bytes written."""
    rows, read = _row_reader(weight, owner, sizes)
    shift = np.float32(gguf_names.norm_shift(weight))
    row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, _CHUNK_BYTES // row_bytes)
    written = 0
    for start in range(0, rows, step):
        chunk = np.asarray(read(start, start + step), dtype=np.float32)
        if shift:
            chunk = chunk + shift
        data = _encode(np.ascontiguousarray(chunk), type_name)
        data.tofile(file)
        written += data.nbytes
    return written


class _Vocabulary:
    """Tokens, scores and llama.cpp token types of a SentencePiece model."""

    def __init__(self, tokenizer, vocabulary_size):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        self.spec = _TokenizerSpec(tokenizer, vocabulary_size)
        processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.proto)
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(tokenizer.proto)
        size = processor.get_piece_size()
        self.tokens = [processor.id_to_piece(i) for i in range(size)]
        self.scores = [float(processor.get_score(i)) for i in range(size)]
        # SentencePiece's piece types use llama.cpp's numbers (1..6).
        self.types = [int(piece.type) for piece in model.pieces]
        for piece in _TURN_PIECES:
            index = processor.piece_to_id(piece)
            if processor.id_to_piece(index) == piece:
                # As llama.cpp's converter marks Gemma's special turn tokens.
                self.types[index] = gguf_names.TOKEN_TYPE_CONTROL
        # Embedding rows past the vocabulary: never produced, never used.
        for index in range(size, vocabulary_size):
            self.tokens.append(f"[PAD{index}]")
            self.scores.append(-10000.0)
            self.types.append(gguf_names.TOKEN_TYPE_UNUSED)
        self.unknown_id = processor.unk_id()
        self.add_space_prefix = bool(model.normalizer_spec.add_dummy_prefix)


def _add_metadata(writer, backbone, vocabulary, dtype, name):
    import gguf

    writer.add_string(gguf_names.GENERAL_NAME, name)
    writer.add_uint32(gguf_names.GENERAL_FILE_TYPE, gguf_names.FILE_TYPES[dtype])
    writer.add_uint32(gguf_names.GENERAL_QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)
    writer.add_uint32(gguf_names.CONTEXT_LENGTH, gguf_names.CONTEXT_LENGTH_VALUE)
    for argument, key, kind in gguf_names.HYPERPARAMETERS:
        value = getattr(backbone, argument)
        if kind == "int":
            writer.add_uint32(key, int(value))
        else:
            writer.add_float32(key, float(value))

    spec = vocabulary.spec
    writer.add_string(gguf_names.TOKENIZER_MODEL, gguf_names.SENTENCEPIECE_TOKENIZER)
    writer.add_string(gguf_names.TOKENIZER_PRE, "default")
    writer.add_array(gguf_names.TOKENS, vocabulary.tokens)
    writer.add_array(gguf_names.SCORES, vocabulary.scores)
    writer.add_array(gguf_names.TOKEN_TYPES, vocabulary.types)
    writer.add_uint32(gguf_names.BOS_ID, spec.ids["bos"])
    writer.add_uint32(gguf_names.EOS_ID, spec.ids["eos"])
    writer.add_uint32(gguf_names.PADDING_ID, spec.ids["pad"])
    if vocabulary.unknown_id >= 0:
        writer.add_uint32(gguf_names.UNKNOWN_ID, vocabulary.unknown_id)
    if spec.end_of_turn_id is not None:
        writer.add_uint32(gguf_names.END_OF_TURN_ID, spec.end_of_turn_id)
        writer.add_string(gguf_names.CHAT_TEMPLATE, GEMMA_CHAT_TEMPLATE)
    writer.add_bool(gguf_names.ADD_BOS, True)
    writer.add_bool(gguf_names.ADD_EOS, False)
    writer.add_bool(gguf_names.ADD_SPACE_PREFIX, vocabulary.add_space_prefix)


def _stop_pieces(vocabulary):
    """`<end_of_turn>` (when the vocabulary has it), then the end-of-text piece."""
    spec = vocabulary.spec
    turn = (_TURN_PIECES[1],) if spec.end_of_turn_id is not None else ()
    return (*turn, spec.pieces["eos"])


def modelfile_text(gguf_file_name, stop_pieces=("<end_of_turn>", "<eos>")):
    """The Ollama `Modelfile` that runs `gguf_file_name` (in the same folder).

    Args:
        gguf_file_name: string. The GGUF file's name, relative to the
            Modelfile.
        stop_pieces: strings Ollama stops at: Gemma's end of turn and end of
            text by default.

    Example:

    >>> print(modelfile_text("tiny.gguf").splitlines()[0])
    FROM ./tiny.gguf
    """
    lines = [f"FROM ./{gguf_file_name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{piece}"' for piece in stop_pieces]
    lines += [f"PARAMETER {name} {value}" for name, value in SAMPLING_DEFAULTS]
    return "\n".join(lines) + "\n"


def export_to_gguf(
    causal_lm,
    path,
    dtype="f32",
    tokenizer=None,
    modelfile=True,
    overwrite=False,
    progress=None,
):
    """Write `causal_lm` as a GGUF file llama.cpp and Ollama run as `gemma2`.

    Writes the weights (LoRA adapters merged, a quantized model dequantized
    first, RMS norm weights as llama.cpp's `1 + scale` in F32), the
    hyper-parameters (`gemma2.*`) and the SentencePiece vocabulary with
    Gemma's special ids (`tokenizer.ggml.*`, plus its chat template). Tensors
    are converted and written one at a time, in row chunks, so memory holds
    the model plus one tensor's chunk. The file is staged in a hidden sibling
    and renamed into place at the end: a failure (or a `progress` callback
    that raises) leaves nothing at `path`.

    With `modelfile=True` an Ollama `Modelfile` is written beside it
    (`FROM ./<name>.gguf`, Gemma's turn template, stops at `<end_of_turn>`
    and `<eos>`, the Gemma team's sampling defaults temperature 1.0,
    top-k 64, top-p 0.95); run it with
    `ollama create NAME -f Modelfile && ollama run NAME`.

    Args:
        causal_lm: `Gemma2CausalLM` (or a bare `Gemma2Backbone` with
            `tokenizer=`).
        path: string. The `.gguf` file to write.
        dtype: string. `"f32"`, `"f16"`, `"bf16"` or `"q8_0"`: the type of
            the matrices (norms stay F32; under `"q8_0"` a matrix whose rows
            are not multiples of 32 values is F16). Defaults to `"f32"`.
        tokenizer: optional `keras_hub.tokenizers.SentencePieceTokenizer`
            (e.g. `Gemma2Tokenizer`). Defaults to the tokenizer of
            `causal_lm.preprocessor`; llama.cpp needs one.
        modelfile: bool. Also write `Modelfile` in `path`'s folder.
            Defaults to `True`.
        overwrite: bool. Replace an existing `path` (and `Modelfile`).
            Defaults to `False` (an existing one raises `FileExistsError`
            before anything is written).
        progress: optional callable `progress(done, total, name)`, called
            after each tensor is written.

    Example:

    ```python
    causal_lm = Gemma2CausalLM.from_preset("/path/to/gemma2_2b_it")
    export_to_gguf(causal_lm, "/path/to/gemma2-2b-it.gguf", dtype="q8_0")
    # then: ollama create gemma2-ft -f /path/to/Modelfile
    ```
    """
    import gguf

    backbone = exported_backbone(causal_lm)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            "Received an invalid value for `path`, expected a string or path. "
            f"Received: path={path!r}"
        )
    if progress is not None and not callable(progress):
        raise TypeError(
            "Received an invalid value for `progress`, expected a callable "
            f"`progress(done, total, name)` or None. Received: progress={progress!r}"
        )
    for name, value in (("modelfile", modelfile), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise TypeError(
                f"Received an invalid value for `{name}`, expected a bool. "
                f"Received: {name}={value!r}"
            )
    dtype = _check_dtype(dtype)
    check_expressible(backbone)
    tokenizer = _find_tokenizer(causal_lm, tokenizer)
    if tokenizer is None:
        raise ValueError(
            "Received no tokenizer: a GGUF file must hold the vocabulary for "
            "llama.cpp to run it. Pass `tokenizer=` (a Gemma2Tokenizer), or "
            "export a Gemma2CausalLM that has a preprocessor."
        )
    vocabulary = _Vocabulary(tokenizer, backbone.vocabulary_size)

    path = os.path.abspath(os.fspath(path))
    file_name = os.path.basename(path)
    plan = gguf_names.tensor_plan(backbone)
    sizes = weight_table.dimensions(backbone)
    types = [tensor_type(shape, dtype) for _, _, _, _, shape in plan]
    modelfile_path = os.path.join(os.path.dirname(path), MODELFILE_NAME)
    if modelfile and os.path.exists(modelfile_path) and not overwrite:
        raise FileExistsError(
            f"The Modelfile {modelfile_path} already exists. Pass overwrite=True "
            "to replace it, modelfile=False to skip it, or choose another folder."
        )

    with atomic_file(path, overwrite=overwrite) as staging:
        writer = gguf.GGUFWriter(None, gguf_names.ARCHITECTURE)
        _add_metadata(
            writer, backbone, vocabulary, dtype, os.path.splitext(file_name)[0]
        )
        for (name, _, _, _, shape), type_name in zip(plan, types, strict=True):
            writer.add_tensor_info(
                name,
                shape,
                np.dtype(np.float32),
                _nbytes(shape, type_name),
                raw_dtype=gguf.GGMLQuantizationType[type_name],
            )
        writer.write_header_to_file(path=staging)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        file = writer.fout[0]
        try:
            for done, ((name, weight, _, owner, shape), type_name) in enumerate(
                zip(plan, types, strict=True), start=1
            ):
                writer.write_padding(file, file.tell())  # tensor data alignment
                written = _write_tensor(file, weight, owner, sizes, shape, type_name)
                if written != _nbytes(shape, type_name):
                    raise RuntimeError(f"Wrote {written} bytes for {name}: a bug here.")
                if progress is not None:
                    progress(done, len(plan), name)
            writer.write_padding(file, file.tell())
        finally:
            writer.close()
        if modelfile:
            with atomic_file(modelfile_path, overwrite=True) as modelfile_staging:
                with open(modelfile_staging, "w", encoding="utf-8") as handle:
                    handle.write(modelfile_text(file_name, _stop_pieces(vocabulary)))
