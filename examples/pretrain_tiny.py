"""Pretrain a tiny Gemma 2 from scratch on the Python standard library.

Everything it needs is on every machine with Python, offline: the corpus is
the `.py` sources of the standard library this interpreter runs on (PSF
license), found at `os.path.dirname(os.__file__)`. The work is done by
`keras_gemma2.data`; the script

1. lists the corpus files and splits them into train and held-out parts BY
   FILE (`held_out_split`): a file is held out when int(SHA-256 of its
   relative path) mod 10000 is below 100 x `--held-out-percent` (a fixed
   rule: the same file lands in the same split on every machine; the file
   set varies with the Python version, which the metadata records);
2. trains a SentencePiece BPE vocabulary on the train files, laid out like
   Gemma's (`train_sentencepiece`): `<pad>`=0, `<eos>`=1, `<bos>`=2,
   `<unk>`=3, control pieces filling 4..105, `<start_of_turn>`=106,
   `<end_of_turn>`=107, byte fallback, digits split, whitespace kept (plus a
   `"\\n"` piece, since code is lines);
3. tokenizes each file with `Gemma2Tokenizer`, joins them as
   `<bos> file <eos> <bos> file <eos> ...` (`token_stream`) and trains a
   `Gemma2CausalLM` with `fit` on random windows of that stream
   (`random_windows`; the model runs without its preprocessor during
   training; the `Gemma2CausalLMPreprocessor` is attached before saving, so
   the preset generates from text);
4. saves the preset (`save_to_preset`) with the training facts added to its
   `metadata.json`, writes the loss curve as a PNG, and prints the held-out
   perplexity (`held_out_perplexity` on `sequential_windows`) of the saved
   model and of a count-based bigram model (`best_bigram_perplexity`: add-k
   smoothing, counts from the train split, same tokenizer; `k` is the best
   of a grid on the held-out windows, so the baseline is as strong as an
   add-k bigram gets).

The model has every Gemma 2 feature on: alternating local (sliding window
shorter than the training sequence) and global layers, attention and final
logit soft caps, grouped-query attention, four norms per block, tied
embedding.

The defaults are the shipped `gemma2_tiny_python` preset's settings (the
exact command is in its `metadata.json`; about 21 minutes on 2 shared CPU
cores with jax, most of it the 1000 training steps):

```
python examples/pretrain_tiny.py --backend jax --output build/pretrain_tiny \\
    --preset-dir keras_gemma2/presets/gemma2_tiny_python
```

A smoke run at toy sizes takes under a minute:

```
python examples/pretrain_tiny.py --steps 5 --hidden-dim 32 --vocabulary-size 512 \\
    --sequence-length 32 --sliding-window-size 8 --max-files 8 --eval-tokens 4096 \\
    --output /tmp/tiny
```

Needs `matplotlib` for the PNG (`pip install matplotlib`; it is in the
`test` extra).
"""

import argparse
import json
import math
import os
import shlex
import sys
import time

import numpy as np

# Top-level parts of the standard library directory left out of the corpus:
# installed third-party packages, the regression-test suite (large and full
# of deliberately odd code), codec tables and pydoc's generated topic dump.
EXCLUDED_TOP_LEVEL = ("site-packages", "dist-packages", "test", "encodings")
EXCLUDED_TOP_LEVEL_PREFIXES = ("config-", "pydoc_data")
# Gemma's special pieces, at Gemma's ids.
SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<start_of_turn>": 106,
    "<end_of_turn>": 107,
}
# Code is lines: a piece of its own for the line break (id 108).
EXTRA_PIECES = ("\n",)
PROMPT = "def fibonacci(n):"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--steps", type=int, default=1000, help="optimizer steps")
    add("--batch-size", type=int, default=8, help="windows per step")
    add("--sequence-length", type=int, default=256, help="tokens per window")
    add("--hidden-dim", type=int, default=192)
    add("--num-layers", type=int, default=4, help="alternating local/global")
    add("--intermediate-dim", type=int, default=None, help="default 8/3 hidden")
    add("--num-query-heads", type=int, default=4)
    add("--num-key-value-heads", type=int, default=2)
    add("--head-dim", type=int, default=None, help="default hidden / heads")
    add("--sliding-window-size", type=int, default=64)
    add("--vocabulary-size", type=int, default=4096)
    add("--learning-rate", type=float, default=1e-2, help="peak, AdamW")
    add("--warmup-steps", type=int, default=None, help="default steps / 20")
    add("--log-every", type=int, default=50, help="steps per loss-curve point")
    add("--held-out-percent", type=float, default=5.0)
    add("--max-files", type=int, default=None, help="cap files per split")
    add("--eval-tokens", type=int, default=131072, help="cap held-out tokens")
    add(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=os.environ.get("KERAS_BACKEND", "jax"),
        help="Keras backend (sets KERAS_BACKEND before keras is imported)",
    )
    add("--output", default="pretrain_tiny_output", help="output directory")
    add("--preset-dir", default=None, help="default OUTPUT/preset")
    add("--seed", type=int, default=0)
    add(
        "--sample-length",
        type=int,
        default=64,
        help="max_length of the greedy sample printed at the end; 0 skips it",
    )
    args = parser.parse_args(argv)
    for name in (
        "steps",
        "batch_size",
        "sequence_length",
        "hidden_dim",
        "num_layers",
        "num_query_heads",
        "num_key_value_heads",
        "sliding_window_size",
        "vocabulary_size",
        "log_every",
        "eval_tokens",
    ):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 < args.held_out_percent < 100:
        parser.error("--held-out-percent must be between 0 and 100")
    if args.vocabulary_size < 512:
        parser.error(
            "--vocabulary-size must be at least 512 (108 special pieces and 256 "
            f"byte pieces are reserved); received {args.vocabulary_size}"
        )
    if args.head_dim is None:
        args.head_dim = args.hidden_dim // args.num_query_heads
    if args.intermediate_dim is None:
        args.intermediate_dim = max(64, round(args.hidden_dim * 8 / 3 / 64) * 64)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 20)
    if args.preset_dir is None:
        args.preset_dir = os.path.join(args.output, "preset")
    return args


