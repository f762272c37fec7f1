"""Resident memory of a loaded ~1 GB Gemma 2 model: float32, bfloat16, int8, int4.

Usage: `python benchmarks/quantized_memory.py [--backends jax,tensorflow,torch]
[--repeats 3]`

Writes four `Gemma2CausalLM.save_to_preset` presets of one random model of
`benchmarks/load_memory.py`'s `CONFIG` size (no preprocessor): float32;
bfloat16 (the float32 weights cast); int8 and int4 (the float32 model
quantized with `Gemma2CausalLM.quantize`, then saved). Then, per backend
and preset, a fresh process imports everything, initialises the backend,
reads its idle footprint (VmRSS), resets the high-water mark and loads the
preset with `Gemma2CausalLM.from_preset` (with `dtype="bfloat16"` for the
bfloat16 preset, which KerasHub would otherwise cast to the default
float32). It reports what stays resident after the load (VmRSS - idle) and
the peak during it (VmHWM - idle), each as a ratio to the float32 row of
the same backend, and the peak as a ratio to the float32 weights file.
Target (issue #14): int8 peak <= 0.35x float32's, int4 lower still.

Before `keras_gemma2.models.quantization.packed_int4_kernels` (Keras'
loader unpacked every int4 kernel while looking for sublayers), the int4
row on torch read 0.79 GB resident and peak, above int8's 0.31 / 0.36.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_memory import CONFIG  # noqa: E402  (the ~1 GB float32 size)

MODES = ("float32", "bfloat16", "int8", "int4")


def proc_bytes(key):
    """One size field of /proc/self/status (`"VmRSS"`, `"VmHWM"`), in bytes."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields[key].split()[0]) * 1024


def write_presets(root):
    """Child: save the four presets under `root` (KERAS_BACKEND set by the parent)."""
    import keras

    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
    from keras_gemma2.checkpoints.hf_checkpoint import read_hf_config

    with tempfile.TemporaryDirectory() as hf_directory:
        with open(os.path.join(hf_directory, "config.json"), "w") as file:
            json.dump(CONFIG, file)
        config = read_hf_config(hf_directory)
    keras.utils.set_random_seed(0)
    Gemma2CausalLM(Gemma2Backbone(**config)).save_to_preset(f"{root}/float32")
    bfloat16 = Gemma2CausalLM.from_preset(f"{root}/float32", dtype="bfloat16")
    bfloat16.save_to_preset(f"{root}/bfloat16")
    del bfloat16
    for mode in ("int8", "int4"):
        causal_lm = Gemma2CausalLM.from_preset(f"{root}/float32")
        causal_lm.quantize(mode)
        causal_lm.save_to_preset(f"{root}/{mode}")
        del causal_lm


def load_and_report(directory, dtype):
    """Child: load one preset and print idle, resident, peak, seconds, bytes, modes."""
    import keras

    keras.ops.convert_to_numpy(keras.ops.ones((4,)) + 1)  # backend initialised
    from keras_gemma2 import Gemma2CausalLM

    kwargs = {} if dtype == "-" else {"dtype": dtype}
    idle = proc_bytes("VmRSS")
    # Reset the high-water mark so import-time transients do not count.
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    start = time.perf_counter()
    model = Gemma2CausalLM.from_preset(directory, **kwargs)
    seconds = time.perf_counter() - start
    resident, peak = proc_bytes("VmRSS"), proc_bytes("VmHWM")
    itemsizes = {"bfloat16": 2, "float32": 4, "int8": 1}
    held = sum(
        int(np.prod(v.shape)) * itemsizes[keras.backend.standardize_dtype(v.dtype)]
        for v in model.weights
    )
    modes = {
        layer.quantization_mode
        for layer in model.backbone._flatten_layers()
        if getattr(layer, "quantization_mode", None)
    }
    print(idle, resident, peak, seconds, held, "+".join(sorted(modes)) or "float")


def run_child(backend, *args):
    """Run this script in a fresh process on `backend`; its stdout, or raise."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(last[:120])
    return result.stdout


def weights_file_bytes(root):
    return {
        mode: sum(
            os.path.getsize(os.path.join(root, mode, name))
            for name in os.listdir(os.path.join(root, mode))
            if name.endswith(".h5")
        )
        for mode in MODES
    }


def measure(directory, dtype, backend):
    try:
        output = run_child(backend, "--child-load", directory, dtype)
    except RuntimeError as error:
        return None, str(error)
    idle, loaded, peak, seconds, held, modes = output.split()[-6:]
    return (int(idle), int(loaded), int(peak), float(seconds), int(held), modes), None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child-write", metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--child-load", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_write:
        return write_presets(args.child_write)
    if args.child_load:
        return load_and_report(*args.child_load)
    modes = args.modes.split(",")
    import keras

    print(
        f"# quantized_memory: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, keras {keras.__version__}, "
        f"python {platform.python_version()}; medians of {args.repeats} runs; "
        "GB = 1e9 bytes"
    )
    print(
        "| backend | preset (layer modes) | weights file GB | variables GB | "
        "idle GB | resident after load - idle GB | peak - idle GB | "
        "resident / float32's | peak / float32's | peak / float32 file | "
        "load s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        run_child("jax", "--child-write", root)
        sizes = weights_file_bytes(root)
        for backend in args.backends.split(","):
            float_row = None
            for mode in modes:
                dtype = "bfloat16" if mode == "bfloat16" else "-"
                runs, error = [], None
                for _ in range(args.repeats):
                    run, error = measure(os.path.join(root, mode), dtype, backend)
                    if run is None:
                        break
                    runs.append(run)
                if not runs:
                    print(f"| {backend} | {mode} | failed: {error} |")
                    continue
                idle, loaded, peak, seconds, held = (
                    float(np.median([run[i] for run in runs])) for i in range(5)
                )
                resident, high = loaded - idle, peak - idle
                if mode == "float32":
                    float_row = (resident, high)
                ratios = (
                    f"{resident / float_row[0]:.2f} | {high / float_row[1]:.2f}"
                    if float_row
                    else "- | -"
                )
                ratios += f" | {high / sizes['float32']:.2f}"
                print(
                    f"| {backend} | {mode} ({runs[0][5]}) | {sizes[mode] / 1e9:.3f} | "
                    f"{held / 1e9:.3f} | {idle / 1e9:.2f} | {resident / 1e9:.3f} | "
                    f"{high / 1e9:.3f} | {ratios} | {seconds:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
