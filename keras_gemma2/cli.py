"""`keras-gemma2` command line: run, chat, convert, finetune, distill."""

import argparse
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import sys
import time
import types

EXAMPLES = """examples:
  keras-gemma2 run gemma2_tiny_python "def fibonacci(n):"
  keras-gemma2 run ./gemma-2-2b "The capital of France is" --max-new-tokens 20
  keras-gemma2 chat ./gemma-2-2b-it --temperature 0.7 --backend jax
  keras-gemma2 convert ./gemma-2-2b ./gemma2_2b_keras --to keras --dtype bfloat16
  keras-gemma2 convert ./gemma2_2b_keras ./gemma-2-2b-hf --to transformers
  keras-gemma2 convert kaggle://keras/gemma2/keras/gemma2_2b_en/1 ./hf --to transformers
  keras-gemma2 convert ./gemma-2-2b ./gemma2_2b_keras_hub --to keras_hub
  keras-gemma2 convert ./gemma-2-2b-it ./gemma2-it/gemma2-it.gguf --to gguf --type q8_0
  keras-gemma2 finetune gemma2_tiny_python data.jsonl --out ./tuned --epochs 3
  keras-gemma2 finetune ./gemma-2-2b chats.jsonl --out ./tuned --quantize int8
  keras-gemma2 distill gemma2_tiny_python student.json data.jsonl --out ./student
"""
DISTILL_DATA = """TEACHER is a preset; STUDENT is a preset or a .json file of
Gemma2Backbone arguments (vocabulary_size defaults to the teacher's), e.g.
  {"num_layers": 2, "num_query_heads": 2, "num_key_value_heads": 1,
   "hidden_dim": 96, "intermediate_dim": 256, "head_dim": 48,
   "sliding_window_size": 64}
DATA is a JSONL file of prompt/response or chat rows, as for `finetune`: the
student learns the teacher's next-token distributions on the response tokens.

OUT is the student as a preset for `keras-gemma2 run OUT`; OUT/distill.json
records the settings and the student's response loss before and after.
"""
FINETUNE_DATA = """DATA is a JSONL file, one row a line, all rows of one kind:
  {"prompt": "...", "response": "..."}                 loss on the response only
  {"messages": [{"role": "user", "content": "..."},
                {"role": "model", "content": "..."}]}  loss on every model turn
A chat ends with the model's turn ("assistant" is accepted for "model").

OUT is a preset for `keras-gemma2 run OUT` and `Gemma2CausalLM.from_preset(OUT)`:
the base weights with the LoRA adapter merged in, in the base's float dtype (after
--quantize the float base is reloaded and the adapter merged into it). With
--keep-adapters it holds the unmerged base plus adapter.lora.h5, which
`keras-gemma2 run OUT` applies and `causal_lm.backbone.load_lora_weights(...)`
loads. OUT/finetune.json records the settings and the response loss before and
after training (on --eval rows, else on the training rows).
"""


