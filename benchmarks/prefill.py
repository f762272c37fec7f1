"""Prefill speed and memory: ours (each attention implementation) vs KerasHub and HF.

Usage: `python benchmarks/prefill.py [--backends jax,tensorflow,torch]
[--lengths 1024,2048,4096,8192] [--repeats 3]
[--implementations auto,reference,blocked,flex] [--peers keras_hub,hf]`

Mid config: vocabulary 32000, 8 layers (4 local, 4 global), hidden 512, 8/4
heads, head_dim 64, intermediate 2048 per branch, window 512; batch 1,
float32. One set of random weights (a KerasHub `GemmaBackbone` with Gemma 2
settings, saved as a preset) is loaded by every model: ours through
`Gemma2CausalLM.from_preset(..., attention_implementation=...)`, KerasHub's
`GemmaCausalLM.from_preset`, HF `Gemma2ForCausalLM` (eager attention, the one
that soft-caps) from our `export_to_transformers`.

What is timed, the same work for every model: the forward over the whole
prompt (embedding, every block, final norm) and the soft-capped logits of the
last position only. Ours and KerasHub run as one Keras functional model
(backbone -> last position -> tied embedding -> `SoftCap`) through
`predict_on_batch` (compiled with XLA on jax and tensorflow, eager under
`no_grad` on torch); HF runs `model(ids, logits_to_keep=1)` under
`torch.no_grad()`. Median of `--repeats` runs after one warm-up run (which
compiles). Token ids are random, `<bos>` first, no padding.

Memory: every measurement (backend, model, implementation, length) runs in a
fresh process, so nothing of another configuration stays resident. "load GB"
is the resident set after loading the model; then the kernel's peak mark is
reset (Linux `/proc/self/clear_refs`) and "peak GB" is the highest resident
set during the warm-up (compilation included) and the timed runs: framework
and weights plus what the forward needs.

The last column times one local layer's attention core alone (the
`attention` dispatch at that length, window 512, 8/4 heads, head_dim 64,
compiled like the model), as milliseconds per 1000 tokens: flat for an
`O(T * window)` kernel, growing with `T` for the `O(T^2)` reference.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MID = {
    "vocabulary_size": 32000,
    "num_layers": 8,
    "num_query_heads": 8,
    "num_key_value_heads": 4,
    "hidden_dim": 512,
    "intermediate_dim": 2048,
    "head_dim": 64,
    "sliding_window_size": 512,
}


def keras_hub_gemma2_backbone(config, dtype=None):
    """KerasHub's `GemmaBackbone` with Gemma 2 settings, sized by our `config`."""
    import keras_hub

    return keras_hub.models.GemmaBackbone(
        **{key: config[key] for key in MID if key != "intermediate_dim"},
        intermediate_dim=2 * config["intermediate_dim"],  # KerasHub: both branches
        query_head_dim_normalize=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        dtype=dtype,
    )


def make_weights(directory, config=MID, dtype=None):
    """Random KerasHub Gemma 2-style preset in `directory/keras_hub`, HF in `/hf`."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub_gemma2_backbone(config, dtype)
    keras_hub.models.GemmaCausalLM(backbone).save_to_preset(
        os.path.join(directory, "keras_hub")
    )
    from keras_gemma2 import Gemma2CausalLM
    from keras_gemma2.checkpoints.hf_export import export_to_transformers

    ours = Gemma2CausalLM.from_preset(os.path.join(directory, "keras_hub"))
    export_to_transformers(ours, os.path.join(directory, "hf"))


def token_ids(length, vocabulary_size=MID["vocabulary_size"]):
    import numpy as np

    ids = np.random.default_rng(1).integers(3, vocabulary_size, (1, length))
    ids[:, 0] = 2
    return ids.astype("int32")


def _status_gb(field):
    """A `/proc/self/status` memory field (`VmRSS`, `VmHWM`) in GB, or `None`."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return None


def start_peak():
    """Current resident set in GB, and restart the peak (high-water) mark there.

    Linux resets `VmHWM` on writing 5 to `/proc/self/clear_refs`; elsewhere the
    peak stays `ru_maxrss`, which then includes loading.
    """
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass
    current = _status_gb("VmRSS")
    return current if current is not None else peak_gb()


