"""The FlexAttention-style API (kernels.create_block_mask, MaskMod/ScoreMod, mods.py) as a user of
torch.nn.attention.flex_attention meets it: the same mods give flex_attention's outputs and lse, and float64's
gradients (flex has no CPU backward); what cannot work is a clear error, never a silently wrong result.
"""
import warnings

import pytest
import torch
import triton
import triton.language as tl
from torch.nn.attention import flex_attention as flex

import kernels

FP32 = torch.float32


@triton.jit
def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@triton.jit
def _late_rows_causal(b, h, q_idx, kv_idx, rows):
    return (q_idx >= rows) & (kv_idx <= q_idx)


@triton.jit
def _head_bias(score, b, h, q_idx, kv_idx, bias, stride_h):
    return score + tl.load(bias + h * stride_h + q_idx - kv_idx + 63)


@triton.jit
def _one(score, b, h, q_idx, kv_idx, bias, stride_h):
    return score * 0.0 + 1.0


def _dense(q, k, v, mask_mod=None, score_mod=None):
    """flex_attention's semantics in torch ops (any dtype, differentiable): (out, lse), rows seeing nothing 0."""
    batch, heads, n_q, d = q.shape
    k, v = (t.repeat_interleave(heads // k.shape[1], 1) for t in (k, v))
    idx = [torch.arange(n).view(*(n if i == j else 1 for j in range(4))) for i, n in enumerate((batch, heads, n_q,
                                                                                              k.shape[2]))]
    s = q @ k.transpose(-1, -2) * d ** -0.5
    if score_mod is not None:
        s = score_mod(s, *idx)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(*idx).expand_as(s), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None]) @ v, lse


def _flex(q, k, v, mask_mod=None, score_mod=None):
    block_mask = None if mask_mod is None else flex.create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2],
                                                                      device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": the unfused path is the point here
        return flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True,
                                   enable_gqa=q.shape[1] != k.shape[1])


def _bias_table(heads):
    bias = torch.randn(heads, 128)
    return bias, kernels.ScoreMod(_head_bias, _one, bias, bias.stride(0), index_dims={"bias": ("h", None)}), \
        (lambda s, b, h, i, j: s + bias[h, i - j + 63])


