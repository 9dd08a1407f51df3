"""Plain-PyTorch baselines: the truth the Triton kernels are checked against and the quadratic baseline they are
benchmarked against.

Each function is written out op by op, in the dtype of its inputs (pass float64 tensors for a float64
reference). Attention materialises the full (Nq, Nk) score matrix: O(N^2) memory, on purpose.
Nothing here imports Triton or the kernels.
"""
import math
from typing import Callable, Optional, Sequence, Union

import torch


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Bool (n_q, n_k) mask, True where query i may see key j, aligned bottom-right as in FlashAttention.

    Query i sees key j iff ``j <= i + n_k - n_q``: with n_q == n_k this is the usual lower triangle
    (diagonal included: a token attends to itself); with n_q < n_k the queries are the last n_q positions
    of a sequence whose first keys are cached; with n_q > n_k the first n_q - n_k queries see no key.
    """
    return window_mask(n_q, n_k, (-1, 0), device)


def window_mask(n_q: int, n_k: int, window_size, device=None) -> torch.Tensor:
    """Bool (n_q, n_k) mask of a local window (left, right), as in flash-attn: query i sees key j iff
    ``i + n_k - n_q - left <= j <= i + n_k - n_q + right``; -1 leaves a side unbounded."""
    left, right = window_size
    shift = n_k - n_q
    # the band by tril/triu of a bool matrix, as a user writes a causal mask: one byte per entry, where (int64)
    # offsets would move eight and make the quadratic baseline look costlier than it is
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if right >= 0:
        visible = visible.tril(shift + right)
    if left >= 0:
        visible = visible.triu(shift - left)
    return visible


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
    return_probs: bool = False,
    return_lse: bool = False,
    *,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
):
    """Quadratic attention: ``softmax(q @ k^T * scale + mask) @ v``, materialising the scores.

    q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) with H a multiple of Hkv (grouped-query attention: each k/v head
    serves H // Hkv consecutive query heads, repeated here in memory). ``scale`` defaults to 1/sqrt(D).
    ``causal`` masks bottom-right (see :func:`causal_mask`). ``mask``, broadcastable to (B, H, Nq, Nk), is a
    bool "may attend" mask or a float mask added to the scores. Rows that see no key give zeros, not NaN.

    Variants (flash-attn 2.x semantics, shift = Nk - Nq): ``window_size`` (left, right) keeps keys
    i + shift - left <= j <= i + shift + right (-1: unbounded; ``causal`` sets right to 0, see
    :func:`window_mask`); ``softcap > 0`` replaces the scaled score s by softcap * tanh(s / softcap);
    ``alibi_slopes`` (H,) or (B, H) then adds -slope * |i + shift - j|; ``sinks`` (H,) adds exp(sink_h) to every
    row's softmax denominator with no value; ``dropout_mask`` (bool, broadcastable to (B, H, Nq, Nk), True =
    kept) multiplies the probabilities by mask / (1 - dropout_p) after the softmax.

    Returns (B, H, Nq, D), and with ``return_probs`` also the (B, H, Nq, Nk) probabilities (undropped, without
    the sink), with ``return_lse`` also the (B, H, Nq) natural-log logsumexp of the masked scores, the sink
    included (-inf for rows that see no key and no sink), in that order.
    """
    _check_attention(q, k, v, mask, window_size, softcap, alibi_slopes, sinks)
    n_q, n_k = q.shape[-2], k.shape[-2]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        distance = (torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
                    - torch.arange(n_k, device=q.device)[None, :]).abs().to(scores.dtype)
        slopes = alibi_slopes.to(scores.dtype).reshape(-1, q.shape[1], 1, 1)
        scores = scores - slopes * distance
    visible = window_mask(n_q, n_k, (window_size[0], 0 if causal else window_size[1]), q.device)
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:  # in the scores' dtype, as torch's SDPA adds it (a float32 mask to fp16 scores too)
        scores = scores + mask.to(scores.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    # amax refuses an empty dim: with no key at all every row's max is -inf (zeros out, as any row that sees none)
    row_max = scores.amax(dim=-1, keepdim=True) if n_k else scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype)[:, None, None]
        row_max = torch.maximum(row_max, sink)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(scores - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sink - row_max)
    probs = exp / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = (probs if dropout_mask is None else probs * dropout_mask / (1 - dropout_p)) @ v
    extra = (probs,) * return_probs
    if return_lse:
        extra += ((row_max + torch.log(denom)).squeeze(-1),)
    return (out, *extra) if extra else out


def _check_attention(q, k, v, mask, window_size, softcap, alibi_slopes, sinks) -> None:
    """TypeError/ValueError naming the argument unless :func:`attention` takes it: shapes that broadcast or a
    group size of zero would otherwise give an output of another shape, and an integer mask would be added to
    the scores."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (batch, heads, _, d), (kv_batch, kv_heads, n_k, kv_d) = q.shape, k.shape
    if kv_batch != batch or kv_d != d or tuple(v.shape[:3]) != (batch, kv_heads, n_k) or not kv_heads \
            or heads % kv_heads:
        raise ValueError(f"attention: q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with H a multiple of "
                         f"Hkv, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attention: mask must be bool (True = may attend) or float (added), got {mask.dtype}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"attention: window_size must be a pair (left, right), got {window_size!r}")
    if not softcap >= 0:
        raise ValueError(f"attention: softcap must be >= 0 (0: off), got {softcap}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"attention: alibi_slopes must have shape (H,) = ({heads},) or (B, H) = ({batch}, {heads}), "
                         f"got {tuple(alibi_slopes.shape)}")
    if sinks is not None and tuple(sinks.shape) != (heads,):
        raise ValueError(f"attention: sinks must have shape (H,) = ({heads},), got {tuple(sinks.shape)}")


def softmax(x: torch.Tensor, dim: int = -1, scale: float = 1.0, causal: bool = False) -> torch.Tensor:
    """Naive softmax of ``x * scale`` along ``dim``: max, subtract, exp, sum and divide as separate ops.

    With ``causal`` the last two dims are (Nq, Nk) and entries above the bottom-right diagonal are masked
    (``dim`` must then be the last); rows the mask hides entirely give zeros. A row that is all -inf in the
    input gives NaN, and rows of no column an empty result, exactly as ``torch.softmax`` does.
    """
    x = x * scale
    if not causal:
        return _naive_softmax(x, dim)
    if x.dim() < 2:
        raise ValueError(f"softmax: causal=True needs x of at least 2 dims (..., Nq, Nk), got shape {tuple(x.shape)}")
    if dim not in (-1, x.dim() - 1):
        raise ValueError(f"softmax: causal=True needs dim=-1 (the key axis), got dim={dim}")
    return causal_softmax(x, _naive_softmax)


def _naive_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax of x along ``dim`` as separate ops; rows of no column give an empty result, a 0-d x (one element,
    as torch takes it) one."""
    if x.dim() and not x.shape[dim]:  # amax refuses an empty dim: there is nothing to normalise
        return torch.empty_like(x)
    row_max = x.amax(dim=dim, keepdim=True)
    exp = torch.exp(x - row_max)
    return exp / exp.sum(dim=dim, keepdim=True)


def causal_softmax(x: torch.Tensor, softmax: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``softmax`` (a function taking a tensor to its softmax along the last dim) of x (..., Nq, Nk) under the
    bottom-right causal mask (:func:`causal_mask`): masked entries are -inf before it, and rows that see no key
    zeros after it (the softmax of an all -inf row is NaN)."""
    visible = causal_mask(x.shape[-2], x.shape[-1], x.device)
    y = softmax(x.masked_fill(~visible, float("-inf")))
    return y.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)


