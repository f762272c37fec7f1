"""bfloat16 decode products on FBGEMM's float16 packs (`torch_half`).

References: float64 products of the same bfloat16 rows and weights, and
torch's own bfloat16 product; the decoder's logits against the bfloat16
layers are held in `test_torch_decode.test_bfloat16_equals_the_layers_in_bfloat16`.
"""

import numpy as np
import pytest
from keras import ops

from keras_gemma2.generation import torch_decode, torch_half, torch_matmul
from keras_gemma2.generation.kv_cache import empty_cache
from tests.generation.test_torch_decode import (
    LENGTH,
    TORCH_ONLY,
    cached_pack,
    fast_and_portable_logits,
    make_configured,
)

pytestmark = TORCH_ONLY


def _needs_fbgemm():
    if not torch_half._can_pack():
        pytest.skip("torch has no FBGEMM float16 kernels here (not x86)")


def _variable_rows(values):
    """bfloat16 `[out, in]` rows with a variable tensor behind them."""
    import torch

    source = torch.nn.Parameter(
        torch.as_tensor(values).to(torch.bfloat16), requires_grad=False
    )
    return source.detach(), source


def _bfloat16_ulp(values):
    """One bfloat16 step at each of `values` (float64)."""
    exponent = np.floor(np.log2(np.maximum(np.abs(values), 2.0**-126)))
    return 2.0 ** (exponent - 7)


@pytest.mark.parametrize("count", [1, 3, torch_half.MAX_ROWS])
def test_half_products_are_the_bfloat16_products_rounded_once(count):
    """Against float64 sums of the same bfloat16 numbers, rounded to bfloat16:
    at most one bfloat16 step apart (the sums' order, tiny weights)."""
    import torch

    _needs_fbgemm()
    rng = np.random.RandomState(count)
    query = rng.normal(0.0, 0.05, (48, 64))
    key = rng.normal(0.0, 0.05, (16, 64))
    key[0, :8] = [1e-7, -3e-6, 2.0**-17, 7e-6, 300.0, -65000.0, 0.0, 1e-30]
    group = [_variable_rows(query), _variable_rows(key)]
    (product,) = torch_half.half_products([group])
    assert isinstance(product, torch_half.HalfRowProduct)
    x = torch.as_tensor(rng.normal(0.0, 2.0, (count, 64))).to(torch.bfloat16)
    assert product.takes(x)
    with torch.inference_mode():
        got_query, got_key = product.split(x)
    assert got_query.dtype == torch.bfloat16 and got_query.shape == (count, 48)
    for got, (rows, _) in zip((got_query, got_key), group, strict=True):
        exact = x.double().numpy() @ rows.double().numpy().T
        error = np.abs(got.double().numpy() - exact)
        assert (error <= _bfloat16_ulp(exact) * 1.01).all(), error.max()
        # torch's own bfloat16 product rounds as far from the same sums.
        own = (x @ rows.T).double().numpy()
        assert (np.abs(got.double().numpy() - own) <= 2 * _bfloat16_ulp(exact)).all()


def test_rows_past_float16_and_other_dtypes_are_not_packed():
    import torch

    _needs_fbgemm()
    fine = np.full((4, 8), 0.5)
    too_large, infinite, nan = fine.copy(), fine.copy(), fine.copy()
    too_large[1, 2] = 65536.0  # float16 overflows; bfloat16 holds it
    infinite[0, 0], nan[3, 3] = np.inf, np.nan
    float32 = torch.nn.Parameter(torch.ones(4, 8), requires_grad=False)
    groups = [
        [_variable_rows(fine)],
        [_variable_rows(fine), _variable_rows(too_large)],
        [_variable_rows(infinite)],
        [_variable_rows(nan)],
        [(float32.detach(), float32)],
        [(_variable_rows(fine)[0], None)],  # no variable: made per call
    ]
    products = torch_half.half_products(groups)
    assert isinstance(products[0], torch_half.HalfRowProduct)
    assert products[1:] == [None] * 5
    assert not products[0].takes(torch.zeros(1, 8))  # float32 rows
    assert not products[0].takes(torch.zeros(torch_half.MAX_ROWS + 1, 8).bfloat16())


def _decoder(causal_lm):
    caches = empty_cache(causal_lm.backbone, 2, 5, 8)
    return torch_decode.TorchDecoder(causal_lm, caches)


def test_bfloat16_decoder_multiplies_on_the_packs():
    """Regression guard: a bfloat16 model's few-row products, head included,
    take the float16 packs; a LoRA model's merged kernels do not."""
    _needs_fbgemm()
    decoder = _decoder(make_configured("bfloat16"))
    for layer in decoder.layers:
        assert all(isinstance(r, torch_half.HalfRowProduct) for r in layer.rows)
    assert isinstance(decoder.head_rows, torch_half.HalfRowProduct)
    causal_lm = make_configured("bfloat16")
    causal_lm.backbone.enable_lora(2, target_names=["query", "value"])
    decoder = _decoder(causal_lm)
    for layer in decoder.layers:
        assert layer.rows[0] is None  # query and value merged per call
        assert isinstance(layer.rows[2], torch_half.HalfRowProduct)


def test_packs_follow_a_changed_kernel_and_the_copy_limit(monkeypatch):
    _needs_fbgemm()
    causal_lm = make_configured("bfloat16")
    _decoder(causal_lm)  # packs cached
    kernel = causal_lm.backbone.transformer_layers[1].ffw.down_dense.kernel
    version, pack = cached_pack("float16", kernel)
    kernel.assign(-ops.convert_to_numpy(kernel.value.float()))
    token_ids = np.random.RandomState(9).randint(0, 96, (2, LENGTH)).astype("int32")
    fast, full = fast_and_portable_logits(causal_lm, token_ids, 4)
    fast, full = fast.astype("float32"), full.astype("float32")
    # The bound of `test_bfloat16_equals_the_layers_in_bfloat16` (noise / 4).
    assert np.abs(fast - full).max() <= 0.06
    new_version, new_pack = cached_pack("float16", kernel)
    assert new_version > version and new_pack is not pack
    torch_matmul.clear_copies()
    monkeypatch.setattr(torch_matmul, "COPY_BYTES", 0)
    decoder = _decoder(causal_lm)
    assert decoder.head_rows is None and not torch_matmul._PACKS
