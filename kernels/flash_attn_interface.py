"""flash-attn 3's functions (``hopper/flash_attn_interface.py``, imported as ``flash_attn_interface``), with its
names, argument order, defaults, layouts and return conventions, over the same kernels as flash-attn 2.x's
(:mod:`kernels.flash_attn`): code written for FlashAttention-3 can import them from here
(``from kernels.flash_attn_interface import flash_attn_func``).

- :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`: (B, S, H, D) inputs, over
  :func:`kernels.flash_attn.flash_attn_func`.
- :func:`flash_attn_varlen_func`: packed (total, H, D) inputs with int32 cumulative lengths, over
  :func:`kernels.flash_attn.flash_attn_varlen_func`.
- :func:`flash_attn_with_kvcache`: decoding against a contiguous or paged (``page_table``) KV cache, over
  :func:`kernels.flash_attn.flash_attn_with_kvcache`.

The math is flash-attn 2.x's and 3's alike: causal and ``window_size`` bottom-right aligned, ``softcap``,
``attention_chunk``, GQA/MQA, ``softmax_lse`` the float32 natural-log logsumexp of the scaled scores, +inf for a
row that sees no key (whose output is zeros). Every difference :mod:`kernels.flash_attn`'s docstring lists from
flash-attn 2.x holds here too (fp32 and any strides accepted; bad input raises TypeError/ValueError naming the
argument before anything runs; flags must be bools; ``cu_seqlens``/``max_seqlen*`` and the cache's index values
checked on the device; ``window_size`` entries below -1 raise; ...). Differences from flash-attn 3:

- Inputs are fp16, bf16 or fp32 (flash-attn 3: fp16, bf16, fp8 e4m3). fp8 inputs raise TypeError, and
  ``q_descale``, ``k_descale``, ``v_descale`` (flash-attn 3's fp8 scales) raise NotImplementedError.
- ``qv`` (the extra query-value product of multi-head latent attention) raises NotImplementedError, and v must
  have q's head dim (ValueError naming v; flash-attn 3 takes another ``headdim_v``).
- ``num_splits``, ``pack_gqa``, ``sm_margin``, ``scheduler_metadata`` and ``deterministic`` are performance knobs
  with no meaning for these kernels: they are checked by type (TypeError naming the argument: ``num_splits`` an
  int, ``pack_gqa`` None or a bool, ``sm_margin`` an int >= 0, ``scheduler_metadata`` None or a tensor,
  ``deterministic`` a bool) and change nothing; the backward is always deterministic. The exception is
  :func:`flash_attn_with_kvcache`'s ``num_splits``: 0 (or below) chooses the split of the key range by this
  package's heuristic, 1 never splits, up to 128 splits (more: ValueError).
- ``attention_chunk`` in the dense functions works forward and backward (flash-attn 3's backward asserts
  ``attention_chunk == 0``). The varlen and kvcache functions raise NotImplementedError for
  ``attention_chunk`` > 0 (flash-attn 3 takes it there in the forward).
- :func:`flash_attn_varlen_func`: ``seqused_q`` and ``seqused_k`` raise NotImplementedError (pass cu_seqlens of
  the used lengths and the used tokens instead); ``cu_seqlens_q``/``cu_seqlens_k`` are required.
- :func:`flash_attn_with_kvcache`: ``cu_seqlens_q``, ``cu_seqlens_k_new`` (a packed q and new keys) and
  ``rotary_seqlens`` (rotary positions other than the cache's lengths) raise NotImplementedError;
  ``max_seqlen_q``, which flash-attn 3 reads only with ``cu_seqlens_q``, is checked to be an int and ignored. With
  ``return_softmax_lse`` it returns flash-attn 3's 4-tuple (out, softmax_lse, out_accum, softmax_lse_accum), whose
  last two (flash-attn 3's split partials) are always empty float32 tensors here: the partials are merged inside.
  The cache needs no unit last stride (flash-attn 3 asserts it), any page size is taken, and inputs that require
  grad raise while grad mode is on (flash-attn 3 documents no backward for it, yet its op records one, which reads
  k_cache and v_cache whole, ignoring cache_seqlens and the pages). :mod:`kernels.flash_attn`'s kvcache
  differences hold (any even rotary_dim, and so on); errors about the pages name ``page_table`` (in eager: under
  torch.compile the index values are checked inside the op, whose message names 2.x's ``block_table``).
- ``return_attn_probs`` returns (out, softmax_lse), as flash-attn 3's code (its docstrings still mention 2.x's
  S_dmask; there is no dropout).
- ``get_scheduler_metadata`` and ``flash_attn_combine`` are not provided (there is no scheduler to plan, and the
  split partials are not exposed).
"""
import numbers
from typing import Optional, Union

