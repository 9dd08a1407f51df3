"""kernels.flash_attn's dense and varlen functions (flash-attn 2.x's API) and kernels.attention.varlen.

Outputs and gradients are checked against float64 math by the tolerance rule (tests/tolerance.py); the packed
layouts also against a re-implementation, written here from flash-attn's docstrings, of what those functions
compute. Signatures are compared with flash-attn 2.x's, parameter by parameter.
"""
import inspect
import math

import numpy as np
import pytest
import torch

from kernels import flash_attn, reference
from kernels.attention import api, configs
from kernels.attention.varlen import attention_varlen
from test_varlen import paged_cache
from tolerance import BACKWARD, FORWARD, assert_close

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

FLASH_ATTN_SIGNATURES = {  # flash_attn/flash_attn_interface.py (2.x): (name, default) in order; None = required
    "flash_attn_func": ["q", "k", "v"],
    "flash_attn_qkvpacked_func": ["qkv"],
    "flash_attn_kvpacked_func": ["q", "kv"],
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"],
    "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
}
COMMON_DEFAULTS = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                   ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
                   ("return_attn_probs", False)]


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_SIGNATURES))
def test_signatures_are_flash_attns(name):
    expected = [(p, inspect.Parameter.empty) for p in FLASH_ATTN_SIGNATURES[name]] + COMMON_DEFAULTS
    if name == "flash_attn_varlen_func":
        expected.append(("block_table", None))
    if "varlen" not in name:
        expected.append(("attention_chunk", 0))  # flash-attn 3's, keyword-only here (test_attention_chunk.py)
    params = inspect.signature(getattr(flash_attn, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == expected


def _flash_probs(q, k, scale, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """flash-attn's documented probabilities, written out for (B, Sq, H, D) / (B, Sk, Hkv, D) inputs as (B, H, Sq,
    Sk): query i attends to keys in [i + Sk - Sq - left, i + Sk - Sq + right] (right = 0 if causal), head h to kv
    head h // (H / Hkv), softcap * tanh(s / softcap) on the scaled scores, then -slope * |i + Sk - Sq - j| (in
    the slopes' float32 or better, as torch promotes it); empty rows give zeros. In q's dtype, torch's rounding."""
    n_q, heads, n_k = q.shape[1], q.shape[2], k.shape[1]
    k = k.repeat_interleave(heads // k.shape[2], dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    dist = torch.arange(n_q)[:, None] + n_k - n_q - torch.arange(n_k)[None, :]  # i + Sk - Sq - j
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]
        s = s - slopes[:, :, None, None].to(torch.promote_types(s.dtype, slopes.dtype)) * dist.abs()
    left, right = window_size
    right = 0 if causal else right
    visible = torch.ones_like(dist, dtype=torch.bool)
    if left >= 0:
        visible &= dist <= left
    if right >= 0:
        visible &= -dist <= right
    return torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0).to(q.dtype)


def _flash_semantics(q, k, v, scale, **variants):
    """flash-attn's documented output (see :func:`_flash_probs`) for (B, Sq, H, D) / (B, Sk, Hkv, D) inputs."""
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    return torch.einsum("bhij,bjhd->bihd", _flash_probs(q, k, scale, **variants), v)


def _bshd(b, s, h, d, dtype, requires_grad=False):
    return torch.randn(b, s, h, d, dtype=dtype).requires_grad_(requires_grad)


def _reference(q, k, v, dtype, **variants):
    """kernels.reference.attention on the (B, H, S, D) views, in ``dtype``; returns (B, S, H, D)."""
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    return reference.attention(q, k, v, **variants).transpose(1, 2)


DENSE_CASES = [  # (dtype, B, Sq, Sk, H, Hkv, D, variants)
    (FP16, 2, 9, 9, 4, 2, 16, dict(causal=True)),
    (BF16, 1, 5, 12, 3, 1, 8, dict(causal=True, window_size=(3, 0))),
    (FP32, 1, 12, 5, 2, 2, 20, dict(causal=True)),  # Sq > Sk: the first rows see no key
    (FP16, 2, 7, 11, 2, 1, 32, dict(window_size=(2, 1), softcap=2.0)),
    (FP32, 1, 6, 6, 4, 2, 8, dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 1.0]), softmax_scale=0.3)),
]


