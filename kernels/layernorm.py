"""Fused layer norm and RMS norm in Triton, forward and backward, optionally fused with the residual add.

Over the trailing ``normalized_shape`` dims (flattened to a row of n elements), with all math in fp32:
    layer norm  y = (h - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var + eps)   (biased variance)
    RMS norm    y = h * rstd * weight,                  rstd = 1 / sqrt(mean(h^2) + eps)
where h = x, or h = x + residual rounded to x's dtype (returned as the new residual stream). mean and rstd are
kept in fp32 for the backward.

Forward:
- a row of at most ``MAX_BLOCK`` elements is one register block: x (and residual) read once, y (and h) written
  once. Up to ``MULTI_ROW_MAX_BLOCK`` a program takes a run of rows and reads weight and bias once for all of them;
  wider rows get one program each.
- a longer row takes two passes over ``LONG_BLOCK``-wide chunks: pass 1 merges per-chunk mean and sum of squared
  deviations (Chan et al.'s parallel update, stable where E[h^2] - E[h]^2 is not) and writes h; pass 2 re-reads
  h (x without a residual) and writes y.

Backward, a fixed number of programs each owning a run of consecutive rows:
    dh = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy))   (RMS norm drops the last term), xhat = (h-mean)*rstd
plus the new residual's own incoming gradient. dweight = sum over rows of dy * xhat and dbias = sum of dy are
accumulated per program in fp32 (in registers for one-block rows; for two-pass rows by a read-modify-write of the
program's own row of the buffer, chunk by chunk) and reduced over programs by one ``sum``: deterministic, no
atomics, no locks.

The autograd goes through ``torch.library`` custom ops, so ``torch.compile`` keeps each launch in one graph.
"""
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._rows import as_rows, row_config
from kernels._runtime import INTERPRETED, cast_rne, kernel_runs_on, launch_device
from kernels._validate import check_same, check_tensor
from kernels.registry import TRITON_DTYPES, Build, register_builds

