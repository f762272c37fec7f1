"""Pretrain a tiny Gemma 2 from scratch on the Python standard library.

Offline on any machine with Python: the corpus is the `.py` sources of the
standard library this interpreter runs on (PSF license). `main` is the
recipe, each step one or two `keras_gemma2.data` calls:

1. split the files BY FILE into train and held-out parts (a fixed rule on
   each relative path's SHA-256, the same on every machine; the file set
   varies with the Python version, which the metadata records);
2. train a SentencePiece vocabulary laid out like Gemma's on the train
   files, plus a `"\\n"` piece (code is lines), and tokenize each part into
   one `<bos> file <eos> <bos> file <eos> ...` stream;
3. fit a `Gemma2CausalLM` with every Gemma 2 feature on (alternating local
   and global layers, soft caps, grouped-query attention) on random windows
   of the train stream, with the held-out loss on 16 fixed windows at every
   point of the loss curve;
4. save the preset with its preprocessor and print the held-out perplexity
   of the saved model and of the best add-k bigram counted on the train split;
5. draw `loss_curve.png` (needs `matplotlib`, in the `test` extra) and add
   the training facts to the preset's `metadata.json` and `results.json`.

The defaults are the shipped `gemma2_tiny_python` preset's settings (the
exact command is in its `metadata.json`; about 21 minutes on 2 shared CPU
cores with jax). A smoke run at toy sizes takes under a minute:

```
python examples/pretrain_tiny.py --steps 5 --hidden-dim 32 --vocabulary-size 512 \\
    --sequence-length 32 --sliding-window-size 8 --max-files 8 --eval-tokens 4096 \\
    --output /tmp/tiny
```
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

# Left out of the corpus: installed packages, the regression-test suite (large
# and full of deliberately odd code), codec tables, pydoc's generated topics.
EXCLUDED = "site-packages dist-packages test encodings config-* pydoc_data".split()
# Command-line options that are `Gemma2Backbone` arguments of the same name.
BACKBONE_OPTIONS = (
    "num_layers num_query_heads num_key_value_heads hidden_dim intermediate_dim "
    "head_dim sliding_window_size"
).split()
VALIDATION_WINDOWS = 16
PROMPT = "def fibonacci(n):"
DESCRIPTION = (
    "A tiny Gemma 2 trained from scratch by keras_gemma2's examples/pretrain_tiny.py "
    "on the Python standard library's sources. A demonstration and test model: it "
    "writes Python-looking text, it does not follow instructions or know facts."
)
CORPUS_DESCRIPTION = (
    "The .py files of the Python standard library (excluding "
    f"{', '.join(EXCLUDED).replace('*', '')}), split into train and held-out BY "
    "FILE: held out when int(sha256(relative path)) % 10000 < held_out_percent * 100."
)


def parse_args(argv):
    def positive(text):
        if int(text) <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, received {text}")
        return int(text)

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--steps", type=positive, default=1000, help="optimizer steps")
    add("--batch-size", type=positive, default=8, help="windows per step")
    add("--sequence-length", type=positive, default=256, help="tokens per window")
    add("--hidden-dim", type=positive, default=192)
    add("--num-layers", type=positive, default=4, help="alternating local/global")
    add("--intermediate-dim", type=positive, default=None, help="default 8/3 hidden")
    add("--num-query-heads", type=positive, default=4)
    add("--num-key-value-heads", type=positive, default=2)
    add("--head-dim", type=positive, default=None, help="default hidden / heads")
    add("--sliding-window-size", type=positive, default=64)
    add("--vocabulary-size", type=positive, default=4096, help="at least 512")
    add("--learning-rate", type=float, default=1e-2, help="peak, AdamW")
    add("--warmup-steps", type=int, default=None, help="default steps / 20")
    add("--log-every", type=positive, default=50, help="steps per loss-curve point")
    add("--held-out-percent", type=float, default=5.0)
    add("--max-files", type=positive, default=None, help="cap files per split")
    add("--eval-tokens", type=positive, default=131072, help="cap held-out tokens")
    backend = os.environ.get("KERAS_BACKEND", "jax")
    add("--backend", choices=("jax", "tensorflow", "torch"), default=backend)
    add("--output", default="pretrain_tiny_output", help="output directory")
    add("--preset-dir", default=None, help="default OUTPUT/preset")
    add("--seed", type=int, default=0)
    add("--sample-length", type=int, default=64, help="greedy sample; 0 skips it")
    args = parser.parse_args(argv)
    if args.vocabulary_size < 512:  # 108 special and 256 byte pieces reserved
        parser.error(f"--vocabulary-size must be at least 512: {args.vocabulary_size}")
    args.head_dim = args.head_dim or args.hidden_dim // args.num_query_heads
    intermediate_dim = max(64, round(args.hidden_dim * 8 / 3 / 64) * 64)
    args.intermediate_dim = args.intermediate_dim or intermediate_dim
    if args.warmup_steps is None:  # 0 is a valid choice: no warmup
        args.warmup_steps = max(1, args.steps // 20)
    args.preset_dir = args.preset_dir or os.path.join(args.output, "preset")
    return args


def plot_loss_curve(path, curve, bigram_loss, title):
    """Write train/held-out loss per step, with the bigram's loss as a line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.2), dpi=110)
    steps = [point["step"] for point in curve]
    axes.plot(steps, [p["loss"] for p in curve], label="train (mean per interval)")
    held_out = f"held-out ({VALIDATION_WINDOWS} fixed windows)"
    axes.plot(steps, [p["held_out_loss"] for p in curve], "o-", ms=3, label=held_out)
    axes.axhline(bigram_loss, color="gray", ls="--", label="bigram, held-out")
    axes.set(xlabel="optimizer step", ylabel="cross-entropy (nats / token)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend  # before keras is imported
    started = time.time()
    import keras

    from keras_gemma2 import data, models, training
    from keras_gemma2.checkpoints.atomic import atomic_write_json

    if keras.config.backend() != args.backend:
        raise RuntimeError(
            f"keras was imported with backend {keras.config.backend()!r} before "
            f"--backend {args.backend} could take effect; run this as a script."
        )
    os.makedirs(args.output, exist_ok=True)
    keras.utils.set_random_seed(args.seed)

    # === 1. The corpus, split by file ===
    root = os.path.dirname(os.__file__)
    paths = data.list_text_files(root, ".py", exclude=EXCLUDED)
    splits = data.held_out_split(paths, args.held_out_percent)
    train_paths, held_out_paths = (split[: args.max_files] for split in splits)
    train_texts = data.read_text_files(root, train_paths)
    held_out_texts = data.read_text_files(root, held_out_paths)
    corpus_bytes = sum(len(t.encode("utf-8")) for t in train_texts + held_out_texts)
    python = sys.version.split()[0]
    print(
        f"corpus: {root} (Python {python}): {len(train_paths)} train / "
        f"{len(held_out_paths)} held-out files, {corpus_bytes / 1e6:.1f} MB"
    )

    # === 2. Tokenizer and token streams ===
    pieces = data.GEMMA_TURN_PIECES + ("\n",)
    proto = data.train_sentencepiece(
        train_texts, args.vocabulary_size, user_defined_pieces=pieces
    )
    Path(args.output, "tokenizer.model").write_bytes(proto)
    tokenizer = models.Gemma2Tokenizer(proto=proto)
    vocabulary_size = tokenizer.vocabulary_size()
    train_stream = data.token_stream(tokenizer, train_texts)
    held_out_stream = data.token_stream(tokenizer, held_out_texts)
    held_out_windows = data.sequential_windows(
        held_out_stream, args.sequence_length, args.eval_tokens
    )
    scored_tokens = held_out_windows.size - len(held_out_windows)
    print(
        f"tokenizer: {vocabulary_size} pieces; tokens: {len(train_stream):,} train, "
        f"{len(held_out_stream):,} held-out ({scored_tokens:,} scored); "
        f"{time.time() - started:.0f}s"
    )

    # === 3. Fit on random windows: AdamW, warmup then cosine decay ===
    backbone_arguments = {name: getattr(args, name) for name in BACKBONE_OPTIONS}
    causal_lm = models.Gemma2CausalLM(
        models.Gemma2Backbone(
            vocabulary_size=vocabulary_size, **backbone_arguments, dtype="float32"
        )
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=args.learning_rate,
        warmup_steps=args.warmup_steps,
        decay_steps=max(1, args.steps - args.warmup_steps),
        alpha=0.1,
    )
    causal_lm.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=schedule, weight_decay=0.01, beta_2=0.95, global_clipnorm=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        sampler="greedy",
    )
    parameters = causal_lm.count_params()
    print(
        f"model: {parameters:,} parameters, {args.num_layers} layers (local window "
        f"{args.sliding_window_size} / global), {args.num_query_heads}/"
        f"{args.num_key_value_heads} query/kv heads, backend {args.backend}"
    )
    train_started = time.time()
    windows = data.random_windows(
        train_stream, args.steps * args.batch_size, args.sequence_length, args.seed
    )
    count = min(VALIDATION_WINDOWS, len(held_out_windows))
    picks = np.linspace(0, len(held_out_windows) - 1, count).round().astype(int)
    curve = training.fit_on_windows(
        causal_lm, windows, args.batch_size, args.log_every, held_out_windows[picks]
    )
    train_seconds = time.time() - train_started
    tokens_seen = args.steps * args.batch_size * args.sequence_length
    print(
        f"trained {args.steps} steps, {tokens_seen:,} tokens in {train_seconds:.0f}s "
        f"({tokens_seen / train_seconds:.0f} tokens/s)"
    )

    # === 4. Save the preset, reload it, score it and the bigram ===
    causal_lm.preprocessor = models.Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=args.sequence_length
    )
    causal_lm.save_to_preset(args.preset_dir, overwrite=True)
    saved = models.Gemma2CausalLM.from_preset(args.preset_dir)
    model_ppl = data.held_out_perplexity(saved, held_out_windows, args.batch_size)
    counts = data.count_bigrams(train_stream, vocabulary_size)
    bigram_ppl, bigram_k = data.best_bigram_perplexity(counts, held_out_windows)
    print(
        f"held-out perplexity ({scored_tokens:,} tokens, {len(held_out_paths)} files)"
        f": model {model_ppl:.2f}, bigram {bigram_ppl:.2f} (add-k, k={bigram_k:g})"
    )
    if args.sample_length > 0:
        saved.compile(sampler="greedy")
        sample = saved.generate(PROMPT, max_length=args.sample_length)
        print(f"greedy sample:\n{sample}\n")

    # === 5. Loss curve, metadata, results ===
    png = os.path.join(args.output, "loss_curve.png")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    title = f"Gemma 2, {parameters / 1e6:.1f}M parameters, on the Python {version} "
    title += f"standard library ({args.backend}, {args.steps} steps)"
    plot_loss_curve(png, curve, math.log(bigram_ppl), title)
    total_seconds = time.time() - started
    facts = {
        "description": DESCRIPTION,
        "license": "Apache-2.0",
        "corpus": {
            "description": CORPUS_DESCRIPTION,
            "license": "PSF-2.0",
            "python_version": python,
            "held_out_percent": args.held_out_percent,
            "train_files": len(train_paths),
            "held_out_files": len(held_out_paths),
            "bytes": corpus_bytes,
            "train_tokens": len(train_stream),
            "held_out_tokens": len(held_out_stream),
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "sequence_length": args.sequence_length,
            "tokens_seen": tokens_seen,
            "learning_rate": args.learning_rate,
            "warmup_steps": args.warmup_steps,
            "seed": args.seed,
            "backend": args.backend,
            "train_seconds": round(train_seconds, 1),
            "wall_time_seconds": round(total_seconds, 1),
            "machine": f"{os.cpu_count()} CPU cores",
        },
        "held_out_perplexity": {
            "model": round(model_ppl, 3),
            "bigram": round(bigram_ppl, 3),
            "bigram_k": bigram_k,
            "tokens": scored_tokens,
            "sequence_length": args.sequence_length,
        },
        "command": shlex.join(["python", "examples/pretrain_tiny.py", *argv]),
    }
    metadata = json.loads(Path(args.preset_dir, "metadata.json").read_text())
    atomic_write_json(Path(args.preset_dir, "metadata.json"), {**metadata, **facts})
    results = {**facts, "loss_curve": curve}
    atomic_write_json(Path(args.output, "results.json"), results)
    files = [f for f in Path(args.preset_dir).rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    print(
        f"preset: {args.preset_dir} ({size / 1e6:.1f} MB)\nloss curve: {png}\n"
        f"wall time: {total_seconds:.0f}s"
    )
    return facts


if __name__ == "__main__":
    main()
