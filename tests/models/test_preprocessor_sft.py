"""Gemma2CausalLMPreprocessor on fine-tuning rows: prompt/response pairs and chats.

Expected ids and weights are built by hand from SentencePiece's own ids for
each segment; the loss is checked against a float64 NumPy cross-entropy.
"""

import keras
import numpy as np
import pytest

from keras_gemma2.models.chat_template import format_chat
from keras_gemma2.models.preprocessor import Gemma2CausalLMPreprocessor
from keras_gemma2.models.sft_rows import format_chat_segments
from tests.models import test_preprocessor as plain_tests
from tests.text_fixtures import make_text_causal_lm

# The plain-text tests' fixtures: the tokenizer, SentencePiece's own ids.
tokenizer, encode, numpy = plain_tests.tokenizer, plain_tests.encode, plain_tests.numpy

BOS, EOS, PAD, START_OF_TURN, END_OF_TURN = 2, 1, 0, 106, 107
PROMPTS = ["def f(x):\n    re", "Grüße 🙂", "Name a color."]
RESPONSES = ["turn x + 1\n", "日本語", "Blue"]
CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "model", "content": "Ciao 🙂"},
    ],
    [
        {"role": "user", "content": "2 + 2?"},
        {"role": "model", "content": "4"},
    ],
]
# The chats above, cut by hand: (text, weighted) in order.
CHAT_PIECES = [
    [
        ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n", False),
        ("<start_of_turn>model\n", False),
        ("Hello!<end_of_turn>\n", True),
        ("<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n", False),
        ("Ciao 🙂<end_of_turn>\n", True),
    ],
    [
        ("<start_of_turn>user\n2 + 2?<end_of_turn>\n<start_of_turn>model\n", False),
        ("4<end_of_turn>\n", True),
    ],
]


def expected_arrays(pieces, length, start=True, end=True):
    """x ids, x mask, labels, weights from `[(ids, weighted), ...]` per row."""
    rows = []
    for row in pieces:
        ids, flags = ([BOS], [0]) if start else ([], [])
        for piece_ids, weighted in row:
            ids += piece_ids
            flags += [int(weighted)] * len(piece_ids)
        if end:
            ids, flags = ids + [EOS], flags + [1]
        assert len(ids) <= length + 1
        pad = length + 1 - len(ids)
        rows.append((ids + [PAD] * pad, [1] * len(ids) + [0] * pad, flags + [0] * pad))
    ids, mask, flags = (np.array(part) for part in zip(*rows, strict=True))
    return ids[:, :-1], mask[:, :-1], ids[:, 1:], flags[:, 1:]


def pair_pieces(encode, prompts, responses):
    return [
        [(encode(prompt), False), (encode(response), True)]
        for prompt, response in zip(prompts, responses, strict=True)
    ]


def assert_outputs(outputs, expected):
    x, y, sample_weight = (
        numpy(part) if not isinstance(part, dict) else part for part in outputs
    )
    token_ids, padding_mask, labels, weights = expected
    np.testing.assert_array_equal(numpy(x["token_ids"]), token_ids)
    np.testing.assert_array_equal(numpy(x["padding_mask"]), padding_mask)
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_array_equal(np.asarray(sample_weight).astype(int), weights)


# === Prompt/response pairs ===


def test_prompt_response_ids_and_weights(tokenizer, encode):
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=24)
    outputs = preprocessor({"prompts": PROMPTS, "responses": RESPONSES})
    expected = expected_arrays(pair_pieces(encode, PROMPTS, RESPONSES), 24)
    assert_outputs(outputs, expected)
    # Weight 1 exactly on the response tokens and <eos> as labels.
    weights = numpy(outputs[2]).astype(int)
    for row, response in zip(weights, RESPONSES, strict=True):
        assert row.sum() == len(encode(response)) + 1


def test_prompt_and_response_are_tokenized_separately(tokenizer, encode):
    # The vocabulary merges "re" + "turn" into one piece; separate
    # tokenization keeps the boundary, so the response is exactly its ids.
    assert encode("return") != encode("re") + encode("turn")
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=8)
    _, y, sample_weight = preprocessor({"prompts": "re", "responses": "turn"})
    labels = numpy(y)[numpy(sample_weight).astype(bool)]
    assert labels.tolist() == [*encode("turn"), EOS]


