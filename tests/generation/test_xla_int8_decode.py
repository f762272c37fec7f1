"""int8 models on XLA (jax, tensorflow): the decode loop multiplies in int8.

XLA:CPU runs `int8 x int8 -> int32` products on its int8 kernels only when
both operands are matrices; a batch-1 decode step's one-row products are
lowered to loops over `s32` copies of the weights, 15x slower, with the same
tokens (see `keras_gemma2/layers/int8_products.py`). So the guard reads the
optimized HLO of a decode segment: every int8 kernel (seven per block, and
the tied head) must be multiplied by an int32-producing product of at least
two rows. A control, with the two-row path turned off, must find only the
head's with more than one row, which shows the check can fail.

The tokens are checked against the quantized model's own uncached forward
pass (Keras' int8 layers), at batch 1 where the two-row path applies.
"""

import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_gemma2.layers import projection
from tests.generation.test_generate import make_causal_lm
from tests.generation.test_in_place_caches import (
    decode_loop_bodies,
    jax_hlo,
    tensorflow_hlo,
)
from tests.generation.test_quantized_decode import full_logits, padded_prompts

pytestmark = pytest.mark.skipif(
    keras.config.backend() not in ("jax", "tensorflow"),
    reason="XLA compiles generation on jax and tensorflow; torch's int8 decode "
    "is TorchDecoder's (tests/generation/test_int8_decode.py)",
)
# An int32 matrix produced by a dot, or by a fusion XLA hands to YNNPACK.
INT8_PRODUCT = re.compile(r"= s32\[(\d+),(\d+)\]\S* (dot\(|fusion\(.*__ynn_fusion)")


def _int8_causal_lm():
    causal_lm = make_causal_lm()
    causal_lm.quantize("int8")
    return causal_lm


def int8_product_rows(causal_lm):
    """Row counts of the int32 products in the decode loop's bodies."""
    hlo_text = jax_hlo if keras.config.backend() == "jax" else tensorflow_hlo
    bodies, _ = decode_loop_bodies(causal_lm, hlo_text)
    return [
        int(match.group(1))
        for body in bodies
        for match in map(INT8_PRODUCT.search, body.splitlines())
        if match
    ]


def test_decode_loop_multiplies_every_int8_kernel_with_two_or_more_rows():
    causal_lm = _int8_causal_lm()
    rows = int8_product_rows(causal_lm)
    kernels = 7 * causal_lm.backbone.num_layers + 1
    assert len(rows) == kernels, rows
    assert min(rows) >= 2, rows
    assert rows.count(3) == 1  # the head: three int8 terms of the hidden row


def test_control_without_the_two_row_path_finds_only_the_head(monkeypatch):
    monkeypatch.setattr(projection, "_int8_duplicated", lambda layer, x: False)
    rows = int8_product_rows(_int8_causal_lm())
    # jax keeps one-row int32 dots (over converted weights); TensorFlow
    # fuses them into loops. Either way only the head has more rows.
    assert [count for count in rows if count >= 2] == [3], rows


def test_batch_one_greedy_tokens_are_the_argmax_of_full_passes():
    causal_lm = _int8_causal_lm()
    prompt, max_length = [2, 9, 4, 4, 8], 24  # the tiny window is 5
    outputs = causal_lm.generate(
        padded_prompts([prompt], max_length), stop_token_ids=None
    )
    programs = causal_lm.generate_function.programs.values()
    fast = {"jax": "jax_jit", "tensorflow": "tensorflow_xla"}[keras.config.backend()]
    assert {program.decode_path for program in programs} == {fast}
    generated = ops.convert_to_numpy(outputs["token_ids"])
    logits = full_logits(causal_lm, generated)
    expected = logits[0, len(prompt) - 1 : max_length - 1].argmax(-1)
    np.testing.assert_array_equal(generated[0, len(prompt) :], expected)
