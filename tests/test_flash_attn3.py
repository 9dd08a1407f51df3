"""kernels.flash_attn_interface: flash-attn 3's functions (Dao-AILab/flash-attention's hopper/flash_attn_interface.py,
at 01afd16d).

Signatures are compared with flash-attn 3's, written out literally below; outputs, softmax_lse and gradients with
float64 math by the tolerance rule (tests/tolerance.py); arguments this package cannot honour, and performance knobs
of the wrong type, must raise naming the argument before any launch.
"""
import inspect
from typing import Optional, Union

import numpy as np
import pytest
import torch

from kernels import flash_attn_interface as fa3, reference
from kernels.attention import configs, decode
from kernels.attention.api import chunk_mask
from test_varlen import paged_cache
from tolerance import BACKWARD, FORWARD, assert_close

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


# ------------------------------------- flash-attn 3's signatures: its parameters, defaults and annotations, literally


def flash_attn_qkvpacked_func(
    qkv,
    softmax_scale=None,
    causal=False,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    deterministic=False,
    num_heads_q=None,
    sm_margin=0,
    return_attn_probs=False,
):
    pass


def flash_attn_func(
    q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
    sm_margin=0, return_attn_probs=False,
):
    pass


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None,
    softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
    sm_margin=0, return_attn_probs=False,
):
    pass


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    qv=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[(int, torch.Tensor)]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    rotary_seqlens: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    attention_chunk=0,
    softcap=0.0, # 0.0 means deactivated
    rotary_interleaved=True,
    scheduler_metadata=None,
    num_splits=0,    # Can be tuned for speed
    pack_gqa=None,   # Can be tuned for speed
    sm_margin=0,     # Can be tuned if some SMs are used for communication
    return_softmax_lse=False,
):
    pass


UPSTREAM = [flash_attn_qkvpacked_func, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache]


@pytest.mark.parametrize("upstream", UPSTREAM, ids=lambda f: f.__name__)
def test_signatures_are_flash_attn_3s(upstream):
    assert inspect.signature(getattr(fa3, upstream.__name__)) == inspect.signature(upstream)


# ------------------------------------------------------------------------------------------- dense functions


def _reference(q, k, v, dtype, attention_chunk=0, **variants):
    """(out (B, Sq, H, D), softmax_lse (B, H, Sq) with flash-attn's +inf for rows that see no key, (q, k, v) leaves)
    of kernels.reference.attention on q, k, v (B, S, H, D) in ``dtype``."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
    mask = chunk_mask(q.shape[1], k.shape[1], attention_chunk) if attention_chunk else None
    out, lse = reference.attention(*(t.transpose(1, 2) for t in leaves), mask=mask, return_lse=True, **variants)
    return out.transpose(1, 2), lse.masked_fill(lse == float("-inf"), float("inf")), leaves


def _check_against_float64(out, lse, leaves, grad_out, kernel_grads=None, **variants):
    """Assert out, lse (and the kernel's gradients of q, k, v for ``grad_out``) match float64 by the tolerance
    rule, torch in the leaves' dtype being the baseline."""
    dtype = leaves[0].dtype
    results = []
    for ref_dtype in (FP64, dtype):
        ref_out, ref_lse, ref_leaves = _reference(*leaves, ref_dtype, **variants)
        grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.to(ref_dtype)) if kernel_grads else ()
        results.append((ref_out, ref_lse, grads))
    (exact, exact_lse, exact_grads), (low, low_lse, low_grads) = results
    assert_close(out.cpu(), exact, low, FORWARD)
    assert_close(lse.cpu(), exact_lse, low_lse.float(), FORWARD, name="softmax_lse")
    for name, got, want, baseline in zip("dq dk dv".split(), kernel_grads or (), exact_grads, low_grads):
        assert_close(got.cpu(), want, baseline, BACKWARD, name=name)


DENSE_CASES = [  # (dtype, B, Sq, Sk, H, Hkv, D, variants)
    (FP32, 2, 5, 9, 4, 2, 16, dict(causal=True)),  # Sq < Sk, GQA
    (FP32, 1, 9, 5, 2, 1, 8, dict(causal=True)),  # Sq > Sk: the first rows see no key (zeros, lse +inf)
    (FP32, 1, 7, 7, 2, 2, 16, dict(window_size=(2, 1), softcap=3.0)),
    (FP32, 1, 6, 10, 4, 1, 8, dict(causal=True, window_size=(5, 0), attention_chunk=4)),  # MQA, chunk backward
    (BF16, 1, 8, 8, 4, 2, 16, dict(causal=True, softcap=2.0)),
    (FP16, 1, 7, 4, 2, 2, 8, dict(attention_chunk=3)),  # chunks without causal: a row sees its whole chunk
]


