"""`distill`: teacher preset + student (preset or config) + rows -> a student preset."""

import json
import os

import keras

from keras_gemma2.checkpoints.atomic import atomic_directory, atomic_write_json
from keras_gemma2.layers.validation import positive_int, positive_number
from keras_gemma2.training.distiller import Gemma2Distiller
from keras_gemma2.training.finetune import free_output, shuffled_batches, text_model
from keras_gemma2.training.response_loss import preprocess_rows, weighted_cross_entropy

DISTILL_FILE = "distill.json"


def distill(
    teacher,
    student,
    rows,
    output,
    *,
    eval_rows=None,
    top_k=None,
    temperature=1.0,
    alpha=0.0,
    epochs=1,
    batch_size=4,
    learning_rate=1e-3,
    sequence_length=None,
    seed=0,
    overwrite=False,
    verbose="auto",
):
    """Distil a teacher preset into a student on text rows; write the student.

    The path `keras-gemma2 distill` runs:

    1. load the teacher with `Gemma2CausalLM.from_preset`; build the student
       from a preset, or from a backbone config (a dict or a JSON file of
       `Gemma2Backbone` arguments; `vocabulary_size` defaults to the
       teacher's), randomly initialised with `seed`. The student reads text
       with the teacher's preprocessor;
    2. pack `rows` (prompt/response pairs or chats, e.g. from
       `read_sft_jsonl`) with `preprocess_rows`: the loss counts response
       tokens only;
    3. train a `Gemma2Distiller` (forward KL at `temperature`, or over the
       teacher's `top_k` tokens, mixed with cross-entropy by `alpha`) with
       Adam for `epochs` passes in shuffled full batches;
    4. write `output` atomically: the student as a preset that
       `Gemma2CausalLM.from_preset(output)` and `keras-gemma2 run output`
       load, plus `distill.json` (settings, and the student's response
       cross-entropy before and after on `eval_rows`, or on `rows`).

    Args:
        teacher: string. Preset name, directory or handle of the teacher.
        student: string (a preset), dict (backbone config) or path of a
            `.json` backbone config.
        rows: list of row dicts of one kind.
        output: string. Directory to write (must not exist unless
            `overwrite`).
        eval_rows: list of row dicts or `None` (the training rows).
        top_k: int or `None`. Distil from the teacher's `top_k` most likely
            tokens only (see `Gemma2Distiller`). Defaults to `None` (all).
        temperature, alpha: see `Gemma2Distiller`.
        epochs, batch_size, learning_rate, sequence_length, seed, overwrite,
            verbose: as in `finetune`; `verbose=1` shows a progress bar
            with the loss.

    Returns:
        The report dict written to `distill.json`, plus `"output"`.

    Example:

    ```python
    from keras_gemma2.training import bundled_dataset_path, distill, read_sft_jsonl

    rows = read_sft_jsonl(bundled_dataset_path("python_instructions"))
    student = {"num_layers": 2, "num_query_heads": 2, "num_key_value_heads": 1,
               "hidden_dim": 96, "intermediate_dim": 256, "head_dim": 48,
               "sliding_window_size": 64}
    report = distill("gemma2_tiny_python", student, rows, "./student", epochs=3)
    print(report["loss_before"], report["loss_after"])
    ```
    """

    positive_int(epochs, "epochs")
    positive_int(batch_size, "batch_size")
    positive_number(learning_rate, "learning_rate")
    if not rows:
        raise ValueError("Received no `rows`, expected at least one training row.")
    output = free_output(output, overwrite)
    teacher_model = text_model(teacher, "teacher")
    keras.utils.set_random_seed(seed)
    student_model, student_source = _student(student, teacher_model)
    distiller = Gemma2Distiller(
        teacher_model,
        student_model,
        temperature=temperature,
        alpha=alpha,
        top_k=top_k,
    )
    train = preprocess_rows(teacher_model.preprocessor, rows, sequence_length)
    held_out = (
        train
        if eval_rows is None
        else preprocess_rows(teacher_model.preprocessor, eval_rows, sequence_length)
    )
    loss_before = weighted_cross_entropy(student_model, *held_out, batch_size)
    distiller.compile(optimizer=keras.optimizers.Adam(learning_rate))
    history = distiller.fit(
        shuffled_batches(train, batch_size, seed), epochs=epochs, verbose=verbose
    )
    loss_after = weighted_cross_entropy(student_model, *held_out, batch_size)
    report = {
        "teacher": teacher,
        "student": student_source,
        "rows": len(rows),
        "evaluated_on": "rows" if eval_rows is None else "eval_rows",
        "loss_before": loss_before,
        "loss_after": loss_after,
        "history": [float(loss) for loss in history.history["loss"]],
        "teacher_parameters": int(teacher_model.count_params()),
        "student_parameters": int(student_model.count_params()),
        "top_k": top_k,
        "temperature": float(temperature),
        "alpha": float(alpha),
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": float(learning_rate),
        "sequence_length": int(train[1].shape[1]),
        "seed": seed,
        "backend": keras.config.backend(),
    }
    with atomic_directory(output, overwrite=overwrite) as staging:
        student_model.save_to_preset(staging)
        atomic_write_json(os.path.join(staging, DISTILL_FILE), report)
    report["output"] = output
    return report


def _student(student, teacher):
    """The student model (with the teacher's preprocessor) and its source."""
    from keras_gemma2.models.backbone import Gemma2Backbone
    from keras_gemma2.models.causal_lm import Gemma2CausalLM

    if isinstance(student, str) and student.endswith(".json"):
        if not os.path.isfile(student):
            raise FileNotFoundError(f"The student config {student} does not exist.")
        with open(student, encoding="utf-8") as file:
            config = json.load(file)
        if not isinstance(config, dict):
            raise ValueError(
                f"The student config {student} must hold a JSON object of "
                f"`Gemma2Backbone` arguments. Received: {type(config).__name__}"
            )
        source = student
    elif isinstance(student, dict):
        config, source = dict(student), "config"
    elif isinstance(student, str):
        model = Gemma2CausalLM.from_preset(student)
        model.preprocessor = model.preprocessor or teacher.preprocessor
        return model, student
    else:
        raise TypeError(
            "Received an invalid value for `student`, expected a preset "
            "string, a backbone config dict or a .json config path. "
            f"Received: student={type(student).__name__}"
        )
    config.setdefault("vocabulary_size", teacher.backbone.vocabulary_size)
    try:
        backbone = Gemma2Backbone(**config)
    except TypeError as error:
        raise ValueError(f"Invalid student backbone config {config}: {error}") from None
    return Gemma2CausalLM(
        backbone, teacher.preprocessor
    ), config if source == "config" else source
