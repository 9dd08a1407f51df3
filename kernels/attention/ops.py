"""Attention's autograd: :func:`attention_op` for every attention path (dense, varlen, the SDPA shim) while
torch.compile traces, and in eager too but for flash-attn's (B, S, H, D) layout and varlen's packed one, which
have their own eager entries (:func:`attention_seq_first_op`, :func:`attention_packed_op`).

In eager it is a plain autograd.Function over ``plan.py``'s launches (``kernels/_autograd.py``); while
torch.compile traces, the same launches go through the ``torch.library`` custom ops ``_forward_op`` /
``_backward_op``, so ``torch.compile(fullgraph=True)`` keeps each launch in one graph (flash-attn's pattern: the
custom op's dispatch would cost several times the rest of an eager call's host time). :data:`attention_forward`
and :data:`attention_backward` are the launches without autograd, for paths with an autograd of their own (ring
attention). lse is in the kernels' log2 units throughout; :func:`natural_lse` gives the natural one.
"""
import dataclasses
import inspect
import re
from typing import List, Optional, Tuple

import torch

from kernels import _runtime
from kernels._autograd import autograd_function, first_order_only
from kernels.attention import plan
from kernels.attention.kernels import LN2, LOG2E
from kernels.attention.plan import NO_TENSORS, AttentionVariant, VariantTensors

_FIELDS = tuple(field.name for field in dataclasses.fields(AttentionVariant))


def _on_device(launches):
    """``launches`` run with the first tensor's device current (see ``_runtime.launch_device``)."""
    def run(first, *args):
        with _runtime.launch_device(first):
            return launches(first, *args)
    return run


attention_forward = _on_device(plan.forward)
"""(out, log2-unit lse) of ``plan.forward(q, k, v, tensors, variant)``, no autograd."""


def attention_backward(grad_out, q, k, v, out, lse, *args):
    """(dq, dk, dv) of ``plan.backward(grad_out, q, k, v, out, lse, grad_lse, tensors, variant)``, no autograd: any
    (out, lse) the rows were normalised with (ring attention passes the global ones)."""
    if not lse.is_contiguous():  # the kernels read lse and delta (made like it, written densely) by lse's strides,
        lse = lse.contiguous()  # and a saved-tensors hook may hand it back in another layout (the rest go by strides)
    with _runtime.launch_device(grad_out):
        return plan.backward(grad_out, q, k, v, out, lse, *args)


def natural_lse(lse: torch.Tensor) -> torch.Tensor:
    """The natural-log logsumexp of the kernels' log2-unit one (lse * ln 2), differentiably: the kernels keep
    lse in base 2 so that the backward recomputes probabilities from exactly what the forward summed."""
    return lse * LN2.value


def _sink_grad(sinks, grad_out, out, lse, grad_lse) -> torch.Tensor:
    """d loss / d sinks (H,): out_i and lse_i depend on sink_h through its probability p_i = exp(sink_h - lse_i)
    alone, d out_i = -p_i out_i and d lse_i = p_i, so dsink_h = -sum over batch and rows of p_i (rowsum(dO_i * O_i)
    - dlse_i). Per-row values reduced by torch.sum: deterministic. ``lse`` and ``grad_lse`` are the log2-unit
    lse and its gradient."""
    delta = (grad_out.float() * out.float()).sum(-1)
    if delta.dim() == 2:  # packed sequences' (total, H): as their lse's (1, H, total)
        delta = delta.t()[None]
    if grad_lse is not None:
        delta = delta - grad_lse * LOG2E.value
    return -(torch.exp2(sinks[:, None] * LOG2E.value - lse) * delta).sum((0, 2))


# ------------------------------------------------------------------------------------------- saved context


def save_context(ctx, q, k, v, output, tensors: VariantTensors, variant: AttentionVariant) -> None:
    """Save what the backward reads: the inputs, (out, lse) and the variant's tensors (the block mask's summary
    too: the backward reuses the forward's, never rebuilds it)."""
    ctx.variant = variant
    if tensors is NO_TENSORS:  # a plain call: nothing more to save, or to rebuild in the backward
        ctx.save_for_backward(q, k, v, *output)
        return
    if tensors.cu_seqlens_q is None:
        if tensors.padding_only():  # a key padding mask alone: its two tensors (each saved slot, None too, costs)
            ctx.save_for_backward(q, k, v, *output, tensors.kv_bounds, tensors.pad)
            return
    elif tensors.offsets_only():  # packed sequences' offsets alone (varlen): their two tensors
        ctx.offsets_only = True
        ctx.save_for_backward(q, k, v, *output, tensors.cu_seqlens_q, tensors.cu_seqlens_k)
        return
    if tensors.mask_args is None and tensors.score_args is None:  # no mod's tensors (ALiBi, sinks, dropout, ...)
        ctx.save_for_backward(q, k, v, *output, *tensors[:-2])
        return
    mask_args, score_args = list(tensors.mask_args or ()), list(tensors.score_args or ())
    ctx.n_mask_args = len(mask_args)
    ctx.save_for_backward(q, k, v, *output, *tensors[:-2], *mask_args, *score_args)


