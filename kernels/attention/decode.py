"""Attention against a KV cache for inference decoding (flash-attn 2.x's ``flash_attn_with_kvcache``), split-KV.

Layouts are flash-attn's (B, S, H, D): q (B, Sq, H, D); the cache (B_cache, S_cache, Hkv, D), or paged
(num_blocks, page_size, Hkv, D) with a (B, max_blocks) int32 block table mapping logical page p of batch row b
to physical page ``block_table[b, p]``. Batch row b's keys are the logical positions [leftpad_b, seqlen_b) of its
cache, seqlen_b = cache_seqlens[b] + Sk_new, where the Sk_new new keys/values were first written, in place, at
positions [cache_seqlens[b], seqlen_b). With L_b = seqlen_b - leftpad_b keys, query i sees key position p iff
leftpad_b <= p < seqlen_b and, with diag = i + seqlen_b - Sq (bottom-right alignment per row):
causal: p <= diag; window (left, right): diag - left <= p <= diag + right (-1 = unbounded).
Scores are ``scale * q.k`` (``softcap * tanh(scale * q.k / softcap)`` with softcap > 0), then with ALiBi minus
``slope_h * |diag - p|`` (flash-attn's |i + seqlen_k - seqlen_q - j| with the row's own seqlen_k; left padding
moves neither); rows that see no key give zeros and lse = -inf.

Three kernels, one family with ``kernels.py`` (its tile helpers, online softmax in base 2, UPCAST for the
interpreter's bf16 ``tl.dot``, ``cast_rne`` stores):

- ``_decode_append``: copies new keys/values into their cache slots, and rotates q and the new keys (rotary
  embedding in fp32, rounded to the cache's dtype) at positions cache_seqlens[b] + i.
- ``_decode_fwd``: one program per (batch, kv head, block of packed query rows, key split). The GQA group's query
  heads and the Sq new tokens are packed into one tile (row r = token r // group, head kv_h * group + r % group),
  so each K/V block is read once per kv head, not once per query head. With splits > 1 (flash-decoding) each
  program covers a balanced share of its rows' key blocks and writes a normalised partial (out, lse) in fp32.
- ``_decode_combine``: merges the splits' partials by their lse (an online softmax over splits).

Forward only: like flash-attn's, there is no backward.
"""
import functools
import math
import numbers
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from kernels import _direct, _runtime
from kernels._runtime import cast_rne
from kernels._validate import check_same, is_dense
from kernels.attention.checks import (INDEX_BLOCK, PAIR_BLOCK, SOFTCAP_MAX, check_alibi, check_flag, check_scale,
                                      check_softcap, check_tensor, check_window, count, enforce, new_verdict,
                                      plain_qkv_shapes, rule_bit, store_verdict, unusable_pages)
from kernels.attention.configs import (AMD, FAMILIES, MAX_HEAD_DIM, NVIDIA, Family, d_bucket, device_family, grid,
                                       kernel_meta, padded_head_dim, uses_tf32)
from kernels.attention.kernels import (LN2, LOG2E, _alibi_slope, _load_tile, _program_block, _row_offset, _scores,
                                      _store_tile, _tile_ptrs)
from kernels.attention.plan import LastTensor
from kernels.registry import TRITON_DTYPES, Build, declare, forceable, forced_config, register_builds

# ------------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _batch_row(SEQLENS, LEFTPAD, BATCH_IDX, b, capacity, n_new):
    """(first visible key, one past the last key, cache batch row) of batch row ``b``."""
    if SEQLENS is None:
        seqlen = b * 0 + capacity  # a tensor even when Triton specialises capacity == 1 to a constant
    else:
        seqlen = tl.load(SEQLENS + b) + n_new
    if LEFTPAD is None:
        lo = 0
    else:
        lo = tl.maximum(tl.load(LEFTPAD + b), 0)  # no key position below 0, whatever the (checked) value
    if BATCH_IDX is None:
        cache_b = b
    else:
        cache_b = tl.load(BATCH_IDX + b)
    return lo, seqlen, cache_b


