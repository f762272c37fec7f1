"""`huge_pages`: decode weights in transparent huge pages, read off the kernel.

The kernel's own account (`/proc/self/smaps`, `AnonHugePages` of the mapping
that holds a tensor) is the reference. Where THP is off or absent,
`huge_page_size()` is 0 and the module must change nothing; those cases are
checked here too (with THP forced off), so every assertion runs on every
machine.

Huge pages are best effort: the kernel may refuse a collapse. The project's
CI got one huge page of four for the decoder's head in one run, and
`MADV_COLLAPSE` failing with EINVAL in another; the kernel answers EINVAL
for any cause that is neither a shortage (ENOMEM) nor transient (EAGAIN,
EBUSY), including conditions of the memory outside this process's control.
In a third, the head's collapse succeeded, yet by the time the test read
`smaps` (after the decoder's prompt pass, beside another backend's test run)
only 4 of its 6 MiB were still huge. In two more, `smaps` read right after
the call showed 2 and then 4 of the 6 MiB huge, the second time with no
huge-page split counted in `/proc/vmstat` in between. Inside the allocator's
memory the kernel may give up a huge page again at any time, for reasons
outside this process. So the tests hold what is ours: the advised range,
read at the `madvise` call itself, is exactly the whole huge pages inside
the tensor's storage, one call per storage; where the kernel took it on a
mapping of the test's own (nothing else lives there), `smaps`, read right
after the call, shows every one of them huge; where it refused, the values
are untouched. Inside the decoder the kernel's account is printed
(`MEASURED`), not asserted. Pages faulted in (`huge_pages.empty`) must be
huge, or the kernel must count a fallback in `/proc/vmstat`.
"""

import ctypes
import errno
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
    return range_huge_bytes(storage.data_ptr(), storage.data_ptr() + storage.nbytes())


def range_huge_bytes(start, end):
    """`AnonHugePages` (bytes) of the mappings overlapping `[start, end)`."""
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


FAULT_FALLBACKS = ("thp_fault_fallback", "thp_fault_fallback_charge")


def kernel_counters():
    """`/proc/vmstat`: the kernel's event counts, by name."""
    with open("/proc/vmstat") as file:
        return {name: int(value) for name, value in map(str.split, file)}


def fell_back(before):
    """Whether the kernel counted a huge-page fault falling back since."""
    after = kernel_counters()
    return any(after.get(n, 0) > before.get(n, 0) for n in FAULT_FALLBACKS)


class Advice:
    """Records each `madvise` call of `huge_pages`: its arguments, whether
    the kernel took it, and `errno`."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = huge_pages._madvise()

        def record(address, length, advice):
            result = real(address, length, advice)
            code = ctypes.get_errno()
            # The kernel's account of the range right after it answered.
            huge = range_huge_bytes(address, address + length)
            self.calls.append((address, length, advice, result == 0, code, huge))
            return result

        monkeypatch.setattr(huge_pages, "_madvise", lambda: record)

    def collapse_of(self, tensor):
        """`(length, took, errno, huge)` of the one `MADV_COLLAPSE` inside
        `tensor`'s storage, whose range must be exactly the storage's whole
        huge pages; `huge` is `AnonHugePages` of the range read right after
        the call."""
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        found = [
            call
            for call in self.calls
            if call[2] == huge_pages.MADV_COLLAPSE and start <= call[0] < end
        ]
        assert len(found) == 1, f"MADV_COLLAPSE inside the storage: {found}"
        address, length, _, took, code, huge = found[0]
        page = huge_pages.huge_page_size()
        assert address % page == 0 and length % page == 0 and length > 0
        assert address + length <= end  # nothing past the storage
        assert address - start < page and end - (address + length) < page
        return length, took, code, huge


def report_collapse(length, took, code, huge):
    """The kernel's answer to a collapse (`errno` `code` where it refused)
    and its account right after (`huge`), printed where short."""
    if not took:
        print(f"MEASURED MADV_COLLAPSE refused: {errno.errorcode.get(code, code)}")
    elif huge < length:
        print(f"MEASURED {huge} of {length} bytes huge right after collapsing")


def assert_collapsed(length, took, code, huge):
    """On a mapping of the test's own: where the kernel took the collapse,
    its whole huge pages were huge right after it (`smaps`, read at the
    call: `huge`); where it refused, nothing to check beyond the request
    (`Advice.collapse_of`)."""
    report_collapse(length, took, code, huge)
    if took:
        assert huge >= length, f"{huge} bytes huge after collapsing {length}"


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
    counters = kernel_counters()
    tensor.fill_(1.5)
    assert huge_bytes(tensor) >= 8 * page or fell_back(counters)
    assert float(tensor.sum()) == 1.5 * tensor.numel()


def test_collapse_moves_a_tensor_into_huge_pages_keeping_its_values(
    thp_required, monkeypatch
):
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
    advice = Advice(monkeypatch)
    asked = huge_pages.collapse([tensor, tensor[1:]])  # one storage, once
    assert len(advice.calls) == 1
    length, took, code, huge = advice.collapse_of(tensor)
    assert length >= 11 * page  # 24 MiB: 11 whole pages, 12 if aligned
    assert asked == (length if took else 0)
    assert_collapsed(length, took, code, huge)
    assert huge_bytes(tensor) >= (length if took else 0)  # a mapping of its own
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
def test_decoder_streams_its_weights_from_huge_pages(thp_required, monkeypatch):
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
    advice, counters = Advice(monkeypatch), kernel_counters()
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
    assert huge_bytes(copies.table) >= 12 * page or fell_back(counters)
    # The head (8 MiB, three whole huge pages or four): advised in place,
    # once, over exactly its whole huge pages.
    report_collapse(*advice.collapse_of(decoder.embeddings))
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
