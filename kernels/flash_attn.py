"""flash-attn 2.x's functions, with its names, argument order, defaults, layouts and return conventions, over the
Triton kernels of ``kernels/attention/``: code written for ``flash_attn`` can import them from here
(``from kernels.flash_attn import flash_attn_func``).

- :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`, :func:`flash_attn_kvpacked_func`: (B, S, H, D)
  inputs, over :func:`kernels.attention` (transposed views, no input copies).
- :func:`flash_attn_varlen_func`, :func:`flash_attn_varlen_qkvpacked_func`, :func:`flash_attn_varlen_kvpacked_func`:
  packed (total, H, D) inputs with int32 cumulative lengths, over :func:`kernels.attention.varlen.attention_varlen`.
- :func:`flash_attn_with_kvcache`: decoding against a (paged) KV cache, over
  :func:`kernels.attention.decode.attention_with_kvcache`.

Differences from flash-attn 2.x, all functions:

- Wider inputs: fp32 as well as fp16/bf16 (fp32 dots are IEEE on a GPU unless
  ``torch.backends.cuda.matmul.allow_tf32``), any strides, any head dim from 1 to 256.
- ``deterministic`` is accepted and changes nothing: the backward never uses atomics, so it is always
  deterministic.
- Bad shapes and dtypes raise TypeError/ValueError naming the argument, before anything runs, rather than a CUDA
  error; ``max_seqlen*`` shorter than the longest sequence raises (flash-attn silently drops rows).
- ``return_attn_probs``: ``S_dmask`` is None without dropout, as in flash-attn; with dropout it is the exact
  softmax (B, H, seqlen_q, seqlen_k), not rounded up to multiples of 128, negated where the element was dropped.
  The varlen functions raise NotImplementedError for it with dropout.
- The dense functions' ``out`` is the kernel's (B, H, S, D) result copied once into (B, S, H, D) (contiguous, as
  flash-attn's, so ``out.view(...)`` works).
- The varlen functions validate ``cu_seqlens`` on the host (one sync; flash-attn does not check them) and then
  launch each kernel once for the whole batch (see ``kernels/attention/varlen.py``); ``block_table`` (a paged
  cache) is for :func:`flash_attn_with_kvcache` only and raises NotImplementedError there.

Differences, ``flash_attn_with_kvcache``:

- rotary_dim any even number <= the head dim (flash-attn:
  a multiple of 16); rotary_cos/rotary_sin of any float dtype (flash-attn: q's); any page size (flash-attn: a
  multiple of 256); ``cache_leftpad`` with a paged cache (flash-attn refuses the pair).
- Stricter checks, before anything runs: an int ``cache_seqlens`` must leave room for the new keys, the cache needs
  at least B rows without ``cache_batch_idx``, inputs that require grad raise while grad mode is on (flash-attn
  returns a result without a graph).
- The new keys/values are appended, and q and the keys rotated, by a launch before the attention kernel (flash-attn
  does it inside its attention kernel); the results are the same.
- The split heuristic is this package's (``kernels.attention.decode.choose_splits``), not flash-attn's.
"""
import numbers
from typing import Optional, Union

import torch

from kernels import reference
from kernels._validate import check_tensor
from kernels.attention.api import attention, attention_dropout_mask, check_qkv, check_scale
from kernels.attention.decode import attention_with_kvcache
from kernels.attention.varlen import attention_varlen


