"""Peak resident memory while loading a ~1 GB HF Gemma 2 checkpoint.

Usage: `python benchmarks/load_memory.py [--backend jax] [--repeats 3]`

Writes a random float32 and a bfloat16 safetensors checkpoint (sharded, as
released ones are), then loads each in a fresh process with
`Gemma2Backbone.from_preset` (ours) and with KerasHub's
`keras_hub.models.GemmaCausalLM.from_preset` (its transformers converter),
and prints peak RSS minus the process's idle footprint (imports done, backend
initialised, high-water mark reset), as a ratio to the checkpoint's size.
Target: ratio <= 1.3.

`--meshes 2x4,1x8` (jax) adds rows for ours loaded under a
`keras.distribution.ModelParallel` with `Gemma2Backbone.get_layout_map` on
8 virtual CPU devices of that (batch, model) shape: each checkpoint tensor
goes straight into its sharded variable. On CPU the devices' memory is the
process's memory, so the peak counts every shard and every replica (norm
scales, and key/value heads the model axis does not divide); the "held on
devices" column is that total, so peak minus it is what loading itself
costs.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

CONFIG = {
    "model_type": "gemma2",
    "architectures": ["Gemma2ForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 16,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "query_pre_attn_scalar": 128,
    "sliding_window": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}


def tensor_shapes(config):
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            shapes[prefix + norm + ".weight"] = (hidden,)
        shapes[prefix + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[prefix + "mlp.gate_proj.weight"] = (inner, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (inner, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, inner)
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def write_checkpoint(directory, dtype, shard_bytes=300 * 2**20):
    """A random sharded checkpoint; returns its size in bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    numpy_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    shards, current, size = [], {}, 0
    for name, shape in tensor_shapes(CONFIG).items():
        current[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(
            numpy_dtype
        )
        size += current[name].nbytes
        if sum(t.nbytes for t in current.values()) > shard_bytes:
            shards.append(current)
            current = {}
    shards.append(current)
    weight_map = {}
    for index, tensors in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**CONFIG, "torch_dtype": dtype}, f)
    write_tokenizer(directory)
    return size


def write_tokenizer(directory):
    """A small SentencePiece model: KerasHub's converter requires one."""
    from keras_gemma2.data import train_sentencepiece

    proto = train_sentencepiece(
        [f"line {i} of a tiny corpus" for i in range(500)],
        vocabulary_size=60,
        control_pieces=(),
        byte_fallback=False,
    )
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(proto)


CHILD = r"""
import sys, time
import keras
import numpy as np

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

keras.ops.convert_to_numpy(keras.ops.ones((4,)) + 1)
loader, directory, dtype, mesh = sys.argv[1:5]
distribution = None
if mesh != "-":
    from keras_gemma2 import Gemma2Backbone
    shape = tuple(int(n) for n in mesh.split("x"))
    device_mesh = keras.distribution.DeviceMesh(
        shape, ["batch", "model"], keras.distribution.list_devices())
    distribution = keras.distribution.ModelParallel(
        layout_map=Gemma2Backbone.get_layout_map(device_mesh), batch_dim_name="batch")
    keras.distribution.set_distribution(distribution)
if loader == "ours":
    # The backbone: the test tokenizer's 60 pieces do not cover the
    # 32000-row embedding, which the causal LM rightly refuses.
    from keras_gemma2 import Gemma2Backbone as Model
else:
    import keras_hub
    Model = keras_hub.models.GemmaCausalLM
idle = status("VmRSS")
# Reset the high-water mark so import-time transients do not count.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = time.perf_counter()
model = Model.from_preset(directory, dtype=dtype)
seconds = time.perf_counter() - start
peak = status("VmHWM")
# Bytes the devices hold once loaded: every shard and every replica.
held = sum(
    shard.data.nbytes
    for variable in model.weights
    for shard in getattr(variable.value, "addressable_shards", [])
) if keras.config.backend() == "jax" else 0
print(idle, peak, seconds, held)
"""


def measure(loader, directory, dtype, backend, mesh="-"):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if mesh != "-":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, loader, directory, dtype, mesh],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return None, last[:100]
    idle, peak, seconds, held = result.stdout.split()[-4:]
    return (int(idle), int(peak), float(seconds), int(held)), None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loaders", default="ours,keras_hub")
    parser.add_argument("--meshes", default="", help="e.g. 2x4,1x8 (jax only)")
    args = parser.parse_args()
    runs_to_make = [(loader, "-") for loader in args.loaders.split(",")] + [
        ("ours", mesh) for mesh in args.meshes.split(",") if mesh
    ]
    import keras

    print(
        f"# load_memory: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, backend {args.backend}, keras {keras.__version__}, "
        f"python {platform.python_version()}; medians of {args.repeats} runs"
    )
    print(
        "| dtype | loader | checkpoint GB | idle GB | peak GB | "
        "(peak-idle)/checkpoint | held on devices / checkpoint | load s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for dtype in ("float32", "bfloat16"):
            directory = os.path.join(root, dtype)
            size = write_checkpoint(directory, dtype)
            for loader, mesh in runs_to_make:
                runs, error = [], None
                name = loader if mesh == "-" else f"{loader}, mesh {mesh}"
                for _ in range(args.repeats):
                    run, error = measure(loader, directory, dtype, args.backend, mesh)
                    if run is None:
                        break
                    runs.append(run)
                if not runs:
                    print(
                        f"| {dtype} | {name} | {size / 1e9:.2f} | - | - | - | - | "
                        f"failed: {error} |"
                    )
                    continue
                idle, peak, seconds, held = (
                    float(np.median(v)) for v in zip(*runs, strict=True)
                )
                held = f"{held / size:.2f}" if held else "-"
                print(
                    f"| {dtype} | {name} | {size / 1e9:.2f} | {idle / 1e9:.2f} | "
                    f"{peak / 1e9:.2f} | {(peak - idle) / size:.2f} | {held} | "
                    f"{seconds:.1f} |"
                )


if __name__ == "__main__":
    main()
