"""`keras-gemma2 convert --to gguf`: an HF checkpoint becomes a GGUF + Modelfile.

Reference: the HF model's own state dict, read back from the GGUF file with
the `gguf` package's reader (Q8_0 decoded by hand).
"""

import os

import numpy as np
import pytest

from keras_gemma2.cli import main
from tests.checkpoints.tiny_sentencepiece import train_sentencepiece
from tests.conftest import make_hf_model

gguf = pytest.importorskip("gguf", reason="the `gguf` package is not installed")

# query_pre_attn_scalar = head_dim (what llama.cpp computes), rows of 32s.
HF_OVERRIDES = {
    "vocab_size": 90,  # the SentencePiece model's pieces
    "hidden_size": 64,
    "intermediate_size": 96,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """`(directory, hf_model)`: an HF checkpoint with a SentencePiece model."""
    model = make_hf_model(seed=31, **HF_OVERRIDES)
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes(train_sentencepiece())
    return str(directory), model


def test_convert_to_q8_0_gguf_with_modelfile(source, tmp_path, capsys):
    directory, model = source
    destination = str(tmp_path / "tiny.gguf")
    arguments = ["convert", directory, destination, "--to", "gguf", "--type", "q8_0"]
    assert main(arguments) == 0
    output = capsys.readouterr().out
    assert "Writing" in output and "46/46" in output  # 2 + 4 blocks * 11
    assert "ollama create" in output
    assert sorted(os.listdir(tmp_path)) == ["Modelfile", "tiny.gguf"]
    reader = gguf.GGUFReader(destination)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    # Q8_0 by hand: 34-byte blocks, an fp16 scale then 32 int8 codes.
    query = tensors["blk.2.attn_q.weight"]
    assert query.tensor_type == gguf.GGMLQuantizationType.Q8_0
    blocks = np.asarray(query.data).reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    values = (blocks[:, 2:].copy().view(np.int8) * scale).reshape(64, 64)
    expected = model.state_dict()["model.layers.2.self_attn.q_proj.weight"].numpy()
    assert np.abs(values - expected).max() <= np.abs(expected).max() / 127
    norm = tensors["output_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(
        np.asarray(norm.data), model.state_dict()["model.norm.weight"].numpy() + 1
    )


def test_convert_refuses_gguf_flags_for_other_formats(source, tmp_path, capsys):
    arguments = ["convert", source[0], str(tmp_path / "out"), "--to", "keras"]
    assert main([*arguments, "--type", "q8_0"]) == 2
    assert "--type applies to --to gguf only" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_convert_refuses_existing_modelfile_before_loading(source, tmp_path, capsys):
    (tmp_path / "Modelfile").write_text("FROM ./other.gguf\n")
    arguments = ["convert", source[0], str(tmp_path / "a.gguf"), "--to", "gguf"]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "Modelfile" in error and "--no-modelfile" in error
    assert sorted(os.listdir(tmp_path)) == ["Modelfile"]