# === Corpus ===


def stdlib_root():
    """The directory of this interpreter's standard library."""
    return os.path.dirname(os.__file__)


def corpus_files(root):
    """Sorted relative POSIX paths of the standard library's `.py` files."""
    paths = []
    for directory, subdirectories, names in os.walk(root):
        relative = os.path.relpath(directory, root)
        if relative == ".":
            subdirectories[:] = [
                name
                for name in subdirectories
                if name not in EXCLUDED_TOP_LEVEL
                and not name.startswith(EXCLUDED_TOP_LEVEL_PREFIXES)
            ]
        subdirectories[:] = [n for n in subdirectories if n != "__pycache__"]
        for name in names:
            if name.endswith(".py"):
                path = os.path.normpath(os.path.join(relative, name))
                paths.append(path.replace(os.sep, "/"))
    return sorted(paths)


def split_corpus(root, held_out_percent, max_files=None):
    """`(train_paths, held_out_paths)`, each sorted, each capped at `max_files`."""
    from keras_gemma2.data import held_out_split

    train, held_out = held_out_split(corpus_files(root), held_out_percent)
    if max_files is not None:
        train, held_out = train[:max_files], held_out[:max_files]
    if not train or not held_out:
        raise ValueError(
            f"The corpus under {root} gave {len(train)} train and {len(held_out)} "
            "held-out files; both must be non-empty (raise --max-files or "
            "--held-out-percent)."
        )
    return train, held_out


def read_texts(root, paths):
    """File contents as strings (undecodable bytes replaced)."""
    texts = []
    for path in paths:
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


# === Outputs ===


