"""Regression guard: each kind of model decodes on its backend's fast path.

A model that a decode path cannot handle falls back to the portable phases
run eagerly, which still generates the right tokens, only 5-20x slower, so
no correctness test notices. Here every kind of model users decode with
(float32, bfloat16 with LoRA, int8, QLoRA on int8; bfloat16 and LoRA share
one model to keep compilations down on jax and tensorflow) generates a few
tokens and
the program must report the backend's fast path (`jax_jit`,
`tensorflow_xla`, or `TorchDecoder` on torch). (int4 is left out: torch has
no int4 decode path yet, and quantizing to int4 alone takes ~10 s here.)

Not a timed assertion: `GenerationProgram.decode_path` records the path
each call took.
"""

import keras
import pytest
from keras import ops

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.generation import torch_decode
from keras_gemma2.generation.compiled import DECODE_PATHS
from tests.generation.test_generate import make_causal_lm
from tests.generation.test_quantized_decode import padded_prompts

FAST_PATH = {"jax": "jax_jit", "tensorflow": "tensorflow_xla", "torch": "torch_decoder"}
PROMPTS = [[2, 7, 9], [2, 5]]
MAX_LENGTH = 8


def _bfloat16_lora(causal_lm):
    config = {**causal_lm.backbone.get_config(), "dtype": "bfloat16"}
    backbone = Gemma2Backbone.from_config(config)
    backbone.set_weights(causal_lm.backbone.get_weights())
    backbone.enable_lora(2)
    return Gemma2CausalLM(backbone)


def _int8(causal_lm):
    causal_lm.quantize("int8")
    return causal_lm


def _qlora(causal_lm):
    causal_lm.quantize("int8")
    causal_lm.backbone.enable_lora(2)
    return causal_lm


VARIANTS = {
    "float32": lambda causal_lm: causal_lm,
    "bfloat16_lora": _bfloat16_lora,
    "int8": _int8,
    "qlora_int8": _qlora,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_takes_the_fast_decode_path(variant):
    causal_lm = VARIANTS[variant](make_causal_lm())
    causal_lm.compile(sampler="greedy")
    outputs = causal_lm.generate(
        padded_prompts(PROMPTS, MAX_LENGTH), stop_token_ids=None
    )
    generated = ops.convert_to_numpy(outputs["token_ids"])
    assert generated.shape == (len(PROMPTS), MAX_LENGTH)
    programs = causal_lm.generate_function.programs.values()
    paths = {program.decode_path for program in programs}
    assert paths <= set(DECODE_PATHS)
    assert paths == {FAST_PATH[keras.config.backend()]}, (
        torch_decode.unsupported_layers(causal_lm)
    )


def test_run_eagerly_reports_the_portable_path():
    """The guard can fail: a model forced off the fast path is reported."""
    causal_lm = make_causal_lm()
    causal_lm.compile(sampler="greedy", run_eagerly=True)
    causal_lm.generate(padded_prompts([[2, 7]], 3), stop_token_ids=None)
    programs = causal_lm.generate_function.programs.values()
    assert {program.decode_path for program in programs} == {"portable_eager"}
