"""kernels.attention_with_kvcache (kernels/attention/decode.py) with paged caches used the way serving engines use
them: prefix pages shared by several block-table rows, pages in any order, garbage past each row's used pages,
odd page sizes, appends of several tokens crossing pages, and every slot no append names left byte-identical.

The reference applies every row's append to a copy of the page pool first (so a row reading a page another row
appends to sees the new key, as documented), then gathers each row's used pages into a dense cache and runs
kernels.reference.attention in float64; torch doing the same in the inputs' dtype bounds the rounding noise.
"""
import math

import pytest
import torch

import kernels
from kernels import reference
from test_decode import _rotate
from tolerance import FORWARD, assert_close

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def _int32(values):
    return torch.tensor(values, dtype=torch.int32)


def _expected(dtype, q, k_pages, v_pages, k, v, table, seqlens, rotary_cos=None, rotary_sin=None,
              rotary_interleaved=True, cache_leftpad=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, num_splits=0):
    """(out (B, Sq, H, D), lse (B, H, Sq), k pool, v pool after the appends) in ``dtype``: only the table entries
    of each row's used pages are read."""
    page_size = k_pages.shape[1]
    k_pages, v_pages = k_pages.to(dtype).clone(), v_pages.to(dtype).clone()
    batch, n_q = q.shape[:2]
    n_new = 0 if k is None else k.shape[1]
    for b in range(batch):
        start = int(seqlens[b])
        new_pos = torch.arange(start, start + n_new)
        kb = k[b].to(dtype) if k is not None and rotary_cos is None else (
            _rotate(k[b].to(dtype), rotary_cos, rotary_sin, new_pos, rotary_interleaved) if k is not None else None)
        for i, p in enumerate(new_pos.tolist()):
            page = int(table[b, p // page_size])
            k_pages[page, p % page_size], v_pages[page, p % page_size] = kb[i], v[b, i].to(dtype)
    outs, lses = [], []
    for b in range(batch):
        start = int(seqlens[b])
        end = start + n_new
        used = table[b, :math.ceil(end / page_size)].long()
        keys, values = k_pages[used].flatten(0, 1)[:end], v_pages[used].flatten(0, 1)[:end]
        qb = q[b].to(dtype)
        if rotary_cos is not None:
            same = not causal and window_size == (-1, -1)
            qb = _rotate(qb, rotary_cos, rotary_sin, torch.full((n_q,), start) if same else
                         torch.arange(start, start + n_q), rotary_interleaved)
        low = 0 if cache_leftpad is None else int(cache_leftpad[b])
        visible = (torch.arange(end) >= low)[None, :].expand(n_q, end)
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1])
        out, lse = reference.attention(qb.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                       values.transpose(0, 1)[None], causal=causal, mask=visible, return_lse=True,
                                       window_size=window_size, softcap=softcap,
                                       alibi_slopes=None if slopes is None else slopes.to(dtype))
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses), k_pages, v_pages


