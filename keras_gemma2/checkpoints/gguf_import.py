"""Read a Gemma 2 GGUF file (llama.cpp's format) into Keras.

A GGUF file holds the hyper-parameters (`gemma2.*` metadata keys), the
SentencePiece vocabulary (`tokenizer.ggml.*`) and the weights in llama.cpp's
layout: linear weights `[out, in]` (as Hugging Face stores them), RMS-norm
gains stored as `1 + scale` in F32, the output head tied to `token_embd`.
Tensors of type F32, F16, BF16 and Q8_0 are read (Q8_0 dequantised with
the `gguf` package) and converted to the requested dtype one tensor at a
time (the embedding a block of rows at a time), so memory holds the model
plus one tensor: loading a 509 MB F32 file peaked at 1.04x the model in
float32 and 1.35x in bfloat16 (torch). The header is parsed by
`gguf_header` (a 256000-token vocabulary in about a second).

Everything that can be checked before a weight is assigned is checked
first: the magic and the header (a truncated or foreign file), the
architecture, the metadata, every tensor's name, type, shape and extent
in the file. A bad file raises a `ValueError` naming it and no model is
returned.
"""

import os

import numpy as np

from keras_gemma2.checkpoints import gguf_header
from keras_gemma2.checkpoints import gguf_names as names
from keras_gemma2.checkpoints.finite_check import check_finite
from keras_gemma2.checkpoints.hf_checkpoint import as_assignable, build_for_loading
from keras_gemma2.checkpoints.unallocated import fill, forget_pending
from keras_gemma2.models import weight_table
from keras_gemma2.models.chat_template import END_OF_TURN, START_OF_TURN

GGUF_SUFFIX = ".gguf"
# Gemma's tokenizer.model has the turn markers as user-defined pieces, so their
# literal text maps to one id; llama.cpp's converter may type them CONTROL.
_TURN_PIECES = (START_OF_TURN, END_OF_TURN)
# llama.cpp's key (not written by Gemma converters; `False` when absent).
_REMOVE_EXTRA_WHITESPACES = "tokenizer.ggml.remove_extra_whitespaces"
# `tokenizer.ggml.*_token_id` key -> the SentencePiece trainer field it sets.
_SPECIAL_IDS = {
    names.UNKNOWN_ID: "unk",
    names.BOS_ID: "bos",
    names.EOS_ID: "eos",
    names.PADDING_ID: "pad",
}


def is_gguf_file(preset):
    """Whether `preset` (a string or path) names a `.gguf` file.

    Example:

    >>> is_gguf_file("/models/gemma-2-2b-it-Q8_0.gguf")
    True
    """
    return isinstance(preset, (str, os.PathLike)) and os.fspath(
        preset
    ).lower().endswith(GGUF_SUFFIX)


# GGML type names we read -> numpy dtype of the stored values (Q8_0: blocks
# of a float16 scale and 32 int8 values, dequantised by the `gguf` package).
_READ_TYPES = {"F32": "<f4", "F16": "<f2", "BF16": "bfloat16", "Q8_0": None}
# Values per block when a tensor is read a block of rows at a time.
_BLOCK_ELEMENTS = 1 << 24


