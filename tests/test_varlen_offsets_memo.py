"""attention_varlen checks its offsets (and block table) once while a model's layers pass the same tensors: the
verdict is memoised on the tensors' identities and versions (``plan.LastTensor``) and the scalars it judges them
against. These run on CPU, where a bad verdict raises ValueError at once (on a GPU it is a device assert)."""
import pytest
import torch

import kernels
from kernels.attention import plan, varlen
from kernels.attention.varlen import attention_varlen
from test_varlen import paged_cache


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def counted_launches(monkeypatch, kernel) -> list:
    """The list of ``kernel``'s launches (by ``.run``) from now on, one entry per launch."""
    launches, run = [], kernel.run

    def counted(*args, **kwargs):
        launches.append(args)
        return run(*args, **kwargs)
    monkeypatch.setattr(kernel, "run", counted)
    return launches


@pytest.fixture
def check_launches(monkeypatch):
    """The list of ``_varlen_check`` launches made while the test runs."""
    return counted_launches(monkeypatch, varlen._varlen_check)


def _packed(lengths, heads=2, d=8):
    return torch.randn(3, sum(lengths), heads, d).unbind(0)


def test_the_same_offsets_are_checked_once(check_launches):
    lens = [3, 5]
    q, k, v = _packed(lens)
    cu_q, cu_k = _cu(lens), _cu(lens)
    first = attention_varlen(q, k, v, cu_q, cu_k, 5, 5, causal=True)
    second = attention_varlen(q, k, v, cu_q, cu_k, 5, 5, causal=True)
    assert len(check_launches) == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_other_offsets_or_scalars_are_checked_again(check_launches):
    lens = [3, 5]
    q, k, v = _packed(lens)
    cu_q, cu_k = _cu(lens), _cu(lens)
    attention_varlen(q, k, v, cu_q, cu_k, 5, 5)
    attention_varlen(q, k, v, cu_q, _cu(lens), 5, 5)  # an equal but new tensor
    attention_varlen(q, k, v, cu_q, cu_k, 6, 5)  # another max_seqlen_q
    assert len(check_launches) == 3


def test_one_offsets_tensor_for_both_is_memoised_apart_from_two(check_launches):
    """Self-attention's one offsets tensor for cu_seqlens_q and cu_seqlens_k is memoised as one tensor: a call with
    two (even with the same first) is another entry, and an in-place change of the one is seen."""
    lens = [3, 5]
    q, k, v = _packed(lens)
    cu, other = _cu(lens), _cu(lens)
    for cu_k in (cu, cu, other, other, cu):
        attention_varlen(q, k, v, cu, cu_k, 5, 5)
    assert len(check_launches) == 3
    cu[1] = 9  # decreasing
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        attention_varlen(q, k, v, cu, cu, 5, 5)


def test_an_in_place_change_of_the_offsets_is_checked_again(check_launches):
    """Every in-place torch op bumps the tensor's _version, so a value written between calls is judged."""
    lens = [3, 5]
    q, k, v = _packed(lens)
    cu_q, cu_k = _cu(lens), _cu(lens)
    attention_varlen(q, k, v, cu_q, cu_k, 5, 5)
    cu_k[1] = 99
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        attention_varlen(q, k, v, cu_q, cu_k, 5, 5)
    cu_k[1] = 3
    attention_varlen(q, k, v, cu_q, cu_k, 5, 5)
    assert len(check_launches) == 3


def test_new_bad_offsets_raise_and_a_failed_check_is_not_memoised(check_launches):
    lens = [3, 5]
    q, k, v = _packed(lens)
    cu = _cu(lens)
    attention_varlen(q, k, v, cu, cu, 5, 5)
    bad = torch.tensor([1, 3, 8], dtype=torch.int32)
    for _ in range(2):  # the same bad tensor raises again: only a passing verdict is kept
        with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
            attention_varlen(q, k, v, bad, cu, 5, 5)
    with pytest.raises(ValueError, match="max_seqlen_q = 4 must be at least the longest sequence"):
        attention_varlen(q, k, v, cu, cu, 4, 5)  # the memoised tensors with a max_seqlen they fail
    assert len(check_launches) == 4


def test_the_offsets_tensors_checks_are_memoised_with_their_values(check_launches, monkeypatch):
    """Their dtype, rank, count and device are checked with their values, once while the same tensors come back
    (no op changes them without bumping ``_version``); a q on another device than the one they were checked
    against is checked again, and fails."""
    lens = [3, 5]
    q, k, v = _packed(lens)
    cu = _cu(lens)
    checks, check = [], varlen._check_offsets_tensors
    monkeypatch.setattr(varlen, "_check_offsets_tensors", lambda *args: checks.append(args) or check(*args))
    for _ in range(3):
        attention_varlen(q, k, v, cu, cu, 5, 5)
    assert len(checks) == len(check_launches) == 1
    with pytest.raises(ValueError, match="q, cu_seqlens_q, cu_seqlens_k must share one device"):
        attention_varlen(*(t.to("meta") for t in (q, k, v)), cu, cu, 5, 5)
    for _ in range(2):  # a failed check is not memoised either
        with pytest.raises(TypeError, match="cu_seqlens_k must have dtype"):
            attention_varlen(q, k, v, cu, cu.long(), 5, 5)
    assert len(checks) == 4 and len(check_launches) == 1


