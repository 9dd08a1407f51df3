"""Fused attention's public function, its launchers and its autograd.

:func:`attention` takes q (B, H, Nq, D) and k, v (B, Hkv, Nk, D) (see ``kernels.py`` for the math and the
kernels). :func:`attention_op` is the one autograd entry of every attention path (dense, varlen, the SDPA shim):
a plain autograd.Function in eager, the ``torch.library`` custom ops ``_forward_op``/``_backward_op`` while
torch.compile traces, so ``torch.compile(fullgraph=True)`` keeps a launch in one graph. :data:`attention_forward`
returns (out, lse) and :data:`attention_backward` the gradients given any (out, lse) the rows were normalised with:
the building blocks of paths with their own autograd (context parallelism). Their lse is in log2 units
(:func:`natural_lse` gives the natural one the public functions return).

Fallback (documented, never silent about the math): if the Triton kernels cannot run on the inputs in this
process (see ``kernels._runtime.kernel_runs_on``) :func:`attention` uses ``kernels.reference.attention``.
"""
import inspect
import math
import numbers
from typing import List, Optional, Tuple

import torch

from kernels import _runtime, reference
from kernels._autograd import autograd_function
from kernels._validate import check_same, check_tensor
from kernels.attention import block_mask as mods, configs
from kernels.attention.kernels import LN2, LOG2E

# --------------------------------------------------------------------------------------------------- launchers


def _pad_args(pad: Optional[torch.Tensor]):
    """The kernels' (PAD, stride_pb) arguments of a (B, Nk) uint8 padding mask with unit key stride, or none."""
    return (None, 0) if pad is None else (pad, pad.stride(0))


def _alibi_args(alibi_slopes: Optional[torch.Tensor]):
    """The kernels' (ALIBI, stride_ab) arguments of float32 (H,) or (B, H) slopes with unit head stride, or none."""
    if alibi_slopes is None:
        return None, 0
    return alibi_slopes, (alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0)


def _bounds(n_q: int, n_k: int, causal: bool, causal_shift: int, window_left: int, window_right: int):
    """(CAUSAL, WINDOW, CAUSAL_SHIFT, WINDOW_SHIFT): query i sees key j iff j <= i + CAUSAL_SHIFT (if CAUSAL) and
    j >= i + WINDOW_SHIFT (if WINDOW). ``causal`` sets the window's right edge to 0 as flash-attn does; an edge
    that hides no key of the (n_q, n_k) grid is dropped, so it costs nothing."""
    upper = causal_shift + (0 if causal else window_right)
    lower = causal_shift - window_left
    has_upper = (causal or window_right >= 0) and upper < n_k - 1
    has_lower = window_left >= 0 and lower > 1 - n_q
    return has_upper, has_lower, upper if has_upper else 0, lower if has_lower else 0


def _variant_args(q, k, causal, causal_shift, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state,
                  varlen):
    """(pointer args, shift and scalar args, compile-time meta) of the variants, as every attention kernel takes
    them: (ALIBI, SEED, stride_ab), (CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT), and kernel_meta. ``varlen`` is
    None or the (max_seqlen_q, max_seqlen_k) of packed sequences, whose kernels add each sequence's own Nk - Nq
    to the shifts: theirs are relative to that diagonal, and an edge is dropped only if no sequence needs it."""
    n_q, n_k = varlen or (q.shape[2], k.shape[2])
    diagonal = n_k - n_q if varlen else causal_shift
    has_upper, has_lower, upper, lower = _bounds(n_q, n_k, causal, diagonal, window_left, window_right)
    if varlen:
        upper, lower, diagonal = upper - diagonal, lower - diagonal, 0
    alibi, stride_ab = _alibi_args(alibi_slopes)
    seed = rng_state if dropout_p > 0 else None
    meta = configs.kernel_meta(q, has_upper, has_lower, softcap > 0)
    return (alibi, seed, stride_ab), (upper, lower, diagonal), meta


