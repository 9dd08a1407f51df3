"""Hugging Face ``transformers`` integration: the fused kernel as an attention-interface function.

:func:`register_hf_attention` registers :func:`hf_attention` under :data:`ATTENTION_NAME` in transformers'
``AttentionInterface``, with transformers' SDPA mask function in its ``AttentionMaskInterface`` (without a mask
function the mask would always be None and padded batches silently wrong). ``transformer.patch`` calls it.

``transformers`` is imported only inside these functions: the rest of the package works without it.
"""
import sys
from typing import Optional

import torch
import torch.nn as nn

import kernels

ATTENTION_NAME = "fused_triton"
"""The name the kernel is registered under in transformers' attention and mask interfaces."""

_EAGER_ONLY = ("softcap", "s_aux")
"""Keywords that change the math in ways the kernel does not compute yet (Gemma 2's logit softcapping, GPT-OSS's
attention sinks): calls carrying them run the model's own eager attention, exactly as before ``patch()``."""
_SDPA_ONLY = ("position_bias", "cache")
"""Keywords of calls handed to transformers' own SDPA path (a relative position bias; a paged cache)."""


def register_hf_attention(name: str = ATTENTION_NAME) -> None:
    """Register :func:`hf_attention` and transformers' SDPA mask function (bool masks, None when purely causal)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, hf_attention)
    AttentionMaskInterface.register(name, sdpa_mask)


def _causal(module: nn.Module, query: torch.Tensor, attention_mask, is_causal: Optional[bool]) -> bool:
    """As transformers' own SDPA path: no mask means purely causal (top-left: a prefill into an empty static cache
    brings more, empty, key slots than queries), except that one query (decoding) sees the whole cache."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return query.shape[2] > 1 and attention_mask is None and is_causal


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    """The model's own ``eager_attention_forward``, fed the additive float mask it expects (the registered mask
    function gives a bool mask, or None for a purely causal batch)."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if attention_mask is None and _causal(module, query, attention_mask, is_causal):
        n_q, n_k = query.shape[2], key.shape[2]
        attention_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        blocked = torch.finfo(query.dtype).min
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, blocked)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                 is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-interface function, running the fused kernel through
    ``kernels.scaled_dot_product_attention``.

    query (B, H, Q, D), key/value (B, Hkv, K, D) (non-contiguous views; GQA stays unrepeated: the kernel groups
    heads itself). ``attention_mask`` comes from ``sdpa_mask``: None for a purely causal batch, else bool
    (B, 1, Q, K), True = may attend (a sliding window is part of it). The kernel takes the padding masks
    transformers builds (a key mask per row, AND causal), with or without a cache; any other mask, or dropout,
    runs torch's SDPA. ``is_causal`` overrides ``module.is_causal`` as in transformers' own SDPA path. Calls with
    a keyword of :data:`_EAGER_ONLY` run the model's eager attention, with one of :data:`_SDPA_ONLY` transformers'
    SDPA attention: never is a keyword dropped. Returns (out (B, Q, H, D), None).
    """
    if any(kwargs.get(name) is not None for name in _EAGER_ONLY):
        return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if any(kwargs.get(name) is not None for name in _SDPA_ONLY):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    out = kernels.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                               scale=scaling, is_causal=_causal(module, query, attention_mask,
                                                                                is_causal),
                                               enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None
