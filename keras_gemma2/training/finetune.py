"""Fine-tune a preset on instruction or chat rows with LoRA (QLoRA); write a preset."""

import json
import os
import tempfile

import keras

from keras_gemma2.checkpoints.atomic import atomic_directory, atomic_write_json
from keras_gemma2.layers.validation import positive_int, positive_number
from keras_gemma2.models.causal_lm import Gemma2CausalLM
from keras_gemma2.training.response_loss import (
    preprocess_rows,
    weighted_cross_entropy,
)
from keras_gemma2.training.sft_jsonl import row_kind

ADAPTER_FILE = "adapter.lora.h5"
FINETUNE_FILE = "finetune.json"
QUANTIZATION_MODES = ("int8", "int4")


def finetune(
    preset,
    rows,
    output,
    *,
    eval_rows=None,
    lora_rank=4,
    lora_targets=None,
    quantize=None,
    epochs=1,
    batch_size=4,
    learning_rate=1e-4,
    sequence_length=None,
    keep_adapters=False,
    seed=0,
    overwrite=False,
    verbose="auto",
):
    """LoRA fine-tune a preset on instruction or chat rows; write a preset.

    The whole "rows -> dataset -> fit -> save" path that
    `keras-gemma2 finetune` runs:

    1. load `preset` with `Gemma2CausalLM.from_preset`; pack `rows` with
       its preprocessor (`preprocess_rows`: loss weight 1 on response tokens
       only, for chats on every model turn);
    2. with `quantize`, quantize the base (`causal_lm.quantize`), then
       `backbone.enable_lora(lora_rank, target_names=lora_targets)`: only
       the adapters train (QLoRA when quantized);
    3. measure the response loss (`response_loss`) on `eval_rows` (or on
       `rows` when there are none), train as `fit_rows` does, measure
       again;
    4. write `output` atomically (staged, renamed into place on success):
       a preset that `Gemma2CausalLM.from_preset(output)` and
       `keras-gemma2 run output` load, plus `finetune.json` (settings and
       the two losses).

    What the preset holds:

    - default: the base weights with the adapters merged in
      (`backbone.merge_lora()`), in the base's float dtype. After an int8
      or int4 run the quantized copy is dropped: the base is reloaded in
      float from `preset` and the trained adapter merged into it, so the
      preset is as exact as the base was (quantize it again after loading
      to serve it in int8). Reloading needs the float base's memory for a
      moment.
    - `keep_adapters=True`: the float base weights unchanged, plus the
      adapter as `adapter.lora.h5`. `from_preset(output)` gives the base;
      `causal_lm.backbone.load_lora_weights(output + "/adapter.lora.h5")`
      adds the adapter, which `load_finetuned(output)` and
      `keras-gemma2 run` do.

    Args:
        preset: string. Preset name, directory or handle to start from.
        rows: list of row dicts of one kind, e.g. from `read_sft_jsonl`.
        output: string. Directory to write (must not exist unless
            `overwrite`).
        eval_rows: list of row dicts or `None`. Held-out rows for the loss
            before and after. Defaults to `None` (the training rows).
        lora_rank: int. Adapter rank. Defaults to `4`.
        lora_targets: `None`, `"all"` or a list of layer names; see
            `Gemma2Backbone.enable_lora`. Defaults to `None` (query and
            value).
        quantize: `None`, `"int8"` or `"int4"`. Quantize the base before
            adding the adapters. Defaults to `None`.
        epochs: int. Passes over `rows`, shuffled each time. Each epoch
            takes full batches only: the `len(rows) % batch_size` rows left
            over (different ones each epoch) wait for the next. Defaults to
            `1`.
        batch_size: int. Rows per step (at most `len(rows)`). Defaults to
            `4`.
        learning_rate: float. AdamW learning rate. Defaults to `1e-4`.
        sequence_length: int or `None`. Packed length; defaults to the
            preset preprocessor's. A row that does not fit follows its
            `truncate` policy (`"error"` in shipped presets).
        keep_adapters: bool. Save the adapter beside the unmerged base
            instead of merging. Defaults to `False`.
        seed: int. Seeds initialisation of the adapters and the shuffling.
            Defaults to `0`.
        overwrite: bool. Replace an existing `output`. Defaults to `False`.
        verbose: passed to `fit` (`"auto"`, 0, 1, 2); 1 shows a progress
            bar with the loss. Defaults to `"auto"`.

    Returns:
        A dict: `"loss_before"`, `"loss_after"` (response loss on the
        evaluation rows), `"evaluated_on"` (`"eval_rows"` or `"rows"`),
        `"history"` (the `fit` losses per epoch), `"trainable_parameters"`,
        `"output"`.

    Example:

    ```python
    from keras_gemma2.training.finetune import finetune
    from keras_gemma2.training.sft_jsonl import bundled_dataset_path, read_sft_jsonl

    rows = read_sft_jsonl(bundled_dataset_path("python_instructions"))
    report = finetune("gemma2_tiny_python", rows, "./tiny_sft", lora_rank=8,
                      epochs=3, learning_rate=3e-3)
    print(report["loss_before"], report["loss_after"])
    ```
    """
    settings = _checked_settings(
        rows,
        eval_rows,
        lora_rank,
        quantize,
        epochs,
        batch_size,
        learning_rate,
        sequence_length,
        keep_adapters,
        seed,
    )
    output = free_output(output, overwrite)
    causal_lm = text_model(preset, "preset")
    train = preprocess_rows(causal_lm.preprocessor, rows, sequence_length)
    held_out = (
        train
        if eval_rows is None
        else preprocess_rows(causal_lm.preprocessor, eval_rows, sequence_length)
    )
    keras.utils.set_random_seed(seed)
    if quantize is not None:
        causal_lm.quantize(quantize)
    enable_lora(causal_lm.backbone, lora_rank, lora_targets)
    trainable = sum(int(keras.ops.size(v)) for v in causal_lm.trainable_weights)
    loss_before = weighted_cross_entropy(causal_lm, *held_out, batch_size)
    history = _fit_packed(
        causal_lm, train, epochs, batch_size, learning_rate, seed, verbose
    )
    loss_after = weighted_cross_entropy(causal_lm, *held_out, batch_size)
    report = {
        "base": preset,
        "rows": len(rows),
        "row_kind": row_kind(rows),
        "evaluated_on": "rows" if eval_rows is None else "eval_rows",
        "evaluation_rows": len(held_out[1]),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "history": history,
        "trainable_parameters": trainable,
        "backend": keras.config.backend(),
        **settings,
        "lora_targets": lora_targets,
        "adapter": ADAPTER_FILE if keep_adapters else None,
    }
    with atomic_directory(output, overwrite=overwrite) as staging:
        if quantize is None and not keep_adapters:
            causal_lm.backbone.merge_lora()
            causal_lm.save_to_preset(staging)
        else:
            # The adapter leaves the trained (maybe quantized) model; the
            # float base is loaded again to carry it, merged or beside it.
            with tempfile.TemporaryDirectory() as transfer:
                adapter = os.path.join(
                    staging if keep_adapters else transfer, ADAPTER_FILE
                )
                causal_lm.backbone.save_lora_weights(adapter)
                del causal_lm
                base = Gemma2CausalLM.from_preset(preset)
                if not keep_adapters:
                    base.backbone.load_lora_weights(adapter)
                    base.backbone.merge_lora()
                base.save_to_preset(staging)
        atomic_write_json(os.path.join(staging, FINETUNE_FILE), report)
    report["output"] = output
    return report


