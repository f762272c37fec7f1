"""Tokenize documents into one stream of token ids."""

import numpy as np

from keras_gemma2.data.validation import check_texts


def token_stream(tokenizer, texts):
    """Tokenize documents and join them as `<bos> text <eos> <bos> text <eos> ...`.

    Each document starts with the tokenizer's `<bos>` and ends with its
    `<eos>`, so a model trained on windows of the stream learns where
    documents begin and end, and a window that starts inside a document
    still sees a `<bos>` at the next document boundary.

    Args:
        tokenizer: `Gemma2Tokenizer`, or any tokenizer with `tokenize`,
            `start_token_id` and `end_token_id`.
        texts: list of strings. The documents, in order.

    Returns:
        int32 numpy array `[num_tokens]`.

    Example:

    >>> from keras_gemma2.data import token_stream, train_sentencepiece
    >>> from keras_gemma2.models import Gemma2Tokenizer
    >>> proto = train_sentencepiece(
    ...     ["ab ba ab"], vocabulary_size=13, control_pieces=[], byte_fallback=False
    ... )
    >>> tokenizer = Gemma2Tokenizer(proto=proto)
    >>> stream = token_stream(tokenizer, ["ab", "ba ab"])
    >>> [tokenizer.id_to_token(int(i)) for i in stream]
    ['<bos>', 'ab', '<eos>', '<bos>', 'ba', '▁ab', '<eos>']
    """
    check_texts(texts)
    start, end = tokenizer.start_token_id, tokenizer.end_token_id
    documents = [
        np.concatenate([[start], np.asarray(ids), [end]])
        for ids in tokenizer.tokenize(list(texts))
    ]
    if not documents:
        return np.zeros([0], "int32")
    return np.concatenate(documents).astype("int32")
