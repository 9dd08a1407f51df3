"""kernels.flash_attn's dense and varlen functions (flash-attn 2.x's API) and kernels.attention.varlen.

Outputs and gradients are checked against float64 math by the tolerance rule (tests/tolerance.py); the packed
layouts also against a re-implementation, written here from flash-attn's docstrings, of what those functions
compute. Signatures are compared with flash-attn 2.x's, parameter by parameter.
"""
import inspect
import math

import pytest
import torch

from kernels import flash_attn, reference
from kernels.attention import api, configs
from kernels.attention.varlen import attention_varlen
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
    params = inspect.signature(getattr(flash_attn, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == expected


def _flash_semantics(q, k, v, scale, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """flash-attn's documented math, written out for (B, Sq, H, D) / (B, Sk, Hkv, D) inputs: query i attends to
    keys in [i + Sk - Sq - left, i + Sk - Sq + right] (right = 0 if causal), head h to kv head h // (H / Hkv),
    softcap * tanh(s / softcap) on the scaled scores, then -slope * |i + Sk - Sq - j|; empty rows give zeros."""
    n_q, heads, n_k = q.shape[1], q.shape[2], k.shape[1]
    k, v = (t.repeat_interleave(heads // k.shape[2], dim=2) for t in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    dist = torch.arange(n_q)[:, None] + n_k - n_q - torch.arange(n_k)[None, :]  # i + Sk - Sq - j
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]
        s = s - slopes[:, :, None, None].to(s.dtype) * dist.abs()
    left, right = window_size
    right = 0 if causal else right
    visible = torch.ones_like(dist, dtype=torch.bool)
    if left >= 0:
        visible &= dist <= left
    if right >= 0:
        visible &= -dist <= right
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v)


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
    cu, lengths = _cu([4, 0, 6]), [4, 0, 6]
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


def _launch_forbidden(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel launched before the bad input was rejected")

    monkeypatch.setattr(configs, "launch", forbidden)


DENSE = (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
PACKED = (torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8), _cu([2, 4]), _cu([2, 4]), 4, 4)
BAD_CALLS = [
    (lambda: flash_attn.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 8)), ValueError, "qkv"),
    (lambda: flash_attn.flash_attn_kvpacked_func(DENSE[0], torch.randn(1, 4, 2, 8)), ValueError, "kv"),
    (lambda: flash_attn.flash_attn_func(*DENSE, deterministic=1), TypeError, "deterministic"),
    (lambda: flash_attn.flash_attn_func(*DENSE, return_attn_probs="yes"), TypeError, "return_attn_probs"),
    (lambda: flash_attn.flash_attn_func(*DENSE, softmax_scale="0.1"), TypeError, "softmax_scale"),
    (lambda: flash_attn.flash_attn_func(DENSE[0][0], *DENSE[1:]), ValueError, "q"),
    (lambda: flash_attn.flash_attn_func(*DENSE, window_size=(-2, 0)), ValueError, "window_size"),
    (lambda: flash_attn.flash_attn_func(*DENSE, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: flash_attn.flash_attn_varlen_func(*PACKED, block_table=torch.zeros(2, 1, dtype=torch.int32)),
     NotImplementedError, "block_table"),
    (lambda: flash_attn.flash_attn_varlen_func(*PACKED, dropout_p=0.1, return_attn_probs=True),
     NotImplementedError, "return_attn_probs"),
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
