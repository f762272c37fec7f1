"""GGUF files load into Keras: weights, hyper-parameters, tokenizer, bad files.

The GGUF files here are written with `gguf.GGUFWriter` directly from a random
Hugging Face `Gemma2ForCausalLM`, following llama.cpp's `gemma2` convention
spelled out in this file (names, linear weights `[out, in]`, RMS norm gains
`1 + w` in F32, no output head), independently of our exporter. The
reference is the Hugging Face model itself, or, for the rounded types, the
Hugging Face model given the same rounded weights, rounded here in numpy
(F16, BF16) or decoded here from the Q8_0 bytes written.
"""

import os
import shutil

import gguf
import ml_dtypes
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.checkpoints.unallocated import pending_variables
from keras_gemma2.cli import main as cli_main
from tests.checkpoints.test_gguf_export import LLAMA_CPP_NAMES
from tests.conftest import hf_logits, make_hf_model
from tests.text_fixtures import UNICODE_SENTENCES

PRESET_VOCABULARY = os.path.join(
    os.path.dirname(__file__),
    "..",
    "..",
    "keras_gemma2",
    "presets",
    "gemma2_tiny_python",
    "assets",
    "tokenizer",
    "vocabulary.spm",
)
# llama.cpp can express this config: query_pre_attn_scalar == head_dim; every
# linear's input width (32 or 64) is a multiple of Q8_0's block of 32. The
# vocabulary is the shipped preset's (4096 pieces), so the file carries a real
# tokenizer; the embedding has 8 rows more, padding that the token list pads
# too (as llama.cpp does) and the import drops.
VOCABULARY = 4096
CONFIG = {
    "vocab_size": 4104,
    "intermediate_size": 64,
    "query_pre_attn_scalar": 16,
}
# Hugging Face name -> llama.cpp's, literal in the export test (4 blocks).
GGUF_NAMES = {hf: name for name, hf in LLAMA_CPP_NAMES.items()}
TOKEN_IDS = np.random.RandomState(1).randint(0, VOCABULARY, (2, 13)).astype("int32")
SAMPLE_TEXT = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    *UNICODE_SENTENCES,
]


def q8_0_bytes(array):
    """Q8_0 blocks of a float32 `[rows, columns]` array, as llama.cpp lays them out.

    Per block of 32: the scale `max|x| / 127` as float16, then 32 int8 values
    `round(x / scale)`.
    """
    blocks = array.reshape(-1, 32)
    scale = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype("float16")
    quotient = np.where(scale == 0, 0, blocks / scale.astype("float32"))
    values = np.clip(np.round(quotient), -127, 127).astype("int8")
    data = np.concatenate([scale.view("uint8"), values.view("uint8")], axis=1)
    return data.reshape(array.shape[0], -1)


def decode_q8_0(data, shape):
    """The float32 values of Q8_0 bytes, decoded here (not with `gguf`)."""
    blocks = data.reshape(-1, 34)
    scale = blocks[:, :2].copy().view("float16").astype("float32")
    return (blocks[:, 2:].view("int8").astype("float32") * scale).reshape(shape)


def encode(array, tensor_type):
    """`(data, raw_dtype, stored values as float32)` of one weight."""
    types = gguf.GGMLQuantizationType
    if tensor_type == "F32":
        return array, None, array
    if tensor_type == "F16":
        data = array.astype("float16")
        return data, None, data.astype("float32")
    if tensor_type == "BF16":
        data = array.astype(ml_dtypes.bfloat16)
        return data.view("uint8"), types.BF16, data.astype("float32")
    if tensor_type == "Q8_0":
        data = q8_0_bytes(array)
        return data, types.Q8_0, decode_q8_0(data, array.shape)
    if tensor_type == "Q4_0":
        return gguf.quants.quantize(array, types.Q4_0), types.Q4_0, None
    raise ValueError(tensor_type)