def _flash_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn's softmax_lse: +inf (not -inf) for a row that sees no key."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _softmax_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` checked as :func:`kernels.attention` checks ``scale``, with flash-attn's name in errors."""
    try:
        return check_scale(softmax_scale, head_dim)
    except TypeError:
        raise TypeError(f"softmax_scale must be a finite real number or None, got {softmax_scale!r}") from None


def _unpack(name: str, packed, count: int, dim: int):
    """The ``count`` tensors stacked along ``dim`` of ``packed`` (views); ValueError naming it otherwise."""
    check_tensor(name, packed, ndim=dim + 3)
    if packed.shape[dim] != count:
        raise ValueError(f"{name} must have size {count} in dim {dim}, got shape {tuple(packed.shape)}")
    return packed.unbind(dim)


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs):
    """flash-attn's return value for q (B, Sq, H, D) and k, v (B, Sk, Hkv, D), by :func:`kernels.attention` on
    (B, H, S, D) views."""
    _check_flag("deterministic", deterministic)
    _check_flag("return_attn_probs", return_attn_probs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    check_qkv(q, k, v)
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    variants = dict(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    s_dmask = None
    if return_attn_probs and isinstance(dropout_p, numbers.Real) and dropout_p > 0:
        # The mask the call below will draw: same generator state, restored after drawing it here.
        with torch.random.fork_rng(devices=[q.device] if q.device.type == "cuda" else []):
            keep = attention_dropout_mask(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dropout_p, q.device)
        _, probs = reference.attention(q, k, v, causal, scale, return_probs=True, window_size=window_size,
                                       softcap=softcap, alibi_slopes=alibi_slopes)
        s_dmask = torch.where(keep, probs, -probs)
    out, lse = attention(q, k, v, causal, scale, True, **variants)
    out = out.transpose(1, 2).contiguous()
    return (out, _flash_lse(lse), s_dmask) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2.x's ``flash_attn_func``: q (batch_size, seqlen_q, nheads, headdim), k, v (batch_size,
    seqlen_k, nheads_k, headdim), nheads a multiple of nheads_k. ``causal``, ``window_size`` (left, right) and
    ALiBi distances are bottom-right aligned: query i sees keys i + seqlen_k - seqlen_q - left ..
    i + seqlen_k - seqlen_q + right (0 on the right if causal); ``softcap`` > 0 caps the scaled scores with
    softcap * tanh(s / softcap); ``alibi_slopes`` float32 (nheads,) or (batch_size, nheads).

    Returns out (batch_size, seqlen_q, nheads, headdim), contiguous; with ``return_attn_probs`` the triple
    (out, softmax_lse (batch_size, nheads, seqlen_q) float32 (+inf for rows that see no key), S_dmask (see the
    module docstring; None without dropout)). Differentiable in q, k, v.
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2.x's ``flash_attn_qkvpacked_func``: :func:`flash_attn_func` on qkv (batch_size, seqlen, 3,
    nheads, headdim) = stacked q, k, v (views, no copy); the gradient flows back into qkv."""
    q, k, v = _unpack("qkv", qkv, 3, 2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2.x's ``flash_attn_kvpacked_func``: :func:`flash_attn_func` on q and kv (batch_size, seqlen_k,
    2, nheads_k, headdim) = stacked k, v (views, no copy); the gradient flows back into kv."""
    k, v = _unpack("kv", kv, 2, 2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs):
    """flash-attn's varlen return value, by :func:`kernels.attention.varlen.attention_varlen`."""
    _check_flag("deterministic", deterministic)
    _check_flag("return_attn_probs", return_attn_probs)
    check_tensor("q", q, ndim=3)
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    if return_attn_probs and isinstance(dropout_p, numbers.Real) and dropout_p > 0:
        raise NotImplementedError("return_attn_probs with dropout_p > 0 is not supported by the varlen functions "
                                  "(each sequence draws its own dropout mask)")
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, True,
                                window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                dropout_p=dropout_p)
    return (out, _flash_lse(lse), None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2.x's ``flash_attn_varlen_func``: q (total_q, nheads, headdim), k, v (total_k, nheads_k,
    headdim), cu_seqlens_q/k int32 (batch_size + 1,) cumulative lengths, max_seqlen_q/k ints. Causal, window
    and ALiBi are bottom-right aligned per sequence; ``alibi_slopes`` (nheads,) or (batch_size, nheads).

    Returns out (total_q, nheads, headdim), contiguous; with ``return_attn_probs`` (out, softmax_lse (nheads,
    total_q) float32 (+inf for rows that see no key), None). ``block_table`` raises NotImplementedError.
    """
    if block_table is not None:
        raise NotImplementedError("block_table (a paged KV cache) is supported by flash_attn_with_kvcache only")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn 2.x's ``flash_attn_varlen_qkvpacked_func``: :func:`flash_attn_varlen_func` on qkv (total, 3,
    nheads, headdim) with the same cu_seqlens and max_seqlen for queries and keys."""
    q, k, v = _unpack("qkv", qkv, 3, 1)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2.x's ``flash_attn_varlen_kvpacked_func``: :func:`flash_attn_varlen_func` on q and kv
    (total_k, 2, nheads_k, headdim)."""
    k, v = _unpack("kv", kv, 2, 1)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn 2.x's ``flash_attn_with_kvcache``: append k/v to the cache in place at cache_seqlens (rotating
    them, and q, when rotary_cos/rotary_sin are given), then attend q to each row's cache.

    q (batch_size, seqlen, nheads, headdim); k_cache, v_cache (batch_size_cache, seqlen_cache, nheads_k, headdim),
    or (num_blocks, page_block_size, nheads_k, headdim) with block_table (batch_size, max_num_blocks_per_seq)
    int32; k, v (batch_size, seqlen_new, nheads_k, headdim). See
    :func:`kernels.attention.decode.attention_with_kvcache` for every argument and the math.

    Returns out (batch_size, seqlen, nheads, headdim), and with ``return_softmax_lse`` also softmax_lse
    (batch_size, nheads, seqlen) float32: the natural-log logsumexp of each row's scaled scores, +inf for a row
    that sees no key (flash-attn's convention; ``kernels.attention_with_kvcache`` gives -inf there).
    """
    out, lse = attention_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, causal=causal, scale=softmax_scale,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits, return_lse=True)
    return (out, _flash_lse(lse)) if return_softmax_lse else out
