"""Chunked local attention (flash-attn 3's ``attention_chunk``, Llama 4's chunked attention) against float64 math.

The truth is written out here from flash-attn 3's rule (hopper/mask.h, and its tests' ``construct_chunk_mask``):
with chunk C, query i at the bottom-right aligned position p = i + Nk - Nq sees key j only if
floor(j / C) == floor(p / C), ANDed with causal (j <= p), the window (p - left <= j <= p + right) and the key
padding mask. Forward errors may be 2x, gradient errors 3x what PyTorch itself makes in the same precision
(tests/tolerance.py).
"""
import pytest
import torch

import kernels
from benchmarks.counting import counting
from kernels import flash_attn, reference
from kernels.attention import configs, plan
from kernels.registry import use_config
from tolerance import BACKWARD, FORWARD, assert_close

FP16, FP32 = torch.float16, torch.float32
_REFERENCE = reference.attention  # captured at import: attention_kernel_only replaces reference.attention


def _visible(n_q, n_k, chunk, causal=False, window=(-1, -1), padding=None):
    """(B or 1, 1, Nq, Nk) bool: query i may see key j, flash-attn 3's rule written out."""
    position = torch.arange(n_q)[:, None] + (n_k - n_q)
    key = torch.arange(n_k)[None, :]
    visible = torch.div(key, chunk, rounding_mode="floor") == torch.div(position, chunk, rounding_mode="floor")
    left, right = window[0], 0 if causal else window[1]
    if left >= 0:
        visible &= key >= position - left
    if right >= 0:
        visible &= key <= position + right
    visible = visible[None, None]
    return visible if padding is None else visible & padding.cpu()[:, None, None, :]


def _check(device, dtype, b, h, h_kv, n_q, n_k, d, chunk, causal=False, window=(-1, -1), padding=None):
    """Kernel out, lse and dq, dk, dv against float64 reference attention under the explicit mask, with the same
    computation in ``dtype`` as the noise. Rows that see no key must be zeros with lse -inf. lse joins the loss
    when every row has a finite one (its gradient path is then tested too)."""
    q, k, v = (torch.randn(b, heads, n, d, dtype=dtype, device=device, requires_grad=True)
               for heads, n in ((h, n_q), (h_kv, n_k), (h_kv, n_k)))
    grad_out = torch.randn(b, h, n_q, d, dtype=dtype, device=device)
    grad_lse = torch.randn(b, h, n_q, dtype=FP32, device=device)
    out, lse = kernels.attention(q, k, v, causal=causal, return_lse=True, key_padding_mask=padding,
                                 window_size=window, attention_chunk=chunk)
    mask = _visible(n_q, n_k, chunk, causal, window, padding).to(device)
    empty = ~mask.any(-1).expand(b, h, n_q)

    def loss(o, l_):
        return (o * grad_out.to(o.dtype)).sum() + (0 if empty.any() else (l_ * grad_lse.to(l_.dtype)).sum())

    results = []
    for ref_dtype in (dtype, torch.float64):
        leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = _REFERENCE(*leaves, return_lse=True, mask=mask)
        results.append((ref_out, ref_lse, torch.autograd.grad(loss(ref_out, ref_lse), leaves)))
    (low_out, low_lse, low_grads), (exact_out, exact_lse, exact_grads) = results
    assert_close(out, exact_out, low_out, FORWARD)
    assert torch.equal(torch.isneginf(lse), empty)
    assert not torch.isnan(out).any() and (out[empty] == 0).all()
    assert_close(lse[~empty], exact_lse[~empty], low_lse.float()[~empty], FORWARD, name="lse")
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    for name, grad, exact, low in zip(("dq", "dk", "dv"), grads, exact_grads, low_grads):
        assert_close(grad, exact, low, BACKWARD, name=name)
    return empty


CASES = [  # (dtype, B, H, Hkv, Nq, Nk, D, chunk, causal, window): odd lengths and head dims, GQA, Nq != Nk
    (FP16, 1, 2, 1, 37, 53, 40, 16, True, (-1, -1)),
    (FP32, 1, 2, 2, 37, 53, 72, 17, False, (-1, -1)),
    # one key per row: in fp32 dq's p * (dp - delta) cancels to ~eps * |dO . v| against torch's exact 0 (the
    # backward's delta is a separate sum), a hair over the rule's bound whatever the mask; fp16 bounds it
    (FP16, 1, 1, 1, 37, 53, 40, 1, False, (-1, -1)),
    (FP16, 1, 2, 1, 37, 53, 40, 100, False, (-1, -1)),  # one chunk holds every key: the switch is dropped
    (FP32, 1, 2, 1, 53, 37, 40, 64, False, (-1, -1)),  # larger than N, but the first 16 rows sit before key 0
    (FP16, 1, 2, 1, 37, 53, 72, 16, True, (5, -1)),
    (FP32, 1, 4, 2, 53, 37, 40, 17, False, (3, 2)),
]


@pytest.mark.parametrize("dtype,b,h,h_kv,n_q,n_k,d,chunk,causal,window", CASES)
def test_chunk_matches_float64(attention_kernel_only, device, dtype, b, h, h_kv, n_q, n_k, d, chunk, causal, window):
    _check(device, dtype, b, h, h_kv, n_q, n_k, d, chunk, causal, window)


