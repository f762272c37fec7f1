"""Distillation from a teacher's top-k next-token distribution (a stored teacher).

A teacher's full distribution over a 256k vocabulary is too large to store
per token; its `k` most likely tokens with their log-probabilities are not
(`teacher_topk`). Training on them needs a rule for the probability mass
outside the `k` stored ids. The rule here: the `k` ids plus one outcome
"any other token" form a distribution of `k + 1` outcomes on each side. The
teacher's last outcome holds `1 - sum(p_topk)`, exact because the stored
log-probabilities are those of the full softmax; the student's holds what
its own full softmax puts outside the same `k` ids. The loss is the forward
KL between these two (`topk_token_distillation_losses`), so the student is
pulled to leave outside the top `k` exactly the mass the teacher leaves
there, without being told how to spread it. It is a lower bound of the
full forward KL, and equals it when `k` is the vocabulary size.

An earlier rule renormalised both sides over the `k` ids and left the
student's mass outside them unconstrained. On `examples/distill_tiny.py`
(`gemma2_tiny_python` teacher, half-size student, 300 steps, held-out
perplexity) a student trained from a stored top-32 that way reached 453;
with the rest outcome, 63.1 (50.1 from a top-128); online over the full
distribution, 44.1; from scratch, 73.1.
"""

import math

from keras import ops

from keras_gemma2.training.distillation_loss import (
    _check_temperature,
    _log_softmax,
    mix_and_reduce,
)

_LOG_HALF = -math.log(2.0)
# Below float32's normal range is avoided; any mass under this is treated as
# this much (the log of 0 would make the loss and its gradient infinite).
_TINY = 1e-30
# A teacher rest mass below this is float32 rounding of `1 - sum(p)` (a sum
# of probabilities near 1 is only known to a few 2**-24), not information;
# it counts as 0. Leaving it in moved the k = vocabulary loss off the full KL
# by up to 3e-5 (random logits, V=30).
_REST_FLOOR = 2.0**-20


def _check_k(k, vocabulary_size):
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= vocabulary_size:
        raise ValueError(
            "Received an invalid value for `k`, expected a positive integer "
            f"no larger than the vocabulary size {vocabulary_size}. "
            f"Received: k={k!r}"
        )
    return k


def teacher_topk(teacher_logits, k, temperature=1.0):
    """The teacher's `k` most likely next tokens and their log-probabilities.

    The log-probabilities are those of the FULL softmax at `temperature`
    (`log_softmax(logits / temperature)` over the whole vocabulary in
    float32, then the `k` largest), so they sum to at most 1 in
    probability: what the top `k` leave out is `1 - sum(exp(logprobs))`.
    Along the last axis the entries are sorted from the most likely token
    down, so the first `j < k` columns are the top `j`. The ids do not
    depend on the temperature; the log-probabilities do, and the part
    outside the top `k` cannot be recomputed at another temperature from
    them, so they are taken at the temperature of the loss.

    Args:
        teacher_logits: tensor `[batch, sequence_length, vocabulary_size]`
            (any leading shape), any float dtype.
        k: int in `[1, vocabulary_size]`. Tokens kept per position.
        temperature: float > 0. Defaults to `1.0`.

    Returns:
        Tuple `(ids, logprobs)`: int32 tensor `[..., k]` of token ids and
        float32 tensor `[..., k]` of their log-probabilities.

    Example:

    >>> import numpy as np
    >>> logits = np.log(np.array([[[0.1, 0.6, 0.3]]], "float32"))
    >>> ids, logprobs = teacher_topk(logits, k=2)
    >>> ops.convert_to_numpy(ids).tolist()
    [[[1, 2]]]
    >>> [round(float(p), 4) for p in np.exp(ops.convert_to_numpy(logprobs))[0, 0]]
    [0.6, 0.3]
    """
    teacher_logits = ops.convert_to_tensor(teacher_logits)
    if len(teacher_logits.shape) < 1 or teacher_logits.shape[-1] is None:
        raise ValueError(
            "Expected `teacher_logits` of shape `[..., vocabulary_size]` with "
            "a known vocabulary size. Received: "
            f"teacher_logits.shape={tuple(teacher_logits.shape)}"
        )
    _check_k(k, teacher_logits.shape[-1])
    temperature = _check_temperature(temperature)
    log_probs = _log_softmax(ops.cast(teacher_logits, "float32") / temperature)
    logprobs, ids = ops.top_k(log_probs, k, sorted=True)
    return ops.cast(ids, "int32"), logprobs


