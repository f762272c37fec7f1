"""format_chat against literal Gemma turn strings, HF's chat template, and errors."""

import pytest
import sentencepiece

from keras_gemma2.models.chat_template import (
    BOS,
    END_OF_TURN,
    EOS,
    PAD,
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


def test_pieces_are_gemma_vocabulary_pieces(gemma_vocabulary):
    # SentencePiece itself, not our tokenizer, says where each constant sits
    # (a misspelt piece would map to <unk>, 3) and that its literal text in a
    # string encodes to that single id, as the chat format relies on.
    processor = sentencepiece.SentencePieceProcessor(model_file=gemma_vocabulary)
    # Gemma's ids (GEMMA2.md); the fixture's vocabulary puts them there.
    gemma_ids = {PAD: 0, EOS: 1, BOS: 2, START_OF_TURN: 106, END_OF_TURN: 107}
    for piece, gemma_id in gemma_ids.items():
        assert processor.piece_to_id(piece) == gemma_id, piece
    for piece in (START_OF_TURN, END_OF_TURN):
        assert processor.encode(piece) == [gemma_ids[piece]]
        assert processor.encode(f"a{piece}b") == (
            processor.encode("a") + [gemma_ids[piece]] + processor.encode("b")
        )
    tokenizer = Gemma2Tokenizer(proto=gemma_vocabulary)
    assert tokenizer.start_of_turn_token_id == processor.piece_to_id("<start_of_turn>")
    assert tokenizer.end_of_turn_token_id == processor.piece_to_id("<end_of_turn>")


# The `chat_template` in the tokenizer_config.json of Google's instruction-tuned
# Gemma checkpoints on Hugging Face (gemma-2-*-it, as gemma-7b-it before), as
# transformers renders it: the reference format for Gemma 2 chats.
HF_GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Why is the sky blue?"}],
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Write a haiku\nabout rain."},
            {"role": "model", "content": "Drops on the window"},
        ],
    ],
    ids=["one_turn", "four_turns"],
)
def test_matches_hugging_face_chat_template(messages, add_generation_prompt):
    # HF's template adds <bos> (our preprocessor does that) and strips each
    # content; these messages have no outer whitespace, so both agree.
    from transformers.utils.chat_template_utils import render_jinja_template

    (rendered,), _ = render_jinja_template(
        [messages],
        chat_template=HF_GEMMA2_CHAT_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
        bos_token="<bos>",
    )
    ours = format_chat(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == "<bos>" + ours


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
