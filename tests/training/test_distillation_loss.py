"""Distillation losses against a float64 numpy reference, on every backend."""

import keras
import numpy as np
import pytest

from keras_gemma2.training.distillation_loss import (
    LogitsKLDistillation,
    distillation_loss,
    token_distillation_losses,
)

BACKEND = keras.config.backend()


# --- float64 numpy reference (probabilities, not log-space mixtures) ---------


def _softmax(logits, temperature=1.0):
    scaled = np.asarray(logits, "float64") / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def _np_kl(p, q):
    """sum p log(p / q) over the last axis, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(axis=-1)


def _np_divergence(student, teacher, temperature=1.0, beta=0.0):
    p_s = _softmax(student, temperature)
    p_t = _softmax(teacher, temperature)
    if beta == 0:
        divergence = _np_kl(p_t, p_s)
    elif beta == 1:
        divergence = _np_kl(p_s, p_t)
    else:
        mixture = beta * p_t + (1 - beta) * p_s
        divergence = beta * _np_kl(p_t, mixture) + (1 - beta) * _np_kl(p_s, mixture)
    return divergence * temperature**2


def _np_cross_entropy(student, labels):
    p_s = _softmax(student)
    return -np.log(np.take_along_axis(p_s, labels[..., None], axis=-1)[..., 0])


def _logits(shape=(2, 5, 11), seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    student = (scale * rng.standard_normal(shape)).astype("float32")
    teacher = (scale * rng.standard_normal(shape)).astype("float32")
    return student, teacher


def _numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


# --- per-token values --------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_per_token_divergence_matches_numpy(beta, temperature):
    student, teacher = _logits()
    losses = token_distillation_losses(
        student, teacher, temperature=temperature, beta=beta
    )
    assert tuple(losses.shape) == (2, 5)
    assert keras.backend.standardize_dtype(losses.dtype) == "float32"
    expected = _np_divergence(student, teacher, temperature, beta)
    assert expected.min() > 0.01  # a real divergence, not near-zero noise
    np.testing.assert_allclose(_numpy(losses), expected, rtol=1e-5, atol=1e-7)


def test_generalised_jsd_is_not_the_limit_of_the_kls():
    """TRL's convention: the endpoints are the KLs, the mixture tends to 0."""
    student, teacher = _logits()
    forward = _numpy(token_distillation_losses(student, teacher, beta=0.0))
    near_zero = _numpy(token_distillation_losses(student, teacher, beta=1e-4))
    np.testing.assert_allclose(
        forward, _np_kl(_softmax(teacher), _softmax(student)), rtol=1e-5
    )
    assert np.all(near_zero < 0.01 * forward)


# --- masking, mixing and reductions -----------------------------------------


def _weights():
    padding = np.ones((2, 5), "float32")
    padding[1, 3:] = 0  # right padding of the second row
    response_only = padding.copy()
    response_only[:, :2] = 0  # the prompt
    return {"padding": padding, "response_only": response_only}