class GGUFFile:
    """An opened, checked GGUF file: its metadata and its tensor table.

    Opening parses the header (`gguf_header.read_header`, from a memory map
    of which only the header's pages are touched); `read` reads one tensor.
    The magic, the header, every tensor's extent in the file and
    `general.architecture == "gemma2"` are checked on opening.

    Args:
        path: string. Path to the `.gguf` file.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not GGUF (bad magic), is truncated or
            corrupt, or describes another architecture.

    Example:

    ```python
    gguf_file = GGUFFile("gemma-2-2b-it-Q8_0.gguf")
    read_gguf_config(gguf_file)["num_layers"]  # 26
    ```
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"The GGUF file {self.path} does not exist.")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as file:
            magic = file.read(len(gguf_header.MAGIC))
        if magic != gguf_header.MAGIC:
            raise ValueError(
                f"{self.path} is not a GGUF file: it starts with {magic!r}, "
                f"expected the magic {gguf_header.MAGIC!r}."
            )
        try:
            _, self.metadata, entries, _ = gguf_header.read_header(
                np.memmap(self.path, dtype=np.uint8, mode="r")
            )
        except gguf_header.Truncated as e:
            raise ValueError(f"{self.path} is truncated: its header {e}.") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path} is corrupt: {e}.") from e
        self.tensors = {entry.name: entry for entry in entries}
        if len(self.tensors) != len(entries):
            raise ValueError(f"{self.path} is corrupt: it repeats a tensor name.")
        for entry in entries:
            end = entry.offset + (self._nbytes(entry) or 0)
            if end > size:
                raise ValueError(
                    f"{self.path} is truncated: tensor `{entry.name}` ends at byte "
                    f"{end}, past the end of the file ({size} bytes)."
                )
        architecture = self.value(names.GENERAL_ARCHITECTURE, None)
        if architecture != names.ARCHITECTURE:
            raise ValueError(
                f"{self.path} holds a model of architecture {architecture!r} "
                f"({names.GENERAL_ARCHITECTURE}); only {names.ARCHITECTURE!r} "
                "(Gemma 2) loads into Gemma2Backbone."
            )

    def value(self, key, default=KeyError):
        """The metadata value under `key`; `default`, or `ValueError` if none."""
        if key not in self.metadata:
            if default is KeyError:
                raise ValueError(
                    f"{self.path} lacks the metadata key `{key}` that a Gemma 2 "
                    "GGUF must have."
                )
            return default
        return self.metadata[key]

    def shape(self, name):
        """Tensor `name`'s shape in numpy order (outermost first)."""
        return self.tensors[name].shape

    def type_name(self, name):
        """The GGML type of tensor `name`, e.g. `"Q8_0"`."""
        ggml_type = _ggml_type(self.tensors[name])
        if ggml_type is None:
            return f"unknown type {self.tensors[name].type_id}"
        return ggml_type.name

    def _nbytes(self, entry):
        """Bytes of `entry`'s data, or `None` for a type `gguf` does not know."""
        from gguf import GGML_QUANT_SIZES

        ggml_type = _ggml_type(entry)
        if ggml_type is None:
            return None
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        return int(np.prod(entry.shape, dtype=np.int64)) // block * block_bytes

    def read(self, name, start=0, stop=None):
        """Rows `start:stop` (outermost axis) of tensor `name`, from the file.

        F32, F16 and BF16 keep their dtype; Q8_0 is dequantised to float32
        by `gguf.quants`. A Q8_0 row is whole blocks, so rows can be read
        apart.
        """
        from gguf import quants

        entry = self.tensors[name]
        stop = entry.shape[0] if stop is None else stop
        row_bytes = self._nbytes(entry) // entry.shape[0]
        # Read, not mapped: the file's pages do not stay resident as the
        # load goes on, so memory holds the model plus what is being read.
        raw = np.fromfile(
            self.path,
            dtype=np.uint8,
            count=(stop - start) * row_bytes,
            offset=entry.offset + start * row_bytes,
        )
        shape = (stop - start, *entry.shape[1:])
        ggml_type = _ggml_type(entry)
        if ggml_type.name == "Q8_0":
            blocks = raw.reshape(quants.quant_shape_to_byte_shape(shape, ggml_type))
            return quants.dequantize(blocks, ggml_type)
        return raw.view(_numpy_dtype(_READ_TYPES[ggml_type.name])).reshape(shape)


def _numpy_dtype(dtype):
    """A numpy dtype from its name, `"bfloat16"` included."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _ggml_type(entry):
    """`gguf.GGMLQuantizationType` of a `TensorEntry`, or `None` if unknown."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(entry.type_id)
    except ValueError:
        return None


