"""`keras-gemma2 distill`: teacher preset + student config + JSONL -> a student preset.

One real run (module fixture): the shipped `gemma2_tiny_python` teaches a
two-layer student from a JSON config, over its top 64 tokens. The student's
response loss before and after is recomputed here from literal token lists
and a float64 log-softmax (`tests/cli/test_finetune.reference_response_loss`).
"""

import contextlib
import io
import json
import os

import numpy as np
import pytest

from keras_gemma2 import Gemma2CausalLM
from keras_gemma2.cli import main
from keras_gemma2.training.sft_jsonl import bundled_dataset_path, read_sft_jsonl
from tests.cli.test_finetune import reference_response_loss, write_jsonl

TEACHER = "gemma2_tiny_python"
ROWS = read_sft_jsonl(bundled_dataset_path("python_instructions"))[:8]
STUDENT = {
    "num_layers": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 64,
    "intermediate_dim": 128,
    "head_dim": 32,
    "sliding_window_size": 64,
}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """`(out, distill.json, printed text)` of one run."""
    directory = tmp_path_factory.mktemp("distill")
    data = write_jsonl(directory / "rows.jsonl", ROWS)
    config = directory / "student.json"
    config.write_text(json.dumps(STUDENT))
    out = str(directory / "student")
    printed = io.StringIO()
    flags = ["--out", out, "--top-k", "64", "--temperature", "1.5"]
    flags += ["--epochs", "6", "--batch-size", "4", "--learning-rate", "1e-2"]
    flags += ["--sequence-length", "48", "--seed", "3"]
    with contextlib.redirect_stdout(printed):
        assert main(["distill", TEACHER, str(config), data, *flags]) == 0
    with open(os.path.join(out, "distill.json")) as file:
        return out, json.load(file), printed.getvalue()


def test_the_student_preset_loads_with_its_settings(distilled):
    out, report, printed = distilled
    student = Gemma2CausalLM.from_preset(out)
    config = student.backbone.get_config()
    for name, value in STUDENT.items():
        assert config[name] == value
    assert config["vocabulary_size"] == 4096  # the teacher's
    assert report["top_k"] == 64 and report["temperature"] == 1.5
    assert report["student_parameters"] == student.count_params()
    assert report["student_parameters"] < report["teacher_parameters"]
    assert "Epoch 6/6" in printed and "loss:" in printed
    assert student.generate("def add(a, b):", max_length=24)


def test_the_report_matches_a_float64_reference_and_the_loss_fell(distilled):
    out, report, printed = distilled
    student = Gemma2CausalLM.from_preset(out)
    after = reference_response_loss(student, ROWS)
    np.testing.assert_allclose(report["loss_after"], after, rtol=1e-4)
    assert report["loss_after"] < report["loss_before"] - 1.0
    assert (
        f"Student response loss on the training rows: {report['loss_before']:.4f} "
        f"-> {report['loss_after']:.4f}" in printed
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "0"], "top_k=0"),
        (["--top-k", "5000"], "top_k=5000"),
        (["--temperature", "0"], "temperature=0.0"),
    ],
)
def test_bad_flags_write_nothing(tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS[:2])
    config = tmp_path / "student.json"
    config.write_text(json.dumps(STUDENT))
    out = tmp_path / "student"
    assert main(["distill", TEACHER, str(config), data, "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_student_config(tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS[:2])
    missing = str(tmp_path / "nope.json")
    assert main(["distill", TEACHER, missing, data, "--out", str(tmp_path / "o")]) == 2
    assert "nope.json does not exist" in capsys.readouterr().err