def _check_topk_shapes(student_logits, teacher_ids, teacher_logprobs):
    student_shape = tuple(student_logits.shape)
    ids_shape = tuple(teacher_ids.shape)
    logprobs_shape = tuple(teacher_logprobs.shape)
    compatible = (
        ids_shape == logprobs_shape
        and len(ids_shape) == len(student_shape) >= 1
        and all(
            a is None or b is None or a == b
            for a, b in zip(ids_shape[:-1], student_shape[:-1], strict=True)
        )
    )
    if not compatible:
        raise ValueError(
            "Expected `teacher_ids` and `teacher_logprobs` of one shape "
            "`[..., k]` whose leading axes are those of `student_logits` "
            "`[..., vocabulary_size]`. Received: "
            f"student_logits.shape={student_shape}, "
            f"teacher_ids.shape={ids_shape}, "
            f"teacher_logprobs.shape={logprobs_shape}"
        )
    k, vocabulary_size = ids_shape[-1], student_shape[-1]
    if None not in (k, vocabulary_size):
        _check_k(k, vocabulary_size)


def _log_rest(log_kept):
    """`log(1 - sum(exp(log_kept)))` over the last axis, `[..., k]` -> `[...]`.

    Computed as `log1mexp(logsumexp(log_kept))` (`log(-expm1(a))` near 0,
    `log1p(-exp(a))` below log 1/2), each branch fed only inputs where it
    is finite so that neither the value nor the gradient turns NaN. A rest
    of 0 (or a rounded sum of 1 or more) gives `log(1e-30)`.
    """
    total = ops.logsumexp(log_kept, axis=-1)
    near_one = ops.log(-ops.expm1(ops.clip(total, _LOG_HALF, -_TINY)))
    below_half = ops.log1p(-ops.exp(ops.minimum(total, _LOG_HALF)))
    return ops.where(total > _LOG_HALF, near_one, below_half)


def topk_token_distillation_losses(
    student_logits, teacher_ids, teacher_logprobs, temperature=1.0
):
    """Per-token forward KL from a teacher's top k (plus the rest) to the student.

    Both distributions are taken over `k + 1` outcomes: the `k` ids of
    `teacher_ids` and "any other token". The teacher's are
    `p_i = exp(teacher_logprobs_i)` and `p_rest = 1 - sum(p_i)`; the
    student's are its full softmax at temperature `tau`,
    `q = softmax(student_logits / tau)`, at the same ids, and
    `q_rest = 1 - sum(q_i)`. The loss is
    `tau**2 * (sum_i p_i log(p_i / q_i) + p_rest log(p_rest / q_rest))`.

    So the student is pushed to give each of the teacher's top `k` its
    probability and to leave outside them the total mass the teacher leaves
    there; how it spreads that mass is not constrained. This is at most the
    full forward KL of `token_distillation_losses` (grouping outcomes never
    increases a KL), and with `k = vocabulary_size` equal to it.

    `teacher_logprobs` must be the teacher's log-probabilities at the SAME
    temperature `tau` (`teacher_topk(teacher_logits, k, temperature=tau)`):
    `p_rest` comes from them, and the mass outside the top `k` at one
    temperature is not known from the log-probabilities at another. A
    `p_rest` below `2**-20` is float32 rounding of `1 - sum(p_i)` and counts
    as 0 (the rest term is then left out; the kept terms still push the
    student's other tokens down).

    All the math is in float32 with log-softmax (logits minus their
    logsumexp), whatever the input dtypes; `log(1 - x)` is computed from
    `expm1`/`log1p` so a rest mass near 0 keeps its precision.

    Args:
        student_logits: tensor `[batch, sequence_length, vocabulary_size]`.
        teacher_ids: int tensor `[batch, sequence_length, k]`, ids in
            `[0, vocabulary_size)` (from `teacher_topk`), distinct per
            position.
        teacher_logprobs: float tensor `[batch, sequence_length, k]`, the
            teacher's log-probabilities of `teacher_ids` at `temperature`.
        temperature: float > 0. Softmax temperature `tau`. Defaults to
            `1.0`.

    Returns:
        float32 tensor `[batch, sequence_length]`: the divergence of each
        token, unweighted.

    Example:

    >>> import numpy as np
    >>> teacher = np.log(np.array([[[0.5, 0.3, 0.2]]], "float32"))
    >>> student = np.log(np.array([[[0.2, 0.6, 0.2]]], "float32"))
    >>> ids, logprobs = teacher_topk(teacher, k=1)  # token 0, the rest 0.5
    >>> losses = topk_token_distillation_losses(student, ids, logprobs)
    >>> # teacher (0.5, rest 0.5) against student (0.2, rest 0.8)
    >>> expected = 0.5 * np.log(0.5 / 0.2) + 0.5 * np.log(0.5 / 0.8)
    >>> bool(np.isclose(ops.convert_to_numpy(losses)[0, 0], expected))
    True
    """
    student_logits = ops.convert_to_tensor(student_logits)
    teacher_ids = ops.convert_to_tensor(teacher_ids)
    teacher_logprobs = ops.convert_to_tensor(teacher_logprobs)
    _check_topk_shapes(student_logits, teacher_ids, teacher_logprobs)
    temperature = _check_temperature(temperature)
    # log q at the k ids: gathered logits minus one logsumexp over V, without
    # materialising a second [..., V] log-softmax tensor.
    scaled = ops.cast(student_logits, "float32") / temperature
    log_q = ops.take_along_axis(
        scaled, ops.cast(teacher_ids, "int32"), axis=-1
    ) - ops.logsumexp(scaled, axis=-1, keepdims=True)  # [..., k]
    log_p = ops.cast(teacher_logprobs, "float32")
    kept = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
    log_p_rest, log_q_rest = _log_rest(log_p), _log_rest(log_q)
    p_rest = ops.exp(log_p_rest)
    rest = ops.where(
        p_rest > _REST_FLOOR,
        p_rest * (log_p_rest - log_q_rest),
        ops.zeros_like(p_rest),
    )
    return temperature**2 * (kept + rest)


