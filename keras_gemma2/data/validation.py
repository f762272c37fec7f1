"""Argument checks shared by the data functions; each error names the argument."""


def check_texts(texts):
    """Raise a `TypeError` if `texts` is one string rather than many."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            "Received an invalid value for `texts`, expected a list of "
            f"strings, not a single {type(texts).__name__}. Received: "
            f"texts={texts[:40]!r}"
        )
