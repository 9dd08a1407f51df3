"""kernels.flash_attn_interface (flash-attn 3's API) and kernels.flash_attn (2.x's) as code ported from flash-attn
uses them: Hugging Face's ``attn_implementation="flash_attention_3"`` path with ``flash_attn_interface`` pointed at
this package (the README's recipe), flash-attn's window normalisation, a differentiable softmax_lse, empty batches
through the kvcache 4-tuple, S_dmask against the output it came with, and compiled varlen/kvcache calls. Outputs are
compared with float64 math (kernels.reference) on tiny shapes.
"""
import sys

import pytest
import torch

from kernels import flash_attn as fa2, flash_attn_interface as fa3, reference

FP64 = torch.float64


def _reference(q, k, v, **variants):
    """float64 out (B, Sq, H, D) of q (B, Sq, H, D), k, v (B, Sk, Hkv, D)."""
    out = reference.attention(*(t.detach().to(FP64).transpose(1, 2) for t in (q, k, v)), **variants)
    return out.transpose(1, 2)


@pytest.fixture
def hf_flash_attention_3(monkeypatch):
    """transformers' ``_flash_attention_forward`` with ``flash_attn_interface`` = this package (README), its module
    globals (the loaded implementation) restored afterwards."""
    utils = pytest.importorskip("transformers.modeling_flash_attention_utils")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        monkeypatch.setattr(utils, name, getattr(utils, name))
    return lambda *args, **kwargs: utils._flash_attention_forward(*args, attn_implementation="flash_attention_3",
                                                                   **kwargs)


def test_hugging_face_flash_attention_3_runs_padded_and_packed_batches(device, hf_flash_attention_3):
    b, s, h, h_kv, d = 2, 6, 4, 2, 8
    q = torch.randn(b, s, h, d, device=device)
    k, v = (torch.randn(b, s, h_kv, d, device=device) for _ in range(2))
    mask = torch.ones(b, s, dtype=torch.long, device=device)
    mask[0, :2] = 0  # left padding: transformers unpads and calls flash_attn_varlen_func
    out = hf_flash_attention_3(q, k, v, mask, s, True, sliding_window=3, softcap=5.0)
    want = _reference(q, k, v, causal=True, window_size=(2, 2), softcap=5.0, mask=mask.bool()[:, None, None, :])
    real = mask.bool().cpu()
    torch.testing.assert_close(out.cpu()[real].double(), want.cpu()[real], rtol=0, atol=1e-5)
    # restarting position ids: two packed sequences of 3 through the varlen function
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    out = hf_flash_attention_3(q[:1], k[:1], v[:1], None, s, True, position_ids=positions)
    for rows in (slice(0, 3), slice(3, 6)):
        want = _reference(q[:1, rows], k[:1, rows], v[:1, rows], causal=True)
        torch.testing.assert_close(out[:1, rows].cpu().double(), want.cpu(), rtol=0, atol=1e-5)


