"""Distillation step time: online teacher vs a stored top-k teacher, and store size.

Usage: `python benchmarks/distill.py [--backends jax,tensorflow,torch]
[--ks 8,32,128] [--steps 6] [--batch-size 8] [--sequence-length 256]`

Teacher: the shipped `gemma2_tiny_python` (2.4M parameters, vocabulary
4096). Student: 2 layers, hidden 96 (about a quarter of the teacher).
Data: random token windows. Per backend, one fresh process runs `fit` of a
`Gemma2Distiller` for `--steps` steps three ways, each after one step that
compiles: online full-distribution KL, online top-k (`top_k=K`, the largest
K), and from a store written by `write_teacher_store` with the same K (no
teacher in the step). It prints the median step times, the stored/online
ratio, and the store's bytes per token for each K.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(args):
    import keras
    import numpy as np

    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
    from keras_gemma2.training import (
        Gemma2Distiller,
        read_teacher_store,
        store_bytes_per_token,
        write_teacher_store,
    )

    teacher = Gemma2CausalLM.from_preset("gemma2_tiny_python")
    vocabulary = teacher.backbone.vocabulary_size
    rows = args.batch_size * (args.steps + 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocabulary, (rows, args.sequence_length + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y, weights = ids[:, 1:], np.ones(ids[:, 1:].shape, "float32")

    def student():
        keras.utils.set_random_seed(0)
        backbone = Gemma2Backbone(
            vocabulary_size=vocabulary,
            num_layers=2,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=96,
            intermediate_dim=256,
            head_dim=48,
            sliding_window_size=64,
        )
        return Gemma2CausalLM(backbone, teacher.preprocessor)

    def step_seconds(distiller, data):
        times = []

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                times.append(time.perf_counter() - self.start)

        distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
        distiller.fit(
            *data[:2],
            sample_weight=data[2],
            batch_size=args.batch_size,
            shuffle=False,
            verbose=0,
            callbacks=[Timer()],
        )
        return statistics.median(times[1:])

    k = max(args.ks)
    result = {
        "online_s": step_seconds(Gemma2Distiller(teacher, student()), (x, y, weights)),
        "online_topk_s": step_seconds(
            Gemma2Distiller(teacher, student(), top_k=k), (x, y, weights)
        ),
        "bytes_per_token": {},
    }
    with tempfile.TemporaryDirectory() as directory:
        for each in args.ks:
            store = os.path.join(directory, f"k{each}")
            write_teacher_store(teacher, x, store, k=each, y=y, sample_weight=weights)
            result["bytes_per_token"][each] = store_bytes_per_token(store)
        stored = read_teacher_store(os.path.join(directory, f"k{k}"), teacher=teacher)
        result["stored_s"] = step_seconds(Gemma2Distiller(None, student()), stored)
    result["k"] = k
    print(json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--ks", default="8,32,128")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    if args.child:
        return child(args)
    print(
        f"# distill: teacher gemma2_tiny_python, student 2 layers / hidden 96; "
        f"batch {args.batch_size} x {args.sequence_length} tokens, median of "
        f"{args.steps} steps after the first"
    )
    print("| backend | online s | online top-k s | stored top-k s | stored / online |")
    print("|---|---|---|---|---|")
    sizes = None
    for backend in args.backends.split(","):
        command = [sys.executable, __file__, "--child"] + [
            f"--ks={','.join(map(str, args.ks))}",
            f"--steps={args.steps}",
            f"--batch-size={args.batch_size}",
            f"--sequence-length={args.sequence_length}",
        ]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"| {backend} | failed: {done.stderr.strip().splitlines()[-1]} |")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {backend} | {row['online_s']:.3f} | {row['online_topk_s']:.3f} | "
            f"{row['stored_s']:.3f} | {row['stored_s'] / row['online_s']:.2f} |",
            flush=True,
        )
        sizes = row["bytes_per_token"]
    if sizes:
        print("\n| k | store bytes per token |\n|---|---|")
        for k, size in sizes.items():
            print(f"| {k} | {size:.1f} |")


if __name__ == "__main__":
    main()