def _check(q, k_pages, v_pages, k, v, table, seqlens, **kw):
    """Run the kernel on copies of the pools; check out, lse and the pools against float64, and every slot no new
    key was written to byte for byte. Returns (out, lse, k pool, v pool) of the kernel."""
    dtype = q.dtype
    k_run, v_run = k_pages.clone(), v_pages.clone()
    out, lse = kernels.attention_with_kvcache(q, k_run, v_run, k, v, cache_seqlens=seqlens, block_table=table,
                                              return_lse=True, **kw)
    exact = _expected(torch.float64, q, k_pages, v_pages, k, v, table, seqlens, **kw)
    low = _expected(dtype, q, k_pages, v_pages, k, v, table, seqlens, **kw)
    assert_close(out, exact[0], low[0], FORWARD)
    empty = torch.isneginf(exact[1])
    assert torch.equal(torch.isneginf(lse), empty) and torch.all(out.transpose(1, 2)[empty] == 0)
    assert_close(lse[~empty], exact[1][~empty], low[1].float()[~empty], FORWARD, name="lse")
    assert torch.equal(v_run, low[3]), "the new values are copied exactly"
    assert_close(k_run, exact[2], low[2], FORWARD, name="k pool")
    written = torch.zeros(k_pages.shape[:2], dtype=torch.bool)
    page_size, n_new = k_pages.shape[1], 0 if k is None else k.shape[1]
    for b in range(q.shape[0]):
        for p in range(int(seqlens[b]), int(seqlens[b]) + n_new):
            written[int(table[b, p // page_size]), p % page_size] = True
    for run, given in ((k_run, k_pages), (v_run, v_pages)):  # byte for byte: NaN payloads and -0.0 included
        assert torch.equal(run[~written].view(torch.int16 if dtype != FP32 else torch.int32),
                           given[~written].view(torch.int16 if dtype != FP32 else torch.int32))
    return out, lse, k_run, v_run


def _step(dtype, batch, n_q, n_new, pages, page_size, heads=4, kv_heads=2, d=16):
    q = torch.randn(batch, n_q, heads, d, dtype=dtype)
    k_pages, v_pages = (torch.randn(pages, page_size, kv_heads, d, dtype=dtype) for _ in "kv")
    k, v = (torch.randn(batch, n_new, kv_heads, d, dtype=dtype) if n_new else None for _ in "kv")
    return q, k_pages, v_pages, k, v


@pytest.mark.parametrize("page_size, n_new, splits", [(16, 1, 0), (3, 3, 3), (1, 2, 1), (5, 4, 7)])
def test_prefix_pages_shared_garbage_past_the_end(page_size, n_new, splits):
    """Two rows share their first two pages (prefix caching) and own tails in shuffled order; entries past each
    row's used pages are -1, int32's largest and 2**30 (never read, not an error); Sq = Sk_new new tokens cross a
    page boundary where the page is small (speculative decoding)."""
    q, k_pages, v_pages, k, v = _step(FP16, 2, n_new, n_new, 9, page_size)
    table = _int32([[6, 2, 8, 0, -1, 2**31 - 1], [6, 2, 5, 1, 3, 2**30]])
    end = 4 * page_size if page_size < 16 else 3 * page_size - 1  # row 1's last position + 1 after the append
    seqlens = _int32([2 * page_size + 1 - min(n_new, page_size), end - n_new])
    _check(q, k_pages, v_pages, k, v, table, seqlens, causal=True, num_splits=splits)


def test_a_row_reads_the_new_key_another_row_appends_to_a_shared_page():
    """Row 0 appends into page 2, slot 2, which row 1 also maps (its position 2): row 1 sees row 0's new key (the
    appends land before any row attends; README: rows sharing a page see each other's new keys)."""
    q, k_pages, v_pages, k, v = _step(FP32, 2, 1, 1, 6, 4)
    out, _, k_run, _ = _check(q, k_pages, v_pages, k, v, _int32([[2, 3], [2, 4]]), _int32([2, 5]))
    assert torch.equal(k_run[2, 2], k[0, 0])


@pytest.mark.parametrize("interleaved", [True, False])
def test_everything_at_once_on_pages(interleaved):
    """bf16, GQA, Sq = 3 new tokens with rotary (full or half the head dim), left padding, a causal window,
    softcap, per-batch ALiBi and 3 splits, on 5-slot pages."""
    q, k_pages, v_pages, k, v = _step(BF16, 2, 3, 3, 9, 5, heads=6, kv_heads=2, d=12)
    angle = torch.rand(20, 3 if interleaved else 6, dtype=torch.float64) * 2 * math.pi
    _check(q, k_pages, v_pages, k, v, _int32([[8, 0, 3, -1], [1, 7, 2, 6]]), _int32([6, 14]), causal=True,
           rotary_cos=angle.cos().to(BF16), rotary_sin=angle.sin().to(BF16), rotary_interleaved=interleaved,
           cache_leftpad=_int32([2, 5]), window_size=(7, 0), softcap=4.0, alibi_slopes=torch.rand(2, 6),
           num_splits=3)


def test_empty_rows_and_a_full_table():
    """Row 0 holds nothing (seqlen 0, no append, its table all garbage): zeros and lse -inf; row 1's append fills
    its table to the last slot. Then one more key overflows: ValueError before anything is written."""
    q, k_pages, v_pages, _, _ = _step(FP16, 2, 2, 0, 6, 4)
    table = _int32([[-1, -1, -1], [4, 0, 5]])
    out, lse, _, _ = _check(q, k_pages, v_pages, None, None, table, _int32([0, 12]), num_splits=2)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    k, v = (torch.randn(2, 2, 2, 16, dtype=FP16) for _ in "kv")
    _check(q, k_pages, v_pages, k, v, _int32([[3, -1, -1], [4, 0, 5]]), _int32([0, 10]), causal=True)
    before = k_pages.clone(), v_pages.clone()
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0 and leave room for the Sk_new = 2 new keys"):
        kernels.attention_with_kvcache(q, k_pages, v_pages, k, v, cache_seqlens=_int32([0, 11]), block_table=table)
    assert torch.equal(k_pages, before[0]) and torch.equal(v_pages, before[1])


def test_unused_slots_holding_nan_are_never_read():
    """A pool from torch.empty may hold NaN anywhere no key was written: slots past each row's end, whole pages
    no row uses, slots below the left padding. None of them reaches the output, with or without splits."""
    q, k_pages, v_pages, k, v = _step(FP16, 2, 3, 3, 10, 4)
    table = _int32([[2, 3, 7, -1], [5, 4, 1, 2**30]])
    seqlens, leftpad = [6, 5], _int32([3, 1])
    full_k, full_v = torch.full_like(k_pages, float("nan")), torch.full_like(v_pages, float("nan"))
    for b in range(2):
        for p in range(int(leftpad[b]), seqlens[b]):
            full_k[table[b, p // 4], p % 4], full_v[table[b, p // 4], p % 4] = k_pages[0, 0], v_pages[0, 0]
    for splits in (1, 3):
        for causal in (False, True):
            out, lse = kernels.attention_with_kvcache(q, full_k.clone(), full_v.clone(), k, v,
                                                      cache_seqlens=_int32(seqlens), block_table=table,
                                                      cache_leftpad=leftpad, causal=causal, num_splits=splits,
                                                      return_lse=True)
            assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_pools_that_are_views_of_one_buffer():
    """vLLM-style (num_blocks, 2, page_size, Hkv, D) storage passed as its K and V halves (page stride twice the
    page): the append writes through the views into the one buffer."""
    q, _, _, k, v = _step(FP16, 2, 1, 1, 10, 4)
    kv = torch.randn(10, 2, 4, 2, 16, dtype=FP16)
    table, seqlens = _int32([[2, 3, -1], [5, 4, 1]]), _int32([5, 9])
    expected = _check(q, kv[:, 0].clone(), kv[:, 1].clone(), k, v, table, seqlens)
    out = kernels.attention_with_kvcache(q, kv[:, 0], kv[:, 1], k, v, cache_seqlens=seqlens, block_table=table)
    assert torch.equal(out, expected[0]) and torch.equal(kv[:, 0], expected[2]) and torch.equal(kv[:, 1], expected[3])


def test_a_page_repeated_in_one_row_names_that_row():
    """One row whose 5 new keys land twice on slot 0 of page 2 (a page repeated in its own row) is refused before
    the pool is written; the message used to say two batch rows clashed, with B = 1."""
    q, k_pages, v_pages, k, v = _step(FP16, 1, 5, 5, 4, 4)
    before = k_pages.clone()
    with pytest.raises(ValueError, match="two new keys of one batch row .*a page repeated in its row"):
        kernels.attention_with_kvcache(q, k_pages, v_pages, k, v, cache_seqlens=_int32([0]),
                                       block_table=_int32([[2, 2]]))
    assert torch.equal(k_pages, before)


def test_paged_bad_inputs_raise_clear_errors():
    """flash-attn's refusals and the argument checks, each before the pool is written."""
    q, k_pages, v_pages, k, v = _step(FP16, 2, 1, 1, 6, 4)
    table, seqlens = _int32([[2, 3], [5, 4]]), _int32([2, 5])
    before = k_pages.clone()
    calls = [
        (dict(cache_batch_idx=_int32([0, 1])), "cache_batch_idx is not supported with a paged cache"),
        (dict(block_table=table.long()), "block_table must have dtype in \\(int32\\)"),
        (dict(block_table=table[:1]), "block_table must have shape \\(2, 2\\)"),
        (dict(block_table=_int32([[2, -1], [5, 4]]), cache_seqlens=_int32([4, 5])), "block_table's pages must index"),
        (dict(k_cache=k_pages[:, :0], v_cache=v_pages[:, :0]), "needs page_size >= 1"),
    ]
    for overrides, message in calls:
        args = {**dict(k_cache=k_pages, v_cache=v_pages, cache_seqlens=seqlens, block_table=table), **overrides}
        with pytest.raises((TypeError, ValueError), match=message):
            kernels.attention_with_kvcache(q, args.pop("k_cache"), args.pop("v_cache"), k, v, **args)
        assert torch.equal(k_pages, before)


def test_a_table_whose_capacity_passes_2_to_the_31_positions_checks_only_its_used_pages():
    """unusable_pages computed block * page_size in int32: past 2^31 positions the unused entries (-1) counted as
    used, and a valid call was refused ('block_table's pages must index k_cache's 3 pages')."""
    k_pages = torch.randn(3, 2**16, 1, 8, dtype=torch.float16)
    v_pages = torch.randn_like(k_pages)
    table = torch.full((1, 2**15 + 2), -1, dtype=torch.int32)
    table[0, :2] = torch.tensor([2, 0], dtype=torch.int32)
    q, k, v = (torch.randn(1, 1, 1, 8, dtype=torch.float16) for _ in range(3))
    seqlens = torch.tensor([3], dtype=torch.int32)  # entry p >= 2^15 gave p * 2^16 < 0 < 4 positions: "used"
    out = kernels.attention_with_kvcache(q, k_pages, v_pages, k, v, cache_seqlens=seqlens, block_table=table)
    assert out.shape == (1, 1, 1, 8) and torch.isfinite(out).all()
    assert torch.equal(k_pages[2, 3], k[0, 0])  # the new key at position 3: the table's first page (2), slot 3