def _mod_args(mask_mod: int, summary, mask_args, score_mod: int, score_args, backward: bool):
    """(BLOCK_MASK, MASK_ARGS, SCORE_ARGS), (stride_mb, stride_mh) and the constexpr meta (MASK_MOD, SCORE_MOD and,
    for the ``backward``, SCORE_GRAD) of the mods: registry keys (block_mask.py; -1 = none), the (B, H, L) int32
    block-mask ``summary`` and the mods' extra tensors."""
    meta = dict(MASK_MOD=None, SCORE_MOD=None, **({"SCORE_GRAD": None} if backward else {}))
    pointers, strides = [None, None, None], (0, 0)
    if mask_mod >= 0:
        (meta["MASK_MOD"],) = mods.functions(mask_mod)
        pointers[:2] = summary, mods.kernel_extra(mask_mod, mask_args)
        strides = summary.stride()[:2]
    if score_mod >= 0:
        meta["SCORE_MOD"], grad = mods.functions(score_mod)
        if backward:
            meta["SCORE_GRAD"] = grad
        pointers[2] = mods.kernel_extra(score_mod, score_args)
    return tuple(pointers), strides, meta


def _rows_empty(t: torch.Tensor, varlen: bool, dtype=None) -> torch.Tensor:
    """An uninitialised tensor of ``t``'s (B, H, N, D) shape: contiguous, or for packed sequences a (1, H, total,
    D) view of a contiguous (total, H, D) tensor (the varlen layout)."""
    if not varlen:
        return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    _, heads, total, d = t.shape
    return torch.empty((total, heads, d), dtype=dtype or t.dtype, device=t.device).transpose(0, 1)[None]


def _strides(t: torch.Tensor, varlen: bool) -> Tuple[int, ...]:
    """``t``'s strides as the kernels take them: a packed (1, H, total, D) view's batch stride is 0, since every
    sequence is found from cu_seqlens."""
    return (0, *t.stride()[1:]) if varlen else t.stride()


def _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int):
    """(batch, (max_seqlen_q, max_seqlen_k)) of packed sequences, or (None, None) for a dense call."""
    if cu_seqlens_q is None:
        return None, None
    return cu_seqlens_q.shape[0] - 1, (max_seqlen_q, max_seqlen_k)


