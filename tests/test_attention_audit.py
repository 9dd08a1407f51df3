"""Regression tests from the audit of the attention entry points as users call them (kernels.attention,
attention_varlen, attention_with_kvcache, the flash-attn functions and the SDPA shim) against float64 math."""
import importlib

import pytest
import torch

import kernels
from kernels.attention import varlen
from test_varlen import _cu, _per_sequence, paged_cache
from tolerance import FORWARD, assert_close


def _no_launch(*args, **kwargs):
    raise AssertionError("a Triton kernel launched on tensors the kernels cannot run on")


@pytest.fixture
def kernels_cannot_run(monkeypatch):
    """The process's kernels cannot take the inputs (CPU tensors where Triton is compiled for a GPU, or Triton
    imported before kernels without one): their launches would fail inside Triton, so none may happen."""
    monkeypatch.setattr(varlen._runtime, "kernel_runs_on", lambda *tensors: False)
    monkeypatch.setattr(varlen, "_offsets_verdict", _no_launch)
    monkeypatch.setattr(varlen, "attention_packed_op", _no_launch)


@pytest.mark.parametrize("paged", [False, True])
def test_varlen_falls_back_to_the_reference_without_launching_a_kernel(kernels_cannot_run, device, paged):
    lens_q, lens_k = [3, 0, 5], [4, 2, 6]
    q = torch.randn(sum(lens_q), 4, 8, device=device)
    k, v = torch.randn(2, sum(lens_k), 2, 8, device=device).unbind(0)
    expected, expected_lse = _per_sequence(q, k, v, lens_q, lens_k, causal=True)
    keys = paged_cache((k, v), lens_k, 4, 5) if paged else (k, v, None)
    out, lse = kernels.attention_varlen(q, keys[0], keys[1], _cu(lens_q, device), _cu(lens_k, device), 5, 6,
                                        causal=True, return_lse=True, block_table=keys[2])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)


@pytest.mark.parametrize("cu_seqlens_k,max_seqlen_k,block_table,match", [
    ([0, 4, 3], 4, None, "cu_seqlens_k must be non-decreasing"),
    ([0, 4, 7], 4, None, "cu_seqlens_k must end at the number of packed tokens 6"),
    ([0, 4, 6], 3, None, "max_seqlen_k = 3 must be at least the longest sequence"),
    ([0, 4, 6], 4, [[0, 5], [1, 2]], "block_table: a page id a sequence uses is outside"),
])
def test_varlen_fallback_checks_the_offsets_values(kernels_cannot_run, device, cu_seqlens_k, max_seqlen_k,
                                                   block_table, match):
    q = torch.randn(5, 2, 8, device=device)
    k = torch.randn(4, 2, 2, 8, device=device) if block_table else torch.randn(6, 2, 8, device=device)
    table = None if block_table is None else torch.tensor(block_table, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=match):
        kernels.attention_varlen(q, k, k, _cu([2, 3], device), torch.tensor(cu_seqlens_k, dtype=torch.int32,
                                                                             device=device),
                                 3, max_seqlen_k, block_table=table)


def test_varlen_on_meta_tensors_says_why_it_cannot_run():
    q, k = torch.empty(5, 2, 8, device="meta"), torch.empty(6, 2, 8, device="meta")
    offsets = torch.empty(3, dtype=torch.int32, device="meta")
    with pytest.raises(NotImplementedError, match="attention_varlen.*meta"):
        kernels.attention_varlen(q, k, k, offsets, offsets, 3, 4)


def test_dropout_mask_without_dropout_keeps_everything_and_draws_nothing(device):
    """attention(..., dropout_p=0) draws nothing from the generator, so the mask it 'would use' must not either."""
    generator_state = torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)
    mask = kernels.attention_dropout_mask(2, 3, 4, 5, 0.0, device)
    assert mask.dtype == torch.bool and mask.shape == (2, 3, 4, 5) and mask.all()
    assert torch.equal(generator_state, torch.get_rng_state() if device.type == "cpu"
                       else torch.cuda.get_rng_state(device))


