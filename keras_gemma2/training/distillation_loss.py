"""Distillation losses on full next-token distributions: KL, generalised JSD, mixing.

Gemma 2's small models were trained to match a larger teacher's whole
next-token distribution (forward KL), not one-hot labels. This module holds
the loss only: per-token divergences, their masked reduction mixed with
next-token cross-entropy, and `LogitsKLDistillation`, a drop-in for
`keras.distillation.LogitsDistillation` that computes the KL divergence
between the two softmax distributions (Keras' default
`LogitsDistillation(loss="kl_divergence")` resolves the string to a plain
function, misses its softmax branch and feeds raw logits to
`kl_divergence`, which clips them into [1e-7, 1]: a large wrong number).
"""

import math

import keras
from keras import ops

REDUCTIONS = ("mean_with_sample_weight", "sum_over_batch_size", "sum")


def _check_temperature(temperature):
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(
            "Received an invalid value for `temperature`, expected a positive "
            f"finite number. Received: temperature={temperature!r}"
        )
    return float(temperature)


def _check_unit_interval(value, name):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= 1
    ):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a number in "
            f"[0, 1]. Received: {name}={value!r}"
        )
    return float(value)


def _check_same_shape(student_logits, teacher_logits):
    student_shape = tuple(student_logits.shape)
    teacher_shape = tuple(teacher_logits.shape)
    if len(student_shape) != len(teacher_shape) or len(student_shape) < 1:
        raise ValueError(
            "Expected `student_logits` and `teacher_logits` of the same shape "
            "`[..., vocabulary_size]`. Received: "
            f"student_logits.shape={student_shape}, "
            f"teacher_logits.shape={teacher_shape}"
        )
    student_vocabulary, teacher_vocabulary = student_shape[-1], teacher_shape[-1]
    if (
        student_vocabulary is not None
        and teacher_vocabulary is not None
        and student_vocabulary != teacher_vocabulary
    ):
        raise ValueError(
            "The teacher and the student must share one vocabulary: the "
            f"teacher has vocabulary size {teacher_vocabulary} (last axis of "
            f"`teacher_logits`) but the student {student_vocabulary}. "
            f"Received: student_logits.shape={student_shape}, "
            f"teacher_logits.shape={teacher_shape}"
        )
    for student_size, teacher_size in zip(student_shape, teacher_shape, strict=True):
        if (
            student_size is not None
            and teacher_size is not None
            and student_size != teacher_size
        ):
            raise ValueError(
                "Expected `student_logits` and `teacher_logits` of the same "
                "shape. Received: "
                f"student_logits.shape={student_shape}, "
                f"teacher_logits.shape={teacher_shape}"
            )


def _log_softmax(logits):
    """Log-probabilities over the last axis: `[..., V]` -> `[..., V]`."""
    return logits - ops.logsumexp(logits, axis=-1, keepdims=True)


def _kl(log_p, log_q):
    """KL(p || q) summed over the last axis, with 0 * log 0 = 0: `[..., V]` -> `[...]`.

    Entries where p is 0 contribute exactly 0, even when log p or log q is
    -inf (masked vocabulary entries), instead of NaN.
    """
    p = ops.exp(log_p)
    has_mass = p > 0
    safe_difference = ops.where(has_mass, log_p - log_q, ops.zeros_like(log_p))
    terms = ops.where(has_mass, p * safe_difference, ops.zeros_like(log_p))
    return ops.sum(terms, axis=-1)


