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


def test_convert_keras_preset_to_transformers(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    source, model = hf_checkpoint(seed=23)
    preset = str(tmp_path / "preset")
    assert main(["convert", source, preset, "--to", "keras", "--dtype", "float32"]) == 0
    exported = str(tmp_path / "exported")
    arguments = ["convert", preset, exported, "--to", "transformers"]
    assert main([*arguments, "--dtype", "float32", "--max-shard-gb", "0.00005"]) == 0
    shards = [n for n in os.listdir(exported) if n.endswith(".safetensors")]
    assert len(shards) > 1
    token_ids = random_token_ids(1, 12, TINY_HF_CONFIG["vocab_size"], seed=23)
    reloaded = AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager"
    )
    difference = np.abs(hf_logits(reloaded, token_ids) - hf_logits(model, token_ids))
    assert difference.max() <= 1e-4
