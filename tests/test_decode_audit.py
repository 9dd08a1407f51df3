"""An audit of decoding against a KV cache (kernels.attention_with_kvcache, kernels.flash_attn.flash_attn_with_kvcache)
for the cases flash-attn users hit that tests/test_decode.py does not spell out."""
import pytest
import torch

import kernels
from kernels.flash_attn import flash_attn_with_kvcache
from test_decode import FP16, FP32, _check, _inputs, _int32, _rotary


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
