"""Fine-tuning rows from JSONL: prompt/response pairs or chats, checked per line."""

import json
import os
from collections.abc import Mapping

from keras_gemma2.models.chat_template import ROLE_ALIASES, format_chat

DATASETS_DIRECTORY = os.path.join(os.path.dirname(__file__), "datasets")
BUNDLED_DATASETS = ("python_instructions", "python_chats")
SPLITS = ("train", "held_out")
PAIR = "prompt/response"
CHAT = "chat"


def bundled_dataset_path(name, split="train"):
    """Path of a JSONL dataset shipped with the package.

    Two small datasets written for the `gemma2_tiny_python` preset (a model
    that knows Python-looking text and nothing else) come with
    `keras_gemma2`, each split into `"train"` and `"held_out"` rows; the
    held-out rows use function and argument names that no training row of
    the same task uses. `examples/make_finetune_datasets.py` writes them.

    - `"python_instructions"`: `{"prompt", "response"}` rows; the prompt is
      a function header with a one-line docstring, the response its
      one-line body (186 train, 62 held-out rows).
    - `"python_chats"`: `{"messages": [...]}` rows of two or three
      exchanges: a function is asked for, then a docstring or a new name
      (186 train, 62 held-out rows).

    Args:
        name: string. One of `"python_instructions"`, `"python_chats"`.
        split: string. `"train"` or `"held_out"`. Defaults to `"train"`.

    Returns:
        The absolute path of the JSONL file.

    Example:

    >>> rows = read_sft_jsonl(bundled_dataset_path("python_instructions"))
    >>> print(rows[0]["prompt"] + rows[0]["response"], end="")
    def power(first, second):
        \"\"\"Return first raised to the power second.\"\"\"
        return first ** second
    """
    if name not in BUNDLED_DATASETS:
        raise ValueError(
            "Received an invalid value for `name`, expected one of "
            f"{list(BUNDLED_DATASETS)}. Received: name={name!r}"
        )
    if split not in SPLITS:
        raise ValueError(
            "Received an invalid value for `split`, expected one of "
            f"{list(SPLITS)}. Received: split={split!r}"
        )
    return os.path.join(DATASETS_DIRECTORY, f"{name}_{split}.jsonl")


def read_sft_jsonl(path):
    """Read fine-tuning rows from a JSONL file, checking every line.

    Each non-blank line is one JSON object, either a prompt/response pair
    `{"prompt": str, "response": str}` or a chat
    `{"messages": [{"role": ..., "content": ...}, ...]}` in the form
    `format_chat` takes, ending with the model's turn (`"model"` or
    `"assistant"`). Other keys in a row are ignored. All rows of a file
    must be of one kind.

    Args:
        path: string. The JSONL file.

    Returns:
        The list of row dicts, in file order.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file has no rows, or a line is not a JSON object,
            has neither `prompt`/`response` nor `messages`, has an empty or
            non-string response, a chat that `format_chat` rejects or that
            does not end with the model's turn, or is of another kind than
            the first row. The message names the file and line number.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "data.jsonl")
    >>> with open(path, "w") as file:
    ...     _ = file.write('{"prompt": "def f():", "response": " pass"}\\n')
    ...     _ = file.write('{"prompt": "def g():"}\\n')
    >>> try:
    ...     read_sft_jsonl(path)
    ... except ValueError as error:
    ...     message = str(error).replace(path, "data.jsonl")
    >>> print(message.split(", expected")[0])
    data.jsonl line 2: the row has no "response"
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Received a data file that does not exist: {path}. Expected a JSONL "
            'file of {"prompt", "response"} or {"messages": [...]} rows.'
        )
    rows, kind, first_line = [], None, None
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            row, row_kind = _checked_row(line, f"{path} line {number}")
            if kind is None:
                kind, first_line = row_kind, number
            elif row_kind != kind:
                raise ValueError(
                    f"{path} line {number}: a {row_kind} row, but line "
                    f"{first_line} is a {kind} row; expected one kind of row "
                    "per file."
                )
            rows.append(row)
    if not rows:
        raise ValueError(
            f"{path} has no rows, expected one JSON object per line "
            '({"prompt", "response"} or {"messages": [...]}).'
        )
    return rows


def row_kind(rows):
    """`"prompt/response"` or `"chat"`: the kind of the (checked) `rows`."""
    return CHAT if "messages" in rows[0] else PAIR


def preprocessor_inputs(rows):
    """What `Gemma2CausalLMPreprocessor` takes for `rows` of one kind.

    Args:
        rows: list of row dicts, as `read_sft_jsonl` returns.

    Returns:
        `{"prompts": [...], "responses": [...]}` for prompt/response rows,
        the list of message lists for chats.
    """
    if row_kind(rows) == CHAT:
        return [row["messages"] for row in rows]
    return {
        "prompts": [row["prompt"] for row in rows],
        "responses": [row["response"] for row in rows],
    }


def _checked_row(line, where):
    """`(row, kind)` of one JSONL line; `ValueError` prefixed with `where`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error}).") from None
    if not isinstance(row, Mapping):
        raise ValueError(
            f"{where}: expected a JSON object, received {type(row).__name__} "
            f"{_short(row)}."
        )
    if "messages" in row:
        return row, _checked_chat(row["messages"], where)
    if "prompt" not in row and "response" not in row:
        raise ValueError(
            f'{where}: the row has neither "prompt"/"response" nor "messages", '
            f"expected one of them. Received keys: {sorted(row)}."
        )
    for key in ("prompt", "response"):
        if key not in row:
            raise ValueError(
                f'{where}: the row has no "{key}", expected a {PAIR} row with '
                f"both. Received keys: {sorted(row)}."
            )
        if not isinstance(row[key], str):
            raise ValueError(
                f'{where}: "{key}" must be a string. Received: {_short(row[key])}'
            )
    if not row["response"]:
        raise ValueError(
            f'{where}: the row has an empty "response", expected the text the '
            "model learns."
        )
    return row, PAIR


def _checked_chat(messages, where):
    try:
        format_chat(messages, add_generation_prompt=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f'{where}: invalid "messages": {error}') from None
    last = messages[-1]["role"]
    if ROLE_ALIASES.get(last, last) != "model":
        raise ValueError(
            f"{where}: the chat ends with a {last!r} turn, expected the model's "
            "turn last (the answer the model learns)."
        )
    if not all(
        message["content"]
        for message in messages
        if ROLE_ALIASES.get(message["role"], message["role"]) == "model"
    ):
        raise ValueError(f"{where}: the chat has an empty model turn.")
    return CHAT


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