import torch

from kernels import flash_attn
from kernels.attention.checks import check_attention_chunk, check_tensor
from kernels.attention.decode import _check_int
from kernels.flash_attn import QKV_LAYOUT, _flag, _host, _layout_text, _unpack, checked_unpacked

_UNSUPPORTED = {
    "qv": "the query-value product of multi-head latent attention is not supported: pass None",
    "q_descale": "fp8 attention is not supported (inputs are fp16, bf16 or fp32): pass None",
    "k_descale": "fp8 attention is not supported (inputs are fp16, bf16 or fp32): pass None",
    "v_descale": "fp8 attention is not supported (inputs are fp16, bf16 or fp32): pass None",
    "seqused_q": "not supported: pass cu_seqlens_q of the used lengths and only the used query tokens",
    "seqused_k": "not supported: pass cu_seqlens_k of the used lengths and only the used key tokens",
    "cu_seqlens_q": "a packed (varlen) q is not supported here: pass q as (batch_size, seqlen, nheads, headdim)",
    "cu_seqlens_k_new": "packed (varlen) new keys are not supported here: pass k, v as (batch_size, seqlen_new, "
                        "nheads_k, headdim)",
    "rotary_seqlens": "rotary positions other than cache_seqlens are not supported: pass None",
}
"""flash-attn 3's arguments this package cannot honour: why, for the NotImplementedError naming each."""


def _refuse(**arguments) -> None:
    """NotImplementedError naming the first of ``arguments`` (of :data:`_UNSUPPORTED`) that is not None."""
    for name, value in arguments.items():
        if value is not None:
            raise NotImplementedError(f"{name}: {_UNSUPPORTED[name]}")


def _no_chunk(function: str, attention_chunk) -> None:
    """NotImplementedError for an ``attention_chunk`` > 0 in ``function`` (TypeError/ValueError unless an int >= 0):
    only the dense functions' kernels take it."""
    if check_attention_chunk(_host(attention_chunk)):
        raise NotImplementedError(f"attention_chunk: {function} does not support chunked attention here (only "
                                  "flash_attn_func and flash_attn_qkvpacked_func do): pass 0")


def _knobs(num_splits, pack_gqa, sm_margin, scheduler_metadata=None) -> int:
    """``num_splits`` as an int, once flash-attn 3's performance knobs are checked by type (TypeError naming the
    argument; ValueError for a negative ``sm_margin``)."""
    if type(num_splits) is not int:
        num_splits = _host(num_splits)
        if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
            raise TypeError(f"num_splits must be an int, got {num_splits!r}")
    if pack_gqa is not None:
        _flag("pack_gqa", pack_gqa)
    _check_int("sm_margin", _host(sm_margin), 0)
    if scheduler_metadata is not None and not isinstance(scheduler_metadata, torch.Tensor):
        raise TypeError(f"scheduler_metadata must be a tensor or None, got {scheduler_metadata!r}")
    return int(num_splits)