def sentencepiece_vocabulary():
    """`(tokens, scores, types)` of the preset's SentencePiece model."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(PRESET_VOCABULARY, "rb") as file:
        proto.ParseFromString(file.read())
    return (
        [piece.piece for piece in proto.pieces],
        [piece.score for piece in proto.pieces],
        [int(piece.type) for piece in proto.pieces],
    )


def write_gguf(
    path,
    hf_model,
    tensor_type="F32",
    architecture="gemma2",
    skip=(),
    special_types=None,
    edit=None,
    metadata=None,
    rename=None,
):
    """Write `hf_model` as a llama.cpp-style Gemma 2 GGUF file.

    `metadata` replaces `gemma2.*` values by key suffix (`None` leaves the
    key out). Returns `{gguf name: float32 values stored}`, the dequantised
    weights as the file holds them (norms as `1 + w`).
    """
    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    values = {
        "context_length": 128,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim,
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "attn_logit_softcapping": float(config.attn_logit_softcapping),
        "final_logit_softcapping": float(config.final_logit_softcapping),
        "attention.sliding_window": config.sliding_window,
        "rope.freq_base": float(config.rope_parameters["rope_theta"]),
        **(metadata or {}),
    }
    for key, value in values.items():
        key = f"{architecture}.{key}"
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif value is not None:
            writer.add_uint32(key, value)
    tokens, scores, types = sentencepiece_vocabulary()
    for piece, token_type in (special_types or {}).items():
        types[tokens.index(piece)] = token_type
    for piece, new_piece in (rename or {}).items():
        tokens[tokens.index(piece)] = new_piece
    for index in range(len(tokens), config.vocab_size):  # as llama.cpp pads
        tokens.append(f"[PAD{index}]")
        scores.append(-10000.0)
        types.append(5)  # UNUSED
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", scores)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 3)
    writer.add_uint32("tokenizer.ggml.padding_token_id", 0)
    writer.add_bool("tokenizer.ggml.add_space_prefix", False)
    stored = {}
    for hf_name, parameter in hf_model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied: llama.cpp's gemma2 has no output tensor
        name = GGUF_NAMES[hf_name]
        if name in skip:
            continue
        array = parameter.detach().float().numpy().copy()
        if array.ndim == 1:  # an RMS norm: gain 1 + w, always F32
            data, raw_dtype, values = encode(array + 1.0, "F32")
        else:
            data, raw_dtype, values = encode(array, tensor_type)
        if edit is not None:
            data = edit(name, data)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        stored[name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def hf_model_with(hf_model, stored):
    """A copy of `hf_model` holding the `stored` (dequantised) weights."""
    import copy

    import torch

    model = copy.deepcopy(hf_model)
    with torch.no_grad():
        for hf_name, parameter in model.named_parameters():
            if hf_name == "lm_head.weight":
                continue
            value = stored[GGUF_NAMES[hf_name]]
            if value.ndim == 1:
                value = value - 1.0
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return model


def reference_logits(hf_model):
    """HF's logits of `TOKEN_IDS` over the vocabulary (not the padding rows)."""
    return hf_logits(hf_model, TOKEN_IDS)[..., :VOCABULARY]


def keras_logits(causal_lm, token_ids):
    import keras

    return keras.ops.convert_to_numpy(
        causal_lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    ).astype("float32")


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(seed=3, **CONFIG)


@pytest.fixture(scope="module")
def gguf_files(hf_model, tmp_path_factory):
    """`{type: (path, stored weights)}` for F32, F16, BF16 and Q8_0."""
    directory = tmp_path_factory.mktemp("gguf")
    files = {}
    for tensor_type in ("F32", "F16", "BF16", "Q8_0"):
        path = directory / f"tiny-{tensor_type}.gguf"
        files[tensor_type] = (str(path), write_gguf(path, hf_model, tensor_type))
    return files


def test_f32_logits_match_hugging_face(hf_model, gguf_files):
    path, _ = gguf_files["F32"]
    causal_lm = Gemma2CausalLM.from_preset(path, dtype="float32")
    backbone = causal_lm.backbone
    # Every hyper-parameter came from the metadata (none is the default).
    assert (backbone.vocabulary_size, backbone.num_layers) == (VOCABULARY, 4)
    assert (backbone.num_query_heads, backbone.num_key_value_heads) == (4, 2)
    assert (backbone.hidden_dim, backbone.intermediate_dim) == (32, 64)
    assert (backbone.sliding_window_size, backbone.layer_norm_epsilon) == (5, 1e-5)
    assert backbone.rope_max_wavelength == 500.0
    expected = reference_logits(hf_model)  # 13 tokens, past the window of 5
    difference = np.abs(keras_logits(causal_lm, TOKEN_IDS) - expected).max()
    assert difference <= 1e-4, difference


