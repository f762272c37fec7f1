"""format_chat against literal Gemma turn strings, and its input errors."""

import pytest

from keras_gemma2.models.chat_template import (
    END_OF_TURN,
    START_OF_TURN,
    format_chat,
)
from keras_gemma2.models.tokenizer import Gemma2Tokenizer


def test_single_user_turn_with_generation_prompt():
    text = format_chat([{"role": "user", "content": "Why is the sky blue?"}])
    assert text == (
        "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_no_bos_in_the_template():
    text = format_chat([{"role": "user", "content": "hi"}])
    assert not text.startswith("<bos>")
    assert "<bos>" not in text


def test_multi_turn_conversation():
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "model", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Write a haiku."},
    ]
    assert format_chat(messages) == (
        "<start_of_turn>user\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWrite a haiku.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_training_text_without_generation_prompt():
    messages = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert format_chat(messages, add_generation_prompt=False) == (
        "<start_of_turn>user\n2 + 2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
    )


def test_assistant_is_an_alias_of_model():
    as_model = [
        {"role": "user", "content": "a"},
        {"role": "model", "content": "b"},
    ]
    as_assistant = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    assert format_chat(as_model) == format_chat(as_assistant)


def test_system_message_is_folded_into_the_first_user_turn():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "model", "content": "7"},
        {"role": "user", "content": "Another."},
    ]
    assert format_chat(messages) == (
        "<start_of_turn>user\nYou are terse.\n\nName a prime.<end_of_turn>\n"
        "<start_of_turn>model\n7<end_of_turn>\n"
        "<start_of_turn>user\nAnother.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_system_message_alone_becomes_a_user_turn():
    assert format_chat([{"role": "system", "content": "Be kind."}]) == (
        "<start_of_turn>user\nBe kind.<end_of_turn>\n<start_of_turn>model\n"
    )
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "model", "content": "Sure."},
    ]
    assert format_chat(messages, add_generation_prompt=False) == (
        "<start_of_turn>user\nBe kind.<end_of_turn>\n"
        "<start_of_turn>model\nSure.<end_of_turn>\n"
    )


def test_content_is_kept_verbatim():
    content = "  indented\n\ttab, emoji 🙂, trailing newline\n"
    text = format_chat([{"role": "user", "content": content}])
    assert (
        text == f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
    )
    empty = format_chat([{"role": "user", "content": ""}], add_generation_prompt=False)
    assert empty == "<start_of_turn>user\n<end_of_turn>\n"


def test_constants():
    assert START_OF_TURN == "<start_of_turn>"
    assert END_OF_TURN == "<end_of_turn>"
    assert Gemma2Tokenizer.start_of_turn_token == START_OF_TURN
    assert Gemma2Tokenizer.end_of_turn_token == END_OF_TURN


def test_turn_markers_tokenize_to_gemma_ids(gemma_vocabulary):
    tokenizer = Gemma2Tokenizer(proto=gemma_vocabulary)
    text = format_chat([{"role": "user", "content": "Hi"}])
    ids = [int(i) for i in tokenizer(text)]
    assert ids.count(106) == 2 and ids.count(107) == 1
    assert ids[0] == 106
    assert tokenizer.detokenize(ids) == text


@pytest.mark.parametrize(
    "messages, error, pattern",
    [
        ([], ValueError, "at least one message"),
        ("hello", TypeError, "messages"),
        (None, TypeError, "messages"),
        ([{"role": "user", "content": "a"}, "b"], TypeError, "index 1"),
        ([{"content": "a"}], ValueError, 'index 0 has no "role"'),
        ([{"role": "user"}], ValueError, 'index 0 has no "content"'),
        (
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
            ValueError,
            "index 1 has an unknown role.*'tool'",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            ValueError,
            "index 1 has role 'system'.*only allowed first",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "model", "content": 3}],
            ValueError,
            r"index 1 \(role 'model'\) has non-string content",
        ),
        (
            [{"role": "user", "content": ["a", "b"]}],
            ValueError,
            r"index 0 \(role 'user'\) has non-string content",
        ),
    ],
)
def test_invalid_messages(messages, error, pattern):
    with pytest.raises(error, match=pattern):
        format_chat(messages)


def test_invalid_add_generation_prompt():
    with pytest.raises(TypeError, match="add_generation_prompt"):
        format_chat([{"role": "user", "content": "a"}], add_generation_prompt="yes")
