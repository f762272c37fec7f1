"""A small SentencePiece vocabulary laid out like Gemma's, trained per session.

Trained with `keras_gemma2.data.train_sentencepiece`, so it has Gemma's
layout and settings (BPE, byte fallback, digits split one by one, no
normalization, no dummy prefix, whitespace kept as it is): `<pad>`=0,
`<eos>`=1, `<bos>`=2, `<unk>`=3, control pieces `<mask>`, `[multimodal]`,
`<unused0>`... filling 4..105, then the user-defined `<start_of_turn>`=106
and `<end_of_turn>`=107 (user-defined, so that their literal text in a
string maps to the single id, as in Gemma). Every character of the corpus
gets a piece (`character_coverage=1.0`); characters outside it go through
byte fallback.

`tests/conftest.py` imports the fixture, so every test can request it.
"""

import os

import pytest

from keras_gemma2.data import GEMMA_TURN_PIECES, train_sentencepiece

GEMMA_SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<start_of_turn>": 106,
    "<end_of_turn>": 107,
}

# Sentences in many scripts plus emoji (some outside the training alphabet,
# so they go through byte fallback).
UNICODE_SENTENCES = [
    "Grüße aus Köln! Ça va? ¿Qué tal? Ærøskøbing.",
    "日本語のテキストを分割します。中文也可以。한국어 문장입니다.",
    "Привет, мир! Γειά σου Κόσμε! שלום עולם! مرحبا بالعالم!",
    "Emoji: 🙂 🚀 🎉 👍🏽 — and “quotes” in ‘text’ … ok",
    "Tabs\tand  double  spaces,   triple spaces and trailing   ",
    "Numbers 1234567890, 3.14159, -42 and 1e-6.",
]


def corpus_lines():
    """Training text: a few Python standard-library files plus `UNICODE_SENTENCES`."""
    stdlib = os.path.dirname(os.__file__)
    lines = []
    for name in ("os.py", "textwrap.py", "string.py", "json/encoder.py"):
        with open(os.path.join(stdlib, name), encoding="utf-8") as file:
            lines.extend(file.read().splitlines())
    return lines + UNICODE_SENTENCES * 4


def train_vocabulary(path, vocabulary_size=800, turn_pieces=GEMMA_TURN_PIECES):
    """Train a Gemma-style BPE SentencePiece model and write it to `path`."""
    proto = train_sentencepiece(
        corpus_lines(),
        vocabulary_size,
        user_defined_pieces=turn_pieces,
        character_coverage=1.0,
    )
    with open(path, "wb") as file:
        file.write(proto)
    return str(path)


@pytest.fixture(scope="session")
def gemma_vocabulary(tmp_path_factory):
    """Path of a trained `tokenizer.model`, alone in a Hugging Face-style folder."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("gemma_vocabulary")
    path = train_vocabulary(directory / "tokenizer.model")
    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    for piece, expected in GEMMA_SPECIAL_IDS.items():
        if processor.PieceToId(piece) != expected:
            raise RuntimeError(
                f"The test vocabulary put {piece} at {processor.PieceToId(piece)}, "
                f"expected {expected} as in Gemma's vocabulary."
            )
    return path


def make_text_causal_lm(vocabulary_path, sequence_length):
    """A tiny random `Gemma2CausalLM` with a preprocessor over `vocabulary_path`.

    Two layers (one local with window 4, one global), GQA: small enough for
    text-level tests (generate, streaming, the CLI) to run in seconds.
    """
    from keras_gemma2 import (
        Gemma2Backbone,
        Gemma2CausalLM,
        Gemma2CausalLMPreprocessor,
        Gemma2Tokenizer,
    )

    tokenizer = Gemma2Tokenizer(proto=vocabulary_path)
    backbone = Gemma2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=24,
        head_dim=8,
        sliding_window_size=4,
    )
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    return Gemma2CausalLM(backbone, preprocessor)