def token_distillation_losses(
    student_logits, teacher_logits, temperature=1.0, beta=0.0
):
    """Per-token divergence between the teacher's and the student's distributions.

    Both distributions are `softmax(logits / temperature)` over the last
    axis, computed in float32 with log-softmax (logits minus their
    logsumexp) whatever the input dtype (e.g. bfloat16). The divergence is
    multiplied by `temperature**2`, which keeps the gradient's scale
    independent of the temperature (Hinton et al., 2015, "Distilling the
    knowledge in a neural network").

    `beta` picks the divergence, following the convention of TRL's
    `GKDTrainer` (Agarwal et al., 2024, "On-policy distillation of language
    models: learning from self-generated mistakes"):

    - `beta=0`: forward KL(teacher || student) =
      `sum(p_t * (log p_t - log p_s))`, what Gemma 2 was trained with.
    - `beta=1`: reverse KL(student || teacher).
    - `0 < beta < 1`: the generalised Jensen-Shannon divergence
      `beta * KL(teacher || M) + (1 - beta) * KL(student || M)` with the
      mixture `M = beta * p_t + (1 - beta) * p_s` (its log computed with a
      logsumexp, so no log 0). This formula tends to 0, not to either KL,
      as `beta` tends to 0 or 1 (M tends to the other distribution), which
      is why the endpoints are defined as the two KL divergences instead.

    Vocabulary entries where a distribution is exactly 0 (logits of
    `-inf`, or a large negative mask such as `-1e9`) contribute 0
    (`0 * log 0 = 0`), not NaN.

    Args:
        student_logits: tensor `[..., vocabulary_size]`, usually
            `[batch, sequence_length, vocabulary_size]`.
        teacher_logits: tensor of the same shape as `student_logits`.
        temperature: float > 0. Softmax temperature. Defaults to `1.0`.
        beta: float in [0, 1]. Interpolates forward KL (0), generalised
            JSD and reverse KL (1). Defaults to `0.0`.

    Returns:
        float32 tensor `student_logits.shape[:-1]`, e.g. `[batch,
        sequence_length]`: the divergence of each token, unweighted.

    Example:

    >>> import numpy as np
    >>> teacher = np.log(np.array([[[0.5, 0.5]]], "float32"))
    >>> student = np.log(np.array([[[0.25, 0.75]]], "float32"))
    >>> losses = token_distillation_losses(student, teacher)
    >>> tuple(losses.shape)
    (1, 1)
    >>> round(float(keras.ops.convert_to_numpy(losses)[0, 0]), 4)  # ln(4/3) / 2
    0.1438
    """
    temperature = _check_temperature(temperature)
    beta = _check_unit_interval(beta, "beta")
    student_logits = ops.convert_to_tensor(student_logits)
    teacher_logits = ops.convert_to_tensor(teacher_logits)
    _check_same_shape(student_logits, teacher_logits)
    student_log_probs = _log_softmax(ops.cast(student_logits, "float32") / temperature)
    teacher_log_probs = _log_softmax(ops.cast(teacher_logits, "float32") / temperature)
    if beta == 0:
        divergence = _kl(teacher_log_probs, student_log_probs)
    elif beta == 1:
        divergence = _kl(student_log_probs, teacher_log_probs)
    else:
        mixture_log_probs = ops.logsumexp(
            ops.stack(
                [
                    teacher_log_probs + math.log(beta),
                    student_log_probs + math.log(1 - beta),
                ]
            ),
            axis=0,
        )
        divergence = beta * _kl(teacher_log_probs, mixture_log_probs) + (
            1 - beta
        ) * _kl(student_log_probs, mixture_log_probs)
    return divergence * (temperature**2)


def _token_cross_entropy(student_logits, labels):
    """Cross-entropy of the labels under the student: `[..., V]`, `[...]` -> `[...]`."""
    logits = ops.cast(student_logits, "float32")
    labels = ops.expand_dims(ops.cast(labels, "int32"), axis=-1)
    label_logits = ops.squeeze(ops.take_along_axis(logits, labels, axis=-1), axis=-1)
    return ops.logsumexp(logits, axis=-1) - label_logits


