"""``patch(model)``: put the fused kernels into a model in place, weights untouched.

- :class:`transformer.GPT`, the model itself or any module inside it (torch.compile's wrapper, a user's model
  holding one): switch its backend to ``"triton"``.
- any ``torch.nn.Module``: turn its ``nn.LayerNorm`` / ``nn.RMSNorm`` submodules (and Hugging Face's Llama- and
  Gemma-style RMSNorms) into ``kernels.LayerNorm`` / ``kernels.RMSNorm`` in place: the same module objects with
  the same Parameters and hooks, only their class changes.
- Hugging Face ``transformers`` models, the model itself or any inside it (as for a GPT): also register the
  attention kernel and its mask function (``transformer/hf.py``) with transformers and switch the model to them
  (``hf.use_kernel_attention``).

``transformers`` is optional: it is never imported here (a model holding one of its ``PreTrainedModel``s has).
"""
import copy
import inspect
import math
import numbers
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import kernels
from kernels.layernorm import DEFAULT_CASTING_MODE, torch_rms_norm
from transformer.hf import use_kernel_attention
from transformer.model import GPT


def patch(model: nn.Module) -> nn.Module:
    """Swap the fused kernels into ``model`` in place and return it (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():  # a GPT may sit inside a wrapper (torch.compile's OptimizedModule, DDP)
        if isinstance(module, GPT):
            module.set_backend("triton")
    _replace_norms(model)
    for hf_model in _hf_models(model):  # the model itself, or inside a wrapper as a GPT may be
        use_kernel_attention(hf_model)
    return model


# ----------------------------------------------------------------------------------------------- norms


def _replace_norms(model: nn.Module) -> None:
    """Give each plain norm of ``model`` its kernel class in place. The module object stays, so its Parameters
    (requires_grad, an optimizer's references), its sharing between parents and its hooks stay too."""
    for module in model.modules():  # each module once, however many parents share it
        kernel_norm = _kernel_norm(module)
        if kernel_norm is not None:
            cls, attributes = kernel_norm
            module.__class__ = cls
            for name, value in attributes.items():
                setattr(module, name, value)


def _kernel_norm(module: nn.Module) -> Optional[Tuple[type, Dict[str, object]]]:
    """(kernel class, the attributes it reads that ``module`` lacks) for a plain norm, or None for anything else
    (a subclass of nn.LayerNorm / nn.RMSNorm may change forward: it is left alone)."""
    if type(module) is nn.LayerNorm:
        return kernels.LayerNorm, {}
    if type(module) is nn.RMSNorm:  # fp32 math, one rounding at the end: the kernels' default casting mode
        return kernels.RMSNorm, {"offset": 0.0, "casting_mode": DEFAULT_CASTING_MODE, "promote_output": False}
    options = _rms_norm_options(module)
    if options is None:
        return None
    return kernels.RMSNorm, dict(normalized_shape=tuple(module.weight.shape), elementwise_affine=True, **options)


PROBE_ROWS = 16
"""Rows of the random input a candidate RMSNorm runs on: enough elements that the casting modes' different
roundings show (they differ in about a quarter of bf16 outputs), even for a head-dim q/k norm."""


PROBE_ERRORS = (Exception,)
"""What a class's forward may raise on a probe it does not take: anything (an assert on the input's rank, an
IndexError reading a third dim, ...); such a class is left alone."""


def _rms_norm_options(module: nn.Module) -> Optional[Dict[str, object]]:
    """``eps``, ``offset``, ``casting_mode`` and ``promote_output`` of the ``kernels.RMSNorm`` that computes what
    ``module`` computes, found by running it; None if none does.

    Candidates are modules of a class named ``*RMSNorm`` holding only a 1-D ``weight``, their epsilon in ``eps`` or
    ``variance_epsilon`` (Hugging Face's names), whatever transformers modules are imported. The class's forward
    runs (no hooks) on a shallow copy holding a random weight, on rows of very different scales, one near
    sqrt(eps): in float32 it must match x / sqrt(mean(x^2) + eps) * (offset + weight) for offset 0 (Llama and its
    copies) or 1 (Gemma's ``1 + weight``); in bfloat16 it tells where the class rounds, which picks the casting
    mode ("llama": x_hat to the input dtype before the weight; "gemma": once, at the end); bfloat16 with a float32
    weight tells the output's dtype (``promote_output``: Llama's ``weight * x_hat`` is float32, Gemma's bfloat16).
    """
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if (not type(module).__name__.endswith("RMSNorm") or isinstance(eps, bool) or not isinstance(eps, numbers.Real)
            or [name for name, _ in module.named_parameters()] != ["weight"] or weight.dim() != 1
            or next(module.buffers(), None) is not None or not _takes_one_input(type(module).forward)):
        return None
    n = weight.numel()
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 2, PROBE_ROWS, dtype=torch.float64).unsqueeze(1)
    scales[0] = math.sqrt(eps) if eps else 1.0  # where eps moves the result by a good fraction
    x = (torch.randn(PROBE_ROWS, n, generator=generator, dtype=torch.float64) * scales).float()
    probe_weight = torch.rand(n, generator=generator) + 0.5
    try:
        got = _run_forward(module, x, probe_weight).double()
        x64, w64 = x.double(), probe_weight.double()
        xhat = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        offsets = [o for o in (0.0, 1.0) if torch.allclose(got, xhat * (o + w64), rtol=1e-5, atol=1e-5)]
        if len(offsets) != 1:
            return None
        x_low = x.bfloat16()
        got_low = _run_forward(module, x_low, probe_weight.bfloat16())
    except PROBE_ERRORS:  # a forward taking something else: no RMS norm
        return None
    try:
        got_mixed = _run_forward(module, x_low, probe_weight)
    except PROBE_ERRORS:  # a class that takes no weight of another dtype than x: what ours do with one is moot
        got_mixed = None
    options = {"eps": eps, "offset": offsets[0]}
    mismatch = {mode: _mismatch(got_low, x_low, probe_weight.bfloat16(), dict(options, casting_mode=mode))
                for mode in ("llama", "gemma")}
    casting_mode = min(mismatch, key=mismatch.get)
    # with a wider weight than x: x's dtype (Gemma's type_as(x)), or the promoted one (Llama's weight * x_hat)
    options = dict(options, casting_mode=casting_mode,
                   promote_output=got_mixed is not None and got_mixed.dtype != x_low.dtype)
    mismatch_mixed = 0.0 if got_mixed is None else _mismatch(got_mixed, x_low, probe_weight, options)
    if max(mismatch[casting_mode], mismatch_mixed) > MAX_MISMATCH:
        return None
    return options