def read_gguf_config(gguf_file):
    """Map a Gemma 2 GGUF's `gemma2.*` metadata to `Gemma2Backbone` arguments.

    The keys are `gguf_names.HYPERPARAMETERS`; a key llama.cpp has a
    default for (window, soft caps, RoPE base, head sizes, key-value heads)
    takes that default when absent. The vocabulary size is `token_embd`'s
    row count, or the token count when the vocabulary is smaller (the
    embedding's extra rows are padding, left unread). `query_pre_attn_scalar`
    follows llama.cpp, which has no key for it: `hidden // heads` for the
    46-layer model, `head_dim` otherwise.

    Args:
        gguf_file: a `GGUFFile`.

    Raises:
        ValueError: a required key or `token_embd.weight` is missing, or
            `key_length` and `value_length` differ (Gemma 2 has one head size).
    """
    hidden = _number(gguf_file, names.EMBEDDING_LENGTH, "int")
    heads = _number(gguf_file, names.HEAD_COUNT, "int")
    defaults = {
        **names.LLAMA_CPP_DEFAULTS,
        names.KEY_LENGTH: hidden // heads,
        names.VALUE_LENGTH: hidden // heads,
        names.HEAD_COUNT_KV: heads,
    }
    config = {}
    for argument, key, kind in names.HYPERPARAMETERS:
        value = _number(gguf_file, key, kind, defaults.get(key, KeyError))
        if config.setdefault(argument, value) != value:
            raise ValueError(
                f"{gguf_file.path} has {names.KEY_LENGTH}={config[argument]} and "
                f"{key}={value}; Gemma 2 uses one head size for queries, keys and "
                "values."
            )
    if names.tensor_name(weight_table.EMBEDDING) not in gguf_file.tensors:
        raise ValueError(
            f"{gguf_file.path} lacks the tensor "
            f"`{names.tensor_name(weight_table.EMBEDDING)}`."
        )
    rows = gguf_file.shape(names.tensor_name(weight_table.EMBEDDING))[0]
    tokens = _vocabulary(gguf_file)
    # Rows past the vocabulary pad the embedding; they are never used.
    config["vocabulary_size"] = rows if tokens is None else min(rows, len(tokens))
    config["query_pre_attn_scalar"] = names.llama_cpp_query_pre_attn_scalar(
        config["num_layers"], hidden, heads, config["head_dim"]
    )
    return config


def _number(gguf_file, key, kind, default=KeyError):
    """Metadata `key` as an `"int"` or a `"float"`, or a `ValueError` naming it."""
    value = gguf_file.value(key, default)
    if isinstance(value, (bool, str, list)):
        raise ValueError(
            f"{gguf_file.path} has {key}={value!r}; expected a number ({kind})."
        )
    if kind == "int":
        return int(value)
    # GGUF floats are float32: take the shortest decimal that is the same
    # float32 (1e-05, not 9.999999747378752e-06), as the writer meant it.
    return float(str(np.float32(value)))