def _cases():
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 10, [0] * 25 + [1] * 15], dtype=torch.int32)
    prefix = torch.tensor([7, 30], dtype=torch.int32)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    _, bias_mod, bias_fn = _bias_table(4)
    return {
        # name: ((B, H, Hkv, Nq, Nk), our mask, our score, flex's mask, flex's score)
        "causal_top_left_nq_gt_nk_gqa": ((2, 4, 2, 33, 20), _causal, None, lambda b, h, i, j: i >= j, None),
        "document_per_batch_gqa": ((2, 4, 2, 40, 40), kernels.document_mask(doc), None,
                                   lambda b, h, i, j: doc[b, i] == doc[b, j], None),
        "prefix_lm": ((2, 2, 1, 40, 40), kernels.prefix_lm_mask(prefix), None,
                      lambda b, h, i, j: (j <= i) | (j < prefix[b]), None),
        "fully_masked_rows": ((1, 2, 1, 30, 30), kernels.MaskMod(_late_rows_causal, 5), None,
                              lambda b, h, i, j: (i >= 5) & (j <= i), None),
        "softcap_nq_lt_nk": ((1, 2, 1, 30, 37), None, kernels.softcap_score(2.0), None,
                             lambda s, b, h, i, j: 2.0 * torch.tanh(s / 2.0)),
        "alibi_bottom_right": ((1, 4, 2, 20, 37), None, kernels.alibi_score(slopes, 17), None,
                               lambda s, b, h, i, j: s - slopes[h] * (i + 17 - j).abs()),
        "per_head_bias_with_mask": ((2, 4, 4, 40, 40), kernels.create_block_mask(_causal, None, None, 40, 40),
                                    bias_mod, lambda b, h, i, j: i >= j, bias_fn),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_mods_match_flex_attention_and_float64_gradients(name):
    """Forward and lse as torch's flex_attention computes them (fp32), gradients as float64 math (flex has no CPU
    backward); rows the mask hides give zeros and lse -inf, as flex."""
    torch.manual_seed(0)
    (batch, heads, heads_kv, n_q, n_k), mask, score, flex_mask, flex_score = _cases()[name]
    q = torch.randn(batch, heads, n_q, 16)
    k, v = torch.randn(2, batch, heads_kv, n_k, 16)
    grad_out = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = kernels.attention(*leaves, return_lse=True, mask_mod=mask, score_mod=score)
    grads = torch.autograd.grad((out * grad_out).sum(), leaves)
    flex_out, flex_lse = _flex(q, k, v, flex_mask, flex_score)
    torch.testing.assert_close(out, flex_out, atol=1e-5, rtol=0)
    assert not out.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(flex_lse))
    seen = ~torch.isneginf(flex_lse)
    torch.testing.assert_close(lse[seen], flex_lse[seen], atol=1e-5, rtol=0)
    exact_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    exact_out, _ = _dense(*exact_leaves, flex_mask, flex_score)
    exact = torch.autograd.grad((exact_out * grad_out.double()).sum(), exact_leaves)
    for got, want in zip(grads, exact):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_create_block_mask_with_b_and_h_none_compiles_with_fullgraph():
    """FlexAttention's usual B=None, H=None inside a compiled step: the b = 1 / h = 1 probe compared its cells with
    torch.equal, which dynamo refused ('Data dependent operator aten.equal.default'); a device assert now."""
    ids = torch.tensor([0] * 10 + [1] * 14, dtype=torch.int32)
    mod = kernels.document_mask(ids)
    compiled = torch.compile(kernels.create_block_mask, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(mod, None, None, 24, 24).summary,
                       kernels.create_block_mask(mod, None, None, 24, 24).summary)
    q, k, v = torch.randn(3, 1, 2, 24, 16)

    def step(q, k, v):
        return kernels.attention(q, k, v, mask_mod=kernels.create_block_mask(mod, None, None, 24, 24))

    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v), step(q, k, v))


def test_compiled_create_block_mask_still_refuses_a_batch_dependent_mod_with_b_none():
    """The probe's verdict under torch.compile is torch._assert_async's error, with the eager ValueError's text."""
    prefix = torch.tensor([0, 200], dtype=torch.int32)  # batch rows 0 and 1 differ in the 128-cells of 150 x 150
    compiled = torch.compile(kernels.create_block_mask, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="B=None means one mask for every b"):
        compiled(kernels.prefix_lm_mask(prefix), None, 1, 150, 150)


