"""The compiled decode loop writes its KV caches in place (jax, TensorFlow).

On XLA:CPU a decode loop that copies its caches at every step still
generates the right tokens, only slower the longer the context (at a
2048-token context, about 3 of 14 ms per token on the benchmark's mid model),
so no correctness test notices. Here the optimized HLO of a decode segment is
read: no cache-shaped buffer may be copied inside the loop body. A control
compiles the same segment without the options and must find copies, which
shows the check can fail.

- jax takes `compiled.XLA_CPU_OPTIONS` per program, so it is checked in this
  process.
- TensorFlow reads its XLA options from `XLA_FLAGS` once per process, at its
  first XLA compilation, so each check runs in a fresh process: one where
  `compile_function` adds the options, and a control where the user's
  `XLA_FLAGS` turns the option off (which must win).

Torch decodes eagerly with preallocated caches (`TorchDecoder`).
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_gemma2.generation import compiled
from keras_gemma2.generation.decode import decode_segment, prefill
from tests.generation.test_generate import make_causal_lm

PROMPT_LENGTH, MAX_LENGTH = 16, 48
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTION = "xla_cpu_copy_insertion_use_region_analysis"


def _computation(text, name):
    """The body text of the HLO computation `name`."""
    match = re.search(rf"^%?{re.escape(name)} ", text, re.MULTILINE)
    assert match, f"no computation {name} in the HLO"
    return text[match.start() : text.index("\n}", match.start())]


def decode_loop_bodies(causal_lm, hlo_text):
    """`(loop body texts, state)` of a compiled decode segment, batch 1.

    `hlo_text(segment, args)` returns the optimized HLO text of the compiled
    `segment` for `args`; `state` is the prefill's `(prompt, caches, index,
    done)`.
    """
    token_ids = np.zeros((1, MAX_LENGTH), "int32")
    token_ids[0, :PROMPT_LENGTH] = np.arange(2, 2 + PROMPT_LENGTH)
    padding_mask = (token_ids > 0).astype("int32")
    start = compiled.compile_function(
        causal_lm, lambda args: prefill(causal_lm, *args, PROMPT_LENGTH)
    )
    state = start(
        (ops.convert_to_tensor(token_ids), ops.convert_to_tensor(padding_mask))
    )
    segment = compiled.compile_function(
        causal_lm,
        lambda args: decode_segment(causal_lm, *args, MAX_LENGTH, None),
    )
    prompt_mask = ops.cast(padding_mask, "bool")
    text = hlo_text(segment, (state, prompt_mask))
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", text)
    assert bodies, "the decode segment compiled without a loop"
    return [_computation(text, body) for body in bodies], state


def cache_copies_in_loop(causal_lm, hlo_text):
    """Copies of cache-shaped buffers inside the decode segment's loop body."""
    bodies, state = decode_loop_bodies(causal_lm, hlo_text)
    cache_shapes = {
        "[" + ",".join(str(d) for d in array.shape) + "]"
        for pair in state[1]
        for array in pair
    }
    copies = []
    for body in bodies:
        for line in body.splitlines():
            match = re.search(r"= \w+(\[[\d,]*\])\S* copy\(", line)
            if match and match.group(1) in cache_shapes:
                copies.append(line.strip())
    return copies


def jax_hlo(segment, args):
    return segment.lower(args).compile().as_text()


def tensorflow_hlo(segment, args):
    return segment.experimental_get_compiler_ir(args)(stage="optimized_hlo")


def tensorflow_copies(xla_flags):
    """`cache_copies_in_loop` in a fresh TensorFlow process, and its XLA_FLAGS.

    `xla_flags`: the `XLA_FLAGS` the process starts with (`None`: unset).
    """
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    script = (
        "import json, os;"
        "from tests.generation.test_in_place_caches import *;"
        "copies = cache_copies_in_loop(make_causal_lm(), tensorflow_hlo);"
        "print(json.dumps([copies, os.environ.get('XLA_FLAGS')]))"
    )
    process = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


jax_only = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="reads jax's compiled HLO in process"
)
tensorflow_only = pytest.mark.skipif(
    keras.config.backend() != "tensorflow",
    reason="runs TensorFlow processes (the TensorFlow lane checks them)",
)


@jax_only
def test_jax_decode_loop_updates_caches_in_place():
    assert cache_copies_in_loop(make_causal_lm(), jax_hlo) == []


@jax_only
def test_jax_control_without_the_options_copies_caches(monkeypatch):
    monkeypatch.setattr(compiled, "XLA_CPU_OPTIONS", None)
    assert cache_copies_in_loop(make_causal_lm(), jax_hlo)


@tensorflow_only
def test_tensorflow_decode_loop_updates_caches_in_place():
    copies, flags = tensorflow_copies("--xla_cpu_enable_fast_math=false")
    assert copies == []
    # The user's flags are kept; the option is appended.
    assert flags == f"--xla_cpu_enable_fast_math=false --{OPTION}=true"


@tensorflow_only
def test_tensorflow_user_flag_wins_and_control_copies_caches():
    copies, flags = tensorflow_copies(f"--{OPTION}=false")
    assert flags == f"--{OPTION}=false"
    assert copies


def test_tensorflow_xla_flags_appends_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    assert compiled.tensorflow_xla_flags() == [f"--{OPTION}=true"]
    assert os.environ["XLA_FLAGS"] == f"--{OPTION}=true"
    assert compiled.tensorflow_xla_flags() == []
    assert os.environ["XLA_FLAGS"] == f"--{OPTION}=true"
