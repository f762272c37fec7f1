"""`keras-gemma2 run` and `chat` stream text from a saved preset."""

import builtins

import pytest

from keras_gemma2 import (
    Gemma2CausalLM,
    cli,
)
from keras_gemma2.cli import main
from tests.text_fixtures import make_text_causal_lm


@pytest.fixture(scope="module")
def preset(gemma_vocabulary, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("cli") / "preset")
    make_text_causal_lm(gemma_vocabulary, sequence_length=64).save_to_preset(directory)
    return directory


def test_run_streams_the_same_text_as_generate(preset, capsys):
    prompt = "import os"
    assert (
        main(["run", preset, prompt, "--max-new-tokens", "8", "--temperature", "0"])
        == 0
    )
    printed = capsys.readouterr().out
    causal_lm = Gemma2CausalLM.from_preset(preset)
    causal_lm.compile(sampler="greedy")
    tokens = len(causal_lm.preprocessor.tokenizer.tokenize(prompt))
    expected = causal_lm.generate(prompt, max_length=tokens + 1 + 8)
    assert printed.rstrip("\n") == expected


def test_chat_keeps_the_conversation(preset, capsys, monkeypatch):
    lines = iter(["hello", "and again", "/bye"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    prompts, answers = [], []
    original = cli.stream

    def spy(causal_lm, prompt, max_new_tokens, out):
        prompts.append(prompt)
        answers.append(original(causal_lm, prompt, max_new_tokens, out))
        return answers[-1]

    monkeypatch.setattr(cli, "stream", spy)
    assert main(["chat", preset, "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert len(prompts) == 2
    assert (
        prompts[0] == "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
    )
    assert prompts[1] == (
        prompts[0] + answers[0] + "<end_of_turn>\n"
        "<start_of_turn>user\nand again<end_of_turn>\n<start_of_turn>model\n"
    )
    printed = capsys.readouterr().out
    assert answers[0] in printed and answers[1] in printed


def test_run_rejects_bad_flags(preset, capsys):
    assert main(["run", preset, "x", "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert main(["run", preset, "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
