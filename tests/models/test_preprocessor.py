"""Gemma2CausalLMPreprocessor: packing, labels, weights, truncation, presets."""

import json

import keras
import keras_hub
import numpy as np
import pytest

from keras_gemma2.models.chat_template import format_chat
from keras_gemma2.models.preprocessor import Gemma2CausalLMPreprocessor
from keras_gemma2.models.tokenizer import Gemma2Tokenizer

BOS, EOS, PAD = 2, 1, 0
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "Grüße 🙂🚀 日本語",
    "a",
]


@pytest.fixture(scope="module")
def tokenizer(gemma_vocabulary):
    return Gemma2Tokenizer(proto=gemma_vocabulary)


@pytest.fixture(scope="module")
def encode(gemma_vocabulary):
    """Reference ids straight from SentencePiece."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=gemma_vocabulary)
    return processor.EncodeAsIds


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def padded(ids, length):
    return ids + [PAD] * (length - len(ids))


def expected_training_arrays(encode, texts, sequence_length):
    """x ids, x mask, labels, weights built by hand from SentencePiece ids."""
    packed = [[BOS, *encode(text), EOS] for text in texts]
    full = np.array([padded(ids, sequence_length + 1) for ids in packed])
    mask = np.array(
        [padded([1] * len(ids), sequence_length + 1) for ids in packed], bool
    )
    return full[:, :-1], mask[:, :-1], full[:, 1:], mask[:, 1:]


def test_training_outputs(tokenizer, encode):
    sequence_length = max(len(encode(text)) for text in TEXTS) + 4
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length)
    x, y, sample_weight = preprocessor(TEXTS)
    token_ids, padding_mask, labels, weights = expected_training_arrays(
        encode, TEXTS, sequence_length
    )
    np.testing.assert_array_equal(numpy(x["token_ids"]), token_ids)
    np.testing.assert_array_equal(numpy(x["padding_mask"]), padding_mask)
    np.testing.assert_array_equal(numpy(y), labels)
    np.testing.assert_array_equal(numpy(sample_weight), weights)
    # <bos> first; labels are the inputs shifted left by one.
    assert (numpy(x["token_ids"])[:, 0] == BOS).all()
    np.testing.assert_array_equal(numpy(y)[:, :-1], numpy(x["token_ids"])[:, 1:])
    assert tuple(numpy(x["token_ids"]).shape) == (len(TEXTS), sequence_length)


def test_unbatched_input(tokenizer, encode):
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=6)
    x, y, sample_weight = preprocessor("a")
    ids = encode("a")
    assert numpy(x["token_ids"]).tolist() == padded([BOS, *ids, EOS], 6)
    assert numpy(y).tolist() == padded([*ids, EOS], 6)
    assert numpy(sample_weight).astype(int).tolist() == padded([1] * (len(ids) + 1), 6)


def test_without_start_or_end_token(tokenizer, encode):
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=8, add_start_token=False, add_end_token=False
    )
    x, y, _ = preprocessor(["a"])
    ids = encode("a")
    assert numpy(x["token_ids"])[0].tolist() == padded(ids, 8)
    assert numpy(y)[0].tolist() == padded(ids[1:], 8)


def test_text_that_exactly_fits_is_kept(tokenizer, encode):
    text = TEXTS[0]
    count = len(encode(text))
    # <bos> + count tokens fill the inputs; <eos> is the last label.
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=count + 1)
    x, y, sample_weight = preprocessor([text])
    assert numpy(x["token_ids"])[0].tolist() == [BOS, *encode(text)]
    assert numpy(y)[0].tolist() == [*encode(text), EOS]
    assert numpy(sample_weight).all()


def test_too_long_text_raises_by_default(tokenizer, encode):
    count = len(encode(TEXTS[0]))
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=count)
    with pytest.raises(ValueError) as error:
        preprocessor(["a", TEXTS[0]])
    message = str(error.value)
    assert f"text 1 has {count} tokens" in message
    assert f"`sequence_length={count}`" in message
    assert "truncate=" in message


def test_truncate_right_keeps_the_start(tokenizer, encode):
    ids = encode(TEXTS[0])
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=6, truncate="right"
    )
    x, y, sample_weight = preprocessor([TEXTS[0], "a"])
    # 6 inputs + 1 label position, minus <bos> and <eos>: 5 text tokens.
    assert numpy(x["token_ids"])[0].tolist() == [BOS, *ids[:5]]
    assert numpy(y)[0].tolist() == [*ids[:5], EOS]
    assert numpy(sample_weight)[0].all()
    assert numpy(x["token_ids"])[1].tolist() == padded([BOS, *encode("a"), EOS], 6)


def test_truncate_left_keeps_the_end(tokenizer, encode):
    ids = encode(TEXTS[0])
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=6, truncate="left"
    )
    x, y, _ = preprocessor([TEXTS[0]])
    assert numpy(x["token_ids"])[0].tolist() == [BOS, *ids[-5:]]
    assert numpy(y)[0].tolist() == [*ids[-5:], EOS]


def test_generate_preprocess_and_postprocess(tokenizer, encode):
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=40)
    prompts = preprocessor.generate_preprocess(TEXTS)
    token_ids = numpy(prompts["token_ids"])
    padding_mask = numpy(prompts["padding_mask"])
    for row, mask, text in zip(token_ids, padding_mask, TEXTS, strict=True):
        ids = [BOS, *encode(text)]  # no <eos> for generation
        assert row.tolist() == padded(ids, 40)
        assert mask.astype(int).tolist() == padded([1] * len(ids), 40)
    assert preprocessor.generate_postprocess(prompts) == TEXTS
    # A generated answer ending in <end_of_turn> and <eos>: both are stripped.
    answer = encode("ok")
    generated = padded([BOS, 106, *answer, 107, EOS], 40)
    outputs = {
        "token_ids": np.array([generated]),
        "padding_mask": np.array([[token != PAD for token in generated]]),
    }
    assert preprocessor.generate_postprocess(outputs) == ["ok"]


def test_generate_preprocess_truncation(tokenizer, encode):
    ids = encode(TEXTS[0])
    strict = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=4)
    with pytest.raises(ValueError, match="text 0 has"):
        strict.generate_preprocess(TEXTS[0])
    # A generation prompt only needs room for <bos>.
    left = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=4, truncate="left")
    prompt = left.generate_preprocess(TEXTS[0])
    assert numpy(prompt["token_ids"]).tolist() == [BOS, *ids[-3:]]
    longer = left.generate_preprocess(TEXTS[0], sequence_length=len(ids) + 1)
    assert numpy(longer["token_ids"]).tolist() == [BOS, *ids]


def test_chat_text_keeps_turn_tokens(tokenizer):
    text = format_chat([{"role": "user", "content": "Hi"}])
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=32)
    prompt = preprocessor.generate_preprocess([text])
    ids = numpy(prompt["token_ids"])[0].tolist()
    assert ids[:2] == [BOS, 106] and ids.count(107) == 1


def test_tf_data_matches_eager(tokenizer):
    tf = pytest.importorskip("tensorflow")
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=40)
    eager_x, eager_y, eager_weights = preprocessor(TEXTS)
    dataset = tf.data.Dataset.from_tensor_slices(TEXTS).batch(len(TEXTS))
    (graph_x, graph_y, graph_weights) = next(iter(dataset.map(preprocessor)))
    np.testing.assert_array_equal(graph_x["token_ids"], numpy(eager_x["token_ids"]))
    np.testing.assert_array_equal(graph_y, numpy(eager_y))
    np.testing.assert_array_equal(graph_weights, numpy(eager_weights))


@pytest.mark.parametrize("truncate", ["left", "right"])
def test_tf_data_truncation_matches_eager(tokenizer, truncate):
    tf = pytest.importorskip("tensorflow")
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=6, truncate=truncate
    )
    eager_x, eager_y, _ = preprocessor(TEXTS)
    dataset = tf.data.Dataset.from_tensor_slices(TEXTS).batch(len(TEXTS))
    graph_x, graph_y, _ = next(iter(dataset.map(preprocessor)))
    np.testing.assert_array_equal(graph_x["token_ids"], numpy(eager_x["token_ids"]))
    np.testing.assert_array_equal(graph_y, numpy(eager_y))
    # Unbatched elements take the same path.
    single = next(iter(tf.data.Dataset.from_tensors(TEXTS[0]).map(preprocessor)))
    np.testing.assert_array_equal(
        single[0]["token_ids"], numpy(eager_x["token_ids"])[0]
    )


def test_tf_data_error_names_text_and_count(tokenizer, encode):
    tf = pytest.importorskip("tensorflow")
    count = len(encode(TEXTS[0]))
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=count)
    dataset = tf.data.Dataset.from_tensor_slices(["a", TEXTS[0]]).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        next(iter(dataset.map(preprocessor)))
    message = str(error.value)
    assert "longer than `sequence_length`" in message
    assert f"`sequence_length={count}`" in message
    assert f"[1] [has] [{count}]" in message


@pytest.mark.parametrize(
    "arguments, pattern",
    [
        ({"truncate": "middle"}, "truncate"),
        ({"truncate": None}, "truncate"),
        ({"sequence_length": 0}, "sequence_length"),
        ({"sequence_length": 2.5}, "sequence_length"),
    ],
)
def test_invalid_arguments(tokenizer, arguments, pattern):
    with pytest.raises(ValueError, match=pattern):
        Gemma2CausalLMPreprocessor(tokenizer, **arguments)


def test_labels_are_not_accepted(tokenizer):
    preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=8)
    with pytest.raises(ValueError, match="y=None"):
        preprocessor(["a"], y=[1])


def test_config_round_trip(tokenizer):
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=12, add_end_token=False, truncate="left"
    )
    config = preprocessor.get_config()
    assert config["truncate"] == "left"
    restored = Gemma2CausalLMPreprocessor.from_config(config)
    assert restored.sequence_length == 12
    assert restored.truncate == "left"
    assert restored.add_end_token is False
    assert isinstance(restored.tokenizer, Gemma2Tokenizer)


def test_preset_round_trip(tokenizer, tmp_path):
    preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=12, truncate="right"
    )
    preprocessor.save_to_preset(str(tmp_path))
    with open(tmp_path / "preprocessor.json") as file:
        registered_name = json.load(file)["registered_name"]
    assert registered_name == "keras_gemma2>Gemma2CausalLMPreprocessor"
    restored = Gemma2CausalLMPreprocessor.from_preset(str(tmp_path))
    assert (restored.sequence_length, restored.truncate) == (12, "right")
    x, _, _ = restored(TEXTS)
    expected, _, _ = preprocessor(TEXTS)
    np.testing.assert_array_equal(numpy(x["token_ids"]), numpy(expected["token_ids"]))
    overridden = Gemma2CausalLMPreprocessor.from_preset(
        str(tmp_path), sequence_length=20
    )
    assert overridden.sequence_length == 20


def test_from_keras_hub_gemma_preset(gemma_vocabulary, tmp_path):
    keras_hub.models.GemmaCausalLMPreprocessor(
        keras_hub.models.GemmaTokenizer(proto=gemma_vocabulary),
        sequence_length=77,
        add_end_token=False,
    ).save_to_preset(str(tmp_path))
    restored = Gemma2CausalLMPreprocessor.from_preset(str(tmp_path))
    assert type(restored.tokenizer) is Gemma2Tokenizer
    assert (restored.sequence_length, restored.add_end_token) == (77, False)
    assert restored.truncate == "error"


def test_from_hugging_face_directory(gemma_vocabulary, tmp_path):
    import shutil

    shutil.copy(gemma_vocabulary, tmp_path / "tokenizer.model")
    restored = Gemma2CausalLMPreprocessor.from_preset(str(tmp_path), sequence_length=16)
    assert restored.sequence_length == 16
    assert restored.tokenizer.end_of_turn_token_id == 107


def test_from_preset_with_a_foreign_preprocessor(gemma_vocabulary, tmp_path):
    import shutil

    shutil.copy(gemma_vocabulary, tmp_path / "tokenizer.model")
    with open(tmp_path / "preprocessor.json", "w") as file:
        json.dump(
            {
                "class_name": "BertTextClassifierPreprocessor",
                "registered_name": "keras_hub>BertTextClassifierPreprocessor",
                "config": {},
            },
            file,
        )
    with pytest.raises(ValueError, match="BertTextClassifierPreprocessor"):
        Gemma2CausalLMPreprocessor.from_preset(str(tmp_path))