def peak_gb():
    """Peak resident set since `start_peak` (or since start), in GB."""
    peak = _status_gb("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return peak


def median_seconds(function, repeats):
    function()  # warm-up: compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def last_logits_model(backbone, final_logit_soft_cap):
    """Functional model: backbone -> last position -> tied embedding -> cap."""
    import keras

    from keras_gemma2.layers import SoftCap

    inputs = {
        "token_ids": keras.Input(shape=(None,), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input(shape=(None,), dtype="int32", name="padding_mask"),
    }
    hidden = backbone(inputs)[:, -1:, :]
    logits = backbone.token_embedding(hidden, reverse=True)
    outputs = SoftCap(final_logit_soft_cap, dtype=backbone.dtype_policy)(logits)
    model = keras.Model(inputs, outputs)
    model.compile(jit_compile=keras.config.backend() != "torch")
    return model


def local_attention_ms_per_1k(length, implementation, repeats):
    """One local layer's attention core at `length`, ms per 1000 tokens."""
    import keras
    import numpy as np
    from keras import ops

    from keras_gemma2.layers.attention_dispatch import attention

    backend = keras.config.backend()
    heads, kv_heads, head_dim = (
        MID["num_query_heads"],
        MID["num_key_value_heads"],
        MID["head_dim"],
    )
    rng = np.random.default_rng(2)
    q = rng.normal(size=(1, length, heads, head_dim)).astype("float32") / 8
    k = rng.normal(size=(1, length, kv_heads, head_dim)).astype("float32")
    q, k = ops.convert_to_tensor(q), ops.convert_to_tensor(k)

    def core(q, k):
        return attention(
            q,
            k,
            k,
            sliding_window_size=MID["sliding_window_size"],
            soft_cap=50.0,
            implementation=implementation,
        )

    if backend == "jax":
        import jax

        core = jax.jit(core)
    elif backend == "tensorflow":
        import tensorflow as tf

        core = tf.function(core, jit_compile=True)

    def run():
        if backend == "torch":
            import torch

            with torch.no_grad():
                return ops.convert_to_numpy(core(q, k))
        return ops.convert_to_numpy(core(q, k))

    return 1000 * median_seconds(run, repeats) / length * 1000


def chosen_kernels(implementation, length):
    """What `implementation` runs on local / global layers at `length`."""
    import contextlib
    import warnings

    import keras
    from keras import ops

    from keras_gemma2.layers.attention_dispatch import choose_implementation

    query = ops.zeros((1, length, MID["num_query_heads"], MID["head_dim"]))
    guard = contextlib.nullcontext()
    if keras.config.backend() == "torch":
        import torch

        guard = torch.no_grad()
    with guard, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = choose_implementation(
            implementation, query, MID["sliding_window_size"], 50.0
        )
        global_ = choose_implementation(implementation, query, None, 50.0)
    return f"{local}/{global_}"


def child(spec):
    """One measurement in this fresh process; prints one JSON line."""
    import keras

    directory, model_name, implementation = (
        spec["directory"],
        spec["model"],
        spec["implementation"],
    )
    length, repeats = spec["length"], spec["repeats"]
    backend = keras.config.backend()
    ids = token_ids(length)
    result = dict(spec, backend=backend)
    result.pop("directory")
    if model_name == "hf":
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(
            os.path.join(directory, "hf"),
            attn_implementation="eager",
            dtype=torch.float32,
        ).eval()
        result["load_gb"] = start_peak()
        ids = torch.tensor(ids, dtype=torch.long)

        def run():
            with torch.no_grad():
                return hf(ids, logits_to_keep=1).logits.numpy()

    else:
        import keras_hub

        preset = os.path.join(directory, "keras_hub")
        if model_name == "ours":
            from keras_gemma2 import Gemma2CausalLM

            causal_lm = Gemma2CausalLM.from_preset(
                preset, attention_implementation=implementation
            )
            cap = causal_lm.backbone.final_logit_soft_cap
            result["kernels"] = chosen_kernels(implementation, length)
        else:
            causal_lm = keras_hub.models.GemmaCausalLM.from_preset(preset)
            cap = causal_lm.backbone.final_logit_soft_cap
        model = last_logits_model(causal_lm.backbone, cap)
        inputs = {"token_ids": ids, "padding_mask": ids * 0 + 1}
        result["load_gb"] = start_peak()

        def run():
            return model.predict_on_batch(inputs)

    result["seconds"] = median_seconds(run, repeats)
    result["peak_gb"] = peak_gb()
    if model_name == "ours" and implementation in ("reference", "blocked", "flex"):
        result["local_ms_per_1k"] = local_attention_ms_per_1k(
            length, implementation, repeats
        )
    print(json.dumps(result), flush=True)


def versions(backend):
    import importlib.metadata as metadata

    names = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}
    packages = ["keras", "keras-hub", names[backend]]
    if backend == "torch":
        packages.append("transformers")
    found = []
    for name in packages:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} ?")
    return ", ".join(found)


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM"