@pytest.mark.parametrize(
    "tensor_type, bound",
    # The file's own rounding moves the logits (soft-capped at 6 here) by a
    # measured 0.013 (F16: 11 significant bits), 0.117 (BF16: 8 bits) and
    # 0.463 (Q8_0: 8 bits per block of 32, relative to the block's largest),
    # the same on the three backends; bounds at about twice that. A decoding
    # mistake (a wrong scale, blocks out of order, a transposed tensor) moves
    # them by whole units.
    [("F16", 3e-2), ("BF16", 0.25), ("Q8_0", 1.0)],
)
def test_rounded_types_dequantize_exactly(hf_model, gguf_files, tensor_type, bound):
    path, stored = gguf_files[tensor_type]
    logits = keras_logits(Gemma2CausalLM.from_preset(path, dtype="float32"), TOKEN_IDS)
    # HF given the weights as stored (rounded in numpy / decoded here): the
    # import adds nothing to the file's rounding (measured <= 1.2e-5).
    rounded = reference_logits(hf_model_with(hf_model, stored))
    assert np.abs(logits - rounded).max() <= 1e-4
    # HF before rounding: the rounding's own effect, bounded.
    original = reference_logits(hf_model)
    assert np.abs(logits - original).max() <= bound
    assert (logits.argmax(-1) == original.argmax(-1)).mean() >= 0.95


def test_bfloat16_file_loads_exactly_into_bfloat16(gguf_files):
    import keras

    path, stored = gguf_files["BF16"]
    backbone = Gemma2Backbone.from_preset(path, dtype="bfloat16")
    embedding = backbone.token_embedding.embeddings
    assert keras.backend.standardize_dtype(embedding.dtype) == "bfloat16"
    loaded = keras.ops.convert_to_numpy(keras.ops.cast(embedding, "float32"))
    np.testing.assert_array_equal(loaded, stored["token_embd.weight"][:VOCABULARY])


def test_tokenizer_round_trip_equals_sentencepiece(gguf_files):
    import sentencepiece

    path, _ = gguf_files["F32"]
    causal_lm = Gemma2CausalLM.from_preset(path)
    tokenizer = causal_lm.preprocessor.tokenizer
    reference = sentencepiece.SentencePieceProcessor(model_file=PRESET_VOCABULARY)
    assert tokenizer.vocabulary_size() == VOCABULARY  # the [PAD] tokens dropped
    for text in SAMPLE_TEXT:
        ids = [int(i) for i in np.asarray(tokenizer.tokenize(text))]
        assert ids == reference.encode(text), text
        assert tokenizer.detokenize(np.asarray(ids)) == reference.decode(ids)
    assert (
        tokenizer.detokenize(np.asarray(reference.encode(SAMPLE_TEXT[1])))
        == (SAMPLE_TEXT[1])
    )
    assert (tokenizer.start_token_id, tokenizer.end_token_id) == (2, 1)
    assert tokenizer.end_of_turn_token_id == 107


def test_turn_markers_typed_control_still_tokenize_as_one_id(hf_model, tmp_path):
    # llama.cpp's converter may type `<start_of_turn>` / `<end_of_turn>`
    # CONTROL (3); their literal text must still give their single ids.
    path = tmp_path / "control.gguf"
    write_gguf(
        path,
        hf_model,
        special_types={"<start_of_turn>": 3, "<end_of_turn>": 3},
    )
    causal_lm = Gemma2CausalLM.from_preset(str(path))
    ids = np.asarray(causal_lm.preprocessor.tokenizer.tokenize(SAMPLE_TEXT[1]))
    assert int(ids[0]) == 106 and 107 in ids.tolist()


def test_convert_gguf_to_transformers(hf_model, gguf_files, tmp_path):
    from transformers import Gemma2ForCausalLM

    path, _ = gguf_files["F32"]
    destination = str(tmp_path / "hf")
    arguments = ["convert", path, destination, "--to", "transformers"]
    assert cli_main([*arguments, "--dtype", "float32"]) == 0
    converted = Gemma2ForCausalLM.from_pretrained(destination)
    converted.config._attn_implementation = "eager"
    difference = np.abs(
        reference_logits(converted.eval()) - reference_logits(hf_model)
    ).max()
    assert difference <= 1e-4, difference
    assert os.path.isfile(os.path.join(destination, "tokenizer.model"))


