"""A teacher's top-k next-token distributions on disk: written once, read per epoch.

`write_teacher_store` runs the teacher once over preprocessed token ids and
writes, per position, its `k` most likely tokens and their log-probabilities
(`teacher_topk`) to shards `shard-00000.npz`, `shard-00001.npz`... with the
inputs, labels and weights beside them, plus a manifest `store.json`.
`read_teacher_store` checks everything and returns `(x, y, sample_weight)`
for training on `topk_distillation_loss` without running the teacher.

Layout of a store directory:

- `shard-NNNNN.npz`: uncompressed npz (a zip of `.npy` files, fixed
  timestamps, so equal contents give equal bytes) of `rows_per_shard` rows
  (the last shard may hold fewer): `token_ids` int32 `[rows, T]`,
  `padding_mask` bool `[rows, T]`, `labels` int32 `[rows, T]`,
  `sample_weight` float32 `[rows, T]`, `teacher_ids` int32 `[rows, T, k]`,
  `teacher_logprobs` float32 `[rows, T, k]`, at the store's temperature
  (the top-k loss needs the mass outside the top k at the temperature it
  trains with, which the log-probabilities at another temperature do not
  give). The log-probabilities are kept in float32: float16 rounds them by
  up to 2**-11 relative, which moved batch-mean losses by up to 3e-5
  (random logits, V=800, k=8..128, tau=1 and 2), so the loss from the
  store would no longer equal the loss from the live teacher to 1e-5.
- `store.json`: format, `k`, `vocabulary_size`, `sequence_length`,
  `num_rows`, `rows_per_shard`, `batch_size`, `temperature` (absent in
  stores written before it was recorded: those are at 1), the teacher's
  identity (`teacher_fingerprint`), the SHA-256 of the input arrays, the SHA-256 of
  the teacher's SentencePiece model when it has one, each finished shard's
  byte size and SHA-256, and `"complete"`.
"""

import hashlib
import json
import math
import os
import re
import warnings
import zipfile

import keras
import numpy as np

from keras_gemma2.checkpoints.atomic import atomic_write_json
from keras_gemma2.layers.validation import positive_int
from keras_gemma2.training.distillation_loss import _check_temperature
from keras_gemma2.training.resumable_fit import _file_digest, _numpy_dtype
from keras_gemma2.training.topk_distillation import _check_k, teacher_topk

STORE_FORMAT = "keras_gemma2.teacher_store/1"
_MANIFEST = "store.json"
_SHARD_NAME = re.compile(r"^shard-\d{5}\.npz$")
# Temporary files of an interrupted shard or manifest write.
_LEFTOVER_NAME = re.compile(r"^\.(shard-\d{5}\.npz|store\.json)\.partial")
# What must agree for a rerun to resume a store instead of mixing two.
_RUN_KEYS = (
    "k",
    "vocabulary_size",
    "sequence_length",
    "num_rows",
    "rows_per_shard",
    "batch_size",
    "temperature",
    "teacher_fingerprint",
    "data_sha256",
)
_INPUT_DTYPES = {
    "token_ids": "int32",
    "padding_mask": "bool",
    "labels": "int32",
    "sample_weight": "float32",
}
# A fixed zip timestamp: shards with equal arrays are equal byte for byte.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def teacher_fingerprint(teacher):
    """SHA-256 identifying what maps token ids to the teacher's logits.

    Hashes the network's config as sorted JSON (the backbone's for a model
    with a `backbone`, such as `Gemma2CausalLM`; without `name` and
    `trainable`, which do not change the logits) and then every weight
    array in `teacher.weights` order: its dtype, its shape and its bytes
    (bfloat16 and quantized int8 weights as they are stored). The
    preprocessor does not enter: a store holds token ids, not text. Two
    teachers built alike with equal weights share a fingerprint on every
    backend; changing any weight changes it. (A model whose config nests
    its layers' names, such as a `keras.Sequential`, changes fingerprint
    with those names.)

    Args:
        teacher: `keras.Model`, e.g. a `Gemma2CausalLM`.

    Returns:
        The hex SHA-256 digest (64 characters).

    Example:

    >>> import keras
    >>> from keras_gemma2 import Gemma2Backbone
    >>> def build():
    ...     keras.utils.set_random_seed(0)
    ...     return Gemma2Backbone(
    ...         vocabulary_size=16, num_layers=1, num_query_heads=1,
    ...         num_key_value_heads=1, hidden_dim=8, intermediate_dim=8,
    ...         head_dim=8, sliding_window_size=4)
    >>> first, second = build(), build()  # named apart, equal weights
    >>> teacher_fingerprint(first) == teacher_fingerprint(second)
    True
    >>> embeddings = second.token_embedding.embeddings
    >>> _ = embeddings.assign(embeddings * 2)
    >>> teacher_fingerprint(first) == teacher_fingerprint(second)
    False
    """
    network = getattr(teacher, "backbone", None) or teacher
    config = {
        key: value
        for key, value in network.get_config().items()
        if key not in ("name", "trainable")
    }
    sha256 = hashlib.sha256()
    sha256.update(json.dumps(config, sort_keys=True, default=str).encode())
    for weight in teacher.weights:
        value = keras.ops.convert_to_numpy(weight.value)
        dtype = _numpy_dtype(weight.dtype)
        value = np.ascontiguousarray(value.astype(dtype, copy=False))
        sha256.update(f"|{weight.dtype}{value.shape}|".encode())
        sha256.update(value.tobytes())
    return sha256.hexdigest()


