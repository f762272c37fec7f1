"""Split a corpus into train and held-out parts by a hash of each name."""

import hashlib
import numbers


def is_held_out(name, held_out_percent):
    """Whether the document called `name` belongs to the held-out part.

    The rule is fixed, so that the same name lands in the same part on every
    machine and in every run: `name` is held out when the SHA-256 of its
    UTF-8 bytes, read as an integer, modulo 10000 is below
    `100 * held_out_percent`. Splitting by document (a file's relative path,
    say) rather than by window keeps near-copies of held-out text out of
    training.

    Args:
        name: string. The document's name, e.g. a relative POSIX path.
        held_out_percent: float. Share of names held out, in percent,
            strictly between 0 and 100.

    Returns:
        bool.

    Example:

    >>> from keras_gemma2.data import is_held_out
    >>> is_held_out("re/__init__.py", 20.0), is_held_out("re/__init__.py", 25.0)
    (False, True)
    """
    _check_percent(held_out_percent)
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
    # 10000 buckets: shares resolve to 0.01 percent.
    return int(digest, 16) % 10000 < held_out_percent * 100


def held_out_split(names, held_out_percent):
    """Split document names into `(train, held_out)` lists by `is_held_out`.

    Each list keeps the order of `names`. Whether a name is held out depends
    on the name alone, never on the other names, so adding documents to a
    corpus moves none of the old ones between the parts.

    Args:
        names: iterable of strings. Document names, e.g. relative paths.
        held_out_percent: float. Share of names held out, in percent,
            strictly between 0 and 100.

    Returns:
        A tuple `(train_names, held_out_names)` of lists.

    Example:

    >>> from keras_gemma2.data import held_out_split
    >>> held_out_split(["os.py", "re/__init__.py", "enum.py"], 25.0)
    (['os.py', 'enum.py'], ['re/__init__.py'])
    """
    _check_percent(held_out_percent)
    train, held_out = [], []
    for name in names:
        (held_out if is_held_out(name, held_out_percent) else train).append(name)
    return train, held_out


def _check_percent(held_out_percent):
    """Raise a `ValueError` unless `0 < held_out_percent < 100`."""
    if (
        isinstance(held_out_percent, bool)
        or not isinstance(held_out_percent, numbers.Real)
        or not 0 < held_out_percent < 100
    ):
        raise ValueError(
            "Received an invalid value for `held_out_percent`, expected a "
            "number strictly between 0 and 100. Received: "
            f"held_out_percent={held_out_percent!r}"
        )
