"""Fused layer norm and RMS norm in Triton, forward and backward, optionally fused with the residual add.

Over the trailing ``normalized_shape`` dims (flattened to a row of n elements):
    layer norm  y = (h - mean) * rstd * weight + bias,     rstd = 1 / sqrt(var + eps)   (biased variance)
    RMS norm    y = h * rstd * (offset + weight),          rstd = 1 / sqrt(mean(h^2) + eps)   (no weight: h * rstd)
where h = x, or h = x + residual rounded to its dtype (returned as the new residual stream). Layer norm does all
its math in fp32. RMS norm rounds where its ``casting_mode`` says (Liger-Kernel's modes, after Hugging Face's
models): "gemma" all in fp32, cast once at the end; "llama" rstd in fp32, xhat = h * rstd rounded to x's dtype
before the weight; "none" every step rounded to x's dtype (sums accumulate in fp32). mean and rstd are kept in fp32
for the backward. Where the fp32 statistics overflow (a row holding +-3e38, or inf), the output is what torch's gives
(NaN for layer norm; RMS norm's h * 0, NaN at infinite entries) and the gradient is NaN over the row, not a finite
value: torch's is NaN there too, but for an RMS norm row whose only overflow is the sum of squares (say [2e19, 1, 2,
3]), where torch's gradient is 0.

DTensor inputs (tensor or sequence parallel) normalise each rank's local rows, as torch's own norms on DTensors do.

Forward:
- a row of at most ``MAX_BLOCK`` elements is one register block: x (and residual) read once, y (and h) written
  once. A program takes a run of rows and reads weight and bias once for all of them (a persistent grid: as many
  programs as the SMs hold at once); only unaligned rows (a width not a multiple of ``VECTOR_ALIGNMENT``) wider
  than ``MULTI_ROW_MAX_BLOCK`` get one program each.
- a longer row takes two passes over ``LONG_BLOCK``-wide chunks: pass 1 merges per-chunk mean and sum of squared
  deviations (Chan et al.'s parallel update, stable where E[h^2] - E[h]^2 is not; of h less the first chunk's mean,
  so that rows of large mean/std keep fp32 accuracy as chunks merge) and writes h; pass 2 re-reads
  h (x without a residual) and writes y, chunk-major over the program's run of rows (weight and bias read once).

Backward, a persistent grid of programs (one 16-warp program per SM for one-block rows, ``BACKWARD_PROGRAMS_PER_SM``
8-warp ones for two-pass rows; fewer where the partial sums would pass ``PARTIAL_SHARE`` of the traffic) each
owning a run of consecutive rows, one block a row up to ``MAX_BLOCK`` (unaligned rows: ``BACKWARD_MAX_BLOCK``;
narrow rows ``BACKWARD_TILE // BLOCK`` at a time) and two passes over chunks beyond, in fp32 whatever the casting
mode (as Liger-Kernel; the roundings of the forward count as identities):
    dh = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy))   (RMS norm drops the last term, w = offset + weight)
plus the new residual's own incoming gradient. dweight = sum over rows of dy * xhat ("llama": xhat rounded to x's
dtype, what the forward multiplied) and dbias = sum of dy are accumulated per program in fp32 registers (two-pass
rows go chunk-major: a chunk's sums over the program's rows, then the next chunk) and stored once per program,
then reduced over programs by one ``sum``: deterministic, no atomics, no locks. The counted bytes
(``tests/test_row_traffic.py``): the minimum, plus the parameters once per program and the partial rows.

Eager calls go through a plain ``autograd.Function`` (reverse and forward mode); under ``torch.compile`` the same
launches go through ``torch.library`` custom ops, so each stays one opaque op in the graph.
"""
import dataclasses
import functools
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _direct, reference
from kernels._autograd import autograd_function
from kernels._rows import (DTENSOR, LANES, PLAN_CACHE_SIZE, autocasts_to_fp32, empty_rows_like, lanes_of,
                           row_config, rows_and_stride, warps_for)
from kernels._runtime import (INTERPRETED, cast_rne, cdiv, forward_ad_active, holds_no_data, kernel_runs_on,
                              launch_device, nested_forward_ad, sm_count, transform_needs_torch_ops)
from kernels._validate import FLOAT_DTYPES, check_same, check_tensor, is_integer
from kernels.registry import TRITON_DTYPES, declare, register_builds

MAX_BLOCK = 8192
"""Widest row held in registers as one block, forward and (aligned rows) backward: at 8192, 16 warps of 16
elements a thread keep weight, dweight and dbias across a program's rows beside the row at hand in under 128
registers (``python -m benchmarks static``: no spills on sm_80, sm_90, sm_100, gfx942)."""
LONG_BLOCK = 2048
"""Chunk width of the two-pass path for rows wider than MAX_BLOCK."""
VECTOR_ALIGNMENT = 16
"""Rows whose width is a multiple of this (every real model's hidden size) are aligned: Triton specialises such
an ``n_cols`` as divisible by 16, so a row's mask is uniform over 16 elements and its loads and stores are 128-bit
vectors. Other widths load element by element, an address each, and need the narrower limits below."""
BACKWARD_MAX_BLOCK = 4096
"""Widest unaligned row the backward holds as one block: at 8192, scalar loads spill (up to 288 bytes on sm_80,
sm_90, sm_100), so wider unaligned rows take the two-pass backward."""

