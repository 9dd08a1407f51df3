"""Fused attention's public function (its argument checks are ``checks.py``).

:func:`attention` takes q (B, H, Nq, D) and k, v (B, Hkv, Nk, D) (see ``kernels.py`` for the math and the
kernels), checks every argument before anything launches, and hands the call to ``ops.attention_op`` as its
tensors and one frozen :class:`~kernels.attention.plan.AttentionVariant` (the path through a family: public
function -> options -> cached plan (``plan.py``) -> autograd (``ops.py``) -> keyword launch (``configs.py``)).

Fallback (documented, never silent about the math): if the Triton kernels cannot run on the inputs in this
process (see ``kernels._runtime.kernel_runs_on``) :func:`attention` uses ``kernels.reference.attention``.
"""
from typing import Optional, Tuple

import torch

from kernels import _runtime, reference
from kernels._validate import check_size
from kernels.attention import block_mask as mods, configs
from kernels.attention.checks import (ATTENTION_DTYPES, check_alibi, check_attention_chunk, check_dropout,
                                      check_flag, check_mods, check_padding_mask, check_qkv, check_scale,
                                      check_sinks, check_softcap, check_tensor, check_window, draw_rng, key_bounds,
                                      plain_qkv_shapes)
from kernels.attention.ops import attention_op, attention_seq_first_op, natural_lse
from kernels.attention.plan import NO_TENSORS, LastTensor, VariantTensors, attention_variant

_padding = LastTensor()
"""A key padding mask's checks, key range and uint8 copy, run once while a model's layers pass the same mask for
the same (batch, Nk, q's device)."""


# ------------------------------------------------------------------------------------------------- public API


def _padding_tensors(key_padding_mask: torch.Tensor, q: torch.Tensor, batch: int, n_k: int) -> VariantTensors:
    """A key padding mask's tensors as the kernels take them, its key range and a contiguous uint8 copy, once it
    passes ``check_padding_mask`` for q's (``batch``, ``n_k``) and device (the memo's key: the checks depend on
    nothing else, and no op changes the mask's dtype, shape or device without bumping its version). A copy, not a
    view: the memo keeps them until a call with another mask, and a view would keep the caller's mask's memory
    alive until then (a copy of B * Nk bytes per new mask, where a view costs host time on every call)."""
    check_padding_mask(key_padding_mask, q, batch, n_k)
    return VariantTensors(key_bounds(key_padding_mask),
                          key_padding_mask.to(torch.uint8, memory_format=torch.contiguous_format))


def _variant_tensors(q, batch: int, n_k: int, key_padding_mask, alibi_slopes, sinks, dropout_p: float,
                     block_mask: Optional[mods.BlockMask], score_mod: Optional[mods.ScoreMod]) -> VariantTensors:
    """The call's tensors besides q, k, v (of ``batch`` rows of ``n_k`` keys) as the kernels take them, the key
    padding mask's checked here: NO_TENSORS when it has none, a key padding mask's (memoised while layers pass the
    same mask) when it has only that."""
    padded = NO_TENSORS if key_padding_mask is None else _padding.get(
        key_padding_mask, (batch, n_k, q.device), _padding_tensors, key_padding_mask, q, batch, n_k)
    if alibi_slopes is None and sinks is None and dropout_p == 0 and block_mask is None and score_mod is None:
        return padded
    mod_tensors = {}
    if block_mask is not None:
        mod_tensors.update(block_mask=block_mask.expanded(*q.shape[:2]), mask_args=block_mask.mask_mod.tensors)
    if score_mod is not None:
        mod_tensors["score_args"] = score_mod.tensors
    return padded._replace(alibi_slopes=None if alibi_slopes is None else alibi_slopes.contiguous(),
                           sinks=None if sinks is None else sinks.float(),
                           rng_state=draw_rng(q.device) if dropout_p > 0 else None, **mod_tensors)


