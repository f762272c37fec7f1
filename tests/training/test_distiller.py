"""`Gemma2Distiller`: its loss against float64 numpy, what it trains, saving, errors."""

import warnings

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2CausalLMPreprocessor
from keras_gemma2.data import GEMMA_TURN_PIECES, train_sentencepiece
from keras_gemma2.models import Gemma2Tokenizer
from keras_gemma2.training import (
    Gemma2Distiller,
    on_policy_batch,
    read_teacher_store,
    write_teacher_store,
)
from tests.text_fixtures import corpus_lines, make_text_causal_lm

PAIRS = {
    "prompts": ["def add(a, b):", "import os"],
    "responses": ["\n    return a + b\n", "\nprint(os.sep)\n"],
}


def _models(vocabulary, sequence_length=24):
    keras.utils.set_random_seed(1)
    teacher = make_text_causal_lm(vocabulary, sequence_length)
    keras.utils.set_random_seed(2)
    student = make_text_causal_lm(vocabulary, sequence_length)
    return teacher, student


def _numpy_loss(teacher, student, x, y, weights, temperature, alpha):
    """Float64: (1 - alpha) tau^2 KL(teacher_tau || student_tau) + alpha CE."""

    def log_softmax(logits):
        logits = logits - logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    teacher_logits = keras.ops.convert_to_numpy(teacher(x)).astype("float64")
    student_logits = keras.ops.convert_to_numpy(student(x)).astype("float64")
    log_p = log_softmax(teacher_logits / temperature)
    log_q = log_softmax(student_logits / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1) * temperature**2
    cross_entropy = -np.take_along_axis(log_softmax(student_logits), y[..., None], -1)[
        ..., 0
    ]
    per_token = (1 - alpha) * kl + alpha * cross_entropy
    return (per_token * weights).sum() / weights.sum()


def test_loss_equals_float64_numpy_on_raw_and_preprocessed_data(gemma_vocabulary):
    teacher, student = _models(gemma_vocabulary)
    distiller = Gemma2Distiller(teacher, student, temperature=2.0, alpha=0.25)
    distiller.compile(optimizer="sgd")
    x, y, weights = student.preprocessor(PAIRS)  # response-only weights
    x = {name: keras.ops.convert_to_numpy(value) for name, value in x.items()}
    y, weights = keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(weights)
    # The prompts are masked, the padding too: some weights are 0, some 1.
    assert 0 < weights.sum() < weights.size

    expected = _numpy_loss(teacher, student, x, y, weights, 2.0, 0.25)
    from_arrays = distiller.evaluate(x, y, sample_weight=weights, verbose=0)
    from_text = distiller.evaluate(PAIRS, batch_size=2, verbose=0)
    np.testing.assert_allclose(from_arrays, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_text, expected, rtol=1e-5, atol=1e-6)


def test_fit_trains_the_student_and_leaves_the_teacher(gemma_vocabulary):
    teacher, student = _models(gemma_vocabulary)
    teacher_before = [w.copy() for w in teacher.get_weights()]
    student_before = [w.copy() for w in student.get_weights()]
    distiller = Gemma2Distiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    assert len(distiller.trainable_weights) == len(student.trainable_weights)

    texts = ["def f(x):\n    return x * 2\n", "for i in range(3):\n    print(i)\n"]
    history = distiller.fit(texts * 2, batch_size=2, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    for before, after in zip(teacher_before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    changed = [
        not np.array_equal(before, after)
        for before, after in zip(student_before, student.get_weights(), strict=True)
    ]
    assert all(changed)


@pytest.mark.parametrize("teacher_kind", ["bfloat16", "int8"])
def test_low_precision_teachers(gemma_vocabulary, teacher_kind):
    teacher, student = _models(gemma_vocabulary)
    if teacher_kind == "int8":
        teacher.quantize("int8")
    else:
        config = teacher.backbone.get_config()
        config["dtype"] = "bfloat16"
        low = Gemma2CausalLM(Gemma2Backbone.from_config(config), teacher.preprocessor)
        low.set_weights(teacher.get_weights())
        teacher = low
    distiller = Gemma2Distiller(teacher, student)
    distiller.compile(optimizer="sgd")
    x, y, weights = student.preprocessor(PAIRS)
    x = {name: keras.ops.convert_to_numpy(value) for name, value in x.items()}
    y, weights = keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(weights)
    expected = _numpy_loss(teacher, student, x, y, weights, 1.0, 0.0)
    loss = distiller.evaluate(x, y, sample_weight=weights, verbose=0)
    # The teacher's logits round differently in `evaluate`'s compiled graph
    # than in the eager reference call (bfloat16: 8 bits of mantissa).
    np.testing.assert_allclose(loss, expected, rtol=1e-2)
    if teacher_kind == "int8":
        history = distiller.fit(x, y, sample_weight=weights, batch_size=2, verbose=0)
        assert np.isfinite(history.history["loss"][0])


def test_save_and_load_model_round_trip(gemma_vocabulary, tmp_path):
    teacher, student = _models(gemma_vocabulary)
    distiller = Gemma2Distiller(teacher, student, temperature=1.5, beta=0.5)
    distiller.compile(optimizer="adam")
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)

    loaded = keras.models.load_model(path)
    assert isinstance(loaded, Gemma2Distiller)
    assert (loaded.temperature, loaded.alpha, loaded.beta) == (1.5, 0.0, 0.5)
    assert type(loaded.student) is Gemma2CausalLM
    assert not loaded.teacher.trainable
    x = {"token_ids": np.array([[2, 40, 41, 42]]), "padding_mask": np.ones((1, 4))}
    for original, restored in ((student, loaded.student), (teacher, loaded.teacher)):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(restored(x)),
            keras.ops.convert_to_numpy(original(x)),
            rtol=0,
            atol=1e-6,
        )
    # The student leaves as a plain causal LM, preprocessor included.
    assert loaded.student.generate("import", max_length=10)