def topk_distillation_loss(
    student_logits,
    teacher_ids,
    teacher_logprobs,
    labels=None,
    sample_weight=None,
    temperature=1.0,
    alpha=0.0,
):
    """Masked top-k distillation loss, optionally mixed with cross-entropy.

    Per token, `(1 - alpha) * topk_token_distillation_losses(...) + alpha *
    cross_entropy`, the cross-entropy being the student's next-token
    cross-entropy on `labels` over the whole vocabulary at temperature 1;
    then `sum(sample_weight * loss) / sum(sample_weight)` (0 when every
    weight is 0), as `distillation_loss` with its default reduction.

    Args:
        student_logits: tensor `[batch, sequence_length, vocabulary_size]`.
        teacher_ids: int tensor `[batch, sequence_length, k]`.
        teacher_logprobs: float tensor `[batch, sequence_length, k]`, at
            `temperature` (see `topk_token_distillation_losses`).
        labels: int tensor `[batch, sequence_length]` of next-token ids, or
            `None`. Required when `alpha > 0`. Defaults to `None`.
        sample_weight: float tensor `[batch, sequence_length]`, or `None`
            for all ones. Defaults to `None`.
        temperature: float > 0. Softmax temperature of the divergence.
            Defaults to `1.0`.
        alpha: float in [0, 1]. Weight of the cross-entropy. Defaults to
            `0.0` (pure distillation).

    Returns:
        A float32 scalar tensor.

    Example:

    >>> import numpy as np
    >>> teacher = np.log(np.array([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]], "float32"))
    >>> student = np.log(np.array([[[0.2, 0.6, 0.2], [0.3, 0.3, 0.4]]], "float32"))
    >>> ids, logprobs = teacher_topk(teacher, k=2)
    >>> weights = np.array([[1.0, 0.0]], "float32")  # second token is padding
    >>> loss = topk_distillation_loss(student, ids, logprobs, sample_weight=weights)
    >>> expected = (0.5 * np.log(0.5 / 0.2) + 0.3 * np.log(0.3 / 0.6)
    ...             + 0.2 * np.log(0.2 / 0.2))
    >>> bool(np.isclose(ops.convert_to_numpy(loss), expected))
    True
    """
    losses = topk_token_distillation_losses(
        student_logits, teacher_ids, teacher_logprobs, temperature=temperature
    )
    return mix_and_reduce(losses, student_logits, labels, sample_weight, alpha)
