"""Attention's launch plans: what a call computes as one frozen value, and the launches it makes.

A call is its tensors (q, k, v and :class:`VariantTensors`: masks, slopes, sinks, dropout seed, packed-sequence
offsets, the mods' tensors) and an :class:`AttentionVariant`: causal, window, softcap, scale, dropout, the mods'
registry keys, the packed lengths. The plan of a launch (the kernels' compile-time parameters, the scalar
arguments, the grid's rows and heads) depends only on the variant and the shapes, so it is built once per input
signature and cached (:func:`_plan`); each call then adds its pointers and strides and launches: runtime
arguments by position, compile-time ones by keyword.

:func:`forward` and :func:`backward` are the launches, with no autograd: ``ops.py`` wraps them (a plain
autograd.Function in eager, ``torch.library`` ops under torch.compile). lse is in the kernels' log2 units.
"""
import functools
import weakref
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from kernels.attention import block_mask as mods, configs
from kernels.attention.kernels import LOG2E


@dataclass(frozen=True)
class AttentionVariant:
    """Everything an attention launch computes besides its tensors (already checked by the public functions).

    ``causal_shift``: the diagonal the causal edge, the window and ALiBi distances are measured from (Nk - Nq for
    bottom-right, 0 for top-left); query i sees key j iff j <= i + causal_shift (causal) and
    i + causal_shift - window_left <= j <= i + causal_shift + window_right (edges -1: unbounded), and with
    ``attention_chunk`` C > 0 (flash-attn 3's) also floor(j / C) == floor((i + causal_shift) / C). ``softcap`` 0 is
    off. Packed sequences (varlen, when :class:`VariantTensors` has ``cu_seqlens_q``): ``max_seqlen_q/k`` bound the
    lengths and size the grid, and each sequence is aligned bottom-right by itself. ``mask_mod``/``score_mod``:
    keys of ``block_mask.py``'s registry, -1 for none.

    Adding a variant: a field here (and its constexpr or argument in :func:`_plan`/:func:`_variant_args`), its math
    in ``kernels.py``, its check and argument in ``api.py``, its specialisation in ``configs.py``.
    """

    causal: bool = False
    causal_shift: int = 0
    scale: float = 1.0
    window_left: int = -1
    window_right: int = -1
    attention_chunk: int = 0
    softcap: float = 0.0
    dropout_p: float = 0.0
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    mask_mod: int = -1
    score_mod: int = -1

    def __hash__(self) -> int:
        # the fields' hash, computed once per instance: the plan cache hashes the variant on every launch (a frozen
        # dataclass's own __hash__ rebuilds the tuple each time), and eager calls share memoised instances
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(self.__dict__.values()))
            object.__setattr__(self, "_hash", cached)
        return cached


class VariantTensors(NamedTuple):
    """A call's tensors besides q, k, v, None where unused: ``kv_bounds`` (B, 2) int32 [first, last + 1) visible
    key per batch row and ``pad`` (B, Nk) uint8 (nonzero = visible, unit key stride) of a key padding mask;
    ``alibi_slopes`` float32 (H,) or (B, H), contiguous; ``sinks`` float32 (H,), any stride; ``rng_state`` the
    int64 (seed, offset) of dropout; ``cu_seqlens_q/k`` int32 (batch + 1,) of packed sequences; the mask mod's
    (B, H, L) int32 ``block_mask`` summary and each mod's extra tensors (``mask_args``, ``score_args``)."""

    kv_bounds: Optional[torch.Tensor] = None
    pad: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None
    rng_state: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    block_mask: Optional[torch.Tensor] = None
    mask_args: Optional[List[torch.Tensor]] = None
    score_args: Optional[List[torch.Tensor]] = None

    def padding_only(self) -> bool:
        """Whether the call has a key padding mask's tensors (or none) and nothing else."""
        return (self.alibi_slopes is None and self.sinks is None and self.rng_state is None
                and self.cu_seqlens_q is None and self.cu_seqlens_k is None and self.block_mask is None
                and self.mask_args is None and self.score_args is None)

    def offsets_only(self) -> bool:
        """Whether the call has packed sequences' offsets (varlen's) and nothing else."""
        return (self.cu_seqlens_q is not None and self.kv_bounds is None and self.pad is None
                and self.alibi_slopes is None and self.sinks is None and self.rng_state is None
                and self.block_mask is None and self.mask_args is None and self.score_args is None)