def attention_dropout_mask(batch: int, heads: int, n_q: int, n_k: int, dropout_p: float,
                           device=None) -> torch.Tensor:
    """The (B, H, Nq, Nk) bool keep-mask that ``attention(..., dropout_p=dropout_p)`` on q of shape (B, H, Nq, D)
    and k of length Nk would draw from the generator's current state, bit for bit (same Philox stream), advancing
    the generator as that call would. Probabilities are kept where True and scaled by 1 / (1 - dropout_p).
    ``device``: where the kernels of this process run (the default); ValueError naming device elsewhere."""
    for name, size in (("batch", batch), ("heads", heads), ("n_q", n_q), ("n_k", n_k)):
        check_size("attention_dropout_mask", name, size)
    dropout_p = check_dropout(dropout_p)
    device = _runtime.kernel_device(device, "attention_dropout_mask")
    if dropout_p == 0:  # attention draws nothing from the generator without dropout, and keeps every element
        return torch.ones((batch, heads, n_q, n_k), dtype=torch.bool, device=device)
    rng_state = draw_rng(device)
    mask = torch.zeros((batch, heads, n_q, n_k), dtype=torch.uint8, device=device)
    if mask.numel():
        with _runtime.launch_device(rng_state):
            configs.launch_dropout_mask(rng_state, mask, dropout_p)
    return mask.view(torch.bool)


def chunk_mask(n_q: int, n_k: int, attention_chunk: int, device=None) -> torch.Tensor:
    """Bool (n_q, n_k) mask of flash-attn 3's ``attention_chunk`` C (0: all True): query i sees key j iff
    floor(j / C) == floor((i + n_k - n_q) / C), its bottom-right aligned position's chunk."""
    if attention_chunk == 0:
        return torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    positions = torch.arange(n_q, device=device) + (n_k - n_q)
    return torch.arange(n_k, device=device)[None, :] // attention_chunk == positions[:, None] // attention_chunk