def test_single_pair_is_unbatched(tokenizer, encode):
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=24)
    x, y, sample_weight = preprocessor(
        {"prompts": PROMPTS[0], "responses": RESPONSES[0]}
    )
    expected = expected_arrays(pair_pieces(encode, PROMPTS[:1], RESPONSES[:1]), 24)
    assert numpy(x["token_ids"]).tolist() == expected[0][0].tolist()
    assert numpy(y).tolist() == expected[2][0].tolist()
    assert numpy(sample_weight).astype(int).tolist() == expected[3][0].tolist()


def test_without_end_token_only_response_tokens_weigh(tokenizer, encode):
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=24, add_end_token=False
    )
    outputs = preprocessor({"prompts": PROMPTS, "responses": RESPONSES})
    pieces = pair_pieces(encode, PROMPTS, RESPONSES)
    assert_outputs(outputs, expected_arrays(pieces, 24, end=False))


def test_plain_strings_keep_padding_weights(tokenizer, encode):
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=24)
    _, _, sample_weight = preprocessor(PROMPTS)
    counts = numpy(sample_weight).astype(int).sum(axis=1)
    assert counts.tolist() == [len(encode(text)) + 1 for text in PROMPTS]


# === Chats ===


def test_chat_segments_join_to_format_chat():
    segments = format_chat_segments(CHATS)
    for chat, prompts, responses, pieces in zip(
        CHATS,
        segments["prompt_segments"],
        segments["response_segments"],
        CHAT_PIECES,
        strict=True,
    ):
        joined = "".join(p + r for p, r in zip(prompts, responses, strict=True))
        assert joined == format_chat(chat, add_generation_prompt=False)
        assert responses == [text for text, weighted in pieces if weighted]
    single = format_chat_segments(CHATS[1])
    assert single["response_segments"] == ["4<end_of_turn>\n"]


def test_chat_weights_cover_model_turns_with_end_of_turn(tokenizer, encode):
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=64)
    outputs = preprocessor(CHATS)
    pieces = [
        [(encode(text), weighted) for text, weighted in row] for row in CHAT_PIECES
    ]
    assert_outputs(outputs, expected_arrays(pieces, 64))
    # Each model turn's <end_of_turn> (and the "\n" after it) is a weighted
    # label; the user turns' <end_of_turn> is not.
    labels, weights = numpy(outputs[1]), numpy(outputs[2]).astype(bool)
    assert (labels[weights] == END_OF_TURN).sum() == 3
    assert (labels[~weights] == END_OF_TURN).sum() == 3
    # One conversation gives one unbatched row; the segment form is the same.
    x, _, sample_weight = preprocessor(CHATS[1])
    assert numpy(x["token_ids"]).tolist() == numpy(outputs[0]["token_ids"])[1].tolist()
    segment_outputs = preprocessor(format_chat_segments(CHATS))
    assert_outputs(segment_outputs, expected_arrays(pieces, 64))


# === Truncation ===


def test_too_long_row_raises_by_default(tokenizer, encode):
    prompt_count = len(encode(PROMPTS[0]))
    response_count = len(encode(RESPONSES[0]))
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=8)
    with pytest.raises(ValueError) as error:
        preprocessor({"prompts": ["a", PROMPTS[0]], "responses": ["b", RESPONSES[0]]})
    message = str(error.value)
    assert f"row 1 has {prompt_count + response_count + 1} tokens" in message
    assert f"({prompt_count} prompt and {response_count} response" in message
    assert "`sequence_length=8`" in message and "truncate='left'" in message


def test_truncate_left_drops_prompt_start_and_keeps_response(tokenizer, encode):
    prompt, response = encode(PROMPTS[0]), encode(RESPONSES[0])
    room = len(response) + 3  # the response, <eos> and two prompt tokens
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=room, truncate="left"
    )
    x, y, sample_weight = preprocessor(
        {"prompts": [PROMPTS[0]], "responses": [RESPONSES[0]]}
    )
    packed = [BOS, *prompt[-2:], *response, EOS]
    assert numpy(x["token_ids"])[0].tolist() == packed[:-1]
    assert numpy(y)[0].tolist() == packed[1:]
    assert numpy(sample_weight)[0].astype(int).tolist() == [0, 0] + [1] * (
        len(response) + 1
    )
    # A response longer than the room keeps its end (and <eos>).
    short = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=3, truncate="left")
    x, y, sample_weight = short({"prompts": PROMPTS[0], "responses": RESPONSES[0]})
    assert numpy(x["token_ids"]).tolist() == [BOS, *response[-2:]]
    assert numpy(y).tolist() == [*response[-2:], EOS]
    assert numpy(sample_weight).all()