NO_TENSORS = VariantTensors()


def _new_variant(causal: bool, causal_shift: int, scale: float, window_left: int = -1, window_right: int = -1,
                 attention_chunk: int = 0, softcap: float = 0.0, dropout_p: float = 0.0, mask_mod: int = -1,
                 score_mod: int = -1, max_seqlen_q: int = 0, max_seqlen_k: int = 0) -> AttentionVariant:
    return AttentionVariant(causal, causal_shift, scale, window_left, window_right, attention_chunk, softcap,
                            dropout_p, max_seqlen_q, max_seqlen_k, mask_mod, score_mod)


_memoised_variant = functools.lru_cache(maxsize=1024)(_new_variant)


def attention_variant(*scalars) -> AttentionVariant:
    """The :class:`AttentionVariant` of a call's checked scalars, by position: (causal, causal_shift, scale,
    window_left=-1, window_right=-1, attention_chunk=0, softcap=0.0, dropout_p=0.0, mask_mod=-1, score_mod=-1,
    max_seqlen_q=0, max_seqlen_k=0) (``max_seqlen_q/k`` of packed sequences). Made once per distinct one in eager
    (a frozen dataclass takes about a µs to build, and a model's calls repeat a handful); made anew while
    torch.compile or torch.export traces, where a size can be symbolic (a dynamic Nk - Nq: unhashable) and
    dynamo would trace past the cache anyway (warning that it does)."""
    if torch.compiler.is_compiling():
        return _new_variant(*scalars)
    return _memoised_variant(*scalars)


def _no_tensor():
    """What a None among a memo's tensors stands as: a dead weak reference's answer."""
    return None