def _reference_with_lse(q, k, v, causal: bool, scale: float, key_padding_mask, attention_chunk: int, **variants):
    """The documented fallback and float64's path: kernels.reference.attention, plus its logsumexp (float32 as the
    kernel's, float64 for float64 inputs)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if attention_chunk:
        chunks = chunk_mask(q.shape[2], k.shape[2], attention_chunk, q.device)
        mask = chunks if mask is None else mask & chunks
    out, lse = reference.attention(q, k, v, causal=causal, scale=scale, mask=mask, return_lse=True, **variants)
    return out, lse.to(torch.promote_types(lse.dtype, torch.float32))


def _keep_mask(q_shape, n_k: int, dropout_p: float, device: torch.device) -> torch.Tensor:
    """float64's dropout keep-mask (B, H, Nq, Nk): the kernels' Philox mask, which a call in another dtype draws
    (:func:`attention_dropout_mask`); while torch.compile traces, which cannot trace that bare launch, one drawn
    from torch's generator (the kernels' seed is inductor's random stream there too: not eager's mask)."""
    if torch.compiler.is_compiling():
        return torch.rand((*q_shape[:3], n_k), device=device) >= dropout_p
    return attention_dropout_mask(*q_shape[:3], n_k, dropout_p, device)


_NO_WINDOW = (-1, -1)
_NO_VARIANT_SCALARS = (-1, -1, 0, 0.0, 0.0)


def _checked_scalars(window_size, attention_chunk, softcap, dropout_p) -> Tuple[int, int, int, float, float]:
    """(window_left, window_right, attention_chunk, softcap, dropout_p) checked as :func:`attention` documents."""
    if (type(window_size) is tuple and window_size == _NO_WINDOW and type(attention_chunk) is int
            and attention_chunk == 0 and type(softcap) is float and softcap == 0.0 and type(dropout_p) is float
            and dropout_p == 0.0):  # the defaults, told apart by type first (an array's == is no bool)
        return _NO_VARIANT_SCALARS
    window_left, window_right = check_window(window_size)
    return (window_left, window_right, check_attention_chunk(attention_chunk),
            check_softcap(softcap), check_dropout(dropout_p))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: Optional[float] = None,
              return_lse: bool = False, key_padding_mask: Optional[torch.Tensor] = None, *,
              window_size: Tuple[int, int] = (-1, -1), attention_chunk: int = 0, softcap: float = 0.0,
              alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              sinks: Optional[torch.Tensor] = None, mask_mod=None, score_mod: Optional[mods.ScoreMod] = None):
    """Fused attention ``softmax(scale * q @ k^T + mask) @ v`` with autograd for q, k, v (and sinks).

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D), H a multiple of Hkv (GQA/MQA without repeating k/v), 1 <= D <= 256,
    fp16/bf16/fp32, any strides; float64 runs ``kernels.reference.attention`` (torch ops, every variant but the
    mods, which raise TypeError; dropout draws the kernels' mask, :func:`attention_dropout_mask`'s; lse float64).
    ``scale`` defaults to 1/sqrt(D). ``causal`` is bottom-right aligned: query i
    sees key j iff j <= i + Nk - Nq. ``key_padding_mask``: optional bool (B, Nk), True = real key (any pattern;
    key blocks outside each row's first..last True are skipped). Rows that see no key give zeros.
    Returns out (B, H, Nq, D) in q's dtype, and with ``return_lse`` also lse (B, H, Nq) float32, the natural-log
    logsumexp of the scaled, masked scores (-inf for rows that see no key; NaN, as out and torch's math, for a row
    whose scores hold NaN: NaN or inf in its query or a key it sees).

    Variants, with flash-attn 2.x's semantics (shift = Nk - Nq; positions are indices into the padded tensors,
    also under ``key_padding_mask``):

    - ``window_size=(left, right)``: query i sees keys i + shift - left <= j <= i + shift + right; -1 leaves a side
      unbounded; ``causal`` sets right to 0. Key blocks outside the window are never read: O(N * window).
    - ``attention_chunk`` C > 0 (flash-attn 3's, Llama 4's chunked attention; 0 is off): query i sees key j only if
      floor(j / C) == floor((i + shift) / C), on top of ``causal`` and the window (so without ``causal`` a row
      sees its whole chunk, both sides; rows at positions i + shift < 0 see nothing). Key blocks outside a
      row's chunk are never read: O(N * C).
    - ``softcap > 0``: the scaled score s becomes softcap * tanh(s / softcap) (before ALiBi and masks).
    - ``alibi_slopes``: float32 (H,) or (B, H); adds -slope * |i + shift - j| to the (capped) score.
    - ``sinks``: float (H,) per-head logits in every row's softmax denominator with no value (GPT-OSS):
      out_i = sum_j exp(s_ij) v_j / (exp(sink_h) + sum_j exp(s_ij)); differentiable. lse includes the sink (so a
      row that sees no key has lse = sink_h and zeros).
    - ``dropout_p`` in [0, 1): dropout on the probabilities, Philox in the kernels, seeded from torch's default
      generator of q's device (``torch.manual_seed`` reproduces it; :func:`attention_dropout_mask` returns the
      mask a call would use); the backward regenerates the mask. lse is of the undropped probabilities.
    - ``mask_mod``: a user mask (FlexAttention-style, see ``kernels/attention/block_mask.py``): a
      :class:`kernels.BlockMask` from :func:`kernels.create_block_mask` (computed once, reusable across calls and
      layers), or a :class:`kernels.MaskMod` / bare ``@triton.jit`` ``mask_mod(b, h, q_idx, kv_idx, *extra)``
      (its block mask is built per call). Combined with every other mask by AND; 128 x 128 cells it hides
      entirely are never read.
    - ``score_mod``: a :class:`kernels.ScoreMod` (``score_mod(score, b, h, q_idx, kv_idx, *extra)`` and its
      derivative in the score) applied to the scaled score before softcap and ALiBi.

    Reverse-mode autograd only: forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) raises, except
    in float64 (torch ops).
    """
    q_shape, k_shape = check_qkv(q, k, v, dtypes=ATTENTION_DTYPES)
    scale = check_scale(scale, q_shape[3])
    causal = check_flag("causal", causal)
    return_lse = check_flag("return_lse", return_lse)
    window_left, window_right, attention_chunk, softcap, dropout_p = _checked_scalars(window_size, attention_chunk,
                                                                                      softcap, dropout_p)
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, q)
    if sinks is not None:
        check_sinks(sinks, q)
    float64 = q.dtype is torch.float64  # k's and v's too (check_qkv)
    if float64 and (mask_mod is not None or score_mod is not None):
        raise TypeError("kernels.attention: mask_mod and score_mod are Triton functions, which the kernels run on "
                        "fp16/bf16/fp32 q, k, v only; got float64")
    block_mask = check_mods(mask_mod, score_mod, q, k)
    if not float64:  # float64's torch ops have forward-mode derivatives
        _runtime.refuse_forward_ad("kernels.attention", q, k, v)
    # k and v are on q's device (check_qkv); under a torch.func transform the reference's torch ops run (the
    # kernels' backward cannot read functorch's wrapped gradients)
    kernels_run = _runtime.kernel_runs_on(q) and not _runtime.in_functorch_transform()
    if key_padding_mask is not None and (float64 or not kernels_run or type(key_padding_mask) is not torch.Tensor):
        # else checked by its memo (_padding_tensors), which reads a plain tensor's is_cuda and _version
        check_padding_mask(key_padding_mask, q, q_shape[0], k_shape[2])
    if float64 or not kernels_run:
        if not kernels_run and (dropout_p > 0 or block_mask is not None or score_mod is not None):
            raise RuntimeError("kernels.attention: dropout and mask/score mods need the Triton kernels (Philox "
                               "streams and @triton.jit mods), which cannot run on these inputs in this process "
                               "or under a torch.func transform")
        keep = _keep_mask(q_shape, k_shape[2], dropout_p, q.device) if dropout_p > 0 else None
        out, lse = _reference_with_lse(q, k, v, causal, scale, key_padding_mask, attention_chunk,
                                       window_size=(window_left, window_right), softcap=softcap,
                                       alibi_slopes=alibi_slopes, sinks=sinks, dropout_mask=keep,
                                       dropout_p=dropout_p)
        if not float64 and _runtime.holds_no_data(q):  # shapes only (meta, eager fake): out laid out as a real
            out = torch.empty_like(q).copy_(out)  # call's (as q where q is dense), not the reference's contiguous one
    else:
        tensors = _variant_tensors(q, q_shape[0], k_shape[2], key_padding_mask, alibi_slopes, sinks, dropout_p,
                                   block_mask, score_mod)
        variant = attention_variant(causal, k_shape[2] - q_shape[2], scale, window_left, window_right,
                                    attention_chunk, softcap, dropout_p,
                                    -1 if block_mask is None else block_mask.mask_mod.key,
                                    -1 if score_mod is None else score_mod.key)
        out, lse = attention_op(q, k, v, tensors, variant)
        return (out, natural_lse(lse)) if return_lse else out
    return (out, lse) if return_lse else out


def check_4d(q, k, v) -> None:
    """TypeError/ValueError naming the argument unless q, k, v are 4-D tensors (of any layout)."""
    if plain_qkv_shapes(q, k, v) is None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, t, ndim=4)


def _plain_seq_first(q, k, v) -> bool:
    """Whether q (B, Nq, H, D), k, v (B, Nk, Hkv, D) pass every check of ``check_qkv`` on their (B, H, N, D) views,
    tested on them as they are (the common case: no view to make)."""
    shapes = plain_qkv_shapes(q, k, v)
    if shapes is None:
        return False
    (batch, _, heads, d), kv_shape, v_shape = shapes
    return (kv_shape == v_shape and kv_shape[0] == batch and kv_shape[3] == d and 1 <= d <= configs.MAX_HEAD_DIM
            and kv_shape[2] > 0 and heads % kv_shape[2] == 0)


def attention_seq_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: Optional[float],
                        return_lse: bool, window_size: Tuple[int, int], attention_chunk: int, softcap: float,
                        alibi_slopes: Optional[torch.Tensor], dropout_p: float):
    """:func:`attention` on flash-attn's layout: q (B, Nq, H, D), k, v (B, Nk, Hkv, D) 4-D tensors; out (B, Nq, H, D)
    (laid out as q where q is dense), lse (B, H, Nq) as :func:`attention`'s. Gradients reach q, k, v in their
    layouts. A plain eager call launches on views made inside its autograd node, where autograd records none
    (four recorded transposes cost more host time than the rest of the call); anything else (ALiBi, inputs the
    fast check does not pass, torch.compile, forward AD or torch.func, inputs the kernels cannot take) is
    :func:`attention` of transposed views, with its checks and messages."""
    if (alibi_slopes is not None or not _plain_seq_first(q, k, v) or torch.compiler.is_compiling()
            or _runtime.forward_ad_active() or not _runtime.kernels_can_run(q)):
        check_4d(q, k, v)  # transposable
        result = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale, return_lse,
                           window_size=window_size, attention_chunk=attention_chunk, softcap=softcap,
                           alibi_slopes=alibi_slopes, dropout_p=dropout_p)
        return (result[0].transpose(1, 2), result[1]) if return_lse else result.transpose(1, 2)
    scale = check_scale(scale, q.shape[-1])
    window_left, window_right, attention_chunk, softcap, dropout_p = _checked_scalars(window_size, attention_chunk,
                                                                                      softcap, dropout_p)
    tensors = NO_TENSORS if dropout_p == 0 else VariantTensors(rng_state=draw_rng(q.device))
    variant = attention_variant(bool(causal), k.shape[1] - q.shape[1], scale, window_left, window_right,
                                attention_chunk, softcap, dropout_p)
    out, lse = attention_seq_first_op(q, k, v, tensors, variant)
    return (out, natural_lse(lse)) if return_lse else out