def _forward(q, k, v, kv_bounds, pad, causal: bool, causal_shift: int, scale: float, window_left: int = -1,
             window_right: int = -1, softcap: float = 0.0, alibi_slopes=None, sinks=None, dropout_p: float = 0.0,
             rng_state=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
             mask_mod: int = -1, block_mask=None, mask_args=None, score_mod: int = -1, score_args=None):
    """Run the forward kernel: (out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32 in log2 units: see
    :func:`natural_lse`); for packed sequences (cu_seqlens given) q, k, v, out are (1, H, total, D) views and lse
    is (1, H, total_q)."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    varlen_batch, varlen = _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = _rows_empty(q, bool(varlen))
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or n_k == 0:  # nothing to launch: rows that see no key are zeros, lse -inf or the sink
        if sinks is None:
            return out.zero_(), lse.fill_(float("-inf"))
        return out.zero_(), lse.copy_(sinks[:, None].expand(lse.shape) * LOG2E.value)
    (alibi, seed, stride_ab), shifts, meta = _variant_args(q, k, causal, causal_shift, window_left, window_right,
                                                           softcap, alibi_slopes, dropout_p, rng_state, varlen)
    pad_ptr, stride_pb = _pad_args(pad)
    mod_ptrs, mod_strides, mod_meta = _mod_args(mask_mod, block_mask, mask_args, score_mod, score_args, False)
    lse_strides = _strides(lse, bool(varlen))[:2]
    if varlen:
        batch, (n_q, n_k) = varlen_batch, varlen
    args = (q, k, v, out, lse, kv_bounds, pad_ptr, alibi, sinks, seed, cu_seqlens_q, cu_seqlens_k, *mod_ptrs,
            stride_pb, stride_ab, *mod_strides, *lse_strides,
            *(s for t in (q, k, v, out) for s in _strides(t, bool(varlen))), heads, heads // k.shape[1], n_q, n_k,
            *shifts, scale * LOG2E.value, softcap, dropout_p)
    configs.launch("fwd", n_q, batch * heads, args, dict(meta, **mod_meta), (n_q, n_k), dropout=seed is not None)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, pad, causal: bool, causal_shift: int, scale: float,
              window_left: int = -1, window_right: int = -1, softcap: float = 0.0, alibi_slopes=None,
              dropout_p: float = 0.0, rng_state=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0,
              max_seqlen_k: int = 0, mask_mod: int = -1, block_mask=None, mask_args=None, score_mod: int = -1,
              score_args=None):
    """Run the backward kernels: (dq, dk, dv) in the inputs' dtype, contiguous (for packed sequences, views of
    contiguous (total, H, D) tensors, as :func:`_forward`'s out)."""
    batch, heads, n_q, d = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    varlen_batch, varlen = _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv = (_rows_empty(t, bool(varlen)) for t in (q, k, v))
    # The kernels store every element (zeros where no query/key is visible); only an empty side needs zero-filling.
    if not (q.numel() and k.numel()):
        return dq.zero_(), dk.zero_(), dv.zero_()
    (alibi, seed, stride_ab), shifts, meta = _variant_args(q, k, causal, causal_shift, window_left, window_right,
                                                           softcap, alibi_slopes, dropout_p, rng_state, varlen)
    delta = _delta(grad_out, out, lse, grad_lse, meta)
    if varlen:
        batch, (n_q, n_k) = varlen_batch, varlen
    common = (q, k, v, grad_out, lse, delta)
    strides = tuple(s for t in (q, k, v, grad_out) for s in _strides(t, bool(varlen)))
    sizes = (heads, heads // kv_heads, n_q, n_k, *shifts, scale * LOG2E.value, scale, softcap, dropout_p)
    pad_ptr, stride_pb = _pad_args(pad)
    mod_ptrs, mod_strides, mod_meta = _mod_args(mask_mod, block_mask, mask_args, score_mod, score_args, True)
    masks = (kv_bounds, pad_ptr, alibi, seed, cu_seqlens_q, cu_seqlens_k, *mod_ptrs, stride_pb, stride_ab,
             *mod_strides, *_strides(lse, bool(varlen))[:2])
    meta = dict(meta, **mod_meta)
    dropout = seed is not None
    configs.launch("dkdv", n_k, batch * kv_heads,
                   (*common, dk, dv, *masks, *strides, *_strides(dk, bool(varlen)), *sizes), meta, (n_q, n_k),
                   dropout=dropout)
    configs.launch("dq", n_q, batch * heads, (*common, dq, *masks, *strides, *_strides(dq, bool(varlen)), *sizes),
                   meta, (n_q, n_k), dropout=dropout)
    return dq, dk, dv


def _delta(grad_out, out, lse, grad_lse, meta) -> torch.Tensor:
    """rowsum(dO * O) - dlse (B, H, Nq) fp32, by the pre-pass kernel: d lse_i / d s_ij = p_ij folds into delta,
    ds = p * (dp - (delta - dlse)). ``grad_lse`` is the gradient of the log2-unit lse, log2(e) times that of the
    natural one, hence the factor."""
    batch, heads, n_q, _ = out.shape
    delta = torch.empty_like(lse)
    configs.launch_delta((out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n_q), n_q, batch * heads,
                         meta)
    if grad_lse is not None:
        delta -= grad_lse * LOG2E.value
    return delta


# ------------------------------------------------------------------------------------ autograd (torch.library)
_TENSOR_LIST = Optional[List[torch.Tensor]]


def _schema(fn) -> str:
    """``fn``'s op schema as torch.library infers it, except that its Optional[List[Tensor]] parameters become
    ``Tensor[]? name=None``: the dispatcher has the type, ``infer_schema`` does not (and a Tensor[] takes no
    default), and the mods' extra tensors must stay optional for the ops' positional callers."""
    signature = inspect.signature(fn)
    lists = [p.name for p in signature.parameters.values() if p.annotation == _TENSOR_LIST]

    def stand_in():
        pass

    stand_in.__signature__ = signature.replace(parameters=[
        p.replace(annotation=Optional[torch.Tensor]) if p.name in lists else p for p in signature.parameters.values()])
    schema = torch.library.infer_schema(stand_in, mutates_args=())
    for name in lists:
        schema = schema.replace(f"Tensor? {name}=", f"Tensor[]? {name}=")
    return schema


def _op(name: str):
    """``torch.library.custom_op`` of ``fn`` under ``name``, with :func:`_schema`."""
    return lambda fn: torch.library.custom_op(name, fn, mutates_args=(), schema=_schema(fn))


@_op("kernels::flash_attention_forward")
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_bounds: Optional[torch.Tensor],
                pad: Optional[torch.Tensor], causal: bool, causal_shift: int, scale: float, window_left: int = -1,
                window_right: int = -1, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                sinks: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                rng_state: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                mask_mod: int = -1, block_mask: Optional[torch.Tensor] = None,
                mask_args: Optional[List[torch.Tensor]] = None, score_mod: int = -1,
                score_args: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of attention; ``kv_bounds`` (B, 2) int32 [first, last + 1) visible key per batch row and ``pad``
    (B, Nk) uint8 (nonzero = visible) are optional; ``causal_shift`` = Nk - Nq aligns causal bottom-right (it is
    the diagonal the window and ALiBi distances are measured from). The variants' arguments are those of
    :func:`attention`, already checked: window edges (-1 = unbounded), softcap (0 = off), float32 ALiBi slopes
    (H,) or (B, H) and sinks (H,), and dropout with its int64 (seed, offset) pair ``rng_state``.

    Packed sequences (varlen): q, k, v are (1, H, total, D) views of (total, H, D) tensors, ``cu_seqlens_q/k``
    int32 (batch + 1,) on their device and ``max_seqlen_q/k`` bound the lengths (they size the grid);
    ``causal_shift`` is unused (each sequence is bottom-right aligned by itself), ALiBi slopes may be (batch, H),
    and out is a (1, H, total_q, D) view of a contiguous (total_q, H, D) tensor.

    Mods (dense calls only): ``mask_mod``/``score_mod`` are keys of ``block_mask.py``'s registry (-1 = none), with
    the mask's (B, H, L) int32 ``block_mask`` summary and each mod's extra tensors ``mask_args``/``score_args``."""
    with _runtime.launch_device(q):
        return _forward(q, k, v, kv_bounds, pad, causal, causal_shift, scale, window_left, window_right, softcap,
                        alibi_slopes, sinks, dropout_p, rng_state, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, mask_mod, block_mask, mask_args, score_mod, score_args)


@_forward_op.register_fake
def _(q, k, v, *args, cu_seqlens_q=None, **kwargs):
    return _rows_empty(q, cu_seqlens_q is not None), q.new_empty(q.shape[:3], dtype=torch.float32)


@_op("kernels::flash_attention_backward")
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, grad_lse: Optional[torch.Tensor], kv_bounds: Optional[torch.Tensor],
                 pad: Optional[torch.Tensor], causal: bool, causal_shift: int, scale: float, window_left: int = -1,
                 window_right: int = -1, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, rng_state: Optional[torch.Tensor] = None,
                 cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                 max_seqlen_q: int = 0, max_seqlen_k: int = 0, mask_mod: int = -1,
                 block_mask: Optional[torch.Tensor] = None, mask_args: Optional[List[torch.Tensor]] = None,
                 score_mod: int = -1,
                 score_args: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) given the forward's inputs, its (out, lse), and the incoming gradients of out (and lse).
    Sinks need nothing here: lse includes them, so the kernels' probabilities are already right."""
    with _runtime.launch_device(q):
        return _backward(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, pad, causal, causal_shift, scale,
                         window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state, cu_seqlens_q,
                         cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask_mod, block_mask, mask_args, score_mod,
                         score_args)


@_backward_op.register_fake
def _(grad_out, q, k, v, *args, cu_seqlens_q=None, **kwargs):
    return tuple(_rows_empty(t, cu_seqlens_q is not None) for t in (q, k, v))


def _sink_grad(sinks, grad_out, out, lse, grad_lse) -> torch.Tensor:
    """d loss / d sinks (H,): out_i and lse_i depend on sink_h through its probability p_i = exp(sink_h - lse_i)
    alone, d out_i = -p_i out_i and d lse_i = p_i, so dsink_h = -sum over batch and rows of p_i (rowsum(dO_i * O_i)
    - dlse_i). Per-row values reduced by torch.sum: deterministic. ``lse`` and ``grad_lse`` are the log2-unit
    lse and its gradient (see :func:`natural_lse`)."""
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse * LOG2E.value
    return -(torch.exp2(sinks[:, None] * LOG2E.value - lse) * delta).sum((0, 2))


def _setup_context(ctx, inputs, output):
    (q, k, v, kv_bounds, pad, ctx.causal, ctx.causal_shift, ctx.scale, ctx.window_left, ctx.window_right,
     ctx.softcap, alibi_slopes, sinks, ctx.dropout_p, rng_state, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q,
     ctx.max_seqlen_k, ctx.mask_mod, block_mask, mask_args, ctx.score_mod, score_args) = inputs
    mask_args, score_args = list(mask_args or ()), list(score_args or ())
    ctx.n_mask_args = len(mask_args)
    # the block mask's summary is saved, not rebuilt: the backward reuses the forward's
    ctx.save_for_backward(q, k, v, *output, kv_bounds, pad, alibi_slopes, sinks, rng_state, cu_seqlens_q,
                          cu_seqlens_k, block_mask, *mask_args, *score_args)


def _gradients(backward, ctx, grad_out, grad_lse):
    """The inputs' gradients by ``backward`` (the launches, or their custom op) from the saved context."""
    (q, k, v, out, lse, kv_bounds, pad, alibi_slopes, sinks, rng_state, cu_seqlens_q, cu_seqlens_k, block_mask,
     *mod_args) = ctx.saved_tensors
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, pad, ctx.causal, ctx.causal_shift,
                          ctx.scale, ctx.window_left, ctx.window_right, ctx.softcap, alibi_slopes, ctx.dropout_p,
                          rng_state, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.mask_mod,
                          block_mask, mod_args[:ctx.n_mask_args], ctx.score_mod, mod_args[ctx.n_mask_args:])
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[12]:
        dsinks = _sink_grad(sinks, grad_out, out, lse, grad_lse)
    # one gradient per input as the op was called (a list of Nones for a tensor list), none past q, k, v, sinks
    grads = list(torch.utils._pytree.tree_map(lambda _: None, ctx.needs_input_grad))
    grads[:3] = dq, dk, dv
    if sinks is not None:
        grads[12] = dsinks
    return tuple(grads)