def write_teacher_store(
    teacher,
    x,
    directory,
    k,
    batch_size=8,
    rows_per_shard=64,
    y=None,
    sample_weight=None,
    progress=False,
    temperature=1.0,
):
    """Run the teacher once over `x` and store its top-k per position, resumably.

    The rows are cut into shards of `rows_per_shard`; each shard's rows go
    through the teacher `batch_size` at a time (`keras.Model.predict_on_batch`,
    so a KerasHub task does not preprocess the token ids again), and
    `teacher_topk(logits, k, temperature)` is kept: ids and
    log-probabilities of the full softmax at `temperature`, the temperature
    the store then trains at (`read_teacher_store`). Each shard is written
    to a temporary name in `directory` and renamed; then `store.json`,
    rewritten atomically after every shard with `"complete": false`,
    records it (size and SHA-256);
    the last write sets `"complete": true`.

    Rerunning the same call after an interruption (an exception, a SIGKILL)
    keeps every recorded shard whose size and SHA-256 still match, rewrites
    the others and removes the temporary files left behind; the result is
    byte for byte the store of an uninterrupted run. A rerun on a store
    made with another teacher (fingerprint), `k`, data, `batch_size`,
    `rows_per_shard` or `temperature` raises `ValueError` and writes nothing.

    Args:
        teacher: `keras.Model` mapping `{"token_ids", "padding_mask"}` to
            logits `[batch, sequence_length, vocabulary_size]`, e.g. a
            `Gemma2CausalLM` (float32, bfloat16 or int8).
        x: dict of numpy arrays `[num_rows, sequence_length]`:
            `"token_ids"` (integers) and `"padding_mask"` (0/1 or bool),
            e.g. the `x` of a `Gemma2CausalLMPreprocessor`.
        directory: path of the store, created if missing.
        k: int in `[1, vocabulary_size]`. Tokens kept per position.
        batch_size: int. Rows per teacher call. Defaults to `8`.
        rows_per_shard: int. Rows per shard file. Defaults to `64`.
        y: int array `[num_rows, sequence_length]` of next-token labels,
            or `None`. Give `y` and `sample_weight` together, or neither:
            then `y` is `token_ids` shifted left by one with a last label
            of 0, and `sample_weight` is `padding_mask` shifted the same
            way with a last weight of 0 (the last position has no next
            token in `x`). Defaults to `None`.
        sample_weight: float array `[num_rows, sequence_length]` (0 on
            padding and on tokens that carry no loss), or `None`. Defaults
            to `None`.
        progress: bool. Show a progress bar over the rows. Defaults to
            `False`.
        temperature: float > 0. The distillation temperature the store is
            for: a `Gemma2Distiller` trains on it only at this temperature.
            Defaults to `1.0`.

    Returns:
        The manifest (the dict written to `store.json`).

    Example:

    >>> import keras, numpy as np, tempfile
    >>> token_ids = keras.Input((4,), dtype="int32", name="token_ids")
    >>> padding_mask = keras.Input((4,), name="padding_mask")
    >>> inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    >>> logits = keras.layers.Embedding(10, 10)(token_ids)  # vocabulary of 10
    >>> teacher = keras.Model(inputs, logits)
    >>> x = {"token_ids": np.arange(12).reshape(3, 4) % 10,
    ...      "padding_mask": np.ones((3, 4), bool)}
    >>> directory = tempfile.mkdtemp()
    >>> manifest = write_teacher_store(teacher, x, directory, k=2, rows_per_shard=2)
    >>> manifest["complete"], sorted(manifest["shards"])
    (True, ['shard-00000.npz', 'shard-00001.npz'])
    >>> x, y, sample_weight = read_teacher_store(directory, teacher=teacher)
    >>> y["teacher_ids"].shape, y["teacher_logprobs"].dtype
    ((3, 4, 2), dtype('float32'))
    """
    positive_int(batch_size, "batch_size")
    positive_int(rows_per_shard, "rows_per_shard")
    vocabulary_size = _vocabulary_size(teacher)
    _check_k(k, vocabulary_size)
    temperature = _check_temperature(temperature)
    arrays = _input_arrays(x, y, sample_weight)
    num_rows, sequence_length = arrays["token_ids"].shape
    directory = os.path.abspath(os.fspath(directory))
    run = {
        "k": k,
        "vocabulary_size": vocabulary_size,
        "sequence_length": sequence_length,
        "num_rows": num_rows,
        "rows_per_shard": rows_per_shard,
        "batch_size": batch_size,
        "temperature": temperature,
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "data_sha256": _arrays_sha256(arrays),
    }
    manifest = _resume_manifest(directory, run)
    if manifest is None:
        manifest = {
            "format": STORE_FORMAT,
            "complete": False,
            **run,
            "logprobs_dtype": "float32",
            "tokenizer_sha256": _tokenizer_sha256(teacher),
            "shards": {},
        }
        os.makedirs(directory, exist_ok=True)
        _remove_leftovers(directory)
        atomic_write_json(os.path.join(directory, _MANIFEST), manifest)
    num_shards = math.ceil(num_rows / rows_per_shard)
    bar = keras.utils.Progbar(num_rows) if progress else None
    changed = False
    for index in range(num_shards):
        name = _shard_name(index)
        rows = slice(index * rows_per_shard, (index + 1) * rows_per_shard)
        recorded = manifest["shards"].get(name)
        if recorded is not None and _shard_problem(directory, name, recorded) is None:
            if bar is not None:
                bar.add(len(arrays["token_ids"][rows]))
            continue
        if recorded is not None:
            warnings.warn(
                f"Rewriting {os.path.join(directory, name)}: "
                f"{_shard_problem(directory, name, recorded)}.",
                stacklevel=2,
            )
        shard = {key: value[rows] for key, value in arrays.items()}
        shard.update(_teacher_outputs(teacher, shard, k, temperature, batch_size, bar))
        manifest["shards"][name] = _write_shard(directory, name, shard)
        manifest["complete"] = False
        atomic_write_json(os.path.join(directory, _MANIFEST), manifest)
        changed = True
    if changed or not manifest["complete"]:
        manifest["complete"] = True
        atomic_write_json(os.path.join(directory, _MANIFEST), manifest)
    return manifest