@pytest.mark.parametrize("dtype,b,n_q,n_k,h,h_kv,d,variants", DENSE_CASES)
def test_flash_attn_func_matches_float64(device, dtype, b, n_q, n_k, h, h_kv, d, variants):
    q, k, v = _bshd(b, n_q, h, d, dtype), _bshd(b, n_k, h_kv, d, dtype), _bshd(b, n_k, h_kv, d, dtype)
    variants = dict(variants)
    scale = variants.pop("softmax_scale", None)
    on_device = {name: value.to(device) if torch.is_tensor(value) else value for name, value in variants.items()}
    out = flash_attn.flash_attn_func(q.to(device), k.to(device), v.to(device), softmax_scale=scale, **on_device)
    assert out.shape == (b, n_q, h, d) and out.dtype == dtype and out.is_contiguous()
    out.view(b, n_q, h * d)  # flash-attn callers reshape the output with view
    ref = dict(variants, scale=scale)
    assert_close(out.cpu(), _reference(q, k, v, torch.float64, **ref), _reference(q, k, v, dtype, **ref), FORWARD)
    written_out = _flash_semantics(q.double(), k.double(), v.double(), scale or 1 / math.sqrt(d), **variants)
    assert_close(out.cpu(), written_out, _reference(q, k, v, dtype, **ref), FORWARD, name="documented semantics")


def test_qkvpacked_matches_flash_semantics_and_gradients_reach_qkv(device):
    qkv = torch.randn(2, 7, 3, 2, 16, dtype=FP16)
    grad_out = torch.randn(2, 7, 2, 16, dtype=FP16)
    results = []
    for dtype in (FP16, torch.float64):
        leaf = qkv.to(dtype).requires_grad_()
        out = _reference(*leaf.unbind(2), dtype, causal=True, window_size=(2, 0))
        results.append((out, *torch.autograd.grad(out, leaf, grad_out.to(dtype))))
    (low, dlow), (exact, dexact) = results
    leaf = qkv.to(device).requires_grad_()
    out = flash_attn.flash_attn_qkvpacked_func(leaf, causal=True, window_size=(2, 0))
    (dqkv,) = torch.autograd.grad(out, leaf, grad_out.to(device))
    assert out.is_contiguous() and dqkv.shape == qkv.shape
    assert_close(out.cpu(), exact, low, FORWARD)
    assert_close(out.cpu(), _flash_semantics(*qkv.double().unbind(2), 0.25, causal=True, window_size=(2, 0)), low,
                 FORWARD, name="documented semantics")
    assert_close(dqkv.cpu(), dexact, dlow, BACKWARD, name="dqkv")


def test_kvpacked_matches_flash_semantics_and_gradients_reach_q_and_kv(device):
    q, kv = torch.randn(1, 5, 4, 8, dtype=BF16), torch.randn(1, 9, 2, 2, 8, dtype=BF16)  # GQA, Sq < Sk
    grad_out = torch.randn(1, 5, 4, 8, dtype=BF16)
    results = []
    for dtype in (BF16, torch.float64):
        leaves = q.to(dtype).requires_grad_(), kv.to(dtype).requires_grad_()
        out = _reference(leaves[0], *leaves[1].unbind(2), dtype, causal=True, softcap=1.5)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out.to(dtype))))
    (low, *dlow), (exact, *dexact) = results
    leaves = q.to(device).requires_grad_(), kv.to(device).requires_grad_()
    out = flash_attn.flash_attn_kvpacked_func(*leaves, causal=True, softcap=1.5)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device))
    assert_close(out.cpu(), exact, low, FORWARD)
    assert_close(out.cpu(), _flash_semantics(q.double(), *kv.double().unbind(2), 8 ** -0.5, causal=True, softcap=1.5),
                 low, FORWARD, name="documented semantics")
    for name, grad, grad_exact, grad_low in zip(("dq", "dkv"), grads, dexact, dlow):
        assert_close(grad.cpu(), grad_exact, grad_low, BACKWARD, name=name)


