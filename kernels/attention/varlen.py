"""Variable-length ("packed", "unpadded") attention: several sequences concatenated along one token axis.

Current limit: :func:`attention_varlen` launches the dense kernel once per sequence, on views of the packed
tensors. No padding is computed and nothing is copied in, but a batch of n sequences costs n launches (and one
host read of the cumulative lengths per call); a kernel that reads the offsets itself would launch once.
"""
import numbers
from typing import List, Optional, Tuple

import torch

from kernels._validate import check_same, check_tensor
from kernels.attention.api import attention, check_qkv


def _check_cu_seqlens(name: str, cu_seqlens, total: int) -> List[int]:
    """``cu_seqlens`` (batch + 1,) int32 as a host list; ValueError/TypeError naming it unless it is 1-D int32,
    starts at 0, never decreases, and ends at ``total``. (Reading it to the host is one sync.)"""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() == 0:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries, got an empty tensor")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must be non-decreasing (cumulative lengths), got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens {total}, got {offsets[-1]}")
    return offsets


def _check_max_seqlen(name: str, max_seqlen, offsets: List[int]) -> None:
    """TypeError unless an int; ValueError if shorter than the longest sequence (flash-attn sizes its grid by it,
    so a smaller value there silently drops rows)."""
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {max_seqlen!r}")
    longest = max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
    if max_seqlen < longest:
        raise ValueError(f"{name} must be at least the longest sequence ({longest}), got {max_seqlen}")


def _as_batch(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of a packed (total, heads, D) tensor as a (1, heads, end - start, D) view."""
    return t[start:end].unsqueeze(0).transpose(1, 2)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                     scale: Optional[float] = None, return_lse: bool = False, *,
                     window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                     sinks: Optional[torch.Tensor] = None):
    """Attention of each packed sequence to its own keys: :func:`kernels.attention` per sequence b on q tokens
    [cu_seqlens_q[b], cu_seqlens_q[b+1]) and k/v tokens [cu_seqlens_k[b], cu_seqlens_k[b+1]).

    q: (total_q, H, D); k, v: (total_k, Hkv, D), H a multiple of Hkv; fp16/bf16/fp32, any strides.
    cu_seqlens_q/k: int32 (batch + 1,) cumulative lengths from 0 to total (sequences of length 0 are allowed);
    max_seqlen_q/k: ints at least the longest sequence. ``causal`` is bottom-right per sequence (query i of a
    sequence sees key j iff j <= i + len_k - len_q), as are the window and ALiBi distances. ``alibi_slopes`` is
    float32 (H,) or (batch, H); the other variants are those of :func:`kernels.attention`.

    Returns out (total_q, H, D) in q's dtype and, with ``return_lse``, lse (H, total_q) float32 (flash-attn's
    varlen layout; -inf for rows that see no key). Differentiable in q, k, v (and sinks). Under dropout every
    sequence draws its own mask. See the module docstring for the current limit (one launch per sequence).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3)
    check_qkv(*(_as_batch(t, 0, t.shape[0]) for t in (q, k, v)))  # dtypes, devices, head counts, head dims
    offsets_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    offsets_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(offsets_q) != len(offsets_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(offsets_q) - 1} and {len(offsets_k) - 1}")
    check_same("device", q=q, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, offsets_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, offsets_k)
    batch = len(offsets_q) - 1
    per_batch_alibi = alibi_slopes is not None and alibi_slopes.dim() == 2
    if per_batch_alibi and alibi_slopes.shape[0] != batch:
        raise ValueError(f"alibi_slopes must have shape (H,) or (batch, H) with batch = {batch} sequences, "
                         f"got {tuple(alibi_slopes.shape)}")
    outs, lses = [], []
    for b in range(batch):
        out, lse = attention(_as_batch(q, *offsets_q[b:b + 2]), _as_batch(k, *offsets_k[b:b + 2]),
                             _as_batch(v, *offsets_k[b:b + 2]), causal, scale, True, window_size=window_size,
                             softcap=softcap, alibi_slopes=alibi_slopes[b] if per_batch_alibi else alibi_slopes,
                             dropout_p=dropout_p, sinks=sinks)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:  # no sequence: nothing to attend, and torch.cat needs at least one piece
        out = q.new_empty(q.shape)
        lse = torch.empty((q.shape[1], 0), dtype=torch.float32, device=q.device)
    else:
        out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return (out, lse) if return_lse else out