def load_finetuned(directory, **kwargs):
    """Load a preset written by `finetune`, with its adapter if it kept one.

    Args:
        directory: string. The `output` of `finetune` (or any preset
            directory: without a kept adapter this is `from_preset`).
        **kwargs: passed to `Gemma2CausalLM.from_preset`.

    Returns:
        The `Gemma2CausalLM`, LoRA enabled and loaded when `directory`
        holds `adapter.lora.h5`.

    Example:

    ```python
    causal_lm = load_finetuned("./tiny_sft")
    print(causal_lm.generate("def add(a, b):\\n", max_length=32))
    ```
    """
    causal_lm = Gemma2CausalLM.from_preset(directory, **kwargs)
    adapter = os.path.join(os.fspath(directory), ADAPTER_FILE)
    if os.path.isfile(adapter):
        causal_lm.backbone.load_lora_weights(adapter)
    return causal_lm


def enable_lora(backbone, rank, target_names=None):
    """`backbone.enable_lora(rank)`, passing `target_names` only when given."""
    if target_names is None:
        backbone.enable_lora(rank)
    else:
        backbone.enable_lora(rank, target_names=target_names)


def fit_rows(
    causal_lm,
    rows,
    *,
    epochs=1,
    batch_size=4,
    learning_rate=1e-4,
    sequence_length=None,
    seed=0,
    verbose="auto",
):
    """Compile with AdamW and fit a causal LM on instruction or chat rows.

    The rows are packed by the model's preprocessor (`preprocess_rows`:
    loss weight 1 on response tokens only, for chats on every model turn),
    shuffled again every epoch and fed in full batches: each epoch leaves
    out the `len(rows) % batch_size` rows that do not fill a batch (other
    ones each epoch), so every step has one compiled shape. The optimizer is
    AdamW with weight decay 0.01, none on norm scales and biases. Only the
    trainable weights train: call `backbone.enable_lora(...)` first for
    LoRA, after `causal_lm.quantize("int8")` for QLoRA.

    Args:
        causal_lm: `Gemma2CausalLM` with a preprocessor.
        rows: list of row dicts of one kind, e.g. from `read_sft_jsonl`.
        epochs: int. Passes over `rows`. Defaults to `1`.
        batch_size: int. Rows per step (at most `len(rows)`). Defaults to
            `4`.
        learning_rate: float. Defaults to `1e-4`.
        sequence_length: int or `None`; see `preprocess_rows`.
        seed: int. Seeds the shuffling. Defaults to `0`.
        verbose: passed to `fit`; 1 shows a progress bar with the loss.
            Defaults to `"auto"`.

    Returns:
        The `fit` loss of each epoch, a list of floats.

    Example:

    ```python
    causal_lm = Gemma2CausalLM.from_preset("gemma2_tiny_python")
    causal_lm.backbone.enable_lora(8, target_names="all")
    rows = read_sft_jsonl(bundled_dataset_path("python_instructions"))
    fit_rows(causal_lm, rows, epochs=3, batch_size=8, learning_rate=1e-2)
    ```
    """
    if causal_lm.preprocessor is None:
        raise ValueError(
            "Received a `causal_lm` without a preprocessor, expected one that "
            "can pack text rows (a preset with a tokenizer)."
        )
    packed = preprocess_rows(causal_lm.preprocessor, rows, sequence_length)
    return _fit_packed(
        causal_lm, packed, epochs, batch_size, learning_rate, seed, verbose
    )