_forward_op.register_autograd(lambda ctx, *grads: _gradients(_backward_op, ctx, *grads),
                              setup_context=_setup_context)


def _on_device(launches):
    """``launches`` run with the first tensor's device current (see ``_runtime.launch_device``)."""
    def run(first, *args):
        with _runtime.launch_device(first):
            return launches(first, *args)
    return run


attention_forward = _on_device(_forward)
"""(out, log2-unit lse) of the forward kernel with ``_forward_op``'s arguments, no autograd: for paths with an
autograd of their own (ring attention)."""
attention_backward = _on_device(_backward)
"""(dq, dk, dv) of the backward kernels with ``_backward_op``'s arguments (any (out, lse) the rows were normalised
with: ring attention passes the global ones)."""
_attention_function = autograd_function("FlashAttention", attention_forward, _setup_context,
                                        lambda ctx, *grads: _gradients(attention_backward, ctx, *grads))


def natural_lse(lse: torch.Tensor) -> torch.Tensor:
    """The natural-log logsumexp of the kernels' log2-unit one (lse * ln 2), differentiably: the kernels keep
    lse in base 2 so that the backward recomputes probabilities from exactly what the forward summed."""
    return lse * LN2.value


_DEFAULTS = tuple(p.default for p in inspect.signature(_forward).parameters.values())


