"""`Gemma2Distiller`: train a student `Gemma2CausalLM` on a teacher's distributions."""

import math
import warnings

import keras
from keras import ops

from keras_gemma2.layers.validation import positive_number
from keras_gemma2.training.distillation_loss import distillation_loss


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Distiller(keras.Model):
    """Knowledge distillation: a student learns a frozen teacher's next-token
    distributions, as Gemma 2's 2B and 9B models were trained.

    Each training step runs the teacher (no gradients, `training=False`) and
    the student on the same tokens and minimises, per token, the divergence
    from the teacher's distribution to the student's at `temperature` (forward
    KL by default, `beta` for the generalised JSD), optionally mixed with the
    student's next-token cross-entropy by `alpha`:

    `loss = (1 - alpha) * tau^2 * D(teacher_tau || student_tau) + alpha * CE`,

    averaged over the tokens whose `sample_weight` is nonzero (padding is 0;
    with `{"prompts", "responses"}` or chat data the prompt is 0 too). See
    `keras_gemma2.training.distillation_loss`.

    Data: what `Gemma2CausalLM.fit` takes (strings, `{"prompts",
    "responses"}`, chats, or a `tf.data.Dataset` of strings or of
    `format_chat_segments` rows), preprocessed by the student's preprocessor
    (the teacher's if the student has none), and already-preprocessed `(x,
    y, sample_weight)` with `x` a dict holding `"token_ids"` and
    `"padding_mask"`, like any Keras model. Lists are preprocessed eagerly,
    once, before training.

    The teacher may be float32, bfloat16 or quantized (`quantize("int8")`):
    its logits are cast to float32 for the loss. It is frozen: its weights
    are non-trainable and never change. `save` / `keras.models.load_model`
    round-trip both models; `distiller.student` is a plain `Gemma2CausalLM`
    (generate, save, export it as usual).

    Args:
        teacher: `Gemma2CausalLM`.
        student: `Gemma2CausalLM` with the teacher's vocabulary (same size
            and, when both carry a tokenizer, the same SentencePiece model).
            A student larger than its teacher is allowed, with a warning.
        temperature: positive float `tau`. Defaults to `1.0`.
        alpha: float in `[0, 1]`, the weight of the cross-entropy on the
            labels. Defaults to `0.0` (pure distillation).
        beta: float in `[0, 1]`; `0` is forward KL(teacher || student), `1`
            reverse KL, in between the generalised JSD. Defaults to `0.0`.
        top_k: int or `None`. Distil from the teacher's `top_k` most likely
            tokens per position plus one outcome for all the others (the
            mass the teacher leaves outside its top `k`, matched by the
            student's; `topk_distillation`): what training from a teacher
            store computes, online. Forward KL only. Defaults to `None`
            (the full distribution).

        on_policy_fraction: float in `[0, 1]`, GKD's `lambda`: the share of
            batches rebuilt from the student's own continuations of their
            prompts before the step (`keras_gemma2.training.on_policy`).
            `0` is supervised distillation. Needs prompt-marked data
            (prompt/response or chat rows, or token arrays with
            response-only weights); such `fit` calls run batch by batch
            (`train_on_batch`) without callbacks. Defaults to `0.0`.
        seed: int or `None`. Seeds the on-policy draws and shuffling.

    The teacher may be `None` when the data carry its stored top-k outputs
    (`read_teacher_store`): `y = {"labels", "teacher_ids",
    "teacher_logprobs"}`, with the log-probabilities at this distiller's
    `temperature`. Such data are used whenever `y` is that dict, teacher or
    not. When `y` also holds `"teacher_temperature"` (as
    `read_teacher_store` returns it), `fit` and `evaluate` check it on the
    host and refuse a store made at another temperature; a
    `tf.data.Dataset` of stored outputs is not checked.

    Example:

    >>> import keras
    >>> from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
    >>> from keras_gemma2.training import Gemma2Distiller
    >>> teacher = Gemma2CausalLM.from_preset("gemma2_tiny_python")
    >>> student = Gemma2CausalLM(
    ...     Gemma2Backbone(vocabulary_size=4096, num_layers=2, num_query_heads=2,
    ...                    num_key_value_heads=1, hidden_dim=64,
    ...                    intermediate_dim=128, head_dim=32,
    ...                    sliding_window_size=64),
    ...     preprocessor=teacher.preprocessor)
    >>> distiller = Gemma2Distiller(teacher=teacher, student=student)
    >>> distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> history = distiller.fit(["def add(a, b):\\n    return a + b\\n"] * 2,
    ...                         batch_size=2, epochs=1, verbose=0)
    >>> sorted(history.history)
    ['loss']
    """

    def __init__(
        self,
        teacher,
        student,
        temperature=1.0,
        alpha=0.0,
        beta=0.0,
        top_k=None,
        on_policy_fraction=0.0,
        seed=None,
        **kwargs,
    ):
        from keras_gemma2.models.causal_lm import Gemma2CausalLM

        for name, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, Gemma2CausalLM) and not (
                name == "teacher" and model is None
            ):
                raise TypeError(
                    f"Received an invalid value for `{name}`, expected a "
                    f"`Gemma2CausalLM`. Received: {name}={type(model).__name__}"
                )
        temperature = _finite_positive(temperature, "temperature")
        alpha = _unit_interval(alpha, "alpha")
        beta = _unit_interval(beta, "beta")
        on_policy_fraction = _unit_interval(on_policy_fraction, "on_policy_fraction")
        vocabulary_size = student.backbone.vocabulary_size
        if top_k is not None:
            if (
                isinstance(top_k, bool)
                or not isinstance(top_k, int)
                or not (0 < top_k <= vocabulary_size)
            ):
                raise ValueError(
                    "Received an invalid value for `top_k`, expected an "
                    f"integer in [1, {vocabulary_size}] (the vocabulary size) "
                    f"or None. Received: top_k={top_k!r}"
                )
            if beta != 0.0:
                raise ValueError(
                    "`top_k` distils with forward KL only; received "
                    f"top_k={top_k} with beta={beta}."
                )
        if teacher is not None:
            _check_same_vocabulary(teacher, student)
            teacher_size = teacher.count_params()
            student_size = student.count_params()
        else:
            teacher_size = student_size = 0
        if student_size > teacher_size:
            warnings.warn(
                f"The student has more parameters ({student_size}) than the "
                f"teacher ({teacher_size}); distillation usually goes the "
                "other way.",
                stacklevel=2,
            )
        # A plain `keras.Model`, not a KerasHub `Task`: constructing a
        # subclassed `Task` resets KerasHub's `PipelineModel` bases, which
        # breaks every functional task built before it (teacher and student).
        super().__init__(**kwargs)
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.top_k = top_k
        self.on_policy_fraction = on_policy_fraction
        self.seed = seed
        if teacher is not None:
            teacher.trainable = False
        self.teacher = teacher
        self.student = student

    @property
    def preprocessor(self):
        """The student's preprocessor, else the teacher's (raw data only)."""
        if self.student.preprocessor is not None or self.teacher is None:
            return self.student.preprocessor
        return self.teacher.preprocessor

    # === Keras model ===

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compile(self, optimizer="adam", loss=None, **kwargs):
        """Like `keras.Model.compile`; the loss is the distiller's own.

        `loss` must stay `None`: the loss is set by `temperature`, `alpha`
        and `beta`. Metrics see the student's logits.
        """
        if loss is not None:
            raise ValueError(
                "`Gemma2Distiller` computes its own loss (set `temperature`, "
                "`alpha` and `beta` when constructing it). Received: "
                f"loss={loss!r}"
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        from keras_gemma2.training.topk_distillation import (
            teacher_topk,
            topk_distillation_loss,
        )

        stored = isinstance(y, dict)
        if stored:
            if sample_weight is None:
                sample_weight = y.get("sample_weight")
            missing = {"labels", "teacher_ids", "teacher_logprobs"} - set(y)
            if missing:
                raise ValueError(
                    "Stored teacher outputs must come as `y = {'labels', "
                    f"'teacher_ids', 'teacher_logprobs'}}`; missing {sorted(missing)}."
                )
            teacher_ids, teacher_logprobs, labels = (
                y["teacher_ids"],
                y["teacher_logprobs"],
                y["labels"],
            )
        else:
            if self.teacher is None:
                raise ValueError(
                    "This `Gemma2Distiller` has no teacher, so its data must "
                    "carry the teacher's stored top-k outputs "
                    "(`read_teacher_store`); received plain labels."
                )
            labels = y
            teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
        if stored or self.top_k is not None:
            if not stored:
                teacher_ids, teacher_logprobs = teacher_topk(
                    teacher_logits, self.top_k, self.temperature
                )
            loss = topk_distillation_loss(
                y_pred,
                teacher_ids,
                teacher_logprobs,
                labels=labels if self.alpha > 0 else None,
                sample_weight=sample_weight,
                temperature=self.temperature,
                alpha=self.alpha,
            )
        else:
            loss = distillation_loss(
                y_pred,
                teacher_logits,
                labels=labels if self.alpha > 0 else None,
                sample_weight=sample_weight,
                temperature=self.temperature,
                alpha=self.alpha,
                beta=self.beta,
            )
        for term in self.losses:
            loss = loss + self._aggregate_additional_loss(term)
        return loss

    # === Data: raw through the preprocessor, token ids straight in ===

    def fit(self, x=None, y=None, sample_weight=None, **kwargs):
        x, y, sample_weight = self._preprocess(x, y, sample_weight)
        if self.on_policy_fraction > 0:
            from keras_gemma2.training.on_policy import fit_on_policy

            unsupported = set(kwargs) - {"batch_size", "epochs", "shuffle", "verbose"}
            if unsupported:
                raise ValueError(
                    "On-policy `fit` takes `batch_size`, `epochs`, `shuffle` "
                    f"and `verbose` only. Received: {sorted(unsupported)}"
                )
            return fit_on_policy(
                self,
                x,
                y,
                sample_weight,
                batch_size=kwargs.get("batch_size"),
                epochs=kwargs.get("epochs", 1),
                shuffle=kwargs.get("shuffle", True),
                seed=self.seed,
                verbose=kwargs.get("verbose", "auto"),
            )
        validation_data = kwargs.get("validation_data")
        if validation_data is not None:
            validation = keras.utils.unpack_x_y_sample_weight(validation_data)
            kwargs["validation_data"] = self._preprocess(*validation)
        return super().fit(x, y, sample_weight=sample_weight, **kwargs)

    def evaluate(self, x=None, y=None, sample_weight=None, **kwargs):
        if not kwargs.get("_use_cached_eval_dataset"):
            x, y, sample_weight = self._preprocess(x, y, sample_weight)
        return super().evaluate(x, y, sample_weight=sample_weight, **kwargs)

    def _preprocess(self, x, y=None, sample_weight=None):
        """Token ids pass through; text, pairs and chats go through the
        preprocessor (eagerly, or mapped over a `tf.data.Dataset`)."""
        if isinstance(y, dict) and "teacher_temperature" in y:
            y = dict(y)
            self._check_store_temperature(y.pop("teacher_temperature"))
        if isinstance(y, dict) and sample_weight is not None:
            # Keras takes one weight per sample beside a dict `y`; per-token
            # weights of stored teacher outputs travel inside it.
            y, sample_weight = {**y, "sample_weight": sample_weight}, None
        if x is None or _is_preprocessed(x):
            return x, y, sample_weight
        preprocessor = self.preprocessor
        if preprocessor is None:
            raise ValueError(
                "`Gemma2Distiller` received raw data but neither the student "
                "nor the teacher has a preprocessor. Pass token ids "
                "(`x` a dict with 'token_ids' and 'padding_mask') or attach "
                "a `Gemma2CausalLMPreprocessor`."
            )
        import tensorflow as tf

        if isinstance(x, tf.data.Dataset):
            mapped = x.map(
                lambda *sample: preprocessor(*sample),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            return mapped.prefetch(tf.data.AUTOTUNE), None, None
        packed = preprocessor(x, y, sample_weight)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(packed)
        return keras.tree.map_structure(
            keras.ops.convert_to_numpy, (x, y, sample_weight)
        )

    def _check_store_temperature(self, stored):
        import numpy as np

        stored = np.unique(np.asarray(keras.ops.convert_to_numpy(stored)))
        if stored.size and not np.allclose(stored, self.temperature, rtol=1e-6):
            raise ValueError(
                "The stored teacher outputs are log-probabilities at "
                f"temperature {', '.join(f'{t:g}' for t in stored)}, this "
                f"`Gemma2Distiller` trains at temperature={self.temperature:g}. "
                "The mass outside the stored top k does not carry over to "
                "another temperature: write the store with "
                f"`write_teacher_store(..., temperature={self.temperature:g})` "
                "or build the distiller with the store's temperature."
            )

    # === Serialization ===

    def get_config(self):
        return {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "beta": self.beta,
            "top_k": self.top_k,
            "on_policy_fraction": self.on_policy_fraction,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("teacher", "student"):
            if isinstance(config[name], dict):
                config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)


def _finite_positive(value, name):
    value = positive_number(value, name)
    if not math.isfinite(value):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a finite "
            f"positive number. Received: {name}={value!r}"
        )
    return value


def _unit_interval(value, name):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (0.0 <= value <= 1.0)
    ):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a number in "
            f"[0, 1]. Received: {name}={value!r}"
        )
    return float(value)


def _check_same_vocabulary(teacher, student):
    """Same vocabulary size and, when both have one, the same tokenizer."""
    sizes = teacher.backbone.vocabulary_size, student.backbone.vocabulary_size
    if sizes[0] != sizes[1]:
        raise ValueError(
            "The teacher and the student must share a vocabulary. Received: "
            f"teacher vocabulary_size={sizes[0]}, student vocabulary_size="
            f"{sizes[1]}"
        )
    protos = [
        getattr(getattr(model.preprocessor, "tokenizer", None), "proto", None)
        for model in (teacher, student)
    ]
    if all(proto is not None for proto in protos) and protos[0] != protos[1]:
        raise ValueError(
            "The teacher and the student have different tokenizers (their "
            "SentencePiece models differ): the same token ids would mean "
            "different text. Give the student the teacher's preprocessor."
        )


def _is_preprocessed(x):
    """Whether `x` (or a dataset's first element) is token ids already."""
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - keras_hub installs it
        tf = None
    if tf is not None and isinstance(x, tf.data.Dataset):
        x = x.element_spec
        if isinstance(x, tuple):
            x = x[0]
    return isinstance(x, dict) and "token_ids" in x
