"""Each backend's own floor for one decoded token: its bare matrix products.

Usage: `python benchmarks/matmul_floor.py [--backends jax,tensorflow,torch]
[--dtypes float32,bfloat16,int8] [--cases a,b] [--repeats 7] [--no-llamacpp]`

Decoding one token of the mid config of `benchmarks/generate.py`
(vocabulary 32000, 8 layers, hidden 512, 8/4 heads, head_dim 64,
intermediate 2048) reads every weight once: per layer the query, key,
value, output, gate, up and down matrices, then the tied embedding as the
head. This script times only those 57 products of one row (41 on jax and
tensorflow in float, below), each backend with its own kernels and
nothing else of the model (no attention, norms,
sampling or dispatch of Keras layers), in the layouts our decoders use:
layer kernels `[in, out]`, the head as `x @ embedding.T` over the stored
`[vocabulary, hidden]` table; except jax and tensorflow in float32 and
bfloat16, whose decode loops read the down kernels as `[out, in]` rows and
the table as `[hidden, vocabulary]` columns, copies made once per call
(`keras_gemma2.layers.loop_matrices`), and so does this script.

- jax: one token's products, 20 tokens in one `jax.jit` program, a loop
  whose every token's rows depend on all products of the one before (as
  our compiled decode loop runs them: no per-op or per-token dispatch).
  Within a token the products run in the model's order, each group after
  the one before (`in_sequence`), never two independent ones at once.
- jax and tensorflow in float32 and bfloat16: each layer's query, key and
  value as one `[512, 1024]` matrix, as our decode loop carries them
  (`keras_gemma2.layers.loop_matrices`): 41 products a token.
- tensorflow: the same loop in one `tf.function(jit_compile=True)`
  program. On both, the weights are arguments of the program, as the
  model's variables are (captured as constants, TensorFlow's XLA folded
  the int8 codes into int32 copies: 6.9-12.6 ms per token).
- torch: eager, the products `TorchDecoder` calls (torch has no decode
  program to hide dispatch in): in float32, one row times `[out, in]`
  copies of the kernels, query/key/value and gate/up each one stacked
  copy (`torch_matmul.transposed_copies`).
- int8: per-output-channel int8 weights; the row quantized per row
  (jax/tensorflow: int8 x int8 -> int32 dots, as Keras' int8 layers do,
  with a lone row as two equal rows and the head's as three, as our XLA
  decode step multiplies them, see `xla_int8_rows`; torch: FBGEMM's int8
  packs for few rows on x86, else `torch._int_mm`, as `TorchDecoder` does).
- torch bfloat16: FBGEMM's float16 packs for few rows on x86, as
  `TorchDecoder` multiplies them (`torch_half`).

The weights (about 190 MB in float32) exceed this machine's caches, so
every product streams its matrix from memory, as in decoding. Each backend
runs in its own process; one timed call is one token's products, and the
table gives the median of `--repeats` rounds of 20 tokens (20 calls on
torch, one looped program on jax and tensorflow).

With llama-cpp-python installed, the same run times llama.cpp's whole
decode step on the same mid config (random weights, our GGUF export; f32,
f16, q8_0): per token, `(time of prompt + 65 new) - (prompt + 1 new)` over
64. When a backend's bare products for one token take longer than
llama.cpp's whole token at the same precision, no decoder built on that
backend's kernels can match llama.cpp there: that is the floor the issue's
targets are read against.

A floor holds only where our decoder cannot beat the bare products. On
float32 (every backend), on torch (every dtype) and on jax and tensorflow
in int8 our decode steps are slower than these products plus the rest of
the model, as expected. On jax and tensorflow in bfloat16 they are not: the
one-row bfloat16 dots (9.6-14 ms per token here, 35-88 ms as single-token
programs) took about as long as our whole compiled decode step (10-15 ms),
so those rows bound nothing and are printed for the record only. Our decode
loop converts bfloat16 weights to float32 copies before the loop and
multiplies those, so there the floor is the float32 row
(`docs/decode_speed.md` shows the compiled HLO).

`--cases b` adds the floor of case (b) of `benchmarks/vs_llamacpp.py` (a
2048-token prompt, 128 new tokens): the prompt's weight products (the 56
layer products over 2048 rows, the head over the last row only), timed the
same way, plus 127 decode tokens' products. Attention, norms and sampling
are left out, so no case (b) call on that backend can be faster. Each part
takes the faster of the dtype's own products and the backend's float32
products (converting the weights to float32 first costs at least the
float32 products). The llama.cpp column is then its whole case (b) call
with flash attention, the issue's peer, at the same precision, and the
table says whether the floor already exceeds that time / 1.2, the target.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

LAYERS = 8
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFW, VOCABULARY = 512, 8, 4, 64, 2048, 32000
SHAPES = [
    (HIDDEN, HEADS * HEAD_DIM),  # query
    (HIDDEN, KV_HEADS * HEAD_DIM),  # key
    (HIDDEN, KV_HEADS * HEAD_DIM),  # value
    (HEADS * HEAD_DIM, HIDDEN),  # output
    (HIDDEN, FFW),  # gate
    (HIDDEN, FFW),  # up
    (FFW, HIDDEN),  # down
]
# Which products of a layer read the same input (query, key and value; gate
# and up): a decoder may run those together, but each group only after the
# group before it (see `in_sequence`).
GROUPS = [0, 0, 0, 1, 2, 2, 3]
# The same with query, key and value as one matrix (`fused_qkv`).
FUSED_GROUPS = [0, 1, 2, 2, 3]
# `in_sequence`'s key of the head: its input is the last hidden-size row.
HEAD = "head"
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
PEER = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}
CALLS = 20
# Case (b) of `benchmarks/vs_llamacpp.py`: a 2048-token prompt, 128 new tokens
# (the first from the prompt's own forward pass), and its target ratio.
PROMPT_B, NEW_B, TARGET_B = 2048, 128, 1.2
# An isolated prompt-sized product slower than this is timed once more only.
SLOW_PREFILL_S = 20.0


def weights(numpy_dtype):
    """Random layer kernels `[in, out]` and the embedding `[vocabulary, hidden]`."""
    import numpy as np

    generator = np.random.default_rng(0)
    kernels = [
        generator.standard_normal(shape, dtype="float32").astype(numpy_dtype) * 0.02
        for _ in range(LAYERS)
        for shape in SHAPES
    ]
    embedding = generator.standard_normal((VOCABULARY, HIDDEN), dtype="float32")
    return kernels, (embedding * 0.02).astype(numpy_dtype)


def relaid(kernels, embedding):
    """`fused_qkv(kernels)` with each down kernel as `[out, in]` rows, and
    the table as `[hidden, vocabulary]` columns: the XLA decode loops'
    layouts. Returns `(kernels, is_rows, columns)`."""
    import numpy as np

    fused = fused_qkv(kernels)
    is_rows = [
        i % len(FUSED_GROUPS) == len(FUSED_GROUPS) - 1 for i in range(len(fused))
    ]
    fused = [
        np.ascontiguousarray(k.T) if r else k
        for k, r in zip(fused, is_rows, strict=True)
    ]
    return fused, is_rows, np.ascontiguousarray(embedding.T)


def fused_qkv(kernels):
    """`weights()`' layer kernels with each layer's first three as one.

    The query, key and value kernels side by side (`[512, 1024]`), as the
    XLA decode loop carries them; `FUSED_GROUPS` orders the result.
    """
    import numpy as np

    fused = []
    for layer in range(LAYERS):
        own = kernels[layer * len(SHAPES) : (layer + 1) * len(SHAPES)]
        fused.append(np.concatenate(own[:3], axis=1))
        fused.extend(own[3:])
    return fused


def int8_weights():
    """int8 codes and float32 per-output-channel scales of `weights`."""
    import numpy as np

    kernels, embedding = weights("float32")

    def quantize(matrix, axis):
        scale = np.abs(matrix).max(axis=axis, keepdims=True) / 127.0
        return np.round(matrix / scale).astype("int8"), scale.astype("float32")

    return [quantize(k, 0) for k in kernels], quantize(embedding, 1)


def xla_int8_rows(x, copies, concatenate):
    """A lone row as `copies` rows, the form our XLA decode step multiplies.

    `keras_gemma2.layers.int8_products`: XLA runs int8 x int8 products on
    its int8 kernels only with two or more rows, so the decoder's one-row
    projections take two equal rows and its head three (the hidden row split
    into three int8 terms). Here the copies are equal; the time is the same.
    """
    if x.shape[0] != 1:
        return x
    return concatenate([x] * copies, 0)


def jax_products(dtype, rows_in=1):
    import jax
    import jax.numpy as jnp
    import numpy as np

    if dtype == "int8":
        kernels, (table, table_scale) = int8_weights()
        arguments = (
            [(jnp.asarray(c), jnp.asarray(s)) for c, s in kernels],
            (jnp.asarray(table), jnp.asarray(table_scale)),
        )

        def quantize_row(x):
            scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
            return jnp.round(x / scale).astype(jnp.int8), scale

        def product(x, codes, scale, transpose=False, copies=2):
            q, row_scale = quantize_row(xla_int8_rows(x, copies, jnp.concatenate))
            dims = (((1,), (1 if transpose else 0,)), ((), ()))
            out = jax.lax.dot_general(q, codes, dims, preferred_element_type=jnp.int32)
            scale = scale.reshape(1, -1)
            return out.astype(jnp.float32) * row_scale * scale

        def products(rows, arguments):
            kernels, (table, table_scale) = arguments
            steps = int8_steps(product, kernels, table, table_scale)
            return in_sequence(rows, steps, nudge)

    else:
        kernels, is_rows, columns = relaid(*weights("float32"))
        cast = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        arguments = (
            [jnp.asarray(k, cast) for k in kernels],
            jnp.asarray(columns, cast),
        )

        def products(rows, arguments):
            kernels, columns = arguments
            steps = [
                (k.shape[1], (lambda x, k=k: jnp.einsum("ti,oi->to", x, k)))
                if r
                else (k.shape[0], functools.partial(jnp.matmul, b=k))
                for k, r in zip(kernels, is_rows, strict=True)
            ]
            steps.append((HEAD, functools.partial(jnp.matmul, b=columns)))
            return in_sequence(rows, steps, nudge, FUSED_GROUPS)

    input_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32

    def nudge(out):
        return (jnp.sum(out) * 1e-12).astype(input_dtype)

    generator = np.random.default_rng(1)
    rows = {
        n: jnp.asarray(generator.standard_normal((rows_in, n)), input_dtype)
        for n in (HIDDEN, FFW)
    }

    if rows_in == 1:
        # CALLS tokens in one program, as our decode loop runs them.
        @jax.jit
        def tokens(rows, arguments):
            def step(_, rows):
                return chained(rows, products(rows, arguments), jnp.sum)

            return jax.lax.fori_loop(0, CALLS, step, rows)

        def run():
            jax.block_until_ready(tokens(rows, arguments))

        run.tokens = CALLS
    else:
        token = jax.jit(products)

        def run():
            jax.block_until_ready(token(rows, arguments))

    return run


def tensorflow_products(dtype, rows_in=1):
    import numpy as np
    import tensorflow as tf

    generator = np.random.default_rng(1)
    rows = {
        n: generator.standard_normal((rows_in, n)).astype("float32")
        for n in (HIDDEN, FFW)
    }
    if dtype == "int8":
        kernels, (table, table_scale) = int8_weights()
        kernels = [(tf.constant(c), tf.constant(s)) for c, s in kernels]
        table, table_scale = tf.constant(table), tf.constant(table_scale)

        def product(x, codes, scale, transpose=False, copies=2):
            x = xla_int8_rows(x, copies, tf.concat)
            row_scale = tf.reduce_max(tf.abs(x), axis=-1, keepdims=True) / 127.0
            q = tf.cast(tf.round(x / row_scale), tf.int8)
            out = tf.matmul(q, codes, transpose_b=transpose, output_type=tf.int32)
            return tf.cast(out, tf.float32) * row_scale * tf.reshape(scale, (1, -1))

        arguments = (kernels, (table, table_scale))

        def products(rows, arguments):
            kernels, (table, table_scale) = arguments
            steps = int8_steps(product, kernels, table, table_scale)
            return in_sequence(rows, steps, nudge)

    else:
        cast = tf.bfloat16 if dtype == "bfloat16" else tf.float32
        kernels, is_rows, columns = relaid(*weights("float32"))
        arguments = (
            [tf.cast(tf.constant(k), cast) for k in kernels],
            tf.cast(tf.constant(columns), cast),
        )
        rows = {n: tf.cast(r, cast) for n, r in rows.items()}

        def products(rows, arguments):
            kernels, columns = arguments
            steps = [
                (k.shape[1], functools.partial(tf.matmul, b=k, transpose_b=True))
                if r
                else (k.shape[0], functools.partial(tf.matmul, b=k))
                for k, r in zip(kernels, is_rows, strict=True)
            ]
            steps.append((HEAD, functools.partial(tf.matmul, b=columns)))
            return in_sequence(rows, steps, nudge, FUSED_GROUPS)

    rows = {n: tf.constant(r) for n, r in rows.items()}

    def nudge(out):
        return tf.cast(tf.reduce_sum(out) * 1e-12, rows[HIDDEN].dtype)

    # The weights are arguments of the program, as the model's variables are:
    # captured as constants, XLA folded the int8 codes into int32 copies.
    if rows_in == 1:
        # CALLS tokens in one program, as our decode loop runs them.
        @tf.function(jit_compile=True, autograph=False)
        def tokens(rows, arguments):
            def step(i, rows):
                return i + 1, chained(rows, products(rows, arguments), tf.reduce_sum)

            return tf.while_loop(lambda i, _: i < CALLS, step, (0, rows))[1]

        def run():
            outs = tokens(rows, arguments)
            outs[HIDDEN].numpy()

        run.tokens = CALLS
    else:
        token = tf.function(products, jit_compile=True, autograph=False)

        def run():
            token(rows, arguments)[-1].numpy()

    return run


def int8_steps(product, kernels, table, table_scale):
    """`in_sequence` steps of the XLA int8 products: layers, then the head.

    `product(x, codes, scale, transpose=False, copies=2)` is the backend's
    int8 product; the head's row goes as three int8 rows (`xla_int8_rows`).
    """
    steps = [
        (codes.shape[0], functools.partial(product, codes=codes, scale=scale))
        for codes, scale in kernels
    ]
    head = functools.partial(
        product, codes=table, scale=table_scale, transpose=True, copies=3
    )
    return steps + [(HEAD, head)]


def in_sequence(rows, steps, nudge, groups=GROUPS):
    """The products of `steps` (`(input size or HEAD, multiply)`), chained.

    A decoder's products depend on each other: a layer's attention output
    feeds its output projection, which feeds the feed-forward, and so on.
    Independent products of one set of rows would let XLA run two at once
    on the two cores, or merge those sharing an input into one larger
    product; no decoder can. So each group of products (`GROUPS`: the ones
    that do share an input in the model; `FUSED_GROUPS` when query, key
    and value are one matrix) reads its rows nudged by `nudge(out)` of the
    last product of the group before.
    """
    period = len(groups)
    outs, shift = [], None
    for index, (size, multiply) in enumerate(steps):
        x = rows[HIDDEN][-1:] if size == HEAD else rows[size]
        starts_group = (
            size == HEAD
            or index == 0
            or groups[index % period] != groups[(index - 1) % period]
        )
        if starts_group and outs:
            shift = nudge(outs[-1])
        outs.append(multiply(x if shift is None else x + shift))
    return outs


def chained(rows, outs, total):
    """The next token's input rows: `rows` nudged by every product's sum.

    Each token of a looped program then depends on all products of the one
    before, so none is hoisted out of the loop or skipped.
    """
    nudge = sum(total(out) for out in outs) * 1e-12
    return {n: r + nudge for n, r in rows.items()}


def torch_products(dtype, rows_in=1):
    import numpy as np
    import torch

    generator = np.random.default_rng(1)
    rows = {
        n: torch.from_numpy(generator.standard_normal((rows_in, n)))
        for n in (HIDDEN, FFW)
    }
    if dtype == "int8":
        # TorchDecoder's own int8 products: few rows on FBGEMM's packs where
        # torch has them (x86), a group sharing its rows (`GROUPS`) packed
        # as one (`torch_int8.packed_products`); otherwise `torch._int_mm`.
        from keras_gemma2.generation import torch_int8

        kernels, (table, table_scale) = int8_weights()

        def matrix(codes, scale, quantizer, transpose=False):
            # A variable-like tensor behind the codes, as a model's.
            codes = torch.from_numpy(np.ascontiguousarray(codes))
            source = torch.nn.Parameter(codes, requires_grad=False)
            view = source.detach().T if transpose else source.detach()
            scale = torch.from_numpy(scale).reshape(-1)
            return torch_int8.Int8Matrix(
                view, scale, quantizer, torch.float32, source=source
            )

        quantizer = torch_int8._RowQuantizer  # Keras' int8 defaults
        groups = grouped([matrix(c, s, quantizer) for c, s in kernels])
        head = matrix(table, table_scale, None, transpose=True)  # weight-only
        packed = torch_int8.packed_products(groups + [[head]])
        rows = {n: r.float() for n, r in rows.items()}

        def run():
            with torch.inference_mode():
                for group, pack in zip(groups, packed, strict=False):
                    x = rows[group[0].codes.shape[0]]
                    if pack is not None and pack.takes(x):
                        pack.split(x)
                    else:
                        torch_int8.products(x, *group)
                torch_int8.products(rows[HIDDEN][-1:], head)

    else:
        cast = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        kernels, embedding = weights("float32")
        kernels = [torch.from_numpy(k).to(cast) for k in kernels]
        embedding = torch.from_numpy(embedding).to(cast)
        rows = {n: r.to(cast) for n, r in rows.items()}

        # TorchDecoder's own float products: float32 kernels through their
        # `[out, in]` copies, a group sharing its rows (`GROUPS`) stacked
        # into one, split over threads on CPU; bfloat16 ones, few rows, on
        # FBGEMM's float16 packs where torch has them (`torch_half`).
        from keras_gemma2.generation import huge_pages, torch_half
        from keras_gemma2.generation.torch_int8 import products
        from keras_gemma2.generation.torch_matmul import (
            transposed_copies,
            transposed_product,
        )

        groups = grouped(kernels)
        head_rows = None
        if cast == torch.float32:
            groups = transposed_copies([[(k, k) for k in g] for g in groups])
            # The tied head in huge pages too, as `TorchDecoder` puts it.
            huge_pages.collapse([embedding])
            half = [None] * len(groups)
        else:
            pairs = [[(k.T, k) for k in g] for g in groups] + [[(embedding, embedding)]]
            half = torch_half.half_products(pairs)
            head_rows = half.pop()

        def run():
            with torch.inference_mode():
                for group, pack in zip(groups, half, strict=True):
                    x = rows[group[0].shape[0]]
                    if pack is not None and pack.takes(x):
                        pack.split(x)
                    else:
                        products(x, *group)
                last = rows[HIDDEN][-1:]
                if head_rows is not None and head_rows.takes(last):
                    head_rows(last)
                else:
                    transposed_product(last, embedding)

    return run


def grouped(matrices):
    """`matrices` (in `SHAPES` order, layer after layer) as the groups that
    share their rows (`GROUPS`), in the model's order."""
    groups = []
    for layer in range(LAYERS):
        for group in sorted(set(GROUPS)):
            groups.append(
                [
                    matrices[layer * len(SHAPES) + i]
                    for i, g in enumerate(GROUPS)
                    if g == group
                ]
            )
    return groups