def read_teacher_store(directory, teacher=None, k=None):
    """Load a complete teacher store, checking every shard: `(x, y, sample_weight)`.

    Checks that `store.json` says the store is complete, that every shard
    it lists is present with its recorded size and SHA-256 and, when
    `teacher` is given, that the store was made by that teacher (its
    `teacher_fingerprint`). Anything else raises `ValueError` naming the
    file or both fingerprints; nothing of a damaged store is returned.

    Args:
        directory: path of a store written by `write_teacher_store`.
        teacher: `keras.Model` or `None`. When given, the store must have
            been made by this teacher. Defaults to `None` (not checked).
        k: int or `None`. Return only the top `k <= ` stored `k` entries
            per position (the stored ones are sorted, most likely first,
            so these are the teacher's top `k`). Defaults to `None` (all).

    Returns:
        Tuple `(x, y, sample_weight)` of numpy arrays: `x` a dict of
        `"token_ids"` int32 and `"padding_mask"` bool `[num_rows,
        sequence_length]`; `y` a dict of `"labels"` int32 `[num_rows,
        sequence_length]`, `"teacher_ids"` int32 and `"teacher_logprobs"`
        float32 `[num_rows, sequence_length, k]` and
        `"teacher_temperature"` float32 `[num_rows]` (the store's
        temperature, per row so that it batches with the rest: a
        `Gemma2Distiller` at another temperature refuses the data);
        `sample_weight` float32 `[num_rows, sequence_length]`.

    Example:

    >>> import tempfile
    >>> read_teacher_store(tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    FileNotFoundError: ... holds no teacher store: store.json is missing...
    """
    directory = os.path.abspath(os.fspath(directory))
    manifest = _read_manifest(directory)
    if not manifest["complete"]:
        raise ValueError(
            f"The teacher store {directory} is incomplete: its writing was "
            f"cut short after {len(manifest['shards'])} of "
            f"{_num_shards(manifest)} shards. Rerun `write_teacher_store` "
            "with the same arguments to finish it."
        )
    if teacher is not None:
        expected, found = manifest["teacher_fingerprint"], teacher_fingerprint(teacher)
        if expected != found:
            raise ValueError(
                f"The teacher store {directory} was made by another teacher: "
                f"the store's teacher fingerprint starts {expected[:12]}, the "
                f"given `teacher`'s {found[:12]}. Use the teacher that wrote "
                "it or write a new store."
            )
    stored_k = manifest["k"]
    if k is None:
        k = stored_k
    elif isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= stored_k:
        raise ValueError(
            "Received an invalid value for `k`, expected a positive integer no "
            f"larger than the store's k={stored_k}. Received: k={k!r}"
        )
    parts = {name: [] for name in (*_INPUT_DTYPES, "teacher_ids", "teacher_logprobs")}
    for index in range(_num_shards(manifest)):
        name = _shard_name(index)
        recorded = manifest["shards"].get(name)
        problem = (
            "not listed in store.json"
            if recorded is None
            else _shard_problem(directory, name, recorded)
        )
        if problem is not None:
            raise ValueError(
                f"The teacher store {directory} is damaged: "
                f"{os.path.join(directory, name)} {problem}. Rerun "
                "`write_teacher_store` with the same arguments to repair it."
            )
        with np.load(os.path.join(directory, name), allow_pickle=False) as shard:
            for key, values in parts.items():
                values.append(shard[key])
    arrays = {key: np.concatenate(values) for key, values in parts.items()}
    x = {key: arrays[key] for key in ("token_ids", "padding_mask")}
    y = {
        "labels": arrays["labels"],
        "teacher_ids": arrays["teacher_ids"][..., :k],
        "teacher_logprobs": arrays["teacher_logprobs"][..., :k],
        "teacher_temperature": np.full(
            len(arrays["labels"]), _recorded(manifest, "temperature"), "float32"
        ),
    }
    return x, y, arrays["sample_weight"]