def test_vocabulary_mismatches_are_refused(gemma_vocabulary):
    teacher, _ = _models(gemma_vocabulary)
    config = teacher.backbone.get_config()
    config["vocabulary_size"] -= 1
    smaller = Gemma2CausalLM(Gemma2Backbone.from_config(config))
    with pytest.raises(ValueError, match="teacher vocabulary_size=800, student"):
        Gemma2Distiller(teacher, smaller)

    # Same size, other text: another SentencePiece model.
    other_vocabulary = train_sentencepiece(
        corpus_lines()[::2], 800, user_defined_pieces=GEMMA_TURN_PIECES
    )
    other = Gemma2CausalLM(
        Gemma2Backbone(**teacher.backbone.get_config()),
        Gemma2CausalLMPreprocessor(Gemma2Tokenizer(proto=other_vocabulary)),
    )
    with pytest.raises(ValueError, match="different tokenizers"):
        Gemma2Distiller(teacher, other)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"temperature": float("inf")}, "temperature=inf"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"beta": -0.1}, "beta=-0.1"),
    ],
)
def test_bad_settings(gemma_vocabulary, arguments, message):
    teacher, student = _models(gemma_vocabulary)
    with pytest.raises(ValueError, match=message):
        Gemma2Distiller(teacher, student, **arguments)


def test_bad_models_and_loss(gemma_vocabulary):
    teacher, student = _models(gemma_vocabulary)
    with pytest.raises(TypeError, match="`teacher`, expected a `Gemma2CausalLM`"):
        Gemma2Distiller(teacher.backbone, student)
    distiller = Gemma2Distiller(teacher, student)
    with pytest.raises(ValueError, match="computes its own loss"):
        distiller.compile(optimizer="sgd", loss="mse")


def test_a_student_larger_than_its_teacher_warns(gemma_vocabulary):
    teacher, student = _models(gemma_vocabulary)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Gemma2Distiller(student=teacher, teacher=_models(gemma_vocabulary)[1])
    assert not [w for w in caught if "more parameters" in str(w.message)]
    config = teacher.backbone.get_config()
    config.update(num_layers=3)
    larger = Gemma2CausalLM(Gemma2Backbone.from_config(config), teacher.preprocessor)
    with pytest.warns(UserWarning, match="more parameters"):
        Gemma2Distiller(teacher, larger)


def _numpy_topk_loss(teacher, student, x, weights, k, temperature):
    """Float64 forward KL at tau over the teacher's top k plus "the rest"."""

    def softmax(logits):
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    teacher_logits = keras.ops.convert_to_numpy(teacher(x)).astype("float64")
    student_logits = keras.ops.convert_to_numpy(student(x)).astype("float64")
    ids = np.argsort(-teacher_logits, axis=-1, kind="stable")[..., :k]
    p = np.take_along_axis(softmax(teacher_logits / temperature), ids, -1)
    q = np.take_along_axis(softmax(student_logits / temperature), ids, -1)
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 1e-12, p_rest * np.log(p_rest / q_rest), 0.0)
    kl = ((p * np.log(p / q)).sum(-1) + rest) * temperature**2
    return (kl * weights).sum() / weights.sum()


