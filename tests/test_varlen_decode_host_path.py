"""The host path of varlen and decoding (issue #19): what it cuts must not change what a call computes or checks.

Varlen's eager autograd node takes the packed tensors themselves (its kernels' views are made inside it), an
unused lse adds nothing to the backward, and the checks' fast paths for plain inputs leave every other input to
the full checks and their messages. Decoding's cached plan (strides, scalars, the combine's arguments) gives the
launches the tensors' own strides."""
import numpy as np
import pytest
import torch

import kernels
from aten_ops import AtenOps
from kernels.attention import decode, varlen
from kernels.attention.varlen import attention_varlen
from tolerance import FORWARD, assert_close


def _int32(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _packed(device, total=9, heads=2, kv_heads=1, d=16, grad=True):
    """Packed q (total, heads, d) and k, v (total, kv_heads, d), fp32, leaves requiring grad."""
    q = torch.randn(total, heads, d, device=device)
    k, v = torch.randn(2, total, kv_heads, d, device=device)
    return [t.requires_grad_(grad) for t in (q, k, v)]



def test_varlen_autograd_node_takes_the_packed_inputs_with_no_view_nodes(device):
    """Before: out's node was a TransposeBackward over a SelectBackward, and q, k, v reached the kernel's node
    through UnsqueezeBackward/TransposeBackward nodes, each a host cost in both passes."""
    q, k, v = _packed(device)
    cu = _int32([0, 4, 9], device)
    out = attention_varlen(q, k, v, cu, cu, 5, 5, causal=True)
    assert type(out.grad_fn).__name__ == "FlashAttentionVarlenBackward"
    leaves = [next_fn.variable for next_fn, _ in out.grad_fn.next_functions if next_fn is not None]
    assert leaves == [q, k, v]


def test_varlen_saves_its_offsets_alone_for_the_backward(device):
    """An offsets-only call saves q, k, v, out, lse and the two offsets (before: the 8 fixed variant slots, 6 of
    them None, each a host cost); the backward rebuilds them as the offsets' VariantTensors."""
    q, k, v = _packed(device)
    cu = _int32([0, 4, 9], device)
    out = attention_varlen(q, k, v, cu, cu, 5, 5, causal=True)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 7 and saved[5] is cu and saved[6] is cu
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    alibi = attention_varlen(q, k, v, cu, cu, 5, 5, causal=True, alibi_slopes=torch.zeros(2, device=device))
    assert len(alibi.grad_fn.saved_tensors) == 13  # not the offsets alone: every fixed slot
    for grad, expected in zip(grads, torch.autograd.grad(alibi, (q, k, v), torch.ones_like(out))):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_varlen_unused_lse_adds_nothing_to_the_backward(device):
    """Without return_lse the backward gets no gradient of lse: no zeros materialised, no (grad_lse * log2 e)
    subtracted from delta (before: a mul and a sub_ per call); the gradients are those with a zero lse gradient."""
    q, k, v = _packed(device)
    cu = _int32([0, 4, 9], device)
    grad_out = torch.randn(q.shape, device=device)
    out = attention_varlen(q, k, v, cu, cu, 5, 5, causal=True)
    with AtenOps() as ops:
        out.backward(grad_out)
    assert not {"mul", "sub", "sub_", "zeros", "zero_", "fill_"} & set(ops.work), ops.work
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out, lse = attention_varlen(q, k, v, cu, cu, 5, 5, causal=True, return_lse=True)
    torch.autograd.backward((out, lse), (grad_out, torch.zeros_like(lse)))
    for grad, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(grad, t.grad, rtol=0, atol=0)


def test_varlen_lse_alone_has_the_gradients_of_a_zero_out_gradient(device):
    """With lse the only output used, out's gradient is zeros (given explicitly in the second call)."""
    q, k, v = _packed(device)
    cu = _int32([0, 0, 3, 9], device)
    grad_lse = torch.randn(2, 9, device=device)
    _, lse = attention_varlen(q, k, v, cu, cu, 6, 6, causal=True, return_lse=True)
    grads = torch.autograd.grad(lse, (q, k, v), grad_lse)
    out, lse = attention_varlen(q, k, v, cu, cu, 6, 6, causal=True, return_lse=True)
    expected = torch.autograd.grad((out, lse), (q, k, v), (torch.zeros_like(out), grad_lse))
    assert any(grad.abs().sum() > 0 for grad in grads)
    for grad, grad_expected in zip(grads, expected):
        torch.testing.assert_close(grad, grad_expected, rtol=0, atol=0)


def test_varlen_inputs_the_fast_paths_pass_on_take_the_full_checks():
    """A Parameter q, numpy ints for max_seqlen: not the fast path's plain types, still accepted, same output."""
    q, k, v = _packed("cpu", grad=False)
    cu = _int32([0, 4, 9])
    expected = attention_varlen(q, k, v, cu, cu, 5, 5, causal=True)
    out = attention_varlen(torch.nn.Parameter(q), k, v, cu, cu, np.int64(5), np.int32(5), causal=True)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)


