"""An audit of decoding against a KV cache (kernels.attention_with_kvcache, kernels.flash_attn.flash_attn_with_kvcache)
for the cases flash-attn users hit that tests/test_decode.py does not spell out."""
import pytest
import torch

import kernels
from kernels.flash_attn import flash_attn_with_kvcache
from test_decode import FP16, FP32, _check, _expected, _inputs, _int32, _rotary
from tolerance import FORWARD, assert_close


@pytest.mark.parametrize("function", [kernels.attention_with_kvcache, flash_attn_with_kvcache])
def test_query_rotated_past_the_rotary_table_raises(function):
    """Queries that are neither causal nor windowed are all rotated at cache_seqlens, which is S_ro itself when a
    full cache (capacity == S_ro) appends no key: that position has no row in rotary_cos, so the call raises
    ValueError naming rotary_cos and cache_seqlens before the cache is written (it used to leave q unrotated)."""
    q, k_cache, v_cache, k, v = _inputs(FP16, "cpu", 2, 2, 4, 2, 16, 2, 8, 0)
    k, v = (torch.zeros(2, 0, 2, 16, dtype=FP16) for _ in "kv")  # Sk_new = 0: q is rotated, nothing appended
    cos, sin = _rotary(FP16, "cpu", 8, 8)
    caches = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError, match=r"rotary_cos/rotary_sin need a row .*cache_seqlens \+ 1 <= S_ro = 8"):
        function(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=_int32([3, 8], "cpu"))
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])


def test_query_rotated_at_the_last_rotary_row_runs(device):
    """The same call with one more row in rotary_cos (S_ro = capacity + 1) rotates q at position 8 and matches
    float64; and a causal one, whose Sq = 2 queries sit at 8 and 9, needs S_ro >= 10."""
    q, k_cache, v_cache, _, _ = _inputs(FP32, device, 2, 2, 4, 2, 16, 2, 8, 0)
    k, v = (torch.zeros(2, 0, 2, 16, dtype=FP32, device=device) for _ in "kv")
    cos, sin = _rotary(FP32, device, 9, 8)
    seqlens = _int32([3, 8], device)
    _check(FP32, q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens)
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"cache_seqlens \+ 2 <= S_ro = 9"):
            kernels.attention_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                           cache_seqlens=seqlens, causal=True)


def test_views_of_bigger_tensors(device):
    """A packed qkv projection (q, k, v views of one (B, Sq, 3, H, D) tensor, v from its last kv heads), caches that
    are every other batch row of bigger ones (one layer's slice) and rotary tables sliced from a wider one: any
    strides. flash_attn_with_kvcache appends into the views (the rows between them untouched, cache_seqlens not
    updated, as flash-attn) and its out and lse match float64."""
    qkv = torch.randn(2, 3, 3, 4, 32, device=device).to(FP16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1, :2], qkv[:, :, 2, 2:]
    big_k, big_v = (torch.randn(4, 24, 2, 32, device=device).to(FP16) for _ in "kv")
    k_cache, v_cache = big_k[::2], big_v[1::2]
    angles = torch.rand(30, 16, dtype=torch.float64, device=device) * 6
    cos, sin = angles.cos()[:, :8].to(FP16), angles.sin()[:, 8:].to(FP16)
    seqlens = _int32([4, 21], device)
    before = [t.cpu().clone() for t in (q, k_cache, v_cache, k, v, big_k, big_v)]
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, seqlens, causal=True,
                                       rotary_interleaved=False, return_softmax_lse=True)
    args = dict(cos=cos.cpu(), sin=sin.cpu(), interleaved=False, seqlens=seqlens.cpu(), causal=True)
    exact_out, exact_lse, exact_cache = _expected(torch.float64, *before[:5], **args)
    low_out, low_lse, low_cache = _expected(FP16, *before[:5], **args)
    assert_close(out.cpu(), exact_out, low_out, FORWARD)
    assert_close(lse.cpu(), exact_lse, low_lse.float(), FORWARD, name="lse")
    for b in range(2):
        assert_close(k_cache[b].cpu(), exact_cache[b][0], low_cache[b][0], FORWARD, name="k_cache")
        assert torch.equal(v_cache[b].cpu(), exact_cache[b][1].to(FP16))
    assert torch.equal(big_k[1::2].cpu(), before[5][1::2]) and torch.equal(big_v[::2].cpu(), before[6][::2])
    assert torch.equal(seqlens.cpu(), _int32([4, 21], "cpu"))


@pytest.mark.parametrize("with_new", [False, True])
def test_empty_cache(device, with_new):
    """cache_seqlens = 0: without new keys no row sees a key (zeros, flash-attn's lse +inf); with Sq = 2 new causal
    tokens the first sees the first new key only, the second both."""
    q, k_cache, v_cache, k, v = _inputs(FP32, device, 2, 2, 4, 2, 16, 2, 8, 2 if with_new else 0)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=0, causal=True,
                                       return_softmax_lse=True)
    if not with_new:
        assert torch.equal(out, torch.zeros_like(q)) and torch.isposinf(lse).all()
        return
    scale = 16 ** -0.5
    k_heads, v_heads = (t.repeat_interleave(2, 2).double() for t in (k, v))  # (B, 2, H, D)
    first = v_heads[:, 0]
    scores = torch.einsum("bhd,bjhd->bhj", q[:, 1].double(), k_heads) * scale
    second = torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), v_heads)
    torch.testing.assert_close(out.double(), torch.stack([first, second], 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :, 1].double(), scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :, 0].double(), torch.einsum("bhd,bhd->bh", q[:, 0].double(),
                                                                     k_heads[:, 0]) * scale, rtol=1e-5, atol=1e-5)


INT32_MAX = 2**31 - 1


@pytest.mark.parametrize("n_q,window,causal", [(1, (INT32_MAX, INT32_MAX), False), (4, (INT32_MAX, -1), True),
                                               (2, (-1, INT32_MAX), False), (3, (5, INT32_MAX - 2), False)])
def test_windows_as_wide_as_int32(device, n_q, window, causal):
    """A window side of up to int32's largest value (a common spelling of "unbounded") sees every key it should:
    diagonal +- window used to overflow int32 in the kernel, hiding every key of a decode step (zeros out), or
    those of a causal row block where Sq exceeds the keys by 2 or more."""
    q, k_cache, v_cache, k, v = _inputs(FP32, device, 2, n_q, 4, 2, 16, 2, 24, 1)
    _check(FP32, q, k_cache, v_cache, k, v, cache_seqlens=_int32([0, 13], device), causal=causal, window_size=window)
