"""The PyTorch fast decode path against the portable layers."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.generation import torch_decode, torch_matmul
from keras_gemma2.generation.decode import bucket_edges, prefill
from keras_gemma2.generation.kv_cache import empty_cache
from keras_gemma2.models import weight_table
from tests.conftest import TINY_BACKBONE_CONFIG, randomize_weights
from tests.generation.test_generate import make_causal_lm

TORCH_ONLY = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="TorchDecoder is the torch backend's decode path; it runs only there",
)
pytestmark = TORCH_ONLY

LENGTH = 20  # the tiny window is 5: decoding runs far past it


def fast_and_portable_logits(
    causal_lm, token_ids, prompt_length, bucketed=False, raw_prefill=False
):
    """Logits of every decode position from TorchDecoder and from the layers.

    `prompt_length`: an int, or one per row (right-padded prompts; decoding
    starts after the shortest, teacher-forced).
    `bucketed`: run the step as the compiled path does, eagerly: a tensor
    position, and global layers reading the bucket of slots that
    `bucket_edges` gives the position, masked (rings: as many slots, at
    most all of theirs; the tiny ring of 5 is wider than the first bucket
    of a 4-token prompt).
    `raw_prefill`: prefill with `torch_decode.start`, not the layers.
    """
    import torch

    full = ops.convert_to_numpy(
        causal_lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    lengths = np.broadcast_to(prompt_length, (token_ids.shape[0],))
    padding_mask = (np.arange(token_ids.shape[1]) < lengths[:, None]).astype("int32")
    prompt_length = int(lengths.min())
    with torch.no_grad():
        args = (
            causal_lm,
            ops.convert_to_tensor(token_ids),
            ops.convert_to_tensor(padding_mask),
            int(lengths.max()),
        )
        if raw_prefill:
            state, decoder = torch_decode.start(*args)
        else:
            state = prefill(*args)
            decoder = torch_decode.TorchDecoder(causal_lm, state[1])
        assert int(state[2]) == prompt_length
        assert decoder.caches is state[1]
        fast = []
        edges = bucket_edges(int(lengths.max()), token_ids.shape[1])
        for p in range(prompt_length - 1, token_ids.shape[1]):
            token = ops.convert_to_tensor(token_ids[:, p])
            if bucketed:
                span = next(edge for edge in edges if edge > p)
                logits = decoder.append(token, torch.tensor(p), span)
            else:
                logits = decoder.append(token, p)
            fast.append(ops.convert_to_numpy(logits))
    return np.stack(fast, axis=1), full[:, prompt_length - 1 :]


def test_logits_equal_the_layers_at_every_position_past_the_window():
    causal_lm = make_causal_lm()
    token_ids = np.random.RandomState(3).randint(0, 96, (2, LENGTH)).astype("int32")
    fast, full = fast_and_portable_logits(causal_lm, token_ids, prompt_length=4)
    np.testing.assert_allclose(fast, full, atol=1e-5)


@pytest.mark.parametrize("bucketed", [False, True], ids=["eager", "bucketed"])
def test_raw_prefill_of_uneven_prompts_then_decode_equal_the_layers(bucketed):
    causal_lm = make_causal_lm()
    token_ids = np.random.RandomState(6).randint(0, 96, (3, LENGTH)).astype("int32")
    # The ring holds 5 slots: prompts of up to 5 tokens take the raw prefill.
    fast, full = fast_and_portable_logits(
        causal_lm, token_ids, [5, 2, 4], bucketed=bucketed, raw_prefill=True
    )
    np.testing.assert_allclose(fast, full, atol=1e-5)


def test_raw_prefill_leaves_uneven_prompts_longer_than_the_ring_to_the_layers(
    monkeypatch,
):
    causal_lm = make_causal_lm()
    raw = []
    original = torch_decode.TorchDecoder.write_prompt
    monkeypatch.setattr(
        torch_decode.TorchDecoder,
        "write_prompt",
        lambda self, ids: raw.append(tuple(ids.shape)) or original(self, ids),
    )
    token_ids = np.random.RandomState(7).randint(0, 96, (2, LENGTH)).astype("int32")
    fast, full = fast_and_portable_logits(
        causal_lm, token_ids, [8, 6], raw_prefill=True
    )
    np.testing.assert_allclose(fast, full, atol=1e-5)
    assert raw == []  # 8 > 5 ring slots and uneven: the layers prefilled
    fast_and_portable_logits(causal_lm, token_ids, [5, 3], raw_prefill=True)
    fast_and_portable_logits(causal_lm, token_ids, [9, 9], raw_prefill=True)
    # Within the ring the bucket is written; past it, the real positions.
    assert raw == [(2, 5), (2, 9)]


@pytest.mark.parametrize("prompt_length", [6, 11, 16])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_chunked_raw_prefill_past_the_ring_equals_the_layers(prompt_length, dtype):
    # Prompts longer than the 5-slot ring are written in chunks of at most
    # 5 positions, each attending to the ring's previous contents; the
    # decode that follows must see the caches the layers would have left.
    causal_lm = make_causal_lm()
    if dtype == "int8":
        causal_lm.quantize("int8")
    token_ids = np.random.RandomState(prompt_length).randint(0, 96, (2, LENGTH))
    token_ids = token_ids.astype("int32")
    fast, full = fast_and_portable_logits(
        causal_lm, token_ids, prompt_length, raw_prefill=True
    )
    if dtype == "float32":
        np.testing.assert_allclose(fast, full, atol=1e-5)
    else:
        # The chunk's attention sums in another order than the layers'
        # (float32 above: ~1e-7 apart); an int8 activation on a rounding
        # boundary then lands one step over. Measured: 2.4e-7 and 3.0e-7 at
        # 6 and 11 positions, 0.0107 at 16 (logits' std 0.247). Bound: 10%
        # of the logits' std, and the same argmax everywhere.
        error = np.abs(fast - full).max()
        assert error <= 0.1 * full.std(), (error, full.std())
        np.testing.assert_array_equal(fast.argmax(-1), full.argmax(-1))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_write_prompt_chunk_size_does_not_change_the_caches(chunk):
    import torch

    causal_lm = make_causal_lm()
    token_ids = np.random.RandomState(9).randint(0, 96, (2, 13)).astype("int32")
    caches = {}
    for size in (chunk, 1):
        decoder = torch_decode.TorchDecoder(
            causal_lm, empty_cache(causal_lm.backbone, 2, 5, LENGTH)
        )
        with torch.no_grad():
            decoder.write_prompt(ops.convert_to_tensor(token_ids), chunk=size)
        caches[size] = [
            ops.convert_to_numpy(array) for pair in decoder.caches for array in pair
        ]
    for a, b in zip(caches[chunk], caches[1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_write_prompt_leaves_the_layers_caches_and_runs_no_last_block(monkeypatch):
    """Every layer's caches as the layers' prefill leaves them, the last
    layer's included, though `write_prompt` runs no block output there
    (nothing reads it); the chunks' attention logits share one buffer,
    freed at the end."""
    import torch

    causal_lm = make_causal_lm()
    layers = len(causal_lm.backbone.transformer_layers)
    token_ids = np.random.RandomState(4).randint(0, 96, (2, LENGTH)).astype("int32")
    prompt = 13  # three chunks of the 5-slot ring
    padding_mask = (np.arange(LENGTH) < prompt).astype("int32")[None].repeat(2, 0)
    with torch.no_grad():
        expected = prefill(
            causal_lm,
            ops.convert_to_tensor(token_ids),
            ops.convert_to_tensor(padding_mask),
            prompt,
        )[1]
    decoder = torch_decode.TorchDecoder(
        causal_lm, empty_cache(causal_lm.backbone, 2, 5, LENGTH)
    )
    outputs, buffers = [], []
    block_output, scratch = decoder._block_output, decoder._scratch

    def counted(*args):
        outputs.append(args[0])
        return block_output(*args)

    def recorded(shape, dtype):
        tensor = scratch(shape, dtype)
        buffers.append(tensor.untyped_storage().data_ptr())
        return tensor

    monkeypatch.setattr(decoder, "_block_output", counted)
    monkeypatch.setattr(decoder, "_scratch", recorded)
    with torch.no_grad():
        decoder.write_prompt(ops.convert_to_tensor(token_ids[:, :prompt]))
    chunks = 3
    assert len(outputs) == chunks * (layers - 1)
    assert decoder.layers[-1] not in outputs
    assert len(buffers) == chunks * (layers - 1) and len(set(buffers)) == 1
    assert decoder._buffers == {}
    for i, (pair, expected_pair) in enumerate(
        zip(decoder.caches, expected, strict=True)
    ):
        for array, expected_array in zip(pair, expected_pair, strict=True):
            array, expected_array = (
                ops.convert_to_numpy(a)[:, :, :prompt] for a in (array, expected_array)
            )
            np.testing.assert_allclose(array, expected_array, atol=1e-5, err_msg=i)


def test_bucketed_step_equals_the_layers_at_every_position_past_the_window():
    causal_lm = make_causal_lm()
    token_ids = np.random.RandomState(5).randint(0, 96, (2, LENGTH)).astype("int32")
    fast, full = fast_and_portable_logits(
        causal_lm, token_ids, prompt_length=4, bucketed=True
    )
    np.testing.assert_allclose(fast, full, atol=1e-5)


@pytest.mark.parametrize("size", ["tiny", "wide"])
def test_jit_compile_decodes_as_eager_and_compiles_once_per_shape(size):
    """Wide: kernels `torch_matmul` slices and copies; compiled, the step
    multiplies the same copies, and its per-weight caches must not break
    the graph (one graph per weight)."""
    from torch._dynamo.utils import counters

    causal_lm = make_causal_lm() if size == "tiny" else make_configured(**WIDE)
    token_ids = np.zeros((2, 12), "int32")
    token_ids[0, :3] = [2, 7, 9]
    token_ids[1, :2] = [2, 40]
    inputs = {"token_ids": token_ids, "padding_mask": (token_ids != 0).astype("int32")}
    eager = causal_lm.generate(inputs, stop_token_ids=None)["token_ids"]
    causal_lm.compile(sampler="greedy", jit_compile=True)
    assert torch_decode.compiles(causal_lm)
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    first = causal_lm.generate(inputs, stop_token_ids=None)["token_ids"]
    compiled_graphs = counters["stats"]["unique_graphs"] - graphs
    assert sum(counters["graph_break"].values()) == breaks
    second = causal_lm.generate(inputs, stop_token_ids=None)["token_ids"]
    assert compiled_graphs >= 1  # it did go through torch.compile
    assert counters["stats"]["unique_graphs"] - graphs == compiled_graphs
    np.testing.assert_array_equal(
        ops.convert_to_numpy(second), ops.convert_to_numpy(first)
    )
    if size == "tiny":
        np.testing.assert_array_equal(
            ops.convert_to_numpy(first), ops.convert_to_numpy(eager)
        )
        return
    # Eager sums the wide products in another order (sliced, `[out, in]`
    # copies), so a near tie of random logits may pick another token:
    # the compiled and eager steps' logits are compared instead.
    _compiled_logits_equal_eager(causal_lm, ops.convert_to_numpy(first)[:1])


def _compiled_logits_equal_eager(causal_lm, token_ids, prompt_length=3):
    import torch

    from keras_gemma2.generation import torch_matmul

    mask = (np.arange(token_ids.shape[1]) < prompt_length)[None].astype("int32")
    with torch.no_grad():
        _, decoder = torch_decode.start(
            causal_lm,
            ops.convert_to_tensor(token_ids),
            ops.convert_to_tensor(mask),
            prompt_length,
        )
        # Compiled, the eager products: the `[out, in]` copies.
        assert isinstance(decoder.layers[0].gate, torch_matmul.Transposed)
        for p in range(prompt_length - 1, token_ids.shape[1] - 1):
            token = ops.convert_to_tensor(token_ids[:, p])
            position = torch.tensor(p)
            span = token_ids.shape[1]
            compiled = decoder._compiled(token, position, span).numpy()
            eager = decoder.append(token, position, span).numpy()
            np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-4)


def test_jit_compile_falls_back_to_eager_when_torch_compile_fails(monkeypatch):
    import torch

    def no_compiler(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(
            "inductor", RuntimeError("no working C++ compiler"), None
        )

    monkeypatch.setattr(torch_decode, "_compiled_append", lambda device: no_compiler)
    monkeypatch.setattr(torch_decode, "_COMPILE_FAILURES", [])
    causal_lm = make_causal_lm()
    token_ids = np.zeros((1, 10), "int32")
    token_ids[0, :2] = [2, 7]
    inputs = {"token_ids": token_ids, "padding_mask": (token_ids != 0).astype("int32")}
    eager = causal_lm.generate(inputs, stop_token_ids=None)["token_ids"]
    causal_lm.compile(sampler="greedy", jit_compile=True)
    with pytest.warns(UserWarning, match="no working C\\+\\+ compiler"):
        fallback = causal_lm.generate(inputs, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(
        ops.convert_to_numpy(fallback), ops.convert_to_numpy(eager)
    )
    assert len(torch_decode._COMPILE_FAILURES) == 1  # tried once, not per step


@pytest.mark.parametrize("raw_prefill", [False, True], ids=["layers", "raw"])
def test_lora_kernels_are_merged(raw_prefill):
    causal_lm = make_causal_lm()
    causal_lm.backbone.enable_lora(2)
    rng = np.random.RandomState(4)
    for variable in causal_lm.backbone.trainable_variables:
        if "lora" in variable.path:
            variable.assign(rng.normal(0.0, 0.3, tuple(variable.shape)))
    token_ids = rng.randint(0, 96, (1, 12)).astype("int32")
    fast, full = fast_and_portable_logits(
        causal_lm, token_ids, prompt_length=3, raw_prefill=raw_prefill
    )
    np.testing.assert_allclose(fast, full, atol=1e-5)


def test_generate_uses_it_and_leaves_the_inputs_alone(monkeypatch):
    causal_lm = make_causal_lm()
    steps = []
    original = torch_decode.TorchDecoder.step

    def counting(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch_decode.TorchDecoder, "step", counting)
    token_ids = np.zeros((1, 10), "int32")
    token_ids[0, :2] = [2, 7]
    padding_mask = (token_ids != 0).astype("int32")
    before = token_ids.copy()
    outputs = causal_lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )
    assert len(steps) == 8
    np.testing.assert_array_equal(token_ids, before)
    assert isinstance(outputs["token_ids"], np.ndarray)
    # Decoded under `torch.inference_mode()`, the program's ids come back as
    # a normal tensor the caller may change in place.
    generated = causal_lm.generate_function(
        {"token_ids": token_ids, "padding_mask": padding_mask}
    )["token_ids"]
    assert not generated.is_inference()
    generated[0, 0] = 5
    assert int(generated[0, 0]) == 5


# Each differs from TINY_BACKBONE_CONFIG (GQA 2, caps on, scalar 12 with
# head_dim 16) where the decoder's arithmetic could go wrong on its own.
CONFIGS = {
    "gqa_1_caps_off": dict(
        num_key_value_heads=4, attention_logit_soft_cap=None, final_logit_soft_cap=None
    ),
    "multi_query_27b_style_scaling": dict(
        num_key_value_heads=1,
        query_pre_attn_scalar=32 / 4,  # hidden / heads
    ),
}


def cached_pack(kind, variable):
    """`(version, pack)` that `torch_matmul.cached_pack` keeps for `variable`."""
    return torch_matmul._PACKS[(kind, id(ops.convert_to_tensor(variable)))]


def float32_twin(causal_lm):
    """A float32 model of `make_configured`'s config with `causal_lm`'s
    weights (the reference for bfloat16's rounding)."""
    twin = make_configured("float32")
    for a, b in zip(twin.weights, causal_lm.weights, strict=True):
        a.assign(ops.cast(b, "float32"))
    return twin


def make_configured(dtype="float32", **overrides):
    config = {**TINY_BACKBONE_CONFIG, **overrides}
    backbone = Gemma2Backbone(**config, dtype=dtype)
    causal_lm = randomize_weights(Gemma2CausalLM(backbone), seed=2)
    causal_lm.compile(sampler="greedy")
    return causal_lm


@pytest.mark.parametrize("raw_prefill", [False, True], ids=["layers", "raw"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_equal_the_layers(name, raw_prefill):
    causal_lm = make_configured(**CONFIGS[name])
    token_ids = np.random.RandomState(8).randint(0, 96, (2, LENGTH)).astype("int32")
    for bucketed in (False, True):
        fast, full = fast_and_portable_logits(
            causal_lm, token_ids, [4, 3], bucketed=bucketed, raw_prefill=raw_prefill
        )
        np.testing.assert_allclose(fast, full, atol=1e-5)


def test_bfloat16_equals_the_layers_in_bfloat16():
    """bf16 decoding stays as close to the bf16 layers as bf16 rounding allows.

    Reference: the layers in bfloat16; the bound is set by how far the same
    layers in bfloat16 are from float32 (the rounding noise of the format).
    """
    token_ids = np.random.RandomState(9).randint(0, 96, (2, LENGTH)).astype("int32")
    causal_lm = make_configured("bfloat16")
    fast, full = fast_and_portable_logits(causal_lm, token_ids, 4, raw_prefill=True)
    fast, full = fast.astype("float32"), full.astype("float32")
    float32_lm = float32_twin(causal_lm)
    _, exact = fast_and_portable_logits(float32_lm, token_ids, 4)
    noise = np.abs(full - exact).max()
    assert noise > 0  # bf16 did round
    # Measured here: 0.0 against a noise of 0.24 (same kernels, same order).
    assert np.abs(fast - full).max() <= noise / 4, (noise,)
    assert (fast.argmax(-1) == full.argmax(-1)).mean() >= 0.9


WIDE = dict(
    vocabulary_size=512,
    num_layers=2,
    hidden_dim=512,
    intermediate_dim=512,
    num_query_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    query_pre_attn_scalar=128,
)


def _decoder(causal_lm, token_ids):
    import torch

    with torch.no_grad():
        _, decoder = torch_decode.start(
            causal_lm,
            ops.convert_to_tensor(token_ids),
            ops.convert_to_tensor(np.ones_like(token_ids)),
            token_ids.shape[1],
        )
    return decoder


def test_copied_kernels_follow_the_variables():
    """`[out, in]` kernel copies: used, then made again after an `assign`.

    A stale copy (kept from before the assign) would decode the old
    weights; the layers read the new ones.
    """
    import torch

    from keras_gemma2.generation import torch_matmul

    causal_lm = make_configured(**WIDE)
    token_ids = np.random.RandomState(5).randint(0, 512, (1, 10)).astype("int32")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast, full = fast_and_portable_logits(causal_lm, token_ids, 3)
        decoder = _decoder(causal_lm, token_ids)
        copied = decoder.layers[0].gate
        assert isinstance(copied, torch_matmul.Transposed)
        assert all(
            isinstance(getattr(layer, name), torch_matmul.Transposed)
            for layer in decoder.layers
            for name in ("query", "key", "value", "output", "gate", "up", "down")
        )
        np.testing.assert_allclose(fast, full, rtol=0, atol=1e-4)
        gate = next(w for w in weight_table.BLOCK_WEIGHTS if w.name == "gate")
        kernel = gate.variable(causal_lm.backbone.transformer_layers[0])
        kernel.assign(-kernel.numpy()[:, ::-1])
        fast, full = fast_and_portable_logits(causal_lm, token_ids, 3)
        renewed = _decoder(causal_lm, token_ids)
        # Gate and up share one stacked copy, written again in place (no
        # second copy); down's is kept as it was.
        assert renewed.layers[0].gate.group[0] is copied.group[0]
        np.testing.assert_array_equal(
            renewed.layers[0].gate.table.numpy(), kernel.numpy().T
        )
        assert renewed.layers[0].down.table is decoder.layers[0].down.table
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(fast, full, rtol=0, atol=1e-4)


def test_sliced_products_equal_the_layers(monkeypatch):
    """Weights big enough for `torch_matmul`'s sliced products, on 2 threads.

    Slicing changes the order of float32 sums only. The bound is set by the
    float32 rounding noise the decoder already had against the layers,
    without slicing (`torch.mm` on one row against the layers' products
    of the whole sequence).
    """
    import torch

    from keras_gemma2.generation import torch_matmul

    slices = []
    real = torch_matmul._sliced
    rows = torch_matmul.RowProduct.__call__

    def recording(x, w, at_least):
        sliced = real(x, w, at_least)
        slices.append(1 if sliced is None else sliced.shape[0])
        return sliced

    def recording_rows(self, x):
        slices.append(self.sliced.shape[0])
        return rows(self, x)

    monkeypatch.setattr(torch_matmul, "_sliced", recording)
    monkeypatch.setattr(torch_matmul.RowProduct, "__call__", recording_rows)
    token_ids = np.random.RandomState(4).randint(0, 512, (1, 12)).astype("int32")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        causal_lm = make_configured(**WIDE)
        fast, full = fast_and_portable_logits(causal_lm, token_ids, 3)
    finally:
        torch.set_num_threads(before)
    # Every product and the head were sliced in two: per layer query, key
    # and value as one (stacked copies), output, gate and up as one, down.
    assert slices.count(2) >= 10 * (4 * 2 + 1), slices
    monkeypatch.setattr(torch_matmul, "MIN_ELEMENTS", 2**40)
    monkeypatch.setattr(torch_matmul, "_SLICES", {})
    monkeypatch.setattr(torch_matmul, "_sliced", real)
    monkeypatch.setattr(torch_matmul.RowProduct, "__call__", rows)
    unsliced, _ = fast_and_portable_logits(causal_lm, token_ids, 3)
    noise = np.abs(unsliced - full).max()
    assert noise > 0
    # Measured: 2.2e-5 sliced against 2.4e-5 without slicing.
    difference = np.abs(fast - full).max()
    assert difference <= 2 * noise, (difference, noise)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("stop_token_ids", [None, (3,), (3, 9)])
def test_greedy_choose_token_equals_the_portable_choice(temperature, stop_token_ids):
    import keras_hub
    import torch

    from keras_gemma2.generation import decode

    sampler = keras_hub.samplers.GreedySampler(temperature=temperature)
    assert decode.plain_greedy(sampler)
    rng = np.random.RandomState(4)
    prompt = torch.tensor(rng.randint(0, 12, (4, 8)), dtype=torch.int32)
    prompt_mask = torch.zeros((4, 8), dtype=torch.bool)
    prompt_mask[:2, :5] = True  # rows 0 and 1: index 4 is a prompt token
    prompt_mask[2, :3] = True
    checked = ties = 0
    for trial in range(40):
        logits = torch.tensor(rng.normal(size=(4, 12)) * 4, dtype=torch.float32)
        if trial % 4 == 0:
            # The highest logit right after a next-highest one float32 apart:
            # their probabilities tie, and the sampler keeps the first of
            # them, where `argmax(logits)` would take the second.
            logits -= 40.0
            logits[:, 2] = 1e-3
            logits[:, 5] = torch.nextafter(logits[:, 2], torch.tensor(1.0))
            ties += int((logits.argmax(dim=-1) == 5).all())
        # The sampled token at rows 2 and 3 may be a stop token.
        logits[3, 3] += 20.0 * (trial % 2)
        done = torch.tensor([False, True, False, trial % 3 == 0])
        index = 4
        expected = decode.choose_token(
            sampler, logits, prompt, prompt_mask, index, done, stop_token_ids
        )
        got = torch_decode.choose_token(
            sampler, logits, prompt.clone(), prompt_mask, index, done, stop_token_ids
        )
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(
                ops.convert_to_numpy(a), ops.convert_to_numpy(b)
            )
        if trial % 4 == 0:
            assert (expected[2][2:] == 2).all()  # the tie's first logit
        checked += 1
    assert checked == 40 and ties == 10


def test_choose_token_leaves_other_samplers_to_the_portable_choice(monkeypatch):
    import keras_hub
    import torch

    from keras_gemma2.generation import decode

    calls = []
    portable = decode.choose_token

    def spy(*args):
        calls.append(type(args[0]).__name__)
        return portable(*args)

    monkeypatch.setattr(decode, "choose_token", spy)

    class Highest(keras_hub.samplers.GreedySampler):
        def get_next_token(self, probabilities):
            return ops.argmin(probabilities, axis=-1)

    logits = torch.tensor([[0.0, 5.0, 1.0]])
    prompt = torch.zeros((1, 4), dtype=torch.int32)
    mask = torch.zeros((1, 4), dtype=torch.bool)
    done = torch.tensor([False])
    samplers = [
        keras_hub.samplers.TopKSampler(k=2, seed=1),
        Highest(),
        keras_hub.samplers.GreedySampler(),
    ]
    tokens = [
        int(torch_decode.choose_token(s, logits, prompt, mask, 1, done, None)[2][0])
        for s in samplers
    ]
    assert calls == ["TopKSampler", "Highest"]
    assert tokens[1:] == [0, 1]
