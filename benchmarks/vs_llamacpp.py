"""Decode speed side by side: ours (each backend and dtype) against llama.cpp.

Usage: `python benchmarks/vs_llamacpp.py [--backends jax,tensorflow,torch]
[--dtypes float32,bfloat16,int8] [--cases a,b] [--repeats 5]
[--llama-types f32,f16,q8_0] [--flash off,on] [--threads N] [--torch-jit]`

One set of random weights, the mid config of `benchmarks/generate.py`
(vocabulary 32000, 8 layers, hidden 512, 8/4 heads, head_dim 64,
intermediate 2048, window 256; made there by `make_weights`), goes to every
implementation: ours through `Gemma2CausalLM.from_preset` (float32,
bfloat16, or float32 then `quantize("int8")`), llama.cpp through our
`export_to_gguf` (f32, f16, q8_0) and `llama_cpp.Llama` (llama-cpp-python),
with flash attention off and on. Batch 1, greedy, no early stop; case (a) a
32-token prompt + 64 new tokens, case (b) 2048 + 128; the time is the whole
call, prompt included, and tokens/s is new tokens over it.

Each of our backend x dtype runs in its own process (`KERAS_BACKEND`). The
llama.cpp models run in that same process, after it, interleaved with ours
round by round (`interleaved_medians` of `benchmarks/generate.py`: one
warm-up call each, then the median of `--repeats` rounds), so a ratio is
measured under one machine state; on this project's shared 2-core machine
runs drift by 20-30%, and only such same-run ratios mean much. Each dtype of
ours meets the llama.cpp type of its precision: float32 -> f32, bfloat16 ->
f16, int8 -> q8_0. `ours/llama.cpp` is the speed ratio (> 1: ours faster).
llama.cpp decodes with its own greedy sampler (`Llama.generate`, top_k=1,
temperature 0) after `reset()`, so no call reuses the previous call's cache.

Run it on a quiet machine. llama.cpp's threads wait for each other by
spinning, so when other processes hold the cores its time collapses: here,
at load average 8 on 2 cores, case (a) at f32 took 12-29 s with 2 threads
and 2.1 s with 1 (0.42 s quiet). Torch's OpenMP threads do the same (ours
on torch, float32, case (a): 22 s with 2 threads, 3.1 s with
`OMP_NUM_THREADS=1`). The header prints the load average at the start;
`--threads` sets llama.cpp's, `OMP_NUM_THREADS` torch's; on a busy machine
set both to 1, and compare only ratios.

`--torch-jit` adds, on torch, `ours jit`: the same model compiled with
`compile(jit_compile=True)` (`TorchDecoder`'s step through `torch.compile`,
FBGEMM's packs kept as opaque calls), timed after its warm-up call, which
compiles (its time is the `first call` column), as jax's and TensorFlow's
XLA programs are.

Without llama-cpp-python (`pip install keras-gemma2[llamacpp]`) the script
says so and times ours alone. A short run: `--backends jax --dtypes float32
--cases a --repeats 2 --flash on`.
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile

from generate import CASES, inputs_for, interleaved_medians, make_weights

# Our dtype -> the llama.cpp type of the same precision class.
PEER_TYPES = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}
LLAMA_TYPES = tuple(PEER_TYPES.values())


def gguf_path(directory, gguf_type):
    return os.path.join(directory, f"model-{gguf_type}.gguf")


def export_gguf_files(directory, gguf_types):
    """Our float32 model of `make_weights`, exported once per llama.cpp type.

    A GGUF file holds a vocabulary: the tiny preset's 4096 pieces, the other
    embedding rows written as unused tokens (the prompts are token ids).
    """
    from keras_gemma2 import Gemma2CausalLM, Gemma2Tokenizer

    causal_lm = Gemma2CausalLM.from_preset(os.path.join(directory, "keras_hub"))
    tokenizer = Gemma2Tokenizer.from_preset("gemma2_tiny_python")
    for gguf_type in gguf_types:
        causal_lm.export_to_gguf(
            gguf_path(directory, gguf_type),
            dtype=gguf_type,
            tokenizer=tokenizer,
            modelfile=False,
        )


def load_ours(directory, dtype):
    """Our model in `dtype` ("float32", "bfloat16" or "int8": float32 + int8)."""
    from keras_gemma2 import Gemma2CausalLM

    preset = os.path.join(directory, "keras_hub")
    if dtype == "int8":
        causal_lm = Gemma2CausalLM.from_preset(preset, dtype="float32")
        causal_lm.quantize("int8")
    else:
        causal_lm = Gemma2CausalLM.from_preset(preset, dtype=dtype)
    causal_lm.compile(sampler="greedy")
    return causal_lm


def llama_runner(path, flash, n_ctx, threads):
    """`run(prompt_ids, new)`: llama.cpp greedy decoding of `new` tokens."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash,
        verbose=False,
    )

    def run(prompt_ids, new):
        llm.reset()  # no reuse of the previous call's KV cache
        tokens = []
        for token in llm.generate(prompt_ids, top_k=1, temp=0.0):
            tokens.append(token)
            if len(tokens) == new:
                break
        return tokens

    return run


