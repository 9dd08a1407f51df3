"""Decoding's host path (issue #19): what it cuts must not change what a call computes or checks.

The index check's verdict is read once, as a list, on CPU (no tensor op between the check launch and the read),
and whether the kernels run is told from ``is_cpu``/``is_cuda`` (no device built per tensor)."""
import pytest
import torch

import kernels
from benchmarks.overhead import stubbed_launches
from kernels import _runtime
from kernels._validate import assert_on_device
from test_varlen_decode_host_path import _AtenOps

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="the host path of interpreted (CPU) launches")


def _paged_step():
    """A paged decoding step (two rows, pages of 16) with its lengths on the device."""
    pages = [torch.randn(8, 16, 2, 64) for _ in "kv"]
    table = torch.arange(8, dtype=torch.int32).view(2, 4)
    return torch.randn(2, 1, 2, 64), pages, table, torch.tensor([17, 40], dtype=torch.int32)


def test_a_valid_calls_index_check_is_only_its_verdict():
    """Launches stubbed: the host's torch ops of a valid call are the verdict's ones, nothing more. Before: a slice
    and an ``all`` of the verdict (each an op, about 1-2 us on the host) before it was read."""
    q, (k_pages, v_pages), table, seqlens = _paged_step()
    with stubbed_launches(), _AtenOps() as ops:
        kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    assert ops.names == ["ones"]


def test_a_failed_rule_is_named_by_its_bit():
    """The verdict's second entry has a rule's bit clear where it failed: the message is that rule's."""
    q, (k_pages, v_pages), table, seqlens = _paged_step()
    bad_table = table.clone()
    bad_table[1, 2] = 8  # a page past the pool, used by row 1 (40 positions)
    with pytest.raises(ValueError, match=r"block_table's pages must index k_cache's 8 pages.*got block_table = "):
        kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=bad_table)
    with pytest.raises(ValueError, match=r"cache_seqlens must be >= 0.*got cache_seqlens = \[17, 65\]"):
        kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=torch.tensor([17, 65], dtype=torch.int32),
                                       block_table=table)


@pytest.mark.parametrize("cond, passes", [
    (torch.tensor([1, -1], dtype=torch.int32), True),  # a passing verdict: every entry nonzero
    (torch.tensor([0, -3], dtype=torch.int32), False),
    (torch.tensor(True), True),  # 0-d: the general read
    (torch.tensor(0), False),
    (torch.ones(9, dtype=torch.bool), True),  # past the list read
    (torch.ones(9, dtype=torch.bool).index_fill(0, torch.tensor([8]), False), False),
    (torch.ones(2, 2, dtype=torch.bool), True),
])
def test_assert_on_device_reads_every_element(cond, passes):
    if passes:
        assert_on_device(cond, "message")
    else:
        with pytest.raises(ValueError, match="^message$"):
            assert_on_device(cond, "message")


def test_kernels_can_run_asks_the_tensors_not_their_devices(monkeypatch):
    """Interpreted kernels take CPU tensors, not meta ones; told without ``Tensor.device`` (a device object and a
    string per tensor, before)."""
    meta = torch.empty(2, device="meta")
    cpu = torch.empty(2)

    def no_device(self):
        raise AssertionError("Tensor.device read")

    monkeypatch.setattr(torch.Tensor, "device", property(no_device))
    assert _runtime.kernels_can_run(cpu, cpu)
    assert not _runtime.kernels_can_run(cpu, meta)
