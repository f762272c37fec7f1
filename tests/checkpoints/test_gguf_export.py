"""Export to GGUF: the file holds HF's Gemma 2 weights as llama.cpp names them.

References, none of them our writer: a random `transformers`
`Gemma2ForCausalLM` (its state dict and config), loaded into our model from
the saved HF directory; llama.cpp's `gemma2` conventions spelled out below as
literals (tensor names, norm weights stored as `1 + w`, `[out, in]` matrices);
SentencePiece's own API for the vocabulary; a float64 numpy LoRA merge. The
file is read back with the `gguf` package's `GGUFReader`. llama.cpp running
the file is tested in `test_gguf_llamacpp.py`.
"""

import os
import types

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.checkpoints import gguf_export
from keras_gemma2.checkpoints.gguf_export import export_to_gguf
from keras_gemma2.models.tokenizer import Gemma2Tokenizer
from tests.checkpoints.tiny_sentencepiece import train_sentencepiece
from tests.conftest import TINY_BACKBONE_CONFIG, make_hf_model, randomize_weights

gguf = pytest.importorskip("gguf", reason="the `gguf` package is not installed")

# Every in-dimension a multiple of 32 so each matrix is Q8_0-quantizable;
# query_pre_attn_scalar = head_dim, as llama.cpp computes below 46 layers.
HF_OVERRIDES = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
}
# llama.cpp's gemma2 tensor names (llama-arch.cpp) -> HF names.
LLAMA_CPP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
for _hf, _gguf in {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}.items():
    for _layer in range(4):
        LLAMA_CPP_NAMES[f"blk.{_layer}.{_gguf}.weight"] = (
            f"model.layers.{_layer}.{_hf}.weight"
        )


@pytest.fixture(scope="module")
def vocabulary():
    return train_sentencepiece()  # 90 pieces for a 96-row embedding


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vocabulary):
    """`(hf_model, causal_lm)`: a random HF model and ours loaded from its files."""
    hf_model = make_hf_model(seed=3, **HF_OVERRIDES)
    directory = str(tmp_path_factory.mktemp("hf"))
    hf_model.save_pretrained(directory)
    causal_lm = Gemma2CausalLM.from_preset(directory)
    causal_lm.preprocessor = None
    return hf_model, causal_lm


@pytest.fixture(scope="module")
def exported(reference, vocabulary, tmp_path_factory):
    """Factory: export `reference` at `dtype` once; returns `(path, reader)`."""
    cache = {}

    def export(dtype):
        if dtype not in cache:
            path = str(tmp_path_factory.mktemp(dtype) / "tiny.gguf")
            export_to_gguf(
                reference[1], path, dtype=dtype, tokenizer=Gemma2Tokenizer(vocabulary)
            )
            cache[dtype] = path, gguf.GGUFReader(path)
        return cache[dtype]

    return export


def hf_tensor(hf_model, gguf_name):
    """The HF tensor as llama.cpp stores it: float32, norms as `1 + w`."""
    hf_name = LLAMA_CPP_NAMES[gguf_name]
    value = hf_model.state_dict()[hf_name].float().numpy()
    return value + 1.0 if hf_name.endswith("norm.weight") else value


def field_value(reader, key):
    field = reader.fields[key]
    values = [field.contents(i) for i in range(len(field.data))]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return field.contents()
    return values[0]


def tensors(reader):
    return {tensor.name: tensor for tensor in reader.tensors}


def test_f32_tensors_equal_hf_state_dict(reference, exported):
    hf_model, _ = reference
    _, reader = exported("f32")
    found = tensors(reader)
    assert set(found) == set(LLAMA_CPP_NAMES)
    for name, tensor in found.items():
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        expected = hf_tensor(hf_model, name)
        actual = np.asarray(tensor.data).reshape(expected.shape)
        # GGUF's ne order is the numpy shape reversed: [in, out] for linears.
        assert tuple(int(n) for n in tensor.shape) == expected.shape[::-1], name
        np.testing.assert_array_equal(actual, expected, err_msg=name)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_tensors_round_hf_values(reference, exported, dtype):
    hf_model, _ = reference
    _, reader = exported(dtype)
    half = {"f16": np.float16, "bf16": ml_dtypes.bfloat16}[dtype]
    for name, tensor in tensors(reader).items():
        expected = hf_tensor(hf_model, name)
        if expected.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(np.asarray(tensor.data), expected)
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType[dtype.upper()], name
        raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        actual = raw.view(half).astype(np.float32).reshape(expected.shape)
        # numpy / ml_dtypes round to nearest even, as llama.cpp does.
        rounded = expected.astype(half).astype(np.float32)
        np.testing.assert_array_equal(actual, rounded, err_msg=name)


