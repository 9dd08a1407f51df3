"""Fused attention in Triton, FlashAttention-2 style: forward, backward, autograd op, and an SDPA drop-in.

Shapes: q (B, H, Nq, D); k, v (B, Hkv, Nk, D) with H a multiple of Hkv (grouped-query attention is done by
indexing: query head h reads kv head h // (H // Hkv), nothing is repeated in memory); 1 <= D <= 256, padded
inside the kernels to a power of two >= 16 with masked loads; fp16, bf16 or fp32, any strides.

Math: out = softmax(scale * q @ k^T + mask) @ v, computed block by block with an online softmax in base 2
(scale * log2(e) folded into one multiply), never materialising the (Nq, Nk) scores: O(N) extra memory, the
logsumexp ``lse`` (B, H, Nq) float32 kept for the backward. The mask is "query i sees key j iff
kv_start[b] <= j < kv_end[b] and (not causal or j <= i + shift)": shift = Nk - Nq is FlashAttention's
bottom-right causal alignment (:func:`attention`), shift = 0 is PyTorch's top-left one
(:func:`scaled_dot_product_attention`); the per-batch key range [kv_start, kv_end) implements padding masks.
Rows that see no key give zeros and lse = -inf.

Backward (FA2): delta = rowsum(dO * O); dK/dV by a program per key block per kv head that loops over the query
heads of its group and their query blocks (GQA sums without atomics: deterministic); dQ by a program per query
block that loops over key blocks.

Precision: matmuls accumulate in fp32. fp32 inputs use IEEE fp32 dot products on GPU (PyTorch's default) unless
``torch.backends.cuda.matmul.allow_tf32`` is True, then TF32.

Fallbacks (documented, never silent about the math): if the Triton kernels cannot run on the inputs in this
process (see ``kernels._runtime.kernel_runs_on``) :func:`attention` uses ``kernels.reference.attention``;
:func:`scaled_dot_product_attention` hands everything the kernel does not cover to the original
``torch.nn.functional.scaled_dot_product_attention``.
"""
import contextlib
import contextvars
import functools
import inspect
import math
import numbers
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from kernels import _runtime, reference  # _runtime first: it chooses the interpreter before triton loads
from kernels._runtime import cast_rne
from kernels._validate import check_same, check_tensor
from kernels.registry import TRITON_DTYPES, Build, register_builds

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_TORCH_SDPA = F.scaled_dot_product_attention
"""torch's own SDPA, captured at import so the shim's fallback still works after it is assigned over torch's."""

LOG2E = tl.constexpr(1.4426950408889634)  # kernels work in base 2: exp(x) = exp2(x * log2(e))
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256

# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile_ptrs(X, b, h, rows, offs_d, stride_b, stride_h, stride_n, stride_d):
    """Pointers to the (rows, BLOCK_D) tile at rows ``rows`` of head ``h`` of batch ``b`` (64-bit head offsets)."""
    return (X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
            + rows[:, None] * stride_n + offs_d[None, :] * stride_d)