def attention_op(*args):
    """(out, lse) of attention with autograd, taking ``_forward_op``'s positional arguments (the trailing ones
    optional): the custom op while torch.compile traces, a plain autograd.Function in eager (``kernels/_autograd.py``:
    the op's dispatch would cost several times the rest of the call's host time)."""
    if torch.compiler.is_compiling():
        return _forward_op(*args)
    return _attention_function(*args, *_DEFAULTS[len(args):])


# ------------------------------------------------------------------------------------------------- public API


def check_qkv(q, k, v) -> None:
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
    if not 1 <= d <= configs.MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be in 1..{configs.MAX_HEAD_DIM}, got q of shape {tuple(q.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"k, v: the number of kv heads must divide q's {heads} heads, got k of shape {tuple(k.shape)}")


def check_scale(scale, d: int) -> float:
    """``scale`` as a float (1/sqrt(d) for None); TypeError unless it is a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def key_bounds(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) int32 [first visible key, last visible key + 1) of a bool (B, Nk) mask, [0, 0) for an all-False row.

    Computed on the mask's device without a host sync (so it traces under ``torch.compile``); the kernels skip
    key blocks outside the range and read the mask itself inside it.
    """
    n_k = mask.shape[1]
    keys = torch.arange(n_k, device=mask.device, dtype=torch.int32)
    start = torch.where(mask, keys, n_k).amin(1, keepdim=True) if n_k else mask.new_zeros(mask.shape[0], 1).int()
    end = torch.where(mask, keys + 1, 0).amax(1, keepdim=True) if n_k else start
    return torch.cat([torch.minimum(start, end), end], 1).to(torch.int32).contiguous()


def _check_padding_mask(mask, q, k) -> None:
    check_tensor("key_padding_mask", mask, ndim=2, dtypes=(torch.bool,))
    if tuple(mask.shape) != (q.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(q.shape[0], k.shape[2])}, "
                         f"got {tuple(mask.shape)}")
    check_same("device", q=q, key_padding_mask=mask)


