"""Argument checks shared by the layers; each error names the argument."""


def _is_number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive_int(value, name):
    """Return `value` if it is a positive int, else raise `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer. Received: {name}={value!r}"
        )
    return value


def positive_number(value, name):
    """Return `value` as a float if it is a positive number, else raise."""
    if not _is_number(value) or value <= 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"number. Received: {name}={value!r}"
        )
    return float(value)


def non_negative_number(value, name):
    """Return `value` as a float if it is a number >= 0, else raise."""
    if not _is_number(value) or value < 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a non-negative "
            f"number. Received: {name}={value!r}"
        )
    return float(value)


def unit_rate(value, name):
    """Return `value` as a float in [0, 1), else raise."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a number in "
            f"[0, 1). Received: {name}={value!r}"
        )
    return float(value)