@pytest.mark.parametrize("k", [5, 800])
def test_online_top_k_equals_float64_numpy(gemma_vocabulary, k):
    """Top k plus the rest; at k = vocabulary it is the full forward KL."""
    teacher, student = _models(gemma_vocabulary)
    distiller = Gemma2Distiller(teacher, student, temperature=2.0, top_k=k)
    distiller.compile(optimizer="sgd")
    x, y, weights = student.preprocessor(PAIRS)
    x = {name: keras.ops.convert_to_numpy(value) for name, value in x.items()}
    y, weights = keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(weights)
    loss = distiller.evaluate(x, y, sample_weight=weights, verbose=0)
    expected = _numpy_topk_loss(teacher, student, x, weights, k, 2.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    if k == 800:
        full = _numpy_loss(teacher, student, x, y, weights, 2.0, 0.0)
        np.testing.assert_allclose(loss, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [0, 801, 2.5])
def test_bad_top_k(gemma_vocabulary, top_k):
    teacher, student = _models(gemma_vocabulary)
    with pytest.raises(ValueError, match=f"top_k={top_k}"):
        Gemma2Distiller(teacher, student, top_k=top_k)


def test_fit_from_a_teacher_store_equals_online_top_k(gemma_vocabulary, tmp_path):
    """The issue's equivalence: two SGD steps, store (no teacher) vs online."""
    teacher, student = _models(gemma_vocabulary)
    x, y, weights = student.preprocessor(PAIRS)
    x = {name: keras.ops.convert_to_numpy(value) for name, value in x.items()}
    y, weights = keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(weights)
    store = tmp_path / "store"
    write_teacher_store(
        teacher, x, store, k=16, y=y, sample_weight=weights, temperature=2.0
    )
    stored_x, stored_y, stored_weights = read_teacher_store(store, teacher=teacher)
    twin = make_text_causal_lm(gemma_vocabulary, 24)
    twin.set_weights(student.get_weights())
    online = Gemma2Distiller(teacher, student, temperature=2.0, alpha=0.5, top_k=16)
    offline = Gemma2Distiller(None, twin, temperature=2.0, alpha=0.5)
    results = []
    for distiller, data in (
        (online, (x, y, weights)),
        (offline, (stored_x, stored_y, stored_weights)),
    ):
        distiller.compile(optimizer=keras.optimizers.SGD(0.5))
        history = distiller.fit(
            *data[:2], sample_weight=data[2], batch_size=2, epochs=2, verbose=0
        )
        results.append(history.history["loss"])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)
    assert results[0][1] < results[0][0]
    for a, b in zip(student.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="has no teacher"):
        offline.evaluate(x, y, sample_weight=weights, verbose=0)
    # A store is for the temperature it was written at.
    at_one = Gemma2Distiller(None, twin, temperature=1.0)
    at_one.compile(optimizer="sgd")
    for call in (at_one.fit, at_one.evaluate):
        with pytest.raises(ValueError, match=r"temperature 2, .*temperature=1\b"):
            call(stored_x, stored_y, sample_weight=stored_weights, verbose=0)


def test_on_policy_batches_are_the_students_greedy_continuations(gemma_vocabulary):
    teacher, student = _models(gemma_vocabulary)
    student.compile(sampler="greedy")
    x, y, weights = student.preprocessor(PAIRS)
    x = {name: keras.ops.convert_to_numpy(value) for name, value in x.items()}
    y, weights = keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(weights)
    new_x, new_y, new_weights = on_policy_batch(student, x, y, weights, (1, 107))

    tokenizer = student.preprocessor.tokenizer
    for row, prompt in enumerate(PAIRS["prompts"]):
        prompt_ids = [2] + [int(t) for t in np.asarray(tokenizer.tokenize(prompt))]
        sequence = np.concatenate([new_x["token_ids"][row], new_y[row, -1:]])
        # The prompt is kept; what follows is the student's greedy text.
        assert sequence[: len(prompt_ids)].tolist() == prompt_ids
        # Greedy decoding by hand: full forward passes, argmax, stop tokens.
        expected = list(prompt_ids)
        while len(expected) < 25 and expected[-1] not in (1, 107):
            inputs = {
                "token_ids": np.array([expected]),
                "padding_mask": np.ones((1, len(expected)), bool),
            }
            logits = keras.ops.convert_to_numpy(student(inputs))[0, -1]
            expected.append(int(np.argmax(logits)))
        assert sequence[: len(expected)].tolist() == expected
        assert not sequence[len(expected) :].any()  # padding after the stop
        kept = np.arange(25) < len(expected)
        # Weights: 1 exactly on the generated tokens (as label positions).
        generated_positions = np.flatnonzero(kept)[len(prompt_ids) :]
        np.testing.assert_array_equal(
            np.flatnonzero(new_weights[row]), generated_positions - 1
        )


def test_on_policy_fraction_draws_batches(gemma_vocabulary):
    teacher, student = _models(gemma_vocabulary)
    rows = {name: value * 3 for name, value in PAIRS.items()}
    distiller = Gemma2Distiller(teacher, student, on_policy_fraction=1.0, seed=0)
    distiller.compile(optimizer="sgd")
    history = distiller.fit(rows, batch_size=2, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["on_policy_batches"] == [3, 3]
    with pytest.raises(ValueError, match="on_policy_fraction=1.5"):
        Gemma2Distiller(teacher, student, on_policy_fraction=1.5)