def build_parser():
    """The argument parser of `keras-gemma2`."""
    parser = argparse.ArgumentParser(
        prog="keras-gemma2",
        description="Gemma 2 in Keras 3 on JAX, TensorFlow and PyTorch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="stream a completion of PROMPT",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("preset", help="preset name, preset/checkpoint dir or handle")
    run.add_argument("prompt", help="text to complete")
    chat = commands.add_parser(
        "chat",
        help="talk with an instruction model in Gemma's turn format",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("preset", help="preset name, preset/checkpoint dir or handle")
    for command in (run, chat):
        command.add_argument("--max-new-tokens", type=int, default=128)
        command.add_argument(
            "--temperature", type=float, default=0.8, help="0 means greedy"
        )
        command.add_argument("--top-k", type=int, default=40)
        command.add_argument(
            "--top-p", type=float, default=None, help="nucleus sampling instead"
        )
        command.add_argument("--seed", type=int, default=None)
        command.add_argument(
            "--backend", choices=("jax", "tensorflow", "torch"), default=None
        )
        command.add_argument(
            "--no-compile-cache",
            action="store_true",
            help="compile afresh instead of reusing the backend's compiled "
            f"programs from earlier runs (kept in {compile_cache_directory()})",
        )
    chat.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="tokens of history kept, answer included (default and most: 8192); "
        "the oldest turns are dropped past it",
    )
    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint to a keras_gemma2 preset, a transformers dir, "
        "a KerasHub preset or a GGUF file (llama.cpp, Ollama)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument(
        "source", help="HF checkpoint dir, KerasHub/keras_gemma2 preset dir or handle"
    )
    convert.add_argument(
        "destination", help="directory (or .gguf file) to write (must not exist)"
    )
    convert.add_argument(
        "--to",
        choices=("keras", "transformers", "keras_hub", "gguf"),
        required=True,
        help="output format: a keras_gemma2 preset, a transformers directory, a "
        "KerasHub GemmaCausalLM preset (2B/9B-style models; the 27B's query "
        "scaling is refused), or a GGUF file for llama.cpp with an Ollama "
        "Modelfile beside it",
    )
    convert.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="dtype of the loaded (and, but for gguf, written) weights (default: "
        "bfloat16; for --to gguf float32, or bfloat16 with --type bf16)",
    )
    convert.add_argument(
        "--type",
        choices=gguf_types(),
        default=None,
        help="--to gguf only: type of the GGUF matrices; norms stay f32 (default: f32)",
    )
    convert.add_argument(
        "--no-modelfile",
        action="store_true",
        help="--to gguf only: do not write an Ollama Modelfile beside the file",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace an existing destination"
    )
    convert.add_argument(
        "--max-shard-gb",
        type=float,
        default=5.0,
        help="split weight files past this size in GB (default: 5)",
    )
    finetune = commands.add_parser(
        "finetune",
        help="LoRA fine-tune a preset on JSONL prompt/response or chat rows",
        description=FINETUNE_DATA,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_argument("preset", help="preset name, preset/checkpoint dir or handle")
    finetune.add_argument("data", help="JSONL file of training rows")
    finetune.add_argument("--out", required=True, help="preset directory to write")
    finetune.add_argument(
        "--eval", default=None, help="JSONL of held-out rows for the loss report"
    )
    finetune.add_argument("--lora-rank", type=int, default=4)
    finetune.add_argument(
        "--lora-targets",
        default=None,
        help='"all" or comma-separated layer names (default: query and value)',
    )
    finetune.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=None,
        help="quantize the base for training (QLoRA)",
    )
    finetune.add_argument("--epochs", type=int, default=1)
    finetune.add_argument("--batch-size", type=int, default=4)
    finetune.add_argument("--learning-rate", type=float, default=1e-4)
    finetune.add_argument(
        "--sequence-length",
        type=int,
        default=None,
        help="packed length (default: the preset preprocessor's)",
    )
    finetune.add_argument(
        "--keep-adapters",
        action="store_true",
        help="save the adapter beside the unmerged base instead of merging",
    )
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out"
    )
    finetune.add_argument(
        "--backend", choices=("jax", "tensorflow", "torch"), default=None
    )
    distill = commands.add_parser(
        "distill",
        help="distil a teacher preset into a student on JSONL rows",
        description=DISTILL_DATA,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    distill.add_argument("teacher", help="teacher preset name, directory or handle")
    distill.add_argument("student", help="student preset, or a .json backbone config")
    distill.add_argument("data", help="JSONL file of training rows")
    distill.add_argument("--out", required=True, help="preset directory to write")
    distill.add_argument(
        "--eval", default=None, help="JSONL of held-out rows for the loss report"
    )
    distill.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="distil from the teacher's K most likely tokens only (default: all)",
    )
    distill.add_argument("--temperature", type=float, default=1.0)
    distill.add_argument(
        "--alpha",
        type=float,
        default=0.0,
        help="weight of the next-token cross-entropy (default: 0)",
    )
    distill.add_argument("--epochs", type=int, default=1)
    distill.add_argument("--batch-size", type=int, default=4)
    distill.add_argument("--learning-rate", type=float, default=1e-3)
    distill.add_argument("--sequence-length", type=int, default=None)
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out"
    )
    distill.add_argument(
        "--backend", choices=("jax", "tensorflow", "torch"), default=None
    )
    for command in commands.choices.values():
        command.add_argument(
            "--verbose",
            action="store_true",
            help="show the backends' own logging (TensorFlow, XLA, CUDA "
            f"probing; otherwise written to {backend_log_path()})",
        )
    return parser