def test_q8_0_dequantizes_within_half_a_step(reference, exported):
    hf_model, _ = reference
    _, reader = exported("q8_0")
    for name, tensor in tensors(reader).items():
        expected = hf_tensor(hf_model, name)
        if expected.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        # Q8_0 by hand: blocks of 34 bytes, an fp16 scale then 32 int8 codes.
        blocks = np.asarray(tensor.data).reshape(-1, 34)
        scales = blocks[:, :2].copy().view(np.float16).astype(np.float64)
        codes = blocks[:, 2:].copy().view(np.int8).astype(np.float64)
        actual = (codes * scales).reshape(expected.shape)
        block_max = np.abs(expected.reshape(-1, 32)).max(axis=1, keepdims=True)
        # Half a step of absmax / 127, the fp16 scale's rounding on top.
        bound = (block_max / 127) * (0.5 + 127 * 2.0**-11) + 1e-12
        error = np.abs(actual - expected).reshape(-1, 32)
        assert np.all(error <= bound), name
        assert np.abs(actual - expected).max() > 0  # quantized, not copied


def test_metadata_matches_hf_config(reference, exported):
    config = reference[0].config
    _, reader = exported("f32")
    expected = {
        "general.architecture": "gemma2",
        "general.file_type": 0,
        "gemma2.context_length": 8192,
        "gemma2.embedding_length": config.hidden_size,
        "gemma2.block_count": config.num_hidden_layers,
        "gemma2.feed_forward_length": config.intermediate_size,
        "gemma2.attention.head_count": config.num_attention_heads,
        "gemma2.attention.head_count_kv": config.num_key_value_heads,
        "gemma2.attention.key_length": config.head_dim,
        "gemma2.attention.value_length": config.head_dim,
        "gemma2.attention.sliding_window": config.sliding_window,
    }
    for key, value in expected.items():
        assert field_value(reader, key) == value, key
    floats = {
        "gemma2.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "gemma2.attn_logit_softcapping": config.attn_logit_softcapping,
        "gemma2.final_logit_softcapping": config.final_logit_softcapping,
        "gemma2.rope.freq_base": TINY_ROPE_THETA,
    }
    for key, value in floats.items():
        assert field_value(reader, key) == np.float32(value), key
    assert field_value(exported("q8_0")[1], "general.file_type") == 7


TINY_ROPE_THETA = 500.0  # conftest's TINY_HF_CONFIG rope_theta


def test_tokenizer_matches_sentencepiece(exported, vocabulary):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=vocabulary)
    _, reader = exported("f32")
    size = processor.get_piece_size()
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    scores = field_value(reader, "tokenizer.ggml.scores")
    token_types = field_value(reader, "tokenizer.ggml.token_type")
    rows = TINY_BACKBONE_CONFIG["vocabulary_size"]
    assert len(tokens) == len(scores) == len(token_types) == rows
    assert tokens[:size] == [processor.id_to_piece(i) for i in range(size)]
    np.testing.assert_array_equal(
        np.float32(scores[:size]),
        np.float32([processor.get_score(i) for i in range(size)]),
    )
    # llama.cpp's token types: 2 unknown, 3 control, 5 unused, 1 normal.
    for index in range(size):
        piece = processor.id_to_piece(index)
        if piece in ("<start_of_turn>", "<end_of_turn>") or processor.is_control(index):
            assert token_types[index] == 3, piece
        elif processor.is_unknown(index):
            assert token_types[index] == 2, piece
    assert tokens[size:] == [f"[PAD{i}]" for i in range(size, rows)]
    assert token_types[size:] == [5] * (rows - size)
    ids = {
        "tokenizer.ggml.bos_token_id": processor.piece_to_id("<bos>"),
        "tokenizer.ggml.eos_token_id": processor.piece_to_id("<eos>"),
        "tokenizer.ggml.padding_token_id": processor.piece_to_id("<pad>"),
        "tokenizer.ggml.unknown_token_id": processor.unk_id(),
        "tokenizer.ggml.eot_token_id": processor.piece_to_id("<end_of_turn>"),
    }
    assert ids["tokenizer.ggml.bos_token_id"] == 2
    for key, value in ids.items():
        assert field_value(reader, key) == value, key
    assert field_value(reader, "tokenizer.ggml.model") == "llama"
    assert field_value(reader, "tokenizer.ggml.add_bos_token") is True
    assert field_value(reader, "tokenizer.ggml.add_eos_token") is False
    assert "<start_of_turn>" in field_value(reader, "tokenizer.chat_template")


