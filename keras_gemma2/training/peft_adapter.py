"""Hugging Face PEFT LoRA adapters: write ours, read theirs.

A PEFT adapter directory holds `adapter_config.json` and
`adapter_model.safetensors` with, per adapted module,
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
`[rank, in]` and `....lora_B.weight` `[out, rank]` (torch `Linear` layout);
the update is `(lora_alpha / r) * lora_B @ lora_A`. Ours is
`(alpha / rank) * A @ B` on `[in, out]`, so `A = lora_A.T`, `B = lora_B.T`
(see `keras_gemma2.training.lora`). Module names come from the weight
table's Hugging Face names.
"""

import json
import os

import numpy as np
from keras import ops

from keras_gemma2.checkpoints.atomic import atomic_directory, atomic_write_json
from keras_gemma2.checkpoints.safetensors_files import read_header, read_tensor
from keras_gemma2.training import lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# `PeftModelForCausalLM.base_model` (LoraModel) `.model` (Gemma2ForCausalLM).
KEY_PREFIX = "base_model.model."

# adapter_config.json settings that change what the adapter computes and that
# keras_gemma2 does not implement: each must be absent or falsy.
_UNSUPPORTED_SETTINGS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_rslora": "rank-stabilized scaling (lora_alpha / sqrt(r))",
    "lora_bias": "LoRA bias vectors",
    "modules_to_save": "fully trained extra modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "adapters on a subset of the layers",
    "layer_replication": "replicated layers",
    "fan_in_fan_out": "Conv1D (fan-in, fan-out) weights",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "adapters on raw parameters",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
}


def _module(weight, layer):
    """PEFT's module path of `weight` in block `layer`, e.g. `...q_proj`."""
    return KEY_PREFIX + weight.hf_name(layer)[: -len(".weight")]


def _key_table(backbone):
    """`{safetensors key: (block index, layer name, "A" or "B")}`."""
    block = backbone.transformer_layers[0]
    table = {}
    for weight in lora.projection_weights():
        name = lora.projection_layer(block, weight).name
        for index in range(backbone.num_layers):
            module = _module(weight, index)
            table[f"{module}.lora_A.weight"] = (index, name, "A")
            table[f"{module}.lora_B.weight"] = (index, name, "B")
    return table


def _number(value):
    return int(value) if float(value).is_integer() else float(value)


def save_peft_adapter(backbone, directory, base_model_name_or_path=None):
    """Write `backbone`'s adapters as a PEFT LoRA adapter directory, atomically.

    Args:
        backbone: `Gemma2Backbone` with LoRA enabled.
        directory: destination; replaced if it exists.
        base_model_name_or_path: optional string recorded as PEFT's
            `base_model_name_or_path` (the Hugging Face checkpoint the
            adapter applies to).
    """
    from safetensors.numpy import save_file

    state = lora.lora_state(backbone)
    tensors = {}
    modules = []
    for index, weight, layer in lora.adapted_layers(backbone):
        a = ops.convert_to_numpy(layer.lora_kernel_a)
        b = ops.convert_to_numpy(layer.lora_kernel_b)
        module = _module(weight, index)
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T, "float32")
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.T, "float32")
        if lora.hf_module(weight) not in modules:
            modules.append(lora.hf_module(weight))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": state.rank,
        "lora_alpha": _number(state.alpha),
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with atomic_directory(directory, overwrite=True) as staging:
        save_file(
            tensors,
            os.path.join(staging, WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        atomic_write_json(os.path.join(staging, CONFIG_FILE), config)


def _read_config(directory):
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(
            f"{path} describes a {peft_type!r} adapter; keras_gemma2 loads PEFT "
            "adapters with peft_type 'LORA'."
        )
    used = [
        f"{key} ({what})"
        for key, what in _UNSUPPORTED_SETTINGS.items()
        if config.get(key)
    ]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r} (trained biases)")
    if used:
        raise ValueError(
            f"{path} uses settings keras_gemma2 cannot apply to Gemma 2: "
            f"{', '.join(used)}. Only plain LoRA on q/k/v/o/gate/up/down_proj "
            "maps onto Gemma2Backbone."
        )
    _check_base_model(config, path)
    return config, path


def _check_base_model(config, path):
    """Reject an adapter whose local base checkpoint is not Gemma 2."""
    base = config.get("base_model_name_or_path")
    base_config = os.path.join(base, "config.json") if isinstance(base, str) else ""
    if not base_config or not os.path.isfile(base_config):
        return  # a hub name or nothing: the tensor shapes are checked below
    with open(base_config, encoding="utf-8") as file:
        model_type = json.load(file).get("model_type")
    if model_type != "gemma2":
        raise ValueError(
            f"{path} is an adapter for base model {base!r} of model_type "
            f"{model_type!r}; keras_gemma2 loads adapters for 'gemma2'."
        )


def read_peft_adapter(backbone, directory):
    """Read and check a PEFT LoRA directory against `backbone`.

    Returns:
        `(arrays, rank, targets, alpha)` in `lora.assign_adapters`' terms.
    """
    config, config_path = _read_config(directory)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"The PEFT adapter directory {directory} has no {WEIGHTS_FILE} "
            "(pickled adapter_model.bin files are not read)."
        )
    entries = read_header(weights_path)
    if not entries:
        raise ValueError(f"{weights_path} holds no LoRA tensors.")
    table = _key_table(backbone)
    unmapped = sorted(set(entries) - set(table))
    if unmapped:
        raise ValueError(
            f"{weights_path} holds tensors that no projection of this "
            f"Gemma2Backbone ({backbone.num_layers} blocks) takes: "
            f"{unmapped[:5]}{' ...' if len(unmapped) > 5 else ''}. keras_gemma2 "
            "maps lora_A/lora_B of q/k/v/o_proj and gate/up/down_proj in "
            f"model.layers.0..{backbone.num_layers - 1} (no embed_tokens, lm_head, "
            "DoRA magnitudes or biases)."
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(
            f"{config_path} has an invalid rank, expected a positive integer. "
            f"Received: r={rank!r}"
        )
    factors = {}
    for key, entry in entries.items():
        index, layer, factor = table[key]
        rank_axis = 0 if factor == "A" else 1
        if len(entry.shape) != 2 or entry.shape[rank_axis] != rank:
            raise ValueError(
                f"Tensor `{key}` in {weights_path} has shape {list(entry.shape)}; "
                f"expected {'[r, in]' if factor == 'A' else '[out, r]'} with "
                f"r={rank} from {CONFIG_FILE}."
            )
        factors.setdefault((index, layer), {})[factor] = (
            read_tensor(entry).astype("float32").T
        )
    incomplete = [key for key, pair in factors.items() if len(pair) != 2]
    if incomplete:
        raise ValueError(
            f"{weights_path} lacks lora_A or lora_B for "
            f"{[f'decoder_block_{i}/{name}' for i, name in incomplete]}."
        )
    arrays = {key: (pair["A"], pair["B"]) for key, pair in factors.items()}
    targets = sorted({layer for _, layer in arrays})
    alpha = config.get("lora_alpha", rank)
    return arrays, rank, targets, alpha