MAX_BLOCK = 8192
"""Widest row held in registers as one block (the backward keeps ~6 fp32 values per element: no spills)."""
LONG_BLOCK = 2048
"""Chunk width of the two-pass path for rows wider than MAX_BLOCK."""


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
def _affine(xhat, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """xhat * weight + bias, each optional."""
    y = xhat
    if HAS_W:
        y = y * w
    if HAS_B:
        y = y + b
    return y


@triton.jit
def _norm_fwd_row(X, RES, W, B, Y, H, MEAN, RSTD, row, stride_x, stride_res, n_cols, eps, w, b,
                  BLOCK: tl.constexpr, SINGLE: tl.constexpr, RMS: tl.constexpr, HAS_RES: tl.constexpr,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, PARAMS_GIVEN: tl.constexpr):
    """Normalise one row: Y[row] (and H[row]), MEAN[row] (layer norm only), RSTD[row]. One-block rows use the
    weight and bias values ``w``, ``b`` when PARAMS_GIVEN, else load them; two-pass rows load them per chunk."""
    x_off = row * stride_x
    res_off = row * stride_res
    out_off = row * n_cols
    cols = tl.arange(0, BLOCK)
    mean = 0.0
    if SINGLE:
        h = _load_h(X, RES, H, x_off, res_off, out_off, cols, n_cols, HAS_RES)
        if not RMS:
            mean = tl.sum(h, 0) / n_cols
            h = tl.where(cols < n_cols, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n_cols + eps)
        if not PARAMS_GIVEN:
            w = _load_vec(W, cols, n_cols, HAS_W)
            b = _load_vec(B, cols, n_cols, HAS_B)
        y = _affine(h * rstd, w, b, HAS_W, HAS_B)
        tl.store(Y + out_off + cols, cast_rne(y, Y.dtype.element_ty), mask=cols < n_cols)
    else:
        count = tl.zeros([], tl.float32)
        mean = tl.zeros([], tl.float32)
        m2 = tl.zeros([], tl.float32)  # sum of squared deviations from mean (of squares for RMS)
        for start in range(0, n_cols, BLOCK):
            h = _load_h(X, RES, H, x_off + start, res_off + start, out_off + start, cols, n_cols - start, HAS_RES)
            if RMS:
                m2 += tl.sum(h * h, 0)
            else:
                n_chunk = tl.minimum(n_cols - start, BLOCK).to(tl.float32)
                mean_chunk = tl.sum(h, 0) / n_chunk
                dev = tl.where(start + cols < n_cols, h - mean_chunk, 0.0)
                delta = mean_chunk - mean
                total = count + n_chunk
                mean += delta * (n_chunk / total)
                m2 += tl.sum(dev * dev, 0) + delta * delta * (count * n_chunk / total)
                count = total
        rstd = 1.0 / tl.sqrt(m2 / n_cols + eps)
        # pass 2 reads h back: from H when it was written above (one stream instead of x and residual)
        if HAS_RES:
            src = H + out_off
        else:
            src = X + x_off
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            h = tl.load(src + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = _affine((h - mean) * rstd, _load_vec(W + start, cols, n_cols - start, HAS_W),
                        _load_vec(B + start, cols, n_cols - start, HAS_B), HAS_W, HAS_B)
            tl.store(Y + out_off + start + cols, cast_rne(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)
    if not RMS:
        tl.store(MEAN + row, mean)


@triton.jit
def _norm_fwd(X, RES, W, B, Y, H, MEAN, RSTD, stride_x, stride_res, n_rows, n_cols, rows_per_program, eps,
              BLOCK: tl.constexpr, SINGLE: tl.constexpr, RMS: tl.constexpr, HAS_RES: tl.constexpr,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, MULTI_ROW: tl.constexpr):
    """Layer/RMS norm forward. Y and H are contiguous (rows, n_cols); unused pointers (RES, H, W, B, MEAN) are
    ignored per the flags.

    MULTI_ROW (the launcher's choice for one-block rows up to MULTI_ROW_MAX_BLOCK): program p normalises rows
    [p * rows_per_program, (p + 1) * rows_per_program), loading weight and bias once for all of them. Otherwise
    program p normalises row p, with no row loop: out of a loop the compiler would hoist the weight and bias loads
    and keep them live beside h, which spills at BLOCK=8192.
    """
    pid = tl.program_id(0).to(tl.int64)  # int64 rows make every offset 64-bit
    if MULTI_ROW:
        cols = tl.arange(0, BLOCK)
        w = _load_vec(W, cols, n_cols, HAS_W)
        b = _load_vec(B, cols, n_cols, HAS_B)
        row_start = pid * rows_per_program
        for row in range(row_start, tl.minimum(row_start + rows_per_program, n_rows)):
            _norm_fwd_row(X, RES, W, B, Y, H, MEAN, RSTD, row, stride_x, stride_res, n_cols, eps, w, b,
                          BLOCK, SINGLE, RMS, HAS_RES, HAS_W, HAS_B, True)
    else:
        _norm_fwd_row(X, RES, W, B, Y, H, MEAN, RSTD, pid, stride_x, stride_res, n_cols, eps, 0.0, 0.0,
                      BLOCK, SINGLE, RMS, HAS_RES, HAS_W, HAS_B, False)


@triton.jit
def _load_grad(H, DY, w, h_off, dy_off, cols, n_cols, mean, rstd, HAS_W: tl.constexpr):
    """(xhat, dy, w * dy) in fp32 for one block of a row; lanes past the row read dy = 0, so they add nothing."""
    mask = cols < n_cols
    xhat = (tl.load(H + h_off + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    dy = tl.load(DY + dy_off + cols, mask=mask, other=0.0).to(tl.float32)
    wdy = dy * w if HAS_W else dy
    return xhat, dy, wdy


@triton.jit
def _input_grad(xhat, wdy, c1, c2, rstd, DH, dh_off, cols, n_cols, RMS: tl.constexpr, HAS_DH: tl.constexpr):
    """rstd * (w*dy - xhat * c1 - c2), c1 = mean(xhat * w*dy), c2 = mean(w*dy) (layer norm only), plus the
    gradient reaching h directly through the returned residual stream."""
    dx = wdy - xhat * c1
    if not RMS:
        dx -= c2
    dx *= rstd
    if HAS_DH:
        dx += tl.load(DH + dh_off + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    return dx


@triton.jit
def _norm_bwd(H, W, DY, DH, DX, MEAN, RSTD, DW, DB, stride_h, stride_dy, stride_dh, n_rows, n_cols,
              rows_per_program, BLOCK: tl.constexpr, SINGLE: tl.constexpr, RMS: tl.constexpr,
              HAS_W: tl.constexpr, HAS_DH: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr):
    """Program p: DX for rows [p * rows_per_program, (p + 1) * rows_per_program), and its fp32 partial sums of
    dweight and dbias in row p of DW and DB (programs, n_cols). DX is contiguous (rows, n_cols)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 rows make every offset below 64-bit
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    part = DW + pid * n_cols
    part_b = DB + pid * n_cols
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        w = _load_vec(W, cols, n_cols, HAS_W)
        dw = tl.zeros([BLOCK], tl.float32)
        db = tl.zeros([BLOCK], tl.float32)
        for row in range(row_start, row_end):
            mean = 0.0
            if not RMS:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat, dy, wdy = _load_grad(H, DY, w, row * stride_h, row * stride_dy, cols, n_cols, mean, rstd,
                                       HAS_W)
            c1 = tl.sum(xhat * wdy, 0) / n_cols
            c2 = tl.sum(wdy, 0) / n_cols
            dx = _input_grad(xhat, wdy, c1, c2, rstd, DH, row * stride_dh, cols, n_cols, RMS, HAS_DH)
            tl.store(DX + row * n_cols + cols, cast_rne(dx, DX.dtype.element_ty), mask=cols < n_cols)
            dw += dy * xhat
            db += dy
        if WANT_DW:
            tl.store(part + cols, dw, mask=cols < n_cols)
        if WANT_DB:
            tl.store(part_b + cols, db, mask=cols < n_cols)
    else:
        for row in range(row_start, row_end):
            mean = 0.0
            if not RMS:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            c1 = tl.zeros([], tl.float32)
            c2 = tl.zeros([], tl.float32)
            for start in range(0, n_cols, BLOCK):
                w = _load_vec(W + start, cols, n_cols - start, HAS_W)
                xhat, dy, wdy = _load_grad(H, DY, w, row * stride_h + start, row * stride_dy + start, cols,
                                           n_cols - start, mean, rstd, HAS_W)
                c1 += tl.sum(xhat * wdy, 0)
                c2 += tl.sum(wdy, 0)
            c1 /= n_cols
            c2 /= n_cols
            for start in range(0, n_cols, BLOCK):
                w = _load_vec(W + start, cols, n_cols - start, HAS_W)
                xhat, dy, wdy = _load_grad(H, DY, w, row * stride_h + start, row * stride_dy + start, cols,
                                           n_cols - start, mean, rstd, HAS_W)
                dx = _input_grad(xhat, wdy, c1, c2, rstd, DH, row * stride_dh + start, cols, n_cols - start,
                                 RMS, HAS_DH)
                mask = start + cols < n_cols
                tl.store(DX + row * n_cols + start + cols, cast_rne(dx, DX.dtype.element_ty), mask=mask)
                # this program's own row of the partial buffers: plain read-modify-write, no other writer
                if WANT_DW:
                    tl.store(part + start + cols, tl.load(part + start + cols, mask=mask) + dy * xhat, mask=mask)
                if WANT_DB:
                    tl.store(part_b + start + cols, tl.load(part_b + start + cols, mask=mask) + dy, mask=mask)


def _config(n_cols: int):
    """The norm launch config; reads the module's limits at each call, so tests can lower them."""
    return row_config(n_cols, MAX_BLOCK, LONG_BLOCK, per_thread=8)


def _multi_row(n_cols: int) -> bool:
    """Whether forward programs take runs of rows sharing one load of weight and bias (one-block rows up to
    MULTI_ROW_MAX_BLOCK) rather than one row each."""
    block, single, _ = _config(n_cols)
    return single and block <= MULTI_ROW_MAX_BLOCK


def _row_split(n_rows: int, device: torch.device, per_sm: int):
    """(programs, rows_per_program): each program takes a run of consecutive rows. On a GPU about ``per_sm``
    programs per SM; under the interpreter four, so tests see several programs and an uneven last run."""
    target = 4 if INTERPRETED else per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    rows_per_program = max(1, triton.cdiv(n_rows, max(1, min(n_rows, target))))
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


MULTI_ROW_MAX_BLOCK = 4096
"""Widest one-block forward that keeps weight and bias in registers across several rows without spilling."""
FORWARD_PROGRAMS_PER_SM = 8
"""Enough resident programs to hide load latency, while weight and bias are read once per program."""
BACKWARD_PROGRAMS_PER_SM = 2
"""Fewer: each backward program owns an fp32 row of the dweight/dbias partial buffers."""


def _forward_outputs(x, residual, n_cols, rms):
    """Uninitialised (y, h, mean, rstd): h is empty without a residual (the input itself serves the backward),
    mean is empty for RMS norm (custom-op outputs may not alias inputs or each other)."""
    n_rows = x.numel() // n_cols
    stats = dict(dtype=torch.float32, device=x.device)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape if residual is not None else 0, dtype=x.dtype, device=x.device),
            torch.empty(0 if rms else n_rows, **stats), torch.empty(n_rows, **stats))


# torch.library custom ops (not a bare autograd.Function) so that torch.compile treats each launch as one opaque op,
# also on CPU, where it cannot trace into an interpreted kernel.
@torch.library.custom_op("kernels::norm_forward", mutates_args=())
def _forward_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], n_cols: int, eps: float,
                rms: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h = x + residual or empty, mean (layer norm) or empty, rstd) over rows of n_cols elements."""
    y, h, mean, rstd = _forward_outputs(x, residual, n_cols, rms)
    x2d = as_rows(x, n_cols)
    n_rows = x2d.shape[0]
    res2d = as_rows(residual, n_cols) if residual is not None else x2d
    h2d = h.view(n_rows, n_cols) if residual is not None else x2d  # unused without a residual
    w = weight.reshape(-1).contiguous() if weight is not None else x2d
    b = bias.reshape(-1).contiguous() if bias is not None else x2d
    block, single, num_warps = _config(n_cols)
    multi_row = _multi_row(n_cols)
    programs, rows_per_program = (_row_split(n_rows, x.device, FORWARD_PROGRAMS_PER_SM) if multi_row
                                  else (n_rows, 1))
    if n_rows:
        with launch_device(x):
            _norm_fwd[(programs,)](x2d, res2d, w, b, y, h2d, mean if not rms else rstd, rstd, x2d.stride(0),
                                   res2d.stride(0), n_rows, n_cols, rows_per_program, eps, BLOCK=block,
                                   SINGLE=single, RMS=rms, HAS_RES=residual is not None, HAS_W=weight is not None,
                                   HAS_B=bias is not None, MULTI_ROW=multi_row, num_warps=num_warps)
    return y, h, mean, rstd


@_forward_op.register_fake
def _(x, residual, weight, bias, n_cols, eps, rms):
    return _forward_outputs(x, residual, n_cols, rms)


@torch.library.custom_op("kernels::norm_backward", mutates_args=())
def _backward_op(h: torch.Tensor, weight: Optional[torch.Tensor], dy: torch.Tensor, dh: Optional[torch.Tensor],
                 mean: torch.Tensor, rstd: torch.Tensor, n_cols: int, rms: bool, want_dw: bool,
                 want_db: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh total, fp32 dweight (n_cols) or empty, fp32 dbias (n_cols) or empty) from the normalised input h."""
    h2d = as_rows(h, n_cols)
    n_rows = h2d.shape[0]
    dy2d = as_rows(dy, n_cols)
    dh2d = as_rows(dh, n_cols) if dh is not None else dy2d
    dx = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    programs, rows_per_program = _row_split(n_rows, h.device, BACKWARD_PROGRAMS_PER_SM)
    block, single, num_warps = _config(n_cols)
    # one-block programs store their partial sums whole; two-pass ones add into theirs chunk by chunk
    partial = (torch.empty if single else torch.zeros)((2, programs, n_cols), dtype=torch.float32, device=h.device)
    w = weight.reshape(-1).contiguous() if weight is not None else h2d
    if n_rows:
        with launch_device(h):
            _norm_bwd[(programs,)](h2d, w, dy2d, dh2d, dx, mean if not rms else rstd, rstd, partial[0], partial[1],
                                   h2d.stride(0), dy2d.stride(0), dh2d.stride(0), n_rows, n_cols, rows_per_program,
                                   BLOCK=block, SINGLE=single, RMS=rms, HAS_W=weight is not None,
                                   HAS_DH=dh is not None, WANT_DW=want_dw, WANT_DB=want_db, num_warps=num_warps)
    return dx, _reduce(partial[0], want_dw), _reduce(partial[1], want_db)


def _reduce(partial: torch.Tensor, wanted: bool) -> torch.Tensor:
    """The one deterministic reduction of the per-program fp32 partial sums (programs, n_cols)."""
    return partial.sum(0) if wanted else partial.new_empty(0)


@_backward_op.register_fake
def _(h, weight, dy, dh, mean, rstd, n_cols, rms, want_dw, want_db):
    return (torch.empty(h.shape, dtype=h.dtype, device=h.device),
            *(torch.empty(n_cols if want else 0, dtype=torch.float32, device=h.device) for want in (want_dw, want_db)))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, n_cols, _, rms = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    params = [(t.dtype, t.shape) if t is not None else None for t in (weight, bias)]
    ctx.config = (n_cols, rms, residual is not None, *params)


def _autograd_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    n_cols, rms, has_res, weight_meta, bias_meta = ctx.config
    want_dw, want_db = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    dx, dw, db = _backward_op(h, weight, dy, dh if has_res else None, mean, rstd, n_cols, rms, want_dw, want_db)
    dw = dw.to(weight_meta[0]).view(weight_meta[1]) if want_dw else None
    db = db.to(bias_meta[0]).view(bias_meta[1]) if want_db else None
    # x and residual enter h = x + residual alike, so both receive dh (as torch's add gives both its grad)
    return dx, (dx if has_res else None), dw, db, None, None, None


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check(x, normalized_shape, residual, weight, bias, eps, rms: bool) -> tuple:
    """Validate before any launch; return the normalized shape as a tuple."""
    check_tensor("x", x)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in normalized_shape):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    shape = tuple(normalized_shape)
    if not shape or math.prod(shape) == 0 or x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} must be non-empty and equal the trailing dims of x "
                         f"(shape {tuple(x.shape)})")
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        check_same("dtype", x=x, residual=residual)
        check_same("device", x=x, residual=residual)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape normalized_shape {shape}, got {tuple(t.shape)}")
            check_same("device", x=x, **{name: t})
    if (eps is None and not rms) or (eps is not None and (isinstance(eps, bool) or not isinstance(eps, numbers.Real))):
        raise TypeError(f"eps must be a real number{'' if not rms else ' or None'}, got {type(eps).__name__}")
    if eps is not None and not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return shape


