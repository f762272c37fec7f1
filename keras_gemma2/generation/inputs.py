"""Checks of `generate` arguments and sampler construction, before any compute."""

import sys

import keras_hub
import numpy as np
from keras import ops

from keras_gemma2.layers.validation import (
    check_token_shapes,
    check_token_values,
    host_values,
)
from keras_gemma2.models.architecture import MAX_SEQUENCE_LENGTH

SAMPLERS = {
    "greedy": lambda temperature, seed: keras_hub.samplers.GreedySampler(),
    "top_k": lambda temperature, seed: keras_hub.samplers.TopKSampler(
        k=5, seed=seed, temperature=temperature
    ),
    "top_p": lambda temperature, seed: keras_hub.samplers.TopPSampler(
        p=0.9, seed=seed, temperature=temperature
    ),
    "random": lambda temperature, seed: keras_hub.samplers.RandomSampler(
        seed=seed, temperature=temperature
    ),
}


# KerasHub samplers whose search needs more than next-token probabilities
# (beams, hidden states, a draft model): `generate` cannot run them.
UNSUPPORTED_SAMPLERS = ("beam", "contrastive", "speculative")


def make_sampler(sampler, temperature=1.0, seed=None):
    """A `keras_hub.samplers.Sampler` from a name or an instance, validated.

    Samplers that pick each token from the next-token probabilities are
    supported: KerasHub's greedy, top-k, top-p and random samplers, and any
    subclass that overrides only `get_next_token`. Samplers that override
    the whole search (`__call__`: KerasHub's `BeamSampler`,
    `ContrastiveSampler`, `SpeculativeSampler`) are refused here, at
    `compile`, rather than failing later in `generate`.

    Example:

    >>> make_sampler("greedy").__class__.__name__
    'GreedySampler'
    >>> make_sampler(keras_hub.samplers.BeamSampler(num_beams=2))
    Traceback (most recent call last):
    ...
    ValueError: Received an unsupported sampler: keras_gemma2's `generate` picks each token from the next-token probabilities (greedy, top-k, top-p, random, or a `keras_hub.samplers.Sampler` overriding only `get_next_token`), and does not implement the search of BeamSampler. Received: sampler=BeamSampler
    """  # noqa: E501
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or temperature <= 0
    ):
        raise ValueError(
            "Received an invalid value for `temperature`, expected a positive "
            f"number. Received: temperature={temperature!r}"
        )
    if isinstance(sampler, keras_hub.samplers.Sampler):
        if type(sampler).__call__ is not keras_hub.samplers.Sampler.__call__:
            _refuse_sampler(type(sampler).__name__)
        if getattr(sampler, "temperature", 1.0) <= 0:
            raise ValueError(
                "The sampler's `temperature` must be positive. Received: "
                f"temperature={sampler.temperature!r}"
            )
        return sampler
    if isinstance(sampler, str) and sampler.lower() in UNSUPPORTED_SAMPLERS:
        _refuse_sampler(repr(sampler))
    if sampler not in SAMPLERS:
        raise ValueError(
            f"Received an unknown sampler. Expected one of {sorted(SAMPLERS)} or a "
            f"keras_hub.samplers.Sampler instance. Received: sampler={sampler!r}"
        )
    return SAMPLERS[sampler](float(temperature), seed)


def _refuse_sampler(name):
    raise ValueError(
        "Received an unsupported sampler: keras_gemma2's `generate` picks each "
        "token from the next-token probabilities (greedy, top-k, top-p, random, "
        "or a `keras_hub.samplers.Sampler` overriding only `get_next_token`), "
        f"and does not implement the search of {name}. Received: sampler={name}"
    )


class DatasetBatches(list):
    """The batches of a `tf.data.Dataset` given to `generate`, each normalized."""


def normalize_generate_inputs(inputs):
    """The prompt forms KerasHub's `generate` takes, as ours handles them.

    - a `tf.data.Dataset` (of strings, or of token-id dicts) becomes a
      `DatasetBatches` list of its batches, each normalized;
    - `bytes`, numpy string arrays and TensorFlow string tensors (rank 0 or 1)
      become a `str` or a list of `str`;
    - a dict's values become numpy arrays;
    - anything else is returned as is (and checked by `check_generate_inputs`).

    Example:

    >>> import numpy as np
    >>> normalize_generate_inputs(np.array(["def f():", b"import os"], object))
    ['def f():', 'import os']
    >>> normalize_generate_inputs(np.array("x = 1"))
    'x = 1'
    """
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(inputs, tf.data.Dataset):
        batches = DatasetBatches(
            normalize_generate_inputs(batch) for batch in inputs.as_numpy_iterator()
        )
        if not batches:
            raise ValueError(
                "Received an invalid value for `inputs`, expected a dataset with "
                "at least one batch. Received: an empty tf.data.Dataset"
            )
        return batches
    if isinstance(inputs, dict):
        return {key: _host_array(value) for key, value in inputs.items()}
    if tf is not None and tf.is_tensor(inputs) and inputs.dtype == tf.string:
        inputs = inputs.numpy()
    if isinstance(inputs, bytes):
        return inputs.decode("utf-8")
    if isinstance(inputs, (np.ndarray, np.generic)) and inputs.dtype.kind in "USO":
        if inputs.ndim > 1:
            raise ValueError(
                "Received an invalid value for `inputs`, expected a string or a "
                "rank-1 array of strings. Received: an array of shape "
                f"{inputs.shape}"
            )
        if inputs.ndim == 0:
            return normalize_generate_inputs(inputs.item())
        return [normalize_generate_inputs(item) for item in inputs.tolist()]
    return inputs