@pytest.mark.parametrize("weights_kind", ["padding", "response_only"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize(
    "reduction", ["mean_with_sample_weight", "sum_over_batch_size", "sum"]
)
def test_weighted_reduction_matches_numpy(weights_kind, alpha, reduction):
    student, teacher = _logits(seed=1)
    labels = np.random.default_rng(2).integers(0, 11, (2, 5)).astype("int32")
    weights = _weights()[weights_kind]
    loss = distillation_loss(
        student,
        teacher,
        labels=labels,
        sample_weight=weights,
        temperature=2.0,
        alpha=alpha,
        reduction=reduction,
    )
    per_token = (1 - alpha) * _np_divergence(
        student, teacher, 2.0
    ) + alpha * _np_cross_entropy(student, labels)
    total = (weights * per_token).sum()
    expected = {
        "mean_with_sample_weight": total / weights.sum(),
        "sum_over_batch_size": total / weights.size,
        "sum": total,
    }[reduction]
    assert np.shape(_numpy(loss)) == ()
    np.testing.assert_allclose(_numpy(loss), expected, rtol=1e-5)


def test_padding_changes_the_mean():
    """Padded positions with a large divergence must not leak into the mean."""
    student, teacher = _logits(seed=1)
    weights = _weights()["padding"]
    masked = float(_numpy(distillation_loss(student, teacher, sample_weight=weights)))
    unmasked = float(_numpy(distillation_loss(student, teacher)))
    divergence = _np_divergence(student, teacher)
    np.testing.assert_allclose(masked, divergence[weights > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(unmasked, divergence.mean(), rtol=1e-5)
    assert abs(masked - unmasked) > 1e-3


def test_all_zero_weights_give_zero_not_nan():
    student, teacher = _logits()
    loss = distillation_loss(student, teacher, sample_weight=np.zeros((2, 5)))
    assert float(_numpy(loss)) == 0.0


# --- masked teacher vocabularies, dtypes, gradients -------------------------


@pytest.mark.parametrize("mask_value", [-np.inf, -1e9])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_masked_teacher_entries_contribute_zero(mask_value, beta):
    student, teacher = _logits()
    teacher[..., 4:] = mask_value  # teacher probability exactly 0 there
    losses = _numpy(token_distillation_losses(student, teacher, beta=beta))
    assert np.all(np.isfinite(losses))
    expected = _np_divergence(student, teacher, beta=beta)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_bfloat16_inputs_return_float32():
    student, teacher = _logits()
    student_bf16 = keras.ops.cast(student, "bfloat16")
    teacher_bf16 = keras.ops.cast(teacher, "bfloat16")
    losses = token_distillation_losses(student_bf16, teacher_bf16, temperature=2.0)
    assert keras.backend.standardize_dtype(losses.dtype) == "float32"
    # The reference sees the same bfloat16-rounded logits.
    rounded_student = _numpy(keras.ops.cast(student_bf16, "float32"))
    rounded_teacher = _numpy(keras.ops.cast(teacher_bf16, "float32"))
    expected = _np_divergence(rounded_student, rounded_teacher, 2.0)
    np.testing.assert_allclose(_numpy(losses), expected, rtol=1e-5)
    loss = distillation_loss(student_bf16, teacher_bf16, temperature=2.0)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"


def _gradient(loss_of, student):
    """d loss_of(student) / d student, on this backend, as numpy."""
    if BACKEND == "jax":
        import jax

        return np.asarray(jax.grad(loss_of)(jax.numpy.asarray(student)))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        variable = tf.constant(student)
        with tf.GradientTape() as tape:
            tape.watch(variable)
            value = loss_of(variable)
        return tape.gradient(value, variable).numpy()
    import torch

    variable = torch.tensor(student, requires_grad=True)
    loss_of(variable).backward()
    return variable.grad.numpy()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_kl_gradient_is_tau_times_probability_difference(temperature):
    student, teacher = _logits()
    teacher[0, 0, 3:] = -np.inf  # masked entries give finite gradients too

    def loss_of(student_logits):
        return keras.ops.sum(
            token_distillation_losses(student_logits, teacher, temperature)
        )

    gradient = _gradient(loss_of, student)
    expected = temperature * (
        _softmax(student, temperature) - _softmax(teacher, temperature)
    )
    assert np.all(np.isfinite(gradient))
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6)


# --- Keras' LogitsDistillation trap, and Distiller ---------------------------


def test_keras_default_logits_distillation_is_wrong_and_ours_is_right():
    rng = np.random.default_rng(7)
    student = (2.0 * rng.standard_normal((1, 2, 1000))).astype("float32")
    teacher = (2.0 * rng.standard_normal((1, 2, 1000))).astype("float32")
    temperature = 3.0  # LogitsDistillation's default
    reference = _np_divergence(student, teacher, temperature).mean()
    keras_default = float(
        _numpy(keras.distillation.LogitsDistillation().compute_loss(teacher, student))
    )
    ours = float(_numpy(LogitsKLDistillation().compute_loss(teacher, student)))
    print(
        f"\n[{BACKEND}] T=2, vocab 1000, temperature 3: numpy KL {reference:.6f}, "
        f"LogitsKLDistillation {ours:.6f}, keras LogitsDistillation() "
        f"{keras_default:.6f}"
    )
    np.testing.assert_allclose(ours, reference, rtol=1e-5)
    assert abs(keras_default - reference) > 10 * reference


def _dense_model(units, seed, name):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 4))
    outputs = keras.layers.Dense(units, name=f"{name}_dense")(inputs)
    return keras.Model(inputs, outputs, name=name)


def test_keras_distiller_with_our_loss_gives_the_numpy_kl():
    teacher = _dense_model(7, seed=1, name="teacher")
    student = _dense_model(7, seed=2, name="student")
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype("float32")
    y = np.zeros((2, 3), "int32")
    reference = _np_divergence(
        _numpy(student(x)), _numpy(teacher(x)), temperature=2.0
    ).mean()
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=LogitsKLDistillation(temperature=2.0),
        student_loss_weight=0.0,
    )
    # Distiller requires a student loss; weight 0 keeps it out of the total.
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy"
    )
    evaluated = distiller.evaluate(x, y, verbose=0, return_dict=True)
    np.testing.assert_allclose(evaluated["total_loss"], reference, rtol=1e-5)
    trained = distiller.train_on_batch(x, y, return_dict=True)  # loss before the step
    np.testing.assert_allclose(trained["total_loss"], reference, rtol=1e-5)
    after = _np_divergence(_numpy(student(x)), _numpy(teacher(x)), 2.0).mean()
    assert after < reference  # the step moved the student toward the teacher


