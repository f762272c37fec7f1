"""Distillation from a teacher's top-k next-token distribution (a stored teacher).

A teacher's full distribution over a 256k vocabulary is too large to store
per token; its `k` most likely tokens with their log-probabilities are not
(`teacher_topk`). Training on them needs a rule for the probability mass
outside the `k` stored ids. The rule here: both distributions are
restricted to the teacher's `k` ids and renormalised there, so the mass
outside is dropped on both sides (`topk_token_distillation_losses`). With
`k` equal to the vocabulary size nothing is dropped and the loss is exactly
the forward KL of `token_distillation_losses`.
"""

from keras import ops

from keras_gemma2.training.distillation_loss import (
    _log_softmax,
    mix_and_reduce,
    token_distillation_losses,
)


def _check_k(k, vocabulary_size):
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= vocabulary_size:
        raise ValueError(
            "Received an invalid value for `k`, expected a positive integer "
            f"no larger than the vocabulary size {vocabulary_size}. "
            f"Received: k={k!r}"
        )
    return k


def teacher_topk(teacher_logits, k):
    """The teacher's `k` most likely next tokens and their log-probabilities.

    The log-probabilities are those of the FULL softmax at temperature 1
    (`log_softmax` over the whole vocabulary in float32, then the `k`
    largest), so they sum to at most 1 in probability: what the top `k`
    leave out is `1 - sum(exp(logprobs))`. Along the last axis the entries
    are sorted from the most likely token down, so the first `j < k`
    columns are the top `j`.

    Args:
        teacher_logits: tensor `[batch, sequence_length, vocabulary_size]`
            (any leading shape), any float dtype.
        k: int in `[1, vocabulary_size]`. Tokens kept per position.

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
    log_probs = _log_softmax(ops.cast(teacher_logits, "float32"))
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


def topk_token_distillation_losses(
    student_logits, teacher_ids, teacher_logprobs, temperature=1.0
):
    """Per-token forward KL from a teacher's stored top-k to the student.

    Treatment of the mass outside the top `k`: it is dropped on both sides.
    The teacher's distribution is its `k` log-probabilities renormalised at
    temperature `tau` (`softmax(teacher_logprobs / tau)` over the `k`
    ids); the student's is its logits at the SAME `k` ids renormalised the
    same way (`softmax(gather(student_logits, teacher_ids) / tau)`). The
    loss is `tau**2 * KL(teacher_k || student_k)`. The student is thus not
    pushed towards or away from tokens outside the teacher's top `k`; with
    `k = vocabulary_size` nothing is dropped and the result equals
    `token_distillation_losses(student_logits, teacher_logits,
    temperature)` (since `log_softmax(logits) / tau` and `logits / tau`
    differ by a constant per position, the renormalised softmaxes agree).

    All the math is in float32 with log-softmax (logits minus their
    logsumexp), whatever the input dtypes.

    Args:
        student_logits: tensor `[batch, sequence_length, vocabulary_size]`.
        teacher_ids: int tensor `[batch, sequence_length, k]`, ids in
            `[0, vocabulary_size)` (from `teacher_topk`).
        teacher_logprobs: float tensor `[batch, sequence_length, k]`, the
            teacher's log-probabilities of `teacher_ids`.
        temperature: float > 0. Softmax temperature `tau`. Defaults to
            `1.0`.

    Returns:
        float32 tensor `[batch, sequence_length]`: the divergence of each
        token, unweighted.

    Example:

    >>> import numpy as np
    >>> teacher = np.log(np.array([[[0.5, 0.3, 0.2]]], "float32"))
    >>> student = np.log(np.array([[[0.2, 0.6, 0.2]]], "float32"))
    >>> ids, logprobs = teacher_topk(teacher, k=2)  # tokens 0 and 1
    >>> losses = topk_token_distillation_losses(student, ids, logprobs)
    >>> # teacher (5/8, 3/8) against student (1/4, 3/4) on tokens 0 and 1
    >>> expected = 5 / 8 * np.log(5 / 2) + 3 / 8 * np.log(1 / 2)
    >>> bool(np.isclose(ops.convert_to_numpy(losses)[0, 0], expected))
    True
    """
    student_logits = ops.convert_to_tensor(student_logits)
    teacher_ids = ops.convert_to_tensor(teacher_ids)
    teacher_logprobs = ops.convert_to_tensor(teacher_logprobs)
    _check_topk_shapes(student_logits, teacher_ids, teacher_logprobs)
    student_topk_logits = ops.take_along_axis(
        ops.cast(student_logits, "float32"),
        ops.cast(teacher_ids, "int32"),
        axis=-1,
    )  # [..., k]
    # Over the k ids, the renormalised tempered KL is the full-vocabulary
    # divergence of `token_distillation_losses` with k "logits" per side.
    return token_distillation_losses(
        student_topk_logits,
        ops.cast(teacher_logprobs, "float32"),
        temperature=temperature,
    )


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
        teacher_logprobs: float tensor `[batch, sequence_length, k]`.
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
    >>> ids, logprobs = teacher_topk(teacher, k=3)
    >>> weights = np.array([[1.0, 0.0]], "float32")  # second token is padding
    >>> loss = topk_distillation_loss(student, ids, logprobs, sample_weight=weights)
    >>> expected = 0.5 * np.log(0.5 / 0.2) + 0.3 * np.log(0.3 / 0.6)
    >>> bool(np.isclose(ops.convert_to_numpy(loss), expected))
    True
    """
    losses = topk_token_distillation_losses(
        student_logits, teacher_ids, teacher_logprobs, temperature=temperature
    )
    return mix_and_reduce(losses, student_logits, labels, sample_weight, alpha)
