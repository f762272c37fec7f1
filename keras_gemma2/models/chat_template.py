"""Gemma's chat format: a list of `{"role", "content"}` messages as one string."""

from collections.abc import Mapping, Sequence

# Pieces of Gemma's vocabulary that the chat format and generation rely on.
BOS = "<bos>"
EOS = "<eos>"
PAD = "<pad>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

USER_ROLE = "user"
MODEL_ROLE = "model"
SYSTEM_ROLE = "system"
# Names other chat APIs use for Gemma's roles.
ROLE_ALIASES = {"assistant": MODEL_ROLE}
ROLES = (USER_ROLE, MODEL_ROLE, SYSTEM_ROLE, *ROLE_ALIASES)


def format_turn(role, content):
    """One turn: `<start_of_turn>{role}\\n{content}<end_of_turn>\\n`."""
    return f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n"


def generation_prompt():
    """The opening of a model turn, which the model completes."""
    return f"{START_OF_TURN}{MODEL_ROLE}\n"


def _checked_messages(messages):
    """Validate `messages`; return `[(index, role, content)]`, aliases resolved."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(
            "Received an invalid value for `messages`, expected a list of "
            '`{"role": ..., "content": ...}` dicts. '
            f"Received: messages={messages!r}"
        )
    if not messages:
        raise ValueError(
            "Received an empty `messages` list, expected at least one message."
        )
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"Received an invalid message at index {index}, expected a dict "
                f'with "role" and "content". Received: {message!r}'
            )
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            names = " or ".join(f'"{key}"' for key in missing)
            raise ValueError(
                f"The message at index {index} has no {names} key, expected a "
                f'dict with "role" and "content". Received: {message!r}'
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(
                f"The message at index {index} has an unknown role, expected one "
                f"of {list(ROLES)}. Received: role={role!r}"
            )
        if role == SYSTEM_ROLE and index != 0:
            raise ValueError(
                f"The message at index {index} has role 'system', but a system "
                "message is only allowed first (Gemma has no system turn; the "
                "first one is folded into the first user turn)."
            )
        if not isinstance(content, str):
            raise ValueError(
                f"The message at index {index} (role {role!r}) has non-string "
                f"content, expected a string. Received: content={content!r}"
            )
        checked.append((index, ROLE_ALIASES.get(role, role), content))
    return checked


def format_chat(messages, add_generation_prompt=True):
    """Render a conversation in Gemma's turn format.

    Every message becomes one turn,
    `<start_of_turn>{role}\\n{content}<end_of_turn>\\n`, with `role` either
    `"user"` or `"model"` (`"assistant"` is accepted for `"model"`). Content
    is kept verbatim (Hugging Face's template strips surrounding whitespace;
    this one does not change the text).

    Gemma has no system role. A `"system"` message, allowed only first, is
    folded into the first user turn as Ollama does: the system text, a blank
    line, then the user text. A system message not followed by a user
    message becomes a user turn of its own.

    The result does not start with `<bos>`: `Gemma2CausalLMPreprocessor`
    adds it as a token (`add_start_token=True`), so the string can go to the
    preprocessor, to `Gemma2CausalLM.generate` or to a fine-tuning dataset
    as it is. Tokenize it with `Gemma2Tokenizer`, which maps the literal
    `<start_of_turn>` and `<end_of_turn>` to their single token ids.

    Args:
        messages: list of dicts, each with a `"role"` (`"user"`, `"model"`,
            `"assistant"` or, first only, `"system"`) and a string
            `"content"`.
        add_generation_prompt: bool. End with `<start_of_turn>model\\n` so
            that the model writes the next turn. Use `False` for training
            text that ends with the model's answer. Defaults to `True`.

    Returns:
        The conversation as one string.

    Raises:
        TypeError: if `messages` is not a list of dicts.
        ValueError: for an empty list, a message without `"role"` or
            `"content"`, an unknown role, a system message that is not
            first, or non-string content. The message names the index.

    Example:

    >>> text = format_chat([
    ...     {"role": "system", "content": "Answer briefly."},
    ...     {"role": "user", "content": "What is 2 + 2?"},
    ...     {"role": "assistant", "content": "4"},
    ...     {"role": "user", "content": "And 3 + 3?"},
    ... ])
    >>> print(text)
    <start_of_turn>user
    Answer briefly.
    <BLANKLINE>
    What is 2 + 2?<end_of_turn>
    <start_of_turn>model
    4<end_of_turn>
    <start_of_turn>user
    And 3 + 3?<end_of_turn>
    <start_of_turn>model
    <BLANKLINE>
    """
    if not isinstance(add_generation_prompt, bool):
        raise TypeError(
            "Received an invalid value for `add_generation_prompt`, expected a "
            f"bool. Received: add_generation_prompt={add_generation_prompt!r}"
        )
    checked = _checked_messages(messages)
    if checked[0][1] == SYSTEM_ROLE:
        _, _, system_text = checked.pop(0)
        if checked and checked[0][1] == USER_ROLE:
            index, _, user_text = checked[0]
            checked[0] = (index, USER_ROLE, f"{system_text}\n\n{user_text}")
        else:
            checked.insert(0, (0, USER_ROLE, system_text))
    text = "".join(format_turn(role, content) for _, role, content in checked)
    if add_generation_prompt:
        text += generation_prompt()
    return text