def test_modelfile_runs_the_gguf_with_gemma_turns(exported):
    path, _ = exported("f32")
    with open(os.path.join(os.path.dirname(path), "Modelfile")) as file:
        text = file.read()
    lines = text.splitlines()
    assert lines[0] == "FROM ./tiny.gguf"
    assert 'PARAMETER stop "<end_of_turn>"' in lines
    assert 'PARAMETER stop "<eos>"' in lines
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    # GEMMA2.md's chat format: a user turn, then the model's turn opened.
    assert "<start_of_turn>user\n{{ $message.Content }}<end_of_turn>\n" in template
    assert "<start_of_turn>model\n" in template
    assert "<bos>" not in template  # llama.cpp adds it (add_bos_token)
    for name in ("temperature", "top_k", "top_p"):
        assert any(line.startswith(f"PARAMETER {name} ") for line in lines)


def same_shapes(reference, **overrides):
    """A backbone shaped like `reference`'s (jax reuses its compiled initializers)."""
    config = {**reference[1].backbone.get_config(), **overrides}
    return Gemma2Backbone.from_config(config)


def test_lora_adapters_are_merged(reference, tmp_path, vocabulary):
    backbone = randomize_weights(same_shapes(reference), seed=1)
    backbone.enable_lora(2, target_names=["query"], alpha=3.0)
    layer = backbone.transformer_layers[1].attention.query_dense
    rng = np.random.RandomState(0)
    for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
        variable.assign(rng.normal(0, 0.5, tuple(variable.shape)).astype("float32"))
    (kernel,) = [v for v in layer.weights if v.path.endswith("/kernel")]
    kernel = keras.ops.convert_to_numpy(kernel).astype(np.float64).reshape(64, 64)
    # W + (alpha / rank) A @ B in float64, as an [in, out] matrix.
    merged = kernel + (3.0 / 2) * (
        keras.ops.convert_to_numpy(layer.lora_kernel_a).astype(np.float64)
        @ keras.ops.convert_to_numpy(layer.lora_kernel_b).astype(np.float64)
    )
    path = str(tmp_path / "lora.gguf")
    export_to_gguf(backbone, path, tokenizer=Gemma2Tokenizer(vocabulary))
    actual = np.asarray(tensors(gguf.GGUFReader(path))["blk.1.attn_q.weight"].data)
    np.testing.assert_allclose(actual, merged.T, rtol=1e-6, atol=1e-6)
    assert np.abs(actual - kernel.T).max() > 0.1  # the adapter is not lost


def test_existing_destination_is_refused(reference, vocabulary, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_to_gguf(reference[1], str(path), tokenizer=Gemma2Tokenizer(vocabulary))
    assert path.read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]
    export_to_gguf(
        reference[1],
        str(path),
        tokenizer=Gemma2Tokenizer(vocabulary),
        modelfile=False,
        overwrite=True,
    )
    assert gguf.GGUFReader(str(path)).fields["general.architecture"]
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]


def test_existing_modelfile_is_refused(reference, vocabulary, tmp_path):
    (tmp_path / "Modelfile").write_text("FROM ./other.gguf\n")
    with pytest.raises(FileExistsError, match="modelfile=False"):
        export_to_gguf(
            reference[1],
            str(tmp_path / "a.gguf"),
            tokenizer=Gemma2Tokenizer(vocabulary),
        )
    assert sorted(os.listdir(tmp_path)) == ["Modelfile"]


def test_failure_mid_write_leaves_nothing(reference, vocabulary, tmp_path):
    seen = []

    def progress(done, total, name):
        seen.append((done, total, name))
        if done == 5:
            raise KeyboardInterrupt("stopped by the user")

    with pytest.raises(KeyboardInterrupt):
        export_to_gguf(
            reference[1],
            str(tmp_path / "model.gguf"),
            tokenizer=Gemma2Tokenizer(vocabulary),
            progress=progress,
        )
    assert seen[0] == (1, 2 + 4 * 11, "token_embd.weight")
    assert len(seen) == 5
    assert os.listdir(tmp_path) == []