def read_gguf_tokenizer(gguf_file):
    """Rebuild the SentencePiece model of a GGUF's vocabulary, or `None`.

    The pieces, scores and types come from `tokenizer.ggml.tokens`,
    `scores` and `token_type` (llama.cpp numbers the types as SentencePiece
    does); the special pieces from the `*_token_id` keys; whitespace
    handling from `add_space_prefix` (llama.cpp's default for this
    vocabulary, `True`, when absent) and `remove_extra_whitespaces`. The
    model type is BPE: SentencePiece's name for the score-ordered merging
    that GGUF's `"llama"` vocabulary stands for. `<start_of_turn>` and
    `<end_of_turn>` are made user-defined pieces, as in Gemma's own model,
    when a converter typed them CONTROL (so their literal text still maps
    to their one id). Trailing unused `[PAD<id>]` tokens, which converters
    add to match the embedding's rows, are dropped.

    Args:
        gguf_file: a `GGUFFile`.

    Returns:
        The serialized `ModelProto` (bytes), or `None` when the file holds no
        vocabulary (`tokenizer.ggml.tokens` absent).

    Raises:
        ValueError: the vocabulary is not SentencePiece's, its lists disagree
            in length, or SentencePiece refuses the rebuilt model.
    """
    tokens = _vocabulary(gguf_file)
    if tokens is None:
        return None
    from sentencepiece import sentencepiece_model_pb2

    kind = gguf_file.value(names.TOKENIZER_MODEL, names.SENTENCEPIECE_TOKENIZER)
    if kind != names.SENTENCEPIECE_TOKENIZER:
        raise ValueError(
            f"{gguf_file.path} has {names.TOKENIZER_MODEL}={kind!r}; a Gemma 2 "
            f"vocabulary is SentencePiece's ({names.SENTENCEPIECE_TOKENIZER!r})."
        )
    count = len(tokens)
    scores = gguf_file.value(names.SCORES, [0.0] * count)[:count]
    types = gguf_file.value(names.TOKEN_TYPES, [names.TOKEN_TYPE_NORMAL] * count)
    types = types[:count]
    proto = sentencepiece_model_pb2.ModelProto()
    for piece, score, piece_type in zip(tokens, scores, types, strict=True):
        if piece in _TURN_PIECES and piece_type == names.TOKEN_TYPE_CONTROL:
            piece_type = names.TOKEN_TYPE_USER_DEFINED
        proto.pieces.add(piece=piece, score=float(score), type=int(piece_type))
    trainer = proto.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = count
    trainer.byte_fallback = names.TOKEN_TYPE_BYTE in types
    for key, role in _SPECIAL_IDS.items():
        index = gguf_file.value(key, None)
        if index is None and role == "unk" and names.TOKEN_TYPE_UNKNOWN in types:
            index = types.index(names.TOKEN_TYPE_UNKNOWN)
        valid = index is not None and 0 <= int(index) < count
        setattr(trainer, f"{role}_id", int(index) if valid else -1)
        if valid:
            setattr(trainer, f"{role}_piece", tokens[int(index)])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(gguf_file.value(names.ADD_SPACE_PREFIX, True))
    normalizer.remove_extra_whitespaces = bool(
        gguf_file.value(_REMOVE_EXTRA_WHITESPACES, False)
    )
    normalizer.escape_whitespaces = True
    serialized = proto.SerializeToString()
    _check_loadable(serialized, gguf_file.path)
    return serialized


def _vocabulary(gguf_file):
    """The file's token list without trailing padding tokens, or `None`.

    Converters (ours, llama.cpp's) pad the token list to the embedding's
    rows with unused tokens named `[PAD<id>]`; they are no SentencePiece
    pieces and are dropped.

    Raises:
        ValueError: the scores or token types are not one per token.
    """
    tokens = gguf_file.value(names.TOKENS, None)
    if tokens is None:
        return None
    count = len(tokens)
    scores = gguf_file.value(names.SCORES, None)
    types = gguf_file.value(names.TOKEN_TYPES, None)
    for key, values in ((names.SCORES, scores), (names.TOKEN_TYPES, types)):
        if values is not None and len(values) != count:
            raise ValueError(
                f"{gguf_file.path} lists {count} tokens but {len(values)} values "
                f"under {key}; it must have one per token."
            )
    while (
        count
        and types is not None
        and types[count - 1] == names.TOKEN_TYPE_UNUSED
        and tokens[count - 1] == f"[PAD{count - 1}]"
    ):
        count -= 1
    return tokens[:count]


def _check_loadable(serialized, path):
    """Raise `ValueError` naming `path` if SentencePiece refuses the model."""
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_proto=serialized)
    except (RuntimeError, OSError) as e:
        raise ValueError(
            f"The vocabulary in {path} does not make a valid SentencePiece model: {e}"
        ) from e


