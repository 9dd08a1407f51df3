"""Fused attention's public function, its launchers and its autograd (torch.library custom ops).

:func:`attention` takes q (B, H, Nq, D) and k, v (B, Hkv, Nk, D) (see ``kernels.py`` for the math and the
kernels). The forward and backward are ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` keeps a
launch in one graph; they are also the building blocks of other attention paths (e.g. context parallelism):
``_forward_op`` returns (out, lse), ``_backward_op`` the gradients given any (out, lse) the rows were normalised
with.

Fallback (documented, never silent about the math): if the Triton kernels cannot run on the inputs in this
process (see ``kernels._runtime.kernel_runs_on``) :func:`attention` uses ``kernels.reference.attention``.
"""
import math
import numbers
from typing import Optional, Tuple

import torch

from kernels import _runtime, reference
from kernels._validate import check_same, check_tensor
from kernels.attention import configs
from kernels.attention.kernels import LOG2E

# --------------------------------------------------------------------------------------------------- launchers


def _pad_args(pad: Optional[torch.Tensor]):
    """The kernels' (PAD, stride_pb) arguments of a (B, Nk) uint8 padding mask with unit key stride, or none."""
    return (None, 0) if pad is None else (pad, pad.stride(0))


def _forward(q, k, v, kv_bounds, pad, causal: bool, causal_shift: int, scale: float):
    """Run the forward kernel: (out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32)."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or n_k == 0:  # nothing to launch: rows that see no key are zeros with lse -inf
        return out.zero_(), lse.fill_(float("-inf"))
    args = (q, k, v, out, lse, kv_bounds, *_pad_args(pad), *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, heads // k.shape[1], n_q, n_k, causal_shift, scale * LOG2E.value)
    configs.launch("fwd", n_q, batch * heads, args, configs.kernel_meta(q, causal), (n_q, n_k))
    return out, lse


def _backward(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, pad, causal: bool, causal_shift: int, scale: float):
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
    meta = configs.kernel_meta(q, causal)
    delta = torch.empty_like(lse)
    configs.launch_delta((out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n_q), n_q, batch * heads,
                         meta)
    if grad_lse is not None:  # d lse_i / d s_ij = p_ij, which folds into delta: ds = p * (dp - (delta - dlse))
        delta -= grad_lse
    common = (q, k, v, grad_out, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    sizes = (heads, heads // kv_heads, n_q, n_k, causal_shift, scale * LOG2E.value, scale)
    masks = (kv_bounds, *_pad_args(pad))
    configs.launch("dkdv", n_k, batch * kv_heads, (*common, dk, dv, *masks, *strides, *dk.stride(), *sizes), meta,
                   (n_q, n_k))
    configs.launch("dq", n_q, batch * heads, (*common, dq, *masks, *strides, *dq.stride(), *sizes), meta, (n_q, n_k))
    return dq, dk, dv


# ------------------------------------------------------------------------------------ autograd (torch.library)


@torch.library.custom_op("kernels::flash_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_bounds: Optional[torch.Tensor],
                pad: Optional[torch.Tensor], causal: bool, causal_shift: int,
                scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of attention; ``kv_bounds`` (B, 2) int32 [first, last + 1) visible key per batch row and ``pad``
    (B, Nk) uint8 (nonzero = visible) are optional; ``causal_shift`` = Nk - Nq aligns causal bottom-right."""
    with _runtime.launch_device(q):
        return _forward(q, k, v, kv_bounds, pad, causal, causal_shift, scale)


@_forward_op.register_fake
def _(q, k, v, kv_bounds, pad, causal, causal_shift, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("kernels::flash_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, grad_lse: Optional[torch.Tensor], kv_bounds: Optional[torch.Tensor],
                 pad: Optional[torch.Tensor], causal: bool, causal_shift: int,
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) given the forward's inputs, its (out, lse), and the incoming gradients of out (and lse)."""
    with _runtime.launch_device(q):
        return _backward(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, pad, causal, causal_shift, scale)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, pad, causal, causal_shift, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_bounds, pad, ctx.causal, ctx.causal_shift, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output, kv_bounds, pad)


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_bounds, pad = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, pad,
                              ctx.causal, ctx.causal_shift, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


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


def _reference_with_lse(q, k, v, causal: bool, scale: float, key_padding_mask):
    """The documented fallback: kernels.reference.attention, plus its logsumexp (float32, as the kernel's)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out, lse = reference.attention(q, k, v, causal=causal, scale=scale, mask=mask, return_lse=True)
    return out, lse.to(torch.promote_types(lse.dtype, torch.float32))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: Optional[float] = None,
              return_lse: bool = False, key_padding_mask: Optional[torch.Tensor] = None):
    """Fused attention ``softmax(scale * q @ k^T + mask) @ v`` with autograd for q, k, v.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D), H a multiple of Hkv (GQA/MQA without repeating k/v), 1 <= D <= 256,
    fp16/bf16/fp32, any strides. ``scale`` defaults to 1/sqrt(D). ``causal`` is bottom-right aligned: query i
    sees key j iff j <= i + Nk - Nq. ``key_padding_mask``: optional bool (B, Nk), True = real key (any pattern;
    key blocks outside each row's first..last True are skipped). Rows that see no key give zeros.
    Returns out (B, H, Nq, D) in q's dtype, and with ``return_lse`` also lse (B, H, Nq) float32, the natural-log
    logsumexp of the scaled, masked scores (-inf for rows that see no key).

    Reverse-mode autograd only: forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) raises.
    """
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    if key_padding_mask is not None:
        _check_padding_mask(key_padding_mask, q, k)
    _runtime.refuse_forward_ad("kernels.attention", q, k, v)
    if not _runtime.kernel_runs_on(q, k, v):
        out, lse = _reference_with_lse(q, k, v, causal, scale, key_padding_mask)
    else:
        bounds = pad = None
        if key_padding_mask is not None:
            bounds, pad = key_bounds(key_padding_mask), key_padding_mask.contiguous().view(torch.uint8)
        out, lse = _forward_op(q, k, v, bounds, pad, bool(causal), k.shape[2] - q.shape[2], scale)
    return (out, lse) if return_lse else out
