"""Top-k distillation: the loss against float64 numpy, and the teacher store
(round trip, equality with online top-k, resumption after a failure, damage)."""

import json
import os
import shutil

import keras
import numpy as np
import pytest

from keras_gemma2.training import (
    read_teacher_store,
    store_bytes_per_token,
    teacher_fingerprint,
    teacher_topk,
    token_distillation_losses,
    topk_distillation_loss,
    topk_token_distillation_losses,
    write_teacher_store,
)
from tests.text_fixtures import make_text_causal_lm

SEQUENCE_LENGTH = 24
K = 16
TEXTS = [
    "def add(a, b):\n    return a + b",
    "import os",
    "Grüße aus Köln!",
    "for i in range(10):\n    print(i)",
    "x = 1",
    "class A:\n    pass",
]
# 6 rows in shards of 4: two shards, the second one short. Two rows per
# teacher call: shard 0 takes calls 1-2, shard 1 call 3. Log-probabilities
# at temperature 2, not the default 1.
TEMPERATURE = 2.0
STORE_ARGUMENTS = {"k": K, "batch_size": 2, "rows_per_shard": 4, "temperature": 2.0}


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk_kl64(student_logits, teacher_ids, teacher_logprobs, temperature):
    """float64 tau^2 KL over the teacher's top k plus one "rest" outcome.

    `teacher_logprobs` are at `temperature`; the student's probabilities are
    its full softmax at `temperature`, gathered at the same ids.
    """
    q_all = np.exp(_log_softmax64(np.asarray(student_logits) / temperature))
    q = np.take_along_axis(q_all, teacher_ids, axis=-1)
    p = np.exp(np.asarray(teacher_logprobs, np.float64))
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    kept = (p * np.log(p / q)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 0, p_rest * np.log(p_rest / q_rest), 0.0)
    return temperature**2 * (kept + rest)


def _model(vocabulary_path, seed):
    keras.utils.set_random_seed(seed)
    return make_text_causal_lm(vocabulary_path, SEQUENCE_LENGTH)


@pytest.fixture(scope="module")
def teacher(gemma_vocabulary):
    return _model(gemma_vocabulary, seed=1)


@pytest.fixture(scope="module")
def data(teacher):
    x, y, sample_weight = teacher.preprocessor(TEXTS)
    x = {key: _numpy(value) for key, value in x.items()}
    return x, _numpy(y), _numpy(sample_weight)


@pytest.fixture(scope="module")
def store(teacher, data, tmp_path_factory):
    """A complete store of `teacher` on `data`, written without interruption."""
    directory = str(tmp_path_factory.mktemp("store"))
    x, y, sample_weight = data
    write_teacher_store(
        teacher, x, directory, y=y, sample_weight=sample_weight, **STORE_ARGUMENTS
    )
    return directory


