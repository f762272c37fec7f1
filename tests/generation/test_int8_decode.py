"""int8 models on torch's fast decode path, against the quantized layers.

`Gemma2CausalLM.quantize("int8")` models decode with `TorchDecoder`, whose
int8 projections (`torch_int8.Int8Matrix`) multiply the layers' own codes
with torch's int8 kernels. The reference is the model's normal forward
pass, i.e. Keras' quantized `EinsumDense`/`ReversibleEmbedding` layers.

Tolerances (measured on the tiny config, 2 rows, 17 decode positions past
the window, max |logit| difference):
- float32: <= 1e-5 asserted; measured 2.4e-7.
- bfloat16: <= 1% of the logits' std asserted; measured 0.0 (the same
  roundings in the same order).
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_gemma2.generation import torch_decode
from keras_gemma2.generation.kv_cache import empty_cache
from keras_gemma2.generation.torch_int8 import Int8Matrix, int_mm, products
from tests.generation.test_generate import make_causal_lm
from tests.generation.test_quantized_decode import padded_prompts
from tests.generation.test_torch_decode import (
    LENGTH,
    fast_and_portable_logits,
    make_configured,
)

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="TorchDecoder is the torch backend's decode path; it runs only there",
)


def _randomize_lora(causal_lm):
    """Adapters with non-zero `B`, so they change the output."""
    rng = np.random.RandomState(1)
    for variable in causal_lm.backbone.trainable_variables:
        if "lora" in variable.path:
            variable.assign(rng.normal(0.0, 0.3, variable.shape).astype("float32"))


def _quantized(dtype, qlora=False):
    causal_lm = make_configured(dtype) if dtype != "float32" else make_causal_lm()
    causal_lm.quantize("int8")
    if qlora:
        causal_lm.backbone.enable_lora(2, target_names="all")
        _randomize_lora(causal_lm)
    return causal_lm


@pytest.mark.parametrize(
    "dtype, qlora", [("float32", False), ("bfloat16", False), ("float32", True)]
)
def test_int8_logits_equal_the_quantized_layers(dtype, qlora):
    causal_lm = _quantized(dtype, qlora)
    assert torch_decode.supports(causal_lm)
    token_ids = np.random.RandomState(3).randint(0, 96, (2, LENGTH)).astype("int32")
    for raw_prefill in (False, True):
        fast, full = fast_and_portable_logits(
            causal_lm, token_ids, [5, 3], raw_prefill=raw_prefill
        )
        fast, full = fast.astype("float32"), full.astype("float32")
        error = np.abs(fast - full).max()
        print(f"MEASURED {dtype} qlora={qlora} raw={raw_prefill}: max|d|={error:.2e}")
        if dtype == "float32":
            assert error <= 1e-5
        else:
            assert error <= 0.01 * full.std()
        np.testing.assert_array_equal(fast.argmax(-1), full.argmax(-1))


def test_greedy_tokens_equal_the_portable_generation():
    causal_lm = _quantized("float32")
    inputs = padded_prompts([[2, 7, 9], [2, 5]], 16)
    fast = causal_lm.generate(inputs, stop_token_ids=None)
    programs = causal_lm.generate_function.programs.values()
    assert {program.decode_path for program in programs} == {"torch_decoder"}
    # The reference: the whole portable program (Keras' quantized layers).
    portable = causal_lm.generate_step(
        {key: ops.convert_to_tensor(value) for key, value in inputs.items()}
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(fast["token_ids"]),
        ops.convert_to_numpy(portable["token_ids"]),
    )


def test_decoder_multiplies_the_layers_int8_codes_in_place():
    """No dequantized kernel is held: the decoder's matrices are views."""
    causal_lm = _quantized("float32")
    backbone = causal_lm.backbone
    caches = empty_cache(backbone, 1, 5, 8)
    decoder = torch_decode.TorchDecoder(causal_lm, caches)
    for layer, block in zip(decoder.layers, backbone.transformer_layers, strict=True):
        pairs = {
            "query": block.attention.query_dense,
            "output": block.attention.output_dense,
            "down": block.ffw.down_dense,
        }
        for name, keras_layer in pairs.items():
            matrix = getattr(layer, name)
            assert isinstance(matrix, Int8Matrix)
            variable = ops.convert_to_tensor(keras_layer._kernel)
            assert str(matrix.codes.dtype) == "torch.int8"
            assert matrix.codes.data_ptr() == variable.data_ptr()
    head = decoder.embeddings
    assert isinstance(head, Int8Matrix)
    table = ops.convert_to_tensor(backbone.token_embedding._embeddings)
    assert head.codes.data_ptr() == table.data_ptr()


def test_weight_only_float32_product_against_float64():
    """The head's product: three int8 terms of the input, float64 reference."""
    import torch

    rng = np.random.RandomState(4)
    codes = rng.randint(-127, 128, (40, 24)).astype("int8")  # [out, in]
    scale = rng.uniform(20.0, 200.0, 40).astype("float32")
    x = rng.normal(0.0, 3.0, (3, 24)).astype("float32")
    matrix = Int8Matrix(
        torch.from_numpy(codes).T, torch.from_numpy(scale), None, torch.float32
    )
    assert matrix.packed is not None  # the `[out, in]` rows path
    (product,) = products(torch.from_numpy(x), matrix)
    expected = x.astype("float64") @ (codes.astype("float64") / scale[:, None]).T
    error = np.abs(product.numpy() - expected).max() / np.abs(expected).max()
    assert error <= 1e-6, error


def test_int4_layers_are_named_and_left_to_the_portable_path():
    causal_lm = make_causal_lm()
    causal_lm.quantize("int4", filters="query")
    reasons = torch_decode.unsupported_layers(causal_lm)
    blocks = causal_lm.backbone.transformer_layers
    assert set(reasons) == {block.attention.query_dense.path for block in blocks}
    assert set(reasons.values()) == {"quantization_mode='int4'"}
    assert not torch_decode.supports(causal_lm)


def _devices():
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(
    "rows, inner, outputs",
    [(1, 32, 64), (2, 48, 96), (3, 64, 64), (17, 32, 64), (9, 512, 256), (1, 12, 40)],
)
def test_int_mm_is_the_exact_integer_product(device, rows, inner, outputs):
    # Decode-sized row counts (which CUDA's kernel refuses unpadded), the
    # tiny config's inner sizes (which it refused with Keras' row-major
    # kernels), a prefill-sized count, and an inner size off its alignment.
    import torch

    generator = torch.Generator().manual_seed(rows * inner + outputs)
    codes = torch.randint(-127, 128, (rows, inner), generator=generator)
    matrix = torch.randint(-127, 128, (inner, outputs), generator=generator)
    expected = codes.double() @ matrix.double()  # exact: |sum| < 2**53
    product = int_mm(codes.to(torch.int8).to(device), matrix.to(torch.int8).to(device))
    assert product.dtype == torch.int32 and product.shape == (rows, outputs)
    np.testing.assert_array_equal(product.cpu().numpy(), expected.int().numpy())
