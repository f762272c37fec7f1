"""A small SentencePiece vocabulary laid out like Gemma's, trained per session.

Gemma's `tokenizer.model` is a BPE SentencePiece model with byte fallback,
digits split one by one, no normalization, no dummy prefix and whitespace kept
as it is (runs of spaces become pieces of their own). The vocabulary trained
here uses the same options and puts the special pieces at Gemma's ids:
`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, control pieces `<mask>`,
`[multimodal]`, `<unused0>`... filling 4..105, then the user-defined
`<start_of_turn>`=106 and `<end_of_turn>`=107 (user-defined, so that their
literal text in a string maps to the single id, as in Gemma).

`tests/conftest.py` imports the fixture, so every test can request it.
"""

import io
import os

import pytest

GEMMA_SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<start_of_turn>": 106,
    "<end_of_turn>": 107,
}
# Control pieces between <unk> (3) and <start_of_turn> (106), as in Gemma.
CONTROL_PIECES = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(100)]
TURN_PIECES = ["<start_of_turn>", "<end_of_turn>"]

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


def train_vocabulary(path, vocabulary_size=800, turn_pieces=TURN_PIECES):
    """Train a Gemma-style BPE SentencePiece model and write it to `path`."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocabulary_size,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=CONTROL_PIECES,
        user_defined_symbols=list(turn_pieces),
        # Gemma's normalizer and trainer settings.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        split_by_whitespace=True,
        split_by_unicode_script=True,
        split_by_number=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        max_sentence_length=100_000,
        num_threads=1,
        minloglevel=2,
    )
    with open(path, "wb") as file:
        file.write(model.getvalue())
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
