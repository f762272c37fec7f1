"""CLI edges: `--backend=X`, network errors as one line, chat history trimming."""

import os
import socket
import sys

import keras
import pytest
from keras import ops

from keras_gemma2 import Gemma2Tokenizer, cli, format_chat
from keras_gemma2.checkpoints import handles
from keras_gemma2.cli import main
from tests.text_fixtures import make_text_causal_lm


def other_backend():
    """A backend other than the one this test runs on (jax imports fastest)."""
    return "torch" if keras.config.backend() == "jax" else "jax"


class Executed(Exception):
    pass


@pytest.mark.parametrize("form", ["equals", "space"])
def test_backend_flag_re_executes_in_both_forms(form, monkeypatch):
    backend = other_backend()
    flag = [f"--backend={backend}"] if form == "equals" else ["--backend", backend]
    calls = []

    def execve(path, args, env):
        calls.append((args, env["KERAS_BACKEND"]))
        raise Executed

    monkeypatch.setattr(os, "execve", execve)
    argv = ["run", "./missing", "x", *flag]
    with pytest.raises(Executed):
        main(argv)
    assert calls == [([sys.executable, "-m", "keras_gemma2.cli", *argv], backend)]
    # Already on the backend asked for: no re-execution.
    same = keras.config.backend()
    assert main(["run", "./missing", "x", f"--backend={same}"]) == 2
    assert len(calls) == 1


def refuse_connections(monkeypatch):
    def refuse(address, timeout=None):
        raise OSError("network is unreachable")

    monkeypatch.delenv(handles.OFFLINE_VARIABLE, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(
    "argv, host",
    [
        (["run", "hf://google/gemma-2-2b", "x"], "huggingface.co"),
        (["chat", "gemma2_instruct_2b_en"], "www.kaggle.com"),
        (
            ["convert", "kaggle://keras/gemma2/keras/gemma2_2b_en/2", "out"],
            "www.kaggle.com",
        ),
    ],
    ids=["run-hf", "chat-keras-hub-name", "convert-kaggle"],
)
def test_network_errors_are_one_line(argv, host, monkeypatch, capsys, tmp_path):
    refuse_connections(monkeypatch)
    if argv[0] == "convert":
        argv = [*argv[:2], str(tmp_path / argv[2]), "--to", "keras"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("keras-gemma2: error: Cannot fetch")
    assert f"{host} is unreachable" in last and "Instead," in last


@pytest.fixture(scope="module")
def preset(gemma_vocabulary, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("cli_edges") / "preset")
    make_text_causal_lm(gemma_vocabulary, sequence_length=64).save_to_preset(directory)
    return directory


def test_chat_keeps_the_most_recent_turns_that_fit(preset, monkeypatch, capsys):
    context, max_new_tokens = 40, 4
    typed = ["alpha beta gamma", "delta epsilon", "lambda " * 60, "zeta eta"]
    typed += ["mu", "/bye"]
    lines = iter(typed)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    turns, original = [], cli.stream

    def spy(causal_lm, prompt, max_new_tokens, out):
        turns.append((prompt, original(causal_lm, prompt, max_new_tokens, out)))
        return turns[-1][1]

    monkeypatch.setattr(cli, "stream", spy)
    argv = ["chat", preset, "--temperature", "0", "--max-new-tokens"]
    argv += [str(max_new_tokens), "--context-length", str(context)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    tokenizer = Gemma2Tokenizer.from_preset(preset)

    def length(messages):  # `<bos>` + the rendered turns
        text = format_chat(messages)
        return 1 + len(ops.convert_to_numpy(tokenizer.tokenize(text)))

    # The over-long message is refused; the chat goes on with its history.
    assert "It was not sent; the history is kept." in err
    sent = [line for line in typed[:-1] if not line.startswith("lambda")]
    assert len(turns) == len(sent)
    # Reference: the whole conversation so far, then the most recent
    # user/model pairs that fit with room for the answer; one more would not.
    # A note each time the kept window's start moves on.
    history, drops, start = [], 0, 0
    for (prompt, answer), line in zip(turns, sent, strict=True):
        history.append({"role": "user", "content": line})
        kept = history[-1:]
        while len(kept) < len(history):
            longer = history[-len(kept) - 2 :]
            if length(longer) + max_new_tokens > context:
                break
            kept = longer
        drops += len(history) - len(kept) > start
        start = len(history) - len(kept)
        assert prompt == format_chat(kept)
        assert length(kept) + max_new_tokens <= context
        history.append({"role": "model", "content": answer})
    assert drops >= 2
    assert err.count("oldest message(s) to fit the 40-token context") == drops
