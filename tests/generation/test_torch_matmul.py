"""`torch_matmul`: TorchDecoder's sliced few-row products against float64."""

import keras
import numpy as np
import pytest

from keras_gemma2.generation import torch_matmul

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="torch_matmul serves TorchDecoder, the torch backend's decode path",
)


@pytest.fixture
def two_threads():
    """Two torch threads, as on the machine the slicing was measured on."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _bmm_calls(monkeypatch):
    import torch

    calls = []
    real = torch.bmm

    def recording(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(torch, "bmm", recording)
    return calls


@pytest.mark.parametrize("leading", [(1,), (3,), (2, 1), (8,)])
@pytest.mark.parametrize("shape", [(512, 2048), (2048, 512), (512, 256)])
def test_product_equals_float64(two_threads, monkeypatch, shape, leading):
    import torch

    generator = np.random.default_rng(0)
    w = generator.standard_normal(shape).astype("float32")
    x = generator.standard_normal(leading + shape[:1]).astype("float32")
    calls = _bmm_calls(monkeypatch)
    ours = torch_matmul.product(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    # The inner axis, cut in two (one slice per thread), one batched call.
    rows = int(np.prod(leading))
    assert calls == [((2, rows, shape[0] // 2), (2, shape[0] // 2, shape[1]))]
    exact = x.astype("float64") @ w.astype("float64")
    assert ours.shape == exact.shape
    # float32 sums of `in` terms of size ~1: a few 1e-6 of sqrt(in).
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-5 * np.sqrt(shape[0]))


@pytest.mark.parametrize("leading", [(1,), (2, 1), (8,)])
def test_transposed_product_equals_float64(two_threads, monkeypatch, leading):
    import torch

    generator = np.random.default_rng(1)
    table = generator.standard_normal((4096, 512)).astype("float32")
    x = generator.standard_normal(leading + (512,)).astype("float32")
    calls = _bmm_calls(monkeypatch)
    ours = torch_matmul.transposed_product(
        torch.from_numpy(x), torch.from_numpy(table)
    ).numpy()
    rows = int(np.prod(leading))
    assert calls == [((2, 2048, 512), (2, 512, rows))]
    exact = x.astype("float64") @ table.astype("float64").T
    assert ours.shape == exact.shape
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-5 * np.sqrt(512))


def test_head_is_sliced_even_on_one_thread(monkeypatch):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calls = _bmm_calls(monkeypatch)
        table = torch.ones((1024, 512))
        assert torch_matmul.transposed_product(torch.ones((1, 512)), table).shape == (
            1,
            1024,
        )
        assert len(calls) == 1
        # ...but a projection is not: one thread has nothing to share.
        torch_matmul.product(torch.ones((1, 512)), torch.ones((512, 1024)))
        assert len(calls) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "case",
    ["nine rows", "bfloat16", "small weight", "odd inner size"],
)
def test_other_products_are_plain(two_threads, monkeypatch, case):
    import torch

    x, w = torch.randn(1, 512), torch.randn(512, 1024)
    if case == "nine rows":
        x = torch.randn(torch_matmul.MAX_ROWS + 1, 512)
    elif case == "bfloat16":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "small weight":
        w = torch.randn(512, 128)
    else:
        x, w = torch.randn(1, 513), torch.randn(513, 1024)
    calls = _bmm_calls(monkeypatch)
    ours = torch_matmul.product(x, w)
    assert calls == []
    assert torch.equal(ours, x @ w)


def test_strided_rows(two_threads):
    """Rows that are views with gaps (a column slice) multiply as copies would."""
    import torch

    generator = np.random.default_rng(2)
    wide = torch.from_numpy(generator.standard_normal((3, 1024)).astype("float32"))
    w = torch.from_numpy(generator.standard_normal((512, 1024)).astype("float32"))
    table = torch.from_numpy(generator.standard_normal((1024, 512)).astype("float32"))
    columns = wide.T.contiguous().T  # [3, 1024], strides (1, 3)
    for x in (wide[:1, ::2], wide[:, ::2], columns[:1, :512], columns[:, :512]):
        assert not x.is_contiguous()
        exact = x.double().numpy() @ w.double().numpy()
        ours = torch_matmul.product(x, w).numpy()
        np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-5 * np.sqrt(512))
        exact = x.double().numpy() @ table.double().numpy().T
        ours = torch_matmul.transposed_product(x, table).numpy()
        np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-5 * np.sqrt(512))


def _parameter(shape, seed):
    """A float32 `torch.nn.Parameter`, as a Keras variable holds its value."""
    import torch

    generator = np.random.default_rng(seed)
    value = generator.standard_normal(shape).astype("float32")
    return torch.nn.Parameter(torch.from_numpy(value))


@pytest.mark.parametrize("rows", [1, 3, 8, 20])
def test_transposed_matrix_products_equal_float64(two_threads, monkeypatch, rows):
    import torch

    source = _parameter((512, 4, 256), seed=3)  # a 3-D kernel, as q/k/v are
    matrix = source.detach().reshape(512, 1024)
    ((copied,),) = torch_matmul.transposed_copies([[(matrix, source)]])
    assert isinstance(copied, torch_matmul.Transposed)
    assert copied.table.is_contiguous() and copied.shape == (512, 1024)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    calls = _bmm_calls(monkeypatch)
    with torch.no_grad():
        ours = torch_matmul.product(x, copied).numpy()
    if rows <= torch_matmul.MAX_ROWS:  # the copy, its output rows cut in two
        assert calls == [((2, 512, 512), (2, 512, rows))]
    else:  # a matrix-matrix product of the kernel itself
        assert calls == []
    exact = x.double().numpy() @ matrix.double().numpy()
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-5 * np.sqrt(512))


def test_copies_are_cached_until_the_variable_changes(two_threads):
    import torch

    source = _parameter((512, 1024), seed=4)
    first = torch_matmul.transposed_copies([[(source.detach(), source)]])[0][0]
    again = torch_matmul.transposed_copies([[(source.detach(), source)]])[0][0]
    assert again.table is first.table  # the next `generate` call reuses it
    with torch.no_grad():
        source.copy_(torch.ones_like(source))  # what a Keras `assign` does
    changed = torch_matmul.transposed_copies([[(source.detach(), source)]])[0][0]
    # Written again, in the same memory: no second copy.
    assert changed.table.data_ptr() == first.table.data_ptr()
    assert torch.equal(changed.table, torch.ones((1024, 512)))
    x = torch.randn(1, 512)
    with torch.no_grad():
        np.testing.assert_allclose(
            torch_matmul.product(x, changed).numpy(),
            np.full((1, 1024), float(x.sum())),
            rtol=1e-5,
        )
    key = (id(source),)
    assert key in torch_matmul._COPIES
    del source, first, again, changed
    assert key not in torch_matmul._COPIES  # the entry left with its variable


@pytest.mark.parametrize(
    "case", ["no source", "inference source", "bfloat16", "small", "over the limit"]
)
def test_what_is_not_copied(two_threads, monkeypatch, case):
    import torch

    source = _parameter((512, 1024), seed=5)
    matrix = source.detach()
    if case == "no source":  # a LoRA-merged kernel: fresh each call
        source = None
    elif case == "inference source":  # made under `inference_mode`: no version
        with torch.inference_mode():
            source = source.detach().clone()
        matrix = source
    elif case == "bfloat16":
        matrix = matrix.bfloat16()
    elif case == "small":
        matrix = matrix[:, :128].contiguous()
    else:
        monkeypatch.setattr(torch_matmul, "COPY_BYTES", 512 * 1024 * 4 * 2 - 1)
    pairs = [(matrix, source), (torch.ones(512, 1024), torch.ones(1))]
    (results,) = torch_matmul.transposed_copies([pairs])
    assert results[0] is matrix
    if case == "over the limit":  # two kernels fit in one byte less: none
        assert results[1] is pairs[1][0]
    else:  # copied alone: its group is not whole
        assert isinstance(results[1], torch_matmul.Transposed)
        assert results[1].group is None


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_a_group_multiplies_as_one_stacked_copy(two_threads, monkeypatch, rows):
    """Query, key and value (or gate and up) read the same rows: one product."""
    import torch

    sources = [_parameter((512, n), seed=n) for n in (512, 256, 256)]
    group = [(source.detach(), source) for source in sources]
    (copies,) = torch_matmul.transposed_copies([group])
    stacked = copies[0].group[0]
    assert stacked.shape == (1024, 512) and stacked.is_contiguous()
    for copy, source in zip(copies, sources, strict=True):
        assert torch.equal(copy.table, source.detach().T)  # a view of `stacked`
        offset = copy.table.data_ptr() - stacked.data_ptr()
        assert 0 <= offset < stacked.numel() * 4
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    calls = _bmm_calls(monkeypatch)
    with torch.no_grad():
        ours = torch_matmul.stacked_products(x, copies)
        if rows > torch_matmul.MAX_ROWS:
            assert ours is None  # the matrices' own matrix-matrix products
            return
        assert calls == [((2, 512, 512), (2, 512, rows))]
        # Not the whole group, or out of order: one product each.
        assert torch_matmul.stacked_products(x, copies[:2]) is None
        assert torch_matmul.stacked_products(x, copies[::-1]) is None
    for result, source in zip(ours, sources, strict=True):
        exact = x.double().numpy() @ source.detach().double().numpy()
        np.testing.assert_allclose(
            result.numpy(), exact, rtol=0, atol=1e-5 * np.sqrt(512)
        )
    # Cached as one entry, written again in place when any one changes.
    again = torch_matmul.transposed_copies([group])[0]
    assert again[0].group[0] is stacked
    with torch.no_grad():
        sources[2].mul_(2.0)
    renewed = torch_matmul.transposed_copies([group])[0]
    assert renewed[0].group[0].data_ptr() == stacked.data_ptr()
    assert torch.equal(renewed[2].table, sources[2].detach().T)
