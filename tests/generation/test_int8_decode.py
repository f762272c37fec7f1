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

import numpy as np
import pytest
from keras import ops

from keras_gemma2.generation import torch_decode, torch_int8, torch_matmul
from keras_gemma2.generation.kv_cache import empty_cache
from keras_gemma2.generation.torch_int8 import (
    Int8Matrix,
    exact_product,
    int_mm,
    products,
)
from tests.generation.test_generate import make_causal_lm
from tests.generation.test_quantized_decode import padded_prompts
from tests.generation.test_torch_decode import (
    LENGTH,
    TORCH_ONLY,
    cached_pack,
    fast_and_portable_logits,
    make_configured,
)

pytestmark = TORCH_ONLY


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


def _needs_fbgemm():
    if not torch_int8._can_pack():
        pytest.skip("torch has no FBGEMM int8 kernels here (not x86)")


def _decoder(causal_lm, batch=2):
    caches = empty_cache(causal_lm.backbone, batch, 5, 8)
    return torch_decode.TorchDecoder(causal_lm, caches)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_rows_equal_the_int_mm_products_bit_for_bit(dtype):
    """Each layer group's FBGEMM `RowProduct` against `products` on
    `torch._int_mm` (the matrices of a packed group carry no pack of their
    own, so `products` multiplies their codes with `_int_mm`)."""
    import torch

    _needs_fbgemm()
    decoder = _decoder(_quantized(dtype))
    generator = torch.Generator().manual_seed(5)
    for layer in decoder.layers:
        for group, names in enumerate(torch_decode._SHARED_ROWS):
            rows = layer.rows[group]
            assert isinstance(rows, torch_int8.RowProduct), (group, rows)
            matrices = [getattr(layer, name) for name in names]
            assert all(m.fbgemm is None for m in matrices)
            inner = matrices[0].codes.shape[0]
            for count in (1, 2, torch_int8.PACKED_ROWS):
                x = torch.randn(count, inner, generator=generator).to(decoder.dtype)
                assert rows.takes(x)
                with torch.inference_mode():
                    packed = rows.split(x)
                    expected = products(x, *matrices)
                for got, want in zip(packed, expected, strict=True):
                    assert got.dtype == want.dtype
                    assert torch.equal(got, want), (group, count)
            too_many = torch.zeros(torch_int8.PACKED_ROWS + 1, inner)
            assert not rows.takes(too_many.to(decoder.dtype))


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_fbgemm_sums_are_the_exact_integer_sums_rounded_once(rows):
    """Codes near +-127 over 2048 inputs: sums past 2**24, where float32
    rounds. FBGEMM's float32 must be the exact sum rounded once, as
    `int_mm(...).to(float32)` (and, through it, `.to(bfloat16)`) is."""
    import torch

    _needs_fbgemm()
    generator = torch.Generator().manual_seed(rows)
    inner, outputs = 2048, 64

    def near_127(shape):
        return torch.randint(120, 128, shape, generator=generator)

    signs = torch.randint(0, 2, (rows, inner), generator=generator) * 2 - 1
    codes = (signs * near_127((rows, inner))).to(torch.int8)
    # Signs matching the first row's: its sums near 127**2 * 2048.
    weights = (signs[:1].T * near_127((inner, outputs))).to(torch.int8)
    matrix = Int8Matrix(weights, torch.ones(outputs), None, torch.float32)
    matrix.fbgemm = torch_int8._packed(weights.T)
    exact = codes.double() @ weights.double()
    assert exact.abs().max() > 2**24  # float32 cannot hold every sum
    product = exact_product(codes, matrix)
    assert product.dtype == torch.float32
    assert torch.equal(product, exact.float())
    unpacked = int_mm(codes, weights)
    assert torch.equal(product, unpacked.to(torch.float32))
    assert torch.equal(product.to(torch.bfloat16), unpacked.to(torch.bfloat16))
    # Float codes (what `RowProduct` passes) give the same sums.
    assert torch.equal(exact_product(codes.to(torch.bfloat16), matrix), product)