def _host_array(value):
    values = host_values(value)
    return value if values is None else values


def join_batches(outputs):
    """One output from per-batch `generate` outputs, as KerasHub concatenates."""
    if isinstance(outputs[0], dict):
        return {
            key: np.concatenate([np.asarray(output[key]) for output in outputs])
            for key in outputs[0]
        }
    joined = []
    for output in outputs:
        joined.extend([output] if isinstance(output, str) else output)
    return joined


def check_generate_inputs(causal_lm, inputs, max_length):
    """Raise a `ValueError` naming the argument for inputs `generate` can't serve."""
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise ValueError(
                "Received an invalid value for `max_length`, expected an int. "
                f"Received: max_length={max_length!r}"
            )
        if not 1 < max_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(
                "Received an invalid value for `max_length`, expected 2 to "
                f"{MAX_SEQUENCE_LENGTH} (Gemma 2's context). "
                f"Received: max_length={max_length}"
            )
    if isinstance(inputs, dict):
        _check_token_dict(causal_lm, inputs)
        return
    prompts = [inputs] if isinstance(inputs, str) else inputs
    if causal_lm.preprocessor is None:
        raise ValueError(
            "Text prompts need a preprocessor; this model has none. Pass a dict "
            "of `token_ids` and `padding_mask` instead."
        )
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(
            "Received an invalid value for `inputs`, expected a string, a non-empty "
            f"list of strings, or a dict of token ids. Received: {inputs!r}"
        )
    tokenizer = causal_lm.preprocessor.tokenizer
    limit = max_length or causal_lm.preprocessor.sequence_length
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(
                f"Prompt {i} is a {type(prompt).__name__}; expected a string."
            )
        if not prompt:
            raise ValueError(
                f"Prompt {i} is empty; give the model at least one character."
            )
        count = len(ops.convert_to_numpy(tokenizer.tokenize(prompt))) + 1  # <bos>
        if count >= limit:
            raise ValueError(
                f"Prompt {i} has {count} tokens (with <bos>), which leaves no room "
                f"to generate within max_length={limit}. Pass a larger `max_length` "
                f"(up to {MAX_SEQUENCE_LENGTH}) or a shorter prompt."
            )


def _check_token_dict(causal_lm, inputs):
    missing = {"token_ids", "padding_mask"} - set(inputs)
    if missing:
        raise ValueError(
            f"The inputs dict lacks {sorted(missing)}; expected keys "
            "'token_ids' and 'padding_mask'."
        )
    token_ids = np.asarray(ops.convert_to_numpy(inputs["token_ids"]))
    padding_mask = np.asarray(ops.convert_to_numpy(inputs["padding_mask"]))
    check_token_shapes(token_ids, padding_mask)
    check_token_values(token_ids, causal_lm.backbone.vocabulary_size)
    lengths = padding_mask.astype(bool).sum(axis=1)
    if (lengths == 0).any():
        raise ValueError(
            f"Row {int(np.argmin(lengths))} of `padding_mask` is empty; every prompt "
            "needs at least one token (usually <bos>)."
        )
    if (lengths >= token_ids.shape[1]).any():
        raise ValueError(
            f"Row {int(np.argmax(lengths))} fills all {token_ids.shape[1]} positions; "
            "pad `token_ids` to leave room for the completion."
        )
    if token_ids.shape[1] > MAX_SEQUENCE_LENGTH:
        raise ValueError(
            f"`token_ids` has {token_ids.shape[1]} positions, more than the "
            f"{MAX_SEQUENCE_LENGTH}-token context."
        )


def data_parallel_rows(inputs):
    """Pad `generate` inputs to a multiple of the active data-parallel axis.

    Under a `keras.distribution` whose batch axis has `d > 1` devices,
    KerasHub's `generate` splits the prompts over that axis, which JAX
    refuses unless `d` divides their number (one prompt on a `(2, 4)` mesh
    fails). The last prompt (a string, or a row of a token-id dict) is
    repeated up to the next multiple of `d`; generation is row-independent,
    so the extra rows change nothing and are dropped afterwards.

    Returns:
        `(inputs, rows)`: the padded inputs and the number of rows to keep,
        or the inputs unchanged and `None` when nothing was padded.
    """
    import keras

    distribution = keras.distribution.distribution()
    if distribution is None:
        return inputs, None
    mesh = distribution.device_mesh
    names = list(mesh.axis_names)
    if distribution.batch_dim_name not in names:
        return inputs, None
    parts = mesh.shape[names.index(distribution.batch_dim_name)]
    if isinstance(inputs, dict):
        rows = int(np.shape(inputs["token_ids"])[0])
        extra = -rows % parts
        if not extra:
            return inputs, None
        padded = {
            key: np.concatenate(
                [np.asarray(value)] + [np.asarray(value)[-1:]] * extra, axis=0
            )
            for key, value in inputs.items()
        }
        return padded, rows
    prompts = [inputs] if isinstance(inputs, str) else list(inputs)
    extra = -len(prompts) % parts
    if not extra:
        return inputs, None
    return prompts + [prompts[-1]] * extra, len(prompts)


def keep_rows(outputs, rows, scalar):
    """Undo `data_parallel_rows`: the first `rows` outputs (one string if `scalar`)."""
    if rows is None:
        return outputs
    if isinstance(outputs, dict):
        return {key: value[:rows] for key, value in outputs.items()}
    return outputs[0] if scalar else list(outputs[:rows])
