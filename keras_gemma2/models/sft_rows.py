"""Fine-tuning rows: prompt/response pairs and chats, as prompt/response segments.

`Gemma2CausalLMPreprocessor` trains on three kinds of row besides plain text:

- `{"prompts": ..., "responses": ...}`: one prompt and one response per row
  (the convention of KerasHub's newer preprocessors);
- `{"prompt_segments": ..., "response_segments": ...}`: several
  prompt/response segments per row, alternating, prompt first;
- chat conversations (lists of `{"role", "content"}` messages), which
  `format_chat_segments` turns into the segment form.

Every form becomes, per row, a list of `(prompt, response)` string pairs. The
functions here parse and check Python inputs; the graph form (string
tensors inside `tf.data`) is checked where it is packed (`sft_packing`).
"""

from collections.abc import Mapping, Sequence

import keras
import numpy as np

from keras_gemma2.models.chat_template import (
    END_OF_TURN,
    MODEL_ROLE,
    ROLE_ALIASES,
    format_chat,
    generation_prompt,
)

PROMPTS, RESPONSES = "prompts", "responses"
PROMPT_SEGMENTS, RESPONSE_SEGMENTS = "prompt_segments", "response_segments"
PAIR_KEYS = (PROMPTS, RESPONSES)
SEGMENT_KEYS = (PROMPT_SEGMENTS, RESPONSE_SEGMENTS)


def is_sft_input(x):
    """Whether `x` is a fine-tuning row form rather than plain text."""
    return isinstance(x, Mapping) or _conversation_rank(x) > 0


def sft_keys(x):
    """The key pair of a dict row form; raise naming the keys received."""
    keys = set(x)
    for expected in (PAIR_KEYS, SEGMENT_KEYS):
        if keys == set(expected):
            return expected
    received = sorted(map(str, keys))
    missing_response = (PROMPTS in keys and RESPONSES not in keys) or (
        PROMPT_SEGMENTS in keys and RESPONSE_SEGMENTS not in keys
    )
    head = "The rows have no response: " if missing_response else ""
    raise ValueError(
        f"{head}Received a dict with keys {received}, expected exactly "
        f"{list(PAIR_KEYS)} (one prompt and one response per row) or "
        f"{list(SEGMENT_KEYS)} (alternating segments per row, e.g. from "
        "`format_chat_segments`)."
    )


def python_rows(x):
    """Parse a Python (eager) row form.

    Args:
        x: a dict of `PAIR_KEYS` or `SEGMENT_KEYS`, one conversation, or a
            list of conversations.

    Returns:
        `(rows, batched)`: `rows[i]` is a list of `(prompt, response)`
        string pairs, `batched` whether `x` held a batch of rows.
    """
    rank = _conversation_rank(x)
    if rank:
        conversations = x if rank == 2 else [x]
        segments = [
            _chat_segments(index, messages)
            for index, messages in enumerate(conversations)
        ]
        return [list(zip(*row, strict=True)) for row in segments], rank == 2
    keys = sft_keys(x)
    prompts, prompt_batched = _strings(x[keys[0]], keys[0])
    responses, response_batched = _strings(x[keys[1]], keys[1])
    if keys == PAIR_KEYS:
        return _pair_rows(prompts, responses, prompt_batched, response_batched)
    return _segment_rows(prompts, responses, prompt_batched, response_batched)