def test_return_attn_probs_without_dropout_is_out_lse_none(device):
    q, k, v = _bshd(1, 6, 2, 8, FP32), _bshd(1, 3, 2, 8, FP32), _bshd(1, 3, 2, 8, FP32)
    out, lse, s_dmask = flash_attn.flash_attn_func(q.to(device), k.to(device), v.to(device), causal=True,
                                                   return_attn_probs=True, deterministic=True)
    assert s_dmask is None and lse.shape == (1, 2, 6) and lse.dtype == FP32
    exact = torch.logsumexp((q.double().transpose(1, 2) @ k.double().permute(0, 2, 3, 1) / math.sqrt(8))
                            .masked_fill(~reference.causal_mask(6, 3), float("-inf")), -1)
    assert torch.isposinf(lse[:, :, :3]).all()  # flash-attn's value for rows that see no key (here the first 3)
    torch.testing.assert_close(lse[:, :, 3:].cpu().double(), exact[:, :, 3:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, flash_attn.flash_attn_func(q.to(device), k.to(device), v.to(device), causal=True))


def test_return_attn_probs_with_dropout_encodes_the_dropout_mask_the_call_used(device):
    q, k, v = _bshd(1, 5, 2, 8, FP32), _bshd(1, 7, 1, 8, FP32), _bshd(1, 7, 1, 8, FP32)
    torch.manual_seed(1)
    out, _, s_dmask = flash_attn.flash_attn_func(q.to(device), k.to(device), v.to(device), dropout_p=0.4,
                                                 causal=True, return_attn_probs=True)
    torch.manual_seed(1)
    keep = api.attention_dropout_mask(1, 2, 5, 7, 0.4, device)
    assert s_dmask.shape == (1, 2, 5, 7)
    s_dmask, keep = s_dmask.cpu(), keep.cpu()
    _, probs = reference.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, return_probs=True)
    torch.testing.assert_close(s_dmask.abs(), probs)
    assert torch.equal((s_dmask >= 0) | (probs == 0), keep | (probs == 0))  # negative exactly where dropped
    expected = _reference(q, k, v, FP32, causal=True, dropout_mask=keep, dropout_p=0.4)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variants", [dict(), dict(softcap=30.0)])
def test_s_dmask_probabilities_are_within_the_rule_of_float64_with_the_same_keep_mask(device, variants):
    """Sq > Sk with steep ALiBi: every score of the first rows is large, so rounding each step of the softmax to
    fp16 (scores, slopes, exp, sums) costs more than torch's one-rounding fp16 softmax; S_dmask is computed in
    float64 and rounded once."""
    q, k, v = _bshd(1, 40, 2, 16, FP16), _bshd(1, 12, 2, 16, FP16), _bshd(1, 12, 2, 16, FP16)
    slopes = torch.tensor([0.7, 1.3])
    torch.manual_seed(5)
    _, _, s_dmask = flash_attn.flash_attn_func(q.to(device), k.to(device), v.to(device), dropout_p=0.2,
                                               alibi_slopes=slopes.to(device), return_attn_probs=True, **variants)
    torch.manual_seed(5)
    keep = api.attention_dropout_mask(1, 2, 40, 12, 0.2, device).cpu()
    exact, torch_fp16 = (_flash_probs(q.to(dtype), k.to(dtype), 0.25, alibi_slopes=slopes, **variants)
                         for dtype in (torch.float64, FP16))
    assert s_dmask.dtype == FP16 and s_dmask.shape == (1, 2, 40, 12)
    assert_close(s_dmask.cpu(), torch.where(keep, exact, -exact), torch.where(keep, torch_fp16, -torch_fp16),
                 FORWARD, name="S_dmask")


