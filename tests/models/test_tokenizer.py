"""Gemma2Tokenizer against SentencePiece and Hugging Face, special ids, presets."""

import json
import os
import shutil

import keras_hub
import numpy as np
import pytest

from keras_gemma2.data import train_sentencepiece
from keras_gemma2.models.tokenizer import Gemma2Tokenizer
from tests.text_fixtures import GEMMA_SPECIAL_IDS, UNICODE_SENTENCES, train_vocabulary

TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading spaces, inner    runs and trailing   ",
    "tabs\tand\nnewlines\n\n\r\n",
    "def area(radius):\n    return 3.14159 * radius ** 2  # 2024-06-01\n",
    "Emoji 🙂🚀, ZWJ 👩‍👩‍👧, flags 🇫🇷🇯🇵, skin 👍🏽",
    "Combining e\u0301 vs é, NBSP a\u00a0b, zero width a\u200bb",
    "Never seen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓂀 ꙮ",
    "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n",
    "x" * 300,
    *UNICODE_SENTENCES,
]


@pytest.fixture(scope="module")
def tokenizer(gemma_vocabulary):
    return Gemma2Tokenizer(proto=gemma_vocabulary)


@pytest.fixture(scope="module")
def processor(gemma_vocabulary):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=gemma_vocabulary)


def as_list(ids):
    return np.asarray(ids).tolist()


def test_special_token_ids_are_found_by_piece(tokenizer):
    assert tokenizer.pad_token_id == 0
    assert tokenizer.end_token_id == 1
    assert tokenizer.start_token_id == 2
    assert tokenizer.start_of_turn_token_id == 106
    assert tokenizer.end_of_turn_token_id == 107
    assert tokenizer.end_token2_id == 107
    assert sorted(tokenizer.special_token_ids) == sorted(GEMMA_SPECIAL_IDS.values())
    assert sorted(tokenizer.special_tokens) == sorted(GEMMA_SPECIAL_IDS)
    for piece, token_id in GEMMA_SPECIAL_IDS.items():
        assert tokenizer.id_to_token(token_id) == piece


def test_ids_follow_the_vocabulary_not_fixed_numbers():
    # Without Gemma's 102 control pieces the turn markers sit at 4 and 5.
    proto = train_sentencepiece(
        ["the quick brown fox jumps over the lazy dog"] * 3,
        vocabulary_size=40,
        control_pieces=(),
        user_defined_pieces=["<end_of_turn>", "<start_of_turn>"],
        byte_fallback=False,
    )
    tokenizer = Gemma2Tokenizer(proto=proto)
    assert tokenizer.end_of_turn_token_id == 4
    assert tokenizer.start_of_turn_token_id == 5


def test_ids_match_sentencepiece(tokenizer, processor):
    expected = [processor.EncodeAsIds(text) for text in TEXTS]
    batched = tokenizer(TEXTS)
    assert [as_list(ids) for ids in batched] == expected
    for text, ids in zip(TEXTS, expected, strict=True):
        assert as_list(tokenizer(text)) == ids


def test_ids_match_transformers(tokenizer, gemma_vocabulary):
    transformers = pytest.importorskip("transformers")
    reference = transformers.GemmaTokenizer.from_pretrained(
        os.path.dirname(gemma_vocabulary)
    )
    for text in TEXTS:
        expected = reference(text, add_special_tokens=False)["input_ids"]
        assert as_list(tokenizer(text)) == expected, text
        assert tokenizer.detokenize(expected) == reference.decode(expected)


def test_detokenize_inverts_tokenize(tokenizer):
    for text in TEXTS:
        assert tokenizer.detokenize(tokenizer(text)) == text
    assert tokenizer.detokenize(tokenizer(TEXTS)) == TEXTS


def test_tf_data_path_matches_python_path(tokenizer):
    tf = pytest.importorskip("tensorflow")
    dataset = tf.data.Dataset.from_tensor_slices(TEXTS).batch(len(TEXTS))
    (graph_ids,) = list(dataset.map(tokenizer))
    assert graph_ids.to_list() == [as_list(tokenizer(text)) for text in TEXTS]
    (graph_texts,) = list(dataset.map(tokenizer).map(tokenizer.detokenize))
    assert [t.decode("utf-8") for t in graph_texts.numpy()] == TEXTS