def _fallback(x, residual, normalized_shape, weight, bias, eps, rms):
    """The plain-PyTorch reference, for tensors the Triton kernels cannot run on in this process."""
    h = x if residual is None else x + residual
    if rms:
        y = reference.rms_norm(h, normalized_shape, weight, eps)
    else:
        y = reference.layer_norm(h, normalized_shape, weight, bias, eps)
    y = y.to(x.dtype)  # the reference promotes with the weight's dtype; torch and the kernels keep x's
    return y if residual is None else (y, h)


def _norm(x, residual, normalized_shape, weight, bias, eps, rms):
    n_cols = math.prod(_check(x, normalized_shape, residual, weight, bias, eps, rms))
    if rms and eps is None:
        eps = torch.finfo(x.dtype).eps
    present = [t for t in (x, residual, weight, bias) if t is not None]
    if not kernel_runs_on(*present):
        return _fallback(x, residual, normalized_shape, weight, bias, eps, rms)
    y, h, _, _ = _forward_op(x, residual, weight, bias, n_cols, float(eps), rms)
    return y if residual is None else (y, h)


ShapeArg = Union[int, Sequence[int]]


def layer_norm(x: torch.Tensor, normalized_shape: ShapeArg, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.layer_norm``, fused: same signature, result (x's shape and dtype) and gradients.

    x: (..., *normalized_shape), fp16/bf16/fp32; weight, bias: normalized_shape, any of those dtypes (their
    gradients come back in it). Falls back to ``kernels.reference`` (one-time warning) when the kernels cannot
    run on these tensors in this process.
    """
    return _norm(x, None, normalized_shape, weight, bias, eps, rms=False)


def rms_norm(x: torch.Tensor, normalized_shape: ShapeArg, weight: Optional[torch.Tensor] = None,
             eps: Optional[float] = None) -> torch.Tensor:
    """``torch.nn.functional.rms_norm``, fused: ``x / sqrt(mean(x^2) + eps) * weight``; ``eps`` defaults to
    ``torch.finfo(x.dtype).eps``. Shapes, dtypes and fallback as :func:`layer_norm`."""
    return _norm(x, None, normalized_shape, weight, None, eps, rms=True)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeArg,
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 1e-5):
    """Pre-norm block step in one kernel: ``h = x + residual`` (in x's dtype), returns
    ``(layer_norm(h, ...), h)``; x and residual (same shape and dtype) are each read once."""
    return _norm(x, residual, normalized_shape, weight, bias, eps, rms=False)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeArg,
                 weight: Optional[torch.Tensor] = None, eps: Optional[float] = None):
    """``h = x + residual``; returns ``(rms_norm(h, ...), h)`` from one kernel, as :func:`add_layer_norm`."""
    return _norm(x, residual, normalized_shape, weight, None, eps, rms=True)


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in ``torch.nn.LayerNorm`` (same constructor, parameters and state_dict keys) on the fused kernel.

    ``forward(x, residual=None)``: with a residual, returns ``(y, x + residual)`` from :func:`add_layer_norm`.
    """

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in ``torch.nn.RMSNorm`` (same constructor, parameters and state_dict keys) on the fused kernel.

    ``forward(x, residual=None)``: with a residual, returns ``(y, x + residual)`` from :func:`add_rms_norm`.
    """

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return add_rms_norm(x, residual, self.normalized_shape, self.weight, self.eps)


@register_builds
def _builds():
    """Per dtype: layer and RMS norm at a small one-block row, the widest sharing weight and bias across rows, the
    widest one-block row and on the two-pass path; forward plain and with residual, with all affine parameters,
    and backward with every gradient."""
    builds = []
    for ty in TRITON_DTYPES.values():
        for n_cols in (1024, MULTI_ROW_MAX_BLOCK, MAX_BLOCK, MAX_BLOCK + 1):
            block, single, num_warps = _config(n_cols)
            for rms in (False, True):
                name = f"{ty} {'rms' if rms else 'layer'} BLOCK={block}{'' if single else ' two-pass'}"
                common = {"BLOCK": block, "SINGLE": single, "RMS": rms}
                for has_res in (False, True):
                    signature = {p: f"*{ty}" for p in ("X", "RES", "W", "B", "Y", "H")}
                    signature.update(MEAN="*fp32", RSTD="*fp32", stride_x="i32", stride_res="i32", n_rows="i32",
                                     n_cols="i32", rows_per_program="i32", eps="fp32")
                    flags = dict(common, HAS_RES=has_res, HAS_W=True, HAS_B=not rms,
                                 MULTI_ROW=_multi_row(n_cols))
                    signature.update(dict.fromkeys(flags, "constexpr"))
                    builds.append(Build("_norm_fwd", _norm_fwd, signature, flags, num_warps, 1,
                                        name + " residual" * has_res))
                signature = {p: f"*{ty}" for p in ("H", "W", "DY", "DH", "DX")}
                signature.update(MEAN="*fp32", RSTD="*fp32", DW="*fp32", DB="*fp32", stride_h="i32",
                                 stride_dy="i32", stride_dh="i32", n_rows="i32", n_cols="i32",
                                 rows_per_program="i32")
                flags = dict(common, HAS_W=True, HAS_DH=True, WANT_DW=True, WANT_DB=not rms)
                signature.update(dict.fromkeys(flags, "constexpr"))
                builds.append(Build("_norm_bwd", _norm_bwd, signature, flags, num_warps, 1, name + " residual"))
    return builds