def child(directory, dtype, cases, repeats, llama_types, flash_modes, threads, jit):
    """Ours in one backend and dtype, and its llama.cpp peers; JSON lines out."""
    import keras

    from keras_gemma2 import Gemma2CausalLM

    backend = keras.config.backend()
    ours = load_ours(directory, dtype)
    compiled = None
    if jit and backend == "torch":
        compiled = Gemma2CausalLM(ours.backbone)
        compiled.compile(sampler="greedy", jit_compile=True)
    peers = {}
    peer_type = PEER_TYPES[dtype]
    if peer_type in llama_types:
        n_ctx = max(prompt + new for prompt, new in (CASES[c] for c in cases))
        for flash in flash_modes:
            name = f"{peer_type}" + (" flash" if flash else "")
            path = gguf_path(directory, peer_type)
            peers[name] = llama_runner(path, flash, n_ctx, threads)
    for case in cases:
        prompt, new = CASES[case]
        inputs = inputs_for(prompt, new)
        prompt_ids = [int(i) for i in inputs["token_ids"][0, :prompt]]
        functions = {"ours": lambda x=inputs: ours.generate(x, stop_token_ids=None)}
        if compiled is not None:
            functions["ours jit"] = lambda x=inputs: compiled.generate(
                x, stop_token_ids=None
            )
        for name, run in peers.items():
            functions[name] = lambda r=run, p=prompt_ids, n=new: r(p, n)
        medians, first_calls = interleaved_medians(functions, repeats)
        for name, seconds in medians.items():
            row = {
                "backend": backend,
                "dtype": dtype,
                "case": case,
                "model": name,
                "seconds": seconds,
                "tokens_per_s": new / seconds,
                "first_call_s": first_calls[name],
            }
            print(json.dumps(row), flush=True)


def run_children(directory, args, llama_types, flash_modes):
    """One process per backend x dtype; their JSON rows."""
    rows = []
    for dtype in args.dtypes.split(","):
        for backend in args.backends.split(","):
            env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
            command = [
                sys.executable,
                __file__,
                "--child",
                directory,
                dtype,
                "--cases",
                args.cases,
                "--repeats",
                str(args.repeats),
                "--llama-types",
                ",".join(llama_types) or "none",
                "--flash",
                ",".join("on" if f else "off" for f in flash_modes),
                "--threads",
                str(args.threads),
            ] + (["--torch-jit"] if args.torch_jit else [])
            process = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in process.stdout.splitlines() if line[:1] == "{"]
            if process.returncode != 0:
                last = process.stderr.strip().splitlines()[-1:]
                print(f"# {backend} {dtype} failed: {last}", flush=True)
            rows += [json.loads(line) for line in lines]
    return rows


def print_table(rows, args, llama_version, load_average):
    import keras

    print(
        f"# vs_llamacpp: {platform.machine()}, {os.cpu_count()} cores "
        f"(load average {load_average:.1f} at the start), "
        f"keras {keras.__version__}, llama-cpp-python {llama_version}, "
        f"{args.threads} llama.cpp threads; median of {args.repeats} "
        "interleaved rounds; seconds = whole call, tokens/s = new tokens / seconds"
    )
    print(
        "| case | backend | ours dtype | ours s | ours tok/s | llama.cpp "
        "| llama.cpp s | llama.cpp tok/s | ours/llama.cpp | ours first call s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ours in (row for row in rows if row["model"].startswith("ours")):
        key = (ours["case"], ours["backend"], ours["dtype"])
        peers = [
            row
            for row in rows
            if not row["model"].startswith("ours")
            and (row["case"], row["backend"], row["dtype"]) == key
        ]
        backend = ours["backend"] + (" jit" if ours["model"] == "ours jit" else "")
        head = (
            f"| {ours['case']} | {backend} | {ours['dtype']} | "
            f"{ours['seconds']:.2f} | {ours['tokens_per_s']:.1f} |"
        )
        tail = f" {ours['first_call_s']:.1f} |"
        if not peers:
            print(f"{head} - | - | - | - |{tail}")
        for peer in peers:
            ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
            print(
                f"{head} {peer['model']} | {peer['seconds']:.2f} | "
                f"{peer['tokens_per_s']:.1f} | {ratio:.2f}x |{tail}"
            )


def parse_list(value, allowed, name):
    items = [item for item in value.split(",") if item]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        raise SystemExit(
            f"Received an invalid value for `--{name}`, expected a comma-separated "
            f"list of {sorted(allowed)}. Received: --{name}={value}"
        )
    return items


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--cases", default="a,b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llama-types", default="f32,f16,q8_0")
    parser.add_argument("--flash", default="off,on")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--torch-jit", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    parse_list(args.backends, {"jax", "tensorflow", "torch"}, "backends")
    parse_list(args.dtypes, set(PEER_TYPES), "dtypes")
    cases = parse_list(args.cases, set(CASES), "cases")
    flash_modes = [m == "on" for m in parse_list(args.flash, {"off", "on"}, "flash")]
    llama_types = (
        []
        if args.llama_types == "none"
        else parse_list(args.llama_types, set(LLAMA_TYPES), "llama-types")
    )
    if args.repeats < 1:
        raise SystemExit(
            f"`--repeats` must be >= 1. Received: --repeats={args.repeats}"
        )
    if args.child:
        directory, dtype = args.child
        child(
            directory,
            dtype,
            cases,
            args.repeats,
            llama_types,
            flash_modes,
            args.threads,
            args.torch_jit,
        )
        return

    load_average = os.getloadavg()[0]
    llama_version = "not installed"
    if importlib.util.find_spec("llama_cpp") is None:
        print(
            "# llama-cpp-python is not installed (pip install "
            "'keras-gemma2[llamacpp]'): timing ours alone.",
            flush=True,
        )
        llama_types = []
    else:
        from importlib.metadata import version

        llama_version = version("llama-cpp-python")
    dtypes = args.dtypes.split(",")
    needed = [t for t in llama_types if t in {PEER_TYPES[d] for d in dtypes}]
    with tempfile.TemporaryDirectory() as directory:
        make_weights(directory)
        export_gguf_files(directory, needed)
        rows = run_children(directory, args, llama_types, flash_modes)
    print_table(rows, args, llama_version, load_average)


if __name__ == "__main__":
    main()
