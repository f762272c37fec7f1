"""A tiny Gemma-like SentencePiece model, trained in milliseconds for tests."""

import random

from keras_gemma2.data import train_sentencepiece as train_gemma_sentencepiece


def train_sentencepiece(vocabulary_size=90):
    """Return model bytes with Gemma's ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3.

    Also holds `<start_of_turn>` and `<end_of_turn>` (4 and 5: no control
    pieces), and uses Gemma's settings but for byte fallback (256 byte
    pieces would not fit in a vocabulary this small).
    """
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog gemma keras model 2024".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    return train_gemma_sentencepiece(
        lines, vocabulary_size, control_pieces=(), byte_fallback=False
    )