def test_truncate_right_cuts_response_and_end_token(tokenizer, encode):
    prompt, response = encode(PROMPTS[0]), encode(RESPONSES[0])
    length = len(prompt) + 2  # <bos>, the prompt, then 2 response tokens
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=length, truncate="right"
    )
    x, y, sample_weight = preprocessor(
        {"prompts": [PROMPTS[0], "a"], "responses": [RESPONSES[0], "b"]}
    )
    packed = [BOS, *prompt, *response[:2]]  # no <eos>: the answer is cut
    assert numpy(x["token_ids"])[0].tolist() == packed[:-1]
    assert numpy(y)[0].tolist() == packed[1:]
    weights = numpy(sample_weight)[0].astype(int).tolist()
    assert weights == [0] * len(prompt) + [1, 1]
    assert EOS in numpy(y)[1].tolist()  # a row that fits keeps <eos>


def test_truncate_right_refuses_a_row_without_response(tokenizer, encode):
    prompt_count = len(encode(PROMPTS[0]))
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=prompt_count - 1, truncate="right"
    )
    with pytest.raises(ValueError) as error:
        preprocessor({"prompts": ["a", PROMPTS[0]], "responses": ["b", RESPONSES[0]]})
    message = str(error.value)
    assert f"row 1 has {prompt_count} prompt tokens" in message
    assert "keeps no response token" in message and "truncate='left'" in message


# === Bad input ===


@pytest.mark.parametrize(
    "x, error, pattern",
    [
        ({"prompts": ["a"]}, ValueError, "no response.*'prompts'"),
        ({"prompts": ["a"], "responses": ["b"], "images": [1]}, ValueError, "keys"),
        (
            {"prompts": ["a", "b"], "responses": [None, "c"]},
            ValueError,
            "Row 0 has no response",
        ),
        (
            {"prompts": ["a", "b"], "responses": ["c", ""]},
            ValueError,
            "Row 1 has no response",
        ),
        ({"prompts": ["a", "b"], "responses": ["c"]}, ValueError, "different lengths"),
        (
            {"prompts": ["a", 3], "responses": ["c", "d"]},
            TypeError,
            "`prompts` at row 1",
        ),
        ({"prompts": ["a"], "responses": [b"ok", 7]}, ValueError, "different lengths"),
        (
            {"prompt_segments": [["a", "b"]], "response_segments": [["c"]]},
            ValueError,
            "Row 0 has 2 prompt segments and 1 response",
        ),
        (
            [CHATS[1], CHATS[1][:1]],
            ValueError,
            "Conversation 1 ends with a 'user' turn",
        ),
        (
            [
                CHATS[1],
                [{"role": "user", "content": "a"}, {"role": "model", "content": 5}],
            ],
            ValueError,
            "conversation 1.*non-string content",
        ),
        (
            [[{"role": "user", "content": "a"}, {"role": "model", "content": ""}]],
            ValueError,
            "Conversation 0 has an empty model turn at message 1",
        ),
    ],
)
def test_bad_rows_name_the_row(tokenizer, x, error, pattern):
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=16)
    with pytest.raises(error, match=pattern):
        preprocessor(x)


# === tf.data, on every backend ===