def test_hugging_face_flash_attention_3_paged_decode_appends_to_the_pages(device, hf_flash_attention_3):
    """transformers' paged call: flash_attn_with_kvcache(q, k_cache, v_cache, k, v, page_table=, cache_seqlens=,
    max_seqlen_q=, ...) for one new token per sequence."""
    h, h_kv, d, page = 2, 1, 8, 3
    lengths = [4, 2]  # keys per sequence after the append
    k_cache, v_cache = (torch.randn(5, page, h_kv, d, device=device) for _ in range(2))
    table = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 4, 6], dtype=torch.int32, device=device)
    q = torch.randn(2, 1, h, d, device=device)
    k_new, v_new = (torch.randn(2, 1, h_kv, d, device=device) for _ in range(2))
    out = hf_flash_attention_3(q, k_new, v_new, None, 1, True, block_table=table, cu_seq_lens_k=cu_k,
                               k_cache=k_cache, v_cache=v_cache, max_length_q=1, max_length_k=4)
    for i, n in enumerate(lengths):
        slots = [(int(table[i, j // page]), j % page) for j in range(n)]
        keys, values = (torch.stack([c[p, o] for p, o in slots])[None] for c in (k_cache, v_cache))
        assert torch.equal(keys[0, -1], k_new[i, 0]) and torch.equal(values[0, -1], v_new[i, 0])
        want = _reference(q[i:i + 1], keys, values, causal=True)
        torch.testing.assert_close(out[i:i + 1].cpu().double(), want.cpu(), rtol=0, atol=1e-5)


def test_window_is_normalised_as_flash_attns(device):
    """causal zeroes the right window, (-1, 0) is causal, and a window wider than the keys is no window."""
    q = torch.randn(1, 5, 2, 8, device=device)
    k, v = (torch.randn(1, 9, 2, 8, device=device) for _ in range(2))
    for f in (fa2.flash_attn_func, fa3.flash_attn_func):
        assert torch.equal(f(q, k, v, causal=True, window_size=(2, 3)), f(q, k, v, causal=True, window_size=(2, 0)))
        assert torch.equal(f(q, k, v, window_size=(-1, 0)), f(q, k, v, causal=True))
        torch.testing.assert_close(f(q, k, v, window_size=(100, 100)), f(q, k, v), rtol=0, atol=1e-6)
    k_cache, v_cache = (torch.randn(1, 10, 2, 8, device=device) for _ in range(2))
    wide, zero = (fa3.flash_attn_with_kvcache(q[:, :3], k_cache, v_cache, cache_seqlens=7, causal=True,
                                              window_size=(2, right)) for right in (5, 0))
    assert torch.equal(wide, zero)
    want = _reference(q[:, :3], k_cache[:, :7], v_cache[:, :7], causal=True, window_size=(2, 0))
    torch.testing.assert_close(wide.cpu().double(), want.cpu(), rtol=0, atol=1e-5)


def test_softmax_lse_is_differentiable(device):
    """A loss on softmax_lse gets its gradient (flash-attn 3's autograd drops it): dense and varlen."""
    q, k, v = (torch.randn(1, 5, 2, 8, device=device, requires_grad=True) for _ in range(3))
    _, lse = fa3.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    grad_lse = torch.randn_like(lse)
    got = torch.autograd.grad(lse, (q, k), grad_lse)
    leaves = [t.detach().cpu().to(FP64).requires_grad_() for t in (q, k, v)]
    _, want_lse = reference.attention(*(t.transpose(1, 2) for t in leaves), causal=True, return_lse=True)
    want = torch.autograd.grad(want_lse, leaves[:2], grad_lse.cpu().double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w, rtol=0, atol=1e-5)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    packed = q[0].detach().requires_grad_()
    _, lse = fa3.flash_attn_varlen_func(packed, k[0], v[0], cu, cu, 3, 3, causal=True, return_attn_probs=True)
    (grad,) = torch.autograd.grad(lse[:, 2:].sum(), packed)
    assert torch.all(grad[:2] == 0)  # the first sequence's rows do not reach the second's lse
    leaf = packed.detach().cpu().to(FP64)[None, 2:].requires_grad_()
    _, want_lse = reference.attention(leaf.transpose(1, 2), k[None, 0, 2:].detach().cpu().to(FP64).transpose(1, 2),
                                      v[None, 0, 2:].detach().cpu().to(FP64).transpose(1, 2), causal=True,
                                      return_lse=True)
    (want,) = torch.autograd.grad(want_lse.sum(), leaf)
    torch.testing.assert_close(grad[2:].cpu().double(), want[0], rtol=0, atol=1e-5)


def test_kvcache_returns_the_4_tuple_for_empty_batches_and_rows(device):
    k_cache, v_cache = (torch.randn(2, 8, 2, 8, device=device) for _ in range(2))
    for q in (torch.randn(2, 0, 2, 8, device=device), torch.randn(0, 1, 2, 8, device=device)):
        out, lse, out_accum, lse_accum = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3,
                                                                     return_softmax_lse=True)
        assert out.shape == q.shape and lse.shape == (q.shape[0], 2, q.shape[1])
        assert out_accum.numel() == lse_accum.numel() == 0
    out, lse, _, _ = fa3.flash_attn_with_kvcache(torch.randn(2, 3, 2, 8, device=device), k_cache, v_cache,
                                                 cache_seqlens=0, return_softmax_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("inf"))  # no key: zeros, flash-attn's +inf


def test_varlen_s_dmask_reproduces_the_output(device):
    """flash-attn 2.x's S_dmask (negative where dropped) times v, rescaled by 1 / (1 - p), is the output it came
    with: per-sequence (B, H) ALiBi, a window, softcap and causal, GQA, Sq <> Sk."""
    p, lens_q, lens_k = 0.3, [3, 5], [4, 6]
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    q = torch.randn(8, 4, 8, device=device)
    k, v = (torch.randn(10, 2, 8, device=device) for _ in range(2))
    out, _, s_dmask = fa2.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, dropout_p=p, causal=True,
                                                 window_size=(3, -1), softcap=4.0,
                                                 alibi_slopes=torch.rand(2, 4, device=device),
                                                 return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 5, 6)
    for b in range(2):
        probs = s_dmask[b, :, :lens_q[b], :lens_k[b]].double().clamp(min=0) / (1 - p)
        values = v[cu_k[b]:cu_k[b + 1]].double().repeat_interleave(2, dim=1).transpose(0, 1)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]].double(), (probs @ values).transpose(0, 1), rtol=0,
                                   atol=1e-5)
        assert torch.all(s_dmask[b, :, lens_q[b]:] == 0) and torch.all(s_dmask[b, :, :, lens_k[b]:] == 0)


def test_compiled_varlen_and_kvcache_match_eager(device):
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    q = torch.randn(5, 2, 8, device=device, requires_grad=True)
    k, v = (torch.randn(5, 1, 8, device=device, requires_grad=True) for _ in range(2))

    def varlen(q, k, v, cu):
        return fa3.flash_attn_varlen_func(q, k, v, cu, cu, 3, 3, causal=True, return_attn_probs=True)

    got, want = torch.compile(varlen, fullgraph=True, backend="aot_eager")(q, k, v, cu), varlen(q, k, v, cu)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    grad = torch.randn_like(want[0])
    torch.testing.assert_close(torch.autograd.grad(got[0], (q, k, v), grad),
                               torch.autograd.grad(want[0], (q, k, v), grad), rtol=0, atol=0)

    def decode(q, k_cache, v_cache, k, v, seqlens):
        return fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                           return_softmax_lse=True)

    caches = [torch.randn(2, 8, 1, 8, device=device) for _ in range(2)]
    q, k_new, v_new = torch.randn(2, 1, 2, 8, device=device), *(torch.randn(2, 1, 1, 8, device=device)
                                                                  for _ in range(2))
    seqlens = torch.tensor([2, 5], dtype=torch.int32, device=device)
    compiled_caches, eager_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    got = torch.compile(decode, fullgraph=True, backend="aot_eager")(q, *compiled_caches, k_new, v_new, seqlens)
    want = decode(q, *eager_caches, k_new, v_new, seqlens)
    assert len(got) == 4 and all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(c, e) for c, e in zip(compiled_caches, eager_caches))  # the append happened once