def test_tokenizer_and_preprocessor_from_a_gguf_file(gguf_files):
    import sentencepiece

    from keras_gemma2 import Gemma2CausalLMPreprocessor, Gemma2Tokenizer

    path, _ = gguf_files["F32"]
    reference = sentencepiece.SentencePieceProcessor(model_file=PRESET_VOCABULARY)
    tokenizer = Gemma2Tokenizer.from_preset(path)
    preprocessor = Gemma2CausalLMPreprocessor.from_preset(path, sequence_length=64)
    for candidate in (tokenizer, preprocessor.tokenizer):
        ids = [int(i) for i in np.asarray(candidate.tokenize(SAMPLE_TEXT[0]))]
        assert ids == reference.encode(SAMPLE_TEXT[0])
    x, _, _ = preprocessor(SAMPLE_TEXT[0])
    assert tuple(x["token_ids"].shape) == (64,)


def test_convert_gguf_to_keras_hub_checks_the_config_first(
    gguf_files, tmp_path, capsys
):
    # The test model's RoPE wavelength (`make_hf_model`'s, not 10000) is one
    # KerasHub cannot compute: the GGUF's config is refused before any load.
    path, _ = gguf_files["F32"]
    destination = str(tmp_path / "keras_hub")
    assert cli_main(["convert", path, destination, "--to", "keras_hub"]) == 2
    error = capsys.readouterr().err
    assert "rope_max_wavelength=" in error and "hard-codes 10000" in error, error
    assert not os.path.exists(destination)


# === Bad input: each raises naming the file and leaves nothing half-loaded ===


def expect_refused(path, error, pattern):
    before = len(pending_variables())
    with pytest.raises(error, match=pattern) as raised:
        Gemma2CausalLM.from_preset(str(path))
    assert len(pending_variables()) == before
    if error is ValueError:
        assert str(path) in str(raised.value)
    return raised.value


@pytest.mark.parametrize("keep", [100, -24])
def test_truncated_file(gguf_files, tmp_path, keep):
    source, _ = gguf_files["F32"]
    path = tmp_path / "truncated.gguf"
    with open(source, "rb") as file:
        data = file.read()
    path.write_bytes(data[:keep])  # in the header, or in the last tensor
    expect_refused(path, ValueError, "truncated")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a gguf file at all"])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    expect_refused(path, ValueError, "not a GGUF file")


def test_missing_file(tmp_path):
    expect_refused(tmp_path / "absent.gguf", FileNotFoundError, "absent.gguf")


def test_other_architecture(hf_model, tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, hf_model, architecture="llama")
    expect_refused(path, ValueError, "architecture 'llama'")


def test_unsupported_tensor_type(hf_model, tmp_path):
    path = tmp_path / "q4.gguf"
    write_gguf(path, hf_model, tensor_type="Q4_0")
    expect_refused(path, ValueError, r"`token_embd.weight` .* type Q4_0")


def test_missing_tensor(hf_model, tmp_path):
    path = tmp_path / "missing.gguf"
    write_gguf(path, hf_model, skip=("blk.2.ffn_up.weight",))
    expect_refused(path, ValueError, "lacks the tensor `blk.2.ffn_up.weight`")


@pytest.mark.parametrize(
    # A matrix, and the embedding (read a block of rows at a time).
    "poisoned",
    ["blk.1.attn_k.weight", "token_embd.weight"],
)
def test_non_finite_tensor(hf_model, tmp_path, poisoned):
    def poison(name, data):
        if name == poisoned:
            data = data.copy()
            data[0, 3] = np.nan
        return data

    path = tmp_path / "nan.gguf"
    write_gguf(path, hf_model, edit=poison)
    expect_refused(path, ValueError, rf"`{poisoned}` .* \(1 NaN")
    # check_finite=False loads it anyway, as for the other formats.
    backbone = Gemma2Backbone.from_preset(str(path), check_finite=False)
    assert backbone.num_layers == 4


@pytest.mark.parametrize(
    "metadata, pattern",
    [
        ({"feed_forward_length": None}, "lacks the metadata key `gemma2.feed_f"),
        ({"block_count": "four"}, "gemma2.block_count='four'; expected a number"),
        ({"attention.value_length": 8}, "value_length=8; Gemma 2 uses one head"),
    ],
)
def test_bad_metadata(hf_model, tmp_path, metadata, pattern):
    path = tmp_path / "metadata.gguf"
    write_gguf(path, hf_model, metadata=metadata)
    expect_refused(path, ValueError, pattern)


