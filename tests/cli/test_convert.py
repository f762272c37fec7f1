"""`keras-gemma2 convert`: HF checkpoint -> keras_gemma2 preset, same logits."""

import os

import numpy as np

from keras_gemma2 import Gemma2CausalLM
from keras_gemma2.cli import main
from tests.conftest import TINY_HF_CONFIG, hf_logits, random_token_ids


def test_convert_hf_to_keras_preset(hf_checkpoint, tmp_path, capsys):
    source, model = hf_checkpoint(seed=21)
    destination = str(tmp_path / "converted")
    assert (
        main(["convert", source, destination, "--to", "keras", "--dtype", "float32"])
        == 0
    )
    output = capsys.readouterr().out
    total = 2 + 11 * TINY_HF_CONFIG["num_hidden_layers"]
    assert f"Loading {total} tensors" in output
    assert f"{total}/{total}" in output  # the progress bar reached the end
    token_ids = random_token_ids(1, 12, TINY_HF_CONFIG["vocab_size"], seed=21)
    logits = Gemma2CausalLM.from_preset(destination).predict(
        {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}, verbose=0
    )
    assert np.abs(logits - hf_logits(model, token_ids)).max() <= 1e-4


def test_convert_refuses_existing_destination(hf_checkpoint, tmp_path, capsys):
    source, _ = hf_checkpoint(seed=22)
    destination = tmp_path / "exists"
    destination.mkdir()
    assert main(["convert", source, str(destination), "--to", "keras"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(destination) == []


def test_convert_reports_bad_source_without_traceback(tmp_path, capsys):
    code = main(
        ["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "keras"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "missing" in error and "Traceback" not in error
