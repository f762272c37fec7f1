"""On/off switches read from the environment (`KERAS_GEMMA2_HUGE_PAGES`, ...)."""

import os


def switched_on(variable):
    """Whether the environment leaves `variable` on: unset, empty or `1`.

    `0` turns it off; any other value is refused, not read as either.

    Example:

    >>> os.environ["KERAS_GEMMA2_EXAMPLE_SWITCH"] = "0"
    >>> switched_on("KERAS_GEMMA2_EXAMPLE_SWITCH")
    False
    >>> del os.environ["KERAS_GEMMA2_EXAMPLE_SWITCH"]
    >>> switched_on("KERAS_GEMMA2_EXAMPLE_SWITCH")
    True
    """
    value = os.environ.get(variable) or "1"
    if value not in ("0", "1"):
        raise ValueError(
            f"Received an invalid value for the environment variable {variable}, "
            f"expected '0' (off) or '1' (on, the default). Received: {value!r}"
        )
    return value == "1"


__all__ = ["switched_on"]
