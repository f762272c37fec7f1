"""`keras-gemma2` command line: convert checkpoints between formats."""

import argparse
import sys

EXAMPLES = """examples:
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
    import os

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


def main(argv=None):
    """Entry point of the `keras-gemma2` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            convert(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        # User errors: one clear line, no traceback.
        print(f"keras-gemma2: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