# ------------------------------------------------------------------------------------------------------ varlen


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _per_sequence(q, k, v, cu_q, cu_k, dtype, alibi_slopes=None, **variants):
    """(out (total_q, H, D), lse (H, total_q)) by the reference on each sequence, in ``dtype``; a sequence with
    no key gives zeros and lse -inf (the reference cannot reduce over no key)."""
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, ks, vs = (t[c[b]:c[b + 1]].to(dtype).transpose(0, 1)[None] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        if ks.shape[2] == 0:
            outs.append(qs[0].transpose(0, 1) * 0)
            lses.append(torch.full(qs.shape[1:3], float("-inf"), dtype=dtype))
            continue
        slopes = alibi_slopes[b] if alibi_slopes is not None else None
        out, lse = reference.attention(qs, ks, vs, return_lse=True, alibi_slopes=slopes, **variants)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


VARLEN_CASES = [  # (dtype, q lengths, k lengths, H, Hkv, D, variants): empty sequences, Lq != Lk
    (FP16, [5, 0, 9, 1], [5, 0, 9, 1], 2, 1, 16, dict(causal=True)),
    (BF16, [3, 7, 2], [6, 7, 0], 3, 3, 8, dict(causal=True, window_size=(2, 0))),
    (FP32, [4, 6], [9, 2], 4, 2, 32, dict(softcap=3.0, scale=0.5)),
]


@pytest.mark.parametrize("dtype,lens_q,lens_k,h,h_kv,d,variants", VARLEN_CASES)
def test_attention_varlen_matches_float64_per_sequence_with_gradients(device, dtype, lens_q, lens_k, h, h_kv, d,
                                                                       variants):
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v = torch.randn(sum(lens_q), h, d, dtype=dtype), *torch.randn(2, sum(lens_k), h_kv, d, dtype=dtype)
    alibi = torch.rand(len(lens_q), h) if dtype == FP32 else None  # per-sequence (batch, H) slopes
    grad_out = torch.randn(q.shape, dtype=dtype)
    results = []
    for precision in (dtype, torch.float64):
        leaves = [t.to(precision).requires_grad_() for t in (q, k, v)]
        out, lse = _per_sequence(*leaves, cu_q, cu_k, precision, alibi_slopes=alibi, **variants)
        results.append((out, lse, *torch.autograd.grad(out, leaves, grad_out.to(precision))))
    (low, lse_low, *dlow), (exact, lse_exact, *dexact) = results
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out, lse = attention_varlen(*leaves, cu_q.to(device), cu_k.to(device), max(lens_q), max(lens_k),
                                return_lse=True, alibi_slopes=None if alibi is None else alibi.to(device), **variants)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (h, sum(lens_q)) and lse.dtype == FP32
    assert_close(out.cpu(), exact, low, FORWARD)
    empty = torch.isneginf(lse_exact)
    assert torch.equal(torch.isneginf(lse.cpu()), empty)
    assert_close(lse.cpu()[~empty], lse_exact[~empty], lse_low.float()[~empty], FORWARD, name="lse")
    for name, grad, grad_exact, grad_low in zip(("dq", "dk", "dv"), torch.autograd.grad(out, leaves, grad_out.to(device)),
                                               dexact, dlow):
        assert_close(grad.cpu(), grad_exact, grad_low, BACKWARD, name=name)


def test_varlen_wrappers_are_attention_varlen_on_their_layouts(device):
    cu = _cu([4, 0, 6])
    qkv = torch.randn(10, 3, 2, 8, device=device, requires_grad=True)
    out = flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu.to(device), 6, causal=True)
    expected, lse = attention_varlen(*qkv.unbind(1), cu.to(device), cu.to(device), 6, 6, causal=True, return_lse=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (dqkv,) = torch.autograd.grad(out.sum(), qkv)
    assert dqkv.shape == qkv.shape and dqkv.abs().sum() > 0
    q, kv = torch.randn(10, 4, 8, device=device), torch.randn(10, 2, 2, 8, device=device)
    out, flash_lse, s_dmask = flash_attn.flash_attn_varlen_kvpacked_func(
        q, kv, cu.to(device), cu.to(device), 6, 6, window_size=(1, 1), return_attn_probs=True)
    expected, lse = attention_varlen(q, *kv.unbind(1), cu.to(device), cu.to(device), 6, 6, window_size=(1, 1),
                                     return_lse=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(flash_lse, lse, rtol=0, atol=0)
    assert s_dmask is None
    q, k = torch.randn(3, 2, 8, device=device), torch.randn(2, 2, 8, device=device)
    _, flash_lse, _ = flash_attn.flash_attn_varlen_func(q, k, k, _cu([3]).to(device), _cu([2]).to(device), 3, 2,
                                                        causal=True, return_attn_probs=True)
    assert torch.isposinf(flash_lse[:, 0]).all() and flash_lse[:, 1:].isfinite().all()  # row 0 sees no key


def test_varlen_s_dmask_holds_each_sequences_dense_s_dmask(device):
    """flash-attn's varlen layout: (batch, H, max_seqlen_q, max_seqlen_k), sequence b's probabilities (negated
    where dropped by its corner of the batch's keep-mask) in [b, :, :len_q, :len_k], zeros elsewhere."""
    lens_q, lens_k, h, d, p = [5, 0, 9, 3, 4], [7, 4, 9, 0, 2], 2, 8, 0.3
    q, k, v = torch.randn(sum(lens_q), h, d, dtype=FP16), *torch.randn(2, sum(lens_k), 1, d, dtype=FP16)
    alibi = torch.rand(len(lens_q), h)
    cu_q, cu_k = _cu(lens_q).to(device), _cu(lens_k).to(device)
    torch.manual_seed(3)
    out, _, s_dmask = flash_attn.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cu_q, cu_k, 9, 9, p,
                                                        causal=True, window_size=(3, 0), alibi_slopes=alibi.to(device),
                                                        return_attn_probs=True)
    torch.manual_seed(3)
    keep = api.attention_dropout_mask(len(lens_q), h, 9, 9, p, device).cpu()
    assert s_dmask.shape == (len(lens_q), h, 9, 9) and s_dmask.dtype == FP16
    s_dmask, rest = s_dmask.cpu(), s_dmask.cpu().clone()
    for b, (start_q, len_q, start_k, len_k) in enumerate(zip(_cu(lens_q), lens_q, _cu(lens_k), lens_k)):
        seq = (t[s:s + n][None] for t, s, n in ((q, start_q, len_q), (k, start_k, len_k), (v, start_k, len_k)))
        _, _, dense = flash_attn.flash_attn_func(*(t.to(device) for t in seq), p, causal=True, window_size=(3, 0),
                                                 alibi_slopes=alibi[b:b + 1].to(device), return_attn_probs=True)
        corner = s_dmask[b, :, :len_q, :len_k]
        torch.testing.assert_close(corner.abs(), dense[0].cpu().abs(), rtol=0, atol=0)
        assert torch.equal((corner >= 0) | (corner == 0), keep[b, :, :len_q, :len_k] | (corner == 0))
        rest[b, :, :len_q, :len_k] = 0
    assert torch.equal(rest, torch.zeros_like(rest))
    assert s_dmask.abs().sum() > 0


def test_varlen_block_table_output_lse_and_s_dmask_are_the_unpaged_ones(device):
    lens_q, lens_k, page_size = [3, 6, 0], [8, 5, 2], 3
    q, k, v = torch.randn(9, 2, 8), *torch.randn(2, 15, 2, 8)
    k_pages, v_pages, table = paged_cache((k, v), lens_k, page_size, 9)
    cu_q, cu_k = _cu(lens_q).to(device), _cu(lens_k).to(device)
    results = []
    for keys, values, block_table in ((k, v, None), (k_pages, v_pages, table)):
        torch.manual_seed(4)
        results.append(flash_attn.flash_attn_varlen_func(
            q.to(device), keys.to(device), values.to(device), cu_q, cu_k, 6, 8, 0.25, causal=True,
            return_attn_probs=True, block_table=None if block_table is None else block_table.to(device)))
    for name, unpaged, paged in zip(("out", "softmax_lse", "S_dmask"), *results):
        torch.testing.assert_close(paged, unpaged, rtol=0, atol=0, msg=name)
    assert results[0][2].abs().sum() > 0


def test_arguments_take_the_types_flash_attn_takes(device):
    """Windows as tensors (flash-attn's tests pass torch.randint(0, n, (2,))), lists, numpy arrays or pairs of 0-d
    values; numpy or 0-d tensor flags, scales and lengths: the same result as Python values."""
    q, k, v = (t.to(device) for t in DENSE)
    expected = flash_attn.flash_attn_func(q, k, v, softmax_scale=0.25, causal=True, window_size=(2, 0), softcap=5.0)
    for window in (torch.tensor([2, 0]), [2, 0], np.array([2, 0]), (torch.tensor(2), np.int64(0))):
        out = flash_attn.flash_attn_func(q, k, v, softmax_scale=torch.tensor(0.25), causal=np.bool_(True),
                                         window_size=window, softcap=np.float32(5.0), deterministic=torch.tensor(False))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    packed = [t.to(device) for t in PACKED[:5]]
    expected = flash_attn.flash_attn_varlen_func(*packed, 4, 4, causal=True, window_size=(1, 0))
    out = flash_attn.flash_attn_varlen_func(*packed, torch.tensor(4), np.int64(4), causal=torch.tensor(True),
                                            window_size=torch.tensor([1, 0]))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    cache = [t.to(device) for t in CACHE]
    expected = flash_attn.flash_attn_with_kvcache(*cache, cache_seqlens=5, causal=True, window_size=(1, 0),
                                                  num_splits=2)
    out = flash_attn.flash_attn_with_kvcache(*cache, cache_seqlens=5, causal=np.bool_(True),
                                             window_size=torch.tensor([1, 0]), num_splits=np.int64(2))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_with_kvcache_takes_float64_rotary_tables(device):
    """The documented "rotary_cos/rotary_sin of any float dtype": float64 tables rotate q and the new keys as
    their float32 rounding does (the kernels rotate in float32), and the appended key is the float64 rotation."""
    q, k_new, v_new = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 1, 16), torch.randn(2, 1, 1, 16)
    cache = torch.randn(2, 2, 8, 1, 16)
    angles = torch.arange(8, dtype=torch.float64)[:, None] * 100.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    results = []
    for dtype in (torch.float64, FP32):
        k_cache, v_cache = (c.clone().to(device) for c in cache)
        out = flash_attn.flash_attn_with_kvcache(
            q.to(device), k_cache, v_cache, k_new.to(device), v_new.to(device), rotary_cos=angles.cos().to(dtype).to(device),
            rotary_sin=angles.sin().to(dtype).to(device), cache_seqlens=torch.tensor([3, 6], dtype=torch.int32, device=device),
            causal=True)
        results.append((out, k_cache, v_cache))
    for name, got, expected in zip(("out", "k_cache", "v_cache"), *results):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
    x, cos, sin = k_new[0, 0, 0].double(), angles[3].cos(), angles[3].sin()  # batch 0's new key, position 3
    rotated = x.clone()
    rotated[0:8:2], rotated[1:8:2] = x[0:8:2] * cos - x[1:8:2] * sin, x[0:8:2] * sin + x[1:8:2] * cos
    torch.testing.assert_close(results[0][1][0, 3, 0].cpu().double(), rotated, rtol=1e-6, atol=1e-6)


