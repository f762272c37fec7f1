"""Read a JSON file, naming the file when it is not JSON."""

import json


def read_json(path):
    """The parsed contents of the JSON file `path`.

    Raises:
        ValueError: the file is not valid JSON (the message names `path`).

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "config.json")
    >>> with open(path, "w") as file:
    ...     _ = file.write('{"model_type": "gemma2"}')
    >>> read_json(path)
    {'model_type': 'gemma2'}
    """
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