def _packed_call(q_shape, k_shape, v_shape=None, paged=False):
    """attention_varlen on zeros of these shapes: two sequences, of 3 and 4 queries and keys."""
    q, k, v = (torch.zeros(shape) for shape in (q_shape, k_shape, v_shape or k_shape))
    cu = _cu([3, 4], "cpu")
    table = torch.zeros(2, 3, dtype=torch.int32) if paged else None
    kernels.attention_varlen(q, k, v, cu, cu, 4, 4, block_table=table)


@pytest.mark.parametrize("shapes,match", [
    (((7, 2, 8), (7, 2, 8), (6, 2, 8)), r"k and v must have the same shape \(total_k, Hkv, D\), got \(7, 2, 8\) and "
                                        r"\(6, 2, 8\)"),
    (((7, 2, 8), (7, 2, 4)), r"head dim 8 like q \(total_q, H, D\), got k of shape \(7, 2, 4\)"),
    (((7, 3, 8), (7, 2, 8)), r"must divide q's 3 heads and be at least 1, got k of shape \(7, 2, 8\)"),
    (((7, 2, 300), (7, 2, 300)), r"head dim must be in 1\.\.256, got q of shape \(7, 2, 300\)"),
])
def test_varlen_shape_errors_show_the_packed_shapes_passed(shapes, match):
    """The messages name the packed layouts and the shapes the caller passed, not the (1, heads, tokens, D)
    views the checks run on."""
    with pytest.raises(ValueError, match=match):
        _packed_call(*shapes)


def test_paged_varlen_shape_errors_show_the_page_pools_passed():
    with pytest.raises(ValueError, match=r"head dim 8 like q \(total_q, H, D\), got k of shape \(2, 4, 2, 4\)"):
        _packed_call((7, 2, 8), (2, 4, 2, 4), paged=True)


def test_the_sdpa_drop_in_takes_scale_and_enable_gqa_by_keyword_only_as_torch_does():
    """torch's SDPA takes at most 6 positional arguments (scale and enable_gqa are keyword-only): so does ours."""
    import inspect

    params = inspect.signature(kernels.scaled_dot_product_attention).parameters
    assert list(params) == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    assert [p.name for p in params.values() if p.kind is p.KEYWORD_ONLY] == ["scale", "enable_gqa"]
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match=r"takes from 3 to 6 positional arguments but 7 were given"):
        kernels.scaled_dot_product_attention(q, q, q, None, 0.0, False, 0.5)


@pytest.mark.parametrize("entry", ["attention", "flash_attn_func", "attention_varlen"])
def test_a_second_backward_through_attention_raises_instead_of_being_silently_wrong(entry):
    """create_graph=True gives the kernels' gradients (the first-order ones equal); differentiating them again, by
    .backward() or torch.autograd.grad, raises a clear RuntimeError, as torch's flash SDPA does: they are never
    constants that drop q's, k's and v's part of a gradient penalty."""
    from kernels.flash_attn import flash_attn_func

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    calls = {"attention": lambda: kernels.attention(q, k, v, causal=True),
             "flash_attn_func": lambda: flash_attn_func(q, k, v, causal=True),
             "attention_varlen": lambda: kernels.attention_varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, cu,
                                                                  3, 3, causal=True)}
    weight = torch.randn(calls[entry]().shape)
    expected, = torch.autograd.grad((calls[entry]() * weight).sum(), q)
    # .backward() runs every node; torch.autograd.grad only those on a path to q, which found attention's part
    # unreachable and returned the q.sum() part alone (ones), silently
    for second in (lambda loss: loss.backward(), lambda loss: torch.autograd.grad(loss, q)):
        dq, = torch.autograd.grad((calls[entry]() * weight).sum(), q, create_graph=True)
        assert torch.equal(dq.detach(), expected) and dq.requires_grad
        with pytest.raises(RuntimeError, match="kernels.attention: its backward is not differentiable"):
            second(dq.square().sum() + q.sum())