CASTING_MODES = {"none": -1, "llama": 0, "gemma": 1}
"""RMS norm's casting modes (Liger-Kernel's names and codes) -> the kernels' ``CASTING`` constexpr."""
CAST_NONE = tl.constexpr(CASTING_MODES["none"])
CAST_LLAMA = tl.constexpr(CASTING_MODES["llama"])
CAST_GEMMA = tl.constexpr(CASTING_MODES["gemma"])
DEFAULT_CASTING_MODE = "gemma"
"""All fp32, one rounding at the end: ``torch.nn.functional.rms_norm``'s numerics, which the kernels had before
casting modes existed and which keep ``RMSNorm`` a drop-in for ``torch.nn.RMSNorm`` (Liger-Kernel defaults to
"llama", Hugging Face Llama's rounding of xhat before the weight: pass it explicitly to get that)."""


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` and back: one step of arithmetic done in that dtype."""
    return cast_rne(x, dtype).to(tl.float32)


@triton.jit
def _load_h(X, RES, H, x_off, res_off, h_off, cols, n_cols, HAS_RES: tl.constexpr):
    """fp32 h = x, or x + residual rounded to H's dtype and stored to H as the new residual stream."""
    mask = cols < n_cols
    h = tl.load(X + x_off + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(RES + res_off + cols, mask=mask, other=0.0).to(tl.float32)
        h_low = cast_rne(h, H.dtype.element_ty)
        tl.store(H + h_off + cols, h_low, mask=mask)
        h = h_low.to(tl.float32)
    return h


@triton.jit
def _load_vec(P, cols, n_cols, PRESENT: tl.constexpr):
    """fp32 values of an optional per-column parameter (weight or bias) at ``cols``; a dummy 0 when absent."""
    v = 0.0
    if PRESENT:
        v = tl.load(P + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    return v


@triton.jit
def _square(h, dtype: tl.constexpr, CASTING: tl.constexpr):
    """h^2 as RMS norm sums it: rounded to x's dtype in casting mode "none"."""
    sq = h * h
    if CASTING == CAST_NONE:
        sq = _round(sq, dtype)
    return sq


@triton.jit
def _rms_rstd(sum_sq, n_cols, eps, dtype: tl.constexpr, CASTING: tl.constexpr):
    """1 / sqrt(sum_sq / n_cols + eps): in fp32, or each step rounded to x's dtype in casting mode "none"."""
    if CASTING == CAST_NONE:
        rstd = _round(1.0 / tl.sqrt(_round(_round(sum_sq / n_cols, dtype) + eps, dtype)), dtype)
    else:
        rstd = 1.0 / tl.sqrt(sum_sq / n_cols + eps)
    return rstd


@triton.jit
def _layer_rstd(m2, n_cols, eps):
    """1 / sqrt(m2 / n_cols + eps), NaN where the fp32 variance overflowed: 1 / sqrt(inf) = 0 would turn the
    row into the bias where torch's fp32 moments give NaN (a row that cannot be normalised in fp32 says so)."""
    var = m2 / n_cols
    return tl.where(var == float("inf"), float("nan"), 1.0 / tl.sqrt(var + eps))


@triton.jit
def _output(xhat, w, b, offset, dtype: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            CASTING: tl.constexpr):
    """xhat * (offset + w) + b, each optional, before the final cast to x's dtype: all in fp32 ("gemma", and
    layer norm); xhat rounded to x's dtype first ("llama"); every step rounded ("none")."""
    if CASTING != CAST_GEMMA:
        xhat = _round(xhat, dtype)
    y = xhat
    if HAS_W:
        if CASTING == CAST_NONE:
            scale = _round(offset + _round(w, dtype), dtype)
        else:
            scale = offset + w
        y = y * scale
    if HAS_B:
        y = y + b
    return y


@triton.jit
def _centred_moments(h, pivot, mask, n):
    """(mean, deviations, sum of squared deviations) of the ``n`` values of ``h`` at ``mask``, taken relative to
    ``pivot`` (the mean is of h - pivot; deviations are 0 off the mask). With a pivot near the values (a first
    estimate of their mean) the sums are of small centred numbers: an fp32 sum of the raw values is ~1 ulp of the
    mean off, which a small spread magnifies (mean/std 100: 100x in xhat); h - pivot is exact there."""
    h = tl.where(mask, h - pivot, 0.0)
    mean = tl.sum(h, 0) / n
    dev = tl.where(mask, h - mean, 0.0)
    return mean, dev, tl.sum(dev * dev, 0)


@triton.jit
def _norm_fwd_row(X, RES, W, B, Y, H, MEAN, RSTD, row, stride_x, stride_res, n_cols, eps, offset, w, b,
                  BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                  HAS_B: tl.constexpr, CASTING: tl.constexpr, PARAMS_GIVEN: tl.constexpr):
    """Normalise one one-block row: Y[row] (and H[row]), MEAN[row] (layer norm only), RSTD[row], with the weight
    and bias values ``w``, ``b`` when PARAMS_GIVEN, else loading them."""
    out_off = row * n_cols
    cols = tl.arange(0, BLOCK)
    dtype = Y.dtype.element_ty
    h = _load_h(X, RES, H, row * stride_x, row * stride_res, out_off, cols, n_cols, HAS_RES)
    if RMS:
        rstd = _rms_rstd(tl.sum(_square(h, dtype, CASTING), 0), n_cols, eps, dtype, CASTING)
    else:
        pivot = tl.sum(h, 0) / n_cols
        mean, h, m2 = _centred_moments(h, pivot, cols < n_cols, n_cols)
        rstd = _layer_rstd(m2, n_cols, eps)
        tl.store(MEAN + row, pivot + mean)
    tl.store(RSTD + row, rstd)
    if not PARAMS_GIVEN:
        w = _load_vec(W, cols, n_cols, HAS_W)
        b = _load_vec(B, cols, n_cols, HAS_B)
    y = _output(h * rstd, w, b, offset, dtype, HAS_W, HAS_B, CASTING)
    tl.store(Y + out_off + cols, cast_rne(y, dtype), mask=cols < n_cols)


@triton.jit
def _fwd_row_stats(X, RES, H, MEAN, RSTD, row, stride_x, stride_res, n_cols, eps, BLOCK: tl.constexpr,
                   RMS: tl.constexpr, HAS_RES: tl.constexpr, CASTING: tl.constexpr):
    """Two-pass rows, pass 1 over one row's chunks: MEAN[row] (layer norm) and RSTD[row], and H[row]. Layer norm
    merges per-chunk mean and sum of squared deviations (Chan et al.) of h - pivot, the pivot the first chunk's
    mean: the running mean stays small, so each merge rounds it at a small ulp, not at the row mean's."""
    cols = tl.arange(0, BLOCK)
    dtype = H.dtype.element_ty
    count = tl.zeros([], tl.float32)
    pivot = tl.zeros([], tl.float32)
    mean = tl.zeros([], tl.float32)  # of h - pivot: small, so merging chunks rounds it at its own small ulp
    m2 = tl.zeros([], tl.float32)  # sum of squared deviations from the mean (of squares for RMS)
    for start in range(0, n_cols, BLOCK):
        h = _load_h(X, RES, H, row * stride_x + start, row * stride_res + start, row * n_cols + start, cols,
                    n_cols - start, HAS_RES)
        if RMS:
            m2 += tl.sum(_square(h, dtype, CASTING), 0)
        else:
            n_chunk = tl.minimum(n_cols - start, BLOCK).to(tl.float32)
            if start == 0:
                pivot = tl.sum(h, 0) / n_chunk
            mean_chunk, _, m2_chunk = _centred_moments(h, pivot, start + cols < n_cols, n_chunk)
            delta = mean_chunk - mean
            total = count + n_chunk
            mean += delta * (n_chunk / total)
            m2 += m2_chunk + delta * delta * (count * n_chunk / total)
            count = total
    if RMS:
        tl.store(RSTD + row, _rms_rstd(m2, n_cols, eps, dtype, CASTING))
    else:
        tl.store(RSTD + row, _layer_rstd(m2, n_cols, eps))
        tl.store(MEAN + row, pivot + mean)


@triton.jit
def _fwd_columns(X, W, B, Y, H, MEAN, RSTD, start, row_start, row_end, stride_x, n_cols, offset,
                 BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                 HAS_B: tl.constexpr, CASTING: tl.constexpr):
    """Two-pass rows, pass 2 at columns [start, start + BLOCK) of rows [row_start, row_end): Y from h read back
    (from H when it was written, one stream instead of x and residual), the weight and bias chunk read once for
    the run."""
    cols = tl.arange(0, BLOCK)
    mask = start + cols < n_cols
    dtype = Y.dtype.element_ty
    w = _load_vec(W + start, cols, n_cols - start, HAS_W)
    b = _load_vec(B + start, cols, n_cols - start, HAS_B)
    for row in range(row_start, row_end):
        mean, rstd = _row_stats(MEAN, RSTD, row, None, RMS)
        if HAS_RES:
            src = H + row * n_cols
        else:
            src = X + row * stride_x
        h = tl.load(src + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = _output((h - mean) * rstd, w, b, offset, dtype, HAS_W, HAS_B, CASTING)
        tl.store(Y + row * n_cols + start + cols, cast_rne(y, dtype), mask=mask)


@triton.jit
def _norm_fwd(X, RES, W, B, Y, H, MEAN, RSTD, stride_x, stride_res, n_rows, n_cols, rows_per_program, eps, offset,
              BLOCK: tl.constexpr, SINGLE: tl.constexpr, RMS: tl.constexpr, HAS_RES: tl.constexpr,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, CASTING: tl.constexpr, MULTI_ROW: tl.constexpr):
    """Layer/RMS norm forward. Y and H are contiguous (rows, n_cols); unused pointers (RES, H, W, B, MEAN) are
    ignored per the flags. Layer norm runs with offset 0 and CASTING "gemma" (all fp32).

    Program p normalises rows [p * rows_per_program, (p + 1) * rows_per_program) and reads weight and bias once
    for all of them: one-block rows with MULTI_ROW (the launcher's choice: aligned rows, and unaligned ones up to
    MULTI_ROW_MAX_BLOCK) keep them in registers across the run; two-pass rows take the run's statistics row by row
    (pass 1), then its outputs chunk by chunk (pass 2). One-block rows without MULTI_ROW get a program each
    (rows_per_program 1) with no row loop: out of a loop the compiler would hoist the weight and bias loads and
    keep them live beside h.
    """
    pid = tl.program_id(0).to(tl.int64)  # int64 rows make every offset 64-bit
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    if not SINGLE:
        for row in range(row_start, row_end):
            _fwd_row_stats(X, RES, H, MEAN, RSTD, row, stride_x, stride_res, n_cols, eps, BLOCK, RMS, HAS_RES,
                           CASTING)
        tl.debug_barrier()  # pass 2's threads read the statistics one thread stored
        for start in range(0, n_cols, BLOCK):
            _fwd_columns(X, W, B, Y, H, MEAN, RSTD, start, row_start, row_end, stride_x, n_cols, offset, BLOCK, RMS,
                         HAS_RES, HAS_W, HAS_B, CASTING)
    elif MULTI_ROW:
        cols = tl.arange(0, BLOCK)
        w = _load_vec(W, cols, n_cols, HAS_W)
        b = _load_vec(B, cols, n_cols, HAS_B)
        for row in range(row_start, row_end):
            _norm_fwd_row(X, RES, W, B, Y, H, MEAN, RSTD, row, stride_x, stride_res, n_cols, eps, offset, w, b,
                          BLOCK, RMS, HAS_RES, HAS_W, HAS_B, CASTING, True)
    else:
        _norm_fwd_row(X, RES, W, B, Y, H, MEAN, RSTD, pid, stride_x, stride_res, n_cols, eps, offset, 0.0, 0.0,
                      BLOCK, RMS, HAS_RES, HAS_W, HAS_B, CASTING, False)


@triton.jit
def _row_stats(MEAN, RSTD, row, live, RMS: tl.constexpr):
    """(mean, rstd) of ``row`` (a row index, or a column of them with ``live`` masking rows past a program's run:
    0 there) as the forward stored them; mean 0 for RMS norm."""
    mean = 0.0
    if live is None:
        if not RMS:
            mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
    else:
        if not RMS:
            mean = tl.load(MEAN + row, mask=live, other=0.0)
        rstd = tl.load(RSTD + row, mask=live, other=0.0)
    return mean, rstd


@triton.jit
def _load_grad(H, DY, w, h_off, dy_off, cols, n_cols, mean, rstd, HAS_W: tl.constexpr):
    """(xhat, dy, w * dy) in fp32 for one block of a row, w = offset + weight; lanes past the row read dy = 0, so
    they add nothing."""
    mask = cols < n_cols
    # (lanes past the row: (0 - mean) * rstd overflows, a NaN in the row's sums, only where |mean| * rstd passes
    # fp32's range, a near-constant row of huge values, where torch's fp32 layer norm is NaN too; masking xhat
    # spilled 7 SGPRs on gfx942's bf16 two-pass build)
    xhat = (tl.load(H + h_off + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    dy = tl.load(DY + dy_off + cols, mask=mask, other=0.0).to(tl.float32)
    wdy = dy * w if HAS_W else dy
    return xhat, dy, wdy


@triton.jit
def _weight_factor(xhat, dtype: tl.constexpr, CASTING: tl.constexpr):
    """What the forward multiplied the weight by, for dweight: xhat, rounded to x's dtype in casting mode "llama"
    (Liger-Kernel's backward, which keeps "none" in fp32 here)."""
    if CASTING == CAST_LLAMA:
        xhat = _round(xhat, dtype)
    return xhat


@triton.jit
def _input_grad(xhat, wdy, c1, c2, rstd, DH, dh_off, cols, n_cols, RMS: tl.constexpr, HAS_DH: tl.constexpr):
    """rstd * (w*dy - xhat * c1 - c2), c1 = mean(xhat * w*dy), c2 = mean(w*dy) (layer norm only), plus the
    gradient reaching h directly through the returned residual stream. An RMS norm row whose fp32 mean square
    overflowed (rstd = 0: the forward gave torch's zeros) has no finite gradient: NaN, as torch's backward gives
    where an entry's square overflows (torch's is 0 where only the sum does), not a finite 0 (layer norm's rstd is
    already NaN there)."""
    dx = wdy - xhat * c1
    if not RMS:
        dx -= c2
    dx *= rstd
    if RMS:
        dx = tl.where(rstd == 0.0, float("nan"), dx)
    if HAS_DH:
        dx += tl.load(DH + dh_off + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    return dx


@triton.jit
def _bwd_row_sums(H, W, DY, SUMS, start, row_start, row_end, stride_h, stride_dy, n_cols, offset, MEAN, RSTD,
                  BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr):
    """Two-pass rows, pass 1 over columns [start, start + BLOCK): add this chunk's sum(xhat * w*dy) and
    sum(w*dy) of each row of the run into SUMS[row] (fp32 pairs, 0 before the first chunk). Chunk-major, so the
    weight chunk is read once for the run."""
    cols = tl.arange(0, BLOCK)
    w = offset + _load_vec(W + start, cols, n_cols - start, HAS_W)
    for row in range(row_start, row_end):
        mean, rstd = _row_stats(MEAN, RSTD, row, None, RMS)
        xhat, dy, wdy = _load_grad(H, DY, w, row * stride_h + start, row * stride_dy + start, cols,
                                   n_cols - start, mean, rstd, HAS_W)
        c1 = tl.load(SUMS + 2 * row, mask=start > 0, other=0.0) + tl.sum(xhat * wdy, 0)
        c2 = tl.load(SUMS + 2 * row + 1, mask=start > 0, other=0.0) + tl.sum(wdy, 0)
        tl.store(SUMS + 2 * row, c1)
        tl.store(SUMS + 2 * row + 1, c2)
    # the next chunk's threads read what this one's stored (scalar stores come from one thread)
    tl.debug_barrier()


@triton.jit
def _bwd_row_tiles(H, W, DY, DH, DX, MEAN, RSTD, part, part_b, row_start, row_end, stride_h, stride_dy, stride_dh,
                   n_cols, offset, BLOCK: tl.constexpr, ROWS: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_DH: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, CASTING: tl.constexpr):
    """One-block rows: DX of rows [row_start, row_end), ROWS rows a step ([ROWS, BLOCK] tiles: narrow rows fill a
    16-warp program), and this run's fp32 partial dweight and dbias, summed in registers and stored once."""
    cols = tl.arange(0, BLOCK)[None, :]
    dtype = DX.dtype.element_ty
    # offset added once: a sum formed in the row loop would be hoisted and kept live beside w
    w = offset + _load_vec(W, cols, n_cols, HAS_W)
    dw = tl.zeros([ROWS, BLOCK], tl.float32)
    db = tl.zeros([ROWS, BLOCK], tl.float32)
    for first in range(row_start, row_end, ROWS):
        rows = first + tl.arange(0, ROWS)[:, None]
        live = None  # one row a step is always in the run: unmasked statistics loads
        width = n_cols
        if ROWS > 1:
            live = rows < row_end
            width = tl.where(live, n_cols, 0)  # a row past the run is masked off whole
        mean, rstd = _row_stats(MEAN, RSTD, rows, live, RMS)
        xhat, dy, wdy = _load_grad(H, DY, w, rows * stride_h, rows * stride_dy, cols, width, mean, rstd, HAS_W)
        c1 = tl.sum(xhat * wdy, 1)[:, None] / n_cols
        c2 = tl.sum(wdy, 1)[:, None] / n_cols
        dx = _input_grad(xhat, wdy, c1, c2, rstd, DH, rows * stride_dh, cols, width, RMS, HAS_DH)
        tl.store(DX + rows * n_cols + cols, cast_rne(dx, dtype), mask=cols < width)
        dw += dy * _weight_factor(xhat, dtype, CASTING)
        db += dy
    cols = tl.arange(0, BLOCK)
    if WANT_DW:
        tl.store(part + cols, tl.sum(dw, 0), mask=cols < n_cols)
    if WANT_DB:
        tl.store(part_b + cols, tl.sum(db, 0), mask=cols < n_cols)


@triton.jit
def _bwd_columns(H, W, DY, DH, DX, MEAN, RSTD, SUMS, part, part_b, start, row_start, row_end, stride_h,
                 stride_dy, stride_dh, n_cols, offset, BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                 HAS_DH: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, CASTING: tl.constexpr):
    """Two-pass rows, pass 2 at columns [start, start + BLOCK) of rows [row_start, row_end): DX from the c1, c2
    sums of pass 1 (SUMS), and this run's fp32 partial dweight and dbias there, stored once."""
    cols = tl.arange(0, BLOCK)
    dtype = DX.dtype.element_ty
    mask = start + cols < n_cols
    w = offset + _load_vec(W + start, cols, n_cols - start, HAS_W)
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    for row in range(row_start, row_end):
        mean, rstd = _row_stats(MEAN, RSTD, row, None, RMS)
        xhat, dy, wdy = _load_grad(H, DY, w, row * stride_h + start, row * stride_dy + start, cols,
                                   n_cols - start, mean, rstd, HAS_W)
        c1 = tl.load(SUMS + 2 * row) / n_cols
        c2 = tl.load(SUMS + 2 * row + 1) / n_cols
        dx = _input_grad(xhat, wdy, c1, c2, rstd, DH, row * stride_dh + start, cols, n_cols - start, RMS, HAS_DH)
        tl.store(DX + row * n_cols + start + cols, cast_rne(dx, dtype), mask=mask)
        dw += dy * _weight_factor(xhat, dtype, CASTING)
        db += dy
    if WANT_DW:
        tl.store(part + start + cols, dw, mask=mask)
    if WANT_DB:
        tl.store(part_b + start + cols, db, mask=mask)


@triton.jit
def _norm_bwd(H, W, DY, DH, DX, MEAN, RSTD, DW, DB, SUMS, stride_h, stride_dy, stride_dh, n_rows, n_cols,
              rows_per_program, offset, BLOCK: tl.constexpr, ROWS: tl.constexpr, SINGLE: tl.constexpr,
              RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DH: tl.constexpr, WANT_DW: tl.constexpr,
              WANT_DB: tl.constexpr, CASTING: tl.constexpr):
    """Program p: DX for rows [p * rows_per_program, (p + 1) * rows_per_program), and its fp32 partial sums of
    dweight and dbias in row p of DW and DB (programs, n_cols), each element stored once. DX is contiguous
    (rows, n_cols); SUMS (rows, 2) fp32 holds two-pass rows' c1, c2 sums between the passes.

    One-block rows read h and dy once, ROWS at a time. Two-pass rows read them twice (the least a row that does
    not fit on chip allows), both passes chunk-major: a weight chunk is read once per pass for the whole run, and
    the partials' chunk is summed in registers over the run and stored once (no read-modify-write of the buffer
    per row)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 rows make every offset below 64-bit
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    part = DW + pid * n_cols
    part_b = DB + pid * n_cols
    if SINGLE:
        _bwd_row_tiles(H, W, DY, DH, DX, MEAN, RSTD, part, part_b, row_start, row_end, stride_h, stride_dy,
                       stride_dh, n_cols, offset, BLOCK, ROWS, RMS, HAS_W, HAS_DH, WANT_DW, WANT_DB, CASTING)
    else:
        for start in range(0, n_cols, BLOCK):
            _bwd_row_sums(H, W, DY, SUMS, start, row_start, row_end, stride_h, stride_dy, n_cols, offset, MEAN,
                          RSTD, BLOCK, RMS, HAS_W)
        for start in range(0, n_cols, BLOCK):
            _bwd_columns(H, W, DY, DH, DX, MEAN, RSTD, SUMS, part, part_b, start, row_start, row_end, stride_h,
                         stride_dy, stride_dh, n_cols, offset, BLOCK, RMS, HAS_W, HAS_DH, WANT_DW, WANT_DB,
                         CASTING)


def _config(n_cols: int, backward: bool = False, lanes: int = 32):
    """(BLOCK, SINGLE, num_warps) of the forward's (or backward's) launch on a GPU family with warps of ``lanes``
    threads."""
    return _plan(n_cols, backward, lanes)[:3]


def _multi_row(n_cols: int) -> bool:
    """Whether forward programs take runs of rows sharing one load of weight and bias (one-block rows: aligned
    ones up to MAX_BLOCK, others up to MULTI_ROW_MAX_BLOCK) rather than one row each."""
    return _plan(n_cols, False, 32)[3]


def _plan(n_cols: int, backward: bool, lanes: int):
    """(BLOCK, SINGLE, num_warps, MULTI_ROW, programs per SM, ROWS) of a launch. Reads the module's limits at each call,
    so tests can lower them; the rest is cached per width, direction, family and limits."""
    return _launch_plan(n_cols, backward, lanes, *_limits())


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _launch_plan(n_cols, backward, lanes, max_block, backward_max_block, multi_row_max_block, long_block):
    """:func:`_plan` for the given limits. Aligned rows (VECTOR_ALIGNMENT) hold up to ``max_block`` in one block
    both ways and share weight and bias across a program's rows at every one-block width; unaligned ones stop at
    the narrower limits. A one-block backward takes ROWS rows a step (BACKWARD_TILE), so its programs are 16 warps
    wide at every width and one per SM fills the GPU. The forward's programs per SM: as many as an SM's registers
    hold at once (SM_ROW_ELEMENTS), at most FORWARD_PROGRAMS_PER_SM. Each program reads the parameters once (and a
    backward one adds a partial row per parameter), so no more programs than run at once."""
    aligned = n_cols % VECTOR_ALIGNMENT == 0
    one_block = max_block if aligned or not backward else min(max_block, backward_max_block)
    block, single, num_warps = row_config(n_cols, one_block, long_block, 8, lanes)
    multi_row = not backward and single and (aligned or block <= multi_row_max_block)
    rows = max(1, min(one_block, BACKWARD_TILE) // block) if backward and single else 1
    if backward:
        num_warps = warps_for(rows * block, 8, lanes)
        per_sm = 1 if single else BACKWARD_PROGRAMS_PER_SM
    else:
        per_sm = max(1, min(FORWARD_PROGRAMS_PER_SM, SM_ROW_ELEMENTS // block))
    return block, single, num_warps, multi_row, per_sm, rows


def _row_split(n_rows: int, device: torch.device, per_sm: int, share_of=None):
    """(programs, rows_per_program): each program takes a run of consecutive rows. On a GPU ``per_sm`` programs
    per SM; under the interpreter four, so tests see several programs and an uneven last run. ``share_of``: the
    backward's (bytes a row must move, partial bytes a program adds), whose programs :func:`_backward_programs`
    caps."""
    target = INTERPRETER_PROGRAMS if INTERPRETED else per_sm * sm_count(device)
    if share_of is not None:
        target = _backward_programs(n_rows, target, *share_of)
    return _split_rows(n_rows, target)


def _split_rows(n_rows: int, target: int):
    """(programs, rows_per_program) of runs of consecutive rows over at most ``target`` programs."""
    rows_per_program = max(1, cdiv(n_rows, max(1, min(n_rows, target))))
    return cdiv(n_rows, rows_per_program), rows_per_program


def _backward_programs(n_rows: int, slots: int, row_bytes: int, partial_bytes: int) -> int:
    """How many of ``slots`` programs a backward over ``n_rows`` rows runs: each program's fp32 partial rows of
    dweight/dbias (``partial_bytes``, written and read back by the reduction) are traffic beyond the minimum
    (``row_bytes`` a row), kept within PARTIAL_SHARE of it, but with at least half of ``slots``."""
    if PARTIAL_SHARE is None or not partial_bytes:
        return slots
    affordable = int(PARTIAL_SHARE * n_rows * row_bytes // partial_bytes)
    return min(slots, max(affordable, cdiv(slots, 2)))


def _backward_bytes(n_cols: int, itemsize: int, rms: bool, has_dh: bool, n_partials: int) -> Tuple[int, int]:
    """(bytes a backward row must move, partial bytes a program adds): h and dy (and the residual's dh) read, dx
    written, its fp32 stats read; one fp32 row per parameter gradient written and read back."""
    return (3 + has_dh) * itemsize * n_cols + 4 * (1 + (not rms)), n_partials * n_cols * 4 * 2


INTERPRETER_PROGRAMS = 4
PARTIAL_SHARE = 0.05
"""The backward's partial rows cost at most this share of its minimum bytes (issue #21's 1.05x), where that leaves
half of its one-per-SM programs: at 4096 rows of fp16 layer norm 76 programs, not 132 on an H100 (RMS norm and
fp32 stay at one per SM). None: one program per SM whatever the partials cost (``make gpu-check`` times both, so
that a GPU decides whether fewer programs cost bandwidth)."""


MULTI_ROW_MAX_BLOCK = 4096
"""Widest unaligned one-block forward that keeps weight and bias in registers across several rows without
spilling (aligned rows do up to MAX_BLOCK)."""
FORWARD_PROGRAMS_PER_SM = 8
"""Enough resident programs to hide load latency, while weight and bias are read once per program."""
BACKWARD_PROGRAMS_PER_SM = 2
"""Two-pass rows' backward (8-warp programs); one-block rows run one 16-warp program per SM: each backward program
adds an fp32 row of the dweight/dbias partial buffers, so as few as fill the GPU."""
SM_ROW_ELEMENTS = 16384
"""Row elements of forward programs an SM holds in registers at once: one 8192-wide forward program takes half
its 64K registers."""
BACKWARD_TILE = 4096
"""Elements of a one-block backward step: narrower rows go ROWS = BACKWARD_TILE // BLOCK at a time, so every
one-block backward program has 16 warps (8 x 1024 tiles spill: 52 bytes on sm_80)."""


def _forward_outputs(x, residual, n_cols, rms, absent_empty=True):
    """Uninitialised (y, h, mean, rstd). h without a residual (the input itself serves the backward) and mean for
    RMS norm are absent: empty tensors where ``absent_empty`` (custom-op outputs are tensors, none aliasing an
    input or another output), else None (the eager Function's, which allocates nothing for them)."""
    n_rows = x.numel() // n_cols
    return (empty_rows_like(x),
            empty_rows_like(x) if residual is not None else x.new_empty(0) if absent_empty else None,
            x.new_empty(n_rows, dtype=torch.float32) if not rms
            else x.new_empty(0, dtype=torch.float32) if absent_empty else None,
            x.new_empty(n_rows, dtype=torch.float32))


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _launch_constants(backward, n_cols, lanes, limits, rms, casting, *flags):
    """(programs per SM, or 0 for one program a row; the kernel's constexpr keyword arguments and num_warps) of a
    forward (flags: HAS_RES, HAS_W, HAS_B) or backward (flags: HAS_W, HAS_DH, WANT_DW, WANT_DB) launch: computed
    once per width, family, limits and flags, so a call builds no plan of its own."""
    block, single, num_warps, multi_row, per_sm, rows = _launch_plan(n_cols, backward, lanes, *limits)
    names = ("HAS_W", "HAS_DH", "WANT_DW", "WANT_DB") if backward else ("HAS_RES", "HAS_W", "HAS_B")
    constants = dict(zip(names, flags), BLOCK=block, SINGLE=single, RMS=rms, CASTING=casting, num_warps=num_warps)
    if backward:
        return per_sm, dict(constants, ROWS=rows)
    return (per_sm if multi_row or not single else 0), dict(constants, MULTI_ROW=multi_row)


def _limits():
    """The module's one-block and chunk limits, read at each call so that tests can lower them."""
    return MAX_BLOCK, BACKWARD_MAX_BLOCK, MULTI_ROW_MAX_BLOCK, LONG_BLOCK


def _vector(p: Optional[torch.Tensor], stand_in: torch.Tensor) -> torch.Tensor:
    """A weight or bias as the kernels read it (n_cols contiguous elements): a contiguous one as it is; absent,
    ``stand_in`` (never read: its flag is off)."""
    if p is None:
        return stand_in
    return p if p.is_contiguous() else p.reshape(-1).contiguous()


def _forward(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], n_cols: int, eps: float, rms: bool, offset: float,
                casting: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h = x + residual or empty, mean (layer norm) or empty, rstd) over rows of n_cols elements."""
    outputs = _forward_outputs(x, residual, n_cols, rms)
    _launch_forward(x, residual, weight, bias, n_cols, eps, rms, offset, casting, *outputs)
    return outputs


def _launch_forward(x, residual, weight, bias, n_cols, eps, rms, offset, casting, y, h, mean, rstd) -> None:
    """The forward's launch into its outputs (h unused without a residual, mean for RMS norm)."""
    n_rows = rstd.shape[0]
    if n_rows:
        x2d, stride_x = rows_and_stride(x, n_cols)
        has_res = residual is not None
        res2d, stride_res = rows_and_stride(residual, n_cols) if has_res else (x2d, stride_x)
        per_sm, constants = _launch_constants(False, n_cols, lanes_of(x.device), _limits(), rms, casting, has_res,
                                              weight is not None, bias is not None)
        programs, rows_per_program = _row_split(n_rows, x.device, per_sm) if per_sm else (n_rows, 1)
        with launch_device(x):
            _direct.run(_norm_fwd, (x2d, res2d, _vector(weight, x2d), _vector(bias, x2d), y, h if has_res else x2d,
                                    mean if not rms else rstd, rstd, stride_x, stride_res, n_rows, n_cols,
                                    rows_per_program, eps, offset), (programs,), **constants)


def _backward(h: torch.Tensor, weight: Optional[torch.Tensor], dy: torch.Tensor, dh: Optional[torch.Tensor],
              mean: torch.Tensor, rstd: torch.Tensor, n_cols: int, rms: bool, offset: float, casting: int,
              want_dw: bool, want_db: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh total, fp32 dweight (n_cols) or empty, fp32 dbias (n_cols) or empty) from the normalised input h: the
    custom op's form of :func:`_launch_backward` (its outputs are tensors)."""
    dx, dw, db = _launch_backward(h, weight, dy, dh, mean, rstd, n_cols, rms, offset, casting, want_dw, want_db)
    return dx, (dw if want_dw else rstd.new_empty(0)), (db if want_db else rstd.new_empty(0))


def _launch_backward(h, weight, dy, dh, mean, rstd, n_cols, rms, offset, casting, want_dw, want_db):
    """(dh total, fp32 dweight or None, fp32 dbias or None): as :func:`_backward`, with no tensor for a gradient
    nobody asked for (the eager path's)."""
    # the kernel reads the statistics at MEAN + row: a saved-tensors hook may hand them back in another layout
    rstd = rstd.contiguous()
    mean = rstd if rms else mean.contiguous()
    dx = empty_rows_like(h)
    n_rows = rstd.shape[0]
    per_sm, constants = _launch_constants(True, n_cols, lanes_of(h.device), _limits(), rms, casting,
                                          weight is not None, dh is not None, want_dw, want_db)
    share_of = _backward_bytes(n_cols, h.element_size(), rms, dh is not None, want_dw + want_db)
    programs, rows_per_program = _row_split(n_rows, h.device, per_sm, share_of)
    # per-program fp32 partial sums (programs, n_cols) of each wanted parameter gradient; rstd stands in for the
    # others (fp32 like them, never written), and for the two-pass rows' (c1, c2) sums one-block rows do not need
    dw = rstd.new_empty((programs, n_cols)) if want_dw else rstd
    db = rstd.new_empty((programs, n_cols)) if want_db else rstd
    sums = rstd if constants["SINGLE"] else rstd.new_empty((n_rows, 2))
    if n_rows:
        h2d, stride_h = rows_and_stride(h, n_cols)
        dy2d, stride_dy = rows_and_stride(dy, n_cols)
        dh2d, stride_dh = rows_and_stride(dh, n_cols) if dh is not None else (dy2d, stride_dy)
        with launch_device(h):
            _direct.run(_norm_bwd, (h2d, _vector(weight, h2d), dy2d, dh2d, dx, mean, rstd, dw, db, sums, stride_h,
                                    stride_dy, stride_dh, n_rows, n_cols, rows_per_program, offset), (programs,),
                        **constants)
    # the one deterministic reduction of the partial sums
    return dx, (dw.sum(0) if want_dw else None), (db.sum(0) if want_db else None)


# The traced path: torch.library custom ops over the same launches, so that torch.compile treats each launch as one
# opaque op, also on CPU, where it cannot trace into an interpreted kernel.
_forward_op = torch.library.custom_op("kernels::norm_forward", _forward, mutates_args=())
_backward_op = torch.library.custom_op("kernels::norm_backward", _backward, mutates_args=())


@_forward_op.register_fake
def _(x, residual, weight, bias, n_cols, eps, rms, offset, casting):
    return _forward_outputs(x, residual, n_cols, rms)


@_backward_op.register_fake
def _(h, weight, dy, dh, mean, rstd, n_cols, rms, offset, casting, want_dw, want_db):
    return (torch.empty(h.shape, dtype=h.dtype, device=h.device),
            *(torch.empty(n_cols if want else 0, dtype=torch.float32, device=h.device) for want in (want_dw, want_db)))


def _save(ctx, x, residual, weight, bias, n_cols, eps, rms, offset, casting, output) -> tuple:
    """Save what the backward reads: the normalised input (h, or x without a residual), weight, mean, rstd (those
    tensors are returned), and the configuration with the parameters' dtypes and shapes (eps last: only a
    differentiable backward reads it)."""
    _, h, mean, rstd = output
    saved = (h if residual is not None else x, weight, mean, rstd)
    ctx.save_for_backward(*saved)
    ctx.config = (n_cols, rms, offset, casting, residual is not None,
                  weight if weight is None else (weight.dtype, weight.shape),
                  bias if bias is None else (bias.dtype, bias.shape), eps)
    return saved


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, output)
    _mark_non_differentiable(ctx, output, inputs[1] is not None)


def _mark_non_differentiable(ctx, output, has_residual: bool) -> None:
    """Mark mean and rstd (the statistics the backward reads), and h where neither x nor the residual needs a
    gradient: h = x + residual has no path to the weight or bias, so it needs grad only as torch's add would (a
    norm-only fine-tune would otherwise carry a graph down the whole residual stream). Under forward-mode AD h
    stays differentiable: its tangent is the inputs', which the mark would drop."""
    _, h, mean, rstd = output
    stats = (rstd,) if mean is None else (mean, rstd)  # RMS norm's mean is None in eager
    if has_residual and not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or forward_ad_active()):
        ctx.mark_non_differentiable(h, *stats)
    else:
        ctx.mark_non_differentiable(*stats)


def _gradients(backward, ctx, dy, dh):
    """The gradients of x, residual, weight and bias by ``backward`` (the launches, or their custom op) from the
    saved context. The eager path does not materialise gradients: an output no gradient reached comes as None
    (mean, rstd and an unused h cost no zero tensors)."""
    h, weight, mean, rstd = ctx.saved_tensors
    n_cols, rms, offset, casting, has_res, weight_meta, bias_meta = ctx.config[:7]
    dh = dh if has_res else None
    if dy is None:  # only h's gradient reached here (or none): x and residual get it as torch's add gives it, and
        # weight and bias no gradient, as in torch, where they have no path to h (a zero one would be a step for
        # an optimizer's momentum and weight decay); no launch
        return dh, dh, None, None
    want_dw, want_db = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    dx, dw, db = backward(h, weight, dy, dh, mean, rstd, n_cols, rms, offset, casting, want_dw, want_db)
    # x and residual enter h = x + residual alike, so both receive dh (as torch's add gives both its grad)
    return (dx, (dx if has_res else None), _param_grad(dw, weight_meta) if want_dw else None,
            _param_grad(db, bias_meta) if want_db else None)


def _param_grad(grad: torch.Tensor, meta) -> torch.Tensor:
    """The fp32 (n_cols) gradient of a parameter in its (dtype, shape)."""
    dtype, shape = meta
    grad = grad.to(dtype)
    return grad if grad.shape == shape else grad.view(shape)


_forward_op.register_autograd(lambda ctx, dy, dh, *_: (*_gradients(_backward_op, ctx, dy, dh), *(None,) * 5),
                              setup_context=_setup_context)


def _eager_forward(x, residual, weight, bias, config):
    """:func:`_forward` with its scalars in one tuple, ``config`` = (n_cols, eps, rms, offset, casting):
    ``autograd.Function.apply`` handles each argument on every call, so the eager path passes five, not nine.
    Absent outputs (h without a residual, mean for RMS norm) are None."""
    n_cols, _, rms = config[:3]
    outputs = _forward_outputs(x, residual, n_cols, rms, absent_empty=False)
    _launch_forward(x, residual, weight, bias, *config, *outputs)
    return outputs


def _setup_eager(ctx, inputs, output):
    x, residual, weight, bias, config = inputs
    saved = _save(ctx, x, residual, weight, bias, *config, output)
    ctx.set_materialize_grads(False)
    if forward_ad_active():  # a jvp runs only inside a forward-AD level or transform: none, nothing to save
        ctx.save_for_forward(*saved)
    _mark_non_differentiable(ctx, output, residual is not None)


def _statistics(h32: torch.Tensor, rms: bool, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(centred h, rstd (rows, 1)) of fp32 rows ``h32`` in torch ops: the kernels' mean and rstd, recomputed with
    a graph (the kernels save theirs without one, so a derivative of a gradient or of a tangent would miss every
    term through them)."""
    centred = h32 if rms else h32 - h32.mean(-1, keepdim=True)
    return centred, torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


def _jvp(ctx, dx, dresidual, dweight, dbias, *_):
    """Tangents of (y, h): with xhat = (h - mean) * rstd and dh = dx + dresidual,
    dy = rstd * (dh' - xhat * mean(xhat * dh')) * (offset + weight) + xhat * dweight + dbias, where
    dh' = dh - mean(dh) (layer norm) or dh (RMS norm). Plain torch math in fp32 rather than a kernel, with the
    statistics recomputed from h (:func:`_statistics`), so that reverse mode differentiates the tangent in turn
    (a nested jvp runs torch's ops instead: :func:`kernels._runtime.nested_forward_ad`); the casting modes'
    roundings count as identities."""
    h, weight, _, _ = ctx.saved_tensors
    n_cols, rms, offset, _, has_res = ctx.config[:5]
    rows = (-1, n_cols)
    centred, rstd = _statistics(h.reshape(rows).float(), rms, ctx.config[-1])
    xhat = centred * rstd
    dy = torch.zeros_like(xhat)
    dh = dx if dresidual is None else dresidual if dx is None else dx + dresidual
    if dh is not None:
        dy = _projected(dh.reshape(rows).float(), xhat, rstd, rms)
        if weight is not None:
            dy = dy * (offset + weight.reshape(-1).float())
    if dweight is not None:
        dy = dy + xhat * dweight.reshape(-1).float()
    if dbias is not None:
        dy = dy + dbias.reshape(-1).float()
    dh_out = (dh if dh is not None else torch.zeros_like(h)) if has_res else None
    return dy.to(h.dtype).view(h.shape), dh_out, None, None


def _projected(d: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, rms: bool) -> torch.Tensor:
    """rstd * (d' - xhat * mean(xhat * d')) over rows of fp32 (rows, n) ``d``, d' = d - mean(d) (layer norm) or d
    (RMS norm): the norm's Jacobian over h without the weight, symmetric, so both its JVP and its VJP."""
    if not rms:
        d = d - d.mean(-1, keepdim=True)
    return rstd * (d - xhat * (xhat * d).mean(-1, keepdim=True))


def _differentiable_backward(eps: float):
    """A backward with :func:`_launch_backward`'s arguments and results in plain torch ops in fp32, itself
    differentiable (and fine with torch.func's wrapped tensors): mean and rstd, saved without a graph, are
    recomputed from h with ``eps`` (:func:`_statistics`). The casting modes' roundings count as identities but
    "llama"'s rounding of xhat in dweight, as in the kernels."""
    def backward(h, weight, dy, dh, mean, rstd, n_cols, rms, offset, casting, want_dw, want_db):
        rows = (-1, n_cols)
        centred, rstd = _statistics(h.reshape(rows).float(), rms, eps)
        xhat = centred * rstd
        dy32 = dy.reshape(rows).float()
        dx = _projected(dy32 if weight is None else dy32 * (offset + weight.reshape(-1).float()), xhat, rstd, rms)
        if dh is not None:
            dx = dx + dh.reshape(rows).float()
        factor = xhat.to(h.dtype).float() if casting == CASTING_MODES["llama"] else xhat
        return (dx.to(h.dtype).view(h.shape), (dy32 * factor).sum(0) if want_dw else None,
                dy32.sum(0) if want_db else None)
    return backward


def _eager_backward(ctx, dy, dh, *_):
    """The eager Function's backward: the kernels, or under create_graph=True (double backward, torch.func.grad /
    jacrev: the only time grad mode is on in a backward) :func:`_differentiable_backward`, since the kernels'
    gradients carry no graph and a second derivative would silently miss every term through this norm."""
    backward = _differentiable_backward(ctx.config[-1]) if torch.is_grad_enabled() else _launch_backward
    return (*_gradients(backward, ctx, dy, dh), None)


_norm_function = autograd_function("FusedNorm", _eager_forward, _setup_eager, _eager_backward, _jvp)
"""The eager path (``kernels/_autograd.py``): reverse mode and forward mode (``torch.func.jvp``,
``torch.autograd.forward_ad``) without the custom op's dispatch; torch.compile cannot trace a Function with a jvp,
so it gets the custom op."""


_TORCH_FLOATS = (*FLOAT_DTYPES, torch.float64)
"""Dtypes the functions take: the kernels' own, and float64, which runs torch's op."""
_MACHINE_EPS = {dtype: torch.finfo(torch.promote_types(dtype, torch.float32)).eps for dtype in _TORCH_FLOATS}
"""RMS norm's default eps per input dtype, looked up once: the machine epsilon of the dtype it computes in, fp32's
for fp16/bf16 (as torch's F.rms_norm and nn.RMSNorm do, whose documentation says ``finfo(x.dtype)``: bf16's would
be 6e4 times as large, and change the output of a row with mean(x^2) below about 0.1)."""


def _check_rms_options(offset, casting_mode) -> None:
    """Validate RMS norm's ``offset`` (a finite real) and ``casting_mode``."""
    # a plain float is judged without the numbers ABCs (every call of an RMS norm passes here)
    if type(offset) is not float and (isinstance(offset, bool) or not isinstance(offset, numbers.Real)):
        raise TypeError(f"offset must be a real number, got {type(offset).__name__}")
    if not -math.inf < offset < math.inf:  # math.isfinite, which torch.compile cannot trace on a symbolic float
        raise ValueError(f"offset must be finite, got {offset}")
    if not isinstance(casting_mode, str) or casting_mode not in CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {tuple(CASTING_MODES)}, got {casting_mode!r}")


def _as_shape(normalized_shape) -> tuple:
    """``normalized_shape`` (an int or a sequence of ints) as a tuple; TypeError otherwise."""
    if type(normalized_shape) is int:  # the common cases first: an int, a module's tuple of one int
        return (normalized_shape,)
    if type(normalized_shape) is tuple and len(normalized_shape) == 1 and type(normalized_shape[0]) is int:
        return normalized_shape
    if is_integer(normalized_shape):
        normalized_shape = (normalized_shape,)
    if (not isinstance(normalized_shape, (tuple, list, torch.Size))
            or not all(is_integer(size, tensor=True) for size in normalized_shape)):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    return tuple(map(int, normalized_shape))  # numpy's integers and 0-d integer tensors as torch takes them


def _check(x, normalized_shape, residual, weight, bias, eps, rms: bool, offset, casting_mode) -> tuple:
    """Validate before any launch; return the normalized shape as a tuple. x is named as its function names it:
    ``input`` (torch's name) in layer_norm and rms_norm, ``x`` in the add_* functions."""
    x_name = "input" if residual is None else "x"
    check_tensor(x_name, x, dtypes=_TORCH_FLOATS)
    shape = _as_shape(normalized_shape)
    if not shape or x.dim() < len(shape) or x.shape[x.dim() - len(shape):] != shape:  # (a Size is a tuple)
        raise ValueError(f"normalized_shape {shape} must have at least one dim and equal the trailing dims of "
                         f"{x_name} (shape {tuple(x.shape)})")
    if residual is not None:
        check_tensor("residual", residual, dtypes=_TORCH_FLOATS)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        check_same("device", x=x, residual=residual)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, dtypes=_TORCH_FLOATS)
            if t.shape != shape:
                raise ValueError(f"{name} must have shape normalized_shape {shape}, got {tuple(t.shape)}")
            if t.device != x.device:
                check_same("device", **{x_name: x, name: t})
    # a plain float eps is judged without the numbers ABCs
    if type(eps) is not float and ((eps is None and not rms) or (eps is not None and (
            isinstance(eps, bool) or not isinstance(eps, numbers.Real)))):
        raise TypeError(f"eps must be a real number{'' if not rms else ' or None'}, got {type(eps).__name__}")
    if eps is not None and not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rms:
        _check_rms_options(offset, casting_mode)
    return shape


ShapeArg = Union[int, Sequence[int]]


def torch_rms_norm(x: torch.Tensor, normalized_shape: ShapeArg, weight: Optional[torch.Tensor] = None,
                   eps: Optional[float] = None, *, offset: float = 0.0,
                   casting_mode: str = DEFAULT_CASTING_MODE) -> torch.Tensor:
    """:func:`rms_norm` in plain torch ops, rounding where the kernels round (float64 stays float64): what runs
    where the kernels cannot, and what ``transformer.patch`` tells norm classes apart with. Without an offset, the
    default mode is ``torch.nn.functional.rms_norm`` itself. No argument checks: torch's ops raise their own."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if offset == 0 and casting_mode == DEFAULT_CASTING_MODE:
        return F.rms_norm(x, shape, weight, eps)
    eps = _MACHINE_EPS[x.dtype] if eps is None else eps
    dims = tuple(range(-len(shape), 0))
    wide = torch.promote_types(x.dtype, torch.float32)
    if casting_mode == "none":
        # rsqrt rounded once to x's dtype, as in the kernels (torch's bf16 rsqrt on CPU can be an ulp off)
        y = x * torch.rsqrt(((x * x).mean(dims, keepdim=True) + eps).to(wide)).to(x.dtype)
        return y if weight is None else y * (offset + weight.to(x.dtype))
    y = x.to(wide) * torch.rsqrt(x.to(wide).pow(2).mean(dims, keepdim=True) + eps)
    if casting_mode == "llama":
        y = y.to(x.dtype)
    if weight is not None:
        y = y * (offset + weight.to(wide))
    return y.to(x.dtype)


def _torch_norm(x, residual, shape, weight, bias, eps, rms, offset, casting_mode, nested_jvp=False):
    """torch's own ops for tensors the kernels do not take (float64, meta, another device than this process's
    kernels run on): ``F.layer_norm``, and :func:`torch_rms_norm`. Layer norm parameters of another dtype than
    h, which ``F.layer_norm`` refuses (``F.rms_norm`` takes them), are computed in the dtype they promote to
    (float64 where any is), the output in h's, as the kernels' mixes. With ``nested_jvp`` (a jvp of a jvp)
    layer norm is written out in torch ops (``kernels.reference``): F.layer_norm's forward-mode formula treats
    mean and rstd as constants, so its second-order tangent is wrong."""
    h = x if residual is None else x + residual
    if rms:
        y = torch_rms_norm(h, shape, weight, eps, offset=offset, casting_mode=casting_mode)
    elif not nested_jvp and all(p is None or p.dtype == h.dtype for p in (weight, bias)):
        y = F.layer_norm(h, shape, weight, bias, eps)
    else:
        wide = functools.reduce(torch.promote_types, [t.dtype for t in (h, weight, bias) if t is not None],
                                torch.float32)
        norm = reference.layer_norm if nested_jvp else F.layer_norm
        y = norm(h.to(wide), shape, *(None if p is None else p.to(wide) for p in (weight, bias)), eps).to(h.dtype)
    return y if residual is None else (y, h)


def _on_local_rows(x, residual, shape, weight, bias, eps, rms, offset, casting_mode):
    """The norm of DTensor inputs, as torch's own norms on DTensors: x (and residual) are redistributed so that no
    normalized dim is sharded or partial (an all-gather of a tensor-parallel hidden dim; a sharding of the rows is
    kept), a DTensor weight and bias replicated; each rank normalises its local rows, and y (and h) come back as
    DTensors in those placements. Parameter gradients are Partial over the mesh dims that shard the rows (each
    rank's rows add their share); plain weight and bias tensors are this rank's own. Collectives only, no host
    sync."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    x_name = "input" if residual is None else "x"  # as the function names it (:func:`_check`)
    named = [(x_name, x), ("residual", residual), ("weight", weight), ("bias", bias)]
    plain = [name for name, t in named[:2] if t is not None and not isinstance(t, DTensor)]
    if plain:  # (a DTensor weight beside a plain x: say, a module FSDP2 sharded, called without its hooks)
        dtensors = [name for name, t in named if isinstance(t, DTensor)]
        raise TypeError(f"{' and '.join(plain)} must be {'a DTensor' if len(plain) == 1 else 'DTensors'} when "
                        f"{' and '.join(dtensors)} {'is one' if len(dtensors) == 1 else 'are'}, got "
                        + ", ".join(f"{name}: {type(t).__name__}" for name, t in named if t is not None))
    mesh, n_row_dims = x.device_mesh, x.dim() - len(shape)
    placements = [p if isinstance(p, Shard) and p.dim % x.dim() < n_row_dims else Replicate() for p in x.placements]
    param_grads = [Partial() if isinstance(p, Shard) else Replicate() for p in placements]

    def local(name, t, targets, grad_placements=None):
        if not isinstance(t, DTensor):
            return t
        if t.device_mesh != mesh:
            raise ValueError(f"{name} must be on x's device mesh {mesh}, got {t.device_mesh}")
        if tuple(t.placements) != tuple(targets):  # (a no-op redistribute would turn Partial gradients Replicate)
            t = t.redistribute(mesh, targets)
        return t.to_local(grad_placements=grad_placements)

    replicated = [Replicate()] * mesh.ndim
    y = _norm(local("x", x, placements), local("residual", residual, placements), shape,
              local("weight", weight, replicated, param_grads), local("bias", bias, replicated, param_grads), eps,
              rms, offset, casting_mode)
    stride = torch.empty(x.shape, device="meta").stride()
    outputs = [DTensor.from_local(t, mesh, placements, run_check=False, shape=x.shape, stride=stride)
               for t in ((y,) if residual is None else y)]
    return outputs[0] if residual is None else tuple(outputs)


def _kernel_dtypes(x, weight, bias) -> bool:
    """Whether x and the parameters (None: absent; a residual has x's dtype by now) are all of the kernels'
    dtypes."""
    return (x.dtype in FLOAT_DTYPES and (weight is None or weight.dtype in FLOAT_DTYPES)
            and (bias is None or bias.dtype in FLOAT_DTYPES))


def _kernels_take(x, weight, bias) -> bool:
    """Whether the kernels run on x and the parameters: :func:`_kernel_dtypes`, on the device this process's
    kernels run on (else :func:`kernel_runs_on`'s one-time warning). :func:`_check` put them all on x's device,
    so x's device answers for them."""
    return _kernel_dtypes(x, weight, bias) and kernel_runs_on(x)


_OVERFLOW = {torch.float32: float.fromhex("0x1.ffffffp127"), torch.bfloat16: float.fromhex("0x1.ffp127"),
             torch.float16: 65520.0}
"""The smallest value each dtype rounds to inf: its largest finite value plus half an ulp."""


def _norm(x, residual, normalized_shape, weight, bias, eps, rms, offset=0.0, casting_mode=DEFAULT_CASTING_MODE):
    shape = _check(x, normalized_shape, residual, weight, bias, eps, rms, offset, casting_mode)
    if DTENSOR is not None and (isinstance(x, DTENSOR) or isinstance(residual, DTENSOR)
                                or isinstance(weight, DTENSOR) or isinstance(bias, DTENSOR)):
        return _on_local_rows(x, residual, shape, weight, bias, eps, rms, offset, casting_mode)
    if residual is not None and residual.dtype != x.dtype:  # h = x + residual in the promoted dtype, as torch's add
        # (of same-shape tensors, torch.result_type's answer, which torch.compile(fullgraph=True) cannot trace)
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    # CUDA autocast runs torch's layer_norm and rms_norm in fp32; an offset or another casting mode is Liger's and
    # Hugging Face's norm instead, plain elementwise code that autocast leaves in x's dtype (with its roundings)
    if (not rms or (offset == 0 and casting_mode == DEFAULT_CASTING_MODE)) and autocasts_to_fp32(x):
        if residual is not None:  # torch adds in the inputs' dtype, then normalises in fp32
            h = x + residual
            return _norm(h.float(), None, shape, weight, bias, eps, rms, offset, casting_mode), h
        x = x.float()
    if rms and eps is None:
        eps = _MACHINE_EPS[x.dtype]
    n_cols = shape[0] if len(shape) == 1 else math.prod(shape)
    # rows of no element (normalized_shape (0,)): torch's ops give the empty result and its gradients
    # (under torch.vmap and jacfwd, torch's ops: vmap batches them, and a launch cannot read its batched tensors;
    # so under any torch.func transform while torch.compile traces: transform_needs_torch_ops);
    # eps = inf in the dtype rstd is computed in (rstd 0 in every row, an output of zeros or the bias): torch's ops
    # too, whose gradients are 0 where the kernels' backward reads rstd 0 as an overflowed row and gives NaN
    eps_overflows = eps >= _OVERFLOW.get(x.dtype if rms and casting_mode == "none" else torch.float32, math.inf)
    if not n_cols or eps_overflows or not _kernels_take(x, weight, bias) or transform_needs_torch_ops():
        out = _torch_norm(x, residual, shape, weight, bias, eps, rms, offset, casting_mode)
        if n_cols and not eps_overflows and holds_no_data(x) and _kernel_dtypes(x, weight, bias):
            # shapes only (meta, an eager fake tensor): laid out as the kernels lay out a real call's y and h,
            # contiguous, where torch's rms_norm and add keep a channels_last or permuted x's layout
            out = out.contiguous() if residual is None else tuple(t.contiguous() for t in out)
        return out
    if nested_forward_ad():  # a jvp of a jvp, where the Function's jvp would give a zero second-order tangent
        return _torch_norm(x, residual, shape, weight, bias, eps, rms, offset, casting_mode, nested_jvp=True)
    config = (n_cols, float(eps), rms, float(offset), CASTING_MODES[casting_mode])
    if torch.compiler.is_compiling():
        y, h, _, _ = _forward_op(x, residual, weight, bias, *config)
    else:
        y, h, _, _ = _norm_function(x, residual, weight, bias, config)
    return y if residual is None else (y, h)


def layer_norm(input: torch.Tensor, normalized_shape: ShapeArg, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.layer_norm``, fused: same signature (argument names included), result (input's shape
    and dtype) and gradients.

    input: (..., *normalized_shape), fp16/bf16/fp32; weight, bias: normalized_shape, any of those dtypes (their
    gradients come back in it). float64 tensors, and tensors the kernels cannot run on in this process (meta,
    or another device: then with a one-time warning), run ``torch.nn.functional.layer_norm`` itself. Under CUDA
    autocast, fp16/bf16 inputs are normalised in fp32, as autocast does for torch's layer_norm.
    """
    return _norm(input, None, normalized_shape, weight, bias, eps, rms=False)


def rms_norm(input: torch.Tensor, normalized_shape: ShapeArg, weight: Optional[torch.Tensor] = None,
             eps: Optional[float] = None, *, offset: float = 0.0,
             casting_mode: str = DEFAULT_CASTING_MODE) -> torch.Tensor:
    """``torch.nn.functional.rms_norm``, fused, with Liger-Kernel's ``offset`` and ``casting_mode``:
    ``y = x / sqrt(mean(x^2) + eps) * (offset + weight)``; ``eps`` defaults to torch's: the machine epsilon
    of fp32 (float64's for float64 x), fp16/bf16 included.

    ``offset=1.0`` is Gemma's ``1 + weight``; without a weight no offset applies (``y = x_hat``, as Liger-Kernel's
    ``elementwise_affine=False``). ``casting_mode``: "gemma" (the default: everything
    in fp32, cast once at the end, which is exactly ``torch.nn.functional.rms_norm``), "llama" (rstd in fp32,
    x * rstd rounded to x's dtype before the weight, as Hugging Face's LlamaRMSNorm) or "none" (every step in x's
    dtype); they differ only for fp16/bf16. Shapes, dtypes and fallback as :func:`layer_norm` (the fallback of an
    offset or another mode is that mode's math in torch ops). CUDA autocast takes fp16/bf16 inputs to fp32 only
    for torch's function (no offset, "gemma"): with an offset or another mode the output is in x's dtype, as
    Liger-Kernel's and Hugging Face's norms, which autocast does not touch.
    """
    return _norm(input, None, normalized_shape, weight, None, eps, True, offset, casting_mode)


def _check_residual(residual, function: str) -> None:
    """TypeError unless the residual the add_* functions need (and return (y, h) for) was given."""
    if residual is None:
        raise TypeError(f"{function}: residual must be a tensor of x's shape, got None (the norm alone is "
                        f"{function.removeprefix('add_')})")


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeArg,
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 1e-5):
    """Pre-norm block step in one kernel: ``h = x + residual``, returns ``(layer_norm(h, ...), h)``; x and
    residual (same shape) are each read once. Of different dtypes, both go to the one torch's add promotes to."""
    _check_residual(residual, "add_layer_norm")
    return _norm(x, residual, normalized_shape, weight, bias, eps, rms=False)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeArg,
                 weight: Optional[torch.Tensor] = None, eps: Optional[float] = None, *, offset: float = 0.0,
                 casting_mode: str = DEFAULT_CASTING_MODE):
    """``h = x + residual``; returns ``(rms_norm(h, ...), h)`` from one kernel, as :func:`add_layer_norm`."""
    _check_residual(residual, "add_rms_norm")
    return _norm(x, residual, normalized_shape, weight, None, eps, True, offset, casting_mode)


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in ``torch.nn.LayerNorm`` (same constructor, parameters and state_dict keys) on the fused kernel.

    ``forward(input, residual=None)`` (torch's name): with a residual, returns ``(y, input + residual)`` from
    :func:`add_layer_norm`.
    """

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if torch.jit.is_scripting():  # TorchScript compiles torch's op, not the kernels' Python; residual: eager only
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._fused(input, residual)

    @torch.jit.unused
    def _fused(self, input: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        if residual is None:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in ``torch.nn.RMSNorm`` (same constructor, parameters and state_dict keys) on the fused kernel, plus
    :func:`rms_norm`'s keyword-only ``offset`` and ``casting_mode``. The weight starts at ``1 - offset``, so a new
    module scales by one whatever the offset (as Gemma's zeros with its offset 1).

    ``promote_output=True`` is Hugging Face's Llama-style ``weight * x_hat.to(x.dtype)``: where torch promotes x's
    and the weight's dtypes to another than x's (bf16 x, fp32 weight: fp32), x_hat in x's dtype is multiplied by
    ``offset + weight`` in that dtype, which the output keeps; else (the default: torch's and Liger-Kernel's) the
    output is in x's dtype.

    ``forward(x, residual=None)`` (torch's name): with a residual, returns ``(y, x + residual)`` from
    :func:`add_rms_norm`.
    """

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, offset: float = 0.0, casting_mode: str = DEFAULT_CASTING_MODE,
                 promote_output: bool = False):
        _check_rms_options(offset, casting_mode)
        if not isinstance(promote_output, bool):
            raise TypeError(f"promote_output must be a bool, got {type(promote_output).__name__}")
        # before torch's __init__: reset_parameters reads the offset
        self.offset, self.casting_mode, self.promote_output = offset, casting_mode, promote_output
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            torch.nn.init.constant_(self.weight, 1.0 - self.offset)

    def _weight_after(self, x, residual) -> bool:
        """Whether ``promote_output`` (on) multiplies by the weight after the norm, in another dtype than x's; the
        weight, which the norm then does not see, is checked with the other arguments first."""
        if not (self.weight is not None and isinstance(x, torch.Tensor)
                and torch.promote_types(x.dtype, self.weight.dtype) != x.dtype):
            return False
        _check(x, self.normalized_shape, residual, self.weight, None, self.eps, True, self.offset, self.casting_mode)
        return True

    def extra_repr(self) -> str:
        promote = ", promote_output=True" if self.promote_output else ""
        return f"{super().extra_repr()}, offset={self.offset}, casting_mode={self.casting_mode!r}{promote}"

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if torch.jit.is_scripting():  # TorchScript compiles torch's op, not the kernels' Python; residual: eager only
            if self.offset != 0.0 or self.casting_mode != "gemma" or self.promote_output:
                raise RuntimeError("a scripted kernels.RMSNorm computes torch.nn.RMSNorm's function: offset=0.0, "
                                   "casting_mode='gemma' and promote_output=False only (use torch.jit.trace, "
                                   "torch.export or torch.compile)")
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return self._fused(x, residual)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        weight_after = self.promote_output and self._weight_after(x, residual)  # (off: one attribute read)
        weight = None if weight_after else self.weight
        if residual is None:
            y = rms_norm(x, self.normalized_shape, weight, self.eps, offset=self.offset, casting_mode=self.casting_mode)
        else:
            y, h = add_rms_norm(x, residual, self.normalized_shape, weight, self.eps, offset=self.offset,
                                casting_mode=self.casting_mode)
        if weight_after:  # x_hat in x's dtype, times offset + weight in the promoted one (not in the weight's)
            y = (self.offset + self.weight.to(torch.promote_types(x.dtype, self.weight.dtype))) * y
        return y if residual is None else (y, h)


@register_builds
def _builds():
    """Per family table (``kernels/_rows.py``), dtype, layer norm and RMS norm (each casting mode): the forward
    (plain and with residual, all affine parameters) at a small one-block row, the widest unaligned rows sharing
    weight and bias across rows, the widest one-block rows (aligned: sharing them too; unaligned: one row a program)
    and on the two-pass path; the backward (every gradient) at a small row, the widest unaligned and aligned
    one-block rows and on the two-pass path. A width that is a multiple of VECTOR_ALIGNMENT is declared divisible
    by 16, as Triton specialises it at launch (its 128-bit loads are what keep the aligned 8192 block spill-free).
    No autotuning: each width has one config, so the builds in the default casting mode are defaults (held to the
    no-spill bar); the other modes differ in roundings only. Each build's variant is its norm, "layer" or "rms"
    (the build report's family)."""
    modes = [DEFAULT_CASTING_MODE] + [mode for mode in CASTING_MODES if mode != DEFAULT_CASTING_MODE]
    norms = [("layer", False, DEFAULT_CASTING_MODE)] + [("rms", True, mode) for mode in modes]
    fp32_args = {"MEAN": "*fp32", "RSTD": "*fp32", "offset": "fp32"}
    forward_widths = (1024, MULTI_ROW_MAX_BLOCK - 1, MAX_BLOCK - 1, MAX_BLOCK, MAX_BLOCK + 1)
    backward_widths = (1024, BACKWARD_MAX_BLOCK - 1, BACKWARD_MAX_BLOCK + 1, MAX_BLOCK)
    builds = []

    def add(fn, families, lanes, ty, norm, rms, mode, n_cols, flags, types, residual_label):
        backward = fn is _norm_bwd
        block, single, num_warps, _, _, rows = _plan(n_cols, backward, lanes)
        aligned = n_cols % VECTOR_ALIGNMENT == 0
        label = (f"{ty} {norm} BLOCK={block}{f' ROWS={rows}' * (rows > 1)}{'' if single else ' two-pass'}"
                 f"{' unaligned' * (not aligned)}{f' {mode}' * rms}{residual_label}{' wave64' * (lanes == 64)}")
        constexprs = dict(flags, BLOCK=block, SINGLE=single, RMS=rms, CASTING=CASTING_MODES[mode])
        if backward:
            constexprs["ROWS"] = rows
        build = declare(fn.__name__, fn, dtype=ty, constexprs=constexprs, num_warps=num_warps, num_stages=1,
                        label=label, variant=norm, types=types, default=mode == DEFAULT_CASTING_MODE,
                        families=families)
        builds.append(dataclasses.replace(build, divisible_by_16=build.divisible_by_16 + ("n_cols",) * aligned))

    for families, lanes in LANES.items():
        for ty in TRITON_DTYPES.values():
            for norm, rms, mode in norms:
                for n_cols in forward_widths:
                    for has_res in (False, True):
                        flags = dict(HAS_RES=has_res, HAS_W=True, HAS_B=not rms, MULTI_ROW=_multi_row(n_cols))
                        add(_norm_fwd, families, lanes, ty, norm, rms, mode, n_cols, flags, fp32_args,
                            " residual" * has_res)
                for n_cols in backward_widths:
                    flags = dict(HAS_W=True, HAS_DH=True, WANT_DW=True, WANT_DB=not rms)
                    add(_norm_bwd, families, lanes, ty, norm, rms, mode, n_cols, flags,
                        dict(fp32_args, DW="*fp32", DB="*fp32", SUMS="*fp32"), " residual")
    return builds
