"""Decoding's host path (issue #19): what it cuts must not change what a call computes or checks.

The index check's verdict is this thread's reused buffer on CPU, read once, as a list (no tensor op between the
check launch and the read); an unrequested lse is not allocated;
and whether the kernels run is told from ``is_cpu``/``is_cuda`` (no device built per tensor)."""
import contextlib
import threading

import pytest
import torch

import kernels
from benchmarks.overhead import stubbed_launches
from kernels import _runtime
from kernels._validate import assert_on_device
from kernels.attention import checks, decode
from aten_ops import AtenOps
from test_varlen_offsets_memo import counted_launches

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="the host path of interpreted (CPU) launches")


def _paged_step():
    """A paged decoding step (two rows, pages of 16) with its lengths on the device."""
    pages = [torch.randn(8, 16, 2, 64) for _ in "kv"]
    table = torch.arange(8, dtype=torch.int32).view(2, 4)
    return torch.randn(2, 1, 2, 64), pages, table, torch.tensor([17, 40], dtype=torch.int32)


def test_a_valid_calls_index_check_is_one_launch_and_one_read_of_a_reused_verdict():
    """Launches stubbed: a valid call makes no host torch op at all, its verdict this thread's reused buffer.
    Before: a new verdict (torch.ones), then a slice and an ``all`` of it (each an op, about 1-2 us on the host)
    before it was read."""
    q, (k_pages, v_pages), table, seqlens = _paged_step()
    fresh = seqlens.clone()  # new lengths: checked again (the same ones would be memoised)
    with stubbed_launches():
        kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
        with AtenOps() as ops:
            kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=fresh, block_table=table)
    assert ops.work == []


@pytest.fixture
def check_launches(monkeypatch):
    """The list of ``_decode_check`` launches made while the test runs."""
    return counted_launches(monkeypatch, decode._decode_check)


def test_the_same_index_tensors_are_checked_once(check_launches):
    """Every layer of a decoding step passes the same lengths and table: judged at the first (plan.LastTensor:
    the tensors' identities and versions), again after an in-place change, and a failed check is not kept."""
    q, (k_pages, v_pages), table, seqlens = _paged_step()
    first = kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    again = kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    assert len(check_launches) == 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    seqlens[1] = -1
    for _ in range(2):
        with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
            kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    table[0, 1] = 8  # row 0's second page (positions 16..31, used by its 17 keys): outside the 8 pages
    seqlens[1] = 40
    with pytest.raises(ValueError, match="block_table's pages must index k_cache's 8 pages"):
        kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    table[0, 1] = 1
    kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table, num_splits=1)
    assert len(check_launches) == 5  # the last call's other num_splits judges no index value


def test_a_failed_check_leaves_the_reused_verdict_a_pass():
    """After a call that fails its check, the next valid call passes, launched (its kernel stores the verdict) or
    stubbed (nothing stores it: the failure must not be read again), and gives the same output."""
    q, (k_pages, v_pages), table, seqlens = _paged_step()
    expected = kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    bad = torch.tensor([17, -1], dtype=torch.int32)
    for launches in (stubbed_launches, contextlib.nullcontext):
        with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
            kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=bad, block_table=table)
        with launches():
            out = kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_the_reused_verdict_serves_calls_in_and_out_of_inference_mode():
    """Made by a first call under torch.inference_mode, the thread's verdict is no inference tensor: a failing call
    outside it can still leave it a pass (before: RuntimeError, an in-place update to an inference tensor)."""
    def run():
        q, (k_pages, v_pages), table, seqlens = _paged_step()
        with torch.inference_mode():
            kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
        for mode in (contextlib.nullcontext, torch.inference_mode):
            with mode(), pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
                kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=torch.tensor([-2, 5]).int(),
                                               block_table=table)
            with mode():
                kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)

    assert _raised_in_a_new_thread(run) == []


def test_the_verdict_is_made_on_the_inputs_device_not_torchs_default():
    """Under ``with torch.device("meta")`` (as a model is built), CPU calls still check their index values on
    CPU, the thread's first call included (before: the verdict was made on the default device and the check
    failed with NotImplementedError)."""
    def run():
        q, (k_pages, v_pages), table, seqlens = _paged_step()
        with torch.device("meta"):
            out = kernels.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
            assert out.device.type == "cpu"
            with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
                kernels.attention_with_kvcache(q, k_pages, v_pages, block_table=table,
                                               cache_seqlens=torch.tensor([-2, 5], dtype=torch.int32, device="cpu"))
            assert checks.new_verdict(torch.device("cpu")).device.type == "cpu"

    assert _raised_in_a_new_thread(run) == []


def _raised_in_a_new_thread(call):
    """[the exception ``call()`` raised] or [], run in a thread of its own (its first check makes its verdict)."""
    errors = []

    def run():
        try:
            call()
        except Exception as error:  # noqa: BLE001 - handed to the test's thread
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return errors


def test_a_verdict_read_elsewhere_is_not_reused():
    """Only a caller that reads its verdict at once shares the thread's buffer (varlen's leaves a custom op)."""
    cpu = torch.device("cpu")
    assert checks.new_verdict(cpu, reused=True) is checks.new_verdict(cpu, reused=True)
    assert checks.new_verdict(cpu) is not checks.new_verdict(cpu)
    assert checks.new_verdict(cpu).tolist() == [1, 1]  # a pass where a stubbed launch stores nothing


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



@pytest.mark.parametrize("num_splits", [1, 3])
def test_an_unrequested_lse_is_not_allocated_and_the_partials_are_one_buffer(device, num_splits):
    """Without return_lse no (B, H, Sq) lse is allocated or stored (the kernels' LSE is None); split, the partial
    out (splits, B, Sq, H, D) and lse (splits, B, H, Sq) are one fp32 buffer (before: two allocations). The output
    is the one a call with return_lse gives."""
    q = torch.randn(2, 3, 4, 16, device=device, dtype=torch.float16)
    caches = [torch.randn(2, 40, 2, 16, device=device, dtype=torch.float16) for _ in "kv"]
    seqlens = torch.tensor([33, 7], dtype=torch.int32, device=device)
    out, lse = kernels.attention_with_kvcache(q, *caches, cache_seqlens=seqlens, causal=True,
                                             num_splits=num_splits, return_lse=True)
    with AtenOps() as allocations:
        alone = kernels.attention_with_kvcache(q, *caches, cache_seqlens=seqlens, causal=True, num_splits=num_splits)
    partials = [(num_splits * (2 * 3 * 4 * 16 + 2 * 4 * 3),)] if num_splits > 1 else []
    assert allocations.allocated(torch.float32) == partials
    torch.testing.assert_close(alone, out, rtol=0, atol=0)
    assert lse.isfinite().all()
