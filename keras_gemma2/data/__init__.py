"""Training and evaluation data: corpora, tokenizers, windows, baselines.

Builds on `keras_gemma2.models` and is never imported by it.
"""

from keras_gemma2.data.bigram_baseline import (
    BIGRAM_K_GRID,
    BigramCounts,
    best_bigram_perplexity,
    bigram_perplexity,
    count_bigrams,
)
from keras_gemma2.data.corpus_windows import (
    random_windows,
    sequential_windows,
    window_inputs_and_labels,
)
from keras_gemma2.data.held_out_split import held_out_split, is_held_out
from keras_gemma2.data.perplexity import held_out_perplexity
from keras_gemma2.data.sentencepiece_trainer import (
    GEMMA_CONTROL_PIECES,
    GEMMA_TURN_PIECES,
    train_sentencepiece,
)
from keras_gemma2.data.text_files import list_text_files, read_text_files
from keras_gemma2.data.token_stream import token_stream

__all__ = [
    "BIGRAM_K_GRID",
    "GEMMA_CONTROL_PIECES",
    "GEMMA_TURN_PIECES",
    "BigramCounts",
    "best_bigram_perplexity",
    "bigram_perplexity",
    "count_bigrams",
    "held_out_perplexity",
    "held_out_split",
    "is_held_out",
    "list_text_files",
    "random_windows",
    "read_text_files",
    "sequential_windows",
    "token_stream",
    "train_sentencepiece",
    "window_inputs_and_labels",
]