def format_chat_segments(conversations):
    """Render chats as alternating prompt/response segments for fine-tuning.

    Each conversation is rendered with
    `format_chat(messages, add_generation_prompt=False)` and cut before and
    after every model turn's content: a prompt segment is everything up to
    and including a model turn's opening `<start_of_turn>model\\n` (the user
    turns and earlier turn markers); the response segment that follows is the
    model's content, its `<end_of_turn>` and the `"\\n"` after it (the whole
    model turn but its opening, as TRL's and Unsloth's completion-only
    collators mark Gemma's turns; generation stops at `<end_of_turn>`, so
    learning the newline after it changes no answer). Joined in order, the
    segments are exactly the `format_chat` text.

    `Gemma2CausalLMPreprocessor` accepts the result directly, eagerly or as
    string tensors inside `tf.data` (`tf.ragged.constant` on each value
    makes a batch of rows of different lengths), and gives loss weight 1 to
    response-segment tokens only.

    Args:
        conversations: one conversation (a list of `{"role", "content"}`
            dicts, as `format_chat` takes) or a list of them. Every
            conversation must end with a model (`"model"` or
            `"assistant"`) turn, and no model turn may be empty.

    Returns:
        A dict `{"prompt_segments": ..., "response_segments": ...}`: for one
        conversation, two lists of strings of equal length; for a list of
        conversations, two lists of such lists.

    Raises:
        TypeError: a conversation is not a list of dicts.
        ValueError: a conversation is empty, has a bad message (as
            `format_chat` checks), ends with a turn that is not the model's,
            or has an empty model turn. The message names the conversation
            and message index.

    Example:

    >>> segments = format_chat_segments([
    ...     {"role": "user", "content": "Hi"},
    ...     {"role": "model", "content": "Hello!"},
    ... ])
    >>> segments["prompt_segments"]
    ['<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n']
    >>> segments["response_segments"]
    ['Hello!<end_of_turn>\\n']
    """
    rank = _conversation_rank(conversations)
    if rank == 0:
        raise TypeError(
            "Received an invalid value for `conversations`, expected a "
            'conversation (a list of `{"role": ..., "content": ...}` dicts) '
            f"or a list of them. Received: conversations={conversations!r}"
        )
    batch = conversations if rank == 2 else [conversations]
    segments = [_chat_segments(index, messages) for index, messages in enumerate(batch)]
    prompts = [row[0] for row in segments]
    responses = [row[1] for row in segments]
    if rank == 1:
        prompts, responses = prompts[0], responses[0]
    return {PROMPT_SEGMENTS: prompts, RESPONSE_SEGMENTS: responses}


def _conversation_rank(x):
    """1 for one conversation, 2 for a list of them, 0 for anything else."""
    if isinstance(x, (str, bytes, Mapping)) or not isinstance(x, Sequence):
        return 0
    if any(isinstance(item, Mapping) for item in x):
        return 1
    if any(
        isinstance(item, Sequence)
        and not isinstance(item, (str, bytes))
        and any(isinstance(message, Mapping) for message in item)
        for item in x
    ):
        return 2
    return 0


def _chat_segments(index, messages):
    """`(prompts, responses)` of conversation `index`; see `format_chat_segments`."""
    try:
        format_chat(messages, add_generation_prompt=False)  # checks every message
    except (TypeError, ValueError) as error:
        raise type(error)(f"In conversation {index}: {error}") from None
    roles = [ROLE_ALIASES.get(message["role"], message["role"]) for message in messages]
    if roles[-1] != MODEL_ROLE:
        raise ValueError(
            f"Conversation {index} ends with a {messages[-1]['role']!r} turn, "
            "expected the model's turn last: a training conversation ends with "
            "the answer the model learns. Drop the trailing turns or add the "
            "model's reply."
        )
    prompts, responses = [], []
    consumed = 0
    for position, role in enumerate(roles):
        if role != MODEL_ROLE:
            continue
        content = messages[position]["content"]
        if not content:
            raise ValueError(
                f"Conversation {index} has an empty model turn at message "
                f"{position}, expected the answer text. Received: content=''"
            )
        # Everything before this turn, rendered as `format_chat` does, then
        # the turn's opening.
        prefix = (
            format_chat(messages[:position], add_generation_prompt=True)
            if position
            else generation_prompt()
        )
        response = f"{content}{END_OF_TURN}\n"
        prompts.append(prefix[consumed:])
        responses.append(response)
        consumed = len(prefix) + len(response)
    return prompts, responses