def _saved_tensors(ctx, saved: tuple) -> VariantTensors:
    """The :class:`VariantTensors` :func:`save_context` saved after q, k, v, out and lse (none: NO_TENSORS)."""
    if not saved:
        return NO_TENSORS
    if len(saved) == 2:  # a key padding mask's (kv_bounds, pad) or the offsets: the others save 8 slots or more
        if getattr(ctx, "offsets_only", False):
            return VariantTensors(None, None, None, None, None, *saved)  # by position: cu_seqlens_q/k
        return VariantTensors(*saved)
    n_fixed = len(VariantTensors._fields) - 2
    if len(saved) == n_fixed:  # no mod's tensors (None and empty lists alike: kernel_extra takes either)
        return VariantTensors(*saved)
    mod_args = saved[n_fixed:]
    return VariantTensors(*saved[:n_fixed], mod_args[:ctx.n_mask_args], mod_args[ctx.n_mask_args:])


def gradients(backward, ctx, grad_out, grad_lse):
    """(dq, dk, dv, dsinks or None) by ``backward`` (the launches, or their custom op) from the saved context."""
    q, k, v, out, lse, *saved = ctx.saved_tensors
    tensors = _saved_tensors(ctx, saved)
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, grad_lse, tensors, ctx.variant)
    sinks = tensors.sinks
    dsinks = None if sinks is None else _sink_grad(sinks, grad_out, out, lse, grad_lse)
    return dq, dk, dv, dsinks


# ------------------------------------------------------------------------------------------------ eager path


def _setup_eager(ctx, inputs, output):
    q, k, v, _sinks, tensors, variant = inputs
    save_context(ctx, q, k, v, output, tensors, variant)
    ctx.set_materialize_grads(False)  # an unused lse costs the backward nothing


def _out_grad(ctx, grad_out: Optional[torch.Tensor]) -> torch.Tensor:
    """dO as the kernels take it: zeros (laid out as the saved out) where only lse was used."""
    return torch.zeros_like(ctx.saved_tensors[3]) if grad_out is None else grad_out


def _eager_backward(layout: int):
    """The eager Function's backward: :data:`attention_backward` (looked up per call) of tensors in ``layout``
    (``plan.HEADS_FIRST``, ``SEQ_FIRST``, ``PACKED``)."""
    def launch_backward(*args):
        return attention_backward(*args, layout)

    def backward(ctx, grad_out, grad_lse):
        dq, dk, dv, dsinks = gradients(launch_backward, ctx, _out_grad(ctx, grad_out), grad_lse)
        return dq, dk, dv, (dsinks if ctx.needs_input_grad[3] else None), None, None
    return first_order_only("kernels.attention", backward)


def _layout_function(name: str, layout: int):
    """The eager autograd.Function ``apply(q, k, v, sinks, tensors, variant)`` -> (out, log2-unit lse) of q, k, v in
    ``layout``, launched on them as they are (``plan.forward``'s ``layout``): out and the gradients come in the
    inputs' layout, lse (B, H, Nq) as ever, and autograd records no view either way."""
    def forward(q, k, v, sinks, tensors, variant):
        with _runtime.launch_device(q):  # attention_forward's, without its layer of arguments
            return plan.forward(q, k, v, tensors, variant, layout)
    return autograd_function(name, forward, _setup_eager, _eager_backward(layout))


_attention_function = _layout_function("FlashAttention", plan.HEADS_FIRST)
_seq_first_function = _layout_function("FlashAttentionSeqFirst", plan.SEQ_FIRST)
"""flash-attn's (B, S, H, D) q, k, v."""
_packed_function = _layout_function("FlashAttentionVarlen", plan.PACKED)
"""Varlen's packed q (total_q, H, D), k, v (total_k, Hkv, D): out (total_q, H, D), lse (1, H, total_q)."""


