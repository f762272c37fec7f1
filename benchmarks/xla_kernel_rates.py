"""How fast XLA (CPU) streams one decode row's weights, by form and dtype.

Usage: `python benchmarks/xla_kernel_rates.py [--backends jax,tensorflow]
[--repeats 7] [--no-llamacpp]`

Issue #17's bfloat16 and int8 lines on jax and tensorflow are missed with
the floor of `benchmarks/matmul_floor.py`: one token's bare products
already take longer than the share of llama.cpp's token the lines allow.
This script shows where that floor comes from. It times single products of
the shape of a mid-config feed-forward kernel (`[512, 2048]`, one row in
the form our decoders use) in each of the forms XLA offers for the dtype:

- `float32 x @ w`: XLA's one-row dot (Eigen), what float decoding streams;
- `bfloat16 x @ w`: the same with bfloat16 operands; XLA converts the
  weights to float32 inside the program;
- `bfloat16 sum(w * x)`: the weights converted and multiplied in one
  fusion, `sum(float32(w) * x[:, None], axis=0)`, which reads two bytes a
  weight and writes nothing;
- `int8 x int8, two rows`: `int8 x int8 -> int32` on XLA's int8 kernels
  (YNNPACK), the lone row as two rows, as `layers/int8_products.py` sends it
  (`matmul_floor.xla_int8_rows`);
- `int8 sum(w * x)`: int8 weights converted in one fusion, as above.

Each form is timed in two compiled programs of 48 chained products (each
row depends on the product before it, as in decoding): over 48 different
kernels (`streamed`, 50-200 MB, more than this machine's 32 MB L3), and
over 2 kernels used 24 times each (`cached`, 2-8 MB). A form that is
about as slow from cache as from memory is limited by its kernel, not by
memory, and no layout or byte count changes that.

The peer, in the same run, is llama.cpp's whole decode token on the mid
config at the same precision (f32, f16, q8_0; `llamacpp_times` of
`benchmarks/matmul_floor.py`, with llama-cpp-python installed), as weights
read per nanosecond: a token reads each weight once, so `weights/ns` is
the rate that matters to a decoder, and `streamed / llama.cpp` is the
largest ratio a decoder whose every product ran in that form could reach
against llama.cpp's token, if everything else (attention, norms, the pick)
were free. The issue's lines are 1.0 (float32), 0.9 (bfloat16) and 0.7
(int8) for whole case (a) calls, which also hold a 32-token prompt, where
llama.cpp spends relatively more (our float32 calls clear 1.0 with products
at 0.96-1.03x of llama.cpp's token, stop 39).

Each backend runs in its own process; the table gives medians of
`--repeats` calls.
"""

import argparse
import functools
import json

from matmul_floor import (
    BYTES,
    PEER,
    child_rows,
    llamacpp_times,
    median_seconds,
    weight_bytes,
    xla_int8_rows,
)

IN, OUT = 512, 2048
PRODUCTS = 48
FORMS = (
    "float32 x @ w",
    "bfloat16 x @ w",
    "bfloat16 sum(w * x)",
    "int8 x int8, two rows",
    "int8 sum(w * x)",
)


def kernels(dtype, count):
    """`count` random `[IN, OUT]` kernels as numpy arrays of `dtype`."""
    import numpy as np

    generator = np.random.default_rng(0)
    if dtype == "int8":
        return [
            generator.integers(-127, 128, (IN, OUT), dtype=np.int8)
            for _ in range(count)
        ]
    # bfloat16 kernels start as float32; each backend casts them.
    return [
        (generator.standard_normal((IN, OUT)) * 0.02).astype(np.float32)
        for _ in range(count)
    ]


def chain(x, weights, product, total):
    """`PRODUCTS` products in a row, each row nudged by the one before's sum."""
    for i in range(PRODUCTS):
        y = product(x, weights[i % len(weights)])
        x = x + 1e-12 * total(y)
    return x


def jax_run(form, count):
    import jax
    import jax.numpy as jnp

    dtype = form.split()[0]
    weights = [jnp.asarray(k) for k in kernels(dtype, count)]
    if dtype == "bfloat16":
        weights = [w.astype(jnp.bfloat16) for w in weights]

    def product(x, w):
        if form == "float32 x @ w":
            return jnp.matmul(x[None], w)[0]
        if form == "bfloat16 x @ w":
            return jnp.matmul(x[None].astype(jnp.bfloat16), w)[0].astype(jnp.float32)
        if form == "int8 x int8, two rows":
            codes = jnp.clip(jnp.round(x * 64.0), -127, 127).astype(jnp.int8)
            rows = xla_int8_rows(codes[None], 2, jnp.concatenate)
            dims = (((1,), (0,)), ((), ()))
            out = jax.lax.dot_general(rows, w, dims, preferred_element_type=jnp.int32)
            return out[0].astype(jnp.float32)
        return jnp.sum(w.astype(jnp.float32) * x[:, None], axis=0)

    run = jax.jit(functools.partial(chain, product=product, total=jnp.sum))
    x = jnp.ones((IN,), jnp.float32)
    return lambda: run(x, weights).block_until_ready()