def measurements(args):
    """The child specs to run, in order."""
    implementations = args.implementations.split(",")
    peers = [peer for peer in args.peers.split(",") if peer]
    for backend in args.backends.split(","):
        for length in [int(n) for n in args.lengths.split(",")]:
            for implementation in implementations:
                if implementation == "flex" and backend != "torch":
                    continue  # PyTorch's kernel
                if implementation == "fused" and backend != "jax":
                    continue  # soft-capped only with JAX on TPU
                yield backend, "ours", implementation, length
            if "keras_hub" in peers:
                yield backend, "keras_hub", "-", length
            if "hf" in peers and backend == "torch":
                yield backend, "hf", "-", length


def run_child(args, directory, backend, model, implementation, length):
    spec = {
        "directory": directory,
        "model": model,
        "implementation": implementation,
        "length": length,
        "repeats": args.repeats,
    }
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    failed = dict(spec, backend=backend, seconds=None)
    failed.pop("directory")
    try:
        process = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return dict(failed, error=f"timeout {args.timeout}s")
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        last = (process.stderr.strip().splitlines() or ["?"])[-1]
        return dict(failed, error=f"rc {process.returncode}: {last[:120]}")
    return json.loads(lines[-1])


def print_table(results, args):
    print(f"# prefill: {machine()}; median of {args.repeats} after one warm-up")
    for backend in dict.fromkeys(row["backend"] for row in results):
        print(f"# {backend}: {versions(backend)}")
    print(
        "| backend | T | model | implementation | kernels local/global | seconds "
        "| ours/KerasHub (time) | load GB | peak GB | local attention ms/1k tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        peer = next(
            (
                r
                for r in results
                if r["backend"] == row["backend"]
                and r["length"] == row["length"]
                and r["model"] == "keras_hub"
                and r.get("seconds")
            ),
            None,
        )
        if row.get("seconds") is None:
            cells = [row.get("error", "failed"), "", "", "", ""]
        else:
            ratio = ""
            if row["model"] == "ours" and peer:
                ratio = f"{row['seconds'] / peer['seconds']:.2f}"
            local = row.get("local_ms_per_1k")
            cells = [
                f"{row['seconds']:.3f}",
                ratio,
                f"{row['load_gb']:.2f}",
                f"{row['peak_gb']:.2f}",
                "" if local is None else f"{local:.1f}",
            ]
        print(
            f"| {row['backend']} | {row['length']} | {row['model']} | "
            f"{row['implementation']} | {row.get('kernels', '')} | "
            + " | ".join(cells)
            + " |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--implementations", default="auto,reference,blocked,flex")
    parser.add_argument("--peers", default="keras_hub,hf")
    parser.add_argument(
        "--timeout", type=int, default=3600, help="seconds per measurement process"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    with tempfile.TemporaryDirectory() as directory:
        make_weights(directory)
        results = []
        for backend, model, implementation, length in measurements(args):
            row = run_child(args, directory, backend, model, implementation, length)
            print(f"# {json.dumps(row)}", file=sys.stderr, flush=True)
            results.append(row)
    print_table(results, args)


if __name__ == "__main__":
    main()