def test_varlen_plain_scalars_are_cached_by_value_and_other_types_still_checked():
    """The checked variant of plain scalars is cached by value; equal values of other types (True == 1 == 1.0)
    never hit it: those the checks refuse still raise, those they accept give the same output."""
    q, k, v = _packed("cpu", grad=False)
    cu = _int32([0, 4, 9])
    call = dict(causal=True, scale=0.5, window_size=(2, 0), softcap=0.0, dropout_p=0.0)
    plain = attention_varlen(q, k, v, cu, cu, 5, 5, **call)
    hits = varlen._plain_variant.cache_info().hits
    torch.testing.assert_close(attention_varlen(q, k, v, cu, cu, 5, 5, **call), plain, rtol=0, atol=0)
    assert varlen._plain_variant.cache_info().hits == hits + 1
    for change, error, match in ((dict(max_seqlen_q=5.0), TypeError, "max_seqlen_q must be an int"),
                                 (dict(max_seqlen_k=True), TypeError, "max_seqlen_k must be an int"),
                                 (dict(window_size=(2.0, 0)), TypeError, "window_size must be a pair of ints"),
                                 (dict(scale=True), TypeError, "scale must be a finite real"),
                                 (dict(softcap=False), TypeError, "softcap must be a real number")):
        with pytest.raises(error, match=match):
            attention_varlen(q, k, v, cu, cu, **{"max_seqlen_q": 5, "max_seqlen_k": 5, **call, **change})
    other_types = dict(causal=1, scale=np.float64(0.5), window_size=[2, 0], softcap=0, dropout_p=0)
    torch.testing.assert_close(attention_varlen(q, k, v, cu, cu, np.int64(5), 5, **other_types), plain, rtol=0,
                               atol=0)


@pytest.mark.parametrize("change,error,match", [
    (dict(q=torch.randn(9, 2, 16, dtype=torch.float64)), TypeError, "q must have dtype"),
    (dict(k=torch.randn(9, 1, 16, dtype=torch.float16)), TypeError, "q, k, v must share one dtype"),
    (dict(v=torch.randn(1, 9, 1, 16)), ValueError, "v must be 3-D"),
    (dict(k=torch.randn(9, 1, 8)), ValueError, "k and v must have the same shape"),
    (dict(k=torch.randn(9, 3, 16), v=torch.randn(9, 3, 16)), ValueError, "kv heads must divide"),
    (dict(q=torch.randn(9, 2, 0), k=torch.randn(9, 1, 0), v=torch.randn(9, 1, 0)), ValueError, "head dim"),
    (dict(q=torch.randn(9, 2, 16)[None]), ValueError, "q must be 3-D"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9])), TypeError, "cu_seqlens_q must have dtype"),
    (dict(cu_seqlens_k=_int32([[0, 4, 9]])), ValueError, "cu_seqlens_k must be 1-D"),
    (dict(cu_seqlens_q=_int32([])), ValueError, "cu_seqlens_q must have batch"),
    (dict(cu_seqlens_q=_int32([0, 9])), ValueError, "same number of sequences"),
    (dict(cu_seqlens_k=[0, 4, 9]), TypeError, "cu_seqlens_k must be a torch.Tensor"),
    (dict(cu_seqlens_q=_int32([0, 4, 9], "meta")), ValueError, "q, cu_seqlens_q, cu_seqlens_k must share one device"),
    (dict(max_seqlen_q=True), TypeError, "max_seqlen_q must be an int"),
    (dict(max_seqlen_k=5.0), TypeError, "max_seqlen_k must be an int"),
])
def test_varlen_bad_inputs_keep_their_messages(change, error, match):
    q, k, v = _packed("cpu", grad=False)
    cu = _int32([0, 4, 9])
    call = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5)
    with pytest.raises(error, match=match):
        attention_varlen(**{**call, **change})


def test_decode_plan_strides_are_the_tensors_own():
    """The cached plan's strides of out, lse and the splits' partials are what torch gives contiguous tensors of
    those shapes, size-1 and empty dims included."""
    for shape in ((2, 1, 2, 64), (1, 1, 1, 1), (3, 0, 2, 5), (5, 2, 1, 3, 1)):
        assert decode._contiguous_strides(shape) == torch.empty(shape).stride()


