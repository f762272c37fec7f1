"""FBGEMM packs inside the compiled torch decode step (`jit_compile=True`).

A compiled `TorchDecoder` keeps the eager decoder's products: its int8 and
float16 packs are reached through `keras_gemma2::fbgemm_product`, lent per
call (`torch_matmul.number_packs`, `torch_matmul.lent`). References: the
eager decoder's logits (held to the Keras layers in `test_int8_decode.py`,
`test_half_decode.py` and `test_torch_decode.py`), and the packs' own op,
counted each time the compiled program calls it.
"""

import numpy as np
import pytest

from keras_gemma2.generation import torch_decode, torch_half, torch_int8, torch_matmul
from tests.generation.test_int8_decode import _quantized
from tests.generation.test_torch_decode import (
    TORCH_ONLY,
    float32_twin,
    make_configured,
)

pytestmark = TORCH_ONLY

PROMPT, STEPS = 3, 4


def _model(kind):
    if kind == "bfloat16":
        return make_configured("bfloat16")
    return _quantized("float32", qlora=kind == "qlora")


def _start(causal_lm, token_ids):
    import torch

    mask = np.zeros_like(token_ids)
    mask[:, :PROMPT] = 1
    with torch.inference_mode():
        _, decoder = torch_decode.start(
            causal_lm, torch.tensor(token_ids), torch.tensor(mask), PROMPT
        )
    return decoder


def _holders(decoder):
    """Every product or matrix of `decoder` that multiplies on a pack."""
    found = [r for layer in decoder.layers for r in layer.rows]
    found += [decoder.head_rows, decoder.embeddings]
    found += [
        getattr(layer, name)
        for layer in decoder.layers
        for names in torch_decode._SHARED_ROWS
        for name in names
    ]
    return [
        holder
        for holder in found
        if isinstance(holder, (torch_half.HalfRowProduct, torch_int8.RowProduct))
        or getattr(holder, "fbgemm", None) is not None
    ]


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "qlora"])
def test_compiled_step_multiplies_on_the_lent_packs(kind, monkeypatch):
    import torch
    from torch._dynamo.utils import counters

    if not (torch_half._can_pack() and torch_int8._can_pack()):
        pytest.skip("torch has no FBGEMM kernels here (not x86)")
    causal_lm = _model(kind)
    rng = np.random.RandomState(5)
    token_ids = rng.randint(1, 96, (2, PROMPT + STEPS)).astype("int32")
    eager = _start(causal_lm, token_ids)
    assert not eager.packs  # eager decoders call the packs directly
    exact = None
    if kind == "bfloat16":  # the same weights in float32: bfloat16's noise
        exact = _start(float32_twin(causal_lm), token_ids)
    causal_lm.compile(sampler="greedy", jit_compile=True)
    compiled = _start(causal_lm, token_ids)
    holders = _holders(compiled)
    # Every pack numbered, in order, and lent: the eager products' packs.
    assert holders and len(compiled.packs) == len(holders)
    assert sorted(h.slot for h in holders) == list(range(len(holders)))
    for holder in holders:
        pack = (
            holder.fbgemm if isinstance(holder, torch_int8.Int8Matrix) else holder.pack
        )
        assert compiled.packs[holder.slot] is pack

    calls = []
    direct = torch_matmul._fbgemm_direct

    def counted(kind, rows, pack):
        calls.append(pack)
        return direct(kind, rows, pack)

    monkeypatch.setattr(torch_matmul, "_fbgemm_direct", counted)
    # What Dynamo warns while tracing (each message once per process: traced
    # afresh here). It warned about every `functools.cache` wrapper met.
    warned = []
    monkeypatch.setattr(torch._dynamo.utils, "warn_once", warned.append)
    torch._dynamo.reset()
    breaks = sum(counters["graph_break"].values())
    with torch.inference_mode():
        for position in range(PROMPT - 1, PROMPT + STEPS - 1):
            token = torch.tensor(token_ids[:, position])
            at = torch.tensor(position)
            calls.clear()
            got = compiled._compiled(token, at, token_ids.shape[1]).float().numpy()
            # Each pack once per token, through the op (compiled, not eager).
            assert len(calls) == len(holders)
            assert {id(p) for p in calls} == {id(p) for p in compiled.packs}
            # A greedy sampler's pick, in the same program: the argmax of
            # these logits (a softmax keeps their order; ties aside, which
            # random logits do not have).
            calls.clear()
            picked = compiled._compiled(token, at, token_ids.shape[1], 1.0).numpy()
            assert len(calls) == len(holders)
            np.testing.assert_array_equal(picked, got.argmax(-1))
            want = eager.append(token, at, token_ids.shape[1]).float().numpy()
            error = np.abs(got - want).max()
            print(f"MEASURED {kind} position {position}: max|d|={error:.2e}")
            if kind == "bfloat16":
                # Inductor keeps a fused chain's intermediates in float32
                # where eager rounds each to bfloat16. Reference: the same
                # weights in float32. The compiled step is no farther from
                # it than bfloat16's eager rounding, on average (measured:
                # 0.012-0.017 against 0.019-0.027) and at worst (0.057-0.080
                # against 0.067-0.106).
                float32 = exact.append(token, at, token_ids.shape[1]).numpy()
                ours, theirs = np.abs(got - float32), np.abs(want - float32)
                assert 0 < ours.mean() <= theirs.mean(), (ours.mean(), theirs.mean())
                assert ours.max() <= 1.5 * theirs.max(), (ours.max(), theirs.max())
            else:
                assert error <= 1e-5
                np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert sum(counters["graph_break"].values()) == breaks
    assert torch_decode._COMPILE_FAILURES == []
    assert warned == []
    # Lent only for the call: nothing holds the packs afterwards.
    assert torch_matmul._LENT.packs == ()


def test_an_eager_step_ignores_slots():
    """Outside `torch.compile`, a numbered product calls its pack directly
    (no op, nothing lent): equal to the unnumbered product bit for bit."""
    import torch

    if not torch_int8._can_pack():
        pytest.skip("torch has no FBGEMM int8 kernels here (not x86)")
    causal_lm = _model("int8")
    token_ids = np.random.RandomState(6).randint(1, 96, (1, 6)).astype("int32")
    decoder = _start(causal_lm, token_ids)
    product = decoder.layers[0].rows[0]
    assert isinstance(product, torch_int8.RowProduct) and product.slot is None
    x = torch.randn(1, causal_lm.backbone.hidden_dim)
    with torch.inference_mode():
        plain = product(x)
        torch_matmul.number_packs([(product, product.pack)])
        assert product.slot == 0
        assert torch.equal(product(x), plain)