def test_leftover_of_a_killed_export_is_removed(reference, vocabulary, tmp_path):
    # What a SIGKILLed export leaves: its staging file, named with a dead pid.
    leftover = tmp_path / ".model.gguf.partial-999999999-abc123"
    leftover.write_bytes(b"GGUF half written")
    export_to_gguf(
        reference[1],
        str(tmp_path / "model.gguf"),
        tokenizer=Gemma2Tokenizer(vocabulary),
        modelfile=False,
    )
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]


def test_bad_dtype_is_refused(reference, vocabulary, tmp_path):
    with pytest.raises(ValueError, match=r"`dtype`.*'q4_0'"):
        export_to_gguf(
            reference[1],
            str(tmp_path / "a.gguf"),
            dtype="q4_0",
            tokenizer=Gemma2Tokenizer(vocabulary),
        )
    assert os.listdir(tmp_path) == []


def test_query_scaling_llama_cpp_cannot_express_is_refused(
    reference, vocabulary, tmp_path
):
    # Queries scaled by 12 ** -0.5 with head_dim 16 (conftest's tiny config).
    backbone = same_shapes(reference, query_pre_attn_scalar=12)
    with pytest.raises(ValueError, match=r"query_pre_attn_scalar=16.*Received.*=12"):
        export_to_gguf(
            backbone, str(tmp_path / "a.gguf"), tokenizer=Gemma2Tokenizer(vocabulary)
        )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "num_layers, scalar, accepted",
    [(46, 144, True), (46, 128, False), (26, 128, True), (26, 144, False)],
)
def test_llama_cpp_query_scaling_rule(num_layers, scalar, accepted):
    # The 27B's shape: hidden 4608, 32 heads of 128; 4608 // 32 = 144.
    backbone = types.SimpleNamespace(
        num_layers=num_layers,
        hidden_dim=4608,
        num_query_heads=32,
        head_dim=128,
        query_pre_attn_scalar=scalar,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
    )
    if accepted:
        gguf_export.check_expressible(backbone)
    else:
        with pytest.raises(ValueError, match="query_pre_attn_scalar"):
            gguf_export.check_expressible(backbone)


@pytest.mark.parametrize("cap", ["attention_logit_soft_cap", "final_logit_soft_cap"])
def test_missing_soft_cap_is_refused(cap):
    backbone = types.SimpleNamespace(
        num_layers=4,
        hidden_dim=64,
        num_query_heads=4,
        head_dim=16,
        query_pre_attn_scalar=16,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
    )
    setattr(backbone, cap, None)
    with pytest.raises(ValueError, match=f"{cap}=None"):
        gguf_export.check_expressible(backbone)


def test_model_without_tokenizer_is_refused(reference, tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        export_to_gguf(reference[1], str(tmp_path / "a.gguf"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("chunk_bytes", [2**18])
def test_export_never_holds_a_whole_converted_embedding(
    vocabulary, tmp_path, monkeypatch, chunk_bytes
):
    import tracemalloc

    # Chunks of 128 rows here (8 MiB of float32 by default).
    monkeypatch.setattr(gguf_export, "_CHUNK_BYTES", chunk_bytes)
    # The embedding is 96% of this model: a whole copy of it (what a
    # non-streaming writer makes) would be far past 0.3x the model.
    backbone = Gemma2Backbone(
        **{
            **TINY_BACKBONE_CONFIG,
            "vocabulary_size": 8192,
            "hidden_dim": 512,
            "intermediate_dim": 32,
            "num_layers": 1,
            "num_query_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
        }
    )
    model_bytes = sum(int(np.prod(v.shape)) * 4 for v in backbone.weights)
    tracemalloc.start()
    try:
        export_to_gguf(
            backbone, str(tmp_path / "a.gguf"), tokenizer=Gemma2Tokenizer(vocabulary)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    embedding = np.asarray(
        tensors(gguf.GGUFReader(str(tmp_path / "a.gguf")))["token_embd.weight"].data
    )
    np.testing.assert_array_equal(
        embedding.reshape(8192, 512),
        keras.ops.convert_to_numpy(backbone.token_embedding.embeddings),
    )
    # numpy allocations are traced: one row chunk, one block's matrices.
    assert peak < 0.3 * model_bytes, (peak, model_bytes)
