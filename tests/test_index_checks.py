"""Index values are judged by one check kernel per call (issue #19): on a GPU a call's index checks are one launch
and one device assert, and the kernel's rules keep their meaning at sizes that take it several steps and tiles.

Before the check kernels, the same checks were separate torch ops, each a launch on a GPU: contiguous decoding 4
ops and 1 assert, paged decoding 13 and 2, varlen about 10 and 1."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import kernels
from kernels.attention import checks, decode, varlen
from kernels.attention.varlen import attention_varlen

_ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
                torch.ops.aten.new_empty, torch.ops.aten.lift_fresh}

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="launches are recorded in the interpreter")


def _int32(values):
    return torch.tensor(values, dtype=torch.int32)


class _Ops(TorchDispatchMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket in _ALLOCATIONS):
            self.events.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _device_work(monkeypatch):
    """Inside the block, the list of the device work done, in order, as a GPU would run it (the verdict judged by
    a device assert, not read): Triton kernels launched and aten ops that are neither views nor allocations."""
    from triton.runtime.interpreter import GridExecutor

    events = []
    launch = GridExecutor.__call__

    def recorded(self, *args, **kwargs):
        events.append(self.fn.__name__)
        with _disable_current_modes():  # the interpreter's own host copies are not the kernel's work
            return launch(self, *args, **kwargs)

    monkeypatch.setattr(checks, "reads_at_once", lambda device: False)
    monkeypatch.setattr(GridExecutor, "__call__", recorded)
    with _Ops(events):
        yield events


def _paged_call():
    """A paged decoding step appending 2 keys to 3 rows (left-padded) of 4 pages of 8."""
    q, k, v = torch.randn(3, 1, 4, 16), torch.randn(3, 2, 2, 16), torch.randn(3, 2, 2, 16)
    pages = [torch.randn(13, 8, 2, 16) for _ in "kv"]
    table = torch.randperm(12, dtype=torch.int32).view(3, 4)
    return dict(q=q, k_cache=pages[0], v_cache=pages[1], k=k, v=v, cache_seqlens=_int32([5, 0, 30]),
                cache_leftpad=_int32([1, 0, 7]), block_table=table, num_splits=1)


def test_paged_decode_checks_are_one_launch_and_one_assert(monkeypatch):
    call = _paged_call()
    with _device_work(monkeypatch) as work:
        kernels.attention_with_kvcache(**call)
    assert work == ["_decode_check", "_assert_async", "_decode_append", "_decode_append", "_decode_fwd"]


def test_contiguous_decode_checks_are_one_launch_and_one_assert(monkeypatch):
    """With cache_batch_idx, left padding and rotated causal queries (every contiguous-cache rule)."""
    q, k, v = torch.randn(2, 2, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    caches = [torch.randn(3, 24, 2, 16) for _ in "kv"]
    cos, sin = torch.randn(24, 4), torch.randn(24, 4)
    with _device_work(monkeypatch) as work:
        kernels.attention_with_kvcache(q, *caches, k, v, rotary_cos=cos, rotary_sin=sin,
                                       cache_seqlens=_int32([3, 20]), cache_batch_idx=_int32([2, 0]),
                                       cache_leftpad=_int32([1, 2]), causal=True, num_splits=1)
    assert work == ["_decode_check", "_assert_async", "_decode_append", "_decode_append", "_decode_append",
                    "_decode_fwd"]


@pytest.mark.parametrize("paged", [False, True])
def test_varlen_checks_are_one_launch_and_one_assert_before_anything_else(monkeypatch, paged):
    """Both offsets, both max_seqlen and (paged) the block table's ids: judged first, by one launch and one
    assert; no other check follows."""
    lens = [3, 0, 9]
    cu = _int32([0, 3, 3, 12])
    q = torch.randn(12, 2, 16)
    if paged:
        k, v = torch.randn(2, 8, 8, 2, 16)
        keys = dict(k=k, v=v, block_table=_int32([[0, 1], [2, 3], [4, 5]]))
    else:
        k, v = torch.randn(2, 12, 2, 16)
        keys = dict(k=k, v=v)
    with _device_work(monkeypatch) as work:
        attention_varlen(q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens), **keys)
    assert work[:2] == ["_varlen_check", "_assert_async"]
    assert [w for w in work if "check" in w or "assert" in w] == work[:2]


# -------------------------------------------------------------------------------- rules past one step or tile


def _decode_rule_fails(match, seqlens=None, leftpad=None, batch_idx=None, block_table=None, n_new=0, capacity=64,
                       page_size=0, cache_rows=80, rotary_rows=None):
    """Assert that decode's check of these index values (one query per row) raises ValueError matching ``match``,
    or with ``match`` None that it passes."""
    batch = next(t.shape[0] for t in (seqlens, leftpad, batch_idx, block_table) if t is not None)
    args = (seqlens, leftpad, batch_idx, block_table, batch, 1, n_new, capacity, page_size, cache_rows, rotary_rows)
    if match is None:
        decode._check_index_values(*args)
        return
    with pytest.raises(ValueError, match=match):
        decode._check_index_values(*args)


def test_decode_rules_hold_past_the_first_step_of_rows():
    """300 rows: the kernel reads them in steps of INDEX_BLOCK; a bad value in the last step is found, and the
    message shows the argument's values."""
    assert 300 > checks.INDEX_BLOCK
    seqlens = torch.randint(0, 60, (300,), dtype=torch.int32)
    seqlens[200] = 59
    _decode_rule_fails(None, seqlens=seqlens, leftpad=seqlens // 2)
    seqlens[290] = 70
    _decode_rule_fails(r"cache_seqlens must be >= 0 .*; got cache_seqlens = tensor\(\[", seqlens=seqlens)
    seqlens[290] = 10
    leftpad = seqlens.clone()
    leftpad[299] += 1
    _decode_rule_fails("cache_leftpad must be >= 0 and <= cache_seqlens", seqlens=seqlens, leftpad=leftpad)
    _decode_rule_fails("rotary_cos/rotary_sin need a row", seqlens=seqlens, rotary_rows=59)  # 59 + Sq > 59
    _decode_rule_fails(None, seqlens=seqlens, rotary_rows=60)


def test_a_repeated_cache_row_is_found_across_tiles():
    """70 batch rows compared pairwise in PAIR_BLOCK tiles: rows 3 and 68 (different tiles) share a cache row."""
    assert 70 > 2 * checks.PAIR_BLOCK
    batch_idx = torch.randperm(80, dtype=torch.int32)[:70]
    seqlens = torch.zeros(70, dtype=torch.int32)
    _decode_rule_fails(None, seqlens=seqlens, batch_idx=batch_idx, n_new=1)
    batch_idx[68] = batch_idx[3]
    _decode_rule_fails(None, seqlens=seqlens, batch_idx=batch_idx)  # nothing appended: rows may repeat
    _decode_rule_fails("cache_batch_idx must not repeat", seqlens=seqlens, batch_idx=batch_idx, n_new=1)


def test_paged_appends_clash_only_where_their_slots_overlap():
    """40 rows appending 20 keys each to pages of 16 touch up to 3 pages a row (120 entries, several tiles). Two
    rows may share a page where their new slots do not overlap; overlapping slots, or one row's keys sent twice
    to one page, are refused."""
    seqlens = torch.full((40,), 5, dtype=torch.int32)  # positions 5..24: slots 5..15 of page 0, 0..8 of page 1
    table = torch.arange(40 * 4, dtype=torch.int32).view(40, 4)
    rules = dict(n_new=20, capacity=64, page_size=16, cache_rows=160)
    _decode_rule_fails(None, seqlens=seqlens, block_table=table, **rules)
    shared = table.clone()
    shared[39, 1] = shared[0, 0]  # row 39's slots 0..8 there, where row 0 writes 5..15
    _decode_rule_fails("block_table maps the new keys of two batch rows to the same cache slot", seqlens=seqlens,
                       block_table=shared, **rules)
    later = seqlens.clone()
    later[0] = 9  # row 0 now writes slots 9..15 of that page (and 0..12 of its second)
    _decode_rule_fails(None, seqlens=later, block_table=shared, **rules)
    own = table.clone()
    own[7, 1] = own[7, 0]  # row 7's slots 5..15 and 0..8 on one page: 5..8 twice
    _decode_rule_fails("same cache slot", seqlens=seqlens, block_table=own, **rules)
    unused = table.clone()
    unused[:, 2:] = -1  # pages past position 24 are never read
    _decode_rule_fails(None, seqlens=seqlens, block_table=unused, **rules)
    unused[12, 1] = 160
    _decode_rule_fails("block_table's pages must index k_cache's 160 pages", seqlens=seqlens, block_table=unused,
                       **rules)


def test_varlen_rules_hold_past_the_first_step_of_sequences():
    """300 sequences (two steps of the kernel): a decrease, a sequence longer than max_seqlen or a used page id
    outside the pool in the last step is found; an unused entry may hold anything."""
    lens = torch.arange(300) % 5  # the last sequence has 4 tokens, the first none
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).int()
    q = torch.randn(int(cu[-1]), 1, 8)
    attention_varlen(q, q, q, cu, cu, 4, 4)
    decreasing = cu.clone()
    decreasing[296] = decreasing[297] + 1
    with pytest.raises(ValueError, match=r"cu_seqlens_k must be non-decreasing .*; got cu_seqlens_k = tensor"):
        attention_varlen(q, q, q, cu, decreasing, 4, 4)
    longer = cu.clone()
    longer[299] -= 1  # the last sequence: 5 tokens
    with pytest.raises(ValueError, match="max_seqlen_q = 4 must be at least the longest sequence of cu_seqlens_q"):
        attention_varlen(q, q, q, longer, cu, 4, 4)
    pages = torch.randn(300, 4, 1, 8)
    table = torch.arange(300, dtype=torch.int32)[:, None]
    table[0] = 300  # the first sequence uses no page
    attention_varlen(q, pages, pages, cu, cu, 4, 4, block_table=table)
    table[299] = 300
    with pytest.raises(ValueError, match="block_table: a page id a sequence uses is outside .* = 300"):
        attention_varlen(q, pages, pages, cu, cu, 4, 4, block_table=table)


def test_varlen_check_is_an_op_torch_compile_traces():
    """torch.compile cannot trace into an interpreted launch: the check is a custom op there (opcheck passes),
    the compiled call matches eager, and bad offsets fail its device assert naming the arguments."""
    cu = _int32([0, 3, 3, 12])
    torch.library.opcheck(varlen._offsets_verdict_op, (cu, cu, None, 12, 12, 9, 9, 0, 0))
    q = torch.randn(12, 2, 16)
    compiled = torch.compile(lambda q, cu: attention_varlen(q, q, q, cu, cu, 9, 9), backend="aot_eager")
    torch.testing.assert_close(compiled(q, cu), attention_varlen(q, q, q, cu, cu, 9, 9), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="cu_seqlens_q/cu_seqlens_k must start at 0"):
        compiled(q, _int32([0, 3, 2, 12]))