def test_an_in_place_change_of_the_block_table_is_checked_again(check_launches):
    lens = [2, 4]
    q, k, v = _packed(lens)
    k_pages, v_pages, table = paged_cache((k, v), lens, 3, 4)
    cu = _cu(lens)
    attention_varlen(q, k_pages, v_pages, cu, cu, 4, 4, block_table=table)
    attention_varlen(q, k_pages, v_pages, cu, cu, 4, 4, block_table=table)
    assert len(check_launches) == 1
    table[1, 1] = 4  # sequence 1's second page: used, outside the pool of 4
    with pytest.raises(ValueError, match="block_table: a page id a sequence uses is outside"):
        attention_varlen(q, k_pages, v_pages, cu, cu, 4, 4, block_table=table)
    assert len(check_launches) == 2


def test_no_memo_while_a_cuda_graph_is_captured(check_launches, monkeypatch):
    """A replay runs only what its capture launched: while capturing, the check launches even for the offsets
    checked last (CPU stands in for the capture here; the GPU test below captures for real)."""
    lens = [3, 5]
    q, k, v = _packed(lens)
    cu = _cu(lens)
    attention_varlen(q, k, v, cu, cu, 5, 5)
    monkeypatch.setattr(plan, "_capturing", lambda t: True)
    attention_varlen(q, k, v, cu, cu, 5, 5)
    attention_varlen(q, k, v, cu, cu, 5, 5)
    assert len(check_launches) == 3


def _capture(op, static, fresh):
    """(outputs of ``op`` captured in a CUDA graph on ``static`` after an eager call on the same tensors, replayed
    after copying ``fresh``'s values into them; eager's outputs on ``fresh``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up on the very tensors captured next: what the memos remember
        op(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op(*static)
    for target, source in zip(static, fresh):
        target.copy_(source)
    graph.replay()
    expected = op(*fresh)
    torch.cuda.synchronize()
    return captured, expected


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRETED, reason="CUDA graphs need a GPU")
def test_a_graph_captured_on_memoised_tensors_recomputes_them_on_replay(check_launches):
    """Captured right after an eager call on the same padding mask and offsets: the capture launches the offsets'
    check and the mask's key range again, so a replay with new values gives eager's result."""
    q, k, v = (torch.randn(2, 2, 40, 16, device="cuda", dtype=torch.float16) for _ in range(3))
    masks = [torch.ones(2, 40, dtype=torch.bool, device="cuda") for _ in range(2)]
    masks[0][:, 30:] = False
    masks[1][:, :5] = False  # a key range the first mask's would cut off
    captured, expected = _capture(lambda mask: kernels.attention(q, k, v, key_padding_mask=mask), [masks[0]],
                                  [masks[1]])
    assert torch.equal(captured, expected)
    packed = [t.transpose(1, 2).reshape(80, 2, 16) for t in (q, k, v)]
    offsets = [torch.tensor(cu, dtype=torch.int32, device="cuda") for cu in ([0, 30, 80], [0, 50, 80])]
    launches = len(check_launches)
    captured, expected = _capture(lambda cu: attention_varlen(*packed, cu, cu, 50, 50, causal=True), [offsets[0]],
                                  [offsets[1]])
    assert len(check_launches) == launches + 3  # warm-up (new tensors), capture, eager
    assert torch.equal(captured, expected)


def test_inference_tensors_are_checked_every_call_and_never_crash_the_memo():
    """Tensors made under torch.inference_mode keep no version counter: every memo (varlen's offsets, decoding's
    index values, a padding mask's key range, the SDPA drop-in's mask analysis) computes afresh for them, so a bad value written in place between
    calls is still caught, and nothing raises for a good one (reading their ``_version`` would)."""
    lens = [3, 5]
    with torch.inference_mode():
        q, k, v = _packed(lens)
        cu = _cu(lens)
        for _ in range(2):
            attention_varlen(q, k, v, cu, cu, 5, 5, causal=True)
        cu[2] = 99
        with pytest.raises(ValueError, match="cu_seqlens_q"):
            attention_varlen(q, k, v, cu, cu, 5, 5, causal=True)

        q_dec = torch.randn(2, 1, 2, 8)
        k_cache, v_cache = torch.randn(2, 2, 16, 2, 8).unbind(0)
        seqlens = torch.tensor([3, 7], dtype=torch.int32)
        for _ in range(2):
            kernels.attention_with_kvcache(q_dec, k_cache, v_cache, cache_seqlens=seqlens)
        seqlens.fill_(99)
        with pytest.raises(ValueError, match="cache_seqlens"):
            kernels.attention_with_kvcache(q_dec, k_cache, v_cache, cache_seqlens=seqlens)

        qb, kb, vb = torch.randn(3, 1, 2, 6, 8).unbind(0)
        pad = torch.ones(1, 6, dtype=torch.bool)
        pad[:, 4:] = False
        first = kernels.attention(qb, kb, vb, key_padding_mask=pad)
        pad[:, 2:] = False  # the new mask's key range, not the first call's
        torch.testing.assert_close(kernels.attention(qb, kb, vb, key_padding_mask=pad),
                                   kernels.attention(qb, kb, vb, key_padding_mask=pad.clone()))
        assert not torch.equal(first, kernels.attention(qb, kb, vb, key_padding_mask=pad))
        mask = pad[:, None, None, :].expand(1, 2, 6, 6)  # the SDPA drop-in's mask analysis
        torch.testing.assert_close(kernels.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask),
                                   torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask))