@pytest.mark.parametrize("paged", [False, True])
def test_decode_strided_q_and_splits_match_a_contiguous_unsplit_call(device, paged):
    """A q that is a transposed view gives the contiguous q's output (contiguous); forced splits, the combine's
    cached arguments, the unsplit output."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 16, device=device).transpose(1, 2)  # (2, 4, 3, 16) view, non-contiguous
    cache = dict(k_cache=torch.randn(6, 8, 3, 16, device=device), v_cache=torch.randn(6, 8, 3, 16, device=device))
    if paged:
        cache["block_table"] = _int32([[5, 0, 2], [1, 4, 3]], device)
    else:
        cache = {name: t.view(2, 24, 3, 16) for name, t in cache.items()}
    seqlens = _int32([7, 20], device)
    outs = [kernels.attention_with_kvcache(x, **cache, cache_seqlens=seqlens, causal=True, num_splits=splits,
                                           return_lse=True)
            for x, splits in ((q, 1), (q.contiguous(), 1), (q, 3))]
    assert outs[0][0].is_contiguous() and outs[0][0].shape == q.shape
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, outs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,error,match", [
    (dict(cache_seqlens=torch.tensor([3, 5])), TypeError, "cache_seqlens must have dtype"),
    (dict(cache_seqlens=_int32([3, 5, 1])), ValueError, r"cache_seqlens must have shape \(2,\)"),
    (dict(cache_leftpad=_int32([[0, 0]])), ValueError, "cache_leftpad must be 1-D"),
    (dict(cache_seqlens=_int32([3, 5]), softcap=True), TypeError, "softcap"),
    (dict(cache_seqlens=_int32([3, 5]), softcap=-1.0), ValueError, "softcap must be in"),
    (dict(num_splits=-1), ValueError, "num_splits must be an int >= 0"),
    (dict(num_splits=True), TypeError, "num_splits"),
    (dict(q=torch.randn(2, 1, 2, 16, dtype=torch.float64)), TypeError, "q must have dtype"),
    (dict(v_cache=torch.randn(2, 8, 2, 16, dtype=torch.float16)), TypeError, "must share one dtype"),
    (dict(k_cache=torch.randn(2, 8, 2)), ValueError, "k_cache must be 4-D"),
    (dict(k=torch.randn(2, 1, 2, 16, dtype=torch.float16), v=torch.randn(2, 1, 2, 16, dtype=torch.float16),
          cache_seqlens=3), TypeError, "q, k must share one dtype"),
    (dict(k=torch.randn(2, 1, 2, 16), v=torch.randn(2, 2, 2, 16), cache_seqlens=3), ValueError, "k and v must both"),
    (dict(k=torch.randn(1, 1, 2, 16), v=torch.randn(1, 1, 2, 16), cache_seqlens=3), ValueError, "k and v must both"),
    (dict(k=torch.randn(2, 1, 1, 16), v=torch.randn(2, 1, 1, 16), cache_seqlens=3), ValueError, "k and v must both"),
    (dict(k=torch.randn(2, 1, 2, 8), v=torch.randn(2, 1, 2, 8), cache_seqlens=3), ValueError, "k and v must both"),
    (dict(k=torch.randn(2, 1, 2), v=torch.randn(2, 1, 2), cache_seqlens=3), ValueError, "k must be 4-D"),
])
def test_decode_bad_inputs_keep_their_messages(change, error, match):
    call = dict(q=torch.randn(2, 1, 2, 16), k_cache=torch.randn(2, 8, 2, 16), v_cache=torch.randn(2, 8, 2, 16))
    with pytest.raises(error, match=match):
        kernels.attention_with_kvcache(**{**call, **change})


def test_decode_plain_type_fast_paths_leave_other_types_to_the_full_checks():
    """numpy ints, a Parameter cache and Parameter new keys (not the fast paths' plain types) are accepted, with
    the same output and the same cache."""
    q, k_cache, v_cache = torch.randn(2, 1, 2, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    caches = k_cache.clone(), v_cache.clone()
    expected = kernels.attention_with_kvcache(q, *caches, k, v, cache_seqlens=5, num_splits=2, softcap=3.0)
    with torch.no_grad():
        out = kernels.attention_with_kvcache(q, torch.nn.Parameter(k_cache), v_cache, torch.nn.Parameter(k), v,
                                             cache_seqlens=np.int64(5), num_splits=np.int32(2), softcap=3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close((k_cache, v_cache), caches, rtol=0, atol=0)


def test_varlen_eager_offsets_check_reuses_the_threads_verdict():
    """Before: each eager call allocated a new verdict (a ``ones``) for the offsets' check on CPU; now it is the
    thread's one, read at once, and left a pass after a failing call so that the next valid call passes."""
    q, k, v = _packed("cpu", grad=False)
    cu = _int32([0, 4, 9])
    attention_varlen(q, k, v, cu, cu, 5, 5)
    with AtenOps() as ops:
        out = attention_varlen(q, k, v, cu, cu, 5, 5)
    assert "ones" not in ops.work, ops.work
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        attention_varlen(q, k, v, cu, _int32([0, 10, 9]), 10, 10)
    torch.testing.assert_close(attention_varlen(q, k, v, cu, cu, 5, 5), out, rtol=0, atol=0)


def test_varlen_launches_on_the_packed_tensors_with_their_views_strides(device, monkeypatch):
    """Before: q, k, v, dO reached the kernels as (1, H, total, D) views (five views per forward, five per
    backward); now every kernel takes the packed tensors themselves with the strides their views would give
    (batch stride 0), out and the gradients are contiguous (total, H, D) tensors, and nothing is computed
    differently from a per-sequence reference."""
    from kernels.attention import configs
    launched = {}
    for name, real in list(configs.KERNELS.items()):
        def recording(*args, name=name, real=real, grid, warmup, **kwargs):
            launched[name] = dict(zip(real.arg_names, args), **kwargs)
            return real.run(*args, grid=grid, warmup=warmup, **kwargs)
        monkeypatch.setitem(configs.KERNELS, name, type("Recorder", (), {"run": staticmethod(recording)}))
    q = torch.randn(4, 9, 24, device=device).transpose(0, 1).requires_grad_()  # (total, H, D), token stride 24
    k = torch.randn(9, 2, 32, device=device)[..., :24].requires_grad_()
    v = torch.randn(9, 2, 24, device=device, requires_grad=True)
    cu = _int32([0, 4, 9], device)
    out, lse = attention_varlen(q, k, v, cu, cu, 5, 5, causal=True, return_lse=True)
    grad = torch.randn(4, 9, 24, device=device).transpose(0, 1)
    out.backward(grad)
    for name in ("fwd", "dkdv", "dq"):
        args = launched[name]
        assert args["Q"] is q and args["K"] is k and args["V"] is v
        for letter, t in (("q", q), ("k", k), ("v", v)):
            assert tuple(args[f"stride_{letter}{dim}"] for dim in "bhnd") == (0, t.stride(1), t.stride(0), 1)
    assert launched["fwd"]["O"] is out and out.is_contiguous() and out.shape == q.shape
    for name in ("dkdv", "dq"):
        assert launched[name]["DO"] is grad
        assert tuple(launched[name][f"stride_do{dim}"] for dim in "bhnd") == (0, grad.stride(1), grad.stride(0), 1)
    kernel_grads = launched["dq"]["DQ"], launched["dkdv"]["DK"], launched["dkdv"]["DV"]
    for kernel_grad, t in zip(kernel_grads, (q, k, v)):
        assert kernel_grad.is_contiguous() and kernel_grad.shape == t.shape and kernel_grad.equal(t.grad)
    for rows in (slice(0, 4), slice(4, 9)):
        references = []  # (out, lse) in float64 and in fp32
        for dtype in (torch.float64, torch.float32):
            q_b, k_b, v_b = (t.detach()[rows].to(dtype).transpose(0, 1)[None] for t in (q, k, v))
            references.append(kernels.reference.attention(q_b, k_b.repeat_interleave(2, 1), v_b.repeat_interleave(2, 1),
                                                          causal=True, return_lse=True))
        (expected, expected_lse), (low, low_lse) = references
        assert_close(out.detach()[rows], expected[0].transpose(0, 1), low[0].transpose(0, 1), FORWARD)
        assert_close(lse.detach()[:, rows], expected_lse[0], low_lse[0], FORWARD, name="lse")


@pytest.mark.parametrize("strides, legal", [
    ((64, 32, 1), True), ((72, 36, 1), False),  # fp16 rows of 64 / 72 bytes
    ((32, 1024, 1), True), ((32, 1028, 1), False),  # head-major
])
def test_tma_legality_of_packed_tensors_is_their_views(strides, legal):
    """tma_legal of packed (total, H, D) tensors is tma_legal of their (1, H, total, D) views."""
    from kernels.attention import configs
    if not kernels.INTERPRETED:
        pytest.skip("judged as the interpreter does (every device capability)")
    t = torch.randn(8192).half().as_strided((16, 2, 32), strides)
    assert configs.tma_legal(t) is legal
    assert configs.tma_legal(t.unsqueeze(0).transpose(1, 2)) is legal