def test_vocabulary_without_end_of_turn_is_rejected(tmp_path):
    path = train_vocabulary(
        tmp_path / "tokenizer.model",
        turn_pieces=["<start_of_turn>"],
    )
    with pytest.raises(ValueError, match="<end_of_turn>"):
        Gemma2Tokenizer(proto=path)


def test_special_token_ids_need_a_vocabulary():
    tokenizer = Gemma2Tokenizer()
    assert tokenizer.end_of_turn_token_id is None
    with pytest.raises(ValueError, match="vocabulary"):
        tokenizer.special_token_ids  # noqa: B018


def test_preset_round_trip(tokenizer, tmp_path):
    preset = tmp_path / "preset"
    tokenizer.save_to_preset(str(preset))
    assert os.path.isfile(preset / "tokenizer.json")
    assert os.path.isfile(preset / "assets" / "tokenizer" / "vocabulary.spm")
    with open(preset / "tokenizer.json") as file:
        assert json.load(file)["registered_name"] == "keras_gemma2>Gemma2Tokenizer"
    restored = Gemma2Tokenizer.from_preset(str(preset))
    assert type(restored) is Gemma2Tokenizer
    assert restored.proto == tokenizer.proto
    assert [as_list(ids) for ids in restored(TEXTS)] == [
        as_list(ids) for ids in tokenizer(TEXTS)
    ]
    assert restored.end_of_turn_token_id == 107
    # Saved arguments come back; keyword arguments override them.
    Gemma2Tokenizer(proto=tokenizer.proto, sequence_length=7).save_to_preset(
        str(tmp_path / "fixed")
    )
    assert Gemma2Tokenizer.from_preset(str(tmp_path / "fixed")).sequence_length == 7
    overridden = Gemma2Tokenizer.from_preset(str(tmp_path / "fixed"), sequence_length=9)
    assert overridden.sequence_length == 9


def test_from_keras_hub_gemma_preset(gemma_vocabulary, tokenizer, tmp_path):
    keras_hub_tokenizer = keras_hub.models.GemmaTokenizer(proto=gemma_vocabulary)
    keras_hub_tokenizer.save_to_preset(str(tmp_path))
    with open(tmp_path / "tokenizer.json") as file:
        assert json.load(file)["registered_name"] == "keras_hub>GemmaTokenizer"
    restored = Gemma2Tokenizer.from_preset(str(tmp_path))
    assert type(restored) is Gemma2Tokenizer
    assert restored.start_of_turn_token_id == 106
    assert as_list(restored(TEXTS[5])) == as_list(tokenizer(TEXTS[5]))


def test_from_hugging_face_directory(gemma_vocabulary, tmp_path):
    shutil.copy(gemma_vocabulary, tmp_path / "tokenizer.model")
    # Hugging Face's own tokenizer.json is another format and must be skipped.
    with open(tmp_path / "tokenizer.json", "w") as file:
        json.dump(
            {"version": "1.0", "model": {"type": "BPE"}, "added_tokens": []},
            file,
        )
    restored = Gemma2Tokenizer.from_preset(str(tmp_path))
    with open(gemma_vocabulary, "rb") as file:
        assert restored.proto == file.read()
    assert restored.end_token_id == 1


def test_from_preset_errors(gemma_vocabulary, tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        Gemma2Tokenizer.from_preset(str(tmp_path / "does_not_exist"))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as error:
        Gemma2Tokenizer.from_preset(str(empty))
    assert "vocabulary.spm" in str(error.value) and str(empty) in str(error.value)

    no_asset = tmp_path / "no_asset"
    Gemma2Tokenizer(proto=gemma_vocabulary).save_to_preset(str(no_asset))
    os.remove(no_asset / "assets" / "tokenizer" / "vocabulary.spm")
    with pytest.raises(FileNotFoundError, match="vocabulary.spm"):
        Gemma2Tokenizer.from_preset(str(no_asset))

    other = tmp_path / "other"
    other.mkdir()
    with open(other / "tokenizer.json", "w") as file:
        json.dump(
            {
                "class_name": "BertTokenizer",
                "registered_name": "keras_hub>BertTokenizer",
                "config": {},
            },
            file,
        )
    with pytest.raises(ValueError, match="BertTokenizer"):
        Gemma2Tokenizer.from_preset(str(other))

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Gemma2Tokenizer.from_preset(str(broken))