def _launch_forbidden(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel launched before the bad input was rejected")

    monkeypatch.setattr(configs, "launch", forbidden)


DENSE = (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
PACKED = (torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8), _cu([2, 4]), _cu([2, 4]), 4, 4)
PAGED = (PACKED[0], torch.randn(5, 3, 2, 8), torch.randn(5, 3, 2, 8), torch.tensor([[0, 9], [3, 1]], dtype=torch.int32))
CACHE = (torch.randn(1, 1, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8))  # q, k_cache, v_cache
FLAGS = [  # every flash-attn function's bool arguments, each given a value flash-attn's docs do not type bool
    (lambda: flash_attn.flash_attn_func(*DENSE, causal="no"), "causal"),
    (lambda: flash_attn.flash_attn_func(*DENSE, deterministic=1), "deterministic"),
    (lambda: flash_attn.flash_attn_func(*DENSE, return_attn_probs="yes"), "return_attn_probs"),
    (lambda: flash_attn.flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 2, 8), causal=None), "causal"),
    (lambda: flash_attn.flash_attn_kvpacked_func(DENSE[0], torch.randn(1, 4, 2, 2, 8), causal=torch.ones(2) > 0),
     "causal"),
    (lambda: flash_attn.flash_attn_varlen_func(*PACKED, causal="no"), "causal"),
    (lambda: flash_attn.flash_attn_varlen_func(*PACKED, deterministic="no"), "deterministic"),
    (lambda: flash_attn.flash_attn_varlen_qkvpacked_func(torch.randn(6, 3, 2, 8), _cu([2, 4]), 4, causal=1),
     "causal"),
    (lambda: flash_attn.flash_attn_varlen_kvpacked_func(PACKED[0], torch.randn(6, 2, 2, 8), *PACKED[3:],
                                                        return_attn_probs=1.0), "return_attn_probs"),
    (lambda: flash_attn.flash_attn_with_kvcache(*CACHE, cache_seqlens=3, causal="no"), "causal"),
    (lambda: flash_attn.flash_attn_with_kvcache(*CACHE, cache_seqlens=3, rotary_interleaved=0),
     "rotary_interleaved"),
    (lambda: flash_attn.flash_attn_with_kvcache(*CACHE, cache_seqlens=3, return_softmax_lse="yes"),
     "return_softmax_lse"),
]
BAD_CALLS = [
    (lambda: flash_attn.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 8)), ValueError,
     r"^qkv must be \(batch_size, seqlen, 3, nheads, headdim\), got shape \(1, 4, 2, 2, 8\)"),
    (lambda: flash_attn.flash_attn_kvpacked_func(DENSE[0], torch.randn(1, 4, 2, 8)), ValueError,
     r"^kv must be 5-D, got shape \(1, 4, 2, 8\)"),
    *((call, TypeError, f"{name} must be a bool") for call, name in FLAGS),
    (lambda: flash_attn.flash_attn_func(*DENSE, softmax_scale="0.1"), TypeError, "softmax_scale"),
    (lambda: flash_attn.flash_attn_func(*DENSE, softmax_scale=torch.ones(1)), TypeError, "softmax_scale"),
    (lambda: flash_attn.flash_attn_func(*DENSE, dropout_p="0.1"), TypeError, "dropout_p"),
    (lambda: flash_attn.flash_attn_varlen_func(*PACKED, softcap=torch.ones(2)), TypeError, "softcap"),
    (lambda: flash_attn.flash_attn_func(*DENSE, window_size=torch.tensor([1.5, 0.5])), TypeError, "window_size"),
    (lambda: flash_attn.flash_attn_func(*DENSE, window_size=torch.ones(2, 2, dtype=torch.int64)), TypeError,
     "window_size"),
    (lambda: flash_attn.flash_attn_varlen_func(*PACKED[:5], 4, torch.tensor(4.0)), TypeError, "max_seqlen_k"),
    (lambda: flash_attn.flash_attn_with_kvcache(*CACHE, cache_seqlens=3, window_size=(1,)), TypeError,
     "window_size"),
    (lambda: flash_attn.flash_attn_func(DENSE[0][0], *DENSE[1:]), ValueError, r"^q must be 4-D, got shape \(4, 2, 8\)"),
    (lambda: flash_attn.flash_attn_func(*DENSE, window_size=(-2, 0)), ValueError, "window_size"),
    (lambda: flash_attn.flash_attn_func(*DENSE, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: flash_attn.flash_attn_varlen_func(*PACKED, block_table=torch.zeros(2, 1, dtype=torch.int32)),
     ValueError, "k must be 4-D"),
    (lambda: flash_attn.flash_attn_varlen_func(*PAGED[:3], *PACKED[3:], block_table=PAGED[3].long()), TypeError,
     "block_table"),
    (lambda: flash_attn.flash_attn_varlen_func(*PAGED[:3], *PACKED[3:], block_table=PAGED[3][:1]), ValueError,
     "block_table must have one row per sequence"),
    (lambda: flash_attn.flash_attn_varlen_func(*PAGED[:3], *PACKED[3:5], 4, 7, block_table=PAGED[3]), ValueError,
     "block_table's 2 pages of 3 keys"),
    (lambda: flash_attn.flash_attn_varlen_func(PAGED[0], PAGED[1][:, :0], PAGED[2][:, :0], *PACKED[3:],
                                               block_table=PAGED[3]), ValueError, "k must be a page pool"),
    (lambda: flash_attn.flash_attn_varlen_func(*PAGED[:2], PAGED[2][:, :2], *PACKED[3:], block_table=PAGED[3]),
     ValueError, "k and v must have the same shape"),
    (lambda: attention_varlen(*PACKED[:3], PACKED[3].long(), *PACKED[4:]), TypeError, "cu_seqlens_q"),
    (lambda: attention_varlen(*PACKED[:3], PACKED[3][None], *PACKED[4:]), ValueError, "cu_seqlens_q"),
    (lambda: attention_varlen(*PACKED[:4], _cu([4, 2]).flip(0), *PACKED[5:]), ValueError, "cu_seqlens_k"),
    (lambda: attention_varlen(*PACKED[:3], torch.tensor([0, 2, 2, 6], dtype=torch.int32), *PACKED[4:]), ValueError,
     "cu_seqlens_q and cu_seqlens_k"),
    (lambda: attention_varlen(*PACKED[:3], _cu([2, 3]), *PACKED[4:]), ValueError, "cu_seqlens_q must end"),
    (lambda: attention_varlen(*PACKED[:4], torch.tensor([0, 4, 2], dtype=torch.int32), 4, 4), ValueError,
     "non-decreasing"),
    (lambda: attention_varlen(*PACKED[:5], 3, 4), ValueError, "max_seqlen_q"),
    (lambda: attention_varlen(*PACKED[:5], 4, 4.0), TypeError, "max_seqlen_k"),
    (lambda: attention_varlen(PACKED[0], PACKED[1][:, :, :4], *PACKED[2:]), ValueError, "k and v"),
    (lambda: attention_varlen(*PACKED, alibi_slopes=torch.ones(3, 2)), ValueError, "alibi_slopes"),
]


@pytest.mark.parametrize("call,error,match", BAD_CALLS)
def test_bad_input_raises_naming_the_argument_before_any_launch(monkeypatch, call, error, match):
    _launch_forbidden(monkeypatch)
    with pytest.raises(error, match=match):
        call()
