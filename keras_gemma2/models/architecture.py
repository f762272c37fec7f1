"""Facts of the Gemma 2 architecture that several packages need.

A leaf module: it imports nothing of keras_gemma2, so `models`,
`generation` and `checkpoints` can all read it without import loops.
"""

# Context length of every released size (RoPE works past it, quality does not).
MAX_SEQUENCE_LENGTH = 8192


def layer_is_local(index):
    """Whether decoder block `index` uses the sliding window.

    Gemma 2 alternates: layer 0 and every even layer are local (sliding
    window), odd layers global.

    Example:

    >>> [layer_is_local(i) for i in range(4)]
    [True, False, True, False]
    """
    return index % 2 == 0