@pytest.mark.parametrize("dtype,b,n_q,n_k,h,h_kv,d,variants", DENSE_CASES)
def test_flash_attn_func_matches_float64_with_lse_and_gradients(device, dtype, b, n_q, n_k, h, h_kv, d, variants):
    q = torch.randn(b, n_q, h, d, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(b, n_k, h_kv, d, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    out, lse = fa3.flash_attn_func(q, k, v, return_attn_probs=True, **variants)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (b, h, n_q) and lse.dtype == FP32
    assert torch.equal(fa3.flash_attn_func(q, k, v, **variants), out)  # out alone without return_attn_probs
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _check_against_float64(out, lse, (q, k, v), grad_out.cpu(), grads, **variants)
    if n_q > n_k and variants.get("causal"):
        hidden = n_q - n_k
        assert torch.all(lse[:, :, :hidden] == float("inf")) and torch.all(out[:, :hidden] == 0)
        assert torch.all(grads[0][:, :hidden] == 0)


def test_softmax_scale_is_used(device):
    q, k, v = (torch.randn(1, 6, 2, 8, device=device) for _ in range(3))
    out, lse = fa3.flash_attn_func(q, k, v, softmax_scale=0.7, causal=True, return_attn_probs=True)
    _check_against_float64(out, lse, (q, k, v), None, causal=True, scale=0.7)


@pytest.mark.parametrize("packing", ["3", "heads"])
def test_qkvpacked_matches_float64_and_gradients_reach_qkv(device, packing):
    h, h_kv = (2, 2) if packing == "3" else (4, 1)
    qkv = torch.randn(2, 7, 3, 2, 16, device=device) if packing == "3" else torch.randn(2, 7, h + 2 * h_kv, 16,
                                                                                        device=device)
    qkv.requires_grad_()
    extra = {} if packing == "3" else dict(num_heads_q=h)
    out, lse = fa3.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(3, 0), return_attn_probs=True, **extra)
    grad_out = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)
    assert out.shape == (2, 7, h, 16) and dqkv.shape == qkv.shape
    views = qkv.unbind(2) if packing == "3" else qkv.split([h, h_kv, h_kv], dim=2)
    grads = dqkv.unbind(2) if packing == "3" else dqkv.split([h, h_kv, h_kv], dim=2)
    _check_against_float64(out, lse, views, grad_out.cpu(), grads, causal=True, window_size=(3, 0))


# ---------------------------------------------------------------------------------------------------- varlen


def _cu(lengths, device):
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("variants", [dict(causal=True), dict(window_size=(2, 1), softcap=2.0)])
def test_varlen_matches_float64_per_sequence(device, variants):
    lens_q, lens_k = [3, 0, 7, 1, 6], [5, 2, 7, 0, 3]  # odd lengths, an empty q and an empty k, Sq <> Sk
    h, h_kv, d = 4, 2, 8
    q = torch.randn(sum(lens_q), h, d, device=device, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), h_kv, d, device=device, requires_grad=True) for _ in range(2))
    out, lse = fa3.flash_attn_varlen_func(q, k, v, _cu(lens_q, device), _cu(lens_k, device), max(lens_q),
                                          max(lens_k), return_attn_probs=True, **variants)
    assert out.shape == q.shape and lse.shape == (h, sum(lens_q)) and lse.dtype == FP32
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    starts_q, starts_k = _cu(lens_q, "cpu").tolist(), _cu(lens_k, "cpu").tolist()
    for b in range(len(lens_q)):
        rows, keys = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if lens_q[b] == 0:
            continue
        if lens_k[b] == 0:  # no key at all: zeros, lse +inf, no gradient
            assert torch.all(out[rows] == 0) and torch.all(lse[:, rows] == float("inf"))
            assert torch.all(grads[0][rows] == 0)
            continue
        # sequence b's gradients are those of its rows' output alone: no other sequence reads its q, k, v
        seq_grads = tuple(g[None, s] for g, s in zip(grads, (rows, keys, keys)))
        _check_against_float64(out[None, rows], lse[None, :, rows], (q[None, rows], k[None, keys], v[None, keys]),
                               grad_out[None, rows].cpu(), seq_grads, **variants)