def distillation_loss(
    student_logits,
    teacher_logits,
    labels=None,
    sample_weight=None,
    temperature=1.0,
    alpha=0.0,
    beta=0.0,
    reduction="mean_with_sample_weight",
):
    """Masked distillation loss, optionally mixed with next-token cross-entropy.

    Per token, the loss is `(1 - alpha) * divergence + alpha *
    cross_entropy`, where `divergence` is `token_distillation_losses(
    student_logits, teacher_logits, temperature, beta)` (forward KL by
    default, scaled by `temperature**2`) and `cross_entropy` is the
    student's next-token cross-entropy on `labels` at temperature 1. The
    per-token losses are then weighted by `sample_weight` (0 on padding and,
    for response-only training, on prompt tokens) and reduced.

    Args:
        student_logits: tensor `[batch, sequence_length, vocabulary_size]`.
        teacher_logits: tensor of the same shape.
        labels: int tensor `[batch, sequence_length]` of next-token ids, or
            `None`. Required when `alpha > 0`. Defaults to `None`.
        sample_weight: float tensor `[batch, sequence_length]`, or `None`
            for all ones. Defaults to `None`.
        temperature: float > 0. Softmax temperature of the divergence.
            Defaults to `1.0`.
        alpha: float in [0, 1]. Weight of the cross-entropy. Defaults to
            `0.0` (pure distillation).
        beta: float in [0, 1]. See `token_distillation_losses`. Defaults
            to `0.0` (forward KL).
        reduction: `"mean_with_sample_weight"` (`sum(w * loss) / sum(w)`:
            every real token counts once whatever the padding; 0 when all
            weights are 0), `"sum_over_batch_size"` (`sum(w * loss) /
            (batch * sequence_length)`, Keras' default for losses) or
            `"sum"`. Defaults to `"mean_with_sample_weight"`.

    Returns:
        A float32 scalar tensor.

    Example:

    >>> import numpy as np
    >>> teacher = np.log(np.array([[[0.5, 0.5], [0.9, 0.1]]], "float32"))
    >>> student = np.log(np.array([[[0.25, 0.75], [0.1, 0.9]]], "float32"))
    >>> weights = np.array([[1.0, 0.0]], "float32")  # second token is padding
    >>> loss = distillation_loss(student, teacher, sample_weight=weights)
    >>> round(float(keras.ops.convert_to_numpy(loss)), 4)
    0.1438
    >>> labels = np.array([[1, 0]])
    >>> loss = distillation_loss(
    ...     student, teacher, labels, weights, alpha=0.5
    ... )  # (0.1438 + ln(4/3)) / 2
    >>> round(float(keras.ops.convert_to_numpy(loss)), 4)
    0.2158
    """
    losses = token_distillation_losses(
        student_logits, teacher_logits, temperature=temperature, beta=beta
    )
    return mix_and_reduce(
        losses, student_logits, labels, sample_weight, alpha, reduction
    )


def mix_and_reduce(
    losses,
    student_logits,
    labels=None,
    sample_weight=None,
    alpha=0.0,
    reduction="mean_with_sample_weight",
):
    """`(1 - alpha) * losses + alpha * cross_entropy`, weighted and reduced.

    The tail shared by `distillation_loss` and
    `topk_distillation.topk_distillation_loss`: `losses` are per-token
    divergences `[batch, T]`; the arguments are theirs.
    """
    alpha = _check_unit_interval(alpha, "alpha")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"Received an invalid value for `reduction`, expected one of "
            f"{REDUCTIONS}. Received: reduction={reduction!r}"
        )
    if alpha > 0 and labels is None:
        raise ValueError(
            "`labels` are required when `alpha > 0` (the cross-entropy "
            f"weight). Received: labels=None, alpha={alpha!r}"
        )
    token_shape = tuple(losses.shape)
    if labels is not None:
        labels = ops.convert_to_tensor(labels)
        _check_token_shape(labels, token_shape, "labels")
    if alpha > 0:
        cross_entropy = _token_cross_entropy(student_logits, labels)
        losses = (1 - alpha) * losses + alpha * cross_entropy
    if sample_weight is None:
        weights = ops.ones_like(losses)
    else:
        weights = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
        _check_token_shape(weights, token_shape, "sample_weight")
    total = ops.sum(weights * losses)
    if reduction == "sum":
        return total
    if reduction == "sum_over_batch_size":
        return total / ops.cast(ops.size(losses), "float32")
    return ops.divide_no_nan(total, ops.sum(weights))