def store_bytes_per_token(directory):
    """Disk bytes of a complete store's shards per stored token position.

    The total size of the shards (inputs, labels and weights included)
    divided by `num_rows * sequence_length`. Uncompressed, it is about
    `13 + 8 * k` bytes (int32 token id, bool mask, int32 label, float32
    weight, then k int32 ids and k float32 log-probabilities).

    Args:
        directory: path of a store written by `write_teacher_store`.

    Returns:
        A float.

    Example:

    >>> import keras, numpy as np, tempfile
    >>> from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
    >>> teacher = Gemma2CausalLM(Gemma2Backbone(
    ...     vocabulary_size=16, num_layers=1, num_query_heads=1,
    ...     num_key_value_heads=1, hidden_dim=8, intermediate_dim=8,
    ...     head_dim=8, sliding_window_size=4))
    >>> x = {"token_ids": np.ones((64, 4), int), "padding_mask": np.ones((64, 4))}
    >>> directory = tempfile.mkdtemp()
    >>> _ = write_teacher_store(teacher, x, directory, k=4)
    >>> 13 + 8 * 4 < store_bytes_per_token(directory) < 13 + 8 * 4 + 10  # zip headers
    True
    """
    directory = os.path.abspath(os.fspath(directory))
    manifest = _read_manifest(directory)
    total = sum(entry["bytes"] for entry in manifest["shards"].values())
    return total / (manifest["num_rows"] * manifest["sequence_length"])


