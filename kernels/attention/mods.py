"""Ready-made mask and score mods for :func:`kernels.attention` (see ``block_mask.py`` for the contract).

Masks: :func:`document_mask` (packed sequences: a query sees the keys of its own document) and
:func:`prefix_lm_mask` (bidirectional over a per-batch prefix, causal after it). Scores: :func:`softcap_score`
(tanh soft-capping) and :func:`alibi_score` (ALiBi), each with its derivative in the score, as the built-in
``softcap``/``alibi_slopes`` compute them.
"""

import torch
import triton
import triton.language as tl

from kernels._validate import check_int, check_tensor
from kernels.attention.block_mask import MaskMod, ScoreMod
from kernels.attention.checks import FP32_MAX, check_real
from kernels.attention.kernels import _tanh


@triton.jit
def _same_document(b, h, q_idx, kv_idx, doc_ids, stride_db):
    row = doc_ids + b.to(tl.int64) * stride_db
    return tl.load(row + q_idx) == tl.load(row + kv_idx)


def document_mask(doc_ids: torch.Tensor) -> MaskMod:
    """Query i sees key j iff doc_ids[i] == doc_ids[j]: packed documents (self-attention, Nq == Nk).

    doc_ids: int32 (N,) shared by the batch, or (B, N) per batch row (contiguous rows), N >= max(Nq, Nk) of the
    calls (checked: ValueError naming doc_ids). Combine with ``causal=True`` for causal documents."""
    check_tensor("doc_ids", doc_ids, dtypes=(torch.int32,))
    if doc_ids.dim() not in (1, 2):
        raise ValueError(f"doc_ids must have shape (N,) or (B, N), got {tuple(doc_ids.shape)}")
    ids = doc_ids.contiguous()
    positions = ("q_idx", "kv_idx")
    dims = ("b", positions) if ids.dim() == 2 else (positions,)
    return MaskMod(_same_document, ids, ids.stride(0) if ids.dim() == 2 else 0, index_dims={"doc_ids": dims})


@triton.jit
def _prefix_lm(b, h, q_idx, kv_idx, prefix_lengths):
    return (kv_idx <= q_idx) | (kv_idx < tl.load(prefix_lengths + b))


def prefix_lm_mask(prefix_lengths: torch.Tensor) -> MaskMod:
    """Query i of batch row b sees key j iff j <= i or j < prefix_lengths[b] (prefix-LM: the prefix attends
    bidirectionally, the rest causally). prefix_lengths: int32 (B,) (B >= the calls' batch: checked). Use without
    ``causal``."""
    check_tensor("prefix_lengths", prefix_lengths, ndim=1, dtypes=(torch.int32,))
    return MaskMod(_prefix_lm, prefix_lengths.contiguous(), index_dims={"prefix_lengths": ("b",)})


@triton.jit
def _softcap(score, b, h, q_idx, kv_idx, cap):
    return cap * _tanh(score / cap)


@triton.jit
def _softcap_grad(score, b, h, q_idx, kv_idx, cap):
    t = _tanh(score / cap)
    return 1.0 - t * t


def softcap_score(cap: float) -> ScoreMod:
    """score -> cap * tanh(score / cap), derivative 1 - tanh^2: the built-in ``softcap`` as a score mod. Its tanh is
    the exp2 one in every dtype (the accurate series makes the fp16/bf16 d128 sm_100 forward spill): in fp32, scores
    far below a large cap (|score| from cap * 2^-12, below which tanh returns its argument, to cap / 2) carry
    ~cap * eps absolute error, unlike the built-in ``softcap`` (at cap 1000, ~20-30x torch's fp32 output error)."""
    # an fp32 in the kernels: a larger (or infinite) cap would compute inf * tanh(0) = NaN, not the uncapped score
    return ScoreMod(_softcap, _softcap_grad, check_real("cap", cap, 0.0, FP32_MAX, low_open=True))


@triton.jit
def _alibi(score, b, h, q_idx, kv_idx, slopes, shift):
    return score - tl.load(slopes + h) * tl.abs(q_idx + shift - kv_idx).to(tl.float32)


@triton.jit
def _alibi_grad(score, b, h, q_idx, kv_idx, slopes, shift):
    return score * 0.0 + 1.0


def alibi_score(slopes: torch.Tensor, shift: int = 0) -> ScoreMod:
    """score -> score - slopes[h] * |i + shift - j|, derivative 1: the built-in ``alibi_slopes`` (float32 (H,))
    as a score mod (H >= the calls' query heads: checked); ``shift`` = Nk - Nq gives the built-in's bottom-right
    diagonal."""
    check_tensor("slopes", slopes, ndim=1, dtypes=(torch.float32,))
    shift = check_int("shift", shift)  # (int() would truncate a float and parse a string)
    return ScoreMod(_alibi, _alibi_grad, slopes.contiguous(), shift, index_dims={"slopes": ("h",)})
