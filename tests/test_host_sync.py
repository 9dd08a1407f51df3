"""No host read of a tensor value on any public op's path, forward or backward (issue: no host sync anywhere)."""
import importlib

import pytest
import torch

import kernels
from benchmarks import overhead
from host_reads import assert_no_host_reads, host_reads

CASES = overhead.cases(torch.device("cpu"))


@pytest.mark.parametrize("name", list(CASES))
def test_public_op_reads_no_tensor_value(name):
    ours = CASES[name][0]
    assert_no_host_reads(overhead._with_backward(ours))


def test_the_detector_sees_a_read():
    from kernels.attention import sdpa

    with host_reads() as seen:
        sdpa._mask_plan(torch.ones(1, 1, 3, 3, dtype=torch.bool), 1, 1, 3, 3, torch.device("cpu"), torch.float32)
    assert len(seen) == 1 and "tolist" in seen[0]


def test_sdpa_reads_a_models_mask_once_not_per_layer():
    """A model hands every layer the same mask: the shim analyses it at the first layer only."""
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    keys = torch.ones(2, 9, dtype=torch.bool)
    keys[0, :3] = False
    mask = keys[:, None, None, :] & torch.ones(9, 9, dtype=torch.bool).tril()
    with host_reads() as seen:
        outs = [kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask) for _layer in range(4)]
    assert len(seen) == 1, seen
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
    for out in outs:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    mask[1, 0, 8, :] = False  # modified in place: a new analysis (and here torch's fallback)
    with host_reads() as seen:
        out = kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(seen) == 1
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_a_padding_mask_is_prepared_once_per_model_forward_not_per_layer(monkeypatch):
    """The key range of a key_padding_mask is computed at the first layer that sees the mask tensor; a mask
    modified in place is prepared again (and gives the new answer)."""
    api = importlib.import_module("kernels.attention.api")
    calls = []
    real = api.key_bounds
    monkeypatch.setattr(api, "key_bounds", lambda mask: calls.append(1) or real(mask))
    q, k, v = (torch.randn(2, 2, 7, 16) for _ in range(3))
    keys = torch.ones(2, 7, dtype=torch.bool)
    keys[0, :2] = False
    outs = [kernels.attention(q, k, v, key_padding_mask=keys) for _layer in range(3)]
    assert len(calls) == 1 and all(torch.equal(out, outs[0]) for out in outs)
    keys[1, 5:] = False  # in place: a new version of the same tensor
    out = kernels.attention(q, k, v, key_padding_mask=keys)
    assert len(calls) == 2
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_index_value_checks_read_only_their_verdict():
    """Decoding with every index tensor (paged with left padding and an append; contiguous with cache_batch_idx
    and rotated causal queries) and paged varlen: the check kernels' verdicts are read through
    ``assert_on_device`` alone, nothing else."""
    int32 = dict(dtype=torch.int32)
    q, k, v = torch.randn(2, 2, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    pages, caches = [torch.randn(9, 8, 2, 16) for _ in "kv"], [torch.randn(3, 24, 2, 16) for _ in "kv"]
    seqlens, leftpad = torch.tensor([3, 20], **int32), torch.tensor([1, 2], **int32)
    table = torch.randperm(8, **int32).view(2, 4)
    cos, sin = torch.randn(24, 4), torch.randn(24, 4)
    packed = torch.randn(12, 2, 16)
    cu = torch.tensor([0, 3, 12], **int32)
    assert_no_host_reads(lambda: kernels.attention_with_kvcache(q, *pages, k, v, cache_seqlens=seqlens,
                                                                cache_leftpad=leftpad, block_table=table))
    assert_no_host_reads(lambda: kernels.attention_with_kvcache(
        q, *caches, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, cache_leftpad=leftpad,
        cache_batch_idx=torch.tensor([2, 0], **int32), causal=True))
    assert_no_host_reads(lambda: kernels.attention_varlen(packed, *pages, cu, cu, 9, 9, block_table=table[:, :2]))