def _fit_packed(causal_lm, packed, epochs, batch_size, learning_rate, seed, verbose):
    """`fit_rows` on rows packed already by `preprocess_rows`."""

    positive_int(epochs, "epochs")
    positive_int(batch_size, "batch_size")
    positive_number(learning_rate, "learning_rate")
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    causal_lm.compile(optimizer=optimizer)
    batches = shuffled_batches(packed, batch_size, seed)
    # The rows are packed already: `keras.Model.fit` skips the preprocessing
    # KerasHub's `fit` would add. (Setting the preprocessor aside instead
    # fails on torch after `quantize`, which locks the model's attributes.)
    history = keras.Model.fit(causal_lm, batches, epochs=epochs, verbose=verbose)
    return [float(loss) for loss in history.history["loss"]]


def free_output(output, overwrite):
    """`output` as an absolute path; `FileExistsError` if taken and not `overwrite`."""
    output = os.path.abspath(os.fspath(output))
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(
            f"The output directory {output} already exists; pass overwrite=True "
            "(--overwrite) to replace it, or choose another directory."
        )
    return output


def text_model(preset, name):
    """`Gemma2CausalLM.from_preset(preset)`, which must have a tokenizer."""
    causal_lm = Gemma2CausalLM.from_preset(preset)
    if causal_lm.preprocessor is None:
        raise ValueError(
            f"Received {name}={preset!r}, which has no tokenizer, expected a "
            "preset that can read text rows."
        )
    return causal_lm


def shuffled_batches(packed, batch_size, seed):
    """Full batches of packed rows as `tf.data`, reshuffled every epoch."""
    import tensorflow as tf

    rows = len(packed[1])
    return (
        tf.data.Dataset.from_tensor_slices(packed)
        .shuffle(rows, seed=seed, reshuffle_each_iteration=True)
        .batch(min(batch_size, rows), drop_remainder=True)
    )


def _checked_settings(
    rows,
    eval_rows,
    lora_rank,
    quantize,
    epochs,
    batch_size,
    learning_rate,
    sequence_length,
    keep_adapters,
    seed,
):
    """Validate the arguments before anything loads; the settings to record."""
    for name, value in (("rows", rows), ("eval_rows", eval_rows)):
        if value is None and name == "eval_rows":
            continue
        if not isinstance(value, list) or not value:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected a non-empty "
                f"list of row dicts (see `read_sft_jsonl`). Received: "
                f"{name}={_short(value)}"
            )
    if eval_rows is not None and row_kind(eval_rows) != row_kind(rows):
        raise ValueError(
            f"Received {row_kind(rows)} `rows` and {row_kind(eval_rows)} "
            "`eval_rows`, expected the same kind."
        )
    positive_int(lora_rank, "lora_rank")
    if quantize not in (None, *QUANTIZATION_MODES):
        raise ValueError(
            "Received an invalid value for `quantize`, expected None or one of "
            f"{list(QUANTIZATION_MODES)}. Received: quantize={quantize!r}"
        )
    positive_int(epochs, "epochs")
    positive_int(batch_size, "batch_size")
    positive_number(learning_rate, "learning_rate")
    if sequence_length is not None:
        positive_int(sequence_length, "sequence_length")
    if not isinstance(keep_adapters, bool):
        raise TypeError(
            "Received an invalid value for `keep_adapters`, expected a bool. "
            f"Received: keep_adapters={keep_adapters!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"Received an invalid value for `seed`, expected an int. "
            f"Received: seed={seed!r}"
        )
    return {
        "lora_rank": lora_rank,
        "quantize": quantize,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "sequence_length": sequence_length,
        "keep_adapters": keep_adapters,
        "seed": seed,
    }


def read_finetune_report(directory):
    """The `finetune.json` of a preset written by `finetune`, or `None`."""
    path = os.path.join(os.fspath(directory), FINETUNE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