def _normalized_dims(x: torch.Tensor, normalized_shape: Union[int, Sequence[int]], **params):
    """The trailing dims ``normalized_shape`` names; ValueError unless x ends in it (at least one dim: mean over
    () would reduce every dim) and each parameter given in ``params`` has exactly that shape (as torch's norms
    require: one that broadcasts would change the output's shape or values)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} does not match the trailing dims of input {tuple(x.shape)}")
    for name, p in params.items():
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(f"{name} must have shape normalized_shape {shape}, got {tuple(p.shape)}")
    return tuple(range(-len(shape), 0))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing ``normalized_shape`` dims (biased var)."""
    dims = _normalized_dims(x, normalized_shape, weight=weight, bias=bias)
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dim=dims, keepdim=True)
    y = centered / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x, normalized_shape, weight=None, eps: Optional[float] = None):
    """``x / sqrt(mean(x^2) + eps) * weight``; ``eps`` defaults to the machine epsilon of the dtype torch computes
    in (float32's for fp16/bf16 x, x's own otherwise), as torch's ``F.rms_norm`` does."""
    dims = _normalized_dims(x, normalized_shape, weight=weight)
    eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps if eps is None else eps
    y = x / torch.sqrt((x * x).mean(dim=dims, keepdim=True) + eps)
    return y * weight if weight is not None else y