def test_packs_follow_a_changed_kernel():
    """Packs are cached per variable across decoders; an assigned kernel
    is packed again, and the decoder still equals the layers."""
    _needs_fbgemm()
    causal_lm = _quantized("float32")
    _decoder(causal_lm)  # packs cached
    kernel = causal_lm.backbone.transformer_layers[1].ffw.down_dense._kernel
    version, pack = cached_pack("int8", kernel)
    kernel.assign(np.flip(ops.convert_to_numpy(kernel), axis=0).copy())
    token_ids = np.random.RandomState(3).randint(0, 96, (2, LENGTH)).astype("int32")
    fast, full = fast_and_portable_logits(causal_lm, token_ids, [5, 3])
    assert np.abs(fast - full).max() <= 1e-5
    new_version, new_pack = cached_pack("int8", kernel)
    assert new_version > version and new_pack is not pack


def test_packs_only_within_the_copy_limit_and_cleared_with_the_copies(monkeypatch):
    _needs_fbgemm()
    causal_lm = _quantized("float32")
    torch_matmul.clear_copies()
    monkeypatch.setattr(torch_matmul, "COPY_BYTES", 0)
    decoder = _decoder(causal_lm)
    assert not any(
        isinstance(rows, torch_int8.RowProduct)
        for layer in decoder.layers
        for rows in layer.rows
    )
    assert decoder.embeddings.fbgemm is None and not torch_matmul._PACKS
    monkeypatch.undo()
    decoder = _decoder(causal_lm)
    assert decoder.embeddings.fbgemm is not None  # the weight-only head
    assert torch_matmul._PACKS
    torch_matmul.clear_copies()
    assert not torch_matmul._PACKS


def test_another_quantized_engine_keeps_the_int_mm_products():
    """With torch's quantized engine set to QNNPACK by the user, FBGEMM's
    packs are not made (its ops would take QNNPACK's), and the decoder
    still equals the layers on `torch._int_mm`."""
    import torch

    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no QNNPACK engine to switch to")
    causal_lm = _quantized("float32")
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        decoder = _decoder(causal_lm)
        token_ids = np.random.RandomState(3).randint(0, 96, (2, LENGTH))
        fast, full = fast_and_portable_logits(causal_lm, token_ids.astype("int32"), 4)
    finally:
        torch.backends.quantized.engine = engine
    assert not any(
        isinstance(rows, torch_int8.RowProduct)
        for layer in decoder.layers
        for rows in layer.rows
    )
    assert decoder.embeddings.fbgemm is None
    assert np.abs(fast - full).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_rows_equals_keras_quantizer_bit_for_bit(dtype):
    """`quantize_rows` against the int8 layers' own `AbsMaxQuantizer`."""
    import torch

    causal_lm = _quantized(dtype)
    quantizer = causal_lm.backbone.transformer_layers[0].ffw.down_dense.inputs_quantizer
    rng = np.random.RandomState(6)
    rows = rng.normal(0.0, 1.0, (5, 64)) * np.array([[1e-3], [1.0], [30.0], [1e4], [0]])
    rows[1, 3] = 250.0  # one outlier sets the row's scale
    # In bfloat16, 0.65625 times its rounded scale rounds to 128: clipped.
    rows[4, :2] = [0.65625, -0.3]
    # And 400 heavy-tailed rows of scales 1e-4 to 1e4.
    heavy = rng.standard_t(2, (400, 64)) * 10.0 ** rng.uniform(-4, 4, (400, 1))
    x = torch.as_tensor(np.concatenate([rows, heavy])).to(getattr(torch, dtype))
    codes, scale = torch_int8.quantize_rows(x, quantizer)
    want_codes, want_scale = quantizer(x)
    assert codes.dtype == torch.int8
    assert torch.equal(codes, ops.convert_to_tensor(want_codes))
    assert torch.equal(scale, ops.convert_to_tensor(want_scale).to(scale.dtype))
    assert scale.dtype == x.dtype
