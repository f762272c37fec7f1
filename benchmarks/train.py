"""Training memory and step time at long context: ours vs KerasHub `GemmaCausalLM`.

Usage: `python benchmarks/train.py [--backends jax,tensorflow,torch]
[--lengths 2048,4096] [--variants lora,full] [--remat off,on]
[--models ours,keras_hub] [--repeats 2] [--max-gb 14] [--skip ...]`

Mid config: vocabulary 32000, 8 layers (4 local, 4 global), hidden 512, 8/4
heads, head_dim 64, intermediate 2048 per branch, window 256; batch 1,
float32, randomly initialised. KerasHub's model is `GemmaCausalLM` on a
`GemmaBackbone` with its Gemma 2 options on (post-attention and post-ffw
norms, both soft caps, sliding windows on alternate layers,
`query_head_dim_normalize`), the same sizes. Each row runs `fit` on random
token ids (`<bos>` first) with `keras.optimizers.Adam(1e-4)` and
`SparseCategoricalCrossentropy(from_logits=True)`: one step that compiles
and then `--repeats` timed steps.

Variants: `lora` is `backbone.enable_lora(4)` (KerasHub's default targets,
query and value, in both models); `full` trains every weight. `remat on`
is ours with `Gemma2Backbone(remat=True)` and, for KerasHub, its decoder
blocks built under `keras.RematScope(mode="list_of_layers", ...)` (its
`mode="full"` fails on jax and tensorflow).

Memory: every row runs in a fresh process. "idle GB" is the resident set
after building the model and compiling it for training (`compile`, not yet
traced); then the kernel's peak mark is reset and "peak GB" is the highest
resident set over idle during `fit`: tracing and XLA compilation, the
forward, the backward and the Adam update. The parent watches each child's
resident set and kills it past `--max-gb` (the machine is shared), reported
as "killed > N GB".

Jax rows run with
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` (both
models): XLA's default CPU scheduler overlaps the rematerialized forward
passes and keeps every block's activations alive, so remat saves nothing
without it (`--keep-xla-scheduler` runs the default to show that).

"step s" is the median of the timed steps. The machine may be shared with
other work: step times are noisy; compare ratios of rows run back to back.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill import (  # noqa: E402
    MID,
    keras_hub_gemma2_backbone,
    machine,
    peak_gb,
    start_peak,
    token_ids,
    versions,
)

CONFIG = {**MID, "sliding_window_size": 256}
JAX_CPU_REMAT_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def build(model, remat):
    """The task model of `model` (`"ours"` or `"keras_hub"`), float32."""
    import keras

    keras.utils.set_random_seed(0)
    if model == "ours":
        from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM

        return Gemma2CausalLM(Gemma2Backbone(**CONFIG, remat=remat))
    import keras_hub

    names = [f"decoder_block_{i}" for i in range(CONFIG["num_layers"])]
    mode = "list_of_layers" if remat else None
    with keras.RematScope(mode=mode, layer_names=names):
        backbone = keras_hub_gemma2_backbone(CONFIG)
    return keras_hub.models.GemmaCausalLM(backbone)


def child(args):
    import keras
    import numpy as np

    causal_lm = build(args.model, args.remat == "on")
    if args.variant == "lora":
        causal_lm.backbone.enable_lora(4)
    causal_lm.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    steps = 1 + args.repeats
    ids = np.concatenate([token_ids(args.length + 1)] * steps)
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y = ids[:, 1:]

    times, losses = [], []

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)
            losses.append(float(logs["loss"]))

    idle = start_peak()
    causal_lm.fit(
        x, y, batch_size=1, epochs=1, verbose=0, shuffle=False, callbacks=[StepTimes()]
    )
    trainable = sum(int(np.prod(v.shape)) for v in causal_lm.trainable_weights)
    print(
        json.dumps(
            {
                "idle_gb": idle,
                "peak_gb": peak_gb() - idle,
                "first_step_s": times[0],
                "step_s": statistics.median(times[1:] or times),
                "loss": losses[0],
                "trainable": trainable,
            }
        ),
        flush=True,
    )


def run_child(args, backend, length, variant, remat, model):
    """One row in a fresh process, killed past `args.max_gb`; a dict."""
    import psutil

    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if backend == "jax" and not args.keep_xla_scheduler:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {JAX_CPU_REMAT_FLAG}".strip()
    command = [sys.executable, __file__, "--child", "--length", str(length)]
    command += ["--variant", variant, "--remat", remat, "--model", model]
    command += ["--repeats", str(args.repeats)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    watched = psutil.Process(process.pid)
    start, error = time.time(), None
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss / 1e9
        except psutil.NoSuchProcess:
            break
        if rss > args.max_gb:
            error = f"killed > {args.max_gb:g} GB"
        elif time.time() - start > args.timeout:
            error = f"killed > {args.timeout} s"
        if error:
            process.kill()
            break
        time.sleep(0.2)
    out, err = process.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if error is None and process.returncode == 0 and lines:
        return json.loads(lines[-1])
    if error is None:
        error = f"rc {process.returncode}: {_error_message(err)}"
    return {"error": error[:160]}


def _error_message(stderr):
    """The exception line of a traceback and the message after it."""
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", stderr)  # terminal colours
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        if "Error:" in lines[index] or "Exception:" in lines[index]:
            return " ".join(lines[index : index + 2]).replace("|", "/")
    return (lines or ["?"])[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--variants", default="lora,full")
    parser.add_argument("--remat", default="off,on")
    parser.add_argument("--models", default="ours,keras_hub")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=14.0)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument(
        "--skip",
        default="",
        help="rows not to run, comma-separated backend:length:variant:remat:model "
        "with * as a wildcard, e.g. jax:4096:full:off:keras_hub",
    )
    parser.add_argument("--keep-xla-scheduler", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    skips = [rule.split(":") for rule in args.skip.split(",") if rule]

    def skipped(*row):
        return any(
            all(
                part in ("*", str(value))
                for part, value in zip(rule, row, strict=False)
            )
            for rule in skips
        )

    print(f"# train: {machine()}; batch 1, float32, mid config, window 256")
    print(
        "| backend | T | variant | remat | ours peak GB | KerasHub peak GB | ratio "
        "| ours step s | KerasHub step s | ratio | ours / KerasHub loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        print(f"# {backend}: {versions(backend)}", flush=True)
        for length in map(int, args.lengths.split(",")):
            for variant in args.variants.split(","):
                for remat in args.remat.split(","):
                    rows = {}
                    for model in args.models.split(","):
                        if skipped(backend, length, variant, remat, model):
                            rows[model] = {"error": "skipped"}
                            continue
                        rows[model] = run_child(
                            args, backend, length, variant, remat, model
                        )
                        row = (backend, length, variant, remat, model, rows[model])
                        print("#", json.dumps(row), flush=True)
                    print(_row(backend, length, variant, remat, rows), flush=True)


def _row(backend, length, variant, remat, rows):
    ours, hub = rows.get("ours", {"error": "-"}), rows.get("keras_hub", {"error": "-"})

    def cell(row, key):
        return row["error"] if "error" in row else f"{row[key]:.2f}"

    def ratio(key):
        if "error" in ours or "error" in hub:
            return ""
        return f"{ours[key] / hub[key]:.2f}"

    losses = " / ".join(
        f"{row['loss']:.3f}" if "error" not in row else "-" for row in (ours, hub)
    )
    return (
        f"| {backend} | {length} | {variant} | {remat} | {cell(ours, 'peak_gb')} "
        f"| {cell(hub, 'peak_gb')} | {ratio('peak_gb')} | {cell(ours, 'step_s')} "
        f"| {cell(hub, 'step_s')} | {ratio('step_s')} | {losses} |"
    )


if __name__ == "__main__":
    main()