_is_compiling = torch.compiler.is_compiling


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``t``'s device: a replay runs only what the capture launched, so
    nothing it needs may come from a memo (a replay's new values would meet a value derived from old ones)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class LastTensor:
    """A memo of a value derived from tensors, for the last ``size`` (default one) sets of them: returned again
    while the same tensor objects (and Nones) come back unmodified with the same ``key``. A model hands every layer
    the same mask (offsets, block table), so what is derived from it (a padding mask's key range, the SDPA shim's
    mask analysis, varlen's offsets verdict) is computed at the first layer; hybrid models alternate two masks
    (a sliding-window one and a full one; an encoder-decoder's causal and cross-attention masks), which a memo of
    a few entries keeps apart.

    Unmodified means the same ``_version``, which every in-place torch op bumps (those that change the shape or
    strides too: ``resize_``, ``set_``, ``unsqueeze_``, ...). Writes that bypass torch's version counter (through
    ``.data`` or a numpy view, or assigning ``.data``) are not seen. A value ``compute`` raises for is not kept, nor
    one derived from an inference tensor (made under ``torch.inference_mode``: it keeps no version counter).
    While torch.compile traces or a CUDA graph is captured, ``compute`` runs every time (the graph computes it)."""

    def __init__(self, size: int = 1):
        self._size = size
        self._entries = ()  # ((weak references, versions, key, value), ...), newest first: replaced as one

    def get(self, tensors, key, compute, *args):
        """``compute(*args)``, or the value it gave for these ``tensors`` (one tensor, or a tuple of tensors and
        Nones) and ``key`` while they were as they are now."""
        if type(tensors) is not tuple:
            tensors = (tensors,)
        if _is_compiling() or _capturing(tensors[0]):  # the graph computes it on every run
            return compute(*args)
        for refs, versions, last_key, value in self._entries:
            if last_key == key and len(refs) == len(tensors):
                if len(tensors) == 1:  # the common case (one mask, one offsets tensor), without a loop
                    tensor = tensors[0]
                    if refs[0]() is tensor and tensor._version == versions[0]:
                        return value
                else:
                    for ref, version, tensor in zip(refs, versions, tensors):
                        if ref() is not tensor or (tensor is not None and tensor._version != version):
                            break
                    else:
                        return value
        value = compute(*args)
        try:
            versions = tuple(None if t is None else t._version for t in tensors)
        except RuntimeError:  # an inference tensor (torch.inference_mode's) has no version counter: no memo
            return value
        kept = tuple(entry for entry in self._entries[:self._size - 1] if entry[0][0]() is not None)
        self._entries = ((tuple(_no_tensor if t is None else weakref.ref(t) for t in tensors), versions, key,
                          value),) + kept
        return value


def _edges(n_q: int, n_k: int, causal: bool, causal_shift: int, window_left: int, window_right: int):
    """(CAUSAL, WINDOW, CAUSAL_SHIFT, WINDOW_SHIFT): query i sees key j iff j <= i + CAUSAL_SHIFT (if CAUSAL) and
    j >= i + WINDOW_SHIFT (if WINDOW). ``causal`` sets the window's right edge to 0 as flash-attn does; an edge
    that hides no key of the (n_q, n_k) grid is dropped, so it costs nothing."""
    upper = causal_shift + (0 if causal else window_right)
    lower = causal_shift - window_left
    has_upper = (causal or window_right >= 0) and upper < n_k - 1
    has_lower = window_left >= 0 and lower > 1 - n_q
    return has_upper, has_lower, upper if has_upper else 0, lower if has_lower else 0


def _chunk_hides_keys(n_k: int, diagonal: int, chunk: int, varlen: bool) -> bool:
    """Whether chunks of ``chunk`` keys (0: none) hide some key of a dense (n_q, n_k) grid whose query i sits at
    position i + ``diagonal``: yes unless every position and key lies in chunk 0 (no negative position, n_k <=
    chunk). Packed sequences each have their own diagonal: kept."""
    return chunk > 0 and (varlen or diagonal < 0 or n_k > chunk)


class Plan(NamedTuple):
    """What a launch needs besides the call's pointers and strides: ``meta`` the kernels' compile-time parameters
    (passed by keyword), ``scalars`` their scalar arguments in the kernels' order (H .. dropout_p; the backward's
    with sm_scale), the grid's ``n_q`` / ``n_k`` rows (the packed maxima for varlen), ``batch`` (the number of
    sequences) and ``rows`` q's (B, H, Nq) as a tuple, lse's shape (a tuple: torch parses it faster than a
    torch.Size slice), ``lse_strides`` its contiguous strides (an allocation given them skips computing them)."""

    meta: dict
    scalars: tuple
    batch: int
    n_q: int
    n_k: int
    rows: Tuple[int, int, int]
    lse_strides: Tuple[int, int, int]


HEADS_FIRST, SEQ_FIRST, PACKED = 0, 1, 2
"""The layouts the launches take q, k, v, out, dO and the gradients in, as they are: (B, H, N, D); flash-attn's
(B, N, H, D); varlen's packed (total, H, D), as its (1, H, total, D) view. Their sizes and strides are read in
(B, H, N, D) order: what a view would give, without making one (each view costs host time)."""
_HEADS_DIM = (1, 2, 1)
_SEQUENCE_DIM = (2, 1, 0)
"""Each layout's dims of the heads and of the sequence."""


def _heads_first(shape: Tuple[int, ...], layout: int) -> Tuple[int, ...]:
    """The (B, H, N, D) sizes of a tensor of ``shape`` in ``layout``."""
    if layout == HEADS_FIRST:
        return shape
    if layout == SEQ_FIRST:
        batch, n, heads, d = shape
        return batch, heads, n, d
    total, heads, d = shape
    return 1, heads, total, d


@functools.lru_cache(maxsize=4096)
def _plan(variant: AttentionVariant, varlen_batch: int, q_shape: Tuple[int, ...], k_shape: Tuple[int, ...],
          layout: int, dtype: torch.dtype, tf32: bool, backward: bool) -> Plan:
    """The :class:`Plan` of a forward (or, with ``backward``, of the dK/dV and dQ kernels) for a signature:
    the variant, q's and k's shapes in ``layout``, the dtype, TF32 and, for packed sequences (``varlen_batch``
    >= 0), their number. Cached: a model's layers and steps repeat a handful of signatures."""
    q_shape = _heads_first(q_shape, layout)
    batch, heads, n_q, head_dim = q_shape
    _, kv_heads, n_k, _ = _heads_first(k_shape, layout)
    varlen = varlen_batch >= 0
    if varlen:  # each sequence's own Nk - Nq is added by its program: shifts are relative to that diagonal
        batch, n_q, n_k = varlen_batch, variant.max_seqlen_q, variant.max_seqlen_k
    diagonal = n_k - n_q if varlen else variant.causal_shift
    has_upper, has_lower, upper, lower = _edges(n_q, n_k, variant.causal, diagonal, variant.window_left,
                                                variant.window_right)
    if varlen:
        upper, lower, diagonal = upper - diagonal, lower - diagonal, 0
    meta = configs.kernel_meta(head_dim, dtype, tf32, has_upper, has_lower, variant.softcap > 0)
    meta.update(CHUNKED=_chunk_hides_keys(n_k, diagonal, variant.attention_chunk, varlen), MASK_MOD=None,
                SCORE_MOD=None)
    if backward:
        meta["SCORE_GRAD"] = None
    if variant.mask_mod >= 0:
        (meta["MASK_MOD"],) = mods.functions(variant.mask_mod)
    if variant.score_mod >= 0:
        meta["SCORE_MOD"], grad = mods.functions(variant.score_mod)
        if backward:
            meta["SCORE_GRAD"] = grad
    # A chunk of n_k or more keys shows a row at position p >= 0 every key (p < n_k), as one of exactly n_k does:
    # the kernels take that one, so their int32 position arithmetic cannot overflow.
    scales = (variant.scale * LOG2E.value, variant.scale) if backward else (variant.scale * LOG2E.value,)
    scalars = (heads, heads // kv_heads, n_q, n_k, upper, lower, diagonal, min(variant.attention_chunk, n_k),
               *scales, variant.softcap, variant.dropout_p)
    rows = tuple(q_shape[:3])
    return Plan(meta, scalars, batch, n_q, n_k, rows, (rows[1] * rows[2], rows[2], 1))


def _plan_of(q_shape: Tuple[int, ...], k_shape: Tuple[int, ...], dtype: torch.dtype, tensors: VariantTensors,
             variant: AttentionVariant, backward: bool, layout: int = HEADS_FIRST) -> Plan:
    """The cached :func:`_plan` of q, k of shapes ``q_shape``, ``k_shape`` in ``layout`` (read as (B, H, N, D)
    inside the cached function: once per signature, not per call)."""
    varlen_batch = -1 if tensors.cu_seqlens_q is None else tensors.cu_seqlens_q.shape[0] - 1
    return _plan(variant, varlen_batch, q_shape, k_shape, layout, dtype, configs.uses_tf32(dtype), backward)


def _heads_first_strides(t: torch.Tensor, layout: int) -> Tuple[int, ...]:
    """``t``'s (b, h, n, d) strides (a packed tensor's batch stride 0: its one batch index is 0)."""
    if layout == HEADS_FIRST:
        return t.stride()
    if layout == SEQ_FIRST:
        stride_b, stride_n, stride_h, stride_d = t.stride()
        return stride_b, stride_h, stride_n, stride_d
    stride_n, stride_h, stride_d = t.stride()
    return 0, stride_h, stride_n, stride_d


# The kernels take their runtime arguments by position, in their signatures' order (a keyword call of some 55
# arguments costs several µs of host time per launch), and their compile-time ones (Plan.meta, the tile) by keyword.
def _strides(t: torch.Tensor, varlen: bool, layout: int) -> Tuple[int, ...]:
    """``t``'s (b, h, n, d) strides as the kernels take them: a packed (1, H, total, D) view's batch stride is 0,
    since every sequence is found from cu_seqlens."""
    # the common layouts without _heads_first_strides' frame: (B, H, N, D) and varlen's packed tensors
    if layout == HEADS_FIRST:
        return (0, *t.stride()[1:]) if varlen else t.stride()
    if layout == PACKED:
        stride_n, stride_h, stride_d = t.stride()
        return 0, stride_h, stride_n, stride_d
    return (0, *t.stride()[1:]) if varlen else _heads_first_strides(t, layout)


_NONE_BACKWARD = (None,) * 9 + (0,) * 4
_NONE_FORWARD = (None,) + _NONE_BACKWARD  # SINKS too


def _variant_args(tensors: VariantTensors, variant: AttentionVariant, lse_strides: Tuple[int, ...], varlen: bool,
                  forward: bool) -> tuple:
    """The variant's pointers and strides every attention kernel takes, in their order: KV_BOUNDS, PAD, ALIBI,
    (the forward's SINKS), SEED, CU_SEQLENS_Q/K, BLOCK_MASK, MASK_ARGS, SCORE_ARGS, stride_pb/ab/mb/mh/lb/lh
    (``lse_strides``: lse's)."""
    if tensors is NO_TENSORS and variant.score_mod < 0:  # a plain call: every pointer None, every stride 0
        return (*(_NONE_FORWARD if forward else _NONE_BACKWARD), 0 if varlen else lse_strides[0], lse_strides[1])
    alibi, pad = tensors.alibi_slopes, tensors.pad
    summary = tensors.block_mask if variant.mask_mod >= 0 else None
    seed = tensors.rng_state if variant.dropout_p > 0 else None
    # the forward kernel reads sink h at SINKS + h: a strided or expanded (H,) view (sinks[::2], s.expand(H)) must
    # not reach it as is (.float() keeps a float32 view's strides); .contiguous() is free for a dense one
    sinks = None if tensors.sinks is None else tensors.sinks.contiguous()
    pointers = (tensors.kv_bounds, pad, alibi, sinks, seed) if forward else (tensors.kv_bounds, pad, alibi, seed)
    return (*pointers, tensors.cu_seqlens_q, tensors.cu_seqlens_k, summary,
            None if summary is None else mods.kernel_extra(variant.mask_mod, tensors.mask_args),
            mods.kernel_extra(variant.score_mod, tensors.score_args) if variant.score_mod >= 0 else None,
            0 if pad is None else pad.stride(0), alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
            *((0, 0) if summary is None else summary.stride()[:2]), 0 if varlen else lse_strides[0], lse_strides[1])


def _dropout(tensors: VariantTensors, variant: AttentionVariant) -> bool:
    """Whether the launches pass a SEED (dropout's specialisation)."""
    return variant.dropout_p > 0 and tensors.rng_state is not None


def rows_empty(t: torch.Tensor, varlen: bool, layout: int = HEADS_FIRST) -> torch.Tensor:
    """An uninitialised tensor of ``t``'s (B, H, N, D) shape in ``t``'s dimension order (torch.empty_like's rule:
    ``t``'s strides where ``t`` is dense, such as flash-attn's (B, N, H, D) transposed, else a dense tensor whose
    strides follow the order of ``t``'s); for packed sequences a (1, H, total, D) view of a contiguous (total, H, D)
    tensor (the varlen layout), made as one strided tensor (a contiguous one of a ``PACKED`` ``t``'s shape)."""
    if not varlen:
        return torch.empty_like(t)
    if layout == PACKED:  # empty_like: about half the host time of new_empty(t.shape)
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    _, heads, total, d = t.shape
    return torch.empty_strided((1, heads, total, d), (heads * d, d, heads * d, 1), dtype=t.dtype, device=t.device)


def gradients_empty(q: torch.Tensor, k: torch.Tensor, varlen: bool,
                    layout: int = HEADS_FIRST) -> Tuple[torch.Tensor, ...]:
    """Uninitialised (dq, dk, dv): dq as :func:`rows_empty` of q, dk of k, and dv laid out as dk (the dK/dV kernel
    takes one set of strides for both)."""
    dk = rows_empty(k, varlen, layout)
    return rows_empty(q, varlen, layout), dk, torch.empty_like(dk)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: VariantTensors, variant: AttentionVariant,
            layout: int = HEADS_FIRST) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: (out (B, H, Nq, D) in q's dtype and layout (:func:`rows_empty`), lse (B, H, Nq) fp32
    in log2 units); for packed sequences q, k, v, out are (1, H, total, D) views and lse is (1, H, total_q). With
    ``layout`` SEQ_FIRST q, k, v and out are (B, N, H, D), PACKED (total, H, D) (lse as ever)."""
    varlen = tensors.cu_seqlens_q is not None
    out = rows_empty(q, varlen, layout)
    q_shape, k_shape = q.shape, k.shape  # in layout: the cached plan reads them as (B, H, N, D)
    if out.numel() == 0 or k_shape[_SEQUENCE_DIM[layout]] == 0:  # nothing to launch: rows that see no key are
        lse = q.new_empty(_heads_first(q_shape, layout)[:3], dtype=torch.float32)  # zeros, lse -inf or the sink
        if tensors.sinks is None:
            return out.zero_(), lse.fill_(float("-inf"))
        return out.zero_(), lse.copy_(tensors.sinks[:, None].expand(lse.shape) * LOG2E.value)
    plan = _plan_of(q_shape, k_shape, q.dtype, tensors, variant, False, layout)
    lse = q.new_empty_strided(plan.rows, plan.lse_strides, dtype=torch.float32)
    args = (q, k, v, out, lse, *_variant_args(tensors, variant, plan.lse_strides, varlen, forward=True),
            *_strides(q, varlen, layout), *_strides(k, varlen, layout), *_strides(v, varlen, layout),
            *_strides(out, varlen, layout), *plan.scalars)
    configs.launch("fwd", plan.n_q, plan.batch * plan.rows[1], args, plan.meta, (plan.n_q, plan.n_k),
                   dropout=_dropout(tensors, variant), tma=(q, k, v, out), seq_first=layout == SEQ_FIRST,
                   varlen=varlen, alibi=tensors.alibi_slopes is not None, sinks=tensors.sinks is not None)
    return out, lse


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, grad_lse: Optional[torch.Tensor], tensors: VariantTensors,
             variant: AttentionVariant, layout: int = HEADS_FIRST) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernels from any (out, lse) the rows were normalised with: (dq, dk, dv) in the inputs'
    dtype and layouts (:func:`gradients_empty`; for packed sequences, views of contiguous (total, H, D) tensors, as
    :func:`forward`'s out). ``grad_lse`` is the gradient of the log2-unit lse. Sinks need nothing here: lse
    includes them. ``layout``: as :func:`forward`'s, for every (B, H, N, D) tensor."""
    varlen = tensors.cu_seqlens_q is not None
    dq, dk, dv = gradients_empty(q, k, varlen, layout)
    # The kernels store every element (zeros where no query/key is visible); only an empty side needs zero-filling.
    if not (q.numel() and k.numel()):
        return dq.zero_(), dk.zero_(), dv.zero_()
    plan = _plan_of(q.shape, k.shape, q.dtype, tensors, variant, True, layout)
    delta = _delta(grad_out, out, lse, grad_lse, plan, layout)
    # dK/dV and dQ share every argument but their outputs and the output's strides, which come after dO's
    head = (q, k, v, grad_out, lse, delta)
    shared = (*_variant_args(tensors, variant, lse.stride(), varlen, forward=False), *_strides(q, varlen, layout),
              *_strides(k, varlen, layout), *_strides(v, varlen, layout),
              *_strides(grad_out, varlen, layout))
    dropout, lengths, alibi = _dropout(tensors, variant), (plan.n_q, plan.n_k), tensors.alibi_slopes is not None
    # TMA per kernel, by the tensors it streams through descriptors: dK/dV Q and dO (a loss.sum()'s dO is a
    # stride-0 expand, which only the pointers take), dQ K and V
    configs.launch("dkdv", plan.n_k, plan.batch * k.shape[_HEADS_DIM[layout]],
                   (*head, dk, dv, *shared, *_strides(dk, varlen, layout), *plan.scalars),
                   plan.meta, lengths, dropout=dropout, tma=(q, grad_out), seq_first=layout == SEQ_FIRST, varlen=varlen,
                   alibi=alibi)
    configs.launch("dq", plan.n_q, plan.batch * plan.rows[1],
                   (*head, dq, *shared, *_strides(dq, varlen, layout), *plan.scalars),
                   plan.meta, lengths, dropout=dropout, tma=(k, v), seq_first=layout == SEQ_FIRST, varlen=varlen,
                   alibi=alibi)
    return dq, dk, dv


def _delta(grad_out, out, lse, grad_lse, plan: Plan, layout: int) -> torch.Tensor:
    """rowsum(dO * O) - dlse (B, H, Nq) fp32, by the pre-pass kernel: d lse_i / d s_ij = p_ij folds into delta,
    ds = p * (dp - (delta - dlse)). ``grad_lse`` is the gradient of the log2-unit lse, log2(e) times that of the
    natural one, hence the factor."""
    batch, heads, n_q = plan.rows
    delta = torch.empty_like(lse)
    configs.launch_delta((out, grad_out, delta, *_heads_first_strides(out, layout),
                          *_heads_first_strides(grad_out, layout), heads, n_q), n_q, batch * heads, plan.meta)
    if grad_lse is not None:
        delta -= grad_lse * LOG2E.value
    return delta