def finetune(args, out=None):
    """Fine-tune `args.preset` on `args.data`; write the preset `args.out`."""
    from keras_gemma2.training.finetune import finetune as run_finetune
    from keras_gemma2.training.sft_jsonl import read_sft_jsonl

    out = out or sys.stdout
    rows = read_sft_jsonl(args.data)
    eval_rows = None if args.eval is None else read_sft_jsonl(args.eval)
    targets = args.lora_targets
    if targets is not None and targets != "all":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    out.write(f"Fine-tuning {args.preset} on {len(rows)} rows of {args.data}\n")
    report = run_finetune(
        args.preset,
        rows,
        args.out,
        eval_rows=eval_rows,
        lora_rank=args.lora_rank,
        lora_targets=targets,
        quantize=args.quantize,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        sequence_length=args.sequence_length,
        keep_adapters=args.keep_adapters,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    where = "held-out" if args.eval else "training"
    out.write(
        f"Response loss on the {where} rows: {report['loss_before']:.4f} -> "
        f"{report['loss_after']:.4f}\n"
    )
    kept = " (adapter kept: adapter.lora.h5)" if args.keep_adapters else ""
    out.write(f"Done: {report['output']}{kept}\n")
    return report


def distill(args, out=None):
    """Distil `args.teacher` into `args.student` on `args.data`; write `args.out`."""
    from keras_gemma2.training.distill import distill as run_distill
    from keras_gemma2.training.sft_jsonl import read_sft_jsonl

    out = out or sys.stdout
    rows = read_sft_jsonl(args.data)
    eval_rows = None if args.eval is None else read_sft_jsonl(args.eval)
    out.write(
        f"Distilling {args.teacher} into {args.student} on {len(rows)} rows of "
        f"{args.data}\n"
    )
    report = run_distill(
        args.teacher,
        args.student,
        rows,
        args.out,
        eval_rows=eval_rows,
        top_k=args.top_k,
        temperature=args.temperature,
        alpha=args.alpha,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        sequence_length=args.sequence_length,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    where = "held-out" if args.eval else "training"
    out.write(
        f"Student response loss on the {where} rows: {report['loss_before']:.4f} "
        f"-> {report['loss_after']:.4f}\n"
    )
    out.write(f"Done: {report['output']}\n")
    return report


def gguf_types():
    """`--type` choices of `convert --to gguf` (no Keras import)."""
    return ("f32", "f16", "bf16", "q8_0")


def _check_gguf_arguments(args):
    """Refuse gguf-only flags elsewhere and an existing Modelfile, before loading."""
    if args.to != "gguf":
        for flag, value in (
            ("--type", args.type),
            ("--no-modelfile", args.no_modelfile),
        ):
            if value:
                raise ValueError(
                    f"{flag} applies to --to gguf only. Received: --to {args.to} "
                    f"with {flag}; use --dtype for the written dtype."
                )
        return
    modelfile = os.path.join(
        os.path.dirname(os.path.abspath(args.destination)), "Modelfile"
    )
    if not args.no_modelfile and os.path.exists(modelfile) and not args.overwrite:
        raise FileExistsError(
            f"The Modelfile {modelfile} already exists; pass --overwrite to replace "
            "it, --no-modelfile to skip it, or choose another folder."
        )


def convert(args):
    """Load `args.source`, write it to `args.destination` in `args.to` format."""
    import keras

    from keras_gemma2.checkpoints.preset_loading import load_causal_lm
    from keras_gemma2.models.causal_lm import Gemma2CausalLM

    if os.path.exists(args.destination) and not args.overwrite:
        raise FileExistsError(
            f"The destination {args.destination} already exists; pass --overwrite "
            "to replace it."
        )
    _check_gguf_arguments(args)
    gguf_type = args.type or "f32"
    if args.dtype is None:
        # GGUF types other than bf16 are made from float32 weights: loading
        # in bfloat16 first would round f16 and q8_0 twice.
        gguf_float32 = args.to == "gguf" and gguf_type != "bf16"
        args.dtype = "float32" if gguf_float32 else "bfloat16"
    if args.to == "keras_hub":
        from keras_gemma2.checkpoints.keras_hub_export import check_preset_exportable

        # Before the long load: refuse what KerasHub cannot compute.
        check_preset_exportable(args.source)
    bar = None

    def progress(done, total, name):
        nonlocal bar
        if bar is None:
            print(f"Loading {total} tensors from {args.source}")
            bar = keras.utils.Progbar(total, unit_name="tensor")
        bar.update(done)

    causal_lm = load_causal_lm(
        Gemma2CausalLM, args.source, progress=progress, dtype=args.dtype
    )
    if args.to == "gguf":
        written = {"bar": None}

        def write_progress(done, total, name):
            if written["bar"] is None:
                print(f"Writing {args.destination} (gguf, {gguf_type})")
                written["bar"] = keras.utils.Progbar(total, unit_name="tensor")
            written["bar"].update(done)

        causal_lm.export_to_gguf(
            args.destination,
            dtype=gguf_type,
            modelfile=not args.no_modelfile,
            overwrite=args.overwrite,
            progress=write_progress,
        )
        print(f"Done: {args.destination}")
        if not args.no_modelfile:
            folder = os.path.dirname(os.path.abspath(args.destination))
            print(f"Ollama: cd {folder} && ollama create NAME -f Modelfile")
        return
    print(f"Writing {args.destination} ({args.to}, {args.dtype})")
    if args.to == "keras":
        causal_lm.save_to_preset(
            args.destination, max_shard_size=args.max_shard_gb, overwrite=args.overwrite
        )
    elif args.to == "keras_hub":
        from keras_gemma2.checkpoints.keras_hub_export import export_to_keras_hub

        export_to_keras_hub(
            causal_lm,
            args.destination,
            dtype=args.dtype,
            max_shard_size=args.max_shard_gb,
            overwrite=args.overwrite,
        )
    else:
        causal_lm.export_to_transformers(
            args.destination,
            dtype=args.dtype,
            max_shard_size=int(args.max_shard_gb * 2**30),
            overwrite=args.overwrite,
        )
    print(f"Done: {args.destination}")


def make_sampler(args):
    """The `keras_hub` sampler the flags ask for."""
    import keras_hub

    if args.temperature == 0:
        return keras_hub.samplers.GreedySampler()
    if args.top_p is not None:
        return keras_hub.samplers.TopPSampler(
            p=args.top_p, k=args.top_k, seed=args.seed, temperature=args.temperature
        )
    return keras_hub.samplers.TopKSampler(
        k=args.top_k, seed=args.seed, temperature=args.temperature
    )


def check_generation_arguments(args):
    """Refuse bad `run`/`chat` numbers before any backend is imported."""
    if args.max_new_tokens < 1:
        raise ValueError(
            f"--max-new-tokens must be >= 1. Received: {args.max_new_tokens}"
        )
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0. Received: {args.temperature}")


def load_for_generation(args, err=None):
    check_generation_arguments(args)
    import keras

    from keras_gemma2.training.finetune import load_finetuned

    err = err or sys.stderr
    err.write(f"Loading {args.preset} (Keras backend: {keras.config.backend()})\n")

    # A `finetune --keep-adapters` preset gets its adapter; others load as is.
    causal_lm = load_finetuned(args.preset)
    if causal_lm.preprocessor is None:
        raise ValueError(f"{args.preset} has no tokenizer, so it cannot take text.")
    causal_lm.compile(sampler=make_sampler(args))
    return causal_lm


def stream(causal_lm, prompt, max_new_tokens, out):
    """Print the completion of `prompt` as it arrives; return its text."""
    from keras import ops

    from keras_gemma2.models.architecture import MAX_SEQUENCE_LENGTH

    tokens = len(
        ops.convert_to_numpy(causal_lm.preprocessor.tokenizer.tokenize(prompt))
    )
    max_length = min(tokens + 1 + max_new_tokens, MAX_SEQUENCE_LENGTH)
    text = ""
    for piece in causal_lm.generate(prompt, max_length=max_length, stream=True):
        out.write(piece)
        out.flush()
        mark("first token")
        text += piece
    out.write("\n")
    return text


def run(args, out=None):
    out = out or sys.stdout
    causal_lm = load_for_generation(args)
    mark("model loaded")
    out.write(args.prompt)
    stream(causal_lm, args.prompt, args.max_new_tokens, out)


def chat(args, out=None, read=None, err=None):
    from keras import ops

    from keras_gemma2.models.architecture import MAX_SEQUENCE_LENGTH
    from keras_gemma2.models.chat_template import format_chat

    out, read, err = out or sys.stdout, read or input, err or sys.stderr
    context = args.context_length or MAX_SEQUENCE_LENGTH
    if not 2 <= context <= MAX_SEQUENCE_LENGTH:
        raise ValueError(
            f"--context-length must be between 2 and {MAX_SEQUENCE_LENGTH}. "
            f"Received: {context}"
        )
    if args.max_new_tokens + 2 > context:
        raise ValueError(
            f"--max-new-tokens ({args.max_new_tokens}) leaves no room for a "
            f"message in the {context}-token context; pass a smaller value."
        )
    causal_lm = load_for_generation(args, err=err)
    tokenizer = causal_lm.preprocessor.tokenizer

    def prompt_tokens(messages):
        # `<bos>` (added by the preprocessor) + the rendered turns.
        return 1 + len(ops.convert_to_numpy(tokenizer.tokenize(format_chat(messages))))

    budget = context - args.max_new_tokens
    messages = []
    out.write("Type a message; /bye or end of input quits.\n")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            break
        if line.strip() == "/bye":
            break
        if not line.strip():
            continue
        message = {"role": "user", "content": line}
        if prompt_tokens([message]) > budget:
            err.write(
                f"[Your message takes {prompt_tokens([message])} tokens; at most "
                f"{budget} fit ({context} of context less --max-new-tokens "
                f"{args.max_new_tokens}). It was not sent; the history is kept.]\n"
            )
            continue
        messages.append(message)
        dropped = keep_recent_turns(messages, prompt_tokens, budget)
        if dropped:
            err.write(
                f"[Dropped the {dropped} oldest message(s) to fit the "
                f"{context}-token context.]\n"
            )
        answer = stream(causal_lm, format_chat(messages), args.max_new_tokens, out)
        messages.append({"role": "model", "content": answer})


def keep_recent_turns(messages, count_tokens, budget):
    """Drop the oldest user/model turn pairs until `messages` fit `budget` tokens.

    The conversation keeps starting with a user turn; the last message (the
    user's) is always kept, so check first that it fits alone.

    Args:
        messages: list of chat messages, ending with the user's; trimmed in
            place.
        count_tokens: callable giving the prompt length of a message list.
        budget: int. Most prompt tokens allowed.

    Returns:
        The number of messages dropped.

    Example:

    >>> messages = [{"role": "user", "content": "a" * n} for n in (5, 1, 3)]
    >>> messages[1]["role"] = "model"
    >>> keep_recent_turns(messages, lambda m: sum(len(x["content"]) for x in m), 4)
    2
    >>> [m["content"] for m in messages]
    ['aaa']
    >>> messages = [{"role": "user", "content": "a" * n} for n in (1, 1, 3)]
    >>> keep_recent_turns(messages, lambda m: sum(len(x["content"]) for x in m), 5)
    0
    """
    dropped = 0
    while len(messages) > 1 and count_tokens(messages) > budget:
        del messages[:2]
        dropped += 2
    return dropped


# The Keras backends the commands offer, by the module each one imports.
BACKEND_MODULES = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}
# Packages that Keras and KerasHub import whenever installed, for any
# backend, and that `run` and `chat` never use; they start without them:
# the other backends (KerasHub's `tensor_utils` imports TensorFlow, Keras'
# `OrbaxCheckpoint` callback JAX) and matplotlib (`keras.visualization`).
GENERATION_NEEDS_NOT = ("matplotlib",)


def unused_by_generation(backend):
    """The packages `run`/`chat` on `backend` start without.

    Other Keras backends (numpy, openvino) may import any of ours, so only
    matplotlib goes there.

    >>> unused_by_generation("torch")
    ('jax', 'tensorflow', 'matplotlib')
    >>> unused_by_generation("numpy")
    ('matplotlib',)
    """
    if backend not in BACKEND_MODULES:
        return GENERATION_NEEDS_NOT
    others = tuple(
        module for name, module in BACKEND_MODULES.items() if name != backend
    )
    return others + GENERATION_NEEDS_NOT


class BackendNotInstalled(Exception):
    """The Keras backend `backend` cannot be imported (`detail` says why)."""

    def __init__(self, backend, detail="is not installed"):
        super().__init__(f"the {backend} backend {detail}")
        self.backend = backend


def compile_cache_directory():
    """`$XDG_CACHE_HOME/keras_gemma2` (default `~/.cache/keras_gemma2`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "keras_gemma2")


def configured_backend():
    """The backend Keras will pick: `KERAS_BACKEND`, else keras.json's, else tf.

    Read the way Keras reads it, without importing Keras.
    """
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    directory = os.environ.get("KERAS_HOME")
    if directory is None:
        home = os.path.expanduser("~")
        directory = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(directory), "keras.json")) as file:
            return json.load(file).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def _switch_backend(backend, argv):
    """Re-run under `backend`: Keras, already imported, fixed another one.

    `backend` is argparse's value, so `--backend jax` and `--backend=jax`
    both count (scanning `argv` for the word `--backend` missed the second).
    """
    if argv is None:
        argv = sys.argv[1:]
    import keras

    if keras.config.backend() != backend:
        env = {**os.environ, "KERAS_BACKEND": backend}
        os.execve(
            sys.executable, [sys.executable, "-m", "keras_gemma2.cli", *argv], env
        )


def start_backend(args, argv):
    """Pick, quiet and import the Keras backend before anything imports Keras.

    Keras fixes its backend when first imported, and the backends read their
    cache flags from the environment then. So, in a fresh process: name the
    backend in `KERAS_BACKEND`; without `--verbose` send native (C++) logging
    to `backend_log_path()`; for `run` and `chat`, unless
    `--no-compile-cache`, point the backend's persistent compilation cache
    (jax: its compilation cache; tensorflow: XLA's persistent cache for
    `jit_compile` functions; torch: inductor's cache, used by
    `torch.compile`) at `compile_cache_directory()`; and start `run` and
    `chat` as if the other backends and matplotlib were not installed
    (`unused_by_generation`). KerasHub imports TensorFlow whenever it is
    installed (`keras_hub.src.utils.tensor_utils`, at import, for any
    backend) and Keras imports JAX (`keras.callbacks.OrbaxCheckpoint`):
    seconds of start-up that generation never uses. Both support their
    absence (KerasHub's tokenizers fall back to the `sentencepiece`
    package); imports of them are guarded by `except ImportError`.

    Where Keras is already imported (a caller's process), only re-run under
    another backend when `--backend` asks for one.

    Raises:
        BackendNotInstalled: the backend's package is missing or fails to
            import.
    """
    backend = getattr(args, "backend", None)
    if "keras" in sys.modules:
        if backend:
            _switch_backend(backend, argv)
        return
    backend = backend or configured_backend()
    module = BACKEND_MODULES.get(backend)
    if module is not None and importlib.util.find_spec(module) is None:
        raise BackendNotInstalled(backend)
    os.environ["KERAS_BACKEND"] = backend
    if not args.verbose:
        divert_native_stderr()
    generating = args.command in ("run", "chat")
    cache = generating and not args.no_compile_cache
    if cache:
        _cache_environment(backend)
    if generating and "keras_hub" not in sys.modules:
        for name in unused_by_generation(backend):
            if name not in sys.modules:
                sys.modules[name] = None  # `import name` raises ImportError
    try:
        with _dynamo_deferred(generating and backend == "torch"):
            import keras  # noqa: F401
    except ImportError as error:
        raise BackendNotInstalled(
            backend, f"failed to import ({_one_line(error)})"
        ) from error
    from keras_gemma2.generation.host_memory import keep_freed_host_memory

    keep_freed_host_memory(backend)
    if cache and backend == "jax":
        _jax_compile_cache()
    if not args.verbose:
        _quiet_python_logging()


@contextlib.contextmanager
def _dynamo_deferred(enabled):
    """While Keras imports, `torch._dynamo` is a stand-in with `disable` only.

    Keras' torch backend imports `torch._dynamo` at import time, for two
    `@dynamo.disable()` decorators (`keras.src.backend.torch.image` and
    `.random`); that import costs about 1.2 s on this project's machines,
    a third of `run`'s start on torch. `run` and `chat` never trace with
    dynamo (the `TorchDecoder` steps eagerly), and outside tracing those
    decorators change nothing, so Keras gets functions left as they are.
    The stand-in leaves `sys.modules` afterwards: a later
    `import torch._dynamo` loads the real module.
    """
    if not enabled or "torch._dynamo" in sys.modules:
        yield
        return

    def disable(fn=None, recursive=True, **kwargs):
        del recursive, kwargs
        return (lambda function: function) if fn is None else fn

    stand_in = types.ModuleType("torch._dynamo")
    stand_in.disable = disable
    sys.modules["torch._dynamo"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("torch._dynamo") is stand_in:
            del sys.modules["torch._dynamo"]
        torch = sys.modules.get("torch")
        if torch is not None and vars(torch).get("_dynamo") is stand_in:
            delattr(torch, "_dynamo")


def _cache_environment(backend):
    """Point TensorFlow's or torch's persistent compilation cache at ours."""
    directory = compile_cache_directory()
    if backend == "tensorflow":
        flags = os.environ.get("TF_XLA_FLAGS", "")
        if "tf_xla_persistent_cache_directory" not in flags:
            path = os.path.join(directory, "tensorflow_xla")
            os.makedirs(path, exist_ok=True)
            flags = f"{flags} --tf_xla_persistent_cache_directory={path}"
            os.environ["TF_XLA_FLAGS"] = flags.strip()
    elif backend == "torch":
        os.environ.setdefault(
            "TORCHINDUCTOR_CACHE_DIR", os.path.join(directory, "torchinductor")
        )


def _jax_compile_cache():
    """JAX's persistent compilation cache, small programs included."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update(
            "jax_compilation_cache_dir", os.path.join(compile_cache_directory(), "jax")
        )
    # Defaults keep only programs that took over a second to compile; the
    # start-up is many small ones (parameter initializers, generation steps).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _quiet_python_logging():
    """Errors only from the backends' Python loggers."""
    for name in ("absl", "jax", "tensorflow", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def backend_log_path():
    """Where `divert_native_stderr` writes: `backend.log` in the cache directory."""
    return os.path.join(compile_cache_directory(), "backend.log")


def divert_native_stderr():
    """Native writes to stderr go to `backend_log_path()`; Python's stay.

    TensorFlow, XLA, CUDA probing and sentencepiece log from C++ straight to
    file descriptor 2, partly before any setting of theirs is read (TF 2.21
    prints its oneDNN and CUDA notes whatever `TF_CPP_MIN_LOG_LEVEL` says).
    So descriptor 2 becomes the log file (or the null device where it cannot
    be written), and `sys.stderr`, which carries this command's messages,
    warnings and tracebacks, keeps the terminal on a copy of the old one.
    """
    sys.stderr.flush()
    terminal = os.dup(2)
    try:
        os.makedirs(compile_cache_directory(), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        log = os.open(backend_log_path(), flags, 0o644)
    except OSError:
        log = os.open(os.devnull, os.O_WRONLY)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = open(
        terminal,
        "w",
        buffering=1,
        encoding=sys.stderr.encoding,
        errors=sys.stderr.errors,
    )


def main(argv=None):
    """Entry point of the `keras-gemma2` console script."""
    mark("main")
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("run", "chat"):
            check_generation_arguments(args)
        start_backend(args, argv)
        mark("backend imported")
        if args.command == "convert":
            convert(args)
        elif args.command == "run":
            run(args)
        elif args.command == "chat":
            chat(args)
        elif args.command == "finetune":
            finetune(args)
        elif args.command == "distill":
            distill(args)
    except BackendNotInstalled as error:
        hint = ""
        if error.backend in BACKEND_MODULES:
            hint = f'; install it with pip install "keras-gemma2[{error.backend}]"'
        print(f"keras-gemma2: error: {error}{hint}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        # User errors: one clear line, no traceback.
        print(f"keras-gemma2: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        # No network, a failed download, a full disk: one line too.
        print(f"keras-gemma2: error: {_one_line(error)}", file=sys.stderr)
        return 1
    finally:
        mark("end")
        if _PHASES:
            print(f"timings: {format_timings(_PHASES)}", file=sys.stderr)
    return 0


# `(phase, wall seconds, CPU seconds)` at the end of each start-up phase, kept
# when the environment sets KERAS_GEMMA2_TIMINGS=1 (benchmarks/cli_latency.py).
_PHASES = []


def mark(phase):
    """Record the end of `phase` (its first end) when KERAS_GEMMA2_TIMINGS=1."""
    recorded = [name for name, _, _ in _PHASES]
    if os.environ.get("KERAS_GEMMA2_TIMINGS") == "1" and phase not in recorded:
        _PHASES.append((phase, time.perf_counter(), time.process_time()))


def format_timings(phases):
    """Each phase's wall (CPU) seconds since the one before.

    >>> format_timings([("main", 1.0, 0.5), ("load", 3.5, 2.0)])
    'load 2.50 s (cpu 1.50)'
    """
    return ", ".join(
        f"{name} {wall - last_wall:.2f} s (cpu {cpu - last_cpu:.2f})"
        for (_, last_wall, last_cpu), (name, wall, cpu) in itertools.pairwise(phases)
    )


def _one_line(error):
    """`error`'s message on one line (its class name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
