"""On-policy distillation (GKD): some batches are the student's own continuations.

Agarwal et al. 2024, "On-Policy Distillation of Language Models" (TRL's
`GKDTrainer`): a student trained only on fixed responses never sees its own
mistakes; scoring the student's own samples with the teacher fixes that.
With `Gemma2Distiller(on_policy_fraction=lam)`, each batch is, with
probability `lam`, rebuilt as: its prompts, then a continuation the student
generates with our `generate` (its compiled sampler, up to the batch's
length, stopping at `<eos>` / `<end_of_turn>`); the loss then weighs exactly
the generated tokens, and the teacher scores them in the usual step.
`lam = 0` is plain supervised distillation.
"""

import keras
import numpy as np

from keras_gemma2.layers.validation import positive_int


def on_policy_batch(student, x, y, sample_weight, stop_token_ids):
    """A batch's prompts completed by `student`; `(x, y, sample_weight)` numpy.

    A row's prompt is everything before its first nonzero `sample_weight`
    (the response-only weights of prompt/response and chat data); a row
    without one is left as it is, with its zero weights. The new weights are
    1 exactly on the generated tokens, the stop token included.

    Args:
        student: `Gemma2CausalLM`.
        x: dict of `"token_ids"` and `"padding_mask"`, numpy `[B, T]`.
        y: next-token labels `[B, T]`.
        sample_weight: `[B, T]`.
        stop_token_ids: tuple of ints or `None`.
    """
    token_ids = np.asarray(x["token_ids"])
    weights = np.asarray(sample_weight, "float32")
    # The whole sequence, T + 1 tokens: labels are the inputs shifted by one.
    sequence = np.concatenate([token_ids, np.asarray(y)[:, -1:]], axis=1)
    has_response = (weights > 0).any(axis=1)
    prompt_lengths = np.where(has_response, (weights > 0).argmax(axis=1) + 1, 0)
    positions = np.arange(sequence.shape[1])
    prompt_mask = positions[None, :] < prompt_lengths[:, None]
    rows = np.flatnonzero(has_response)
    if rows.size == 0:
        return x, y, sample_weight
    inputs = {
        "token_ids": np.where(prompt_mask, sequence, 0)[rows].astype("int32"),
        "padding_mask": prompt_mask[rows],
    }
    outputs = student.make_generate_function()(inputs, stop_token_ids=stop_token_ids)
    generated = keras.ops.convert_to_numpy(outputs["token_ids"])
    kept = keras.ops.convert_to_numpy(outputs["padding_mask"]).astype(bool)
    new_sequence = sequence.copy()
    new_sequence[rows] = np.where(kept, generated, 0)
    real = np.asarray(x["padding_mask"]).astype(bool)
    real = np.concatenate([real, real[:, -1:]], axis=1)
    real[rows] = kept
    new_weights = weights.copy()
    new_weights[rows] = (kept & ~prompt_mask[rows])[:, 1:].astype("float32")
    new_x = {
        "token_ids": new_sequence[:, :-1].astype(token_ids.dtype),
        "padding_mask": real[:, :-1],
    }
    return new_x, new_sequence[:, 1:], new_weights


def fit_on_policy(
    distiller, x, y, sample_weight, batch_size, epochs, shuffle, seed, verbose
):
    """`Gemma2Distiller.fit` with `on_policy_fraction > 0`: one
    `train_on_batch` per batch, on-policy ones rebuilt first.

    Returns a `keras.callbacks.History` whose `history` holds the mean
    `"loss"` per epoch and the number of `"on_policy_batches"`.
    """
    batch_size = positive_int(batch_size or 32, "batch_size")
    epochs = positive_int(epochs, "epochs")
    if isinstance(y, dict) or not isinstance(x, dict):
        raise ValueError(
            "On-policy distillation needs text rows or `(x, y, sample_weight)` "
            "arrays of token ids (prompts marked by zero weights), not a "
            "dataset or stored teacher outputs."
        )
    if sample_weight is None:
        raise ValueError(
            "On-policy distillation needs `sample_weight` marking the "
            "responses (the preprocessor of prompt/response or chat rows "
            "writes it) to know where each prompt ends."
        )
    student = distiller.student
    stop_token_ids = None
    if student.preprocessor is not None:
        stop_token_ids = student._stop_token_ids("auto")
    rng = np.random.default_rng(seed)
    rows = len(np.asarray(y))
    history = keras.callbacks.History()
    history.history = {"loss": [], "on_policy_batches": []}
    for epoch in range(epochs):
        order = rng.permutation(rows) if shuffle else np.arange(rows)
        steps = -(-rows // batch_size)
        progress = keras.utils.Progbar(
            steps, verbose=1 if verbose == "auto" else verbose
        )
        losses, on_policy = [], 0
        for step in range(steps):
            index = order[step * batch_size : (step + 1) * batch_size]
            batch = (
                {name: np.asarray(value)[index] for name, value in x.items()},
                np.asarray(y)[index],
                np.asarray(sample_weight)[index],
            )
            if rng.random() < distiller.on_policy_fraction:
                batch = on_policy_batch(student, *batch, stop_token_ids)
                on_policy += 1
            logs = distiller.train_on_batch(*batch, return_dict=True)
            losses.append(float(logs["loss"]))
            if verbose:
                progress.update(step + 1, [("loss", losses[-1])])
        history.history["loss"].append(float(np.mean(losses)))
        history.history["on_policy_batches"].append(on_policy)
        if verbose:
            print(f"Epoch {epoch + 1}/{epochs}: {on_policy} of {steps} on-policy")
    return history