def test_vocabulary_without_gemma_pieces(hf_model, tmp_path):
    path = tmp_path / "vocabulary.gguf"
    write_gguf(path, hf_model, rename={"<end_of_turn>": "<eot>"})
    expect_refused(path, ValueError, r"vocabulary in .* lacks .*<end_of_turn>")


def test_cli_convert_refuses_a_bad_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML")
    destination = tmp_path / "out"
    assert cli_main(["convert", str(path), str(destination), "--to", "keras"]) != 0
    assert not destination.exists()


def test_suffix_in_any_case(gguf_files, tmp_path):
    # A GGUF is recognised by its suffix, whatever the case.
    source, _ = gguf_files["F32"]
    path = tmp_path / "MODEL.GGUF"
    shutil.copy(source, path)
    backbone = Gemma2Backbone.from_preset(str(path))
    assert backbone.vocabulary_size == VOCABULARY


def test_export_then_import_round_trip(tmp_path):
    """Our model -> `export_to_gguf` (F32) -> `from_preset`: the same model."""
    from sentencepiece import sentencepiece_model_pb2

    from keras_gemma2 import Gemma2CausalLMPreprocessor, Gemma2Tokenizer
    from tests.conftest import TINY_BACKBONE_CONFIG, randomize_weights

    config = {
        **TINY_BACKBONE_CONFIG,
        "vocabulary_size": VOCABULARY,
        "query_pre_attn_scalar": TINY_BACKBONE_CONFIG["head_dim"],
    }
    backbone = randomize_weights(Gemma2Backbone(**config, dtype="float32"), seed=5)
    tokenizer = Gemma2Tokenizer(proto=PRESET_VOCABULARY)
    causal_lm = Gemma2CausalLM(backbone, Gemma2CausalLMPreprocessor(tokenizer))
    path = str(tmp_path / "ours.gguf")
    causal_lm.export_to_gguf(path, dtype="f32", modelfile=False)
    loaded = Gemma2CausalLM.from_preset(path, dtype="float32")
    ignored = ("name",)
    assert {
        key: value
        for key, value in loaded.backbone.get_config().items()
        if key not in ignored
    } == {
        key: value for key, value in backbone.get_config().items() if key not in ignored
    }
    difference = np.abs(
        keras_logits(loaded, TOKEN_IDS) - keras_logits(causal_lm, TOKEN_IDS)
    ).max()
    assert difference <= 1e-5, difference
    # The vocabulary comes back piece for piece (the turn markers
    # user-defined again after the file typed them CONTROL).
    original, rebuilt = (
        sentencepiece_model_pb2.ModelProto.FromString(proto)
        for proto in (tokenizer.proto, loaded.preprocessor.tokenizer.proto)
    )
    assert [(p.piece, p.score, p.type) for p in rebuilt.pieces] == [
        (p.piece, p.score, p.type) for p in original.pieces
    ]


def test_header_parser_agrees_with_gguf_reader(gguf_files):
    """Our header parser reads what the `gguf` package's own reader reads."""
    from keras_gemma2.checkpoints.gguf_header import read_header

    path, _ = gguf_files["Q8_0"]
    reader = gguf.GGUFReader(path)
    _, metadata, tensors, data_offset = read_header(np.memmap(path, "uint8", "r"))
    assert data_offset == reader.data_offset
    expected = {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.")
    }
    assert metadata.keys() == expected.keys()
    for key, value in expected.items():
        assert metadata[key] == pytest.approx(value), key
    assert [
        (tensor.name, tensor.shape, tensor.type_id, tensor.offset) for tensor in tensors
    ] == [
        (
            tensor.name,
            tuple(reversed(tensor.shape.tolist())),
            int(tensor.tensor_type),
            tensor.data_offset,
        )
        for tensor in reader.tensors
    ]


@pytest.mark.parametrize(
    "offset, content, pattern",
    [(4, b"\x00\x00\x00\x03", "version"), (24, b"\xff" * 8, "truncated")],
)
def test_corrupt_header(gguf_files, tmp_path, offset, content, pattern):
    # A big-endian version field; a key length far past the end of the file.
    source, _ = gguf_files["F32"]
    with open(source, "rb") as file:
        data = bytearray(file.read())
    data[offset : offset + len(content)] = content
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    expect_refused(path, ValueError, pattern)