def test_chunk_with_a_key_padding_mask_and_rows_that_see_nothing(attention_kernel_only, device):
    """Batch row 0 hides keys 16..31, all of the chunk that 16 of its rows sit in: those rows are zeros (lse
    -inf), as are the rows before key 0 (Nq > Nk); row 1 has a hole and right padding."""
    padding = torch.ones(2, 45, dtype=torch.bool, device=device)
    padding[0, 16:32] = False
    padding[1, 20] = False
    padding[1, 40:] = False
    empty = _check(device, FP32, 2, 2, 1, 50, 45, 40, 16, causal=True, window=(20, -1), padding=padding)
    assert empty[0, :, :5].all() and empty[0, :, 21:37].all() and empty.sum() == 2 * 2 * 5 + 2 * 16


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=16)])
def test_chunk_with_other_tiles(attention_kernel_only, device, config):
    """Tiles wider and narrower than the chunk: the block ranges of every kernel, both chunk edges."""
    with use_config("attention_fwd", **config), use_config("attention_dkdv", **config), \
            use_config("attention_dq", **config):
        _check(device, FP32, 1, 2, 1, 70, 90, 16, 24, causal=False, window=(-1, -1))


def test_a_chunk_that_hides_nothing_compiles_away(device):
    """Nq <= Nk and a chunk of Nk keys or more: no CHUNKED specialisation, and the call is the plain one."""
    q, k = torch.randn(1, 1, 5, 8, device=device), torch.randn(1, 1, 9, 8, device=device)
    for chunk, chunked in ((9, False), (1000, False), (8, True)):
        variant = plan.AttentionVariant(causal_shift=4, attention_chunk=chunk)
        meta = plan._plan_of(q.shape, k.shape, q.dtype, plan.NO_TENSORS, variant, backward=False).meta
        assert meta["CHUNKED"] is chunked
    assert torch.equal(kernels.attention(q, k, k, attention_chunk=9), kernels.attention(q, k, k))


def test_chunk_reads_grow_with_n_times_chunk_not_n_squared(device):
    """Counted dot FLOPs (each a block visited) of forward + backward with a chunk of 24 keys: doubling N doubles
    them, so the forward, dQ and dK/dV all skip the blocks outside the chunks; without it they quadruple."""
    if not kernels.INTERPRETED:
        pytest.skip("counting needs the interpreter")

    def flops(n, **variants):
        q, k, v = (torch.randn(1, 1, n, 16, device=device, requires_grad=True) for _ in range(3))
        with counting() as counts:
            out = kernels.attention(q, k, v, **variants)
            out.backward(torch.ones_like(out))
        return counts.flops

    chunked = flops(256, attention_chunk=24) / flops(128, attention_chunk=24)
    full = flops(256) / flops(128)
    assert chunked < 2.3 and full > 3.9, (chunked, full)


def test_compiles_with_fullgraph(attention_kernel_only, device):
    """torch.compile(fullgraph=True): attention_chunk reaches the custom ops (their signatures are generated from
    AttentionVariant's fields)."""
    q, k, v = (torch.randn(1, 2, 20, 16, device=device, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return kernels.attention(q, k, v, causal=True, attention_chunk=6)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    eager = f(q, k, v)
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, torch.autograd.grad(eager.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


def test_flash_attn_functions_take_attention_chunk(attention_kernel_only, device):
    """flash-attn 3's keyword on the dense functions, (B, S, H, D) layouts: the same result as kernels.attention,
    gradients into the packed tensors."""
    qkv = torch.randn(2, 37, 3, 2, 40, dtype=FP16, device=device, requires_grad=True)
    q, k, v = qkv.unbind(2)
    expected = kernels.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True,
                                 attention_chunk=16).transpose(1, 2)
    for out in (flash_attn.flash_attn_func(q, k, v, causal=True, attention_chunk=16),
                flash_attn.flash_attn_qkvpacked_func(qkv, causal=True, attention_chunk=16),
                flash_attn.flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=True, attention_chunk=torch.tensor(16))):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad, = torch.autograd.grad(flash_attn.flash_attn_qkvpacked_func(qkv, attention_chunk=16).sum(), qkv)
    assert grad.shape == qkv.shape and torch.isfinite(grad).all()


def test_flash_attn_s_dmask_is_zero_outside_the_chunks(device):
    """return_attn_probs with dropout: S_dmask holds the chunked probabilities (zero where a chunk hides)."""
    q, k, v = (torch.randn(1, n, 2, 8, device=device) for n in (9, 12, 12))
    _, _, s_dmask = flash_attn.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True, attention_chunk=4)
    visible = _visible(9, 12, 4).expand(1, 2, 9, 12)
    assert torch.equal(s_dmask.cpu() != 0, visible)


@pytest.mark.parametrize("chunk,error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("16", TypeError),
                                         (None, TypeError)])
def test_bad_attention_chunk_raises_before_launch(attention_kernel_only, monkeypatch, device, chunk, error):
    monkeypatch.setattr(configs, "launch", None)  # a launch would fail otherwise
    q = torch.randn(1, 2, 5, 8, device=device)
    with pytest.raises(error, match="attention_chunk"):
        kernels.attention(q, q, q, attention_chunk=chunk)
    with pytest.raises(error, match="attention_chunk"):
        flash_attn.flash_attn_func(q, q, q, attention_chunk=chunk)


def test_attention_chunk_is_keyword_only_where_flash_attn_2_has_positions(device):
    q = torch.randn(1, 5, 2, 8, device=device)
    with pytest.raises(TypeError, match=r"takes from 3 to 11 positional arguments but 12 were given"):
        flash_attn.flash_attn_func(q, q, q, 0.0, None, False, (-1, -1), 0.0, None, False, False, 4)
