"""flash-attn 2.x's functions, with its names, argument order, defaults, layouts and return conventions, over the
Triton kernels of ``kernels/attention/``: code written for ``flash_attn`` can import them from here
(``from kernels.flash_attn import flash_attn_func``).

- :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`, :func:`flash_attn_kvpacked_func`: (B, S, H, D)
  inputs, over :func:`kernels.attention` (transposed views, no input copies).
- :func:`flash_attn_varlen_func`, :func:`flash_attn_varlen_qkvpacked_func`, :func:`flash_attn_varlen_kvpacked_func`:
  packed (total, H, D) inputs with int32 cumulative lengths, over :func:`kernels.attention.varlen.attention_varlen`.
- :func:`flash_attn_with_kvcache`: decoding against a (paged) KV cache, over
  :func:`kernels.attention.decode.attention_with_kvcache`.

flash-attn 3's functions (``flash_attn_interface``'s) are :mod:`kernels.flash_attn_interface`, over these.

Differences from flash-attn 2.x, all functions:

- Wider inputs: fp32 as well as fp16/bf16 (fp32 dots are IEEE on a GPU unless torch allows TF32 for matmuls:
  ``allow_tf32``, ``set_float32_matmul_precision("high")`` or ``fp32_precision = "tf32"``), any strides, any head
  dim from 1 to 256.
- ``deterministic`` is accepted and changes nothing: the backward never uses atomics, so it is always
  deterministic.
- Bad shapes and dtypes raise TypeError/ValueError naming the argument, before anything runs, rather than a CUDA
  error; ``max_seqlen*`` shorter than the longest sequence raises (flash-attn silently drops rows), and so does
  one outside [0, 2**31 - 1] (ValueError naming it). The packed functions' errors name ``qkv`` or ``kv``.
- ``softmax_lse`` with causal ALiBi is the docstring's logsumexp of the scaled scores minus slope * |i + seqlen_k -
  seqlen_q - j|; flash-attn's causal kernels add slope * j instead (the same out, but their lse is larger by
  slope * (i + seqlen_k - seqlen_q)).
- ``return_attn_probs``: ``S_dmask`` is None without dropout, as in flash-attn; with dropout it is the exact
  softmax, computed in float64 and rounded once to q's dtype, negated where the element was dropped, and not
  rounded up to multiples of 128: (B, H, seqlen_q, seqlen_k), or for the varlen functions (batch_size, H,
  max_seqlen_q, max_seqlen_k) with sequence b's in [b, :, :len_q, :len_k] and zeros elsewhere (flash-attn's
  layout). Such a call runs eagerly inside ``torch.compile`` (a graph break, which ``fullgraph=True`` refuses), so
  that S_dmask is the mask it drew.
- Argument types, checked before anything runs (TypeError naming the argument): flags (``causal``,
  ``deterministic``, ``return_attn_probs``, ``rotary_interleaved``, ``return_softmax_lse``) are a bool, a numpy
  bool or a 0-d bool tensor (flash-attn's ops also take ints, None and other truthy values: refused here);
  ``dropout_p``, ``softcap``, ``softmax_scale`` real numbers or 0-d tensors; ``window_size`` a pair of ints as
  a tuple, list, numpy array or tensor (flash-attn's tests pass ``torch.randint(0, n, (2,))``); ``max_seqlen*``,
  ``num_splits`` and ``attention_chunk`` ints, numpy ints or 0-d integer tensors. A tensor given for any of these
  is read on the host: free for a CPU tensor, a host sync for a CUDA one (flash-attn's ops read them the same
  way).
- ``attention_chunk`` (flash-attn 3's chunked local attention, Llama 4's; not in 2.x): the dense functions take it
  as a keyword-only argument after 2.x's, default 0 (off). With chunk C > 0, query i sees key j only if
  floor(j / C) == floor((i + seqlen_k - seqlen_q) / C), on top of ``causal`` and ``window_size`` (flash-attn 3's
  rule; without ``causal`` a row sees its whole chunk). The varlen and kvcache functions do not take it.
- The dense functions' ``out`` is (B, S, H, D) contiguous, as flash-attn's (so ``out.view(...)`` works): the
  kernels write it in that layout where q is, and it is copied once where q is laid out otherwise.
- ``window_size`` entries below -1 raise ValueError (flash-attn takes any negative entry as unbounded; write -1).
- The varlen functions check the values of ``cu_seqlens`` and ``max_seqlen*`` on the device (ValueError at once
  on CPU, a device assert on a GPU, no host sync; flash-attn does not check them): among the rules, each
  ``cu_seqlens`` ends at its tensor's token count, so packed tensors padded past the last sequence (a fixed
  token count, as CUDA-graph serving pads them; flash-attn leaves those rows unwritten) raise: pass the
  sequences' tokens, or add the padding as one more sequence. They then launch each kernel
  once for the whole batch (see ``kernels/attention/varlen.py``). With ``block_table`` the
  keys and values are first gathered from the pages into the packed layout (a copy of up to batch_size *
  max_seqlen_k keys and values, on the device without a sync; flash-attn reads the pages in place), any page
  size; a page id outside the cache that a sequence uses raises (CPU) or fails a device assert (CUDA), and ids
  are clamped, never read out of bounds. ``max_seqlen_k`` there must be at most the table's capacity,
  max_num_blocks_per_seq * page_block_size (ValueError naming block_table; flash-attn takes any, as a bound).

Differences, ``flash_attn_with_kvcache``:

- rotary_dim any even number <= the head dim (flash-attn:
  a multiple of 16); rotary_cos/rotary_sin of any float dtype (flash-attn: q's; float64 and other dtypes the
  kernels do not load are converted to float32, the dtype the rotation is computed in); any page size
  (flash-attn: a multiple of 256); ``cache_leftpad`` with a paged cache (flash-attn refuses the pair).
- Stricter checks, before anything runs: an int ``cache_seqlens`` must leave room for the new keys, the cache needs
  at least B rows without ``cache_batch_idx``, inputs that require grad raise while grad mode is on (flash-attn
  returns a result without a graph). The values of ``cache_seqlens``, ``cache_leftpad``, ``cache_batch_idx`` and
  ``block_table`` are checked on the device before the cache is written (ValueError on CPU, a device assert on a
  GPU; flash-attn does not check them): among them, a ``cache_batch_idx`` that repeats a row while k/v are
  appended raises (flash-attn keeps one of the duplicates' writes, unspecified which), and so do rotated queries at
  positions without a row in ``rotary_cos``.
- q's rotary positions follow flash-attn's docstring: cache_seqlens + i when causal or ``window_size`` != (-1, -1),
  else all cache_seqlens. flash-attn's kernels first treat a window side >= the cache's positions as -1, so a
  non-causal call whose window sides are each -1 or at least the cache's positions rotates its queries all at
  cache_seqlens there, at cache_seqlens + i here (the same keys are visible either way unless Sq exceeds the cache's
  positions + 1): pass window_size=(-1, -1) for flash-attn's rotation.
- The new keys/values are appended, and q and the keys rotated, by a launch before the attention kernel (flash-attn
  does it inside its attention kernel); the results are the same.
- The split heuristic is this package's (``kernels.attention.decode.choose_splits``), not flash-attn's.
"""
from typing import Optional, Union

