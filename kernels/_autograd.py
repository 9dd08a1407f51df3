"""The eager autograd layer every kernel family shares: one set of plain functions, two autograd.Function shapes.

torch offers two ways to write an autograd.Function, and each is the fast or the only one somewhere:

- the classic one (``forward(ctx, *args)``) costs the least per call: ``Function.apply`` binds no signature;
- the ``setup_context`` one is the only one torch.func transforms (vmap, grad, jacfwd, ...) accept, and on every
  call ``Function.apply`` runs ``inspect.signature(forward).bind`` for it (about 15 µs of host time, more than the
  rest of a small op's Python path).

:func:`autograd_function` builds both from the same functions and picks per call, so eager calls pay for neither
the signature binding nor a ``torch.library`` custom op's dispatch (flash-attn's pattern: the custom op is kept for
``torch.compile`` only, where each family calls it while ``torch.compiler.is_compiling()``). Inference (no_grad,
inference_mode, no forward-AD level) calls the forward alone: there is no graph to record, as torch's own ops skip
autograd there.
"""
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._C import _functions


def autograd_function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
                      jvp: Optional[Callable] = None) -> Callable:
    """``apply(*args)`` running ``forward(*args)`` with ``backward(ctx, *grads)`` (and ``jvp(ctx, *tangents)``).

    ``setup_context(ctx, inputs, output)`` saves what the backward (and jvp) need, as torch's hook of that name.
    Under a torch.func transform the call goes through the ``setup_context``-style class (with torch's generated
    vmap rule); otherwise through the classic one.
    """
    def classic_forward(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    methods = {"backward": staticmethod(backward)}
    if jvp is not None:
        methods["jvp"] = staticmethod(jvp)
    classic = type(name, (torch.autograd.Function,), {**methods, "forward": staticmethod(classic_forward),
                                                      "backward": staticmethod(per_sample_backward(backward))})
    for_transforms = type(f"{name}ForTransforms", (torch.autograd.Function,),
                          {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
                           "generate_vmap_rule": True, **methods})
    transforms_active = torch._C._are_functorch_transforms_active
    # What classic.apply runs outside transforms (its class has no setup_context, so no signature binding), called
    # without Function.apply's Python layer: about 1.5 µs a call
    classic_apply = super(torch.autograd.Function, classic).apply

    def apply(*args):
        if transforms_active():
            return for_transforms.apply(*args)
        # Function.apply unwraps every dead functorch wrapper (a tensor a finished torch.func transform left
        # wrapped) outside transforms: so does this, inline (a helper's frame costs more than the common case's
        # test), exact types first (a plain tensor, or None and Python scalars: no isinstance call for them)
        for arg in args:
            kind = type(arg)
            if (kind is _TENSOR or kind not in _NOT_TENSORS and isinstance(arg, _TENSOR)) and _is_wrapped(arg):
                args = _without_dead_wrappers(args)
                break
        if not _grad_enabled() and _forward_ad._current_level < 0:
            # inference (no_grad, inference_mode): nothing to record, so no Function, whose apply alone costs
            # about 5 µs of host time; its forward runs without grad too. The forwards allocate every output
            # (none is an input), so no alias differs from what apply would return.
            return forward(*args)
        return classic_apply(*args)

    apply.__name__ = apply.__qualname__ = name
    return apply


_TENSOR = torch.Tensor
_NOT_TENSORS = frozenset((type(None), bool, int, float))
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_grad_enabled = torch.is_grad_enabled
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _without_dead_wrappers(args: tuple) -> tuple:
    """``args`` with every dead functorch wrapper unwrapped, as ``Function.apply`` does outside transforms."""
    return tuple(_unwrap_if_dead(a) if isinstance(a, _TENSOR) else a for a in args)


_is_batched = torch._C._functorch.is_batchedtensor
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
_level = torch._C._functorch.maybe_get_level
_unwrap_batched = torch._C._functorch._unwrap_batched
_add_batch_dim = torch._C._functorch._add_batch_dim
_transforms_active = torch._C._are_functorch_transforms_active


def _legacy_vmap_level() -> int:
    """The innermost level of torch's legacy vmap (``torch._vmap_internals``), which has no getter."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


def _unbatched(grads: tuple):
    """(grads with the outermost batched level's dim moved out, as (tensor, its batch dim or None) pairs, and a
    function batching a stacked result again at that level), or None when no gradient is batched. torch.vmap's
    batched tensors (``torch.func.vmap`` over ``torch.autograd.grad``) and the legacy vmap's
    (``is_grads_batched=True``, ``jacobian(vectorize=True)``, which leaves no functorch transform active)."""
    if any(isinstance(g, _TENSOR) and _is_legacy_batched(g) for g in grads):
        level = _legacy_vmap_level()
        # batch_size only sizes an expansion of a tensor without the level: every legacy-batched gradient has
        # it (one level per vmap of autograd.grad)
        return ([(torch._remove_batch_dim(g, level, 0, 0), 0) if isinstance(g, _TENSOR) and _is_legacy_batched(g)
                 else (g, None) for g in grads], lambda t: torch._add_batch_dim(t, 0, level))
    if not _transforms_active():
        return None
    levels = [_level(g) for g in grads if isinstance(g, _TENSOR) and _is_batched(g)]
    if not levels:
        return None
    level = max(levels)
    return ([_unwrap_batched(g, level) if isinstance(g, _TENSOR) and _level(g) == level else (g, None)
             for g in grads], lambda t: _add_batch_dim(t, 0, level))


def per_sample_backward(backward: Callable) -> Callable:
    """``backward(ctx, *grads)`` that also takes incoming gradients batched by a vmap: ``torch.autograd.grad(...,
    is_grads_batched=True)``, ``torch.autograd.functional.jacobian(..., vectorize=True)`` and ``torch.func.vmap``
    over ``torch.autograd.grad`` run the classic Function's backward on batched gradients, which a Triton launch
    cannot read (torch's 'Cannot access storage of BatchedTensorImpl'). It runs ``backward`` once per sample and
    batches the gradients again. Under a microsecond when no gradient is batched."""
    def batched_backward(ctx, *grads):
        for g in grads:  # a loop and exact types: this runs in every backward
            if type(g) is _TENSOR and _is_legacy_batched(g):
                break
        else:
            if not _transforms_active():
                return backward(ctx, *grads)
        unbatched = _unbatched(grads)
        if unbatched is None:
            return backward(ctx, *grads)
        pairs, batch = unbatched
        size = next(t.shape[dim] for t, dim in pairs if dim is not None)
        samples = [batched_backward(ctx, *(t if dim is None else t.select(dim, i) for t, dim in pairs))
                   for i in range(size)]
        return tuple(None if results[0] is None else batch(torch.stack(results)) for results in zip(*samples))
    return batched_backward


def first_order_only(name: str, backward: Callable) -> Callable:
    """``backward(ctx, *grads)`` of a Function whose backward kernels have no derivative: a plain backward runs it
    as it is; under ``create_graph=True`` (grad mode on inside a backward: double backward, torch.func.grad of a
    gradient) it runs without a graph and its gradients come out behind a node that raises if a second backward
    reaches them (torch's flash SDPA behaves so), instead of as constants that would make that backward silently
    wrong. Unlike ``once_differentiable`` this also marks gradients whose incoming grads need none (dq depends on
    the saved q, k, v whatever dO is)."""
    message = (f"{name}: its backward is not differentiable (no double backward: the gradients of a "
               f"create_graph=True backward cannot be differentiated again)").encode()

    def first_order_backward(ctx, *grads):
        if not torch.is_grad_enabled():  # every plain backward
            return backward(ctx, *grads)
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not any(ctx.needs_input_grad):
            return results
        present = [i for i, g in enumerate(results) if isinstance(g, _TENSOR)]
        # The raising node's inputs depend on every tensor the gradients do (the saved inputs, the incoming grads):
        # torch.autograd.grad(f(gradients), inputs) only runs nodes on a path to the inputs, so without that link
        # it found the inputs unused, or silently dropped this part where they were used elsewhere. The link is
        # an empty slice's sum: exactly 0 whatever the values (0 * x would be NaN for an infinite x).
        links = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, _TENSOR) and t.requires_grad]
        zero = sum(t.reshape(-1)[:0].sum() for t in links)
        aliases = [results[i].detach() + zero if links else results[i].detach().requires_grad_() for i in present]
        raising = _functions.DelayedError(message, len(aliases))(*aliases)
        results = list(results)
        for i, g in zip(present, raising if isinstance(raising, tuple) else (raising,)):
            results[i] = g
        return tuple(results)
    return first_order_backward