def weight_bytes(dtype):
    per_layer = sum(a * b for a, b in SHAPES)
    return (LAYERS * per_layer + VOCABULARY * HIDDEN) * BYTES[dtype]


def median_seconds(run, repeats, calls):
    """Median over `repeats` rounds of one call's seconds (a round: `calls` calls)."""
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        rounds.append((time.perf_counter() - start) / calls)
    return statistics.median(rounds)


def child(backend, dtypes, repeats, cases):
    """Time `backend`'s products for each dtype; JSON lines out."""
    make = {
        "jax": jax_products,
        "tensorflow": tensorflow_products,
        "torch": torch_products,
    }[backend]
    for dtype in dtypes:
        run = make(dtype)
        run()  # compile
        row = {"backend": backend, "dtype": dtype}
        tokens = getattr(run, "tokens", 1)  # tokens per call
        seconds = median_seconds(run, repeats, CALLS // tokens) / tokens
        row["ms_per_token"] = seconds * 1e3
        if "b" in cases:
            run = make(dtype, rows_in=PROMPT_B)
            start = time.perf_counter()
            run()  # compile, and a first measure of a slow kernel
            first = time.perf_counter() - start
            if first > SLOW_PREFILL_S:
                # An isolated kernel this slow bounds nothing (the float32 row
                # is the floor); one more call is enough to say so.
                start = time.perf_counter()
                run()
                row["prefill_s"] = time.perf_counter() - start
            else:
                row["prefill_s"] = median_seconds(run, repeats, 2)
        print(json.dumps(row), flush=True)


def llamacpp_times(types, repeats, cases):
    """llama.cpp's decode ms per token (case a) and case (b) seconds, per type.

    Returns `{type: {"token_ms": ..., "case_b_s": ...}}`, `{}` without
    llama-cpp-python. Case (b) runs with flash attention, the issue's peer.
    """
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        print("# llama-cpp-python is not installed: no llama.cpp column")
        return {}
    from vs_llamacpp import gguf_path, llama_runner

    results = {}
    with tempfile.TemporaryDirectory() as directory:
        # Weights and GGUF files come from a jax process of their own, so this
        # process imports no backend besides llama.cpp.
        env = {**os.environ, "KERAS_BACKEND": "jax"}
        script = (
            "import sys; sys.path.insert(0, sys.argv[2]);"
            "from generate import make_weights;"
            "from vs_llamacpp import export_gguf_files;"
            "make_weights(sys.argv[1]);"
            "export_gguf_files(sys.argv[1], sys.argv[3].split(','))"
        )
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run(
            [sys.executable, "-c", script, directory, here, ",".join(types)],
            env=env,
            check=True,
            capture_output=True,
        )
        threads = os.cpu_count() or 1
        for gguf_type in types:
            path = gguf_path(directory, gguf_type)
            results[gguf_type] = {}
            if "a" in cases:
                prompt = list(range(10, 42))  # 32 tokens
                run = llama_runner(path, True, 128, threads)
                run(prompt, 65)  # warm-up
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run(prompt, 1)
                    short = time.perf_counter() - start
                    start = time.perf_counter()
                    run(prompt, 65)
                    times.append((time.perf_counter() - start - short) / 64)
                results[gguf_type]["token_ms"] = statistics.median(times) * 1e3
            if "b" in cases:
                prompt = [10 + i % 4000 for i in range(PROMPT_B)]
                run = llama_runner(path, True, PROMPT_B + NEW_B, threads)
                run(prompt, NEW_B)  # warm-up
                results[gguf_type]["case_b_s"] = median_seconds(
                    functools.partial(run, prompt, NEW_B), repeats, 1
                )
    return results


def print_case_a(rows, peers, repeats):
    print(
        f"# matmul_floor: {os.cpu_count()} cores; one token's weight products "
        f"of the mid config; medians of {repeats} rounds of {CALLS} tokens"
    )
    print(
        "| backend | dtype | products ms/token | GB/s | llama.cpp type "
        "| llama.cpp whole token ms | products / llama.cpp token |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ms = row["ms_per_token"]
        rate = weight_bytes(row["dtype"]) / ms / 1e6
        peer = PEER[row["dtype"]]
        token_ms = peers.get(peer, {}).get("token_ms")
        if token_ms:
            tail = f"{peer} | {token_ms:.2f} | {ms / token_ms:.2f}x |"
        else:
            tail = "- | - | - |"
        print(f"| {row['backend']} | {row['dtype']} | {ms:.2f} | {rate:.1f} | {tail}")


def case_b_floor(row, rows):
    """Seconds no case (b) call on this backend and dtype can beat, and whence.

    Each part is the faster of the dtype's own products and the float32
    products of the same backend: converting weights to float32 and
    multiplying those (what XLA does with bfloat16 weights inside a loop)
    costs at least the float32 products.
    """
    same = [r for r in rows if r["backend"] == row["backend"] and "prefill_s" in r]
    options = [r for r in same if r["dtype"] in (row["dtype"], "float32")]
    prefill = min(options, key=lambda r: r["prefill_s"])
    decode = min(options, key=lambda r: r["ms_per_token"])
    seconds = prefill["prefill_s"] + (NEW_B - 1) * decode["ms_per_token"] / 1e3
    return seconds, prefill["dtype"], decode["dtype"]


def print_case_b(rows, peers, repeats):
    print(
        f"# matmul_floor case (b): a {PROMPT_B}-token prompt's weight products "
        f"(56 of {PROMPT_B} rows, the head on the last row) + {NEW_B - 1} decode "
        f"tokens' products; medians of {repeats} rounds. No attention, norms or "
        "sampling: a floor. The llama.cpp column is its whole case (b) call "
        f"with flash attention; the budget is that / {TARGET_B}"
    )
    print(
        "| backend | dtype | prefill products s | decode products ms/token "
        "| floor s (prefill from / decode from) | llama.cpp | llama.cpp s "
        f"| budget s (/{TARGET_B}) | floor / budget |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "prefill_s" not in row:
            continue
        floor, prefill_from, decode_from = case_b_floor(row, rows)
        peer = PEER[row["dtype"]]
        case_b_s = peers.get(peer, {}).get("case_b_s")
        if case_b_s:
            budget = case_b_s / TARGET_B
            verdict = "over: unreachable" if floor > budget else "under"
            tail = f"{peer} flash | {case_b_s:.2f} | {budget:.2f} | "
            tail += f"{floor / budget:.2f} ({verdict}) |"
        else:
            tail = "- | - | - | - |"
        print(
            f"| {row['backend']} | {row['dtype']} | {row['prefill_s']:.3f} "
            f"| {row['ms_per_token']:.2f} | {floor:.2f} ({prefill_from} / "
            f"{decode_from}) | {tail}"
        )


def child_rows(script, backend, arguments):
    """The JSON rows `script --child backend *arguments` prints under `backend`.

    The child runs in a process of its own with `KERAS_BACKEND=backend`; when
    it fails, the end of its stderr is printed as a `#` line and its rows so
    far are kept.
    """
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, script, "--child", backend, *arguments]
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        print(f"# {backend} failed: {process.stderr.strip()[-500:]}")
    return [json.loads(x) for x in process.stdout.splitlines() if x[:1] == "{"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--cases", default="a", help="a, b or a,b")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    cases = args.cases.split(",")
    if not set(cases) <= {"a", "b"}:
        parser.error(f"--cases takes a, b or a,b; received {args.cases!r}")
    if args.child:
        child(args.child, dtypes, args.repeats, cases)
        return
    rows = []
    for backend in args.backends.split(","):
        arguments = ["--dtypes", args.dtypes, "--repeats", str(args.repeats)]
        rows += child_rows(__file__, backend, arguments + ["--cases", args.cases])
    peers = {}
    if not args.no_llamacpp:
        peers = llamacpp_times([PEER[d] for d in dtypes], args.repeats, cases)
    if "a" in cases:
        print_case_a(rows, peers, args.repeats)
    if "b" in cases:
        print_case_b(rows, peers, args.repeats)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