def plot_loss_curve(path, curve, bigram_loss, title):
    """Write train/held-out loss per step, with the bigram's loss as a line."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "Writing the loss curve needs matplotlib: `pip install matplotlib`."
        ) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.2), dpi=110)
    steps = [point["step"] for point in curve]
    axes.plot(steps, [p["loss"] for p in curve], label="train (mean per interval)")
    axes.plot(
        steps,
        [p["held_out_loss"] for p in curve],
        "o-",
        ms=3,
        label="held-out (16 fixed windows)",
    )
    axes.axhline(bigram_loss, color="gray", ls="--", label="bigram, held-out")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats / token)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def write_json_atomically(path, value):
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(value, file, indent=2)
        file.write("\n")
    os.replace(temporary, path)


def directory_size(path):
    return sum(
        os.path.getsize(os.path.join(directory, name))
        for directory, _, names in os.walk(path)
        for name in names
    )


def reproduce_command(argv):
    """The command line that ran this script, as run from the repository root."""
    return " ".join(
        ["python", "examples/pretrain_tiny.py"] + [shlex.quote(a) for a in argv]
    )


# === Steps ===


def prepare_corpus(args):
    """Split and read the corpus, train the tokenizer, tokenize and window it."""
    from keras_gemma2 import Gemma2Tokenizer, data

    root = stdlib_root()
    train_paths, held_out_paths = split_corpus(
        root, args.held_out_percent, args.max_files
    )
    train_texts = read_texts(root, train_paths)
    held_out_texts = read_texts(root, held_out_paths)
    corpus_bytes = sum(len(t.encode("utf-8")) for t in train_texts + held_out_texts)
    print(
        f"corpus: {root} (Python {sys.version.split()[0]}): {len(train_paths)} train "
        f"/ {len(held_out_paths)} held-out files, {corpus_bytes / 1e6:.1f} MB"
    )
    proto = data.train_sentencepiece(
        train_texts,
        args.vocabulary_size,
        user_defined_pieces=data.GEMMA_TURN_PIECES + EXTRA_PIECES,
    )
    with open(os.path.join(args.output, "tokenizer.model"), "wb") as file:
        file.write(proto)
    tokenizer = Gemma2Tokenizer(proto=proto)
    for piece, expected in SPECIAL_IDS.items():
        if tokenizer.token_to_id(piece) != expected:
            raise RuntimeError(f"{piece} got id {tokenizer.token_to_id(piece)}")
    train_stream = data.token_stream(tokenizer, train_texts)
    held_out_stream = data.token_stream(tokenizer, held_out_texts)
    if len(train_stream) <= args.sequence_length + 1:
        raise ValueError(
            f"The train split has {len(train_stream)} tokens, too few for one "
            f"window of --sequence-length {args.sequence_length}."
        )
    held_out_windows = data.sequential_windows(
        held_out_stream, args.sequence_length, args.eval_tokens
    )
    return {
        "tokenizer": tokenizer,
        "train_files": len(train_paths),
        "held_out_files": len(held_out_paths),
        "bytes": corpus_bytes,
        "train_stream": train_stream,
        "held_out_tokens": len(held_out_stream),
        "held_out_windows": held_out_windows,
    }


def build_causal_lm(args, vocabulary_size):
    """A compiled `Gemma2CausalLM`: AdamW, warmup then cosine decay."""
    import keras

    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM

    backbone = Gemma2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=args.num_layers,
        num_query_heads=args.num_query_heads,
        num_key_value_heads=args.num_key_value_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim,
        head_dim=args.head_dim,
        sliding_window_size=args.sliding_window_size,
        dtype="float32",
    )
    causal_lm = Gemma2CausalLM(backbone)
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
    return causal_lm


def train(causal_lm, args, train_stream, held_out_windows):
    """Fit on random windows; return the loss curve, one point per interval.

    Each interval is one Keras "epoch", validated on a fixed, evenly spread
    subset of the held-out windows. `tf.data` feeds every Keras backend and
    is always installed with `keras_hub`.
    """
    import tensorflow as tf

    from keras_gemma2 import data

    windows = data.random_windows(
        train_stream, args.steps * args.batch_size, args.sequence_length, args.seed
    )
    train_batches = tf.data.Dataset.from_tensor_slices(
        data.window_inputs_and_labels(windows)
    ).batch(args.batch_size)
    picks = np.linspace(0, len(held_out_windows) - 1, min(16, len(held_out_windows)))
    validation = data.window_inputs_and_labels(
        held_out_windows[picks.round().astype(int)]
    )
    interval = min(args.log_every, args.steps)
    full_epochs, remainder = divmod(args.steps, interval)
    curve = []
    for epochs, steps_per_epoch, initial in (
        (full_epochs, interval, 0),
        (full_epochs + 1, remainder, full_epochs),
    ):
        if steps_per_epoch == 0 or epochs <= initial:
            continue
        # A new `fit` starts a new iterator: skip the batches already used.
        history = causal_lm.fit(
            train_batches.skip(initial * interval),
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            initial_epoch=initial,
            validation_data=validation,
            validation_batch_size=args.batch_size,
            verbose=1,
        )
        for loss, held_out_loss in zip(
            history.history["loss"], history.history["val_loss"], strict=True
        ):
            step = (curve[-1]["step"] if curve else 0) + steps_per_epoch
            curve.append({"step": step, "loss": loss, "held_out_loss": held_out_loss})
    return curve


def corpus_facts(args, corpus):
    """The `corpus` entry of the preset's metadata."""
    return {
        "description": (
            "The .py files of the Python standard library (excluding "
            f"{', '.join(EXCLUDED_TOP_LEVEL + EXCLUDED_TOP_LEVEL_PREFIXES)}), "
            "split into train and held-out BY FILE: held out when "
            "int(sha256(relative path)) % 10000 < held_out_percent * 100."
        ),
        "license": "PSF-2.0",
        "python_version": sys.version.split()[0],
        "held_out_percent": args.held_out_percent,
        "train_files": corpus["train_files"],
        "held_out_files": corpus["held_out_files"],
        "bytes": corpus["bytes"],
        "train_tokens": int(len(corpus["train_stream"])),
        "held_out_tokens": int(corpus["held_out_tokens"]),
    }