@triton.jit
def _load_tile(ptrs, row_ok, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile: zeros for the head-dim padding and, with CHECK_ROWS, where ``row_ok`` is False.

    Masks are only emitted when needed so that full, power-of-two tiles load unmasked (vectorised).
    """
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, tile, row_ok, offs_d, HEAD_DIM: tl.constexpr):
    tl.store(ptrs, tile, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _key_bounds(KV_BOUNDS, b, N_K):
    """The batch's visible key range [lo, hi): all keys, or the (B, 2) int32 ``KV_BOUNDS`` row of a padding mask."""
    if KV_BOUNDS is None:
        lo = 0
        hi = N_K
    else:
        lo = tl.load(KV_BOUNDS + 2 * b)
        hi = tl.load(KV_BOUNDS + 2 * b + 1)
    return lo, hi



@triton.jit
def _query_block_keys(KV_BOUNDS, b, start_m, N_Q, N_K, CAUSAL_SHIFT,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys [lo, hi) that some row of the query block at ``start_m`` sees, and ``mid``: [lo, mid) is whole key
    blocks that every row of the block sees, so only [mid, hi) needs the score mask. Causal key blocks past the
    diagonal lie beyond ``hi`` and are never visited."""
    lo, hi = _key_bounds(KV_BOUNDS, b, N_K)
    full = hi
    if CAUSAL:
        last_row = tl.minimum(start_m + BLOCK_M, N_Q) - 1
        hi = tl.minimum(hi, last_row + CAUSAL_SHIFT + 1)
        full = tl.minimum(full, start_m + CAUSAL_SHIFT + 1)
    hi = tl.maximum(hi, lo)
    full = tl.maximum(full, lo)
    mid = lo + ((full - lo) // BLOCK_N) * BLOCK_N
    return lo, mid, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
               start, end, kv_hi, CAUSAL_SHIFT, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [start, end); scores in log2 units."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_kn, cols < kv_hi, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        v = _load_tile(v_ptrs + start_n * stride_vn, cols < kv_hi, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = cols[None, :] < kv_hi
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + CAUSAL_SHIFT)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet still has max -inf: subtract 0 instead so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV_BOUNDS,
              stride_qb, stride_qh, stride_qn, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_on, stride_od,
              H, GROUP, N_Q, N_K, CAUSAL_SHIFT, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (query block, batch * head): O (B, H, Nq, D) and LSE (B, H, Nq) natural log, fp32."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    kv_h = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q

    q_ptrs = _tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
    q = _load_tile(q_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = _tile_ptrs(K, b, kv_h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, b, kv_h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)

    lo, mid, hi = _query_block_keys(KV_BOUNDS, b, start_m, N_Q, N_K, CAUSAL_SHIFT, BLOCK_M, BLOCK_N, CAUSAL)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               lo, mid, hi, CAUSAL_SHIFT, qk_scale,
                               False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               mid, hi, hi, CAUSAL_SHIFT, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION)

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    o_ptrs = _tile_ptrs(O, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od)
    _store_tile(o_ptrs, cast_rne(out, O.dtype.element_ty), row_ok, offs_d, HEAD_DIM)
    tl.store(LSE + off_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_oh, stride_on, stride_od,
                    stride_dob, stride_doh, stride_don, stride_dod,
                    H, N_Q,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), (B, H, Nq) fp32: the softmax-Jacobian term shared by every key block."""
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    o_ptrs = _tile_ptrs(O, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od)
    do_ptrs = _tile_ptrs(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod)
    o = _load_tile(o_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(do_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * N_Q + offs_m, delta, mask=row_ok)


@triton.jit
def _row_stats(LSE, DELTA, row_base, rows, row_ok):
    """The backward's per-row log2-unit logsumexp and delta. Rows past the end and rows that saw no key
    (lse = -inf) get +inf, so exp2(s - lse) = 0 removes them from every gradient."""
    lse = tl.load(LSE + row_base + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qn, stride_don, LSE, DELTA, row_base,
                    cols, offs_m, offs_d, start, end, N_Q, CAUSAL_SHIFT, qk_scale,
                    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [start, end) of one query head (transposed scores)."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < N_Q
        q = _load_tile(q_ptrs + start_m * stride_qn, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
        do = _load_tile(do_ptrs + start_m * stride_don, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse, delta = _row_stats(LSE, DELTA, row_base, rows, row_ok)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(cols[:, None] <= rows[None, :] + CAUSAL_SHIFT, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV_BOUNDS,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   H, GROUP, N_Q, N_K, CAUSAL_SHIFT, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (key block, batch * kv head): dK, dV (B, Hkv, Nk, D), contiguous, in the input dtype.

    The program owns its key block for every query head of its GQA group, so the group's gradients are summed
    in registers: no atomics, deterministic.
    """
    start_n = tl.program_id(0) * BLOCK_N
    h_kv = H // GROUP
    b = tl.program_id(1) // h_kv
    kv_h = tl.program_id(1) % h_kv
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    lo, hi = _key_bounds(KV_BOUNDS, b, N_K)
    col_ok = (cols >= lo) & (cols < hi)
    # Keys outside [lo, hi) load as zeros: their (meaningless) gradients stay finite and are zeroed at the store.
    k_ptrs = _tile_ptrs(K, b, kv_h, cols, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, b, kv_h, cols, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)
    k = _load_tile(k_ptrs, col_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    v = _load_tile(v_ptrs, col_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    # Query rows that see some key of the block start at m_lo; causal rows from m_full on see all of them.
    first_col = tl.maximum(start_n, lo)
    last_col = tl.minimum(start_n + BLOCK_N, hi) - 1
    if CAUSAL:
        m_lo = tl.minimum(tl.maximum(first_col - CAUSAL_SHIFT, 0), N_Q)
        m_full = tl.minimum(tl.maximum(last_col - CAUSAL_SHIFT, m_lo), N_Q)
        mid = m_lo + tl.cdiv(m_full - m_lo, BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        mid = 0
    m_end = tl.where(first_col <= last_col, N_Q, m_lo)  # a block with no visible key skips the loops

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        q_ptrs = _tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
        do_ptrs = _tile_ptrs(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod)
        row_base = (b * H + h).to(tl.int64) * N_Q
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qn, stride_don, LSE, DELTA, row_base,
                                     cols, offs_m, offs_d, m_lo, tl.minimum(mid, m_end), N_Q, CAUSAL_SHIFT, qk_scale,
                                     True, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qn, stride_don, LSE, DELTA, row_base,
                                 cols, offs_m, offs_d, mid, m_end, N_Q, CAUSAL_SHIFT, qk_scale,
                                 False, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PRECISION)

    dk = tl.where(col_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(col_ok[:, None], dv, 0.0)
    dk_ptrs = _tile_ptrs(DK, b, kv_h, cols, offs_d, stride_dkb, stride_dkh, stride_dkn, stride_dkd)
    dv_ptrs = _tile_ptrs(DV, b, kv_h, cols, offs_d, stride_dkb, stride_dkh, stride_dkn, stride_dkd)  # same layout
    _store_tile(dk_ptrs, cast_rne(dk, DK.dtype.element_ty), cols < N_K, offs_d, HEAD_DIM)
    _store_tile(dv_ptrs, cast_rne(dv, DV.dtype.element_ty), cols < N_K, offs_d, HEAD_DIM)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                  start, end, kv_hi, CAUSAL_SHIFT, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_kn, cols < kv_hi, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        v = _load_tile(v_ptrs + start_n * stride_vn, cols < kv_hi, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            visible = cols[None, :] < kv_hi
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + CAUSAL_SHIFT)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_BOUNDS,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                 H, GROUP, N_Q, N_K, CAUSAL_SHIFT, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (query block, batch * head): dQ (B, H, Nq, D), contiguous, in the input dtype."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    kv_h = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    q_ptrs = _tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
    do_ptrs = _tile_ptrs(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod)
    q = _load_tile(q_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(do_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse, delta = _row_stats(LSE, DELTA, off_bh.to(tl.int64) * N_Q, offs_m, row_ok)
    k_ptrs = _tile_ptrs(K, b, kv_h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, b, kv_h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)

    lo, mid, hi = _query_block_keys(KV_BOUNDS, b, start_m, N_Q, N_K, CAUSAL_SHIFT, BLOCK_M, BLOCK_N, CAUSAL)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                       lo, mid, hi, CAUSAL_SHIFT, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                       mid, hi, hi, CAUSAL_SHIFT, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION)
    _store_tile(_tile_ptrs(DQ, b, h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd),
                cast_rne(dq * sm_scale, DQ.dtype.element_ty), row_ok, offs_d, HEAD_DIM)


# ----------------------------------------------------------------------------------------- launch configurations
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU family and padded head dim, autotuned on a GPU per (head dim,
# dtype, causal, precision, length bucket). BLOCK_N is the streamed (inner) block of the forward and dQ, BLOCK_M
# that of dK/dV. fp16/bf16 entries use the tensor cores (HMMA on sm_80, HGMMA on sm_90 where the tile allows) and
# compile for both sm_80 and sm_90 with no register spill at head dims <= 128 (ptxas -v, triton 3.8): larger tiles
# that spilled on either were pruned, e.g. the forward's 128x64 with 8 warps at d128 (sm_80) or dK/dV's 64x64 at
# d128 (sm_90). At d256 only a few small tiles stay spill-free. The dK/dV and dQ tables serve both families; their
# first entries (the build report's defaults) also compile spill-free for sm_100, which uses the sm_90 tables.
_DKDV_TILES = {64: [(32, 128, 8, 2), (16, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3)],
               128: [(16, 64, 4, 1), (16, 64, 4, 2), (32, 64, 8, 2), (16, 128, 8, 2)],
               256: [(16, 32, 4, 1)]}
_DQ_TILES = {64: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
             128: [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2)],
             256: [(32, 32, 4, 1)]}
_CONFIGS = {
    "fwd": {
        80: {64: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 3)],
             128: [(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3)],
             256: [(64, 64, 8, 2), (32, 64, 4, 2)]},
        90: {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3)],
             128: [(128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2)],
             256: [(64, 64, 8, 2)]},
    },
    "dkdv": {80: _DKDV_TILES, 90: _DKDV_TILES},
    "dq": {80: _DQ_TILES, 90: _DQ_TILES},
}
# IEEE fp32 dot products run on the FMA units, whose operands live in registers: only small tiles fit (32x32
# with 4 warps already spills hundreds of bytes). Every entry compiles without spills on sm_80 and sm_90 (ptxas -v,
# triton 3.8), head dim 256 included. TF32 (opt-in) uses them too.
_FP32_CONFIGS = {
    "fwd": {64: [(32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)], 128: [(16, 32, 8, 2), (16, 16, 4, 2)],
            256: [(16, 16, 4, 2)]},
    "dkdv": {64: [(32, 32, 8, 2), (16, 32, 8, 2)], 128: [(16, 32, 8, 1), (32, 32, 8, 1)], 256: [(16, 16, 8, 1)]},
    "dq": {64: [(32, 32, 8, 2), (16, 32, 4, 2)], 128: [(16, 32, 8, 2), (32, 16, 8, 2)],
           256: [(32, 16, 8, 1), (16, 16, 8, 1)]},
}
_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_GRID_BLOCK = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}  # the block the grid's first axis tiles
_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32}  # autotune cannot run interpreted; small tiles keep it quick
# (family, {kernel: tile used}) of the innermost active interpreter_tiles() block; (None, None) outside any
_INTERPRETER_FAMILY = contextvars.ContextVar("interpreter_tiles", default=(None, None))
_DELTA_BLOCK_M, _DELTA_WARPS = 64, 8  # 4 warps spill 8-20 B on sm_100 (ptxas-blackwell); 8 spill nowhere


def _tiles(kernel: str, family: int, d_bucket: int, fp32: bool):
    return _FP32_CONFIGS[kernel][d_bucket] if fp32 else _CONFIGS[kernel][family][d_bucket]


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def _family(device: torch.device) -> int:
    major, _ = _runtime.device_capability(device)
    return 90 if major >= 9 else 80


def _length_bucket(n: int) -> int:
    return triton.next_power_of_2(max(min(n, 16384), 64))


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, family: int, d_bucket: int, fp32: bool, n_bucket: Tuple[int, int]):
    """An autotuner over this family's configs; one per length bucket so that tuning is keyed on bucketed
    lengths (the autotuner itself keys on head dim, causal, precision and the tensors' dtypes)."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in _tiles(kernel, family, d_bucket, fp32)]
    return triton.autotune(configs=configs, key=["HEAD_DIM", "CAUSAL", "PRECISION"])(_KERNELS[kernel])


@contextlib.contextmanager
def interpreter_tiles(family: Optional[int]) -> Iterator[Dict[str, Tuple[int, int]]]:
    """Choose the tile of interpreted launches inside the block (no effect on compiled kernels, which autotune).

    ``None``: the interpreter's small default, BLOCK_M = BLOCK_N = 32 for every kernel (what the tests rely on:
    multi-block paths at small N, and quick). ``80`` or ``90``: the tile a GPU of that family starts from, the
    first entry of each kernel's config table for the input's padded head dim and dtype, i.e.
    ``_tiles(kernel, family, d_bucket, fp32)[0]`` (fwd, dkdv and dq each have their own; fp32 inputs use the IEEE
    fp32 tables, whose first tiles are small: 32x32 for all three at head dim <= 64, the interpreter's default
    itself). Meant for counting bytes and FLOPs: Triton's interpreter executes
    every load and store, so the tile decides how often K/V are re-read. The results are the same up to rounding.

    Yields a dict that the launches inside the block fill with ``{kernel: (BLOCK_M, BLOCK_N)}``, the tile each of
    "fwd", "dkdv", "dq" last ran with. Blocks nest; the innermost wins.
    """
    if family is not None and family not in _CONFIGS["fwd"]:
        raise ValueError(f"family must be None or one of {sorted(_CONFIGS['fwd'])}, got {family!r}")
    used: Dict[str, Tuple[int, int]] = {}
    token = _INTERPRETER_FAMILY.set((family, used))
    try:
        yield used
    finally:
        _INTERPRETER_FAMILY.reset(token)


def _interpreter_tile(kernel: str, meta: dict, fp32: bool) -> Dict[str, int]:
    """BLOCK_M/BLOCK_N of an interpreted launch of ``kernel``, per the active :func:`interpreter_tiles`."""
    family, used = _INTERPRETER_FAMILY.get()
    if family is None:
        tile = dict(_INTERPRETER_TILE)
    else:
        block_m, block_n, _, _ = _tiles(kernel, family, _d_bucket(meta["BLOCK_D"]), fp32)[0]
        tile = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if used is not None:
        used[kernel] = (tile["BLOCK_M"], tile["BLOCK_N"])
    return tile


def _launch(kernel: str, grid_rows: int, grid_programs: int, args, meta, lengths: Tuple[int, int]):
    """Launch ``kernel`` over (cdiv(grid_rows, block), grid_programs) programs: a fixed tile when interpreted
    (see :func:`interpreter_tiles`), autotuned over the device family's configs on a GPU."""
    block = _GRID_BLOCK[kernel]
    fp32 = args[0].dtype == torch.float32
    if _runtime.INTERPRETED:
        tile = _interpreter_tile(kernel, meta, fp32)
        _KERNELS[kernel][(triton.cdiv(grid_rows, tile[block]), grid_programs)](*args, **meta, **tile)
        return
    tuned = _tuned(kernel, _family(args[0].device), _d_bucket(meta["BLOCK_D"]), fp32,
                   tuple(_length_bucket(n) for n in lengths))
    tuned[lambda m: (triton.cdiv(grid_rows, m[block]), grid_programs)](*args, **meta)


def _meta(q: torch.Tensor, causal: bool) -> dict:
    """Compile-time parameters shared by the kernels: padded head dim, causal, dot precision, interpreter upcast."""
    d = q.shape[-1]
    tf32 = q.dtype == torch.float32 and not _runtime.INTERPRETED and torch.backends.cuda.matmul.allow_tf32
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=causal,
                # The interpreter's tl.dot multiplies bf16 bit patterns as integers: compute in fp32 there.
                UPCAST=_runtime.INTERPRETED and q.dtype == torch.bfloat16,
                PRECISION="tf32" if tf32 else "ieee")


# --------------------------------------------------------------------------------------------------- launchers


def _forward(q, k, v, kv_bounds, causal: bool, causal_shift: int, scale: float):
    """Run the forward kernel: (out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32)."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or n_k == 0:  # nothing to launch: rows that see no key are zeros with lse -inf
        return out.zero_(), lse.fill_(float("-inf"))
    args = (q, k, v, out, lse, kv_bounds, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, heads // k.shape[1], n_q, n_k, causal_shift, scale * LOG2E.value)
    _launch("fwd", n_q, batch * heads, args, _meta(q, causal), (n_q, n_k))
    return out, lse


def _backward(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, causal: bool, causal_shift: int, scale: float):
    """Run the backward kernels: (dq, dk, dv), contiguous, in the inputs' dtype."""
    batch, heads, n_q, d = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    # The kernels store every element (zeros where no query/key is visible); only an empty side needs zero-filling.
    alloc = torch.empty if q.numel() and k.numel() else torch.zeros
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = alloc(v.shape, dtype=v.dtype, device=v.device)
    if alloc is torch.zeros:
        return dq, dk, dv
    meta = _meta(q, causal)
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(n_q, _DELTA_BLOCK_M), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n_q,
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=_DELTA_BLOCK_M, num_warps=_DELTA_WARPS)
    if grad_lse is not None:  # d lse_i / d s_ij = p_ij, which folds into delta: ds = p * (dp - (delta - dlse))
        delta -= grad_lse
    common = (q, k, v, grad_out, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    sizes = (heads, heads // kv_heads, n_q, n_k, causal_shift, scale * LOG2E.value, scale)
    _launch("dkdv", n_k, batch * kv_heads, (*common, dk, dv, kv_bounds, *strides, *dk.stride(), *sizes), meta,
            (n_q, n_k))
    _launch("dq", n_q, batch * heads, (*common, dq, kv_bounds, *strides, *dq.stride(), *sizes), meta, (n_q, n_k))
    return dq, dk, dv


# ------------------------------------------------------------------------------------ autograd (torch.library)


@torch.library.custom_op("kernels::flash_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_bounds: Optional[torch.Tensor],
                causal: bool, causal_shift: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    with _runtime.launch_device(q):
        return _forward(q, k, v, kv_bounds, causal, causal_shift, scale)


@_forward_op.register_fake
def _(q, k, v, kv_bounds, causal, causal_shift, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("kernels::flash_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, grad_lse: Optional[torch.Tensor], kv_bounds: Optional[torch.Tensor],
                 causal: bool, causal_shift: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _runtime.launch_device(q):
        return _backward(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, causal, causal_shift, scale)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, causal, causal_shift, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_bounds, ctx.causal, ctx.causal_shift, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output, kv_bounds)


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_bounds = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, grad_lse, kv_bounds,
                              ctx.causal, ctx.causal_shift, ctx.scale)
    return dq, dk, dv, None, None, None, None


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------- public API


def _check_qkv(q, k, v) -> None:
    """Raise TypeError/ValueError naming the argument unless q, k, v are valid attention inputs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same("dtype", q=q, k=k, v=v)
    check_same("device", q=q, k=k, v=v)
    batch, heads, _, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Nk, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"k, v must have batch size {batch} like q (B, H, Nq, D), got k of shape {tuple(k.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k, v must have head dim {d} like q (B, H, Nq, D), got k of shape {tuple(k.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be in 1..{MAX_HEAD_DIM}, got q of shape {tuple(q.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"k, v: the number of kv heads must divide q's {heads} heads, got k of shape {tuple(k.shape)}")


def _check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def _key_ranges(mask: torch.Tensor, name: str) -> torch.Tensor:
    """(B, 2) int32 [start, end) of each row's True run of a bool (B, Nk) mask; ValueError if a row has several
    runs. An all-False row gives [0, 0). Reads the mask on the host (one device sync)."""
    count = mask.sum(1)
    n_k = mask.shape[1]
    if n_k == 0:
        return torch.zeros(mask.shape[0], 2, dtype=torch.int32, device=mask.device)
    start = mask.int().argmax(1)  # the first True (argmax returns the first maximal index)
    end = n_k - mask.flip(1).int().argmax(1)
    start = torch.where(count > 0, start, 0)
    end = torch.where(count > 0, end, 0)
    if not torch.equal(end - start, count):
        raise ValueError(f"{name}: each batch row's True entries (visible keys) must form one contiguous run")
    return torch.stack([start, end], 1).to(torch.int32).contiguous()


def _check_padding_mask(mask, q, k) -> None:
    check_tensor("key_padding_mask", mask, ndim=2, dtypes=(torch.bool,))
    if tuple(mask.shape) != (q.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(q.shape[0], k.shape[2])}, "
                         f"got {tuple(mask.shape)}")
    check_same("device", q=q, key_padding_mask=mask)


def _reference_with_lse(q, k, v, causal: bool, scale: float, key_padding_mask):
    """The documented fallback: kernels.reference.attention, plus the logsumexp computed the same plain way."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = reference.attention(q, k, v, causal=causal, scale=scale, mask=mask)
    group = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(group, dim=1).transpose(-2, -1)).float() * scale
    visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        visible = reference.causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        visible = visible & mask
    return out, scores.masked_fill(~visible, float("-inf")).logsumexp(-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: Optional[float] = None,
              return_lse: bool = False, key_padding_mask: Optional[torch.Tensor] = None):
    """Fused attention ``softmax(scale * q @ k^T + mask) @ v`` with autograd for q, k, v.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D), H a multiple of Hkv (GQA/MQA without repeating k/v), 1 <= D <= 256,
    fp16/bf16/fp32, any strides. ``scale`` defaults to 1/sqrt(D). ``causal`` is bottom-right aligned: query i
    sees key j iff j <= i + Nk - Nq. ``key_padding_mask``: optional bool (B, Nk), True = real key; each row's
    True entries must form one contiguous run (left or right padding). Rows that see no key give zeros.
    Returns out (B, H, Nq, D) in q's dtype, and with ``return_lse`` also lse (B, H, Nq) float32, the natural-log
    logsumexp of the scaled, masked scores (-inf for rows that see no key).
    """
    _check_qkv(q, k, v)
    scale = _check_scale(scale, q.shape[-1])
    if key_padding_mask is not None:
        _check_padding_mask(key_padding_mask, q, k)
    if not _runtime.kernel_runs_on(q, k, v):
        out, lse = _reference_with_lse(q, k, v, causal, scale, key_padding_mask)
    else:
        bounds = None if key_padding_mask is None else _key_ranges(key_padding_mask, "key_padding_mask")
        out, lse = _forward_op(q, k, v, bounds, bool(causal), k.shape[2] - q.shape[2], scale)
    return (out, lse) if return_lse else out


def _mask_plan(attn_mask: torch.Tensor, batch: int, n_q: int, n_k: int, device: torch.device):
    """(kv_bounds, causal, causal_shift) if a bool SDPA mask is exactly "a contiguous key range per batch, AND
    optionally a top-left or bottom-right causal mask" (what Hugging Face builds for padded batches), else None."""
    if attn_mask.dtype != torch.bool or not 2 <= attn_mask.dim() <= 4 or attn_mask.device != device:
        return None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or mask.shape[2] not in (1, n_q) or mask.shape[3] != n_k:
        return None
    mask = mask[:, 0].expand(batch, n_q, n_k)
    try:
        bounds = _key_ranges(mask.any(1), "attn_mask")
    except ValueError:
        return None
    j = torch.arange(n_k, device=mask.device)
    in_range = (j >= bounds[:, :1]) & (j < bounds[:, 1:])
    for causal, shift in ((False, 0), (True, 0), (True, n_k - n_q)):
        expected = in_range[:, None, :]
        if causal:
            expected = expected & (j <= torch.arange(n_q, device=mask.device)[:, None] + shift)
        if torch.equal(mask, expected.expand(batch, n_q, n_k)):
            return bounds, causal, shift
    return None


def _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """How the kernel runs this SDPA call, as (kv_bounds, causal, causal_shift, scale), or None for torch's fallback
    (which then accepts, or rejects with its own error, what the kernel does not take)."""
    try:
        _check_qkv(query, key, value)
        scale = _check_scale(scale, query.shape[-1])
    except (TypeError, ValueError):
        return None
    if dropout_p != 0.0 or not _runtime.kernels_can_run(query, key, value):
        return None
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return None
    if attn_mask is None:
        return None, bool(is_causal), 0, scale  # torch's is_causal is top-left aligned: shift 0
    if is_causal:
        return None  # torch rejects a mask together with is_causal; let it say so
    if not isinstance(attn_mask, torch.Tensor):
        return None
    mask_plan = _mask_plan(attn_mask, query.shape[0], query.shape[2], key.shape[2], query.device)
    return None if mask_plan is None else (*mask_plan, scale)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same signature and semantics, top-left
    ``is_causal``), safe to assign over it.

    Runs the kernel for 4-D (B, H, L, D) fp16/bf16/fp32 inputs with equal q/k/v head dims <= 256, no dropout, and
    either no mask or a bool mask that is exactly a contiguous key range per batch row, optionally AND a causal
    (top-left or bottom-right) mask, such as Hugging Face's padding masks (B, 1, Nq, Nk) or (B, 1, 1, Nk): checking
    this reads the mask (a device sync, and a graph break under torch.compile; without a mask there is neither).
    Everything else (float masks, other bool masks, dropout_p > 0, other
    ranks or shapes, inputs the kernels cannot run on in this process) calls the original torch function.
    """
    plan = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if plan is None:
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    return _forward_op(query, key, value, *plan)[0]


# ------------------------------------------------------------------------------------------------ GPU builds
_FP32_POINTERS = ("LSE", "DELTA")
_INT_ARGS = ("H", "GROUP", "N_Q", "N_K", "CAUSAL_SHIFT")


def _build(kernel: str, fn, dtype: torch.dtype, d: int, consts: dict, num_warps: int, num_stages: int,
           label: str) -> Build:
    """A causal, padding-masked, unit-stride-head-dim build, as the launchers specialise at run time."""
    values = dict(consts, HEAD_DIM=d, BLOCK_D=d, CAUSAL=True, UPCAST=False, PRECISION="ieee")
    signature, constexprs = {}, {}
    for name in inspect.signature(fn.fn).parameters:
        if name in values:
            signature[name], constexprs[name] = "constexpr", values[name]
        elif name.startswith("stride_") and name.endswith("d"):  # contiguous head dim: Triton specialises 1
            signature[name], constexprs[name] = "constexpr", 1
        elif name == "KV_BOUNDS":
            signature[name] = "*i32"
        elif name in _INT_ARGS or name.startswith("stride_"):
            signature[name] = "i32"
        elif name.endswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{TRITON_DTYPES[dtype]}"
    aligned = tuple(n for n, t in signature.items() if t.startswith("*") or (t == "i32" and n.startswith("stride_")))
    return Build(kernel=kernel, fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                 num_stages=num_stages, label=label, divisible_by_16=aligned)


@register_builds
def _builds() -> List[Build]:
    """Every autotune config of every GPU family, for fp16/bf16/fp32 at head dims 64, 128 and 256."""
    builds = []
    for dtype, name in TRITON_DTYPES.items():
        for d in (64, 128, 256):
            builds.append(_build("attention_bwd_delta", _attn_bwd_delta, dtype, d, {"BLOCK_M": _DELTA_BLOCK_M},
                                 _DELTA_WARPS, 1, f"{name} d{d} BLOCK_M={_DELTA_BLOCK_M}"))
            for kernel, fn in _KERNELS.items():
                # in table order, duplicates dropped: the first build of each kind is the sm_80 family's first
                # config, which the build report treats as the default
                tiles = dict.fromkeys(tile for family in (80, 90) for tile in _tiles(kernel, family, d, name == "fp32"))
                for bm, bn, warps, stages in tiles:
                    builds.append(_build(f"attention_{kernel}", fn, dtype, d, {"BLOCK_M": bm, "BLOCK_N": bn}, warps,
                                         stages, f"{name} d{d} causal {bm}x{bn} w{warps} s{stages}"))
    return builds
