"""Argument checks shared by the data functions; each error names the argument."""


def check_texts(texts, name="texts"):
    """Raise a `TypeError` if `texts` is one string rather than many."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"Received an invalid value for `{name}`, expected a list of "
            f"strings, not a single {type(texts).__name__}. Received: "
            f"{name}={texts[:40]!r}"
        )
