"""What the NaN/Inf check costs when loading a ~1 GB HF Gemma 2 checkpoint.

Usage: `python benchmarks/finite_check.py [--backend jax] [--repeats 3]`

Writes the random sharded checkpoints of `benchmarks/load_memory.py`
(float32 and bfloat16), then in one process loads each with
`Gemma2Backbone.from_preset(directory, check_finite=...)`, alternating the
check on and off, and prints the median load times, their difference, and
the time of the check alone (`is_finite` over every tensor as read, files in
the page cache). A second table does the same for the backbone saved as a
`.keras` file and read back with `keras.models.load_model`, the check
switched by `KERAS_GEMMA2_CHECK_FINITE`.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras
    import numpy as np
    from load_memory import write_checkpoint

    from keras_gemma2 import Gemma2Backbone
    from keras_gemma2.checkpoints.finite_check import is_finite
    from keras_gemma2.checkpoints.hf_checkpoint import index_checkpoint
    from keras_gemma2.checkpoints.safetensors_files import read_tensor

    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs; backend "
        f"{args.backend}; keras {keras.__version__}, numpy {np.__version__}; "
        f"medians of {args.repeats}"
    )
    print(
        "| dtype | checkpoint | load, check on | load, check off | difference "
        "| check alone |"
    )
    print("|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory(prefix="finite-check-") as directory:
            size = write_checkpoint(directory, dtype)  # config and tokenizer too
            times = {True: [], False: []}
            alone = []
            for _ in range(args.repeats):
                for check in (True, False):
                    start = time.perf_counter()
                    backbone = Gemma2Backbone.from_preset(
                        directory, check_finite=check, dtype=dtype
                    )
                    times[check].append(time.perf_counter() - start)
                    del backbone
                seconds = 0.0
                for entry in index_checkpoint(directory).values():
                    array = read_tensor(entry)
                    start = time.perf_counter()
                    assert is_finite(array)
                    seconds += time.perf_counter() - start
                alone.append(seconds)
            on = statistics.median(times[True])
            off = statistics.median(times[False])
            print(
                f"| {dtype} | {size / 2**30:.2f} GiB | {on:.2f} s | {off:.2f} s "
                f"| {on - off:+.2f} s ({(on - off) / off:+.0%}) "
                f"| {statistics.median(alone):.3f} s |"
            )

    print()
    print("| dtype | .keras file | load_model, check on | check off | difference |")
    print("|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory(prefix="finite-check-") as directory:
            write_checkpoint(directory, dtype)
            path = os.path.join(directory, "backbone.keras")
            Gemma2Backbone.from_preset(directory, dtype=dtype).save(path)
            times = {True: [], False: []}
            for _ in range(args.repeats):
                for check in (True, False):
                    os.environ["KERAS_GEMMA2_CHECK_FINITE"] = "1" if check else "0"
                    start = time.perf_counter()
                    backbone = keras.models.load_model(path)
                    times[check].append(time.perf_counter() - start)
                    del backbone
            os.environ.pop("KERAS_GEMMA2_CHECK_FINITE")
            on = statistics.median(times[True])
            off = statistics.median(times[False])
            print(
                f"| {dtype} | {os.path.getsize(path) / 2**30:.2f} GiB | {on:.2f} s "
                f"| {off:.2f} s | {on - off:+.2f} s ({(on - off) / off:+.0%}) |"
            )


if __name__ == "__main__":
    main()