def attention_seq_first_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: VariantTensors,
                           variant: AttentionVariant) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H, D), log2-unit lse (B, H, Nq)) of q (B, Nq, H, D), k, v (B, Nk, Hkv, D) (flash-attn's layout),
    in eager (the callers use :func:`attention_op` on transposed views while torch.compile traces)."""
    return _seq_first_function(q, k, v, tensors.sinks, tensors, variant)


def attention_packed_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: VariantTensors,
                        variant: AttentionVariant) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, H, D), log2-unit lse (1, H, total_q)) of packed q (total_q, H, D), k, v (total_k, Hkv, D)
    (``tensors`` with cu_seqlens), in eager (varlen uses :func:`attention_op` on (1, H, total, D) views while
    torch.compile traces)."""
    return _packed_function(q, k, v, tensors.sinks, tensors, variant)


# ----------------------------------------------------------------------------------- traced path (torch.library)
_TENSOR_LIST = Optional[List[torch.Tensor]]


def _schema(fn) -> str:
    """``fn``'s op schema as torch.library infers it, except that its Optional[List[Tensor]] parameters become
    ``Tensor[]? name``: the dispatcher has the type, ``infer_schema`` does not."""
    signature = inspect.signature(fn)
    lists = [p.name for p in signature.parameters.values() if p.annotation == _TENSOR_LIST]

    def stand_in():
        pass

    stand_in.__signature__ = signature.replace(parameters=[
        p.replace(annotation=Optional[torch.Tensor]) if p.name in lists else p for p in signature.parameters.values()])
    schema = torch.library.infer_schema(stand_in, mutates_args=())
    for name in lists:
        schema = re.sub(rf"Tensor\? {name}\b", f"Tensor[]? {name}", schema)
    return schema


def _op(name: str, leading: Tuple[Tuple[str, type], ...], returns: type):
    """``torch.library.custom_op`` under ``name`` of ``fn(*leading, *variant)``: its op signature is the
    ``leading`` (name, type) tensors, then :class:`VariantTensors`' and :class:`AttentionVariant`'s fields as
    they are declared, so a new variant field needs no edit here (schema: :func:`_schema`)."""
    fields = (*leading, *VariantTensors.__annotations__.items(),
              *((field.name, field.type) for field in dataclasses.fields(AttentionVariant)))
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
                  for name, annotation in fields]

    def register(fn):
        fn.__signature__ = inspect.Signature(parameters, return_annotation=returns)
        return torch.library.custom_op(name, fn, mutates_args=(), schema=_schema(fn))
    return register


def _flat(tensors: VariantTensors, variant: AttentionVariant) -> tuple:
    """The ops' arguments after q, k, v (and the backward's leading tensors): the tensors, then the variant."""
    return (*tensors, *(getattr(variant, name) for name in _FIELDS))


def _unflat(args: tuple) -> Tuple[VariantTensors, AttentionVariant]:
    n = len(VariantTensors._fields)
    return VariantTensors(*args[:n]), AttentionVariant(*args[n:])


_TENSOR = torch.Tensor


@_op("kernels::flash_attention_forward", (("q", _TENSOR), ("k", _TENSOR), ("v", _TENSOR)), Tuple[_TENSOR, _TENSOR])
def _forward_op(q, k, v, *variant_args):
    """(out, log2-unit lse): ``plan.forward`` with :class:`VariantTensors` and :class:`AttentionVariant` spelled
    out, as the dispatcher takes arguments."""
    return attention_forward(q, k, v, *_unflat(variant_args))


@_forward_op.register_fake
def _(q, k, v, kv_bounds, pad, alibi_slopes, sinks, rng_state, cu_seqlens_q, *rest):
    return plan.rows_empty(q, cu_seqlens_q is not None), q.new_empty(q.shape[:3], dtype=torch.float32)


@_op("kernels::flash_attention_backward",
     (*((name, _TENSOR) for name in ("grad_out", "q", "k", "v", "out", "lse")), ("grad_lse", Optional[_TENSOR])),
     Tuple[_TENSOR, _TENSOR, _TENSOR])
def _backward_op(grad_out, q, k, v, out, lse, grad_lse, *variant_args):
    """(dq, dk, dv): ``plan.backward`` spelled out as :func:`_forward_op`."""
    return attention_backward(grad_out, q, k, v, out, lse, grad_lse, *_unflat(variant_args))


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, kv_bounds, pad, alibi_slopes, sinks, rng_state, cu_seqlens_q, *rest):
    return plan.gradients_empty(q, k, cu_seqlens_q is not None)


_SINKS = 3 + VariantTensors._fields.index("sinks")
"""The forward op's input index of ``sinks``."""


def _setup_traced(ctx, inputs, output):
    q, k, v, *rest = inputs
    tensors, variant = _unflat(tuple(rest))
    save_context(ctx, q, k, v, output, tensors, variant)


def _traced_backward(ctx, grad_out, grad_lse):
    dq, dk, dv, dsinks = gradients(
        lambda *args: _backward_op(*args[:7], *_flat(*args[7:])), ctx, grad_out, grad_lse)
    # one gradient per input as the op was called (a list of Nones for a tensor list), none past q, k, v, sinks
    grads = list(torch.utils._pytree.tree_map(lambda _: None, ctx.needs_input_grad))
    grads[:3] = dq, dk, dv
    if ctx.needs_input_grad[_SINKS]:
        grads[_SINKS] = dsinks
    return tuple(grads)


_forward_op.register_autograd(_traced_backward, setup_context=_setup_traced)


def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: VariantTensors,
                 variant: AttentionVariant) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, log2-unit lse) with autograd for q, k, v and sinks: the custom op while torch.compile traces, the
    eager autograd.Function otherwise."""
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, *_flat(tensors, variant))
    return _attention_function(q, k, v, tensors.sinks, tensors, variant)