def check_gguf_tensors(gguf_file, plan):
    """Check names, types and shapes of every tensor `plan` needs.

    Args:
        gguf_file: a `GGUFFile`.
        plan: `gguf_names.tensor_plan(backbone)`.

    Raises:
        ValueError: a tensor is missing, has a type we do not read (named,
            e.g. Q4_K), has another shape than the metadata implies, or the
            file holds a tensor Gemma 2 has no place for.
    """
    expected = [name for name, *_ in plan]
    unexpected = sorted(set(gguf_file.tensors) - set(expected))
    if unexpected:
        raise ValueError(
            f"Unexpected tensor `{unexpected[0]}` in {gguf_file.path} "
            f"({len(unexpected)} such): it has no place in a Gemma 2 model of "
            f"{len(plan)} tensors (the output head is tied to the embedding)."
        )
    missing = [name for name in expected if name not in gguf_file.tensors]
    if missing:
        raise ValueError(
            f"{gguf_file.path} lacks the tensor `{missing[0]}` ({len(missing)} "
            f"missing of the {len(plan)} a Gemma 2 model of its metadata has)."
        )
    for name, weight, *_, shape in plan:
        if gguf_file.type_name(name) not in _READ_TYPES:
            raise ValueError(
                f"Tensor `{name}` in {gguf_file.path} has type "
                f"{gguf_file.type_name(name)}, which keras_gemma2 does not read. "
                f"Supported types: {sorted(_READ_TYPES)}; convert the file "
                "to one of them (e.g. with llama.cpp's llama-quantize) first."
            )
        stored = gguf_file.shape(name)
        wanted = tuple(shape)
        if weight.padded:  # the embedding: rows past the vocabulary are padding
            stored = (min(stored[0], wanted[0]), *stored[1:])
        if stored != wanted:
            raise ValueError(
                f"Tensor `{name}` in {gguf_file.path} has shape "
                f"{gguf_file.shape(name)}; expected {wanted} from its "
                f"{names.ARCHITECTURE}.* metadata."
            )


def load_gguf_weights(backbone, gguf_file, progress=None, check_finite_values=True):
    """Check every tensor of `gguf_file` against `backbone`, then assign them.

    All names, types and shapes are checked before the first assignment;
    tensors are then read, dequantised, checked for NaN/Inf and assigned
    one at a time.

    Args:
        backbone: a `Gemma2Backbone` built with `build_for_loading`.
        gguf_file: a `GGUFFile`.
        progress: optional callable `progress(done, total, name)`.
        check_finite_values: bool. Refuse a tensor holding NaN or Inf,
            naming it and the file, before it is assigned; `backbone` is
            then unusable and must be discarded.
    """
    plan = names.tensor_plan(backbone)
    sizes = weight_table.dimensions(backbone)
    try:
        check_gguf_tensors(gguf_file, plan)
        for done, (name, weight, _, owner, shape) in enumerate(plan, start=1):
            variable = weight.variable(owner)
            if weight.axes == names.layout(weight) and not weight.is_norm_scale:
                # The embedding (the largest tensor): stored as we hold it,
                # so converted straight into its dtype, a block of rows at a
                # time; padded rows are never read.
                value = _read_rows(
                    gguf_file, name, shape, variable.dtype, check_finite_values
                )
            else:
                value = gguf_file.read(name)
                if check_finite_values:
                    check_finite(value, name, gguf_file.path)
                value = names.from_gguf(value, weight, sizes)
            fill(variable, as_assignable(value, variable.dtype))
            del value
            if progress is not None:
                progress(done, len(plan), name)
    finally:
        # Built by `build_for_loading`: loaded (or discarded) either way.
        forget_pending(backbone.weights)