MAX_MISMATCH = 0.05
"""Largest share of a probe's outputs that may differ from what the kernels compute: the casting modes differ in
about a quarter of bf16 outputs, torch's and the kernels' rsqrt by an ulp in a few."""


def _mismatch(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, options: Dict[str, object]) -> float:
    """Share of ``got`` that differs from ``kernels.RMSNorm(**options)`` with ``weight`` on ``x``, in torch ops (the
    module is on any device): all of it where the dtypes differ."""
    eps, offset, casting_mode = options["eps"], options["offset"], options["casting_mode"]
    if options.get("promote_output") and torch.promote_types(x.dtype, weight.dtype) != x.dtype:
        want = (offset + weight) * torch_rms_norm(x, x.shape[-1], None, eps, casting_mode=casting_mode)
    else:
        want = torch_rms_norm(x, x.shape[-1], weight, eps, offset=offset, casting_mode=casting_mode)
    if got.dtype != want.dtype:
        return 1.0
    return (got != want).float().mean().item()


def _takes_one_input(forward) -> bool:
    """Whether ``forward(self, x)`` takes nothing but x: a second argument (a gated norm's gate, Mamba-2's
    ``forward(x, gate=None)``) would become the kernels' ``residual`` after the swap."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read: not a class this can tell apart
        return False
    return len(parameters) == 1 and parameters[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                           inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _run_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The output of ``module``'s class forward on ``x`` with ``weight`` instead of its own: a shallow copy gets
    its own parameter dict, so the module itself (its device, its Parameter) is not touched and no hook fires.
    It runs in training and in eval mode, which must agree (a norm with dropout, say, is no RMS norm after the
    swap in the other mode): ValueError otherwise."""
    probe = copy.copy(module)
    probe._parameters = {"weight": nn.Parameter(weight, requires_grad=False)}
    outputs = []
    with torch.no_grad():
        for training in (True, False):
            probe.training = training
            outputs.append(type(module).forward(probe, x))
    if not (isinstance(outputs[0], torch.Tensor) and isinstance(outputs[1], torch.Tensor)
            and torch.equal(outputs[0], outputs[1])):
        raise ValueError("the class computes another function in training and in eval mode")
    return outputs[0]


def _hf_models(model: nn.Module) -> List[nn.Module]:
    """The outermost transformers ``PreTrainedModel``s in ``model``: itself, or those inside a wrapper
    (torch.compile's OptimizedModule, DDP, a PEFT model, a user's module holding one). Not the ones nested in
    another (a composite model's language model): ``set_attn_implementation`` switches its sub-models too."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is None:
        return []
    outermost = {}  # name -> model; named_modules lists a parent before its children
    for name, module in model.named_modules():
        if isinstance(module, modeling_utils.PreTrainedModel) and not any(
                outer == "" or name.startswith(outer + ".") for outer in outermost):
            outermost[name] = module
    return list(outermost.values())