def test_torch_func_transforms_of_attention_run_its_torch_reference():
    """torch.func.grad, vmap(grad) (per-sample gradients) and jacrev of attention give torch's answers: under a
    torch.func transform the reference's torch ops run (the kernels' backward cannot read functorch's wrappers)."""
    import torch.nn.functional as F
    from torch.func import grad, jacrev, vmap

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))

    def loss(attend, q1, k1, v1):  # one sample: (H, N, D)
        return attend(q1[None], k1[None], v1[None]).square().sum()

    ours = lambda a, b, c: kernels.attention(a, b, c, causal=True)  # noqa: E731
    theirs = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    torch.testing.assert_close(grad(lambda a: loss(ours, a, k[0], v[0]))(q[0]),
                               grad(lambda a: loss(theirs, a, k[0], v[0]))(q[0]))
    per_sample = vmap(grad(lambda a, b, c: loss(ours, a, b, c), argnums=(0, 1, 2)))(q, k, v)
    expected = vmap(grad(lambda a, b, c: loss(theirs, a, b, c), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(per_sample, expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(jacrev(lambda a: ours(a, k[:1], v[:1]))(q[:1]),
                               jacrev(lambda a: theirs(a, k[:1], v[:1]))(q[:1]))


def test_torch_func_grad_of_the_sdpa_drop_in_gives_torchs():
    """Under a torch.func transform the SDPA drop-in hands the call to torch's SDPA (functorch's wrapped tensors
    cannot reach a launch), with and without a padding mask."""
    import torch.nn.functional as F
    from torch.func import grad

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 0] = False
    for kwargs in (dict(is_causal=True), dict(attn_mask=mask)):
        got = grad(lambda a: kernels.scaled_dot_product_attention(a, k, v, **kwargs).square().sum())(q)
        want = grad(lambda a: F.scaled_dot_product_attention(a, k, v, **kwargs).square().sum())(q)
        torch.testing.assert_close(got, want)


def test_decoding_under_vmap_is_a_clear_error():
    """attention_with_kvcache has no fallback (it writes the cache in place): under torch.vmap it says so instead
    of crashing inside the launcher."""
    q, cache = torch.randn(3, 1, 1, 2, 8), torch.randn(1, 6, 2, 8)
    with pytest.raises(NotImplementedError, match="attention_with_kvcache: not under torch.func transforms"):
        torch.vmap(lambda x: kernels.attention_with_kvcache(x, cache, cache))(q)


def test_the_sdpa_drop_in_autocasts_as_torchs(monkeypatch):
    """SDPA is on autocast's lower-precision list: under CPU autocast (bf16) fp32 and mixed q, k, v run in bf16
    and give bf16, as torch's do (the kernel runs them), within the float64 rule of the bf16 inputs."""
    import torch.nn.functional as F

    sdpa = importlib.import_module("kernels.attention.sdpa")
    monkeypatch.setattr(sdpa, "_TORCH_SDPA", lambda *a, **k: pytest.fail("torch's SDPA ran, not the kernel"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    for inputs in ((q, k, v), (q.bfloat16(), k, v)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = kernels.scaled_dot_product_attention(*inputs, is_causal=True)
            want = F.scaled_dot_product_attention(*inputs, is_causal=True)
        assert got.dtype == want.dtype == torch.bfloat16
        exact = F.scaled_dot_product_attention(*(t.bfloat16().double() for t in inputs), is_causal=True)
        assert_close(got, exact, want, FORWARD)


def test_a_strided_slice_gets_a_dense_output_in_its_dimension_order():
    """q, k, v sliced out of a packed (B, S, 3, H, D) qkv and viewed as (B, H, S, D) are not dense: the output and
    the gradients are dense tensors in their (B, S, H, D) order, as torch.empty_like lays them out (the README's
    rule), with the reference's values."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3, 2, 8, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = kernels.attention(q, k, v, causal=True)
    grad = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, grad, retain_graph=True)
    assert out.stride() == torch.empty_like(q).stride() and out.transpose(1, 2).is_contiguous()
    assert dq.transpose(1, 2).is_contiguous()
    expected = kernels.reference.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(dq, torch.autograd.grad(expected, q, grad)[0])
