"""Fine-tuning that survives being killed: step checkpoints and an exact resume."""

import base64
import hashlib
import json
import math
import os
import re
import shutil
import warnings
import zipfile

import keras
import numpy as np

from keras_gemma2.checkpoints.atomic import atomic_directory, atomic_write_json
from keras_gemma2.layers.validation import positive_int

CHECKPOINT_FORMAT = "keras_gemma2.resumable_fit/1"
_STATE_FILE = "state.json"
_VARIABLES_FILE = "variables.npz"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
# Staging and retired directories of `atomic_directory` and of our own
# deletions: whatever a killed process leaves of a checkpoint write.
_LEFTOVER_NAME = re.compile(r"^\.step-\d{8}\.(partial|old|deleting)-")
# Arguments that fix the order of the batches: a checkpoint only resumes a
# call that agrees on all of them (`epochs` may grow).
_RUN_KEYS = ("batch_size", "seed", "shuffle", "num_rows", "data_sha256")


def fit_resumable(
    causal_lm,
    data,
    directory,
    epochs,
    batch_size,
    seed=0,
    shuffle=True,
    every_n_steps=100,
    keep=2,
    callbacks=None,
    verbose="auto",
):
    """Fit with step checkpoints; a killed run restarted by the same call resumes.

    The batches of epoch `e` are the rows in the order of
    `numpy.random.default_rng([seed, e]).permutation(num_rows)` (or in order
    with `shuffle=False`), `batch_size` at a time, the last one possibly
    smaller. Every `every_n_steps` optimizer steps, and after the last one, a
    checkpoint `directory/step-NNNNNNNN/` is written atomically (built in a
    hidden sibling, then renamed): the model's weights with the optimizer
    state (moments, iteration counter), the states of the model's random
    seed generators (dropout) and, on torch, of its global generator, the
    position (epoch, batch) and the SHA-256 of each file. The newest `keep`
    checkpoints are kept.

    A call whose `directory` holds checkpoints loads the newest valid one and
    trains from the next batch: the rows of the current epoch before it are
    skipped, nothing is repeated. A checkpoint whose files are missing,
    truncated or altered (checksum), and staging directories a killed write
    left behind, are never loaded: a warning names them, the leftovers are
    removed, and the newest valid checkpoint before them is used. With the
    same model construction, compile arguments and data, a run killed at any
    point and restarted ends with the weights of an uninterrupted run; on CPU
    they are bitwise equal.

    Data go through `causal_lm.preprocessor` unless `data` is a tuple
    `(x, y)` or `(x, y, sample_weight)` of preprocessed arrays, which go
    straight to `keras.Model.fit`. Each epoch (or its remainder) is one `fit`
    call with `epochs=1`.

    Args:
        causal_lm: compiled Keras model, e.g. a `Gemma2CausalLM` (LoRA
            enabled or not). Build it the same way (seeds, `enable_lora`,
            `compile`) on every restart.
        data: rows for the preprocessor (a list or array of strings, or a
            dict of equal-length arrays such as `{"prompts": [...],
            "responses": [...]}`), or a tuple `(x, y)` / `(x, y,
            sample_weight)` of preprocessed numpy arrays (`x` may be a dict).
        directory: path of the checkpoint directory, created if missing.
        epochs: int. Passes over the data, counting those a checkpoint
            already holds.
        batch_size: int. Rows per optimizer step.
        seed: int. Seeds the order of each epoch's rows. Defaults to `0`.
        shuffle: bool. Shuffle the rows each epoch. Defaults to `True`.
        every_n_steps: int. Optimizer steps between checkpoints.
            Defaults to `100`.
        keep: int. Checkpoints kept; more than one leaves a fallback should
            the newest be damaged. Defaults to `2`.
        callbacks: list of `keras.callbacks.Callback` or `None`. Passed to
            each `fit` call. Defaults to `None`.
        verbose: `"auto"`, 0, 1 or 2. Passed to `fit`. Defaults to `"auto"`.

    Returns:
        Dict: `"resumed_from_step"` (steps the loaded checkpoint held, 0 for
        a fresh start), `"steps"` (optimizer steps done in all, this call
        included), `"steps_per_epoch"` and `"checkpoint"` (path of the last
        checkpoint).

    Example:

    >>> import keras, numpy as np, os, tempfile
    >>> from keras_gemma2.training import fit_resumable
    >>> def make_model():
    ...     keras.utils.set_random_seed(1)
    ...     model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    ...     model.compile(optimizer="adam", loss="mse")
    ...     return model
    >>> x = np.arange(30, dtype="float32").reshape(10, 3) / 30
    >>> y = x.sum(axis=1, keepdims=True)
    >>> directory = tempfile.mkdtemp()
    >>> run = fit_resumable(
    ...     make_model(), (x, y), directory, epochs=2, batch_size=4,
    ...     every_n_steps=2, verbose=0,
    ... )
    >>> run["steps"], run["steps_per_epoch"], os.path.basename(run["checkpoint"])
    (6, 3, 'step-00000006')
    >>> # The same call again finds the finished run and trains no further.
    >>> fit_resumable(
    ...     make_model(), (x, y), directory, epochs=2, batch_size=4,
    ...     every_n_steps=2, verbose=0,
    ... )["resumed_from_step"]
    6
    """
    positive_int(epochs, "epochs")
    positive_int(batch_size, "batch_size")
    positive_int(every_n_steps, "every_n_steps")
    positive_int(keep, "keep")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(
            "Received an invalid value for `seed`, expected a non-negative "
            f"integer. Received: seed={seed!r}"
        )
    if getattr(causal_lm, "optimizer", None) is None:
        raise ValueError(
            "Received an uncompiled `causal_lm`, expected a model on which "
            "`compile()` has been called. Received: "
            f"causal_lm={type(causal_lm).__name__}"
        )
    preprocessed = isinstance(data, tuple)
    if preprocessed and len(data) not in (2, 3):
        raise ValueError(
            "Received an invalid value for `data`, expected rows, or a tuple "
            "`(x, y)` or `(x, y, sample_weight)` of preprocessed arrays. "
            f"Received: a tuple of {len(data)} elements."
        )
    leaves, rebuild = _flatten(data)
    num_rows = _num_rows(leaves)
    run = {
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": bool(shuffle),
        "num_rows": num_rows,
        "data_sha256": _fingerprint(leaves),
    }
    steps_per_epoch = math.ceil(num_rows / batch_size)
    total_steps = epochs * steps_per_epoch
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)

    # Preprocessed rows go through `keras.Model.fit`, which skips the
    # preprocessing KerasHub's `fit` adds (setting the preprocessor aside
    # instead fails on torch after `quantize`, which locks the attributes).
    fit = keras.Model.fit if preprocessed else type(causal_lm).fit
    state, path = _restore_newest(causal_lm, directory, run)
    step = state["step"] if state else 0
    checkpoint = _CheckpointEverySteps(
        directory,
        run,
        steps_per_epoch,
        every_n_steps,
        keep,
        step,
        _decode_torch_states(state, path),
    )
    checkpoint.set_model(causal_lm)
    for epoch in range(step // steps_per_epoch, epochs):
        skip = step - epoch * steps_per_epoch
        order = _epoch_order(seed, epoch, num_rows, shuffle)[skip * batch_size :]
        x, y, sample_weight = _unpack(rebuild([leaf[order] for leaf in leaves]))
        checkpoint.start_fit(step)
        fit(
            causal_lm,
            x,
            y,
            sample_weight=sample_weight,
            batch_size=batch_size,
            epochs=1,
            shuffle=False,
            callbacks=list(callbacks or []) + [checkpoint],
            verbose=verbose,
        )
        step = checkpoint.step
        if getattr(causal_lm, "stop_training", False):
            break
    complete = step >= total_steps
    if state is None or (state["step"], state["complete"]) != (step, complete):
        path = checkpoint.save(complete=complete)
    return {
        "resumed_from_step": state["step"] if state else 0,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "checkpoint": path,
    }


def latest_checkpoint(directory):
    """Return `(path, state)` of the newest valid checkpoint, or `(None, None)`.

    Warns about each newer checkpoint that is damaged (missing or altered
    files) and about staging directories a killed write left behind; they are
    never returned.

    Args:
        directory: path of a `fit_resumable` checkpoint directory.

    Returns:
        Tuple: the checkpoint's path and its state dict (`"step"`, `"epoch"`,
        `"batch"`, `"complete"` and the run's arguments), or `(None, None)`
        when `directory` holds no valid checkpoint.

    Example:

    >>> import tempfile
    >>> from keras_gemma2.training import latest_checkpoint
    >>> latest_checkpoint(tempfile.mkdtemp())
    (None, None)
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            "Received an invalid value for `directory`, expected an existing "
            f"directory. Received: directory={directory!r}"
        )
    leftovers = sorted(n for n in os.listdir(directory) if _LEFTOVER_NAME.match(n))
    if leftovers:
        warnings.warn(
            f"Ignoring {len(leftovers)} unfinished checkpoint write(s) in "
            f"{directory} (a run was killed while saving): {leftovers}",
            stacklevel=2,
        )
    for step, name in reversed(_checkpoints(directory)):
        path = os.path.join(directory, name)
        state, problem = _read_state(path, step)
        if problem is None:
            return path, state
        warnings.warn(
            f"Ignoring the damaged checkpoint {path}: {problem}", stacklevel=2
        )
    return None, None


class _CheckpointEverySteps(keras.callbacks.Callback):
    """Counts optimizer steps; writes a checkpoint every `every_n_steps`."""

    def __init__(
        self, directory, run, steps_per_epoch, every_n_steps, keep, step, torch_state
    ):
        super().__init__()
        self.directory = directory
        self.run = run
        self.steps_per_epoch = steps_per_epoch
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.step = step
        self.saved_step = step
        self.fit_start = step
        self.torch_state = torch_state

    def start_fit(self, step):
        self.fit_start = step

    def on_train_batch_begin(self, batch, logs=None):
        # Torch: each batch takes the global generator where the previous one
        # left it. Draws in between (each `fit`'s data loader seeds itself
        # from it) are undone, so a run resumed mid-epoch sees the same
        # stream as an uninterrupted one.
        if self.torch_state is not None:
            _set_torch_generators(self.torch_state)

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last batch of this `fit` done (steps_per_execution
        # may run several between callbacks).
        self.step = self.fit_start + batch + 1
        self.torch_state = _get_torch_generators()
        if self.step // self.every_n_steps > self.saved_step // self.every_n_steps:
            self.save(complete=False)

    def save(self, complete):
        """Write `directory/step-NNNNNNNN` atomically; prune old ones."""
        model = self.model  # on jax, this syncs the variables out of `fit`
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        path = os.path.join(self.directory, f"step-{self.step:08d}")
        with atomic_directory(path, overwrite=True) as staging:
            variables = _training_variables(model)
            _save_variables(os.path.join(staging, _VARIABLES_FILE), variables)
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": self.step,
                "epoch": epoch,
                "batch": batch,
                "complete": complete,
                "backend": keras.backend.backend(),
                **self.run,
                "variables": [
                    {"path": v.path, "shape": list(v.shape), "dtype": v.dtype}
                    for v in variables
                ],
                "torch_random_states": _encode_torch_states(self.torch_state),
                "files": {_VARIABLES_FILE: _file_digest(staging, _VARIABLES_FILE)},
            }
            atomic_write_json(os.path.join(staging, _STATE_FILE), state)
        self.saved_step = self.step
        _prune(self.directory, self.step, self.keep)
        return path


def _restore_newest(model, directory, run):
    """Load the newest valid checkpoint into `model`: its state and path."""
    path, state = latest_checkpoint(directory)
    for name in os.listdir(directory):
        if _LEFTOVER_NAME.match(name):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    if state is None:
        return None, None
    for key in _RUN_KEYS:
        if state.get(key) != run[key]:
            raise ValueError(
                f"The checkpoint {path} belongs to another run: it was written "
                f"with {key}={state.get(key)!r}, this call has {key}={run[key]!r}. "
                "Pass the same data and arguments to resume it, or another "
                "`directory` to start afresh."
            )
    if not model.built:
        raise ValueError(
            f"Cannot resume from {path} into an unbuilt model: build "
            f"`causal_lm` ({type(model).__name__}) before calling fit_resumable."
        )
    if not model.optimizer.built:
        # The optimizer's moments and counter must exist to be loaded.
        model.optimizer.build(model.trainable_variables)
    _load_variables(
        os.path.join(path, _VARIABLES_FILE), _training_variables(model), state, path
    )
    return state, path


def _training_variables(model):
    """Every variable a step changes or reads: model (seed states included), optimizer.

    Not `save_weights`: it stores a LoRA layer's adapters merged into its
    kernel and loads them back as zeros, which restarts LoRA from scratch.
    """
    return list(model.variables) + list(model.optimizer.variables)


def _save_variables(path, variables):
    """Write each variable's bytes as they are (bfloat16, int4...), one at a time.

    An `.npz` (a zip of `.npy` files) built entry by entry: no second copy
    of the whole model in host memory.
    """
    with zipfile.ZipFile(path, "w") as archive:
        for index, variable in enumerate(variables):
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value))
            with archive.open(f"{index}.npy", "w", force_zip64=True) as file:
                np.lib.format.write_array(file, value.reshape(-1).view(np.uint8))


def _load_variables(path, variables, state, checkpoint):
    """Assign the saved bytes to `variables`, after checking shapes and dtypes."""
    saved = [(entry["shape"], entry["dtype"]) for entry in state["variables"]]
    present = [(list(v.shape), v.dtype) for v in variables]
    if saved != present:
        differences = [
            f"#{index} {state['variables'][index]['path']}: saved {was}, model {now}"
            for index, (was, now) in enumerate(zip(saved, present, strict=False))
            if was != now
        ]
        raise ValueError(
            f"The checkpoint {checkpoint} holds {len(saved)} variables, the "
            f"model and its optimizer {len(present)}; they differ at "
            f"{differences[:3] or 'the end'}. Build and compile the model as "
            "the run that wrote it did (same LoRA rank and targets)."
        )
    with np.load(path) as arrays:
        for index, variable in enumerate(variables):
            value = arrays[str(index)].view(_numpy_dtype(variable.dtype))
            variable.assign(value.reshape(variable.shape))


def _numpy_dtype(name):
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16, int4, float8: numpy knows them via ml_dtypes
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def _get_torch_generators():
    """Torch's global generator states `{"cpu": [t], "cuda": [t, ...]}`; off torch None.

    Unseeded dropout on torch draws from them, not from a `SeedGenerator`.
    """
    if keras.backend.backend() != "torch":
        return None
    import torch

    states = {"cpu": [torch.get_rng_state()]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_torch_generators(states):
    import torch

    torch.set_rng_state(states["cpu"][0])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _encode_torch_states(states):
    if states is None:
        return None
    return {
        device: [base64.b64encode(bytes(t.numpy())).decode() for t in tensors]
        for device, tensors in states.items()
    }


def _decode_torch_states(state, path):
    """The checkpoint's torch generator states, or `None` (fresh run, other backend)."""
    if state is None or keras.backend.backend() != "torch":
        return None
    if state["torch_random_states"] is None:
        warnings.warn(
            f"The checkpoint {path} was written on the {state['backend']} backend "
            "and holds no torch random state: dropout masks from here on differ "
            "from those of an uninterrupted torch run.",
            stacklevel=3,
        )
        return None
    import torch

    def tensor(text):
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    return {
        device: [tensor(text) for text in texts]
        for device, texts in state["torch_random_states"].items()
    }


def _checkpoints(directory):
    """`[(step, name)]` of the `step-NNNNNNNN` directories, oldest first."""
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            found.append((int(match.group(1)), name))
    return sorted(found)


def _read_state(path, step):
    """`(state, None)` for a complete checkpoint, else `(None, problem)`."""
    try:
        with open(os.path.join(path, _STATE_FILE), encoding="utf-8") as file:
            state = json.load(file)
    except FileNotFoundError:
        return None, f"no {_STATE_FILE}"
    except (OSError, ValueError) as error:
        return None, f"unreadable {_STATE_FILE} ({error})"
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return None, f"{_STATE_FILE} is not a {CHECKPOINT_FORMAT} state"
    if state.get("step") != step:
        return None, f"{_STATE_FILE} says step {state.get('step')!r}"
    for name, expected in state.get("files", {}).items():
        if not os.path.isfile(os.path.join(path, name)):
            return None, f"{name} is missing"
        if _file_digest(path, name) != expected:
            return None, f"{name} does not match its recorded size and SHA-256"
    if _VARIABLES_FILE not in state.get("files", {}):
        return None, f"{_STATE_FILE} lists no {_VARIABLES_FILE}"
    return state, None


def _file_digest(directory, name):
    path = os.path.join(directory, name)
    with open(path, "rb") as file:
        sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    return {"bytes": os.path.getsize(path), "sha256": sha256}


def _prune(directory, step, keep):
    """Drop checkpoints past `step` (an abandoned timeline) and all but `keep`."""
    names = [name for found, name in _checkpoints(directory) if found > step]
    names += [name for found, name in _checkpoints(directory) if found <= step][:-keep]
    for name in names:
        # Rename first: a deletion cut short leaves a leftover, not a
        # checkpoint with missing files.
        retired = os.path.join(directory, f".{name}.deleting-{os.getpid()}")
        os.replace(os.path.join(directory, name), retired)
        shutil.rmtree(retired, ignore_errors=True)


def _epoch_order(seed, epoch, num_rows, shuffle):
    """Row indices `[num_rows]` of epoch `epoch`, from `(seed, epoch)` alone."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def _flatten(data):
    """Leaves of `data` as numpy arrays of rows, and a function rebuilding it."""
    if isinstance(data, (str, bytes)):
        raise TypeError(
            "Received an invalid value for `data`, expected a list of rows, "
            f"not one string. Received: data={data[:40]!r}"
        )
    leaves = []

    def template_of(nest):
        if nest is None:
            return None
        if isinstance(nest, dict):
            return {key: template_of(value) for key, value in nest.items()}
        leaves.append(_rows_array(nest))
        return len(leaves) - 1

    if isinstance(data, tuple):
        template = tuple(template_of(part) for part in data)
    else:
        template = template_of(data)

    def rebuild(new_leaves, nest=template):
        if nest is None:
            return None
        if isinstance(nest, tuple):
            return tuple(rebuild(new_leaves, part) for part in nest)
        if isinstance(nest, dict):
            return {key: rebuild(new_leaves, part) for key, part in nest.items()}
        leaf = new_leaves[nest]
        # Text rows go on as Python lists, the form preprocessors are given.
        return leaf.tolist() if leaf.dtype == object else leaf

    return leaves, rebuild


def _rows_array(rows):
    """`rows` as an array indexable by row; text and ragged rows as objects."""
    if not isinstance(rows, (list, tuple, np.ndarray)):
        rows = keras.ops.convert_to_numpy(rows)  # a backend tensor
    try:
        regular = np.asarray(rows)
        if regular.dtype.kind not in "OUS":
            return regular
    except ValueError:  # ragged rows
        pass
    array = np.empty(len(rows), dtype=object)
    for index, row in enumerate(rows):
        array[index] = row
    return array


def _unpack(nest):
    if isinstance(nest, tuple):
        return (nest + (None,))[:3]
    return nest, None, None


def _num_rows(leaves):
    lengths = {len(leaf) if leaf.ndim else 0 for leaf in leaves}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            "Received an invalid value for `data`, expected arrays with the "
            "same positive number of rows. Received row counts: "
            f"{sorted(len(leaf) if leaf.ndim else 0 for leaf in leaves)}"
        )
    return lengths.pop()


def _fingerprint(leaves):
    """SHA-256 over the data: a checkpoint resumes only the data it saw."""
    sha256 = hashlib.sha256()
    for leaf in leaves:
        sha256.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        if leaf.dtype == object:
            sha256.update(json.dumps(leaf.tolist(), default=str).encode())
        else:
            sha256.update(np.ascontiguousarray(leaf).tobytes())
    return sha256.hexdigest()
