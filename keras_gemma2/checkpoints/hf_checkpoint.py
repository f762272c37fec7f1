"""Read Hugging Face Gemma 2 checkpoints (config.json + safetensors)."""

import json
import os

import keras
import numpy as np

from keras_gemma2.checkpoints.safetensors_files import read_header, read_tensor
from keras_gemma2.checkpoints.unallocated import (
    build_unallocated,
    fill,
    forget_pending,
)

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


def is_hf_checkpoint(directory):
    """True when `directory` holds an HF `config.json` (of any model type)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as file:
            return "model_type" in json.load(file)
    except (OSError, ValueError):
        return False


def read_hf_config(directory):
    """Map an HF Gemma 2 `config.json` to `Gemma2Backbone` arguments."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in the checkpoint directory {directory}."
        )
    try:
        with open(path) as file:
            config = json.load(file)
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
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
        "sliding_attention" if i % 2 == 0 else "full_attention"
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
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_WEIGHTS_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as file:
                weight_map = json.load(file)["weight_map"]
        except (ValueError, KeyError) as error:
            raise ValueError(f"{index_path} is not a valid index: {error!r}") from None
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(single_path):
        weight_map, shards = None, [SINGLE_WEIGHTS_FILE]
    else:
        raise FileNotFoundError(
            f"No weights in {directory}: expected {SINGLE_WEIGHTS_FILE} or "
            f"{INDEX_FILE} with its shards."
        )
    entries = {}
    for shard in shards:
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"The weights shard {path} named in {INDEX_FILE} does not exist."
            )
        for name, entry in read_header(path).items():
            if weight_map is not None and weight_map.get(name) != shard:
                raise ValueError(
                    f"Tensor `{name}` is stored in {path} but {index_path} maps it "
                    f"to {weight_map.get(name)!r}."
                )
            entries[name] = entry
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(entries))
        if absent:
            raise ValueError(
                f"{index_path} lists tensors that no shard holds, e.g. `{absent[0]}` "
                f"in {weight_map[absent[0]]}."
            )
    return entries


def weight_plan(backbone):
    """List `(hf_name, variable, expected_hf_shape, to_keras)` for every weight.

    `to_keras` maps the HF array (torch `Linear` layout `[out, in]`) to the
    Keras variable's layout.
    """
    heads, kv_heads = backbone.num_query_heads, backbone.num_key_value_heads
    head_dim, hidden = backbone.head_dim, backbone.hidden_dim
    inner = backbone.intermediate_dim
    vocabulary = backbone.vocabulary_size

    def identity(array):
        return array

    def transpose(array):
        return array.T

    def projection_in(heads_count):
        # [heads*head_dim, hidden] -> [hidden, heads, head_dim]
        return lambda array: array.T.reshape(hidden, heads_count, head_dim)

    def projection_out(array):
        # [hidden, heads*head_dim] -> [heads, head_dim, hidden]
        return array.T.reshape(heads, head_dim, hidden)

    def trim_vocabulary(array):
        # Released checkpoints pad the embedding to 256128 rows.
        return array[:vocabulary]

    plan = [
        (
            "model.embed_tokens.weight",
            backbone.token_embedding.embeddings,
            (vocabulary, hidden),
            trim_vocabulary,
        )
    ]
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"model.layers.{i}."
        attention, ffw = block.attention, block.ffw
        plan += [
            (
                prefix + "input_layernorm.weight",
                block.pre_attention_norm.scale,
                (hidden,),
                identity,
            ),
            (
                prefix + "post_attention_layernorm.weight",
                block.post_attention_norm.scale,
                (hidden,),
                identity,
            ),
            (
                prefix + "pre_feedforward_layernorm.weight",
                block.pre_ffw_norm.scale,
                (hidden,),
                identity,
            ),
            (
                prefix + "post_feedforward_layernorm.weight",
                block.post_ffw_norm.scale,
                (hidden,),
                identity,
            ),
            (
                prefix + "self_attn.q_proj.weight",
                attention.query_dense.kernel,
                (heads * head_dim, hidden),
                projection_in(heads),
            ),
            (
                prefix + "self_attn.k_proj.weight",
                attention.key_dense.kernel,
                (kv_heads * head_dim, hidden),
                projection_in(kv_heads),
            ),
            (
                prefix + "self_attn.v_proj.weight",
                attention.value_dense.kernel,
                (kv_heads * head_dim, hidden),
                projection_in(kv_heads),
            ),
            (
                prefix + "self_attn.o_proj.weight",
                attention.output_dense.kernel,
                (hidden, heads * head_dim),
                projection_out,
            ),
            (
                prefix + "mlp.gate_proj.weight",
                ffw.gate_dense.kernel,
                (inner, hidden),
                transpose,
            ),
            (
                prefix + "mlp.up_proj.weight",
                ffw.up_dense.kernel,
                (inner, hidden),
                transpose,
            ),
            (
                prefix + "mlp.down_proj.weight",
                ffw.down_dense.kernel,
                (hidden, inner),
                transpose,
            ),
        ]
    plan.append(("model.norm.weight", backbone.final_norm.scale, (hidden,), identity))
    return plan


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


def to_hf_layout(hf_name, array, hf_shape):
    """Invert `weight_plan`'s `to_keras` for one tensor: Keras layout -> HF.

    Every `*_proj.weight` is a torch `Linear` stored `[out, in]`; its Keras
    kernel is `[in, ...]` (e.g. `[hidden, heads, head_dim]`), so it is
    reshaped to `[in, out]` and transposed. Every other tensor (norm scales,
    the embedding) keeps its element order and only takes `hf_shape`.

    Args:
        hf_name: string. The HF tensor name from `weight_plan`.
        array: numpy array in the Keras variable's layout.
        hf_shape: tuple. The expected HF shape from `weight_plan`.
    """
    if hf_name.endswith("_proj.weight"):
        return np.reshape(array, tuple(hf_shape)[::-1]).T
    return np.reshape(array, tuple(hf_shape))


def load_hf_weights(backbone, directory, progress=None):
    """Check every tensor of the checkpoint against `backbone`, then assign them.

    All names, shapes and files are checked before the first assignment, so a
    bad checkpoint raises without touching the weights. Tensors are read and
    assigned one at a time, so memory holds one tensor beyond the model.

    Args:
        backbone: a built `Gemma2Backbone`.
        directory: the checkpoint directory.
        progress: optional callable `progress(done, total, name)` called after
            each tensor.
    """
    entries = index_checkpoint(directory)
    plan = weight_plan(backbone)
    expected = {name for name, *_ in plan}
    # A tied output head may be saved as a duplicate of the embedding.
    unexpected = sorted(set(entries) - expected - {"lm_head.weight"})
    if unexpected:
        name = unexpected[0]
        raise ValueError(
            f"Unexpected tensor `{name}` in {entries[name].path}: it has no place in "
            f"a Gemma2Backbone with num_layers={backbone.num_layers}."
        )
    for name, _, shape, _ in plan:
        if name not in entries:
            raise ValueError(
                f"The checkpoint in {directory} lacks the tensor `{name}`."
            )
        stored = entries[name].shape
        if name == "model.embed_tokens.weight":
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
        for done, (name, variable, _, to_keras) in enumerate(plan, start=1):
            array = to_keras(read_tensor(entries[name]))
            fill(variable, as_assignable(array, variable.dtype))
            del array
            if progress is not None:
                progress(done, len(plan), name)
    finally:
        # Built by `build_for_loading`: loaded (or discarded) either way.
        forget_pending(backbone.weights)
