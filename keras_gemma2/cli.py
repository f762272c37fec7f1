"""`keras-gemma2` command line: run, chat, convert."""

import argparse
import os
import sys

EXAMPLES = """examples:
  keras-gemma2 run gemma2_tiny_python "def fibonacci(n):"
  keras-gemma2 run ./gemma-2-2b "The capital of France is" --max-new-tokens 20
  keras-gemma2 chat ./gemma-2-2b-it --temperature 0.7 --backend jax
  keras-gemma2 convert ./gemma-2-2b ./gemma2_2b_keras --to keras --dtype bfloat16
  keras-gemma2 convert ./gemma2_2b_keras ./gemma-2-2b-hf --to transformers
  keras-gemma2 convert kaggle://keras/gemma2/keras/gemma2_2b_en/1 ./hf --to transformers
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
    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint to a keras_gemma2 preset or a transformers dir",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument(
        "source", help="HF checkpoint dir, KerasHub/keras_gemma2 preset dir or handle"
    )
    convert.add_argument("destination", help="directory to write (must not exist)")
    convert.add_argument(
        "--to", choices=("keras", "transformers"), required=True, help="output format"
    )
    convert.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the written weights (default: bfloat16)",
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
    return parser


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
    print(f"Writing {args.destination} ({args.to}, {args.dtype})")
    if args.to == "keras":
        causal_lm.save_to_preset(
            args.destination, max_shard_size=args.max_shard_gb, overwrite=args.overwrite
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

    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0. Received: {args.temperature}")
    if args.temperature == 0:
        return keras_hub.samplers.GreedySampler()
    if args.top_p is not None:
        return keras_hub.samplers.TopPSampler(
            p=args.top_p, k=args.top_k, seed=args.seed, temperature=args.temperature
        )
    return keras_hub.samplers.TopKSampler(
        k=args.top_k, seed=args.seed, temperature=args.temperature
    )


def load_for_generation(args):
    from keras_gemma2.models.causal_lm import Gemma2CausalLM

    if args.max_new_tokens < 1:
        raise ValueError(
            f"--max-new-tokens must be >= 1. Received: {args.max_new_tokens}"
        )
    causal_lm = Gemma2CausalLM.from_preset(args.preset)
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
        text += piece
    out.write("\n")
    return text


def run(args, out=None):
    out = out or sys.stdout
    causal_lm = load_for_generation(args)
    out.write(args.prompt)
    stream(causal_lm, args.prompt, args.max_new_tokens, out)


def chat(args, out=None, read=None):
    from keras_gemma2.models.chat_template import format_chat

    out, read = out or sys.stdout, read or input
    causal_lm = load_for_generation(args)
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
        messages.append({"role": "user", "content": line})
        answer = stream(causal_lm, format_chat(messages), args.max_new_tokens, out)
        messages.append({"role": "model", "content": answer})


def _switch_backend(argv):
    """Re-run under `--backend`: Keras fixes its backend when first imported."""
    if argv is None:
        argv = sys.argv[1:]
    if "--backend" not in argv:
        return
    backend = argv[argv.index("--backend") + 1] if argv[-1] != "--backend" else None
    if backend and os.environ.get("KERAS_BACKEND") != backend:
        import keras

        if keras.config.backend() != backend:
            env = {**os.environ, "KERAS_BACKEND": backend}
            os.execve(
                sys.executable, [sys.executable, "-m", "keras_gemma2.cli", *argv], env
            )


def main(argv=None):
    """Entry point of the `keras-gemma2` console script."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "backend", None):
            _switch_backend(argv)
        if args.command == "convert":
            convert(args)
        elif args.command == "run":
            run(args)
        elif args.command == "chat":
            chat(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        # User errors: one clear line, no traceback.
        print(f"keras-gemma2: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