import numpy as np
import torch

from kernels import reference
from kernels._validate import FLOAT_DTYPES
from kernels.attention.api import attention_dropout_mask, attention_seq_first, check_4d, chunk_mask
from kernels.attention.checks import check_attention_chunk, check_qkv, check_scale, check_tensor
from kernels.attention.decode import attention_with_kvcache
from kernels.attention.varlen import attention_varlen, gather_pages


def _flash_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn's softmax_lse: +inf (not -inf) for a row that sees no key, and (flash-attn's ``sum != sum``
    test) for a row whose sum is NaN, where the kernels' lse is NaN."""
    return torch.where(lse > float("-inf"), lse, float("inf"))


_PLAIN = frozenset((bool, int, float, type(None)))
"""The argument types :func:`_host` passes through at once (the common case: a plain Python value)."""


def _host(value):
    """The Python value of a tensor or numpy value (a 0-d one's scalar, else nested lists); anything else as is.
    Reading a CUDA tensor is a host sync (flash-attn's ops read such arguments the same way)."""
    if type(value) in _PLAIN:
        return value
    return value.tolist() if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) else value


def _flag(name: str, value) -> bool:
    """``value`` as a bool: a bool, numpy bool or 0-d bool tensor; TypeError naming ``name`` otherwise (ints,
    strings and None too, which flash-attn's ops would take as truthy or falsy)."""
    flag = _host(value)
    if not isinstance(flag, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return flag


def _window(window_size):
    """``window_size`` as a tuple of Python values: flash-attn takes any pair it can index (tuple, list, tensor,
    numpy array); :func:`kernels.attention.api.check_window` then checks it is (left, right) ints."""
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is type(window_size[1]) is int:
        return window_size  # the common case (a pair of plain ints), with nothing to convert
    window = _host(window_size)
    return tuple(_host(w) for w in window) if isinstance(window, (tuple, list)) else window


def _softmax_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` checked as :func:`kernels.attention` checks ``scale``, with flash-attn's name in errors."""
    try:
        return check_scale(_host(softmax_scale), head_dim)
    except TypeError:
        raise TypeError(f"softmax_scale must be a finite real number or None, got {softmax_scale!r}") from None


def _variants(dropout_p, causal, window_size, softcap, deterministic) -> tuple:
    """(dropout_p, causal, window_size, softcap): the dense and varlen functions' options as
    :func:`kernels.attention` takes them; TypeError naming a flag that is not a bool (``deterministic`` is checked
    and dropped: the backward is always deterministic)."""
    _flag("deterministic", deterministic)
    return _host(dropout_p), _flag("causal", causal), _window(window_size), _host(softcap)


def _head_dim(q, k, v) -> int:
    """q's head dim, once q, k, v are known to be 4-D tensors (TypeError/ValueError naming the one that is not)."""
    check_4d(q, k, v)
    return q.shape[-1]


def _plain_options(dropout_p, causal, softcap, deterministic, return_attn_probs, attention_chunk) -> bool:
    """Whether the dense functions' options are plain Python values (the common case), which :func:`_variants`,
    :func:`_flag` and :func:`_host` would pass through unchanged."""
    return (type(causal) is bool and type(deterministic) is bool and type(return_attn_probs) is bool
            and type(attention_chunk) is int and type(dropout_p) in _PLAIN and type(softcap) in _PLAIN)


QKV_LAYOUT = ("batch_size", "seqlen", 3, "nheads", "headdim")
KV_LAYOUT = ("batch_size", "seqlen_k", 2, "nheads_k", "headdim")
VARLEN_QKV_LAYOUT = ("total", 3, "nheads", "headdim")
VARLEN_KV_LAYOUT = ("total_k", 2, "nheads_k", "headdim")
"""The packed functions' layouts, flash-attn's names: the int is the stacking dim's size."""
Q_LAYOUT = ("batch_size", "seqlen_q", "nheads", "headdim")
VARLEN_Q_LAYOUT = ("total_q", "nheads", "headdim")
"""q's layouts beside a packed kv (and in :func:`flash_attn_func`), flash-attn's names."""
K_LAYOUT = ("batch_size", "seqlen_k", "nheads_k", "headdim")
"""k's and v's layout in :func:`flash_attn_func`, flash-attn's names."""


def _unpack(name: str, packed, layout: tuple, q=None, q_layout: tuple = ()) -> tuple:
    """The tensors stacked in ``packed`` along ``layout``'s int dim (views), once ``packed`` passes every check
    the unpacked tensors would meet (for a packed kv, against ``q`` of ``q_layout``); TypeError/ValueError naming
    ``name`` (the argument the caller passed, not the k, v it holds) otherwise."""
    dim = next(i for i, size in enumerate(layout) if type(size) is int)
    check_tensor(name, packed, ndim=len(layout))
    shape = packed.shape
    if shape[dim] != layout[dim]:
        raise ValueError(f"{name} must be {_layout_text(layout)}, got shape {tuple(shape)}")
    return checked_unpacked(name, packed.unbind(dim), shape, layout, q, q_layout)


def checked_unpacked(name: str, unpacked: tuple, shape: torch.Size, layout: tuple, q=None,
                     q_layout: tuple = ()) -> tuple:
    """``unpacked``, the tensors (views) stacked in a packed argument ``name`` of ``shape`` and ``layout``, once
    they pass every check the unpacked tensors would meet (:func:`_unpack`'s; also flash-attn 3's qkv split along
    the heads)."""
    if q is None:
        q, q_shape, q_layout, names = unpacked[0], shape, layout, (name,) * 3
    else:
        check_tensor("q", q, ndim=len(layout) - 1)
        q_shape, names = q.shape, ("q", name, name)
    check_qkv(*(_heads_first(t) for t in (q, *unpacked[-2:])), names=names,
              shown=(q_shape, shape, shape, _layout_text(q_layout), _layout_text(layout)))
    return unpacked


def _layout_text(layout: tuple) -> str:
    """A layout as the messages show it: "(batch_size, seqlen_k, 2, nheads_k, headdim)"."""
    return f"({', '.join(map(str, layout))})"


def _seq_first(q, k, v, *options):
    """:func:`attention_seq_first` of q (B, Sq, H, D), k, v (B, Sk, Hkv, D), whose shape errors show the shapes
    passed and flash-attn's layouts: its own checks see the (B, H, S, D) views it makes, and their messages would
    show those. Checked again only once it has raised, so the common call pays nothing."""
    try:
        return attention_seq_first(q, k, v, *options)
    except ValueError:
        error = _shape_error(q, k, v)
        if error is None:  # not the shapes' fault (a window, a slope, ...): its message stands
            raise
    raise error from None  # in place of the views' message, not chained to it


def _shape_error(q, k, v) -> Optional[ValueError]:
    """The ValueError of :func:`check_qkv` for q (B, Sq, H, D), k, v (B, Sk, Hkv, D) in flash-attn's terms, or None
    where their shapes are valid."""
    try:
        check_4d(q, k, v)
        check_qkv(*(_heads_first(t) for t in (q, k, v)),
                  shown=(q.shape, k.shape, v.shape, _layout_text(Q_LAYOUT), _layout_text(K_LAYOUT)))
    except ValueError as error:
        return error
    return None


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """A (B, S, H, D) or packed (total, H, D) tensor as the (B, H, S, D) view :func:`check_qkv` takes (B = 1 for a
    packed one)."""
    return (t if t.dim() == 4 else t.unsqueeze(0)).transpose(1, 2)


# ----------------------------------------------------------------------------- S_dmask (return_attn_probs)


def _rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state on ``device`` (host-side; no sync)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _keep_mask(rng_state, batch: int, heads: int, n_q: int, n_k: int, dropout_p: float, device) -> torch.Tensor:
    """The (batch, heads, n_q, n_k) keep-mask a call that started from generator state ``rng_state`` drew; the
    generator is left where the call left it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng_state, device)
        else:
            torch.set_rng_state(rng_state)
        return attention_dropout_mask(batch, heads, n_q, n_k, dropout_p, device)


def _probs64(q, k, scale: float, mask=None, **variants) -> torch.Tensor:
    """The (B, H, Nq, Nk) float64 attention probabilities of q (B, H, Nq, D), k (B, Hkv, Nk, D): computed in
    float64 so that S_dmask is rounded once, to q's dtype, not at every step."""
    if q.shape[2] == 0 or k.shape[2] == 0:  # the reference cannot reduce over no key
        return torch.zeros(q.shape[:3] + k.shape[2:3], dtype=torch.float64, device=q.device)
    q, k = q.detach().double(), k.detach().double()
    return reference.attention(q, k, k, scale=scale, mask=mask, return_probs=True, **variants)[1]


def _right_aligned(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
    """Packed x (total, H, D) as (B, H, max_seqlen, D) with sequence b in its last len_b rows (zeros before), the
    (B, max_seqlen) bool of real rows and each sequence's (B,) padding max_seqlen - len_b, on the device."""
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    pad = max_seqlen - lengths
    rows = torch.arange(max_seqlen, device=x.device) - pad[:, None]  # index within the sequence; < 0 for padding
    real = rows >= 0
    index = torch.where(real, starts[:, None] + rows, x.shape[0])  # padding reads an appended zero row
    padded = torch.cat((x.detach(), x.new_zeros((1,) + x.shape[1:])))[index]
    return padded.transpose(1, 2), real, pad


def _left_aligned(t: torch.Tensor, pad: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, ...) t with each batch entry's ``dim`` rotated left by its ``pad``: right-aligned rows moved to the
    front, the (zero) padding rows to the back."""
    n = t.shape[dim]
    index = (torch.arange(n, device=t.device) + pad[:, None]) % n
    shape = [t.shape[0]] + [n if d == dim else 1 for d in range(1, t.dim())]
    return t.gather(dim, index.view(shape).expand(t.shape))


def _varlen_probs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                  **variants) -> torch.Tensor:
    """(B, H, max_seqlen_q, max_seqlen_k) float64 probabilities of packed q (total_q, H, D), k (>= total_k, Hkv,
    D): sequence b's in [b, :, :len_q, :len_k], zeros elsewhere. Each sequence is aligned to the padded grid's
    bottom-right corner first, where its causal/window/ALiBi diagonal is the grid's (len_k - len_q per
    sequence), and moved back to the top-left after."""
    q_right, real_q, pad_q = _right_aligned(q, cu_seqlens_q, max_seqlen_q)
    k_right, real_k, pad_k = _right_aligned(k, cu_seqlens_k, max_seqlen_k)
    probs = _probs64(q_right, k_right, scale, mask=real_q[:, None, :, None] & real_k[:, None, None, :], **variants)
    return _left_aligned(_left_aligned(probs, pad_q, 2), pad_k, 3)


def _s_dmask(probs: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """flash-attn's S_dmask: the probabilities, negated where dropout dropped them, rounded once to ``dtype``."""
    return torch.where(keep, probs, -probs).to(dtype)


# ------------------------------------------------------------------------------------------------ functions


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs, attention_chunk):
    """flash-attn's return value for q (B, Sq, H, D) and k, v (B, Sk, Hkv, D), by :func:`kernels.attention` on
    (B, H, S, D) views."""
    if _plain_options(dropout_p, causal, softcap, deterministic, return_attn_probs, attention_chunk):
        # nothing to convert but a window (flash-attn takes any pair): attention_seq_first checks each value
        return_probs, window_size = return_attn_probs, _window(window_size)
    else:
        dropout_p, causal, window_size, softcap = _variants(dropout_p, causal, window_size, softcap, deterministic)
        attention_chunk = check_attention_chunk(_host(attention_chunk))
        return_probs = _flag("return_attn_probs", return_attn_probs)
    # None: attention_seq_first's default; q, k, v are checked there before anything runs
    scale = None if softmax_scale is None else _softmax_scale(softmax_scale, _head_dim(q, k, v))
    if return_probs and dropout_p:  # (a bad dropout_p raises in the attention call, before any S_dmask)
        return _dense_with_s_dmask(q, k, v, causal, scale, window_size, attention_chunk, softcap, alibi_slopes,
                                   dropout_p)
    # out is laid out as q, so (B, S, H, D) contiguous unless q is packed
    result = _seq_first(q, k, v, causal, scale, return_probs, window_size, attention_chunk, softcap, alibi_slopes,
                        dropout_p)
    if not return_probs:
        return result.contiguous()
    out, lse = result
    return out.contiguous(), _flash_lse(lse), None  # no S_dmask without dropout, as flash-attn


@torch.compiler.disable
def _dense_with_s_dmask(q, k, v, causal, scale, window_size, attention_chunk, softcap, alibi_slopes, dropout_p):
    """:func:`_dense`'s (out, lse, S_dmask) under dropout. Eager, also inside torch.compile: S_dmask replays the
    keep-mask from the generator's state before the call, which is the mask the call drew only where the call
    draws from that generator (compiled, it would draw from inductor's random stream)."""
    rng_state = _rng_state(q.device)
    out, lse = _seq_first(q, k, v, causal, scale, True, window_size, attention_chunk, softcap, alibi_slopes,
                          dropout_p)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    keep = _keep_mask(rng_state, *q.shape[:3], k.shape[2], dropout_p, q.device)
    chunks = chunk_mask(q.shape[2], k.shape[2], attention_chunk, q.device)
    probs = _probs64(q, k, check_scale(scale, q.shape[-1]), mask=chunks, alibi_slopes=alibi_slopes, causal=causal,
                     window_size=window_size, softcap=softcap)
    return out.contiguous(), _flash_lse(lse), _s_dmask(probs, keep, q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, attention_chunk=0):
    """flash-attn 2.x's ``flash_attn_func``: q (batch_size, seqlen_q, nheads, headdim), k, v (batch_size,
    seqlen_k, nheads_k, headdim), nheads a multiple of nheads_k. ``causal``, ``window_size`` (left, right) and
    ALiBi distances are bottom-right aligned: query i sees keys i + seqlen_k - seqlen_q - left ..
    i + seqlen_k - seqlen_q + right (0 on the right if causal); ``softcap`` > 0 caps the scaled scores with
    softcap * tanh(s / softcap); ``alibi_slopes`` float32 (nheads,) or (batch_size, nheads); ``attention_chunk``
    > 0 (flash-attn 3's) keeps query i to the keys of its position's chunk (see the module docstring).

    Returns out (batch_size, seqlen_q, nheads, headdim), contiguous; with ``return_attn_probs`` the triple
    (out, softmax_lse (batch_size, nheads, seqlen_q) float32 (+inf for rows that see no key), S_dmask (see the
    module docstring; None without dropout)). Differentiable in q, k, v.
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, attention_chunk)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              attention_chunk=0):
    """flash-attn 2.x's ``flash_attn_qkvpacked_func``: :func:`flash_attn_func` on qkv (batch_size, seqlen, 3,
    nheads, headdim) = stacked q, k, v (views, no copy); the gradient flows back into qkv."""
    q, k, v = _unpack("qkv", qkv, QKV_LAYOUT)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, attention_chunk)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             attention_chunk=0):
    """flash-attn 2.x's ``flash_attn_kvpacked_func``: :func:`flash_attn_func` on q and kv (batch_size, seqlen_k,
    2, nheads_k, headdim) = stacked k, v (views, no copy); the gradient flows back into kv."""
    k, v = _unpack("kv", kv, KV_LAYOUT, q, Q_LAYOUT)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, attention_chunk)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table=None):
    """flash-attn's varlen return value, by :func:`kernels.attention.varlen.attention_varlen`."""
    dropout_p, causal, window_size, softcap = _variants(dropout_p, causal, window_size, softcap, deterministic)
    variants = dict(causal=causal, window_size=window_size, softcap=softcap)
    return_probs = _flag("return_attn_probs", return_attn_probs)
    max_seqlen_q, max_seqlen_k = _host(max_seqlen_q), _host(max_seqlen_k)
    check_tensor("q", q, ndim=3)
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    if return_probs and dropout_p:  # (a bad dropout_p raises in the attention call, before any S_dmask)
        return _varlen_with_s_dmask(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                    alibi_slopes, dropout_p, block_table, variants)
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
                                return_lse=True, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                block_table=block_table, **variants)
    return (out, _flash_lse(lse), None) if return_probs else out  # no S_dmask without dropout, as flash-attn


@torch.compiler.disable
def _varlen_with_s_dmask(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, alibi_slopes,
                         dropout_p, block_table, variants: dict):
    """:func:`_varlen`'s (out, lse, S_dmask) under dropout; eager, also inside torch.compile, as
    :func:`_dense_with_s_dmask` (why there)."""
    rng_state = _rng_state(q.device)
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
                                return_lse=True, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                block_table=block_table, **variants)
    batch = cu_seqlens_q.shape[0] - 1
    keep = _keep_mask(rng_state, batch, q.shape[1], max_seqlen_q, max_seqlen_k, dropout_p, q.device)
    if block_table is not None:  # as attention_varlen packs them
        k = gather_pages(k, block_table, cu_seqlens_k, batch * max_seqlen_k)
    probs = _varlen_probs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                          alibi_slopes=alibi_slopes, **variants)
    return out, _flash_lse(lse), _s_dmask(probs, keep, q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2.x's ``flash_attn_varlen_func``: q (total_q, nheads, headdim), k, v (total_k, nheads_k,
    headdim), cu_seqlens_q/k int32 (batch_size + 1,) cumulative lengths, max_seqlen_q/k ints. Causal, window
    and ALiBi are bottom-right aligned per sequence; ``alibi_slopes`` (nheads,) or (batch_size, nheads).
    With ``block_table`` int32 (batch_size, max_num_blocks_per_seq), k, v are paged caches (num_blocks,
    page_block_size, nheads_k, headdim) and sequence b's keys are the first cu_seqlens_k[b + 1] -
    cu_seqlens_k[b] slots of its pages, in table order.

    Returns out (total_q, nheads, headdim), contiguous; with ``return_attn_probs`` (out, softmax_lse (nheads,
    total_q) float32 (+inf for rows that see no key), S_dmask (batch_size, nheads, max_seqlen_q, max_seqlen_k)
    with sequence b's in [b, :, :len_q, :len_k] and zeros elsewhere; None without dropout).
    """
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn 2.x's ``flash_attn_varlen_qkvpacked_func``: :func:`flash_attn_varlen_func` on qkv (total, 3,
    nheads, headdim) with the same cu_seqlens and max_seqlen for queries and keys."""
    q, k, v = _unpack("qkv", qkv, VARLEN_QKV_LAYOUT)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2.x's ``flash_attn_varlen_kvpacked_func``: :func:`flash_attn_varlen_func` on q and kv
    (total_k, 2, nheads_k, headdim)."""
    k, v = _unpack("kv", kv, VARLEN_KV_LAYOUT, q, VARLEN_Q_LAYOUT)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def _rotary_table(table):
    """A rotary cos/sin table of a float dtype the kernels do not load (float64, ...) as float32, the dtype the
    rotation is computed in; anything else as is (checked by attention_with_kvcache)."""
    if isinstance(table, torch.Tensor) and table.is_floating_point() and table.dtype not in FLOAT_DTYPES:
        return table.float()
    return table


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
    return_lse = _flag("return_softmax_lse", return_softmax_lse)
    check_tensor("q", q, ndim=4)
    out, lse = attention_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=_rotary_table(rotary_cos), rotary_sin=_rotary_table(rotary_sin),
        rotary_interleaved=_flag("rotary_interleaved", rotary_interleaved), cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
        causal=_flag("causal", causal), scale=_softmax_scale(softmax_scale, q.shape[-1]),
        window_size=_window(window_size), softcap=_host(softcap), alibi_slopes=alibi_slopes,
        num_splits=_host(num_splits), return_lse=True)
    return (out, _flash_lse(lse)) if return_lse else out