def test_a_score_mod_tensor_requiring_grad_is_an_error_not_a_silent_zero_gradient():
    """FlexAttention differentiates a captured bias; ours does not, and used to return no gradient for it without a
    word (bias.grad stayed None while training). A ValueError naming the tensor under grad mode now; detached, or
    under no_grad, it runs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 128, requires_grad=True)
    mod = kernels.ScoreMod(_head_bias, _one, bias, bias.stride(0))
    with pytest.raises(ValueError, match="score_mod _head_bias: its extra tensor bias requires grad"):
        kernels.attention(q, k, v, score_mod=mod)
    with pytest.raises(ValueError, match="requires grad"):  # only the bias requiring grad: no gradient at all
        kernels.attention(q.detach(), k.detach(), v.detach(), score_mod=mod)
    detached = kernels.attention(q, k, v, score_mod=kernels.ScoreMod(_head_bias, _one, bias.detach(), 128))
    with torch.no_grad():
        torch.testing.assert_close(kernels.attention(q, k, v, score_mod=mod), detached)


@triton.jit
def _if_on_a_tile(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return True
    return False


@triton.jit
def _and_on_tiles(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) and (q_idx - kv_idx < 3)


@triton.jit
def _not_of_a_derived_tile(b, h, q_idx, kv_idx):
    distance = q_idx - kv_idx
    future = distance < 0
    return not future


@triton.jit
def _conditional_score(score, b, h, q_idx, kv_idx):
    return score if score > 0 else 0.0 * score


@triton.jit
def _score_grad(score, b, h, q_idx, kv_idx):
    return score * 0.0 + 1.0


@triton.jit
def _if_on_the_head(b, h, q_idx, kv_idx):
    if h == 0:  # b and h are scalars: a Python if on them is fine
        return q_idx >= 0
    return q_idx >= kv_idx


@pytest.mark.parametrize("make", [lambda: kernels.MaskMod(_if_on_a_tile), lambda: kernels.MaskMod(_and_on_tiles),
                                  lambda: kernels.MaskMod(_not_of_a_derived_tile),
                                  lambda: kernels.ScoreMod(_conditional_score, _score_grad),
                                  lambda: kernels.create_block_mask(_and_on_tiles, None, None, 8, 8)],
                         ids=["if", "and", "not_derived", "score_ifexp", "create_block_mask"])
def test_python_truth_tests_on_tiles_are_type_errors(make):
    """Triton's interpreter takes a tile's truth value as True whatever it holds, so `if q_idx >= kv_idx` showed
    every key and `a and b` computed b alone: silently wrong masks on CPU (a causal mask off by 1.2 in the output).
    flex_attention's Python mods cannot use them on tensors either."""
    with pytest.raises(TypeError, match="is a Python if/and/or/not on a tile"):
        make()


def test_python_if_on_the_head_index_still_runs():
    q, k, v = torch.randn(3, 1, 2, 12, 8)
    out = kernels.attention(q, k, v, mask_mod=_if_on_the_head)
    want, _ = _dense(q, k, v, lambda b, h, i, j: (h == 0) | (i >= j))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_python_mods_and_a_torch_block_mask_are_type_errors():
    """flex_attention's Python mods (and its BlockMask) cannot run in the kernels: TypeErrors naming the argument."""
    q = torch.randn(1, 1, 8, 8)
    with pytest.raises(TypeError, match=r"^mask_mod must be a @triton.jit function \(Python mods, as torch's"):
        kernels.create_block_mask(lambda b, h, i, j: i >= j, None, None, 8, 8)
    with pytest.raises(TypeError, match=r"^score_mod must be a @triton.jit function \(Python mods"):
        kernels.ScoreMod(lambda s, b, h, i, j: s, _score_grad)
    torch_mask = flex.create_block_mask(lambda b, h, i, j: i >= j, None, None, 8, 8, device="cpu")
    with pytest.raises(TypeError, match="^mask_mod must be"):
        kernels.attention(q, q, q, mask_mod=torch_mask)


def test_a_jit_lambda_mod_is_not_read_as_a_function_definition():
    """The truth-test check parses the mod's source: a triton.jit(lambda ...) gives the line around the lambda, which
    was an AttributeError ('Expr' object has no attribute 'args') before the mod's own checks could run."""
    with pytest.raises(TypeError, match="extra argument 0 must be a tensor or an int/float scalar, got True"):
        kernels.MaskMod(triton.jit(lambda b, h, q_idx, kv_idx, flag: q_idx >= kv_idx), True)
    assert isinstance(kernels.MaskMod(triton.jit(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)), kernels.MaskMod)


def test_a_torch_block_mask_passed_to_attention_names_its_type_and_the_way_out():
    """torch's BlockMask holds Python mods: the error said 'got BlockMask(kv_num_blocks=...' over many lines."""
    q = torch.randn(1, 1, 8, 16)
    torch_mask = flex.create_block_mask(lambda b, h, i, j: i >= j, None, None, 8, 8, device="cpu")
    with pytest.raises(TypeError, match=r"not FlexAttention's Python ones: kernels.create_block_mask .* got a "
                                        r"torch.nn.attention.flex_attention.BlockMask$"):
        kernels.attention(q, q, q, mask_mod=torch_mask)