@triton.jit
def _cache_ptrs(X, BLOCK_TABLE, stride_tb, b, cache_b, head, pos, pos_ok, offs_d, page_size, cache_rows,
                stride_xb, stride_xn, stride_xh, stride_xd):
    """Pointers to the (len(pos), BLOCK_D) tile of cache rows at logical positions ``pos`` (in [0, capacity) where
    ``pos_ok``) of batch row ``b``: row ``pos`` of cache batch ``cache_b``, or with a block table row
    ``pos % page_size`` of page ``BLOCK_TABLE[b, pos // page_size]`` (read only where ``pos_ok``). The cache batch
    or page is clamped to X's ``cache_rows`` (>= 1) rows: the launcher checks the values on the device, and the
    clamp keeps every address inside X even where those checks are off."""
    if BLOCK_TABLE is None:
        row = tl.minimum(tl.maximum(cache_b, 0), cache_rows - 1)
        ptrs = _tile_ptrs(X, row, head, pos, offs_d, stride_xb, stride_xh, stride_xn, stride_xd)
    else:
        page = tl.load(BLOCK_TABLE + _row_offset(b, stride_tb) + pos // page_size, mask=pos_ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), cache_rows - 1)
        ptrs = _tile_ptrs(X, page[:, None], head, pos % page_size, offs_d, stride_xb, stride_xh, stride_xn, stride_xd)
    return ptrs


@triton.jit
def _decode_append(X, DST, COS, SIN, SEQLENS, BATCH_IDX, BLOCK_TABLE, stride_tb,
                   stride_xb, stride_xn, stride_xh, stride_xd,
                   stride_db, stride_dn, stride_dh, stride_dd,
                   stride_cn, stride_cd,
                   heads, n_rows, capacity, page_size, cache_rows, rotary_dim,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, TO_CACHE: tl.constexpr,
                   INTERLEAVED: tl.constexpr, SAME_POSITION: tl.constexpr):
    """One program per (block of rows, batch * head) of X (B, n_rows, heads, D): row i of batch b, rotated (with
    COS/SIN (S_ro, rotary_dim / 2)) at position cache_seqlens[b] + i (cache_seqlens[b] for every row with
    SAME_POSITION), is stored to the cache slot at that position (TO_CACHE) or to row i of DST (B, n_rows, heads,
    D). ``capacity`` bounds the positions (the cache's, or COS's S_ro rows for q): rows at positions outside
    [0, capacity) are neither rotated nor written to the cache."""
    start_m, off_bh = _program_block(n_rows, BLOCK_M)
    b = off_bh // heads
    head = off_bh % heads
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    base = tl.load(SEQLENS + b)
    pos = base + rows
    if SAME_POSITION:
        pos = base + rows * 0
    in_cache = (pos >= 0) & (pos < capacity)  # also where an unchecked cache_seqlens overflows int32
    x = _load_tile(_tile_ptrs(X, b, head, rows, offs_d, stride_xb, stride_xh, stride_xn, stride_xd), row_ok, offs_d,
                   True, HEAD_DIM, BLOCK_D).to(tl.float32)
    if COS is not None:
        # x'[d] = x[d] cos[f] + sign * x[partner] sin[f] on the first rotary_dim dims: pairs (2j, 2j + 1) with
        # frequency j when interleaved, else (j, j + rotary_dim / 2) (GPT-NeoX); cos = 1, sin = 0 elsewhere.
        half = rotary_dim // 2
        if INTERLEAVED:
            partner = offs_d ^ 1
            freq = offs_d // 2
            sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        else:
            partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
            freq = tl.where(offs_d < half, offs_d, offs_d - half)
            sign = tl.where(offs_d < half, -1.0, 1.0)
        rotated = row_ok[:, None] & (offs_d < rotary_dim)[None, :] & in_cache[:, None]
        x_partner = tl.load(_tile_ptrs(X, b, head, rows, partner, stride_xb, stride_xh, stride_xn, stride_xd),
                            mask=rotated, other=0.0).to(tl.float32)
        cs_offs = _row_offset(pos, stride_cn)[:, None] + _row_offset(freq, stride_cd)[None, :]
        cos = tl.load(COS + cs_offs, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(SIN + cs_offs, mask=rotated, other=0.0).to(tl.float32)
        x = x * cos + sign[None, :] * x_partner * sin
    if TO_CACHE:
        ok = row_ok & in_cache
        cache_b = b
        if BATCH_IDX is not None:
            cache_b = tl.load(BATCH_IDX + b)
        dst = _cache_ptrs(DST, BLOCK_TABLE, stride_tb, b, cache_b, head, pos, ok, offs_d, page_size, cache_rows,
                          stride_db, stride_dn, stride_dh, stride_dd)
    else:
        ok = row_ok
        dst = _tile_ptrs(DST, b, head, rows, offs_d, stride_db, stride_dh, stride_dn, stride_dd)
    _store_tile(dst, cast_rne(x, DST.dtype.element_ty), ok, offs_d, HEAD_DIM)


@triton.jit
def _decode_fwd(Q, K, V, O, LSE, SEQLENS, LEFTPAD, BATCH_IDX, BLOCK_TABLE, ALIBI, stride_tb, stride_ab,
                stride_qb, stride_qn, stride_qh, stride_qd,
                stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn, stride_vh, stride_vd,
                stride_ob, stride_on, stride_oh, stride_os, stride_od,
                stride_lb, stride_lh, stride_ln, stride_ls, lse_start,
                kv_heads, group, n_q, n_new, capacity, page_size, cache_rows, splits, window_left, window_right,
                qk_scale, cap_log2,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """One program per (split, packed row block, batch * kv head) (split fastest): the normalised out of its rows
    over its share of their keys into O (split s at offset s * stride_os) and the natural-log lse into LSE from
    element ``lse_start`` on (None: not stored; the splits' partials are one buffer, their lse after their out).
    ALIBI: float32 slopes (B, H) or (H,) (stride_ab 0), indexed by each packed row's query head."""
    pid = tl.program_id(0)
    split = pid % splits
    m_blocks = tl.cdiv(group * n_q, BLOCK_M)
    start_m = (pid // splits) % m_blocks * BLOCK_M
    off_bh = pid // splits // m_blocks
    b = off_bh // kv_heads
    kv_h = off_bh % kv_heads
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < group * n_q
    tok = rows // group
    h = kv_h * group + rows % group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(_tile_ptrs(Q, b, h[:, None], tok, offs_d, stride_qb, stride_qh, stride_qn, stride_qd), row_ok,
                   offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)

    lo, seqlen, cache_b = _batch_row(SEQLENS, LEFTPAD, BATCH_IDX, b, capacity, n_new)
    slope_log2 = _alibi_slope(ALIBI, stride_ab, b, h[:, None])  # (BLOCK_M, 1): one slope per packed row's head
    diag = tok + seqlen - n_q  # each row's last causal key: bottom-right alignment per batch row
    # Keys some row of the block may see, [blk_lo, blk_hi), split into runs of whole key blocks whose lengths
    # differ by at most one block, so no split is idle while another has work.
    blk_lo = lo
    blk_hi = tl.minimum(seqlen, capacity)
    first_diag = start_m // group + seqlen - n_q
    last_diag = (tl.minimum(start_m + BLOCK_M, group * n_q) - 1) // group + seqlen - n_q
    if LOCAL_LEFT:
        blk_lo = tl.maximum(blk_lo, first_diag - window_left)
    if LOCAL_RIGHT:
        blk_hi = tl.minimum(blk_hi, last_diag + window_right + 1)
    blk_hi = tl.maximum(blk_hi, blk_lo)
    n_blocks = tl.cdiv(blk_hi - blk_lo, BLOCK_N)
    start = blk_lo + (split * n_blocks // splits) * BLOCK_N
    end = tl.minimum(blk_hi, blk_lo + ((split + 1) * n_blocks // splits) * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Every block is masked: a decode step is bound by reading the cache, and per-row windows and page gathers
    # leave few blocks that an unmasked fast path would serve.
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < end
        k = _load_tile(_cache_ptrs(K, BLOCK_TABLE, stride_tb, b, cache_b, kv_h, cols, col_ok, offs_d, page_size,
                                   cache_rows, stride_kb, stride_kn, stride_kh, stride_kd),
                       col_ok, offs_d, True, HEAD_DIM, BLOCK_D)
        v = _load_tile(_cache_ptrs(V, BLOCK_TABLE, stride_tb, b, cache_b, kv_h, cols, col_ok, offs_d, page_size,
                                   cache_rows, stride_vb, stride_vn, stride_vh, stride_vd),
                       col_ok, offs_d, True, HEAD_DIM, BLOCK_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # The training kernels' scores with each row's own diagonal as its row index: the window is
        # [diag - left, diag + right] and the ALiBi distance |diag - col| (bottom-right per batch row).
        s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), diag[:, None], cols[None, :],
                       col_ok[None, :], qk_scale, cap_log2, slope_log2, window_right, -window_left, 0, 0,
                       True, LOCAL_RIGHT, LOCAL_LEFT, False, SOFTCAP, ALIBI is not None, q.dtype == tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet still has max -inf: subtract 0 instead so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0  # not l_i > 0: a NaN sum (NaN or inf in q or a key) keeps lse NaN, as the dense kernel's
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = _tile_ptrs(O + _row_offset(split, stride_os), b, h[:, None], tok, offs_d,
                        stride_ob, stride_oh, stride_on, stride_od)
    _store_tile(o_ptrs, cast_rne(acc / l_safe[:, None], O.dtype.element_ty), row_ok, offs_d, HEAD_DIM)
    if LSE is not None:  # None: a call that returns no lse, unsplit
        lse_ptrs = LSE + lse_start + _row_offset(split, stride_ls) + _row_offset(b, stride_lb)
        tl.store(lse_ptrs + h * stride_lh + tok * stride_ln, lse, mask=row_ok)


@triton.jit
def _decode_combine(PARTIALS, O, LSE,
                    stride_sb, stride_sn, stride_sh, stride_ss, stride_sd,
                    stride_ob, stride_on, stride_oh, stride_od,
                    heads, n_q, n_rows, splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """One program per block of the B * H * Sq rows (in LSE's (B, H, Sq) order): out = sum_s w_s out_s / sum_s w_s
    with w_s = exp(lse_s), lse = log sum_s w_s, over the splits' partials: one fp32 buffer PARTIALS holding their
    out (splits, B, Sq, H, D) then their lse (splits, B, H, Sq), both contiguous, into O (B, Sq, H, D) and LSE
    (B, H, Sq) (None: not stored). Rows in 64 bits: B * H * Sq may pass 2^31 where the grid's programs do not."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    b = rows // (heads * n_q)
    h = rows // n_q % heads
    tok = rows % n_q
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(splits):
        lse_ptrs = PARTIALS + _row_offset(splits, n_rows) * HEAD_DIM + _row_offset(split, n_rows)
        lse = tl.load(lse_ptrs + rows, mask=row_ok, other=float("-inf")) * LOG2E
        out = _load_tile(_tile_ptrs(PARTIALS + _row_offset(split, stride_ss), b[:, None], h[:, None], tok, offs_d,
                                    stride_sb, stride_sh, stride_sn, stride_sd), row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
        m_new = tl.maximum(m_i, lse)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split has seen a key yet: weights 0, not NaN
        alpha = tl.math.exp2(m_i - m_sub)
        weight = tl.math.exp2(lse - m_sub)
        l_i = l_i * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * out
        m_i = m_new
    empty = l_i == 0  # a split's NaN lse (a NaN row) makes its weight, so the sum, NaN: lse NaN, not -inf
    l_safe = tl.where(empty, 1.0, l_i)
    _store_tile(_tile_ptrs(O, b[:, None], h[:, None], tok, offs_d, stride_ob, stride_oh, stride_on, stride_od),
                cast_rne(acc / l_safe[:, None], O.dtype.element_ty), row_ok, offs_d, HEAD_DIM)
    if LSE is not None:  # None: a call that returns no lse
        tl.store(LSE + rows, tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2), mask=row_ok)


@triton.jit
def _written(entry, SEQLENS, BATCH_IDX, BLOCK_TABLE, stride_tb, batch, spans, n_new, page_size, max_blocks):
    """(cache row or page, [lo, hi) of its slots, whether the entry is real) that entry ``entry`` of an append
    writes: without a table, batch row b's cache row BATCH_IDX[b], as a whole ([0, 1)); with one, entry
    b * spans + w is the w-th page that batch row b's new positions [SEQLENS[b], SEQLENS[b] + n_new) touch,
    its slots [lo, hi) there (not real past the last one). The table column is clamped: any value reads inside."""
    if BLOCK_TABLE is None:
        real = entry < batch
        key = tl.load(BATCH_IDX + entry, mask=real, other=0)
        lo = entry * 0
        hi = lo + 1
    else:
        b = entry // spans
        first = tl.load(SEQLENS + b, mask=b < batch, other=0)
        block = first // page_size + entry % spans
        page_start = block * page_size
        lo = tl.maximum(first, page_start) - page_start
        hi = tl.minimum(first + n_new, page_start + page_size) - page_start
        real = (b < batch) & (lo < hi)
        column = tl.minimum(tl.maximum(block, 0), max_blocks - 1)
        key = tl.load(BLOCK_TABLE + b * stride_tb + column, mask=real, other=0)
    return key, lo, hi, real


@triton.jit
def _overwrites(SEQLENS, BATCH_IDX, BLOCK_TABLE, stride_tb, batch, spans, n_new, page_size, max_blocks, n_entries,
                BLOCK: tl.constexpr):
    """How many pairs of the append's ``n_entries`` entries (:func:`_written`) write one cache row, or one slot
    of one page: every pair compared once, in BLOCK x BLOCK tiles."""
    clashes = 0
    for first_i in range(0, n_entries, BLOCK):
        entry_i = first_i + tl.arange(0, BLOCK)
        key_i, lo_i, hi_i, real_i = _written(entry_i, SEQLENS, BATCH_IDX, BLOCK_TABLE, stride_tb, batch, spans,
                                             n_new, page_size, max_blocks)
        for first_j in range(first_i, n_entries, BLOCK):
            entry_j = first_j + tl.arange(0, BLOCK)
            key_j, lo_j, hi_j, real_j = _written(entry_j, SEQLENS, BATCH_IDX, BLOCK_TABLE, stride_tb, batch, spans,
                                                 n_new, page_size, max_blocks)
            clash = (real_i[:, None] & real_j[None, :] & (entry_i[:, None] < entry_j[None, :])
                     & (key_i[:, None] == key_j[None, :]) & (lo_i[:, None] < hi_j[None, :])
                     & (lo_j[None, :] < hi_i[:, None]))
            clashes += tl.sum(tl.sum(clash.to(tl.int32), 1), 0)
    return clashes


@triton.jit
def _decode_check(SEQLENS, LEFTPAD, BATCH_IDX, BLOCK_TABLE, VERDICT, stride_tb, batch, max_blocks, n_new, capacity,
                  page_size, cache_rows, rotary_end, n_entries, spans, BLOCK: tl.constexpr,
                  PAIR_BLOCK: tl.constexpr):
    """One program: the verdict (``checks.new_verdict``) of the index values of a call, bit by bit in the order
    of :func:`_index_rules`. Pointers None are absent tensors; ``rotary_end``: the largest cache_seqlens whose
    rotated queries have rows in rotary_cos; ``n_entries``/``spans``: the append's entries (``_written``)."""
    failed = 0
    for start in range(0, batch, BLOCK):
        b = start + tl.arange(0, BLOCK)
        row = b < batch
        end = capacity
        if SEQLENS is not None:
            seqlen = tl.load(SEQLENS + b, mask=row, other=0)
            failed |= rule_bit(count(row & ((seqlen < 0) | (seqlen > capacity - n_new))), 0)
            failed |= rule_bit(count(row & (seqlen > rotary_end)), 6)
            end = seqlen
        if LEFTPAD is not None:
            pad = tl.load(LEFTPAD + b, mask=row, other=0)
            failed |= rule_bit(count(row & ((pad < 0) | (pad > end))), 1)
        if BATCH_IDX is not None:
            cache_b = tl.load(BATCH_IDX + b, mask=row, other=0)
            failed |= rule_bit(count(row & ((cache_b < 0) | (cache_b >= cache_rows))), 2)
    if BLOCK_TABLE is None:
        if BATCH_IDX is not None:
            failed |= rule_bit(_overwrites(SEQLENS, BATCH_IDX, BLOCK_TABLE, stride_tb, batch, spans, n_new, page_size,
                                           max_blocks, n_entries, PAIR_BLOCK), 3)
    else:
        failed |= rule_bit(unusable_pages(BLOCK_TABLE, stride_tb, batch, max_blocks, page_size, cache_rows, SEQLENS,
                                          None, n_new, capacity, BLOCK), 4)
        if SEQLENS is not None:  # nothing is appended without cache_seqlens
            failed |= rule_bit(_overwrites(SEQLENS, BATCH_IDX, BLOCK_TABLE, stride_tb, batch, spans, n_new,
                                           page_size, max_blocks, n_entries, PAIR_BLOCK), 5)
    store_verdict(VERDICT, failed)


# ------------------------------------------------------------------------------------------ configs and builds
# (BLOCK_N, num_warps, num_stages) of the attention kernel per GPU family (configs.FAMILIES), dtype and padded head
# dim, for fp16/bf16 (tensor cores) and fp32 (FMA units, whose operands live in registers: smaller tiles). BLOCK_M
# follows the packed rows (group * Sq): the smallest power of two >= 16 that holds them, at most _MAX_BLOCK_M. A
# decode step is bound by reading the cache, so one config per head dim is launched rather than autotuned. Every
# build below (_builds: 16 and _MAX_BLOCK_M rows, with and without a left window) compiles without register spills
# on its family's target (ptxas -v / amdgcn metadata, triton 3.8 and 3.9).
# NVIDIA (sm_80, sm_90, sm_100 share one table): pruned for spilling 64x64 at d128 and 64x32 at d256 (16-bit,
# sm_80), fp32 16x32 at d128 (sm_90). Its 16-32-row tiles run HMMA on sm_90 and sm_100 too (wgmma and tcgen05 need
# 64 rows; only d64 at 64 rows gets them), which costs a memory-bound kernel nothing.
# gfx942 (MI300): NVIDIA's 16-bit d64/d128 tiles spill 2-69 SGPRs (past the 106 a wave may hold), and two stages at 64
# keys still spill 11-27 at 32-64 rows. 16-bit d64 and d128 stream 16 keys on one stage: 50-69 SGPRs and 72-118
# VGPRs with either triton. Wider blocks spill with triton 3.9 even where 3.8 fits them: 32 keys at d64 x 64 rows
# 6-17 SGPRs (3.8: none), 32 keys at d128 x 32 rows 4-16, 64 keys at d128 5-80 (3.8: none, at 98-105 SGPRs and
# up to 260 VGPRs, one wave per SIMD). fp32 d64 streams 16 keys on one stage too (two stages spill 5 SGPRs with a
# left window; 32 keys spill 15-20 with triton 3.9); d256 and fp32 d128/d256 take NVIDIA's tiles, spill-free here.
_NVIDIA_TILES = {False: {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)},
                 True: {64: (32, 4, 2), 128: (16, 4, 2), 256: (16, 4, 2)}}
_TILES = {**dict.fromkeys(NVIDIA, _NVIDIA_TILES),
          AMD: {False: {64: (16, 4, 1), 128: (16, 4, 1), 256: (32, 4, 2)},
                True: {64: (16, 4, 1), 128: (16, 4, 2), 256: (16, 4, 2)}}}
_MAX_BLOCK_M = {False: {64: 64, 128: 32, 256: 16}, True: {64: 32, 128: 16, 256: 16}}
_FORCED_NAME = forceable("attention_decode", optional=("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
INTERPRETER_BLOCK_N = 32
"""Interpreted launches' key block: small, so that short test caches still span several blocks and splits."""
APPEND_BLOCK_M = COMBINE_BLOCK_M = 16
APPEND_WARPS = {64: 8, 128: 8, 256: 4}  # spill-free: 4 warps spill 16 B at fp16 d128 on sm_80, 8 spill 80 B at d256
ASSUMED_SMS, ASSUMED_FAMILY = 132, 90
"""SM count and tile family the split heuristic assumes where there is no GPU to ask (an H100 SXM's), so that
interpreted runs take the split path a GPU would."""
MAX_SPLITS = 128
WAVES = 2
"""Target waves of programs over the SMs when splitting: several resident programs per SM keep more loads in flight."""
PARTIAL_TRAFFIC = 12
"""Splits stop where the fp32 partials (written once, read once by the combine) would pass 1/12 of the cache bytes."""


def tile(dtype: torch.dtype, head_dim: int, rows: int, family: Family) -> Tuple[dict, int]:
    """The attention kernel's config for ``rows`` packed query rows per kv head on a GPU of ``family``: forced by
    ``use_config("attention_decode", ...)``, else the family's table (the interpreter takes no warps or stages, and
    :data:`INTERPRETER_BLOCK_N`); and the key block a GPU launch takes, which the split heuristic counts in, so
    that an interpreted call splits as a GPU's would."""
    fp32 = dtype == torch.float32
    block_n, warps, stages = _TILES[family][fp32][d_bucket(head_dim)]
    config = dict(BLOCK_M=min(_MAX_BLOCK_M[fp32][d_bucket(head_dim)], max(16, _runtime.next_power_of_2(rows))),
                  BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    forced = forced_config(_FORCED_NAME) or {}
    config.update(forced)
    gpu_block_n = config["BLOCK_N"]
    if _runtime.INTERPRETED:
        config["BLOCK_N"] = forced.get("BLOCK_N", INTERPRETER_BLOCK_N)
        config.pop("num_warps", None)
        config.pop("num_stages", None)
    return config, gpu_block_n


def choose_splits(programs: int, rows: int, capacity: int, head_dim: int, itemsize: int, block_n: int,
                  sm_count: int) -> int:
    """Key splits per (batch, kv head, row block) for ``num_splits=0``, from shapes alone (deterministic).

    No split once ``programs`` (batch * kv heads * row blocks) fill the SMs; otherwise enough splits for
    :data:`WAVES` waves, capped so that each split has a key block, the partials' traffic stays under
    1/:data:`PARTIAL_TRAFFIC` of the cache's, and at :data:`MAX_SPLITS`.
    """
    if programs >= sm_count:
        return 1
    cache_bytes = 2 * capacity * head_dim * itemsize  # K and V of one kv head
    partial_bytes = 2 * rows * (head_dim + 1) * 4  # one split's fp32 (out, lse) rows, written and read back
    by_traffic = cache_bytes // (PARTIAL_TRAFFIC * partial_bytes)
    return max(1, min(_runtime.cdiv(WAVES * sm_count, programs), by_traffic, _runtime.cdiv(capacity, block_n),
                      MAX_SPLITS))


def _tile_family(device: torch.device) -> Family:
    """The family whose table a launch on ``device`` takes: the GPU's own, :data:`ASSUMED_FAMILY` interpreted."""
    return ASSUMED_FAMILY if _runtime.INTERPRETED else device_family(device)


def _sm_count(device: torch.device) -> int:
    if _runtime.device_capability(device) is None:
        return ASSUMED_SMS
    return _runtime.sm_count(device)


_TYPES = {"LSE": "*fp32", "PARTIALS": "*fp32", "SEQLENS": "*i32", "LEFTPAD": "*i32",
          "BATCH_IDX": "*i32", "BLOCK_TABLE": "*i32", "ALIBI": "*fp32"}


def _families_by_tile(fp32: bool, d: int) -> dict:
    """{(BLOCK_N, num_warps, num_stages): the families (configs.FAMILIES) whose table gives it} at head dim ``d``."""
    by_tile = {}
    for family in FAMILIES:
        config = _TILES[family][fp32][d]
        by_tile[config] = by_tile.get(config, ()) + (family,)
    return by_tile


def _fwd_build(name: str, d: int, block_m: int, config: Tuple[int, int, int], families: Tuple[Family, ...],
               window: bool) -> Build:
    """The attention kernel with every feature on (paged, left-padded, causal, softcapped, ALiBi) and, with
    ``window``, a left window too: the default of ``families`` at ``block_m`` packed rows."""
    block_n, warps, stages = config
    constexprs = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=block_m, BLOCK_N=block_n, LOCAL_LEFT=window, LOCAL_RIGHT=True,
                      SOFTCAP=True, UPCAST=False, PRECISION="ieee")
    return declare("attention_decode", _decode_fwd, dtype=name, head_dim=d, constexprs=constexprs, num_warps=warps,
                   num_stages=stages, types=dict(_TYPES, BATCH_IDX="constexpr"), variant="window" if window else "",
                   label=f"{name} d{d} paged causal {'window ' if window else ''}alibi {block_m}x{block_n} w{warps} "
                         f"s{stages}", default=True, families=families)


@register_builds
def _builds() -> List[Build]:
    """For fp16/bf16/fp32 at head dims 64, 128 and 256: the attention kernel at its smallest and largest BLOCK_M,
    with and without a left window (:func:`_fwd_build`), on each family's tile, marked for the families that launch
    it; its combine, and the rotary append into a paged cache; and the index check, paged and with
    cache_batch_idx. Each is the config a GPU launches (default)."""
    builds = []
    for dtype, name in TRITON_DTYPES.items():
        fp32 = dtype == torch.float32
        for d in (64, 128, 256):
            for config, families in _families_by_tile(fp32, d).items():
                builds += [_fwd_build(name, d, block_m, config, families, window)
                           for block_m in sorted({16, _MAX_BLOCK_M[fp32][d]}) for window in (False, True)]
            builds.append(declare("attention_decode_combine", _decode_combine, dtype=name, head_dim=d,
                                  constexprs=dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=COMBINE_BLOCK_M), num_warps=4,
                                  num_stages=1, types=_TYPES, label=f"{name} d{d} BLOCK_M={COMBINE_BLOCK_M}",
                                  default=True))
            builds.append(declare("attention_decode_append", _decode_append, dtype=name, head_dim=d,
                                  constexprs=dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=APPEND_BLOCK_M, TO_CACHE=True,
                                                  INTERLEAVED=False, SAME_POSITION=False),
                                  num_warps=APPEND_WARPS[d], num_stages=1, types=dict(_TYPES, BATCH_IDX="constexpr"),
                                  label=f"{name} d{d} rotary paged BLOCK_M={APPEND_BLOCK_M}", default=True))
    for absent, label in (("BATCH_IDX", "paged, left-padded"), ("BLOCK_TABLE", "cache_batch_idx, left-padded")):
        builds.append(declare("attention_decode_check", _decode_check, dtype="i32",
                              constexprs=dict(BLOCK=INDEX_BLOCK, PAIR_BLOCK=PAIR_BLOCK), num_warps=4, num_stages=1,
                              types={absent: "constexpr"}, label=f"{label} BLOCK={INDEX_BLOCK} PAIR_BLOCK={PAIR_BLOCK}",
                              default=True))
    return builds


# --------------------------------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=None)
def _append_meta(d: int, to_cache: bool, interleaved: bool, same_position: bool) -> dict:
    """``_decode_append``'s compile-time keywords and launch options (the interpreter takes no warps)."""
    options = {} if _runtime.INTERPRETED else {"num_warps": APPEND_WARPS[d_bucket(d)]}
    return dict(HEAD_DIM=d, BLOCK_D=padded_head_dim(d), BLOCK_M=APPEND_BLOCK_M, TO_CACHE=to_cache,
                INTERLEAVED=interleaved, SAME_POSITION=same_position, **options)


def _append(x, dst, cos, sin, seqlens, batch_idx, block_table, capacity: int, page_size: int, to_cache: bool,
            interleaved: bool, same_position: bool) -> None:
    """Launch ``_decode_append`` over x (B, n, heads, D)."""
    batch, n, heads, d = x.shape
    if x.numel() == 0:
        return
    if cos is not None and sin.stride() != cos.stride():  # the kernel indexes both tables with cos's strides
        cos, sin = cos.contiguous(), sin.contiguous()
    cos_strides = (0, 0) if cos is None else cos.stride()
    _direct.run(
        _decode_append,
        (x, dst, cos, sin, seqlens, batch_idx, block_table, 0 if block_table is None else block_table.stride(0),
         *x.stride(), *dst.stride(), *cos_strides, heads, n, capacity, page_size, dst.shape[0],
         0 if cos is None else 2 * cos.shape[1]), grid(n, batch * heads, APPEND_BLOCK_M),
        **_append_meta(d, to_cache, interleaved, same_position))


class _AttendPlan(NamedTuple):
    """What the attention launches of a call's signature need besides its tensors (:func:`_attend_plan`):
    ``tail`` the decode kernel's arguments after the q/k/v strides (its out and lse strides, every scalar),
    ``meta`` its compile-time keywords (and launch options), and with ``splits`` > 1 the elements of the partials'
    one fp32 buffer, the combine's ``combine_grid``, ``combine_tail`` (its arguments after the three tensors) and
    ``combine_meta``."""

    splits: int
    partial_size: int
    grid: tuple
    tail: tuple
    meta: dict
    combine_grid: tuple
    combine_tail: tuple
    combine_meta: dict


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``, as torch gives them (size-0 and size-1 dims included)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@functools.lru_cache(maxsize=1024)
def _attend_plan(q_shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, kv_heads: int, capacity: int,
                 page_size: int, cache_rows: int, n_new: int, window: Tuple[int, int], softcap: float, scale: float,
                 num_splits: int, tf32: bool, forced: Optional[tuple]) -> _AttendPlan:
    """The :class:`_AttendPlan` of a call's signature: cached, so a decoding loop computes its tile, split count,
    strides and meta once (``forced``: the use_config override, and ``tf32`` torch's flag, both part of the key).
    out (B, Sq, H, D) and lse (B, H, Sq) are contiguous, and so are the splits' fp32 partials (splits, B, Sq, H, D)
    and (splits, B, H, Sq), one buffer of ``partial_size`` elements: the lse from element ``lse_start`` on."""
    batch, n_q, heads, d = q_shape
    group = heads // kv_heads
    config, gpu_block_n = tile(dtype, d, group * n_q, _tile_family(device))
    m_blocks = _runtime.cdiv(group * n_q, config["BLOCK_M"])
    splits = num_splits or choose_splits(batch * kv_heads * m_blocks, group * n_q, capacity, d, dtype.itemsize,
                                         gpu_block_n, _sm_count(device))
    meta = kernel_meta(d, dtype, tf32, causal=False)
    out_strides = _contiguous_strides(q_shape)
    lse_strides = _contiguous_strides((batch, heads, n_q))
    lse_start = 0 if splits == 1 else splits * math.prod(q_shape)
    if splits == 1:  # the kernel writes out and lse themselves
        o_strides, l_strides = (*out_strides[:3], 0, out_strides[3]), (*lse_strides, 0)
    else:
        partial, partial_lse = _contiguous_strides((splits, *q_shape)), _contiguous_strides((splits, batch, heads, n_q))
        o_strides, l_strides = (*partial[1:4], partial[0], partial[4]), (*partial_lse[1:], partial_lse[0])
    tail = (*o_strides, *l_strides, lse_start, kv_heads, group, n_q, n_new, capacity, page_size, cache_rows, splits, window[0],
            window[1], scale * LOG2E.value, softcap * LOG2E.value)
    keywords = dict(**{name: meta[name] for name in ("HEAD_DIM", "BLOCK_D", "UPCAST", "PRECISION")},
                    LOCAL_LEFT=window[0] >= 0, LOCAL_RIGHT=window[1] >= 0, SOFTCAP=bool(softcap), **config)
    combine_tail = (*o_strides, *out_strides, heads, n_q, batch * heads * n_q, splits)
    combine_meta = dict(HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=COMBINE_BLOCK_M,
                        **({} if _runtime.INTERPRETED else {"num_warps": 4}))
    partial_size = lse_start + splits * batch * heads * n_q
    return _AttendPlan(splits, partial_size, grid(group * n_q, batch * kv_heads * splits, config["BLOCK_M"]), tail,
                       keywords, grid(batch * heads * n_q, 1, COMBINE_BLOCK_M), combine_tail, combine_meta)


def _attend(q, k_cache, v_cache, seqlens, leftpad, batch_idx, block_table, kv_heads: int, cache_rows: int,
            capacity: int, page_size: int, n_new: int, window: Tuple[int, int], softcap: float, alibi_slopes,
            scale: float, num_splits: int, need_lse: bool):
    """Launch the split kernel (and the combine when it splits): (out (B, Sq, H, D), lse (B, H, Sq) fp32, or None
    without ``need_lse``), contiguous. ``kv_heads``, ``cache_rows``: the cache's dims 2 and 0. ``alibi_slopes``:
    None or contiguous float32 (H,) or (B, H)."""
    shape, device = q.shape, q.device
    batch, n_q, heads, d = shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=device) if need_lse else None
    if out.numel() == 0:
        return out, lse
    forced = forced_config(_FORCED_NAME)
    plan = _attend_plan(shape, q.dtype, device, kv_heads, capacity, page_size, cache_rows, n_new, window,
                        softcap, scale, num_splits, uses_tf32(q.dtype),
                        None if forced is None else tuple(sorted(forced.items())))
    if plan.splits == 1:
        o_buf, lse_buf = out, lse
    else:  # the partials' out and lse, one buffer (the plan's strides and lse_start lay them out)
        o_buf = lse_buf = torch.empty(plan.partial_size, dtype=torch.float32, device=device)
    _direct.run(_decode_fwd, (q, k_cache, v_cache, o_buf, lse_buf, seqlens, leftpad, batch_idx, block_table,
                              alibi_slopes, 0 if block_table is None else block_table.stride(0),
                              alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
                              *q.stride(), *k_cache.stride(), *v_cache.stride(), *plan.tail), plan.grid, **plan.meta)
    if plan.splits > 1:
        _direct.run(_decode_combine, (o_buf, out, lse, *plan.combine_tail), plan.combine_grid, **plan.combine_meta)
    return out, lse


def _capacity(slots: int, block_table: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(key positions per batch row, page size or 0) of a contiguous or paged cache whose dim 1 has ``slots``."""
    if block_table is None:
        return slots, 0
    return block_table.shape[1] * slots, slots


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
            v: Optional[torch.Tensor], rotary_cos: Optional[torch.Tensor], rotary_sin: Optional[torch.Tensor],
            seqlens: Optional[torch.Tensor], leftpad: Optional[torch.Tensor], batch_idx: Optional[torch.Tensor],
            block_table: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], rotary_interleaved: bool,
            q_same_position: bool, window_left: int, window_right: int, softcap: float, scale: float,
            num_splits: int, need_lse: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The launches of a checked :func:`attention_with_kvcache` call: check the index values
    (:func:`_check_index_values`: here, so that a compiled call checks them too, inside the op), append (and
    rotate) k/v into the caches in place, rotate q, attend. Index tensors int32 and contiguous, ``seqlens`` (B,)
    or None. Returns (out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) fp32); lse is None without ``need_lse``, which
    only eager calls pass (the op, whose outputs must be tensors, is always asked for it). Every allocation's size
    follows from the shapes, none from a tensor's values (a CUDA graph replays it with new values)."""
    batch, n_q, _, _ = q.shape
    cache_rows, slots, kv_heads, _ = k_cache.shape  # each Size read once: a read builds one
    capacity, page_size = _capacity(slots, block_table)
    n_new = 0 if k is None else k.shape[1]
    # q's rows are rotated at cache_seqlens + i, i < Sq, when causal or windowed, else all at cache_seqlens (which
    # is S_ro itself when a full cache appends nothing: checked, not left unrotated)
    q_positions = min(n_q, 1) if q_same_position else n_q
    rotary_rows = None if rotary_cos is None else rotary_cos.shape[0]
    with _runtime.launch_device(q):
        _check_index_values(seqlens, leftpad, batch_idx, block_table, batch, q_positions, n_new, capacity,
                            page_size, cache_rows, rotary_rows)
        if k is not None:
            # (x, destination, cos, sin, seqlens, batch_idx, block_table, capacity, page_size, to_cache,
            # interleaved, same_position)
            _append(k, k_cache, rotary_cos, rotary_sin, seqlens, batch_idx, block_table, capacity, page_size, True,
                    rotary_interleaved, False)
            _append(v, v_cache, None, None, seqlens, batch_idx, block_table, capacity, page_size, True, False, False)
            if rotary_cos is not None:
                q_rotated = torch.empty_like(q, memory_format=torch.contiguous_format)
                _append(q, q_rotated, rotary_cos, rotary_sin, seqlens, None, None, rotary_cos.shape[0], page_size,
                        False, rotary_interleaved, q_same_position)
                q = q_rotated
        return _attend(q, k_cache, v_cache, seqlens, leftpad, batch_idx, block_table, kv_heads, cache_rows, capacity,
                       page_size, n_new, (window_left, window_right), softcap, alibi_slopes, scale, num_splits,
                       need_lse)


_launch_op = torch.library.custom_op("kernels::attention_with_kvcache", _launch, mutates_args=("k_cache", "v_cache"))
""":func:`_launch` as the op torch.compile traces: the caches are declared mutated (the append), so a compiled
graph orders it against every other read and write of them."""


@_launch_op.register_fake
def _(q, k_cache, v_cache, *args):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- public API


def _check_index(name: str, t, shape: Tuple[int, ...], device) -> None:
    """TypeError/ValueError unless ``t`` is an int32 tensor of ``shape`` on ``device``."""
    if (type(t) is torch.Tensor and t.dtype is torch.int32 and is_dense(t) and t.shape == shape
            and t.device == device):
        return  # the common case, decided without the generic checks
    check_tensor(name, t, ndim=len(shape), dtypes=(torch.int32,))
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def _check_int(name: str, value, low: int) -> int:
    if type(value) is int and value >= low:
        return value  # the common case, decided without the numbers ABCs
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_cache(q, k_cache, v_cache, k, v, block_table, cache_batch_idx) -> Tuple[int, int]:
    """Check q, the cache and the new k/v; return (capacity: key positions per batch row, page size or 0)."""
    shapes = plain_qkv_shapes(q, k_cache, v_cache)  # each Size read once
    if shapes is None:
        check_tensor("q", q, ndim=4)
        check_tensor("k_cache", k_cache, ndim=4)
        check_tensor("v_cache", v_cache, ndim=4)
        check_same("dtype", q=q, k_cache=k_cache, v_cache=v_cache)
        check_same("device", q=q, k_cache=k_cache, v_cache=v_cache)
        shapes = q.shape, k_cache.shape, v_cache.shape
    (batch, _, heads, d), cache_shape, v_cache_shape = shapes
    if cache_shape != v_cache_shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    cache_rows, slots, kv_heads, cache_d = cache_shape  # slots: positions per cache row, or the page size
    if cache_d != d or not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"k_cache (.., Hkv, D) must have q's head dim D = {d}, 1 <= D <= {MAX_HEAD_DIM}, got "
                         f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k_cache's kv heads (dim 2) must divide q's {heads} heads (B, Sq, H, D), got "
                         f"{tuple(k_cache.shape)}")
    if block_table is None:
        if cache_batch_idx is None and cache_rows < batch:
            raise ValueError(f"k_cache (B_cache, S_cache, Hkv, D) needs B_cache >= q's batch {batch} without "
                             f"cache_batch_idx, got {tuple(k_cache.shape)}")
    else:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx is not supported with a paged cache (block_table): the block table "
                             "already maps each batch row to its pages")
        if type(block_table) is not torch.Tensor or block_table.dim() != 2:  # before reading its shape
            check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
        _check_index("block_table", block_table, (batch, block_table.shape[1]), q.device)
        if slots == 0:
            raise ValueError(f"k_cache (num_blocks, page_size, Hkv, D) needs page_size >= 1 with a block_table, got "
                             f"{tuple(k_cache.shape)}")
    capacity, page_size = _capacity(slots, block_table)
    if batch and capacity and cache_rows == 0:  # the kernels clamp row and page indices into [0, rows)
        raise ValueError(f"k_cache has no cache rows or pages (dim 0) for q's {batch} batch rows to read, got "
                         f"{tuple(k_cache.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append) or both be None")
    if k is not None:
        _check_writable(k_cache, v_cache)
    new_shapes = None if k is None else plain_qkv_shapes(q, k, v)
    if k is not None and not (new_shapes is not None and new_shapes[1][0] == batch
                              and new_shapes[1][2:] == (kv_heads, d) and new_shapes[2] == new_shapes[1]):
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, ndim=4)
            check_same("dtype", q=q, **{name: t})
            check_same("device", q=q, **{name: t})
            if t.shape[0] != batch or t.shape[2:] != (kv_heads, d) or t.shape != k.shape:
                raise ValueError(f"k and v must both have shape (B, Sk_new, Hkv, D) = ({batch}, Sk_new, {kv_heads}, "
                                 f"{d}), got {tuple(k.shape)} and {tuple(v.shape)}")
    return capacity, page_size


def _check_writable(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """ValueError unless an append can write each of its slots once: two caches, neither expanded (a dim of size
    > 1 with stride 0, whose batch rows, positions or heads share memory: one row's new key would land in another's
    slot, as torch's in-place ops refuse). Read-only calls may pass either (a prefix shared by every row)."""
    if k_cache is v_cache:
        raise ValueError("k_cache and v_cache must be two tensors when k/v are appended: the new values would "
                         "overwrite the new keys")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        strides = cache.stride()
        if 0 in strides and any(stride == 0 and size > 1 for stride, size in zip(strides, cache.shape)):
            raise ValueError(f"{name} is expanded (stride 0 in a dim of size > 1: shape {tuple(cache.shape)}, "
                             f"strides {strides}), so the k/v appended in place would share slots: clone() it first")


def _check_rotary(rotary_cos, rotary_sin, k, d: int, capacity: int, device) -> None:
    if rotary_cos is None and rotary_sin is None:
        return
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if k is None:
        raise ValueError("rotary_cos/rotary_sin need the new k and v: rotary embedding is applied to q and the "
                         "appended keys only")
    check_tensor("rotary_cos", rotary_cos, ndim=2)
    check_tensor("rotary_sin", rotary_sin, ndim=2)
    if rotary_cos.shape != rotary_sin.shape or not 1 <= 2 * rotary_cos.shape[1] <= d or rotary_cos.shape[0] < capacity:
        raise ValueError(f"rotary_cos and rotary_sin must both have shape (S_ro, rotary_dim / 2) with rotary_dim <= "
                         f"head dim {d} and S_ro >= the cache's {capacity} positions, got {tuple(rotary_cos.shape)} "
                         f"and {tuple(rotary_sin.shape)}")
    check_same("device", rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    if rotary_cos.device != device:
        raise ValueError(f"rotary_cos/rotary_sin must be on q's device {device}, got {rotary_cos.device}")


def _check_window(window_size, causal: bool) -> Tuple[int, int]:
    """(left, right) key bounds around each row's diagonal, -1 = unbounded; causal sets right = 0."""
    left, right = check_window(window_size)
    return left, 0 if causal else right


def _kernel_window(window: Tuple[int, int], capacity: int, n_q: int) -> Tuple[int, int]:
    """``window`` with each side that hides no key of any row made -1 (unbounded): left >= capacity (every
    diagonal is below the capacity), right >= capacity + Sq - 1 (every diagonal is >= -Sq). The same keys are
    visible, and the sides left keep diagonal +- window far inside int32 (a side near int32's largest value, a
    common spelling of "unbounded", overflowed in the kernel)."""
    left, right = window
    return -1 if left >= capacity else left, -1 if right >= capacity + n_q - 1 else right


def _seqlens_tensor(cache_seqlens, batch: int, n_new: int, capacity: int, device) -> Optional[torch.Tensor]:
    """cache_seqlens as a (B,) int32 tensor (an int is checked against the capacity here, a tensor's values on the
    device by :func:`_check_index_values`)."""
    if cache_seqlens is None or isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens is not None:
            _check_index("cache_seqlens", cache_seqlens, (batch,), device)
            cache_seqlens = cache_seqlens.contiguous()
        return cache_seqlens
    seqlen = _check_int("cache_seqlens", cache_seqlens, 0)
    if seqlen + n_new > capacity:
        raise ValueError(f"cache_seqlens + Sk_new = {seqlen} + {n_new} exceeds the cache's {capacity} positions")
    return torch.full((batch,), seqlen, dtype=torch.int32, device=device)


_INDEX_SUMMARY = ("attention_with_kvcache: an index value is out of range (rules, in order: 0 <= cache_seqlens <= "
                  "capacity - Sk_new; 0 <= cache_leftpad <= cache_seqlens; 0 <= cache_batch_idx < B_cache; no "
                  "cache_batch_idx repeated when appending; 0 <= block_table[b, p] < num_blocks for the pages a row "
                  "uses; no paged slot written twice; cache_seqlens + Sq <= S_ro for rotated queries, Sq counted as "
                  "1 unless causal or windowed)")


def _index_rules(seqlens, leftpad, batch_idx, block_table, n_new: int, q_positions: int, capacity: int,
                 cache_rows: int, rotary_rows: int):
    """(message, argument, its values) of each bit of ``_decode_check``'s verdict: what a failure says on CPU."""
    return [
        (f"cache_seqlens must be >= 0 and leave room for the Sk_new = {n_new} new keys: cache_seqlens + Sk_new <= "
         f"the cache's {capacity} positions per batch row", "cache_seqlens", seqlens),
        (f"cache_leftpad must be >= 0 and <= cache_seqlens (the cache's {capacity} positions without "
         f"cache_seqlens)", "cache_leftpad", leftpad),
        (f"cache_batch_idx must index k_cache's B_cache = {cache_rows} rows: 0 <= cache_batch_idx < {cache_rows}",
         "cache_batch_idx", batch_idx),
        ("cache_batch_idx must not repeat a cache row when k/v are appended: two batch rows would write the same "
         "cache row", "cache_batch_idx", batch_idx),
        (f"block_table's pages must index k_cache's {cache_rows} pages: 0 <= block_table[b, p] < {cache_rows} for "
         f"every page p holding a position below cache_seqlens[b] + Sk_new", "block_table", block_table),
        ("block_table maps the new keys of two batch rows to the same cache slot (a page shared where both "
         "append), or two new keys of one batch row (a page repeated in its row of the table): each new key needs "
         "a slot of its own", "block_table", block_table),
        (f"rotary_cos/rotary_sin need a row for each rotated query's position (cache_seqlens + i, i < Sq, when causal "
         f"or windowed, else cache_seqlens alone): cache_seqlens + {q_positions} <= S_ro = {rotary_rows}",
         "cache_seqlens", seqlens),
    ]


_ONE_PROGRAM = (1,)


_indices_passed = LastTensor()
"""The index tensors whose check passed last: a model's layers pass the same ones within a step."""


def _check_index_values(seqlens, leftpad, batch_idx, block_table, batch: int, q_positions: int, n_new: int,
                        capacity: int, page_size: int, cache_rows: int, rotary_rows: Optional[int]) -> None:
    """Check on the device, as one ``_decode_check`` launch and one assert (no host sync; ValueError at once on
    CPU, naming the argument), that every index value keeps the append and the attention inside the cache,
    before anything is written: 0 <= cache_seqlens, cache_seqlens + Sk_new <= capacity, 0 <= cache_leftpad <=
    cache_seqlens (capacity without it), cache_batch_idx in [0, cache_rows) and distinct when appending,
    block_table's pages in [0, cache_rows) for every position [0, cache_seqlens + Sk_new) of a row, no two new
    keys in one paged slot, and with ``rotary_rows`` (rotated queries) cache_seqlens + q_positions <= rotary_rows
    (``q_positions``: Sq, or 1 for queries all rotated at cache_seqlens). The kernels also clamp every index they
    read (a second line of defence).

    Checked once while the same index tensors come back unmodified with the same sizes (``plan.LastTensor``, as
    varlen's offsets: the verdict depends on nothing else; a check that raises is not memoised)."""
    first = (seqlens if seqlens is not None else leftpad if leftpad is not None
             else batch_idx if batch_idx is not None else block_table)  # the first index tensor given
    if first is None:
        return
    sizes = (batch, q_positions, n_new, capacity, page_size, cache_rows, rotary_rows)
    # first leads: the memo judges a CUDA graph capture on its device
    _indices_passed.get((first, seqlens, leftpad, batch_idx, block_table), sizes, _judge_index_values, first,
                        seqlens, leftpad, batch_idx, block_table, *sizes)


def _judge_index_values(first, seqlens, leftpad, batch_idx, block_table, batch: int, q_positions: int, n_new: int,
                        capacity: int, page_size: int, cache_rows: int, rotary_rows: Optional[int]) -> None:
    """:func:`_check_index_values`' launch and verdict, every call (``first``: the first index tensor given)."""
    max_blocks = 0 if block_table is None else block_table.shape[1]
    spans = 1 if block_table is None else (n_new + page_size - 2) // page_size + 1  # pages n_new positions touch
    writes_checked = batch_idx is not None or max_blocks > 0  # a table of no pages: capacity 0, nothing written
    n_entries = batch * spans if n_new and writes_checked else 0
    verdict = new_verdict(first.device, reused=True)  # read below, under the launch lock
    _direct.run(_decode_check, (seqlens, leftpad, batch_idx, block_table, verdict,
                                0 if block_table is None else block_table.stride(0), batch, max_blocks, n_new,
                                capacity, page_size, cache_rows,
                                2**31 - 1 if rotary_rows is None else rotary_rows - q_positions, n_entries, spans),
                _ONE_PROGRAM, BLOCK=INDEX_BLOCK, PAIR_BLOCK=PAIR_BLOCK)
    enforce(verdict, _INDEX_SUMMARY, lambda: _index_rules(seqlens, leftpad, batch_idx, block_table, n_new,
                                                          q_positions, capacity, cache_rows, rotary_rows))


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _any_requires_grad(tensors) -> bool:
    for t in tensors:  # a loop: any(<generator>) costs more on this per-call path
        if t.requires_grad:
            return True
    return False


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None, *,
                           rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                           rotary_interleaved: bool = True, cache_seqlens: Union[int, torch.Tensor, None] = None,
                           cache_batch_idx: Optional[torch.Tensor] = None,
                           cache_leftpad: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                           causal: bool = False, scale: Optional[float] = None, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, num_splits: int = 0,
                           return_lse: bool = False):
    """Decode-time attention of q against a KV cache, appending k/v to it in place first (flash-attn 2.x's
    ``flash_attn_with_kvcache`` semantics; module docstring for the math).

    q (B, Sq, H, D); k_cache, v_cache (B_cache, S_cache, Hkv, D), or (num_blocks, page_size, Hkv, D) with
    ``block_table`` (B, max_blocks) int32; k, v (B, Sk_new, Hkv, D) or None; fp16/bf16/fp32 (all one dtype), any
    strides (with k/v, two caches, neither expanded), 1 <= D <= 256, H a multiple of Hkv. ``cache_seqlens``: int
    or (B,) int32, each row's cached length, >= 0 with cache_seqlens + Sk_new <= the cache's positions (None: the
    whole cache; required with k/v).
    ``block_table``: pages in any order, rows may share pages (prefix caching: every append lands before any row
    attends, so a row sees the keys others append to a page it maps; no two new keys may land on one slot), and
    entries past a row's last used page (cache_seqlens + Sk_new) are never read: any value.
    ``cache_batch_idx`` (B,) int32: the cache row of each batch row (contiguous cache only; no row twice with k/v).
    ``cache_leftpad`` (B,) int32: each row's first valid cache position, 0 <= cache_leftpad <= cache_seqlens.
    ``rotary_cos``/``rotary_sin`` (S_ro >= cache positions, rotary_dim / 2), with k/v only: q and the new keys are
    rotated at positions cache_seqlens + i (for q all at cache_seqlens unless causal or windowed), each below
    S_ro (checked with the index values), interleaved pairs (0, 1), (2, 3)... or GPT-NeoX halves. ``window_size``
    (left, right), -1 unbounded; ``softcap`` > 0 caps
    the scores at +-softcap by tanh; ``alibi_slopes`` float32 (H,) or (B, H) on q's device subtracts
    slope * |diag - p| from the (capped) score; ``num_splits``: 0 chooses (:func:`choose_splits`), 1 never splits, up to 128.
    Returns out (B, Sq, H, D) in q's dtype and, with ``return_lse``, lse (B, H, Sq) float32 (natural log, -inf for
    rows that see no key).

    Forward only: inputs that require grad while grad mode is on raise (there is no backward). The values inside
    cache_seqlens, cache_leftpad, cache_batch_idx and block_table are checked on the device before the cache is
    written (:func:`_check_index_values`; ValueError on CPU, a device assert on a GPU, no host sync), and the
    kernels clamp every index they read, so no value makes them touch memory outside their tensors.
    """
    capacity, page_size = _check_cache(q, k_cache, v_cache, k, v, block_table, cache_batch_idx)
    batch, n_q, heads, d = q.shape
    n_new = 0 if k is None else k.shape[1]
    if k is not None and cache_seqlens is None:
        raise ValueError("cache_seqlens is required with k/v: it says where the new keys go")
    device = q.device
    seqlens = _seqlens_tensor(cache_seqlens, batch, n_new, capacity, device)
    if cache_batch_idx is not None:
        _check_index("cache_batch_idx", cache_batch_idx, (batch,), device)
    if cache_leftpad is not None:
        _check_index("cache_leftpad", cache_leftpad, (batch,), device)
    _check_rotary(rotary_cos, rotary_sin, k, d, capacity, device)
    causal = check_flag("causal", causal)
    rotary_interleaved = check_flag("rotary_interleaved", rotary_interleaved)
    return_lse = check_flag("return_lse", return_lse)
    window = _check_window(window_size, causal)
    if type(softcap) is not float or not 0 <= softcap <= SOFTCAP_MAX:  # else the common case, a checked float
        softcap = check_softcap(softcap)
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, q.transpose(1, 2))  # it reads (B, H) from a (B, H, N, D) q
        alibi_slopes = alibi_slopes.contiguous()
    num_splits = _check_int("num_splits", num_splits, 0)
    if num_splits > MAX_SPLITS:
        raise ValueError(f"num_splits must be at most {MAX_SPLITS}, got {num_splits}")
    scale = check_scale(scale, d)
    # without k there is no v or rotary table (checked above)
    tensors = (q, k_cache, v_cache) if k is None else [t for t in (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin)
                                                       if t is not None]
    if torch.is_grad_enabled() and _any_requires_grad(tensors):
        raise NotImplementedError("attention_with_kvcache is forward only (no backward): call it under "
                                  "torch.no_grad() or torch.inference_mode(), or pass tensors that do not require grad")
    _runtime.refuse_forward_ad("kernels.attention_with_kvcache", *tensors)
    # Contiguous: the kernels read these with unit stride (block_table's rows with its stride(0)).
    leftpad, batch_idx = _contiguous(cache_leftpad), _contiguous(cache_batch_idx)
    block_table = _contiguous(block_table)
    q_same_position = not causal and window == (-1, -1)  # the window as given: flash-attn's docstring's rule
    window = _kernel_window(window, capacity, n_q)
    shapes_only = _runtime.holds_no_data(q)  # meta or eager fake tensors: the op's fake implementation runs
    if not shapes_only and not _runtime.kernels_can_run(*tensors):
        raise NotImplementedError(f"attention_with_kvcache: the Triton kernels of this process cannot run on "
                                  f"{q.device} tensors, and there is no fallback (it updates the cache in place)")
    if _runtime.in_functorch_transform():
        raise NotImplementedError("attention_with_kvcache: not under torch.func transforms (vmap, grad, ...): its "
                                  "launches cannot read their wrapped tensors, and there is no fallback (it updates "
                                  "the cache in place)")
    # Eager calls launch directly (a custom op's dispatch would cost more host time than the launches' Python);
    # torch.compile sees one opaque op that declares its in-place append.
    compiling = torch.compiler.is_compiling()
    out, lse = (_launch_op if compiling or shapes_only else _launch)(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, leftpad, batch_idx, block_table, alibi_slopes,
        rotary_interleaved, q_same_position, window[0], window[1], float(softcap), scale, num_splits,
        compiling or return_lse)  # eager calls allocate no lse nobody asked for
    return (out, lse) if return_lse else out