def _copy(directory, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(directory, copy)
    return copy


# === teacher_topk and the top-k loss against float64 numpy ===


def test_teacher_topk_matches_numpy_argsort_and_log_softmax():
    logits = np.random.default_rng(0).normal(size=(2, 5, 50)).astype("float32") * 3
    ids, logprobs = teacher_topk(logits, k=7)
    expected_ids = np.argsort(-logits, axis=-1, kind="stable")[..., :7]
    expected_logprobs = np.take_along_axis(
        _log_softmax64(logits), expected_ids, axis=-1
    )
    assert _numpy(ids).dtype == np.int32 and _numpy(logprobs).dtype == np.float32
    np.testing.assert_array_equal(_numpy(ids), expected_ids)
    np.testing.assert_allclose(_numpy(logprobs), expected_logprobs, atol=1e-5)


@pytest.mark.parametrize("k", [0, -3, 51, 2.0, True])
def test_teacher_topk_rejects_k_outside_the_vocabulary(k):
    logits = np.zeros((1, 2, 50), "float32")
    with pytest.raises(ValueError, match=rf"`k`.*vocabulary size 50.*k={k!r}"):
        teacher_topk(logits, k)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_loss_matches_float64_reference_with_padding(temperature):
    rng = np.random.default_rng(1)
    teacher_logits = rng.normal(size=(2, 6, 40)).astype("float32") * 3
    student_logits = rng.normal(size=(2, 6, 40)).astype("float32") * 3
    labels = rng.integers(0, 40, size=(2, 6))
    weights = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], "float32")
    ids, logprobs = teacher_topk(teacher_logits, k=6, temperature=temperature)
    ids = _numpy(ids)
    teacher_logprobs64 = np.take_along_axis(
        _log_softmax64(teacher_logits / temperature), ids, -1
    )
    np.testing.assert_allclose(_numpy(logprobs), teacher_logprobs64, atol=1e-5)
    expected = _topk_kl64(student_logits, ids, teacher_logprobs64, temperature)

    losses = topk_token_distillation_losses(
        student_logits, ids, logprobs, temperature=temperature
    )
    np.testing.assert_allclose(_numpy(losses), expected, atol=1e-5, rtol=1e-5)
    loss = topk_distillation_loss(
        student_logits, ids, logprobs, sample_weight=weights, temperature=temperature
    )
    weighted = (weights * expected).sum() / weights.sum()
    np.testing.assert_allclose(_numpy(loss), weighted, rtol=1e-5)
    # Mixed with the student's next-token cross-entropy over the whole vocabulary.
    cross_entropy = -np.take_along_axis(
        _log_softmax64(student_logits), labels[..., None], -1
    )[..., 0]
    mixed = topk_distillation_loss(
        student_logits, ids, logprobs, labels, weights, temperature, alpha=0.3
    )
    expected_mixed = (weights * (0.7 * expected + 0.3 * cross_entropy)).sum()
    np.testing.assert_allclose(_numpy(mixed), expected_mixed / weights.sum(), rtol=1e-5)
    # Grouping the tokens outside the top k: below the full KL, not equal.
    full = _numpy(
        token_distillation_losses(student_logits, teacher_logits, temperature)
    )
    assert (expected <= full + 1e-6).all() and np.abs(full - expected).max() > 1e-2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_loss_at_full_vocabulary_equals_full_forward_kl(temperature):
    rng = np.random.default_rng(2)
    teacher_logits = rng.normal(size=(2, 5, 30)).astype("float32") * 4
    student_logits = rng.normal(size=(2, 5, 30)).astype("float32") * 4
    ids, logprobs = teacher_topk(teacher_logits, k=30, temperature=temperature)
    topk = topk_token_distillation_losses(student_logits, ids, logprobs, temperature)
    full = token_distillation_losses(student_logits, teacher_logits, temperature)
    np.testing.assert_allclose(_numpy(topk), _numpy(full), atol=1e-5)
    # The gradients agree too: the rest outcome, of mass ~0 on both sides,
    # adds neither NaN nor a spurious pull.
    gradients = [
        _numpy(_gradient(lambda s, f=f: f(s), student_logits))
        for f in (
            lambda s: topk_token_distillation_losses(s, ids, logprobs, temperature),
            lambda s: token_distillation_losses(s, teacher_logits, temperature),
        )
    ]
    assert np.isfinite(gradients[0]).all()
    np.testing.assert_allclose(gradients[0], gradients[1], atol=1e-5)


def _gradient(function, logits):
    """d sum(function(logits)) / d logits, on the active backend."""
    backend = keras.config.backend()
    logits = np.asarray(logits, "float32")
    if backend == "jax":
        import jax

        return jax.grad(lambda s: keras.ops.sum(function(s)))(logits)
    if backend == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(logits)
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(function(variable))
        return tape.gradient(total, variable)
    import torch

    tensor = torch.tensor(logits, requires_grad=True)
    function(tensor).sum().backward()
    return tensor.grad