def check_window(window_size) -> Tuple[int, int]:
    """``window_size`` as (left, right) ints; TypeError unless a pair of ints, ValueError for values below -1."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size values must be >= -1 (-1 = unbounded), got {tuple(window_size)}")
    return int(window_size[0]), int(window_size[1])


def _check_real(name: str, value, low: float, high: float = math.inf, high_open: bool = False) -> float:
    """``value`` as a float; TypeError unless a real number, ValueError outside [low, high] ([low, high))."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not (low <= value < high if high_open else low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")
    return float(value)


def _check_alibi(alibi_slopes, q) -> None:
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
    batch, heads = q.shape[:2]
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (H,) = ({heads},) or (B, H) = {(batch, heads)}, "
                         f"got {tuple(alibi_slopes.shape)}")
    check_same("device", q=q, alibi_slopes=alibi_slopes)


def _check_sinks(sinks, q) -> None:
    check_tensor("sinks", sinks)
    if tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks must have shape (H,) = ({q.shape[1]},), got {tuple(sinks.shape)}")
    check_same("device", q=q, sinks=sinks)


def _check_mods(mask_mod, score_mod, q, k) -> Optional[mods.BlockMask]:
    """The :class:`BlockMask` of ``mask_mod`` for q, k (built here from a mask mod), or None; TypeError/ValueError
    naming the argument for anything else, a mask built for other shapes or device, or extra tensors elsewhere."""
    if score_mod is not None:
        if not isinstance(score_mod, mods.ScoreMod):
            raise TypeError(f"score_mod must be a kernels.ScoreMod(fn, grad_fn, *extra), got {score_mod!r}")
        score_mod.check(q, k)  # its extra tensors: device, and long enough for q, k
    if mask_mod is None or isinstance(mask_mod, mods.BlockMask):
        block_mask = mask_mod
    elif isinstance(mask_mod, (mods.MaskMod, *mods.JIT_TYPES)):
        # create_block_mask checks the mod's extra tensors are on q's device before its launch
        block_mask = mods.create_block_mask(mask_mod, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
    else:
        raise TypeError(f"mask_mod must be a kernels.BlockMask, a kernels.MaskMod or a @triton.jit function, got "
                        f"{mask_mod!r}")
    if block_mask is not None:
        block_mask.check(q, k)  # its device is q's, and its mod's tensors were checked against it when built
    return block_mask


def _mod_op_args(block_mask: Optional[mods.BlockMask], score_mod: Optional[mods.ScoreMod], q) -> tuple:
    """The ops' (mask_mod, block_mask, mask_args, score_mod, score_args) of checked mods (keys -1: none)."""
    mask = (-1, None, None) if block_mask is None else (block_mask.mask_mod.key, block_mask.expanded(*q.shape[:2]),
                                                         block_mask.mask_mod.tensors)
    return (*mask, -1, None) if score_mod is None else (*mask, score_mod.key, score_mod.tensors)


def _draw_rng(device: torch.device) -> torch.Tensor:
    """The int64 (seed, offset) pair of one dropout call, drawn from torch's default generator of ``device`` (so
    ``torch.manual_seed`` makes dropout reproducible); a tensor on the device, so nothing syncs."""
    return torch.randint(2**62, (2,), dtype=torch.int64, device=device)


def attention_dropout_mask(batch: int, heads: int, n_q: int, n_k: int, dropout_p: float,
                           device=None) -> torch.Tensor:
    """The (B, H, Nq, Nk) bool keep-mask that ``attention(..., dropout_p=dropout_p)`` on q of shape (B, H, Nq, D)
    and k of length Nk would draw from the generator's current state, bit for bit (same Philox stream), advancing
    the generator as that call would. Probabilities are kept where True and scaled by 1 / (1 - dropout_p)."""
    sizes = {"batch": batch, "heads": heads, "n_q": n_q, "n_k": n_k}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise ValueError(f"{name} must be a non-negative int, got {size!r}")
    dropout_p = _check_real("dropout_p", dropout_p, 0.0, 1.0, high_open=True)
    device = torch.device("cpu" if device is None else device)
    rng_state = _draw_rng(device)
    mask = torch.zeros((batch, heads, n_q, n_k), dtype=torch.uint8, device=device)
    if mask.numel():
        with _runtime.launch_device(rng_state):
            configs.launch_dropout_mask(rng_state, mask, dropout_p)
    return mask.view(torch.bool)


def _reference_with_lse(q, k, v, causal: bool, scale: float, key_padding_mask, **variants):
    """The documented fallback: kernels.reference.attention, plus its logsumexp (float32, as the kernel's)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out, lse = reference.attention(q, k, v, causal=causal, scale=scale, mask=mask, return_lse=True, **variants)
    return out, lse.to(torch.promote_types(lse.dtype, torch.float32))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: Optional[float] = None,
              return_lse: bool = False, key_padding_mask: Optional[torch.Tensor] = None, *,
              window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              sinks: Optional[torch.Tensor] = None, mask_mod=None, score_mod: Optional[mods.ScoreMod] = None):
    """Fused attention ``softmax(scale * q @ k^T + mask) @ v`` with autograd for q, k, v (and sinks).

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D), H a multiple of Hkv (GQA/MQA without repeating k/v), 1 <= D <= 256,
    fp16/bf16/fp32, any strides. ``scale`` defaults to 1/sqrt(D). ``causal`` is bottom-right aligned: query i
    sees key j iff j <= i + Nk - Nq. ``key_padding_mask``: optional bool (B, Nk), True = real key (any pattern;
    key blocks outside each row's first..last True are skipped). Rows that see no key give zeros.
    Returns out (B, H, Nq, D) in q's dtype, and with ``return_lse`` also lse (B, H, Nq) float32, the natural-log
    logsumexp of the scaled, masked scores (-inf for rows that see no key).

    Variants, with flash-attn 2.x's semantics (shift = Nk - Nq; positions are indices into the padded tensors,
    also under ``key_padding_mask``):

    - ``window_size=(left, right)``: query i sees keys i + shift - left <= j <= i + shift + right; -1 leaves a side
      unbounded; ``causal`` sets right to 0. Key blocks outside the window are never read: O(N * window).
    - ``softcap > 0``: the scaled score s becomes softcap * tanh(s / softcap) (before ALiBi and masks).
    - ``alibi_slopes``: float32 (H,) or (B, H); adds -slope * |i + shift - j| to the (capped) score.
    - ``sinks``: float (H,) per-head logits in every row's softmax denominator with no value (GPT-OSS):
      out_i = sum_j exp(s_ij) v_j / (exp(sink_h) + sum_j exp(s_ij)); differentiable. lse includes the sink (so a
      row that sees no key has lse = sink_h and zeros).
    - ``dropout_p`` in [0, 1): dropout on the probabilities, Philox in the kernels, seeded from torch's default
      generator of q's device (``torch.manual_seed`` reproduces it; :func:`attention_dropout_mask` returns the
      mask a call would use); the backward regenerates the mask. lse is of the undropped probabilities.
    - ``mask_mod``: a user mask (FlexAttention-style, see ``kernels/attention/block_mask.py``): a
      :class:`kernels.BlockMask` from :func:`kernels.create_block_mask` (computed once, reusable across calls and
      layers), or a :class:`kernels.MaskMod` / bare ``@triton.jit`` ``mask_mod(b, h, q_idx, kv_idx, *extra)``
      (its block mask is built per call). Combined with every other mask by AND; 128 x 128 cells it hides
      entirely are never read.
    - ``score_mod``: a :class:`kernels.ScoreMod` (``score_mod(score, b, h, q_idx, kv_idx, *extra)`` and its
      derivative in the score) applied to the scaled score before softcap and ALiBi.

    Reverse-mode autograd only: forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) raises.
    """
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    if key_padding_mask is not None:
        _check_padding_mask(key_padding_mask, q, k)
    window_left, window_right = check_window(window_size)
    softcap = _check_real("softcap", softcap, 0.0, math.inf, high_open=True)
    dropout_p = _check_real("dropout_p", dropout_p, 0.0, 1.0, high_open=True)
    if alibi_slopes is not None:
        _check_alibi(alibi_slopes, q)
    if sinks is not None:
        _check_sinks(sinks, q)
    block_mask = _check_mods(mask_mod, score_mod, q, k)
    _runtime.refuse_forward_ad("kernels.attention", q, k, v)
    if not _runtime.kernel_runs_on(q, k, v):
        if dropout_p > 0 or block_mask is not None or score_mod is not None:
            raise RuntimeError("kernels.attention: dropout and mask/score mods need the Triton kernels (Philox "
                               "streams and @triton.jit mods), which cannot run on these inputs in this process")
        out, lse = _reference_with_lse(q, k, v, causal, scale, key_padding_mask, window_size=(window_left, window_right),
                                       softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    else:
        bounds = pad = None
        if key_padding_mask is not None:
            bounds, pad = key_bounds(key_padding_mask), key_padding_mask.contiguous().view(torch.uint8)
        out, lse = attention_op(q, k, v, bounds, pad, bool(causal), k.shape[2] - q.shape[2], scale, window_left,
                               window_right, softcap, None if alibi_slopes is None else alibi_slopes.contiguous(),
                               None if sinks is None else sinks.float(), dropout_p,
                               _draw_rng(q.device) if dropout_p > 0 else None, None, None, 0, 0,
                               *_mod_op_args(block_mask, score_mod, q))
        lse = natural_lse(lse)
    return (out, lse) if return_lse else out