def _strings(value, key):
    """`(items, batched)` of a row-form value: strings or lists of strings."""
    if value is None:
        return [None], False
    if isinstance(value, (str, bytes)):
        return [value], False
    tf = _tensorflow()
    if tf is not None and isinstance(value, tf.RaggedTensor):
        return value.to_list(), True
    if tf is not None and isinstance(value, tf.Tensor):
        value = value.numpy()
    if keras.ops.is_tensor(value):
        value = keras.ops.convert_to_numpy(value)
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return [value.item()], False
        return value.tolist(), True
    if isinstance(value, Sequence):
        return list(value), True
    raise TypeError(
        f"Received an invalid value for `{key}`, expected a string, a list of "
        f"strings or a string tensor. Received: {key}={value!r}"
    )


def _pair_rows(prompts, responses, prompt_batched, response_batched):
    """Rows of one `(prompt, response)` pair each; see `python_rows`."""
    if prompt_batched != response_batched or len(prompts) != len(responses):
        raise ValueError(
            "Received `prompts` and `responses` of different lengths, expected "
            "one response per prompt. Received: "
            f"{_describe(prompts, prompt_batched)} prompts and "
            f"{_describe(responses, response_batched)} responses."
        )
    rows = [
        [(_text(prompt, PROMPTS, row), _response(response, RESPONSES, row))]
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True))
    ]
    return rows, prompt_batched


def _segment_rows(prompts, responses, prompt_batched, response_batched):
    """Rows of alternating segments; see `python_rows`."""
    if not prompt_batched or not response_batched:
        raise ValueError(
            f"Received a single string for `{PROMPT_SEGMENTS}` or "
            f"`{RESPONSE_SEGMENTS}`, expected a list of segments per row (a "
            "list of strings for one row, a list of such lists for a batch)."
        )
    batched = bool(prompts) and not isinstance(prompts[0], (str, bytes))
    if not batched:
        prompts, responses = [prompts], [responses]
    if len(prompts) != len(responses):
        raise ValueError(
            f"Received {len(prompts)} rows of `{PROMPT_SEGMENTS}` and "
            f"{len(responses)} rows of `{RESPONSE_SEGMENTS}`, expected the same "
            "number."
        )
    rows = []
    for row, (row_prompts, row_responses) in enumerate(
        zip(prompts, responses, strict=True)
    ):
        if isinstance(row_prompts, (str, bytes)) or isinstance(
            row_responses, (str, bytes)
        ):
            raise TypeError(
                f"Row {row} of the segments is a single string, expected a "
                "list of segments in every row."
            )
        row_prompts, row_responses = list(row_prompts), list(row_responses)
        if not row_responses or len(row_prompts) != len(row_responses):
            raise ValueError(
                f"Row {row} has {len(row_prompts)} prompt segments and "
                f"{len(row_responses)} response segments, expected the same "
                "number, at least one (each prompt segment is followed by its "
                "response)."
            )
        rows.append(
            [
                (
                    _text(prompt, PROMPT_SEGMENTS, row),
                    _response(response, RESPONSE_SEGMENTS, row),
                )
                for prompt, response in zip(row_prompts, row_responses, strict=True)
            ]
        )
    return rows, batched


def _text(value, key, row):
    """`value` as `str`; `TypeError` naming `key` and `row` otherwise."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(
            f"Received a non-string in `{key}` at row {row}, expected a string. "
            f"Received: {value!r}"
        )
    return value


def _response(value, key, row):
    """A response string; a row without one (`None`, `""`) is a `ValueError`."""
    if value is None or (isinstance(value, (str, bytes)) and not value):
        raise ValueError(
            f"Row {row} has no response: `{key}` holds {value!r} there, "
            "expected a non-empty string (the text the model learns)."
        )
    return _text(value, key, row)


def _describe(items, batched):
    """A row count for messages: `3` for a list, `a single string` otherwise."""
    return str(len(items)) if batched else "a single string of"


def _tensorflow():
    """The `tensorflow` module when installed, else `None`."""
    try:
        import tensorflow
    except ImportError:
        return None
    return tensorflow