def _vocabulary_size(teacher):
    """The teacher's vocabulary size, from its backbone or its output shape."""
    size = getattr(getattr(teacher, "backbone", None), "vocabulary_size", None)
    if size is None:
        try:
            size = teacher.output_shape[-1]
        except (AttributeError, ValueError, TypeError):
            size = None
    if not isinstance(size, int):
        raise ValueError(
            "Received an invalid value for `teacher`, expected a model with a "
            "`backbone.vocabulary_size` (such as `Gemma2CausalLM`) or a known "
            f"output shape. Received: teacher={type(teacher).__name__}"
        )
    return size


def _input_arrays(x, y, sample_weight):
    """The four input arrays `[N, T]`, checked and in their stored dtypes."""
    if not isinstance(x, dict) or not {"token_ids", "padding_mask"} <= set(x):
        received = sorted(x) if isinstance(x, dict) else type(x).__name__
        raise ValueError(
            "Received an invalid value for `x`, expected a dict with "
            "'token_ids' and 'padding_mask' arrays [num_rows, "
            f"sequence_length]. Received: x={received}"
        )
    if (y is None) != (sample_weight is None):
        raise ValueError(
            "Pass `y` and `sample_weight` together, or neither (both are "
            "then derived from `x`). Received: "
            f"y={'None' if y is None else 'an array'}, sample_weight="
            f"{'None' if sample_weight is None else 'an array'}"
        )
    token_ids = np.asarray(keras.ops.convert_to_numpy(x["token_ids"]))
    padding_mask = np.asarray(keras.ops.convert_to_numpy(x["padding_mask"]))
    if token_ids.ndim != 2 or 0 in token_ids.shape:
        raise ValueError(
            "Received an invalid shape for `x['token_ids']`, expected a "
            "non-empty [num_rows, sequence_length] array. Received: "
            f"shape={token_ids.shape}"
        )
    if token_ids.dtype.kind not in "iu":
        raise ValueError(
            "Received an invalid dtype for `x['token_ids']`, expected "
            f"integers. Received: dtype={token_ids.dtype}"
        )
    if y is None:
        y = np.pad(token_ids[:, 1:], ((0, 0), (0, 1)))
        sample_weight = np.pad(padding_mask[:, 1:], ((0, 0), (0, 1)))
    arrays = {
        "token_ids": token_ids,
        "padding_mask": padding_mask,
        "labels": np.asarray(keras.ops.convert_to_numpy(y)),
        "sample_weight": np.asarray(keras.ops.convert_to_numpy(sample_weight)),
    }
    for key, value in arrays.items():
        if value.shape != token_ids.shape:
            raise ValueError(
                f"Received an invalid shape for `{key}`, expected that of "
                f"`x['token_ids']`, {token_ids.shape}. Received: {value.shape}"
            )
    return {key: value.astype(_INPUT_DTYPES[key]) for key, value in arrays.items()}


def _arrays_sha256(arrays):
    sha256 = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        sha256.update(f"|{key}{value.dtype.str}{value.shape}|".encode())
        sha256.update(value.tobytes())
    return sha256.hexdigest()


def _tokenizer_sha256(teacher):
    """SHA-256 of the teacher's SentencePiece model, or `None` without one."""
    tokenizer = getattr(getattr(teacher, "preprocessor", None), "tokenizer", None)
    proto = getattr(tokenizer, "proto", None)
    return hashlib.sha256(proto).hexdigest() if isinstance(proto, bytes) else None