def test_topk_loss_pulls_the_students_mass_outside_the_top_k():
    """The rest outcome: a student that puts its mass outside the teacher's
    top k is penalised, and its gradient moves mass back inside."""
    vocabulary = 12
    teacher = np.full((1, 1, vocabulary), -4.0, "float32")
    teacher[..., :3] = 3.0  # the teacher puts ~99.5% on tokens 0-2
    ids, logprobs = teacher_topk(teacher, k=3)
    matching = teacher.copy()
    wandering = teacher.copy()
    wandering[..., 3:] = 3.0  # same top 3 ratios, but 75% elsewhere
    losses = [
        float(_numpy(topk_token_distillation_losses(s, ids, logprobs))[0, 0])
        for s in (matching, wandering)
    ]
    expected = _topk_kl64(wandering, _numpy(ids), _numpy(logprobs), 1.0)[0, 0]
    assert losses[0] < 1e-6 and losses[1] > 1.0
    np.testing.assert_allclose(losses[1], expected, rtol=1e-5)
    gradient = _numpy(
        _gradient(lambda s: topk_token_distillation_losses(s, ids, logprobs), wandering)
    )
    assert (gradient[..., :3] < 0).all() and (gradient[..., 3:] > 0).all()


def test_topk_loss_rejects_mismatched_shapes_and_alpha_without_labels():
    student_logits = np.zeros((1, 3, 10), "float32")
    ids, logprobs = np.zeros((1, 3, 4), "int32"), np.zeros((1, 3, 4), "float32")
    with pytest.raises(ValueError, match=r"teacher_ids.shape=\(1, 2, 4\)"):
        topk_token_distillation_losses(student_logits, ids[:, :2], logprobs[:, :2])
    with pytest.raises(ValueError, match=r"teacher_logprobs.shape=\(1, 3, 3\)"):
        topk_token_distillation_losses(student_logits, ids, logprobs[..., :3])
    too_many = np.zeros((1, 3, 11), "int32")
    with pytest.raises(ValueError, match=r"`k`.*vocabulary size 10.*k=11"):
        topk_token_distillation_losses(student_logits, too_many, too_many * 1.0)
    with pytest.raises(ValueError, match=r"`temperature`.*temperature=0"):
        topk_token_distillation_losses(student_logits, ids, logprobs, temperature=0)
    with pytest.raises(ValueError, match=r"`labels` are required.*alpha=0.5"):
        topk_distillation_loss(student_logits, ids, logprobs, alpha=0.5)


# === The store ===


def test_store_round_trip_holds_the_teachers_topk(teacher, data, store):
    x, y, sample_weight = data
    stored_x, stored_y, stored_weight = read_teacher_store(store, teacher=teacher)
    np.testing.assert_array_equal(stored_x["token_ids"], x["token_ids"])
    np.testing.assert_array_equal(stored_x["padding_mask"], x["padding_mask"])
    np.testing.assert_array_equal(stored_y["labels"], y)
    np.testing.assert_array_equal(stored_weight, sample_weight.astype("float32"))
    ids, logprobs = [], []
    for start in range(0, len(TEXTS), STORE_ARGUMENTS["batch_size"]):
        batch = {key: value[start : start + 2] for key, value in x.items()}
        batch_ids, batch_logprobs = teacher_topk(
            keras.Model.predict_on_batch(teacher, batch), K, TEMPERATURE
        )
        ids.append(_numpy(batch_ids))
        logprobs.append(_numpy(batch_logprobs))
    np.testing.assert_array_equal(stored_y["teacher_ids"], np.concatenate(ids))
    np.testing.assert_allclose(
        stored_y["teacher_logprobs"], np.concatenate(logprobs), atol=1e-6
    )
    assert stored_y["teacher_ids"].dtype == np.int32
    assert stored_y["teacher_logprobs"].shape == (len(TEXTS), SEQUENCE_LENGTH, K)
    # The stored entries are sorted: the first 4 columns are the top 4.
    _, top4 = read_teacher_store(store, k=4)[:2]
    np.testing.assert_array_equal(top4["teacher_ids"], stored_y["teacher_ids"][..., :4])
    manifest = json.load(open(os.path.join(store, "store.json")))
    assert manifest["complete"] and manifest["vocabulary_size"] == 800
    assert manifest["temperature"] == TEMPERATURE
    np.testing.assert_array_equal(
        stored_y["teacher_temperature"], np.full(len(TEXTS), TEMPERATURE)
    )
    assert manifest["teacher_fingerprint"] == teacher_fingerprint(teacher)


