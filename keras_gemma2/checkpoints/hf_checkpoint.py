"""Read Hugging Face Gemma 2 checkpoints (config.json + safetensors)."""

import os

import keras
import numpy as np

from keras_gemma2.checkpoints.finite_check import check_finite
from keras_gemma2.checkpoints.safetensors_files import read_header, read_tensor
from keras_gemma2.checkpoints.shard_index import index_shards
from keras_gemma2.checkpoints.unallocated import (
    build_unallocated,
    fill,
    forget_pending,
)
from keras_gemma2.models import weight_table
from keras_gemma2.models.architecture import layer_is_local
from keras_gemma2.models.json_file import read_json

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF `Gemma2Config` defaults, used when a config.json leaves a key out (as HF does).
_HF_DEFAULTS = {
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_dropout": 0.0,
}
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_tanh")


def read_hf_config(directory):
    """Map an HF Gemma 2 `config.json` to `Gemma2Backbone` arguments."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in the checkpoint directory {directory}."
        )
    config = read_json(path)
    if config.get("model_type") != "gemma2":
        raise ValueError(
            f"{path} describes model_type={config.get('model_type')!r}; expected "
            "'gemma2'. Only Gemma 2 checkpoints load into Gemma2Backbone."
        )
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"{path} lacks the required keys {missing}.")
    config = {**_HF_DEFAULTS, **config}
    rope = config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", config["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"{path} asks for rope_type={rope['rope_type']!r}; Gemma 2 uses 'default'."
        )
    activation = config.get("hidden_activation") or config.get("hidden_act")
    if activation is not None and activation not in _TANH_GELU:
        raise ValueError(
            f"{path} has hidden_activation={activation!r}; Gemma 2 uses the tanh "
            f"approximate GELU {_TANH_GELU}."
        )
    if not config.get("tie_word_embeddings", True):
        raise ValueError(f"{path} has tie_word_embeddings=false; Gemma 2 ties them.")
    if config.get("attention_bias", False):
        raise ValueError(f"{path} has attention_bias=true; Gemma 2 has no biases.")
    num_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    expected_types = [
        "sliding_attention" if layer_is_local(i) else "full_attention"
        for i in range(num_layers)
    ]
    if layer_types is not None and list(layer_types) != expected_types:
        raise ValueError(
            f"{path} has layer_types={layer_types}; Gemma 2 alternates "
            "sliding (even layers) and full (odd layers) attention."
        )
    return {
        "vocabulary_size": config["vocab_size"],
        "num_layers": num_layers,
        "num_query_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "hidden_dim": config["hidden_size"],
        "intermediate_dim": config["intermediate_size"],
        "head_dim": config["head_dim"],
        "query_pre_attn_scalar": config["query_pre_attn_scalar"],
        "attention_logit_soft_cap": config["attn_logit_softcapping"],
        "final_logit_soft_cap": config["final_logit_softcapping"],
        "sliding_window_size": config["sliding_window"],
        "layer_norm_epsilon": config["rms_norm_eps"],
        "rope_max_wavelength": float(rope_theta),
        "dropout": config["attention_dropout"],
    }


def index_checkpoint(directory):
    """Return `{tensor name: TensorEntry}` over the single or sharded weights."""
    entries, weight_map = index_shards(
        directory, SINGLE_WEIGHTS_FILE, INDEX_FILE, read_header, lambda name: name
    )
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(entries))
        if absent:
            raise ValueError(
                f"{os.path.join(directory, INDEX_FILE)} lists tensors that no shard "
                f"holds, e.g. `{absent[0]}` in {weight_map[absent[0]]}."
            )
    return entries


def weight_plan(backbone):
    """List `(hf_name, weight, variable, hf_shape)` for every weight, in HF order.

    `weight` is the row of `keras_gemma2.models.weight_table` describing it;
    `weight_table.convert(array, weight.hf_axes, weight.axes, sizes)` moves
    an HF array (torch `Linear` layout `[out, in]`) into the variable's.
    """
    return weight_table.checkpoint_plan(backbone, "hf")


def as_assignable(array, dtype):
    """Convert a checkpoint array for a variable of `dtype`, copying little.

    bfloat16 arrays go in as they are (JAX and TensorFlow take
    `ml_dtypes.bfloat16`); torch takes no bfloat16 numpy arrays, so it gets a
    torch tensor viewing the same bytes.
    """
    array = np.ascontiguousarray(array)
    if str(array.dtype) != dtype:
        if dtype == "bfloat16" and keras.config.backend() == "torch":
            array = array.astype("float32")
        else:
            array = array.astype(dtype)
    if str(array.dtype) == "bfloat16" and keras.config.backend() == "torch":
        import torch

        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return array


def build_for_loading(backbone_cls, config):
    """Build a backbone whose weights are about to be filled by a load.

    Its variables stay unallocated until `fill` gives them the checkpoint's
    values, so loading never holds random initial weights and the
    checkpoint's at once.
    """
    return build_unallocated(lambda: backbone_cls(**config))


def load_hf_weights(backbone, directory, progress=None, check_finite_values=True):
    """Check every tensor of the checkpoint against `backbone`, then assign them.

    All names, shapes and files are checked before the first assignment, so a
    bad checkpoint raises without touching the weights. Tensors are read and
    assigned one at a time, so memory holds one tensor beyond the model.

    Args:
        backbone: a built `Gemma2Backbone`.
        directory: the checkpoint directory.
        progress: optional callable `progress(done, total, name)` called after
            each tensor.
        check_finite_values: bool. Refuse a tensor holding NaN or Inf with a
            `ValueError` naming it and its file, as it is read (before it is
            assigned). `backbone`, built for this load, is then unusable and
            must be discarded. Defaults to `True`.
    """
    entries = index_checkpoint(directory)
    plan = weight_plan(backbone)
    sizes = weight_table.dimensions(backbone)
    expected = {name for name, *_ in plan}
    # A tied output head may be saved as a duplicate of the embedding.
    unexpected = sorted(set(entries) - expected - {"lm_head.weight"})
    if unexpected:
        name = unexpected[0]
        raise ValueError(
            f"Unexpected tensor `{name}` in {entries[name].path}: it has no place in "
            f"a Gemma2Backbone with num_layers={backbone.num_layers}."
        )
    for name, weight, _, shape in plan:
        if name not in entries:
            raise ValueError(
                f"The checkpoint in {directory} lacks the tensor `{name}`."
            )
        stored = entries[name].shape
        if weight.padded:
            ok = len(stored) == 2 and stored[0] >= shape[0] and stored[1] == shape[1]
            wanted = f"({shape[0]} or more, {shape[1]})"
        else:
            ok = stored == shape
            wanted = str(shape)
        if not ok:
            raise ValueError(
                f"Tensor `{name}` in {entries[name].path} has shape {stored}; "
                f"expected {wanted} from config.json."
            )
    try:
        for done, (name, weight, variable, shape) in enumerate(plan, start=1):
            array = read_tensor(entries[name])[: shape[0]]  # drops padded rows
            if check_finite_values:
                check_finite(array, name, entries[name].path)
            array = weight_table.convert(array, weight.hf_axes, weight.axes, sizes)
            fill(variable, as_assignable(array, variable.dtype))
            del array
            if progress is not None:
                progress(done, len(plan), name)
    finally:
        # Built by `build_for_loading`: loaded (or discarded) either way.
        forget_pending(backbone.weights)
