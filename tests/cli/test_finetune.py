"""`keras-gemma2 finetune`: JSONL rows -> LoRA fit -> a preset that loads and generates.

Two real runs on the shipped `gemma2_tiny_python` preset (module fixtures):
float LoRA with the adapter merged, and int8 QLoRA with the adapter kept.
The response loss is recomputed here from literal token lists (prompt and
response tokenized apart, `<bos>` before, `<eos>` after) and a float64
log-softmax, not with the package's own loss code.
"""

import contextlib
import io
import json
import os

import h5py
import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2CausalLM
from keras_gemma2.cli import main
from keras_gemma2.training.finetune import load_finetuned
from keras_gemma2.training.sft_jsonl import bundled_dataset_path, read_sft_jsonl

BASE = "gemma2_tiny_python"
# Eight training rows of distinct tasks, seen many times: enough for the
# tiny model to learn them by heart in a few seconds.
ROWS = read_sft_jsonl(bundled_dataset_path("python_instructions"))[:8]
FLAGS = [
    "--lora-rank",
    "8",
    "--epochs",
    "12",
    "--batch-size",
    "4",
    "--learning-rate",
    "2e-2",
    "--lora-targets",
    "all",
    "--sequence-length",
    "48",
]


def write_jsonl(path, rows):
    with open(path, "w") as file:
        for row in rows:
            file.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", ROWS)


def finetune_once(tmp_path_factory, data, *extra):
    """`(out, finetune.json, printed text)` of one `finetune` run."""
    out = str(tmp_path_factory.mktemp("finetune") / "tuned")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["finetune", BASE, data, "--out", out, *FLAGS, *extra]) == 0
    with open(os.path.join(out, "finetune.json")) as file:
        return out, json.load(file), printed.getvalue()


@pytest.fixture(scope="module")
def merged(tmp_path_factory, data):
    return finetune_once(tmp_path_factory, data)


@pytest.fixture(scope="module")
def kept_int8(tmp_path_factory, data):
    return finetune_once(
        tmp_path_factory, data, "--quantize", "int8", "--keep-adapters"
    )


def reference_response_loss(causal_lm, rows):
    """Mean -log p over response tokens and `<eos>`, from literal token lists."""
    tokenizer = causal_lm.preprocessor.tokenizer
    total, count = 0.0, 0
    for row in rows:
        prompt = [int(i) for i in np.asarray(tokenizer.tokenize(row["prompt"]))]
        response = [int(i) for i in np.asarray(tokenizer.tokenize(row["response"]))]
        ids = np.array([tokenizer.start_token_id, *prompt, *response, 1])
        inputs = {
            "token_ids": ids[None, :-1],
            "padding_mask": np.ones((1, len(ids) - 1), bool),
        }
        logits = keras.ops.convert_to_numpy(causal_lm(inputs))[0].astype(np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        # Position p predicts ids[p + 1]; the response starts at 1 + len(prompt).
        for position in range(len(prompt), len(ids) - 1):
            total -= log_probs[position, ids[position + 1]]
            count += 1
    return total / count


def weights_by_path(preset):
    """`{h5 path: array}` of a preset's `model.weights.h5`."""
    found = {}
    with h5py.File(os.path.join(preset, "model.weights.h5"), "r") as file:
        file.visititems(
            lambda name, item: (
                found.__setitem__(name, item[()])
                if isinstance(item, h5py.Dataset)
                else None
            )
        )
    return found


@pytest.fixture(scope="module")
def base_weights():
    from keras_gemma2.checkpoints.preset_loading import resolve_preset

    return weights_by_path(resolve_preset(BASE))


def test_merged_preset_holds_the_trained_model(merged, base_weights):
    out, report, _ = merged
    causal_lm = Gemma2CausalLM.from_preset(out)
    # The loss fell, and the preset's weights give the reported loss,
    # recomputed independently.
    assert report["loss_after"] < 0.5 * report["loss_before"]
    assert reference_response_loss(causal_lm, ROWS) == pytest.approx(
        report["loss_after"], rel=1e-4
    )
    # Merged: no adapter file; only the seven projection kernels of each
    # block (the "all" LoRA targets) differ from the base, every other weight
    # (embedding, norms) is bit-identical.
    assert not os.path.exists(os.path.join(out, "adapter.lora.h5"))
    tuned = weights_by_path(out)
    assert tuned.keys() == base_weights.keys()
    changed = {
        name for name in tuned if not np.array_equal(tuned[name], base_weights[name])
    }
    num_layers = causal_lm.backbone.num_layers
    assert len(changed) == 7 * num_layers, sorted(changed)
    assert not any("norm" in name or "embedding" in name for name in changed)


def test_run_generates_a_learned_response(merged, capsys):
    out, _, _ = merged
    row = ROWS[0]
    capsys.readouterr()
    assert (
        main(
            ["run", out, row["prompt"], "--temperature", "0", "--max-new-tokens", "12"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith(row["prompt"] + row["response"]), printed


def test_progress_bar_shows_the_loss(merged):
    _, report, printed = merged
    assert "Epoch 12/12" in printed and "loss:" in printed
    assert (
        f"Response loss on the training rows: {report['loss_before']:.4f} -> "
        f"{report['loss_after']:.4f}" in printed
    )


def test_kept_adapter_on_unchanged_base(kept_int8, base_weights):
    out, report, _ = kept_int8
    assert report["quantize"] == "int8" and report["adapter"] == "adapter.lora.h5"
    assert report["loss_after"] < 0.5 * report["loss_before"]
    # The preset's weights are the float base, untouched.
    tuned = weights_by_path(out)
    assert tuned.keys() == base_weights.keys()
    assert all(np.array_equal(tuned[k], base_weights[k]) for k in tuned)
    # With its adapter, on the float base, the loss is near the one measured
    # on the int8 base it was trained on (int8 rounding moves it a little).
    causal_lm = load_finetuned(out)
    assert causal_lm.backbone.dtype == "float32"
    loss = reference_response_loss(causal_lm, ROWS)
    assert loss == pytest.approx(report["loss_after"], rel=0.1)
    assert loss < 0.5 * report["loss_before"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2: not valid JSON"),
        ('{"prompt": "def f():\\n"}', 'line 2: the row has no "response"'),
        ('{"prompt": "x", "response": ""}', 'line 2: the row has an empty "response"'),
        ('{"instruction": "x", "output": "y"}', "line 2: the row has neither"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "model", "content": "hello"}]}',
            "line 2: a chat row, but line 1 is a prompt/response row",
        ),
    ],
)
def test_bad_rows_name_the_line(tmp_path, capsys, line, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], line])
    out = tmp_path / "tuned"
    assert main(["finetune", BASE, data, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_chat_must_end_with_the_model(tmp_path, capsys):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [chat])
    assert main(["finetune", BASE, data, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "line 1: the chat ends with a 'user' turn" in err


def test_bad_flags_write_nothing(tmp_path, data, capsys):
    out = tmp_path / "tuned"
    assert main(["finetune", BASE, data, "--out", str(out), "--lora-rank", "0"]) == 2
    assert "lora_rank=0" in capsys.readouterr().err
    assert (
        main(["finetune", BASE, str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    assert main(["finetune", BASE, data, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(out) == []