def test_store_derives_labels_and_weights_from_token_ids(teacher, data, tmp_path):
    x = data[0]
    write_teacher_store(teacher, x, tmp_path, k=2, rows_per_shard=16)
    _, y, sample_weight = read_teacher_store(tmp_path)
    zeros = np.zeros((len(TEXTS), 1))
    np.testing.assert_array_equal(
        y["labels"], np.hstack([x["token_ids"][:, 1:], zeros])
    )
    expected_weight = np.hstack([x["padding_mask"][:, 1:], zeros])
    np.testing.assert_array_equal(sample_weight, expected_weight)


def test_training_from_the_store_equals_online_topk(
    teacher, data, store, gemma_vocabulary
):
    x, y, sample_weight = data
    stored_x, stored_y, stored_weight = read_teacher_store(store, teacher=teacher)
    student = _model(gemma_vocabulary, seed=2)
    student_logits = keras.Model.predict_on_batch(student, x)
    ids, logprobs = teacher_topk(
        keras.Model.predict_on_batch(teacher, x), K, TEMPERATURE
    )
    arguments = {"temperature": TEMPERATURE, "alpha": 0.5}
    online = topk_distillation_loss(
        student_logits, ids, logprobs, y, sample_weight, **arguments
    )
    stored = topk_distillation_loss(
        student_logits,
        stored_y["teacher_ids"],
        stored_y["teacher_logprobs"],
        stored_y["labels"],
        stored_weight,
        **arguments,
    )
    assert abs(float(_numpy(online)) - float(_numpy(stored))) <= 1e-5
    assert float(_numpy(stored)) > 0.1

    # The fit equivalence (twin students through `Gemma2Distiller`, store vs
    # online top-k) is tests/training/test_distiller.py's
    # test_fit_from_a_teacher_store_equals_online_top_k.


def test_store_resumes_after_a_failure_without_rewriting_done_shards(
    teacher, data, store, tmp_path, monkeypatch
):
    x, y, sample_weight = data
    directory = str(tmp_path / "interrupted")
    predict_on_batch = keras.Model.predict_on_batch
    calls = []

    def failing_on_third_call(model, batch):
        calls.append(len(batch["token_ids"]))
        if len(calls) == 3:  # the first teacher call of shard 1
            raise RuntimeError("killed")
        return predict_on_batch(model, batch)

    monkeypatch.setattr(keras.Model, "predict_on_batch", failing_on_third_call)
    arguments = dict(y=y, sample_weight=sample_weight, **STORE_ARGUMENTS)
    with pytest.raises(RuntimeError, match="killed"):
        write_teacher_store(teacher, x, directory, **arguments)
    assert sorted(os.listdir(directory)) == ["shard-00000.npz", "store.json"]
    with pytest.raises(ValueError, match=r"incomplete.*after 1 of 2 shards"):
        read_teacher_store(directory)
    # What a kill in the middle of writing shard 1 would leave.
    with open(os.path.join(directory, ".shard-00001.npz.partial"), "wb") as file:
        file.write(b"half a shard")
    first = os.stat(os.path.join(directory, "shard-00000.npz"))

    calls.clear()
    manifest = write_teacher_store(teacher, x, directory, **arguments)
    assert calls == [2]  # only shard 1 went through the teacher
    again = os.stat(os.path.join(directory, "shard-00000.npz"))
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert sorted(os.listdir(directory)) == sorted(os.listdir(store))
    for name in os.listdir(store):
        with open(os.path.join(store, name), "rb") as a:
            with open(os.path.join(directory, name), "rb") as b:
                assert a.read() == b.read(), name
    assert manifest["complete"]
    # A finished store is verified, not recomputed.
    calls.clear()
    write_teacher_store(teacher, x, directory, **arguments)
    assert calls == []


