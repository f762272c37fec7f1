"""Long-context training on CPU: `fit` steps of the mid config at 4096 tokens.

Usage: `python benchmarks/train_long_context.py --backend torch
[--length 4096] [--steps 2] [--implementations auto,reference]`

The mid config of `benchmarks/prefill.py` (vocabulary 32000, 8 layers, hidden
512, 8/4 heads, head_dim 64, intermediate 2048 per branch, window 512),
randomly initialised, float32, batch 1, AdamW, next-token cross-entropy on
random token ids. Each implementation runs in a fresh process: "peak GB" is
the highest resident set during `fit` (the peak mark is reset after the model
is built, see `prefill.start_peak`), "first step s" includes compilation and
"step s" is the median of the later steps (with `--steps 1`, the first step).
`"auto"` runs the blocked kernels: O(T * window) logits on the local layers
and causal query blocks (half the logits) on the global ones, in the forward
and in what the backward keeps; `"reference"` builds the full `[T, T]`
logits on every layer.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill import MID, machine, peak_gb, start_peak, versions  # noqa: E402


def child(length, steps, implementation):
    import keras
    import numpy as np

    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM

    keras.utils.set_random_seed(0)
    causal_lm = Gemma2CausalLM(
        Gemma2Backbone(**MID, attention_implementation=implementation)
    )
    causal_lm.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(3, MID["vocabulary_size"], (steps, length + 1)).astype("int32")
    ids[:, 0] = 2
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y = ids[:, 1:]

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)
            losses.append(float(logs["loss"]))

    times, losses = [], []
    load = start_peak()
    causal_lm.fit(
        x, y, batch_size=1, epochs=1, verbose=0, shuffle=False, callbacks=[StepTimes()]
    )
    print(
        json.dumps(
            {
                "backend": keras.config.backend(),
                "implementation": implementation,
                "length": length,
                "load_gb": load,
                "peak_gb": peak_gb(),
                "first_step_s": times[0],
                "step_s": statistics.median(times[1:] or times),
                "loss": losses[-1],
            }
        ),
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--implementations", default="auto,reference")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.length, args.steps, args.implementations)
        return
    rows = []
    for implementation in args.implementations.split(","):
        env = {**os.environ, "KERAS_BACKEND": args.backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [
            sys.executable,
            __file__,
            "--child",
            "--length",
            str(args.length),
            "--steps",
            str(args.steps),
            "--implementations",
            implementation,
        ]
        try:
            process = subprocess.run(
                command, capture_output=True, text=True, env=env, timeout=args.timeout
            )
            out = process.stdout.splitlines()
            lines = [line for line in out if line.startswith("{")]
            if process.returncode == 0 and lines:
                rows.append(json.loads(lines[-1]))
                continue
            error = (process.stderr.strip().splitlines() or ["?"])[-1][:120]
            error = f"rc {process.returncode}: {error}"
        except subprocess.TimeoutExpired:
            error = f"timeout {args.timeout}s"
        rows.append({"implementation": implementation, "error": error})
    print(f"# train_long_context: {machine()}")
    print(f"# {args.backend}: {versions(args.backend)}; T={args.length}, batch 1")
    print("| implementation | first step s | step s | load GB | peak GB | loss |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['implementation']} | {row['error']} | | | | |")
            continue
        print(
            f"| {row['implementation']} | {row['first_step_s']:.1f} | "
            f"{row['step_s']:.1f} | {row['load_gb']:.2f} | {row['peak_gb']:.2f} | "
            f"{row['loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