def _resume_manifest(directory, run):
    """The manifest of a store begun by the same run, `None` for a fresh one."""
    if not os.path.isdir(directory):
        return None
    path = os.path.join(directory, _MANIFEST)
    if not os.path.exists(path):
        shards = sorted(n for n in os.listdir(directory) if _SHARD_NAME.match(n))
        if shards:
            raise ValueError(
                f"The directory {directory} holds shard files ({shards[:3]}) "
                f"but no {_MANIFEST}: not a store this function wrote. Choose "
                "another `directory` or empty it."
            )
        return None
    manifest = _read_manifest(directory)
    for key in _RUN_KEYS:
        if _recorded(manifest, key) != run[key]:
            what = {
                "teacher_fingerprint": "another teacher",
                "data_sha256": "other data",
            }
            was, now = _recorded(manifest, key), run[key]
            if key in what:  # hex digests: their first 12 characters
                was, now = f"{was[:12]}...", f"{now[:12]}..."
            raise ValueError(
                f"The teacher store {directory} was begun with "
                f"{what.get(key, f'another {key}')}: it has {key}={was}, this "
                f"call {key}={now}. Nothing was written. Pass the same "
                "teacher, data and arguments to resume it, or another "
                "`directory`."
            )
    _remove_leftovers(directory)
    return manifest


def _recorded(manifest, key):
    """`manifest[key]`; stores from before `temperature` was recorded are at 1."""
    return manifest.get(key, 1.0) if key == "temperature" else manifest[key]


def _read_manifest(directory):
    path = os.path.join(directory, _MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Received an invalid value for `directory`: {directory} holds no "
            f"teacher store: {_MANIFEST} is missing."
        )
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read the teacher store's {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(
            f"{path} is not a teacher store manifest: expected format "
            f"{STORE_FORMAT!r}. Received: format={found!r}"
        )
    return manifest


def _remove_leftovers(directory):
    for name in os.listdir(directory):
        if _LEFTOVER_NAME.match(name):
            os.remove(os.path.join(directory, name))


def _num_shards(manifest):
    return math.ceil(manifest["num_rows"] / manifest["rows_per_shard"])


def _shard_name(index):
    return f"shard-{index:05d}.npz"


def _shard_problem(directory, name, recorded):
    """Why the shard `name` does not match its record, or `None` when it does."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return "is missing"
    if os.path.getsize(path) != recorded["bytes"]:
        return (
            f"has {os.path.getsize(path)} bytes, store.json records "
            f"{recorded['bytes']} (truncated or replaced)"
        )
    if _file_digest(directory, name) != recorded:
        return "does not match the SHA-256 store.json records (altered)"
    return None


def _teacher_outputs(teacher, shard, k, temperature, batch_size, bar):
    """`teacher_ids` and `teacher_logprobs` `[rows, T, k]` of one shard's rows."""
    ids, logprobs = [], []
    for start in range(0, len(shard["token_ids"]), batch_size):
        batch = {
            key: shard[key][start : start + batch_size]
            for key in ("token_ids", "padding_mask")
        }
        logits = keras.Model.predict_on_batch(teacher, batch)
        batch_ids, batch_logprobs = teacher_topk(logits, k, temperature)
        ids.append(keras.ops.convert_to_numpy(batch_ids).astype("int32"))
        logprobs.append(keras.ops.convert_to_numpy(batch_logprobs).astype("float32"))
        if bar is not None:
            bar.add(len(batch["token_ids"]))
    return {
        "teacher_ids": np.concatenate(ids),
        "teacher_logprobs": np.concatenate(logprobs),
    }


def _write_shard(directory, name, arrays):
    """Write `arrays` as the npz `directory/name` atomically: its size and SHA-256."""
    temporary = os.path.join(directory, f".{name}.partial")
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE_TIME)
                with archive.open(info, "w", force_zip64=True) as file:
                    np.lib.format.write_array(
                        file, np.ascontiguousarray(value), allow_pickle=False
                    )
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return _file_digest(directory, name)
