"""train_sentencepiece: Gemma's ids and settings against literal pieces, the preset."""

import os

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from keras_gemma2.data import train_sentencepiece

PRESET_VOCABULARY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "keras_gemma2",
    "presets",
    "gemma2_tiny_python",
    "assets",
    "tokenizer",
    "vocabulary.spm",
)
SMALL_CORPUS = ["the quick brown fox jumps over the lazy dog 2024"] * 4


def stdlib_texts():
    stdlib = os.path.dirname(os.__file__)
    texts = []
    for name in ("os.py", "textwrap.py", "string.py"):
        with open(os.path.join(stdlib, name), encoding="utf-8") as file:
            texts.append(file.read())
    return texts + ["Numbers 1234567890, 3.14159 and 2024."] * 20


def parse(proto):
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    return model


@pytest.fixture(scope="module")
def gemma_layout():
    """A vocabulary trained with the defaults, plus the preset's line-break piece."""
    proto = train_sentencepiece(
        stdlib_texts(),
        vocabulary_size=600,
        user_defined_pieces=["<start_of_turn>", "<end_of_turn>", "\n"],
    )
    return sentencepiece.SentencePieceProcessor(model_proto=proto), proto


def test_default_ids_are_gemmas(gemma_layout):
    processor, _ = gemma_layout
    assert processor.GetPieceSize() == 600
    pieces = [processor.IdToPiece(i) for i in range(processor.GetPieceSize())]
    assert pieces[:6] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"]
    assert pieces[6:106] == [f"<unused{i}>" for i in range(100)]
    assert pieces[106:109] == ["<start_of_turn>", "<end_of_turn>", "\n"]
    assert pieces[109:365] == [f"<0x{i:02X}>" for i in range(256)]
    assert all(processor.IsControl(i) for i in (0, 1, 2, *range(4, 106)))
    assert processor.IsUnknown(3)
    assert not any(processor.IsControl(i) for i in range(106, 109))


def test_gemma_text_handling(gemma_layout):
    processor, _ = gemma_layout
    # User-defined pieces: their literal text is always the one piece.
    assert processor.EncodeAsIds("<start_of_turn>user\nhi<end_of_turn>")[:1] == [106]
    assert processor.EncodeAsIds("\n") == [108]
    # Digits one by one.
    assert processor.EncodeAsPieces("12345") == ["1", "2", "3", "4", "5"]
    # No dummy prefix: a text's first piece has no leading "▁".
    assert not processor.EncodeAsPieces("import os")[0].startswith("▁")
    # Whitespace kept as it is, no normalization: decoding gives the text back.
    for text in ["a   b\t\tc  ", "  x", "ﬁ full-width Ａ"]:
        assert processor.DecodeIds(processor.EncodeAsIds(text)) == text
    # Characters outside the vocabulary are spelled as their UTF-8 bytes.
    assert processor.EncodeAsPieces("𓂀") == ["<0xF0>", "<0x93>", "<0x82>", "<0x80>"]


def test_settings_reproduce_the_shipped_preset(gemma_layout):
    # The preset was trained with vocabulary_size=4096 on the whole train
    # split; every other setting must be the one recorded in its file.
    _, proto = gemma_layout
    with open(PRESET_VOCABULARY, "rb") as file:
        shipped = parse(file.read())
    trained = parse(proto)
    assert trained.normalizer_spec == shipped.normalizer_spec
    assert trained.trainer_spec.vocab_size == 600
    trained.trainer_spec.vocab_size = shipped.trainer_spec.vocab_size
    assert trained.trainer_spec == shipped.trainer_spec


def test_control_and_user_defined_pieces_are_arguments():
    proto = train_sentencepiece(
        SMALL_CORPUS,
        vocabulary_size=40,
        control_pieces=["<mask>"],
        user_defined_pieces=["<end_of_turn>", "<start_of_turn>"],
        byte_fallback=False,
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert [processor.IdToPiece(i) for i in range(7)] == [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<mask>",
        "<end_of_turn>",
        "<start_of_turn>",
    ]
    # No byte pieces: an unseen character is <unk>.
    assert "<0x00>" not in {processor.IdToPiece(i) for i in range(40)}
    assert processor.EncodeAsIds("Q") == [3]


def test_character_coverage_reaches_the_model():
    texts = ["aaaa bbbb aaaa bbbb"] * 50 + ["é"]
    ids = {}
    for coverage in (0.99, 1.0):
        proto = train_sentencepiece(
            texts,
            vocabulary_size=20,
            control_pieces=(),
            byte_fallback=False,
            character_coverage=coverage,
        )
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        ids[coverage] = processor.EncodeAsIds("é")
    # 1 of 951 characters: kept at full coverage, <unk> (3) at 99%.
    assert ids[1.0] != [3]
    assert ids[0.99] == [3]


def test_deterministic_and_blank_lines_are_left_out():
    arguments = {"vocabulary_size": 40, "control_pieces": (), "byte_fallback": False}
    first = train_sentencepiece(SMALL_CORPUS, **arguments)
    assert train_sentencepiece(SMALL_CORPUS, **arguments) == first
    # Enough whitespace-only lines that, kept, they would add "▁▁" pieces.
    whitespace = "\n".join(["      ", "\t  "] * 20)
    with_blank_lines = [
        "\n\n".join(SMALL_CORPUS[:2]),
        whitespace + "\n" + SMALL_CORPUS[2],
    ]
    assert (
        train_sentencepiece(with_blank_lines + SMALL_CORPUS[3:], **arguments) == first
    )


def test_bad_arguments():
    with pytest.raises(TypeError, match="`texts`.*single str"):
        train_sentencepiece("the quick brown fox", vocabulary_size=40)
    # 4 special + 102 control + 2 turn + 256 byte pieces are reserved.
    with pytest.raises(ValueError, match=r"above the 364 reserved.*=364"):
        train_sentencepiece(SMALL_CORPUS, vocabulary_size=364)
    with pytest.raises(ValueError, match=r"`vocabulary_size`.*=True"):
        train_sentencepiece(SMALL_CORPUS, vocabulary_size=True)
    with pytest.raises(RuntimeError, match="Vocabulary size too high"):
        train_sentencepiece(
            SMALL_CORPUS, vocabulary_size=500, control_pieces=(), byte_fallback=False
        )