def test_logits_kl_distillation_config_round_trip():
    loss = LogitsKLDistillation(temperature=2.0, beta=0.25)
    assert loss.get_config() == {"temperature": 2.0, "beta": 0.25}
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert isinstance(restored, LogitsKLDistillation)
    assert (restored.temperature, restored.beta) == (2.0, 0.25)
    student, teacher = _logits()
    np.testing.assert_allclose(
        _numpy(restored.compute_loss(teacher, student)),
        _np_divergence(student, teacher, 2.0, 0.25).mean(),
        rtol=1e-5,
    )


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature", [0, -1.0, float("inf"), float("nan"), "2", True]
)
def test_bad_temperature(temperature):
    student, teacher = _logits()
    with pytest.raises(ValueError, match="temperature="):
        token_distillation_losses(student, teacher, temperature=temperature)
    with pytest.raises(ValueError, match="temperature="):
        LogitsKLDistillation(temperature=temperature)


@pytest.mark.parametrize("name", ["beta", "alpha"])
@pytest.mark.parametrize("value", [-0.1, 1.5, None])
def test_bad_beta_and_alpha(name, value):
    student, teacher = _logits()
    with pytest.raises(ValueError, match=f"`{name}`.*{name}={value}"):
        distillation_loss(student, teacher, **{name: value})
    if name == "beta":
        with pytest.raises(ValueError, match="beta="):
            LogitsKLDistillation(beta=value)


def test_vocabulary_mismatch_names_both_sizes():
    rng = np.random.default_rng(0)
    student = rng.standard_normal((2, 5, 11)).astype("float32")
    teacher = rng.standard_normal((2, 5, 13)).astype("float32")
    with pytest.raises(ValueError, match="teacher has vocabulary size 13.*student 11"):
        token_distillation_losses(student, teacher)


def test_shape_mismatch():
    student, teacher = _logits()
    with pytest.raises(ValueError, match="teacher_logits.shape=\\(2, 4, 11\\)"):
        token_distillation_losses(student, teacher[:, :4])


def test_bad_reduction_labels_and_weights():
    student, teacher = _logits()
    with pytest.raises(ValueError, match="reduction='mean'"):
        distillation_loss(student, teacher, reduction="mean")
    with pytest.raises(ValueError, match="`labels`.*alpha=0.5"):
        distillation_loss(student, teacher, alpha=0.5)
    with pytest.raises(ValueError, match="sample_weight.shape=\\(2, 4\\)"):
        distillation_loss(student, teacher, sample_weight=np.ones((2, 4)))
    with pytest.raises(ValueError, match="labels.shape=\\(2,\\)"):
        distillation_loss(student, teacher, labels=np.zeros(2, "int32"), alpha=0.5)
