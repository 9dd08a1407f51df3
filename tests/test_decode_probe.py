"""kernels.attention_with_kvcache (kernels/attention/decode.py): regressions found by probing it as a user of
flash-attn's ``flash_attn_with_kvcache`` would."""
import pytest
import torch

import kernels


def _step(device, cache_rows=2):
    """A decoding step's q (2, 1, 2, 8), new k and v (2, 1, 1, 8) and a (cache_rows, 6, 1, 8) cache row to expand."""
    return (torch.randn(2, 1, 2, 8, device=device), torch.randn(2, 1, 1, 8, device=device),
            torch.randn(2, 1, 1, 8, device=device), torch.randn(cache_rows, 6, 1, 8, device=device))


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
def test_append_refuses_an_expanded_cache(device, which):
    """A cache expanded over its batch rows (stride 0) has one slot per position for all of them: the append wrote
    both rows' new keys into it, and each row attended to whichever landed last (silently wrong; torch's in-place
    ops refuse such a tensor). Reading an expanded cache (no k/v) stays allowed: a prefix shared by every row."""
    q, k, v, row = _step(device, cache_rows=1)
    expanded = row.expand(2, -1, -1, -1)
    caches = {"k_cache": row.repeat(2, 1, 1, 1), "v_cache": row.repeat(2, 1, 1, 1), which: expanded}
    before = row.clone()
    with pytest.raises(ValueError, match=f"{which} is expanded"):
        kernels.attention_with_kvcache(q, caches["k_cache"], caches["v_cache"], k, v, cache_seqlens=3)
    assert torch.equal(row, before), "nothing is written before the check"
    read = kernels.attention_with_kvcache(q, expanded, expanded, cache_seqlens=3)
    torch.testing.assert_close(read, kernels.attention_with_kvcache(q, expanded.clone(), expanded.clone(),
                                                                   cache_seqlens=3), rtol=0, atol=0)


def test_append_refuses_one_tensor_as_both_caches(device):
    """k_cache is v_cache: the new values overwrote the new keys, and q attended to values as keys."""
    q, k, v, cache = _step(device)
    before = cache.clone()
    with pytest.raises(ValueError, match="k_cache and v_cache must be two tensors"):
        kernels.attention_with_kvcache(q, cache, cache, k, v, cache_seqlens=3)
    assert torch.equal(cache, before)
    kernels.attention_with_kvcache(q, cache, cache, cache_seqlens=3)  # reading one tensor as both is fine