def tensorflow_run(form, count):
    import tensorflow as tf

    dtype = form.split()[0]
    weights = [tf.constant(k) for k in kernels(dtype, count)]
    if dtype == "bfloat16":
        weights = [tf.cast(w, tf.bfloat16) for w in weights]

    def product(x, w):
        if form == "float32 x @ w":
            return tf.matmul(x[None], w)[0]
        if form == "bfloat16 x @ w":
            return tf.cast(tf.matmul(tf.cast(x[None], tf.bfloat16), w)[0], tf.float32)
        if form == "int8 x int8, two rows":
            codes = tf.cast(tf.clip_by_value(tf.round(x * 64.0), -127, 127), tf.int8)
            rows = xla_int8_rows(codes[None], 2, tf.concat)
            out = tf.matmul(rows, w, output_type=tf.int32)
            return tf.cast(out[0], tf.float32)
        return tf.reduce_sum(tf.cast(w, tf.float32) * x[:, None], axis=0)

    # The kernels are arguments, as a model's variables are (captured as
    # constants, XLA would fold the conversions into the program).
    run = tf.function(
        functools.partial(chain, product=product, total=tf.reduce_sum),
        jit_compile=True,
        autograph=False,
    )
    x = tf.ones((IN,), tf.float32)
    return lambda: run(x, weights).numpy()


def child(backend, repeats):
    """Time each form streamed and cached; JSON lines out."""
    make = {"jax": jax_run, "tensorflow": tensorflow_run}[backend]
    for form in FORMS:
        row = {"backend": backend, "form": form}
        for name, count in (("streamed", PRODUCTS), ("cached", 2)):
            run = make(form, count)
            run()  # compile and warm up
            row[name] = median_seconds(run, repeats, 1) / PRODUCTS
        print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats takes a positive count; received {args.repeats}")
    if args.child:
        child(args.child, args.repeats)
        return
    backends = args.backends.split(",")
    unknown = set(backends) - {"jax", "tensorflow"}
    if unknown:
        parser.error(f"--backends takes jax, tensorflow; received {sorted(unknown)}")
    rows = []
    for backend in backends:
        rows += child_rows(__file__, backend, ["--repeats", str(args.repeats)])
    peers = {}
    if not args.no_llamacpp:
        peers = llamacpp_times(sorted(set(PEER.values())), args.repeats, ["a"])
    # One token of the mid config reads this many weights (`weight_bytes` at
    # one byte a weight).
    token_weights = weight_bytes("int8")
    print(
        f"# xla_kernel_rates: one [{IN}, {OUT}] product, {PRODUCTS} chained in "
        f"one call, medians of {args.repeats} calls; llama.cpp: its whole decode "
        f"token on the mid config ({token_weights / 1e6:.1f}M weights)"
    )
    print(
        "| backend | form | bytes/weight | us streamed | us cached | GB/s streamed "
        "| GB/s cached | weights/ns streamed | weights/ns cached "
        "| llama.cpp token weights/ns | streamed / llama.cpp |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dtype = r["form"].split()[0]
        size, weights = BYTES[dtype], IN * OUT
        streamed, cached = weights / r["streamed"] / 1e9, weights / r["cached"] / 1e9
        token_ms = peers.get(PEER[dtype], {}).get("token_ms")
        if token_ms:
            peer = token_weights / token_ms / 1e6
            tail = f"{PEER[dtype]} {peer:.2f} | {streamed / peer:.2f}x |"
        else:
            tail = "- | - |"
        print(
            f"| {r['backend']} | {r['form']} | {size} | {r['streamed'] * 1e6:.0f} "
            f"| {r['cached'] * 1e6:.0f} | {streamed * size:.1f} | {cached * size:.1f} "
            f"| {streamed:.2f} | {cached:.2f} | {tail}"
        )
    if any(r["form"] == "bfloat16 x @ w" for r in rows):
        print(
            "# cached `bfloat16 x @ w`: XLA may convert each of the two kernels "
            "once per call and reuse the copies, so that cell can time float32 "
            "products"
        )


if __name__ == "__main__":
    main()
