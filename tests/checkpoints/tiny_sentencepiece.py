"""A tiny Gemma-like SentencePiece model, trained in milliseconds for tests."""

import io
import random


def train_sentencepiece(vocabulary_size=90):
    """Return model bytes with Gemma's ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3.

    Also holds `<start_of_turn>` and `<end_of_turn>` (4 and 5), and uses
    Gemma's normalizer settings: no dummy prefix, whitespace kept as is.
    """
    import sentencepiece

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog gemma keras model 2024".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocabulary_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        minloglevel=2,
    )
    return model.getvalue()
