"""`huge_pages`: decode weights in transparent huge pages, read off the kernel.

The kernel's own account (`/proc/self/smaps`, `AnonHugePages` of the mapping
that holds a tensor) is the reference. Where THP is off or absent,
`huge_page_size()` is 0 and the module must change nothing; those cases are
checked here too (with THP forced off), so every assertion runs on every
machine.
"""

import mmap
import sys

import keras
import numpy as np
import pytest

from keras_gemma2.generation import huge_pages

LINUX_THP = huge_pages.huge_page_size() > 0


def huge_bytes(tensor):
    """`AnonHugePages` (bytes) of the mappings holding `tensor`'s storage."""
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    total, overlapping = 0, False
    with open("/proc/self/smaps") as file:
        for line in file:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                low, high = (int(v, 16) for v in fields[0].split("-"))
                overlapping = low < end and start < high
            elif overlapping and fields[0] == "AnonHugePages:":
                total += int(fields[1]) * 1024
    return total


@pytest.fixture
def thp_required():
    if not LINUX_THP:
        pytest.skip(
            "transparent huge pages are off or absent here "
            f"({sys.platform}); test_nothing_happens_where_turned_off covers it"
        )


def test_empty_starts_on_a_huge_page_and_faults_in_huge_pages(thp_required):
    import torch

    page = huge_pages.huge_page_size()
    tensor = huge_pages.empty((3, 2 << 20), torch.float32)  # 24 MiB
    assert tensor.shape == (3, 2 << 20) and tensor.dtype == torch.float32
    assert tensor.is_contiguous() and tensor.data_ptr() % page == 0
    # A mapping of its own, one huge page of slack: nothing else lies in
    # it, so its huge pages are the tensor's.
    assert tensor.untyped_storage().nbytes() == (24 << 20) + page
    assert huge_bytes(tensor) == 0  # nothing faulted in before it is written
    tensor.fill_(1.5)
    assert huge_bytes(tensor) >= 8 * page
    assert float(tensor.sum()) == 1.5 * tensor.numel()


def test_collapse_moves_a_tensor_into_huge_pages_keeping_its_values(thp_required):
    import torch

    page = huge_pages.huge_page_size()
    # A fresh mapping of its own (memory the allocator reused may hold huge
    # pages already), 24 MiB, written in 4 KiB pages where THP is `madvise`.
    buffer = mmap.mmap(-1, 24 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tensor = torch.frombuffer(buffer, dtype=torch.float32)
    before = torch.randn(6 << 20)
    tensor.copy_(before)
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
        if "[madvise]" in file.read():
            assert huge_bytes(tensor) == 0
    asked = huge_pages.collapse([tensor, tensor[1:]])  # one storage, once
    assert asked >= 10 * page
    assert huge_bytes(tensor) >= 10 * page
    assert torch.equal(tensor, before)
    del tensor


def test_nothing_happens_where_turned_off(monkeypatch):
    import torch

    def refuse(*args):
        raise AssertionError("madvise called")

    monkeypatch.setattr(huge_pages, "_madvise", lambda: refuse)
    monkeypatch.setenv("KERAS_GEMMA2_HUGE_PAGES", "0")
    tensor = torch.randn(6 << 20)
    assert huge_pages.collapse([tensor]) == 0
    fresh = huge_pages.empty((6 << 20,), torch.float32)
    assert fresh.shape == (6 << 20,)
    # A plain tensor: its storage exactly its size, no mapping's slack.
    assert fresh.untyped_storage().nbytes() == 24 << 20
    monkeypatch.delenv("KERAS_GEMMA2_HUGE_PAGES")
    huge_pages.huge_page_size.cache_clear()
    monkeypatch.setattr(huge_pages.sys, "platform", "darwin")
    try:
        assert not huge_pages.enabled()
        assert huge_pages.collapse([tensor]) == 0
    finally:
        huge_pages.huge_page_size.cache_clear()


def test_small_tensors_are_left_alone(monkeypatch):
    import torch

    def refuse(*args):
        raise AssertionError("madvise called")

    monkeypatch.setattr(huge_pages, "_madvise", lambda: refuse)
    small = torch.randn(1000)
    assert huge_pages.collapse([small]) == 0
    assert huge_pages.empty((1000,), torch.float32).untyped_storage().nbytes() == 4000


@pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="TorchDecoder is the torch backend's decode path; it runs only there",
)
def test_decoder_streams_its_weights_from_huge_pages(thp_required):
    """The `[out, in]` copies and the tied head lie in huge pages; the
    logits are those of the layers (the decoder tests' bound)."""
    import torch

    from keras_gemma2.generation import torch_decode, torch_matmul
    from tests.generation.test_torch_decode import (
        fast_and_portable_logits,
        make_configured,
    )

    torch_matmul.clear_copies()
    causal_lm = make_configured(
        vocabulary_size=4096,  # the head: 8 MiB
        num_layers=2,
        hidden_dim=512,
        intermediate_dim=2048,  # gate and up's stacked copy: 8 MiB
        num_query_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        query_pre_attn_scalar=128,
    )
    token_ids = np.random.RandomState(2).randint(0, 4096, (1, 10)).astype("int32")
    with torch.no_grad():
        state = torch_decode.start(
            causal_lm,
            torch.tensor(token_ids),
            torch.ones((1, 10), dtype=torch.int32),
            4,
        )
    decoder = state[1]
    copies = decoder.layers[0].gate
    assert isinstance(copies, torch_matmul.Transposed)
    page = huge_pages.huge_page_size()
    # Every copy is a view of one arena: its huge pages hold them all.
    assert huge_bytes(copies.table) >= 12 * page
    assert huge_bytes(decoder.embeddings) >= 2 * page
    fast, full = fast_and_portable_logits(causal_lm, token_ids, 4)
    np.testing.assert_allclose(fast, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("value", ["off", "false", "2"])
def test_an_unknown_switch_value_is_refused(monkeypatch, value):
    import torch

    monkeypatch.setenv("KERAS_GEMMA2_HUGE_PAGES", value)
    with pytest.raises(ValueError, match="KERAS_GEMMA2_HUGE_PAGES.*Received: "):
        huge_pages.collapse([torch.zeros(6 << 20)])
    for on in ("1", ""):
        monkeypatch.setenv("KERAS_GEMMA2_HUGE_PAGES", on)
        assert huge_pages.enabled() == LINUX_THP