def test_store_refuses_to_mix_teachers_k_or_data_on_resume(
    teacher, data, store, tmp_path, gemma_vocabulary
):
    x, y, sample_weight = data
    directory = _copy(store, tmp_path)
    before = {
        n: os.stat(os.path.join(directory, n)).st_mtime_ns
        for n in os.listdir(directory)
    }
    arguments = dict(y=y, sample_weight=sample_weight, **STORE_ARGUMENTS)
    other_teacher = _model(gemma_vocabulary, seed=3)
    with pytest.raises(
        ValueError, match=r"another teacher: it has teacher_fingerprint=\w{12}\.\.\., "
    ):
        write_teacher_store(other_teacher, x, directory, **arguments)
    with pytest.raises(ValueError, match=r"another k: it has k=16, this call k=8"):
        write_teacher_store(teacher, x, directory, **{**arguments, "k": 8})
    with pytest.raises(
        ValueError, match=r"it has temperature=2.0, this call temperature=1.0"
    ):
        write_teacher_store(teacher, x, directory, **{**arguments, "temperature": 1})
    other_x = {**x, "token_ids": x["token_ids"][::-1].copy()}
    with pytest.raises(ValueError, match=r"other data: it has data_sha256="):
        write_teacher_store(teacher, other_x, directory, **arguments)
    after = {
        n: os.stat(os.path.join(directory, n)).st_mtime_ns
        for n in os.listdir(directory)
    }
    assert after == before


def test_reading_rejects_another_teacher_and_damaged_shards(
    teacher, store, tmp_path, gemma_vocabulary
):
    other_teacher = _model(gemma_vocabulary, seed=3)
    ours, theirs = teacher_fingerprint(teacher), teacher_fingerprint(other_teacher)
    assert ours != theirs
    with pytest.raises(ValueError, match=f"{ours[:12]}.*{theirs[:12]}"):
        read_teacher_store(store, teacher=other_teacher)
    with pytest.raises(ValueError, match=r"`k`.*k=16. Received: k=17"):
        read_teacher_store(store, k=17)

    truncated = _copy(store, tmp_path / "truncated")
    path = os.path.join(truncated, "shard-00001.npz")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match=r"shard-00001\.npz has \d+ bytes"):
        read_teacher_store(truncated)

    missing = _copy(store, tmp_path / "missing")
    os.remove(os.path.join(missing, "shard-00000.npz"))
    with pytest.raises(ValueError, match=r"shard-00000\.npz is missing"):
        read_teacher_store(missing)

    altered = _copy(store, tmp_path / "altered")
    path = os.path.join(altered, "shard-00001.npz")
    content = bytearray(open(path, "rb").read())
    content[-300] ^= 1
    open(path, "wb").write(bytes(content))
    with pytest.raises(ValueError, match=r"shard-00001\.npz does not match the SHA"):
        read_teacher_store(altered)

    with pytest.raises(FileNotFoundError, match="store.json is missing"):
        read_teacher_store(tmp_path / "nowhere")


@pytest.mark.parametrize("k", [0, -1, 801])
def test_writing_rejects_k_outside_the_vocabulary_before_writing(
    teacher, data, tmp_path, k
):
    directory = tmp_path / "store"
    with pytest.raises(ValueError, match=rf"`k`.*vocabulary size 800.*k={k}"):
        write_teacher_store(teacher, data[0], directory, k=k)
    assert not directory.exists()


def test_writing_rejects_labels_without_weights(teacher, data, tmp_path):
    x, y, _ = data
    with pytest.raises(ValueError, match="`y` and `sample_weight` together"):
        write_teacher_store(teacher, x, tmp_path, k=2, y=y)


def test_store_bytes_per_token_for_k_8_32_128(teacher, tmp_path):
    rng = np.random.default_rng(3)
    x = {
        "token_ids": rng.integers(4, 800, size=(64, SEQUENCE_LENGTH)),
        "padding_mask": np.ones((64, SEQUENCE_LENGTH), bool),
    }
    for k in (8, 32, 128):
        directory = tmp_path / f"k{k}"
        write_teacher_store(teacher, x, directory, k=k, batch_size=32)
        measured = store_bytes_per_token(directory)
        # int32 token id, bool mask, int32 label, float32 weight, then k
        # int32 ids and k float32 log-probabilities; the rest is zip headers.
        arrays = 13 + 8 * k
        print(f"\nteacher store, k={k}: {measured:.2f} bytes per token")
        assert arrays <= measured <= arrays + 3