def _check_token_shape(tensor, token_shape, name):
    shape = tuple(tensor.shape)
    compatible = len(shape) == len(token_shape) and all(
        a is None or b is None or a == b
        for a, b in zip(shape, token_shape, strict=True)
    )
    if not compatible:
        raise ValueError(
            f"Received an invalid shape for `{name}`, expected the logits' "
            f"shape without the vocabulary axis, {token_shape}. "
            f"Received: {name}.shape={shape}"
        )


@keras.saving.register_keras_serializable(package="keras_gemma2")
class LogitsKLDistillation(keras.distillation.LogitsDistillation):
    """`keras.distillation.LogitsDistillation` that computes the softmax KL divergence.

    Use it wherever `keras.distillation.LogitsDistillation()` would go, for
    instance in `keras.distillation.Distiller(distillation_losses=...)`. It
    returns the mean over tokens of the tempered forward KL(teacher ||
    student) between `softmax(logits / temperature)` distributions, scaled
    by `temperature**2` (or, with `beta > 0`, the generalised JSD or the
    reverse KL of `token_distillation_losses`). Keras' default
    `LogitsDistillation(loss="kl_divergence")` does not: the string becomes
    the plain `kl_divergence` function, the softmax is skipped and the raw
    logits are clipped into [1e-7, 1] as if they were probabilities.

    `keras.distillation.Distiller` calls `compute_loss(teacher_outputs,
    student_outputs)` without the batch's `sample_weight` (its own
    `compute_loss` receives and ignores it), so under `Distiller` every
    position counts, padding included. For padded or response-only data,
    use `distillation_loss` with `sample_weight`, or `Gemma2Distiller`.

    Args:
        temperature: float > 0. Softmax temperature. Defaults to `3.0`, as
            `LogitsDistillation`.
        beta: float in [0, 1]. 0 is forward KL, 1 reverse KL, in between
            the generalised JSD (see `token_distillation_losses`). Defaults
            to `0.0`.

    Example:

    >>> import numpy as np
    >>> teacher = np.log(np.array([[[0.5, 0.5]]], "float32"))
    >>> student = np.log(np.array([[[0.25, 0.75]]], "float32"))
    >>> loss = LogitsKLDistillation(temperature=1.0)
    >>> round(float(keras.ops.convert_to_numpy(loss.compute_loss(teacher, student))), 4)
    0.1438

    ```python
    distiller = keras.distillation.Distiller(
        teacher=teacher_model,
        student=student_model,
        distillation_losses=LogitsKLDistillation(temperature=2.0),
        student_loss_weight=0.0,
    )
    ```
    """

    def __init__(self, temperature=3.0, beta=0.0):
        temperature = _check_temperature(temperature)
        self.beta = _check_unit_interval(beta, "beta")
        super().__init__(temperature=temperature, loss="kl_divergence")

    def compute_loss(
        self, teacher_outputs, student_outputs, sample_weight=None, **kwargs
    ):
        """Mean divergence over positions, summed over a multi-output model's outputs.

        Args:
            teacher_outputs: teacher logits `[..., vocabulary_size]`, or a
                structure of them.
            student_outputs: student logits, the same structure and shapes.
            sample_weight: optional float tensor of the logits' shape
                without the vocabulary axis (single output only); then the
                loss is `sum(w * loss) / sum(w)`. `Distiller` never passes
                it.
            **kwargs: ignored.

        Returns:
            A float32 scalar tensor.
        """
        teacher_flat = keras.tree.flatten(teacher_outputs)
        student_flat = keras.tree.flatten(student_outputs)
        if sample_weight is not None and len(teacher_flat) != 1:
            raise ValueError(
                "`sample_weight` is supported for single-output models only. "
                f"Received {len(teacher_flat)} outputs."
            )
        losses = [
            distillation_loss(
                student,
                teacher,
                sample_weight=sample_weight,
                temperature=self.temperature,
                beta=self.beta,
            )
            for teacher, student in zip(teacher_flat, student_flat, strict=True)
        ]
        return losses[0] if len(losses) == 1 else ops.sum(ops.stack(losses))

    def get_config(self):
        return {"temperature": self.temperature, "beta": self.beta}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
