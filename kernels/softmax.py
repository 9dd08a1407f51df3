"""Fused softmax / log-softmax in Triton: scale, optional bottom-right causal mask and normalisation in one pass,
with a fused backward.

Layout: the softmax axis is moved last and the input seen as (rows, n) with unit column stride (a copy only when
``dim`` is not last or the rows are not unit-strided); one program per row, math in fp32. The output (and the
input gradient) is contiguous whatever x's layout, as torch's: a kernel writes rows with ``dim`` last, so for
another ``dim`` that buffer is copied once into the contiguous result.

- A row of at most ``MAX_BLOCK`` elements is one register block: the forward reads x once and writes y once.
- A longer row loops over ``LONG_BLOCK``-wide chunks: pass 1 keeps an online running max ``m`` and sum
  ``s = sum(exp(z - m))`` (rescaled by ``exp(m_old - m_new)`` when the max grows), pass 2 re-reads x and writes
  y: two reads and one write, the least a row that does not fit on chip allows.

Both limits are module constants the launcher reads at each call, so tests can lower them to reach the
multi-block path at small widths. Eager calls go through a plain autograd.Function (with a ``jvp``); under
``torch.compile`` the same launches go through ``torch.library`` custom ops, so each stays one opaque op. The row launch helpers shared with the norm kernels live in ``kernels/_rows.py``.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import _direct, reference
from kernels.attention.checks import check_flag, check_scale
from kernels._autograd import autograd_function
from kernels._rows import (DTENSOR, LANES, PLAN_CACHE_SIZE, autocasts_to_fp32, empty_rows_like, lanes_of,
                           row_config, rows_and_stride)
from kernels._runtime import (cast_rne, forward_ad_active, kernel_runs_on, launch_device, nested_forward_ad,
                              transform_needs_torch_ops)
from kernels._validate import FLOAT_DTYPES, DimError, check_int, check_tensor
from kernels.registry import TRITON_DTYPES, declare, register_builds

MAX_BLOCK = 16384
"""Widest row held in registers as one block (fp32: 32 values a thread at 16 warps, no spills on sm_80/sm_90)."""
LONG_BLOCK = 4096
"""Chunk width of the online (multi-block) path for rows wider than MAX_BLOCK."""
SINGLE_PER_THREAD = 16
"""Elements of a one-block row per thread (the number of warps follows)."""
ONLINE_PER_THREAD = 8
"""Elements of an online-path chunk per thread: at 16 (a 4096 chunk on 8 warps) ptxas spills 24 B in the fp16
forward on sm_100; 8 (16 warps) is spill-free on sm_80, sm_90, sm_100 and gfx942 (``python -m benchmarks static
--kernel _softmax --defaults``)."""
MAX_ROWS = 2**31 - 1
"""Rows (programs) one launch takes: CUDA's limit on a grid's first axis. A softmax over more rows (a narrow one,
such as a router's over its experts) launches once per run of at most this many."""

@triton.jit
def _visible_cols(row, n_cols, n_q, CAUSAL: tl.constexpr):
    """How many leading columns of ``row`` are unmasked: with CAUSAL, query q = row % n_q sees keys j <= q + n_cols -
    n_q (bottom-right alignment); the count is <= 0 for a query that sees no key."""
    visible = n_cols
    if CAUSAL:
        visible = tl.minimum(row % n_q + n_cols - n_q + 1, n_cols)
    return visible


@triton.jit
def _load_scaled(x_row, cols, visible, scale):
    """fp32 ``x * scale`` at ``cols``; masked and out-of-row lanes are -inf so they vanish in max and exp."""
    x = tl.load(x_row + cols, mask=cols < visible, other=0.0)
    # Masked after scaling: a -inf read then scaled would be NaN for scale 0 and +inf for a negative scale.
    return tl.where(cols < visible, x.to(tl.float32) * scale, -float("inf"))


@triton.jit
def _normalise(z, m, s, visible, LOG: tl.constexpr, CAUSAL: tl.constexpr):
    """softmax ``exp(z - m) / s`` or log-softmax ``z - m - log(s)``; a row the causal mask hides entirely gives 0.

    A row that is all -inf in the input has m = -inf, so z - m is NaN: exactly torch's answer for such a row.
    """
    if LOG:
        y = z - m - tl.log(s)
    else:
        y = tl.exp(z - m) / s
    if CAUSAL:
        y = tl.where(visible > 0, y, 0.0)
    return y


@triton.jit
def _softmax_fwd(X, Y, stride_x, stride_y, n_cols, n_q, scale,
                 BLOCK: tl.constexpr, SINGLE: tl.constexpr, CAUSAL: tl.constexpr, LOG: tl.constexpr):
    """One program per row: Y[row] = softmax(X[row] * scale) (or log-softmax), masked per CAUSAL."""
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_x
    y_row = Y + row.to(tl.int64) * stride_y
    visible = _visible_cols(row, n_cols, n_q, CAUSAL)
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        z = _load_scaled(x_row, cols, visible, scale)
        m = tl.max(z, 0)
        s = tl.sum(tl.exp(z - m), 0)
        y = _normalise(z, m, s, visible, LOG, CAUSAL)
        tl.store(y_row + cols, cast_rne(y, Y.dtype.element_ty), mask=cols < n_cols)
    else:
        m = tl.full([], -float("inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for start in range(0, visible, BLOCK):
            z = _load_scaled(x_row, start + cols, visible, scale)
            m_new = tl.maximum(m, tl.max(z, 0))
            # While every value seen is -inf, -inf - -inf would be NaN: subtract 0 instead so s stays 0.
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
            m = m_new
        for start in range(0, n_cols, BLOCK):
            z = _load_scaled(x_row, start + cols, visible, scale)
            y = _normalise(z, m, s, visible, LOG, CAUSAL)
            tl.store(y_row + start + cols, cast_rne(y, Y.dtype.element_ty), mask=start + cols < n_cols)


@triton.jit
def _load_grad(y_row, dy_row, cols, visible, LOG: tl.constexpr):
    """fp32 (y, dy, the term summed over the row): dy * y for softmax, dy for log-softmax. Masked lanes read 0."""
    y = tl.load(y_row + cols, mask=cols < visible, other=0.0).to(tl.float32)
    dy = tl.load(dy_row + cols, mask=cols < visible, other=0.0).to(tl.float32)
    if LOG:
        term = dy
    else:
        term = dy * y
    return y, dy, term


@triton.jit
def _input_grad(y, dy, dot, scale, shown, LOG: tl.constexpr):
    """softmax: scale * y * (dy - dot); log-softmax: scale * (dy - exp(y) * dot); 0 where not ``shown`` (a masked
    column: 0, not 0 * dot, which is NaN in a row whose dot is NaN, as torch's masked_fill gradient)."""
    if LOG:
        dx = dy - tl.exp(y) * dot
    else:
        dx = y * (dy - dot)
    return tl.where(shown, dx * scale, 0.0)


@triton.jit
def _softmax_bwd(Y, DY, DX, stride_y, stride_dy, stride_dx, n_cols, n_q, scale,
                 BLOCK: tl.constexpr, SINGLE: tl.constexpr, CAUSAL: tl.constexpr, LOG: tl.constexpr):
    """One program per row: DX[row] from the forward output Y[row] and its gradient DY[row].

    Masked columns have y = 0, so their gradient is 0: they are not read, only written (as 0).
    """
    row = tl.program_id(0)
    y_row = Y + row.to(tl.int64) * stride_y
    dy_row = DY + row.to(tl.int64) * stride_dy
    dx_row = DX + row.to(tl.int64) * stride_dx
    visible = _visible_cols(row, n_cols, n_q, CAUSAL)
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        y, dy, term = _load_grad(y_row, dy_row, cols, visible, LOG)
        dx = _input_grad(y, dy, tl.sum(term, 0), scale, cols < visible, LOG)
        tl.store(dx_row + cols, cast_rne(dx, DX.dtype.element_ty), mask=cols < n_cols)
    else:
        dot = tl.zeros([], tl.float32)
        for start in range(0, visible, BLOCK):
            y, dy, term = _load_grad(y_row, dy_row, start + cols, visible, LOG)
            dot += tl.sum(term, 0)
        for start in range(0, n_cols, BLOCK):
            y, dy, term = _load_grad(y_row, dy_row, start + cols, visible, LOG)
            dx = _input_grad(y, dy, dot, scale, start + cols < visible, LOG)
            tl.store(dx_row + start + cols, cast_rne(dx, DX.dtype.element_ty), mask=start + cols < n_cols)


def _config(n_cols: int, lanes: int = 32):
    """The launch plan (block, single/online, warps) of a row width on a GPU family with warps of ``lanes``
    threads: cached per width, and reading the module's limits at each call, so tests can lower them."""
    per_thread = SINGLE_PER_THREAD if n_cols <= MAX_BLOCK else ONLINE_PER_THREAD
    return row_config(n_cols, MAX_BLOCK, LONG_BLOCK, per_thread, lanes)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _launch_constants(n_cols: int, lanes: int, limits, causal: bool, log: bool) -> dict:
    """The constexpr keyword arguments and num_warps of a launch: built once per width, family, limits (the
    module's, which tests lower) and flags, so a call builds no plan of its own."""
    block, single, num_warps = _config(n_cols, lanes)
    return dict(BLOCK=block, SINGLE=single, CAUSAL=causal, LOG=log, num_warps=num_warps)


def _launch(kernel, out, ins, dim, n_q, scale, causal, log):
    """One program per row along ``dim`` of ``out``, reading the same-shape ``ins`` (rows unit-strided); rows past
    MAX_ROWS go in several launches."""
    n_cols = out.shape[dim]
    constants = _launch_constants(n_cols, lanes_of(out.device), (MAX_BLOCK, LONG_BLOCK), causal, log)
    pointers, strides = [], []
    for t in (*ins, out):
        rows, stride = _matrix(t, dim)
        pointers.append(rows)
        strides.append(stride)
    n_rows = out.numel() // n_cols
    if n_rows <= MAX_ROWS:
        _direct.run(kernel, (*pointers, *strides, n_cols, n_q, scale), (n_rows,), **constants)
        return
    # runs of whole (n_q, n_cols) matrices: a program's row index modulo n_q stays its causal row
    step = MAX_ROWS // n_q * n_q
    if not step:
        raise ValueError(f"softmax: causal over {n_q} query rows, more than one launch's grid holds ({MAX_ROWS})")
    matrices = [p.view(-1, n_cols) for p in pointers]  # (rows, n_cols) views of the same memory
    for start in range(0, n_rows, step):
        run = [m[start:start + step] for m in matrices]
        _direct.run(kernel, (*run, *strides, n_cols, n_q, scale), (run[0].shape[0],), **constants)


def _matrix(t: torch.Tensor, dim: int):
    """(``t`` as a (rows, n) matrix with unit column stride, its row stride), ``dim`` moved last. A contiguous ``t``
    with ``dim`` last already is that matrix in memory: it is passed as it is, with no view to build per call."""
    return rows_and_stride(t if dim == t.dim() - 1 else t.movedim(dim, -1), t.shape[dim])


def _empty_like_moved(x: torch.Tensor, dim: int) -> torch.Tensor:
    """An uninitialised tensor of x's shape and dtype laid out with ``dim`` last in memory (rows unit-strided)."""
    if dim == x.dim() - 1:
        return empty_rows_like(x)
    return torch.empty(x.movedim(dim, -1).shape, dtype=x.dtype, device=x.device).movedim(-1, dim)


def _run(kernel, like: torch.Tensor, ins, dim: int, scale: float, causal: bool, log: bool) -> torch.Tensor:
    """``kernel``'s rows along ``dim`` of a new tensor of ``like``'s shape and dtype, read from ``ins``; returned
    contiguous, torch's layout for softmax's output and gradient (one copy when ``dim`` is not last)."""
    if not like.numel():
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    out = _empty_like_moved(like, dim)
    with launch_device(like):
        _launch(kernel, out, ins, dim, like.shape[-2] if causal else 1, scale, causal, log)
    return out if dim == like.dim() - 1 else out.contiguous()


def _forward(x: torch.Tensor, dim: int, scale: float, causal: bool, log: bool) -> torch.Tensor:
    """y = (log-)softmax(x * scale) along ``dim`` (>= 0), contiguous."""
    return _run(_softmax_fwd, x, (x,), dim, scale, causal, log)


def _backward(y: torch.Tensor, dy: torch.Tensor, dim: int, scale: float, causal: bool, log: bool) -> torch.Tensor:
    """dx from the forward's output y and its gradient dy, contiguous."""
    return _run(_softmax_bwd, y, (y, dy), dim, scale, causal, log)


def _save(ctx, inputs, y):
    ctx.config = inputs[1:]
    ctx.save_for_backward(y)  # the backward needs y only
    if forward_ad_active():  # a jvp runs only inside a forward-AD level or transform: none, nothing to save
        ctx.save_for_forward(y)


def _grad(ctx, dy):
    (y,) = ctx.saved_tensors
    # Grad mode is on in a backward only under create_graph=True (double backward, torch.func.grad / jacrev): the
    # kernel's dx would carry no graph, so the second derivative would silently miss this op. Torch ops instead.
    backward = _differentiable_backward if torch.is_grad_enabled() else _backward
    return backward(y, dy, *ctx.config), None, None, None, None


def _differentiable_backward(y, dy, dim, scale, causal, log):
    """The backward's dx in plain torch ops in fp32 (itself differentiable, and fine with torch.func's wrapped
    tensors): scale * y * (dy - sum(dy * y)) for softmax, scale * (dy - exp(y) * sum(dy)) for log-softmax. Masked
    causal columns have y = 0, so their gradient is 0, as the kernel's."""
    y32, dy32 = y.float(), dy.float()
    if log:
        dx = dy32 - y32.exp() * dy32.sum(dim, keepdim=True)
    else:
        dx = y32 * (dy32 - (dy32 * y32).sum(dim, keepdim=True))
    return (scale * dx).to(y.dtype)


def _jvp(ctx, dx, *_):
    """J dx with J = scale * (diag(y) - y y^T) for softmax, scale * (I - 1 exp(y)^T) for log-softmax.

    Plain torch math in fp32 rather than a kernel launch: torch.func batches it natively under jacfwd's vmap
    (a launch would run once per tangent). Masked causal columns have y = 0, so their tangent is 0.
    """
    (y,) = ctx.saved_tensors
    dim, scale, causal, log = ctx.config
    y32, dx32 = y.float(), dx.float()
    weights = y32.exp() if log else y32
    centred = dx32 - (weights * dx32).sum(dim, keepdim=True)
    return (scale * (centred if log else y32 * centred)).to(y.dtype)


_softmax_function = autograd_function("Softmax", _forward, _save, _grad, _jvp)
"""The eager path: reverse mode and one level of forward mode (``kernels/_autograd.py``)."""

# The traced path: torch.library custom ops over the same launches, so torch.compile keeps each one opaque op (also
# on CPU, where it cannot trace into an interpreted kernel); torch.compile cannot trace a Function with a jvp.
_forward_op = torch.library.custom_op("kernels::softmax_forward", _forward, mutates_args=())
_backward_op = torch.library.custom_op("kernels::softmax_backward", _backward, mutates_args=())


@_forward_op.register_fake
def _(x, dim, scale, causal, log):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_backward_op.register_fake
def _(y, dy, dim, scale, causal, log):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


def _setup_traced(ctx, inputs, output):
    ctx.config = inputs[1:]
    ctx.save_for_backward(output)


def _traced_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _backward_op(y, dy, *ctx.config), None, None, None, None


_forward_op.register_autograd(_traced_backward, setup_context=_setup_traced)


_TORCH_FLOATS = (*FLOAT_DTYPES, torch.float64)
"""Dtypes the functions compute in: the kernels' own, and float64, which runs torch's ops."""


def _check(x, dim, scale, causal, dtype):
    """Validate the arguments before any launch; return (``dim`` as a non-negative axis, ``scale`` as a float,
    ``causal`` as a bool)."""
    # with dtype=, x may be of any dtype torch casts from (an integer x included), as torch.softmax's dtype=
    check_tensor("x", x, dtypes=_TORCH_FLOATS if dtype is None else None)
    if dtype is not None and dtype not in _TORCH_FLOATS:
        names = ", ".join(str(d).replace("torch.", "") for d in _TORCH_FLOATS)
        raise TypeError(f"dtype must be None or one of ({names}), got {dtype!r}")
    dim = check_int("dim", dim, tensor=True)  # numpy's integers and 0-d integer tensors as torch takes them
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise DimError(f"dim must be in [{-ndim}, {ndim}) for x of shape {tuple(x.shape)}, got {dim}")
    scale = check_scale(scale, 1)  # attention's rule (None: its default, here 1/sqrt(1)): NaN or inf is refused
    causal = check_flag("causal", causal)
    dim = dim % ndim
    if causal and x.dim() < 2:
        raise ValueError(f"causal=True needs x of at least 2 dims (..., Nq, Nk), got shape {tuple(x.shape)}")
    if causal and dim != x.dim() - 1:
        raise ValueError(f"causal=True needs dim=-1 (the key axis Nk), got dim={dim} for shape {tuple(x.shape)}")
    return dim, scale, causal


_TENSOR = torch.Tensor


def _on_local_rows(x, dim, scale, causal, log, dtype):
    """The (log-)softmax of a DTensor, as torch's on DTensors: x is redistributed so that neither the softmax dim
    nor (causal) the query dim is sharded or partial (other shardings are kept), each rank computes its local rows,
    and y comes back a DTensor in those placements. Collectives only, no host sync."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    whole = {dim, x.dim() - 2} if causal else {dim}
    placements = [p if isinstance(p, Shard) and p.dim % x.dim() not in whole else Replicate() for p in x.placements]
    if tuple(placements) != tuple(x.placements):
        x = x.redistribute(x.device_mesh, placements)
    y = _apply(x.to_local(), dim, scale, causal, log, dtype)
    stride = torch.empty(x.shape, device="meta").stride()  # the local rows' layout: contiguous
    return DTensor.from_local(y, x.device_mesh, placements, run_check=False, shape=x.shape, stride=stride)


def _apply(x, dim, scale, causal, log, dtype):
    if type(x) is not _TENSOR and isinstance(x, DTENSOR or ()):  # (a plain tensor: one type check)
        return _on_local_rows(x, dim, scale, causal, log, dtype)
    if dtype is not None:  # torch's dtype=: x cast before the op, which CUDA autocast then leaves in that dtype
        x = x.to(dtype)
    elif autocasts_to_fp32(x):  # torch.softmax and log_softmax run in fp32 under CUDA autocast: so do these
        x = x.float()
    if x.dim() == 0:  # torch treats a scalar as a one-element row
        return _apply(x.reshape(1), 0, scale, causal, log, None).reshape(())
    if torch.compiler.is_compiling():
        return _forward_op(x, dim, float(scale), causal, log)
    if nested_forward_ad():  # a jvp of a jvp: torch's ops (the Function's jvp is one level deep)
        return _torch_ops(x, dim, scale, causal, log)
    return _softmax_function(x, dim, float(scale), causal, log)


def softmax(x: torch.Tensor, dim: int = -1, *, scale: Optional[float] = 1.0, causal: bool = False,
            dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.softmax(x * scale, dim, dtype=dtype)`` fused in one kernel; same shape as ``x``, contiguous (torch's
    layout, whatever x's), in x's dtype or in ``dtype`` when given (x is cast to it first, one copy before the
    kernel, as torch's ``dtype=``, which also takes an integer x; the gradient comes back in x's dtype).
    Differentiable in reverse and forward mode (a jvp of a jvp runs torch's ops, which nest); ``scale`` any finite
    real, zero and negative included (None: 1.0; NaN or inf: TypeError, as attention's ``scale``); ``causal`` a bool
    (or int).

    x: any shape, fp16/bf16/fp32 (fp32 math inside) or float64 (computed by torch's ops in float64, gradients
    through torch's autograd, as the norms do). With ``causal`` the last two dims are (Nq, Nk), ``dim`` must
    be the last, and entry (i, j) is masked when j > i + Nk - Nq (bottom-right, as in attention); a row the mask
    hides entirely gives zeros, while a row that is all -inf in ``x`` gives NaN, as in torch. Backward:
    dx = scale * y * (dy - sum(dy * y)). Under CUDA autocast, fp16/bf16 x is taken to fp32 (an fp32 result), as
    autocast does for torch.softmax. Runs torch's ops (with a one-time warning) when the Triton kernels cannot
    run on ``x``'s device in this process, and under torch.vmap (and jacfwd), which batch them.
    """
    dim, scale, causal = _check(x, dim, scale, causal, dtype)
    return _softmax_or_log(x, dim, scale, causal, False, dtype)


def log_softmax(x: torch.Tensor, dim: int = -1, *, scale: Optional[float] = 1.0,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.log_softmax(x * scale, dim, dtype=dtype)``: the softmax kernel with its log flag; backward
    dx = scale * (dy - exp(y) * sum(dy)). Layout, dtypes (float64 included), ``scale``, CUDA autocast and torch's
    ops where the kernels cannot run as :func:`softmax`."""
    dim, scale, _ = _check(x, dim, scale, False, dtype)
    return _softmax_or_log(x, dim, scale, False, True, dtype)


def _softmax_or_log(x, dim, scale, causal, log, dtype):
    """The kernels, or torch's ops where they do not run: float64, a device this process's kernels cannot run on
    (:func:`kernel_runs_on` warns once), torch.vmap (which batches torch's ops; a launch cannot read its tensors)."""
    if (x.dtype if dtype is None else dtype) == torch.float64 or not kernel_runs_on(x) or transform_needs_torch_ops():
        return _torch_ops(x if dtype is None else x.to(dtype), dim, scale, causal, log)
    return _apply(x, dim, scale, causal, log, dtype)


def _torch_ops(x, dim, scale, causal, log):
    """torch's (log-)softmax of ``x * scale`` along ``dim``; with ``causal`` the kernels' mask
    (:func:`reference.causal_softmax` around torch's softmax). Contiguous, as the kernels' result."""
    z = x * scale
    if causal:  # dim is the last (checked)
        return reference.causal_softmax(z, functools.partial(torch.softmax, dim=-1))
    return torch.log_softmax(z, dim) if log else torch.softmax(z, dim)


@register_builds
def _builds():
    """Per dtype and kernel (forward, backward): a small and the largest single-block row and the online path,
    each plain, causal and log, per family table (``kernels/_rows.py``). No autotuning: each width has one config,
    so every build is what a GPU of its family runs and a default (held to the no-spill bar). A build's variant is
    "causal", "log" or "" (plain)."""
    variants = [(n, causal, log) for n in (1024, MAX_BLOCK, MAX_BLOCK + 1)
                for causal, log in ((False, False), (True, False), (False, True))]
    builds = []
    for families, lanes in LANES.items():
        for ty in TRITON_DTYPES.values():
            for fn in (_softmax_fwd, _softmax_bwd):
                for n_cols, causal, log in variants:
                    block, single, num_warps = _config(n_cols, lanes)
                    label = (f"{ty} BLOCK={block}{'' if single else ' online'}{' causal' * causal}{' log' * log}"
                             f"{' wave64' * (lanes == 64)}")
                    constexprs = {"BLOCK": block, "SINGLE": single, "CAUSAL": causal, "LOG": log}
                    variant = "causal" if causal else "log" if log else ""
                    builds.append(declare(fn.__name__, fn, dtype=ty, num_warps=num_warps, num_stages=1, label=label,
                                          variant=variant, constexprs=constexprs, default=True, families=families))
    return builds

