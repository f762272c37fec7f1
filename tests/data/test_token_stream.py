"""token_stream against literal ids and SentencePiece's own encoding."""

import numpy as np
import pytest
import sentencepiece

from keras_gemma2.data import token_stream
from keras_gemma2.models.tokenizer import Gemma2Tokenizer


class CharacterTokenizer:
    """One id per character: `ord(c) - 90`; `<bos>`=2, `<eos>`=1."""

    start_token_id = 2
    end_token_id = 1

    def tokenize(self, texts):
        return [[ord(c) - 90 for c in text] for text in texts]


def test_documents_between_bos_and_eos():
    stream = token_stream(CharacterTokenizer(), ["ab", "", "c"])
    assert stream.tolist() == [2, 7, 8, 1, 2, 1, 2, 9, 1]
    assert stream.dtype == np.int32


def test_no_documents():
    stream = token_stream(CharacterTokenizer(), [])
    assert stream.shape == (0,) and stream.dtype == np.int32


def test_a_single_string_is_rejected():
    with pytest.raises(TypeError, match="`texts`.*single str"):
        token_stream(CharacterTokenizer(), "ab")


def test_matches_sentencepiece(gemma_vocabulary):
    texts = ["def f(x):\n    return x  # 42\n", "Grüße 🙂", "a\n\nb"]
    processor = sentencepiece.SentencePieceProcessor(model_file=gemma_vocabulary)
    expected = []
    for text in texts:
        expected += [2] + processor.EncodeAsIds(text) + [1]
    stream = token_stream(Gemma2Tokenizer(proto=gemma_vocabulary), texts)
    assert stream.tolist() == expected