# --------------------------------------------------------------------------------------------------- kvcache


def test_kvcache_with_page_table_and_cache_seqlens(device):
    cached, n_new, n_q, h, h_kv, d, page = [4, 9], 2, 2, 4, 2, 8, 3
    totals = [n + n_new for n in cached]
    keys, values = (torch.randn(sum(totals), h_kv, d) for _ in range(2))  # each row's keys after the append
    k_pages, v_pages, table = paged_cache((keys, values), totals, page, num_blocks=9)
    starts = _cu(totals, "cpu").tolist()
    k_new = torch.stack([keys[starts[b] + cached[b]:starts[b + 1]] for b in range(2)])
    v_new = torch.stack([values[starts[b] + cached[b]:starts[b + 1]] for b in range(2)])
    q = torch.randn(2, n_q, h, d)
    k_cache, v_cache = k_pages.to(device), v_pages.to(device)
    out, lse, out_accum, lse_accum = fa3.flash_attn_with_kvcache(
        q.to(device), k_cache, v_cache, k_new.to(device), v_new.to(device), page_table=table.to(device),
        cache_seqlens=torch.tensor(cached, dtype=torch.int32, device=device), causal=True, return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (2, h, n_q)
    assert out_accum.numel() == lse_accum.numel() == 0 and out_accum.dtype == lse_accum.dtype == FP32
    for b in range(2):
        used = torch.cat([k_cache[table[b, j // page], j % page][None] for j in range(totals[b])]).cpu()
        assert torch.equal(used, keys[starts[b]:starts[b + 1]])  # the new keys went into the pages
        row = (q[b:b + 1], keys[None, starts[b]:starts[b + 1]], values[None, starts[b]:starts[b + 1]])
        _check_against_float64(out[b:b + 1], lse[b:b + 1], row, None, causal=True)
    # num_splits <= 0: the heuristic, as flash-attn 3's; max_seqlen_q without cu_seqlens_q (Hugging Face's paged
    # calls pass it) is ignored, as there
    alone = fa3.flash_attn_with_kvcache(q.to(device), k_cache, v_cache, page_table=table.to(device),
                                        cache_seqlens=torch.tensor(totals, dtype=torch.int32, device=device),
                                        max_seqlen_q=n_q, causal=True, num_splits=-1, pack_gqa=False, sm_margin=1)
    torch.testing.assert_close(alone, out, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ knobs and errors


def test_performance_knobs_are_accepted_and_change_nothing(device):
    q, k, v = (torch.randn(1, 5, 2, 8, device=device) for _ in range(3))
    plain = fa3.flash_attn_func(q, k, v, causal=True)
    knobs = dict(num_splits=np.int64(4), pack_gqa=True, deterministic=True, sm_margin=torch.tensor(2))
    assert torch.equal(fa3.flash_attn_func(q, k, v, causal=True, **knobs), plain)


def _forbid_launches(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel launched before the bad argument was rejected")

    monkeypatch.setattr(configs, "launch", forbidden)
    monkeypatch.setattr(decode, "_launch", forbidden)


DENSE = (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
PACKED = (torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8), _cu([2, 4], "cpu"), _cu([2, 4], "cpu"),
          4, 4)
CACHE = (torch.randn(1, 1, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8))  # q, k_cache, v_cache
NEW = dict(k=torch.randn(1, 1, 2, 8), v=torch.randn(1, 1, 2, 8), cache_seqlens=3)
SCALE = torch.ones(1, 2)
BAD = [  # (call, error, message)
    (lambda: fa3.flash_attn_func(*DENSE, qv=DENSE[2]), NotImplementedError, "qv: the query-value product"),
    (lambda: fa3.flash_attn_func(*DENSE, q_descale=SCALE), NotImplementedError, "q_descale: fp8"),
    (lambda: fa3.flash_attn_func(*(t.to(torch.float8_e4m3fn) for t in DENSE)), TypeError, "q must have dtype"),
    (lambda: fa3.flash_attn_func(*DENSE[:2], torch.randn(1, 4, 2, 6)), ValueError, "k and v must have the same"),
    (lambda: fa3.flash_attn_func(*DENSE, num_splits="1"), TypeError, "num_splits must be an int"),
    (lambda: fa3.flash_attn_func(*DENSE, num_splits=True), TypeError, "num_splits must be an int"),
    (lambda: fa3.flash_attn_func(*DENSE, pack_gqa=1), TypeError, "pack_gqa must be a bool"),
    (lambda: fa3.flash_attn_func(*DENSE, sm_margin=-1), ValueError, "sm_margin must be an int >= 0"),
    (lambda: fa3.flash_attn_func(*DENSE, sm_margin=0.5), TypeError, "sm_margin must be an int"),
    (lambda: fa3.flash_attn_func(*DENSE, deterministic=1), TypeError, "deterministic must be a bool"),
    (lambda: fa3.flash_attn_func(*DENSE, return_attn_probs="no"), TypeError, "return_attn_probs must be a bool"),
    (lambda: fa3.flash_attn_func(*DENSE, attention_chunk=-4), ValueError, "attention_chunk must be >= 0"),
    (lambda: fa3.flash_attn_qkvpacked_func(torch.randn(1, 4, 6, 8)), ValueError, "num_heads_q is required"),
    (lambda: fa3.flash_attn_qkvpacked_func(torch.randn(1, 4, 6, 8), num_heads_q=3), ValueError, "num_heads_q: qkv"),
    (lambda: fa3.flash_attn_qkvpacked_func(torch.randn(4, 6, 8)), ValueError, r"qkv must be \(batch_size"),
    (lambda: fa3.flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 2, 8), k_descale=SCALE), NotImplementedError,
     "k_descale"),
    (lambda: fa3.flash_attn_varlen_func(*PACKED, seqused_k=torch.ones(2, dtype=torch.int32)), NotImplementedError,
     "seqused_k"),
    (lambda: fa3.flash_attn_varlen_func(*PACKED, seqused_q=torch.ones(2, dtype=torch.int32)), NotImplementedError,
     "seqused_q"),
    (lambda: fa3.flash_attn_varlen_func(*PACKED, attention_chunk=2), NotImplementedError, "attention_chunk"),
    (lambda: fa3.flash_attn_varlen_func(*PACKED, attention_chunk="2"), TypeError, "attention_chunk must be an int"),
    (lambda: fa3.flash_attn_varlen_func(*PACKED, pack_gqa="yes"), TypeError, "pack_gqa must be a bool"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, cu_seqlens_q=PACKED[3]), NotImplementedError, "cu_seqlens_q"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, cu_seqlens_k_new=PACKED[3]), NotImplementedError,
     "cu_seqlens_k_new"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, max_seqlen_q=1.5), TypeError, "max_seqlen_q must be an int"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, rotary_seqlens=PACKED[3]), NotImplementedError,
     "rotary_seqlens"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, qv=CACHE[0]), NotImplementedError, "qv"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, v_descale=SCALE), NotImplementedError, "v_descale"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, attention_chunk=2), NotImplementedError, "attention_chunk"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, scheduler_metadata="plan"), TypeError, "scheduler_metadata"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, num_splits=2.0), TypeError, "num_splits must be an int"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, return_softmax_lse="yes"), TypeError, "return_softmax_lse"),
    (lambda: fa3.flash_attn_with_kvcache(*CACHE, **NEW, page_table=torch.zeros(1, 2, dtype=torch.int64)), TypeError,
     "page_table must have dtype"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments_raise_naming_them_before_any_launch(monkeypatch, call, error, message):
    _forbid_launches(monkeypatch)
    before = CACHE[1].clone()
    with pytest.raises(error, match=message):
        call()
    assert torch.equal(CACHE[1], before)


def test_bad_page_ids_raise_naming_page_table_before_the_cache_is_written(device):
    if device.type == "cuda":
        pytest.skip("index values are checked by a device assert on a GPU (a ValueError on CPU)")
    k_cache, v_cache = torch.randn(4, 3, 2, 8), torch.randn(4, 3, 2, 8)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="page_table"):
        fa3.flash_attn_with_kvcache(CACHE[0], k_cache, v_cache, **NEW,
                                    page_table=torch.tensor([[0, 9]], dtype=torch.int32))
    assert torch.equal(k_cache, before)


def test_compiled_fullgraph_matches_eager(device):
    q, k, v = (torch.randn(1, 6, 2, 8, device=device, requires_grad=True) for _ in range(3))

    def loss(q, k, v):
        out, lse = fa3.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), softcap=2.0, num_splits=2,
                                       return_attn_probs=True)
        return out, lse

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (out, lse), (want, want_lse) = compiled(q, k, v), loss(q, k, v)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), grad_out),
                               torch.autograd.grad(want, (q, k, v), grad_out), rtol=0, atol=0)