def _read_rows(gguf_file, name, shape, dtype, check_finite_values):
    """Tensor `name`'s first `shape[0]` rows as a `dtype` array, in row blocks.

    Memory holds the result and one block (`_BLOCK_ELEMENTS` values as
    read), not a float32 copy of the whole tensor.
    """
    value = np.empty(shape, dtype=_numpy_dtype(dtype))
    step = max(1, _BLOCK_ELEMENTS // max(1, int(np.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        rows = gguf_file.read(name, start, stop)
        if check_finite_values:
            check_finite(rows, name, gguf_file.path)
        value[start:stop] = rows
    return value


def load_gguf_backbone(
    backbone_cls,
    path,
    load_weights=True,
    progress=None,
    check_finite_values=True,
    **overrides,
):
    """Build `backbone_cls` from a Gemma 2 GGUF file and load its weights.

    Args:
        backbone_cls: `Gemma2Backbone` or a subclass.
        path: string. The `.gguf` file.
        load_weights: bool. Load the weights (else random initial ones).
        progress: optional callable `progress(done, total, name)`.
        check_finite_values: bool. Refuse NaN/Inf weights.
        **overrides: constructor arguments replacing the file's (e.g.
            `dtype`).
    """
    gguf_file = GGUFFile(path)
    return _backbone(
        backbone_cls,
        gguf_file,
        {**read_gguf_config(gguf_file), **overrides},
        load_weights=load_weights,
        progress=progress,
        check_finite_values=check_finite_values,
    )


def _backbone(backbone_cls, gguf_file, config, **options):
    """`backbone_cls(**config)` with the weights of `gguf_file` loaded.

    `options` are `load_weights`, `progress` and `check_finite_values`.
    """
    if not options["load_weights"]:
        return backbone_cls(**config)
    backbone = build_for_loading(backbone_cls, config)
    load_gguf_weights(
        backbone,
        gguf_file,
        progress=options["progress"],
        check_finite_values=options["check_finite_values"],
    )
    return backbone


def load_gguf_causal_lm(
    causal_lm_cls,
    path,
    load_weights=True,
    progress=None,
    check_finite_values=True,
    **kwargs,
):
    """Build `causal_lm_cls` from a GGUF file: backbone and, if it has one, tokenizer.

    The file is opened once; its vocabulary is rebuilt (and checked) before
    any weight is read. As for other presets, `preprocessor=` (when given,
    `None` included) replaces the file's; other `kwargs` override backbone
    arguments (e.g. `dtype`).

    Args:
        causal_lm_cls: `Gemma2CausalLM` or a subclass.
        path: string. The `.gguf` file.
        load_weights: bool. Load the weights.
        progress: optional callable `progress(done, total, name)`.
        check_finite_values: bool. Refuse NaN/Inf weights.
        **kwargs: `preprocessor`, or backbone constructor arguments.

    Raises:
        ValueError: the file is not a readable Gemma 2 GGUF (see `GGUFFile`,
            `check_gguf_tensors`), or its vocabulary has more tokens than the
            embedding has rows.
    """
    given = "preprocessor" in kwargs
    preprocessor = kwargs.pop("preprocessor", None)
    gguf_file = GGUFFile(path)
    config = read_gguf_config(gguf_file)
    preprocessor_cls = causal_lm_cls.preprocessor_cls
    if not given and preprocessor_cls is not None:
        preprocessor = _preprocessor(
            preprocessor_cls, gguf_file, config["vocabulary_size"]
        )
    backbone = _backbone(
        causal_lm_cls.backbone_cls,
        gguf_file,
        {**config, **kwargs},
        load_weights=load_weights,
        progress=progress,
        check_finite_values=check_finite_values,
    )
    return causal_lm_cls(backbone=backbone, preprocessor=preprocessor)


def _preprocessor(preprocessor_cls, gguf_file, rows):
    """`preprocessor_cls` over the vocabulary of `gguf_file`, or `None` if none.

    `rows` is the embedding's row count, which the vocabulary must not pass.
    """
    proto = read_gguf_tokenizer(gguf_file)
    if proto is None:
        return None
    try:
        tokenizer = preprocessor_cls.tokenizer_cls(proto=proto)
    except ValueError as e:  # e.g. a vocabulary without Gemma's special pieces
        raise ValueError(f"The vocabulary in {gguf_file.path}: {e}") from e
    if tokenizer.vocabulary_size() > rows:
        raise ValueError(
            f"The vocabulary in {gguf_file.path} has {tokenizer.vocabulary_size()} "
            f"tokens, but `{names.tensor_name(weight_table.EMBEDDING)}` has only "
            f"{rows} rows."
        )
    return preprocessor_cls(tokenizer=tokenizer)