# === Main ===


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    started = time.time()

    import keras

    from keras_gemma2 import Gemma2CausalLM, Gemma2CausalLMPreprocessor, data

    if keras.config.backend() != args.backend:
        raise RuntimeError(
            f"keras was imported with backend {keras.config.backend()!r} before "
            f"--backend {args.backend} could take effect; run this as a script."
        )
    os.makedirs(args.output, exist_ok=True)
    keras.utils.set_random_seed(args.seed)

    corpus = prepare_corpus(args)
    tokenizer, held_out_windows = corpus["tokenizer"], corpus["held_out_windows"]
    held_out_tokens = held_out_windows.size - len(held_out_windows)
    print(
        f"tokenizer: {tokenizer.vocabulary_size()} pieces; tokens: "
        f"{len(corpus['train_stream']):,} train, {corpus['held_out_tokens']:,} "
        f"held-out ({held_out_tokens:,} scored); {time.time() - started:.0f}s"
    )
    causal_lm = build_causal_lm(args, tokenizer.vocabulary_size())
    print(
        f"model: {causal_lm.count_params():,} parameters, {args.num_layers} layers "
        f"(local window {args.sliding_window_size} / global), "
        f"{args.num_query_heads}/{args.num_key_value_heads} query/kv heads, "
        f"backend {args.backend}"
    )
    train_started = time.time()
    curve = train(causal_lm, args, corpus["train_stream"], held_out_windows)
    train_seconds = time.time() - train_started
    tokens_seen = args.steps * args.batch_size * args.sequence_length
    print(
        f"trained {args.steps} steps, {tokens_seen:,} tokens in {train_seconds:.0f}s "
        f"({tokens_seen / train_seconds:.0f} tokens/s)"
    )

    # --- Save the preset, reload it and score the saved model ---
    causal_lm.preprocessor = Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=args.sequence_length
    )
    causal_lm.save_to_preset(args.preset_dir, overwrite=True)
    saved = Gemma2CausalLM.from_preset(args.preset_dir)
    model_ppl = data.held_out_perplexity(saved, held_out_windows, args.batch_size)
    counts = data.count_bigrams(corpus["train_stream"], tokenizer.vocabulary_size())
    bigram_ppl, bigram_k = data.best_bigram_perplexity(counts, held_out_windows)
    print(
        f"held-out perplexity ({held_out_tokens:,} tokens, "
        f"{corpus['held_out_files']} files): model {model_ppl:.2f}, "
        f"bigram {bigram_ppl:.2f} (add-k, k={bigram_k:g})"
    )
    if args.sample_length > 0:
        saved.compile(sampler="greedy")
        sample = saved.generate(PROMPT, max_length=args.sample_length)
        print(f"greedy sample:\n{sample}\n")

    # --- Loss curve, metadata, results ---
    png = os.path.join(args.output, "loss_curve.png")
    plot_loss_curve(
        png,
        curve,
        math.log(bigram_ppl),
        f"Gemma 2, {causal_lm.count_params() / 1e6:.1f}M parameters, on the Python "
        f"{sys.version_info.major}.{sys.version_info.minor} standard library "
        f"({args.backend}, {args.steps} steps)",
    )
    total_seconds = time.time() - started
    facts = {
        "description": (
            "A tiny Gemma 2 trained from scratch by keras_gemma2's "
            "examples/pretrain_tiny.py on the Python standard library's "
            "sources. A demonstration and test model: it writes Python-looking "
            "text, it does not follow instructions or know facts."
        ),
        "license": "Apache-2.0",
        "corpus": corpus_facts(args, corpus),
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
            "tokens": int(held_out_tokens),
            "sequence_length": args.sequence_length,
        },
        "command": reproduce_command(argv),
    }
    metadata_path = os.path.join(args.preset_dir, "metadata.json")
    with open(metadata_path) as file:
        metadata = json.load(file)
    write_json_atomically(metadata_path, {**metadata, **facts})
    write_json_atomically(
        os.path.join(args.output, "results.json"), {**facts, "loss_curve": curve}
    )
    print(
        f"preset: {args.preset_dir} ({directory_size(args.preset_dir) / 1e6:.1f} MB)"
        f"\nloss curve: {png}\nwall time: {total_seconds:.0f}s"
    )
    return facts


if __name__ == "__main__":
    main()
