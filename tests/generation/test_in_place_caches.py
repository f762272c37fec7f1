"""The compiled jax decode loop writes its KV caches in place.

On XLA:CPU a decode loop that copies its caches at every step still
generates the right tokens, only slower the longer the context (at a
2048-token context, 3 of 15 ms per token on the benchmark's mid model), so
no correctness test notices. Here the optimized HLO of a decode segment is
read: no cache-shaped buffer may be copied inside the loop body. A control
compiles the same segment without `XLA_CPU_OPTIONS` and must find copies,
which shows the check can fail. jax only: TensorFlow's XLA reads its
options from `XLA_FLAGS` once per process, and torch decodes eagerly with
preallocated caches (`TorchDecoder`).
"""

import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_gemma2.generation import compiled
from keras_gemma2.generation.decode import decode_segment, prefill
from tests.generation.test_generate import make_causal_lm

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="reads jax's compiled HLO"
)

PROMPT_LENGTH, MAX_LENGTH = 16, 48


def _computation(text, name):
    """The body text of the HLO computation `name`."""
    start = text.index(f"\n%{name} ")
    return text[start : text.index("\n}", start)]


def cache_copies_in_loop(causal_lm):
    """Copies of cache-shaped buffers inside the decode segment's loop body."""
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
    text = segment.lower((state, prompt_mask)).compile().as_text()
    bodies = re.findall(r"while\(.*?body=%([\w.\-]+)", text)
    assert bodies, "the decode segment compiled without a loop"
    cache_shapes = {
        "[" + ",".join(str(d) for d in array.shape) + "]"
        for pair in state[1]
        for array in pair
    }
    copies = []
    for body in bodies:
        for line in _computation(text, body).splitlines():
            match = re.search(r"= \w+(\[[\d,]*\])\S* copy\(", line)
            if match and match.group(1) in cache_shapes:
                copies.append(line.strip())
    return copies


def test_decode_loop_updates_caches_in_place():
    assert cache_copies_in_loop(make_causal_lm()) == []


def test_control_without_the_options_copies_caches(monkeypatch):
    monkeypatch.setattr(compiled, "XLA_CPU_OPTIONS", None)
    assert cache_copies_in_loop(make_causal_lm())
