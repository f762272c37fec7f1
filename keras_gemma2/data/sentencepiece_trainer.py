"""Train a SentencePiece vocabulary laid out like Gemma's."""

import io

from keras_gemma2.data.validation import check_texts

# Control pieces between `<unk>` (3) and `<start_of_turn>` (106), as in Gemma.
GEMMA_CONTROL_PIECES = ("<mask>", "[multimodal]") + tuple(
    f"<unused{i}>" for i in range(100)
)
# User-defined, so that their literal text in a string maps to the single id.
GEMMA_TURN_PIECES = ("<start_of_turn>", "<end_of_turn>")
# SentencePiece skips training sentences longer than this many bytes.
MAX_SENTENCE_BYTES = 16384
# `<pad>`, `<eos>`, `<bos>`, `<unk>` at ids 0..3, as in Gemma.
_SPECIAL_KINDS = ("pad", "eos", "bos", "unk")
_BYTE_PIECES = 256
# Gemma's normalizer and trainer settings, whatever the arguments.
_GEMMA_SETTINGS = {
    "model_type": "bpe",
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "split_by_whitespace": True,
    "allow_whitespace_only_pieces": True,
    "max_sentence_length": MAX_SENTENCE_BYTES,
    # Unused by BPE; kept so the model records the settings
    # `gemma2_tiny_python` was trained with, byte for byte.
    "seed_sentencepiece_size": 200_000,
    # One thread: deterministic.
    "num_threads": 1,
    "minloglevel": 2,
}


def train_sentencepiece(
    texts,
    vocabulary_size,
    control_pieces=GEMMA_CONTROL_PIECES,
    user_defined_pieces=GEMMA_TURN_PIECES,
    byte_fallback=True,
    character_coverage=0.9995,
):
    """Train a BPE SentencePiece model with Gemma's layout and settings.

    The vocabulary puts `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3 first,
    then `control_pieces` (ids from 4, never produced by tokenizing text),
    then `user_defined_pieces` (their literal text always becomes the one
    piece), then the learned pieces. With the defaults that is Gemma's
    layout: `<mask>`, `[multimodal]`, `<unused0>`..`<unused99>` at 4..105,
    `<start_of_turn>`=106 and `<end_of_turn>`=107.

    The normalizer and trainer settings are Gemma's: no normalization, no
    dummy prefix, whitespace kept as it is (runs of spaces become pieces),
    digits split one by one, unknown characters spelled as UTF-8 byte pieces
    (`byte_fallback`). Each text is cut into lines, which are the training
    sentences; empty and whitespace-only lines are left out, and so are lines
    longer than 16384 bytes (SentencePiece's `max_sentence_length`).
    Training runs on one thread and is deterministic: the same texts and
    arguments give the same bytes.

    Args:
        texts: iterable of strings. The training corpus (whole documents or
            single lines).
        vocabulary_size: int. Number of pieces, the reserved ones included
            (4 special, the control and user-defined pieces and, with
            `byte_fallback`, 256 byte pieces). The corpus must hold enough
            distinct pieces to fill it, else SentencePiece raises a
            `RuntimeError` that says the largest size it can reach.
        control_pieces: sequence of strings. Pieces at ids 4 onward.
            Defaults to Gemma's 102 control pieces.
        user_defined_pieces: sequence of strings. Pieces right after the
            control pieces. Defaults to `("<start_of_turn>", "<end_of_turn>")`.
        byte_fallback: bool. Add the 256 byte pieces and spell characters
            outside the vocabulary with them instead of `<unk>`. Defaults to
            `True`, as in Gemma.
        character_coverage: float. Share of the corpus' characters that get
            pieces of their own; the rarest rest fall back to bytes (or
            `<unk>`). Defaults to `0.9995`.

    Returns:
        The serialized model (`bytes`), as `Gemma2Tokenizer(proto=...)` and
        `sentencepiece.SentencePieceProcessor(model_proto=...)` take it.

    Example:

    >>> from keras_gemma2.data import train_sentencepiece
    >>> from keras_gemma2.models import Gemma2Tokenizer
    >>> proto = train_sentencepiece(
    ...     ["the quick brown fox\\njumps over the lazy dog 2024"] * 4,
    ...     vocabulary_size=48,
    ...     control_pieces=["<mask>"],
    ...     byte_fallback=False,
    ... )
    >>> tokenizer = Gemma2Tokenizer(proto=proto)
    >>> [tokenizer.id_to_token(i) for i in range(7)]
    ['<pad>', '<eos>', '<bos>', '<unk>', '<mask>', '<start_of_turn>', '<end_of_turn>']
    >>> [tokenizer.id_to_token(int(i)) for i in tokenizer("the  2024")]
    ['the', '▁', '▁', '2', '0', '2', '4']
    """
    import sentencepiece

    check_texts(texts)
    control_pieces = list(control_pieces)
    user_defined_pieces = list(user_defined_pieces)
    reserved = (
        len(_SPECIAL_KINDS)
        + len(control_pieces)
        + len(user_defined_pieces)
        + (_BYTE_PIECES if byte_fallback else 0)
    )
    if (
        isinstance(vocabulary_size, bool)
        or not isinstance(vocabulary_size, int)
        or vocabulary_size <= reserved
    ):
        raise ValueError(
            "Received an invalid value for `vocabulary_size`, expected an "
            f"integer above the {reserved} reserved pieces (4 special, "
            f"{len(control_pieces)} control, {len(user_defined_pieces)} "
            f"user-defined{', 256 byte' if byte_fallback else ''}). Received: "
            f"vocabulary_size={vocabulary_size!r}"
        )
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    # The layout comes from the arguments; every other setting is Gemma's.
    layout = {f"{kind}_id": i for i, kind in enumerate(_SPECIAL_KINDS)}
    layout.update({f"{kind}_piece": f"<{kind}>" for kind in _SPECIAL_KINDS})
    layout.update(control_symbols=control_pieces, vocab_size=vocabulary_size)
    layout.update(user_defined_symbols=user_defined_pieces, byte_fallback=byte_fallback)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        character_coverage=character_coverage,
        **layout,
        **_GEMMA_SETTINGS,
    )
    return model.getvalue()