def _out_and_lse(result):
    """flash-attn 3's return value from :mod:`kernels.flash_attn`'s: out, or (out, softmax_lse) where 2.x returns
    (out, softmax_lse, S_dmask)."""
    return result if isinstance(result, torch.Tensor) else result[:2]


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                    v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
                    deterministic=False, sm_margin=0, return_attn_probs=False):
    """flash-attn 3's ``flash_attn_func``: q (batch_size, seqlen_q, nheads, headdim), k, v (batch_size, seqlen_k,
    nheads_k, headdim), nheads a multiple of nheads_k. ``causal`` and ``window_size`` (left, right) are bottom-right
    aligned: query i sees keys i + seqlen_k - seqlen_q - left .. i + seqlen_k - seqlen_q + right (0 on the right if
    causal); ``softcap`` > 0 caps the scaled scores with softcap * tanh(s / softcap); ``attention_chunk`` C > 0 keeps
    query i to the keys j with floor(j / C) == floor((i + seqlen_k - seqlen_q) / C), differentiable too (flash-attn
    3's backward refuses it). ``qv`` and the fp8 descales raise NotImplementedError; ``num_splits``, ``pack_gqa``,
    ``deterministic`` and ``sm_margin`` are checked and change nothing (module docstring).

    Returns out (batch_size, seqlen_q, nheads, headdim), contiguous; with ``return_attn_probs`` (out, softmax_lse
    (batch_size, nheads, seqlen_q) float32, +inf for rows that see no key). Differentiable in q, k, v.
    """
    _refuse(qv=qv, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    _knobs(num_splits, pack_gqa, sm_margin)
    return _out_and_lse(flash_attn.flash_attn_func(q, k, v, 0.0, softmax_scale, causal, window_size, softcap, None,
                                                   deterministic, return_attn_probs, attention_chunk=attention_chunk))


QKV_HEADS_LAYOUT = ("batch_size", "seqlen", "nheads + 2 * nheads_k", "headdim")
"""flash-attn 3's qkv stacked along the heads (with ``num_heads_q``), its docstring's names."""


def _split_heads(qkv, num_heads_q) -> tuple:
    """q, k, v (views) of qkv (batch_size, seqlen, nheads + 2 * nheads_k, headdim) with nheads = ``num_heads_q``;
    TypeError/ValueError naming qkv or num_heads_q unless they make valid attention inputs."""
    if num_heads_q is None:
        raise ValueError(f"num_heads_q is required with a 4-D qkv {_layout_text(QKV_HEADS_LAYOUT)}")
    num_heads_q = _check_int("num_heads_q", _host(num_heads_q), 1)
    shape = qkv.shape
    num_heads_k = (shape[2] - num_heads_q) // 2
    if num_heads_k < 1 or num_heads_q + 2 * num_heads_k != shape[2]:
        raise ValueError(f"num_heads_q: qkv of shape {tuple(shape)} must hold num_heads_q={num_heads_q} query heads "
                         "and two equal groups of at least one kv head each")
    return checked_unpacked("qkv", qkv.split([num_heads_q, num_heads_k, num_heads_k], dim=2), shape,
                            QKV_HEADS_LAYOUT)


def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None,
                              window_size=(-1, -1), attention_chunk=0, softcap=0.0, deterministic=False,
                              num_heads_q=None, sm_margin=0, return_attn_probs=False):
    """flash-attn 3's ``flash_attn_qkvpacked_func``: :func:`flash_attn_func` on qkv (batch_size, seqlen, 3, nheads,
    headdim), or, with ``num_heads_q``, qkv (batch_size, seqlen, num_heads_q + 2 * nheads_k, headdim) = q, k, v
    stacked along the heads (GQA; ``num_heads_q`` is ignored for a 5-D qkv, as flash-attn 3 does). Views, no
    copy; the gradient flows back into qkv."""
    check_tensor("qkv", qkv)
    if qkv.dim() == 4:
        q, k, v = _split_heads(qkv, num_heads_q)
    elif qkv.dim() == 5:
        if num_heads_q is not None:
            _check_int("num_heads_q", _host(num_heads_q), 1)
        q, k, v = _unpack("qkv", qkv, QKV_LAYOUT)
    else:
        raise ValueError(f"qkv must be {_layout_text(QKV_LAYOUT)} or, with num_heads_q, "
                         f"{_layout_text(QKV_HEADS_LAYOUT)}, got shape {tuple(qkv.shape)}")
    return flash_attn_func(q, k, v, softmax_scale, causal, q_descale=q_descale, k_descale=k_descale,
                           v_descale=v_descale, window_size=window_size, attention_chunk=attention_chunk,
                           softcap=softcap, deterministic=deterministic, sm_margin=sm_margin,
                           return_attn_probs=return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                           seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                           v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                           pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    """flash-attn 3's ``flash_attn_varlen_func``: q (total_q, nheads, headdim), k, v (total_k, nheads_k, headdim),
    cu_seqlens_q/k int32 (batch_size + 1,) cumulative lengths (sequences of length 0 too), max_seqlen_q/k ints.
    Causal and window are bottom-right aligned per sequence. ``seqused_q``/``seqused_k``, ``qv``, the fp8 descales
    and ``attention_chunk`` > 0 raise NotImplementedError (module docstring).

    Returns out (total_q, nheads, headdim); with ``return_attn_probs`` (out, softmax_lse (nheads, total_q) float32,
    +inf for rows that see no key). Differentiable in q, k, v.
    """
    _refuse(seqused_q=seqused_q, seqused_k=seqused_k, qv=qv, q_descale=q_descale, k_descale=k_descale,
            v_descale=v_descale)
    _no_chunk("flash_attn_varlen_func", attention_chunk)
    _knobs(num_splits, pack_gqa, sm_margin)
    return _out_and_lse(flash_attn.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, softmax_scale, causal, window_size,
        softcap, None, deterministic, return_attn_probs))


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[(int, torch.Tensor)]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None, page_table: Optional[torch.Tensor] = None,
                            cu_seqlens_q: Optional[torch.Tensor] = None,
                            cu_seqlens_k_new: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                            rotary_seqlens: Optional[torch.Tensor] = None, q_descale: Optional[torch.Tensor] = None,
                            k_descale: Optional[torch.Tensor] = None, v_descale: Optional[torch.Tensor] = None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                            rotary_interleaved=True, scheduler_metadata=None, num_splits=0, pack_gqa=None,
                            sm_margin=0, return_softmax_lse=False):
    """flash-attn 3's ``flash_attn_with_kvcache``: append k/v to the cache in place at cache_seqlens (rotating
    them, and q, when rotary_cos/rotary_sin are given), then attend q to each row's cache. Forward only.

    q (batch_size, seqlen, nheads, headdim); k_cache, v_cache (batch_size_cache, seqlen_cache, nheads_k, headdim),
    or (num_blocks, page_block_size, nheads_k, headdim) with ``page_table`` (batch_size, max_num_blocks_per_seq)
    int32 (flash-attn 2.x's ``block_table``); k, v (batch_size, seqlen_new, nheads_k, headdim). See
    :func:`kernels.attention.decode.attention_with_kvcache` for every argument and the math; the varlen q and new
    keys, ``rotary_seqlens``, ``qv``, the fp8 descales and ``attention_chunk`` > 0 raise NotImplementedError
    (``max_seqlen_q`` without ``cu_seqlens_q`` is ignored, as flash-attn 3 does).

    Returns out (batch_size, seqlen, nheads, headdim), and with ``return_softmax_lse`` flash-attn 3's (out,
    softmax_lse (batch_size, nheads, seqlen) float32 (+inf for a row that sees no key), out_accum,
    softmax_lse_accum), the last two empty float32 tensors (module docstring).
    """
    _refuse(qv=qv, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k_new=cu_seqlens_k_new, rotary_seqlens=rotary_seqlens,
            q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    if max_seqlen_q is not None:  # read by flash-attn 3 only with cu_seqlens_q (Hugging Face passes it anyway)
        _check_int("max_seqlen_q", _host(max_seqlen_q), 0)
    _no_chunk("flash_attn_with_kvcache", attention_chunk)
    num_splits = _knobs(num_splits, pack_gqa, sm_margin, scheduler_metadata)
    return_lse = _flag("return_softmax_lse", return_softmax_lse)
    try:
        result = flash_attn.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            page_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, None, max(num_splits, 0),
            return_lse)
    except (TypeError, ValueError) as error:  # 2.x's argument is flash-attn 3's page_table
        if "block_table" not in str(error):
            raise
        raise type(error)(str(error).replace("block_table", "page_table")) from None
    if not return_lse:
        return result
    empty = torch.empty(0, dtype=torch.float32, device=result[0].device)
    return (*result, empty, empty)
