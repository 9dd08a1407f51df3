"""``patch(model)``: put the fused kernels into a model in place, weights untouched.

- :class:`transformer.GPT`: switch its backend to ``"triton"``.
- any ``torch.nn.Module``: replace ``nn.LayerNorm`` / ``nn.RMSNorm`` submodules (and Hugging Face's plain
  Llama-style RMSNorm classes) with ``kernels.LayerNorm`` / ``kernels.RMSNorm`` carrying the same state.
- Hugging Face ``transformers`` models: also register the attention kernel (``transformer/hf.py``) under
  :data:`ATTENTION_NAME` in ``transformers.AttentionInterface`` and switch the model to it.

``transformers`` is optional: it is imported only when the model is one of its ``PreTrainedModel``s.
"""
import functools
import inspect
import sys
from typing import Optional

import torch
import torch.nn as nn

import kernels
from transformer.hf import ATTENTION_NAME, register_hf_attention
from transformer.model import GPT


def patch(model: nn.Module) -> nn.Module:
    """Swap the fused kernels into ``model`` in place and return it (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, GPT):
        return model.set_backend("triton")
    _replace_norms(model)
    if _is_hf_model(model):
        register_hf_attention()
        model.set_attn_implementation(ATTENTION_NAME)
    return model


# ----------------------------------------------------------------------------------------------- norms


def _replace_norms(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = _kernel_norm(child)
            if replacement is not None:
                setattr(parent, name, replacement)


def _kernel_norm(module: nn.Module) -> Optional[nn.Module]:
    """The kernel module equivalent to ``module``, holding its parameters, or None if it is not a plain norm."""
    if type(module) is nn.LayerNorm:
        new = kernels.LayerNorm(module.normalized_shape, eps=module.eps,
                                elementwise_affine=module.elementwise_affine, bias=module.bias is not None)
    elif type(module) is nn.RMSNorm:
        new = kernels.RMSNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine)
    elif _is_llama_style_rms_norm(module):
        new = kernels.RMSNorm(module.weight.shape, eps=module.variance_epsilon)
    else:
        return None
    reference_param = next(module.parameters(), None)
    if reference_param is not None:
        new = new.to(device=reference_param.device, dtype=reference_param.dtype)
    new.load_state_dict(module.state_dict())
    new.train(module.training)
    return new


def _is_llama_style_rms_norm(module: nn.Module) -> bool:
    """True for Hugging Face RMSNorm classes computing exactly ``weight * x / sqrt(mean(x^2) + variance_epsilon)``.

    Many models copy LlamaRMSNorm verbatim (Mistral, Qwen2, ...); others only share the name and differ (Gemma
    scales by ``1 + weight``). So a class qualifies only if its ``forward`` is LlamaRMSNorm's, line for line.
    """
    if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
        return False
    llama = sys.modules.get("transformers.models.llama.modeling_llama")
    if llama is None:
        return False
    return _source(type(module).forward) == _source(llama.LlamaRMSNorm.forward)


@functools.lru_cache(maxsize=None)
def _source(fn) -> Optional[str]:
    """A function's source, read once per function (a model has an RMSNorm per layer, all of one class)."""
    try:
        return inspect.getsource(fn).strip()
    except (OSError, TypeError):
        return None


def _is_hf_model(model: nn.Module) -> bool:
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel)