@pytest.mark.parametrize("truncate", ["error", "left", "right"])
def test_tf_data_prompt_response_matches_eager(tokenizer, encode, truncate):
    tf = pytest.importorskip("tensorflow")
    length = 24 if truncate == "error" else len(encode(PROMPTS[0])) + 2
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=length, truncate=truncate
    )
    data = {"prompts": PROMPTS, "responses": RESPONSES}
    eager = [
        numpy(part) if not isinstance(part, dict) else part
        for part in preprocessor(data)
    ]
    dataset = tf.data.Dataset.from_tensor_slices(data)
    batched = next(iter(dataset.batch(3).map(preprocessor)))
    graphs = [batched]
    if truncate == "error":  # unbatched rows take the same path
        graphs.append(next(iter(dataset.map(preprocessor).batch(3))))
    for graph in graphs:
        np.testing.assert_array_equal(
            graph[0]["token_ids"], numpy(eager[0]["token_ids"])
        )
        np.testing.assert_array_equal(
            graph[0]["padding_mask"], numpy(eager[0]["padding_mask"])
        )
        np.testing.assert_array_equal(graph[1], eager[1])
        np.testing.assert_array_equal(graph[2], eager[2])
    if truncate == "error":
        expected = expected_arrays(pair_pieces(encode, PROMPTS, RESPONSES), length)
        np.testing.assert_array_equal(np.asarray(batched[2]).astype(int), expected[3])


def test_tf_data_chats_match_eager(tokenizer):
    tf = pytest.importorskip("tensorflow")
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=64)
    _, eager_y, eager_weights = preprocessor(CHATS)
    segments = format_chat_segments(CHATS)
    dataset = tf.data.Dataset.from_tensor_slices(
        {key: tf.ragged.constant(value) for key, value in segments.items()}
    )
    for mapped in (
        dataset.ragged_batch(2).map(preprocessor),
        dataset.map(preprocessor).batch(2),
    ):
        _, y, sample_weight = next(iter(mapped))
        np.testing.assert_array_equal(y, numpy(eager_y))
        np.testing.assert_array_equal(sample_weight, numpy(eager_weights))


def test_tf_data_errors_name_the_row(tokenizer, encode):
    tf = pytest.importorskip("tensorflow")
    count = len(encode(PROMPTS[0])) + len(encode(RESPONSES[0])) + 1
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=8)
    data = {"prompts": ["a", PROMPTS[0]], "responses": ["b", RESPONSES[0]]}
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        next(iter(dataset.map(preprocessor)))
    message = str(error.value)
    assert "longer than `sequence_length`" in message
    assert f"[1] [has] [{count}]" in message
    empty = {"prompts": ["a", "b"], "responses": ["c", ""]}
    dataset = tf.data.Dataset.from_tensor_slices(empty).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[Row\] \[1\]"):
        next(iter(dataset.map(preprocessor)))
    uneven = {
        "prompt_segments": tf.ragged.constant([["a"], ["b", "c"]]),
        "response_segments": tf.ragged.constant([["d"], ["e"]]),
    }
    dataset = tf.data.Dataset.from_tensor_slices(uneven).ragged_batch(2)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"\[Row\] \[1\] \[has\] \[2\]"
    ):
        next(iter(dataset.map(preprocessor)))
    right = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=3, truncate="right")
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="keeps no response"):
        next(iter(dataset.map(right)))


# === Loss and fit ===


def response_cross_entropy(logits, labels, weights):
    """Mean float64 cross-entropy over the positions whose weight is 1."""
    logits = np.asarray(logits, dtype="float64")
    logits = logits - logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    mask = weights.astype(bool)
    return float(-picked[mask].mean())


def test_loss_and_fit_use_response_tokens_only(gemma_vocabulary):
    keras.utils.set_random_seed(0)
    causal_lm = make_text_causal_lm(gemma_vocabulary, sequence_length=24)
    causal_lm.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        weighted_metrics=[],
    )
    data = {"prompts": PROMPTS[:2], "responses": RESPONSES[:2]}
    x, y, sample_weight = causal_lm.preprocessor(data)
    logits = causal_lm(x)
    expected = response_cross_entropy(numpy(logits), numpy(y), numpy(sample_weight))
    everything = response_cross_entropy(
        numpy(logits), numpy(y), numpy(x["padding_mask"])
    )
    assert abs(expected - everything) > 1e-3  # the prompt would change the loss
    loss = causal_lm.compute_loss(x=x, y=y, y_pred=logits, sample_weight=sample_weight)
    np.testing.assert_allclose(float(numpy(loss)), expected, rtol=1e-5)
    # `fit` on raw rows goes through the preprocessor inside tf.data; one
    # batch, so the reported loss is the loss before the update.
    before = [numpy(weight).copy() for weight in causal_lm.trainable_weights]
    history = causal_lm.fit(x=data, batch_size=2, epochs=1, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)
    after = [numpy(weight) for weight in causal_lm.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
