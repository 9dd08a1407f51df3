"""Attention at the numeric extremes, as training and inference hit them: NaN/inf inputs (where they spread, and
where they must not), q . k past fp16's range, scale 0 and huge, denormals, odd head dims, one key, rows that see
no key in every combination (with gradients), empty shapes, dropout at and near 1, extreme softcap, ALiBi and
sinks. The truth is float64 math (``kernels.reference.attention``) or torch's math SDPA."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels import reference
from kernels.attention import sdpa
from kernels.flash_attn import flash_attn_func
from tolerance import BACKWARD, FORWARD, max_error, slack

NAN = float("nan")
_REFERENCE = reference.attention  # captured at import: attention_kernel_only replaces reference.attention

# the fallbacks raise, so a passing test proves the kernels ran (with kernels.attention stubbed out by its reference,
# several of these tests passed all the same); a test whose call runs a fallback by design restores it itself
pytestmark = pytest.mark.usefixtures("attention_kernel_only")


def _grads(fn, inputs, grad_out, **kwargs):
    """[out, lse, dq, dk, dv] of ``fn(*inputs, return_lse=True, **kwargs)`` with ``grad_out`` on out."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*leaves, return_lse=True, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return [out, lse] + [t.grad for t in leaves]


def _math_sdpa_grads(inputs, grad_out, **kwargs):
    """[out, dq, dk, dv] of torch's math SDPA."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*leaves, **kwargs)
    out.backward(grad_out)
    return [out] + [t.grad for t in leaves]


def _assert_rule(got, ref, same, names=("out", "lse", "dq", "dk", "dv"), one_key_rows=False):
    """FlashAttention's rule on ``got`` (named ``names``) against float64 ``ref`` with ``same``, torch in the
    kernels' dtype, as the noise. With ``one_key_rows`` (some row sees exactly one key) the bounds of dq and dk add
    4 fp32 roundings at the call's scale (the largest finite reference out or gradient): such a row's
    probabilities are one-hot, so its dS = P * (dP - delta) and torch's dq and dk from it are exactly 0, while FA2's
    backward, whose delta = rowsum(dO * O) sums in another order than dO . v, leaves fp32 noise."""
    magnitude = max((r[r.isfinite()].abs().max().item() for name, r in zip(names, ref)
                     if name != "lse" and r.isfinite().any()), default=0.0)
    for name, a, r, s in zip(names, got, ref, same):
        assert not a.isnan().any(), name
        factor = FORWARD if name in ("out", "lse") else BACKWARD
        bound = factor * max_error(s, r) + slack(a, r)
        if one_key_rows and name in ("dq", "dk"):
            bound += 4 * torch.finfo(torch.float32).eps * magnitude
        assert max_error(a, r) <= bound, f"{name}: {max_error(a, r):.3g} > {bound:.3g}"


def _same_nans(got, expected):
    assert torch.equal(got.isnan(), expected.isnan())


# ------------------------------------------------------------------------------------------- NaN and inf inputs


@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_row_keeps_nan_in_lse_and_gradients_as_torch_math(where):
    """Regression: a row whose scores hold NaN (NaN in its query, or in a key it sees) got lse -inf, the mark of a
    row that sees no key, and the backward then dropped the row (dv finite where torch's math is NaN). Its lse
    is NaN now, as float64's path and torch's math have it; every NaN lands where torch's math puts one."""
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    {"q": q, "k": k}[where][0, 0, 3, 5] = NAN
    grad_out = torch.randn(2, 2, 8, 16)
    out, lse, dq, dk, dv = _grads(kernels.attention, (q, k, v), grad_out)
    for got, expected in zip((out, dq, dk, dv), _math_sdpa_grads((q, k, v), grad_out)):
        _same_nans(got, expected)
    _, lse64 = _REFERENCE(q.double(), k.double(), v.double(), return_lse=True)
    _same_nans(lse, lse64)
    assert not torch.isinf(lse).any()
    assert lse[0, 0].isnan().any() and lse[0, 1:].isfinite().all() and lse[1].isfinite().all()


def test_nan_lse_in_packed_sequences_and_flash_attn_convention():
    """A packed sequence holding NaN keys: its lse NaN, the other sequences untouched (out, lse and every
    gradient); flash-attn's functions report such a row's lse as +inf, as flash-attn's ``sum != sum`` test does."""
    lens_q, lens_k = [5, 0, 7, 3], [6, 4, 3, 9]
    cu_q = torch.tensor([0, 5, 5, 12, 15], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 10, 13, 22], dtype=torch.int32)
    q, k, v = torch.randn(15, 2, 8), torch.randn(22, 2, 8), torch.randn(22, 2, 8)
    k[:6] = NAN
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = kernels.attention_varlen(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, return_lse=True)
    out.backward(torch.randn_like(out))
    assert lse[:, :5].isnan().all() and out[:5].isnan().all()
    assert not lse[:, 5:].isnan().any() and out[5:].isfinite().all()  # sequence 2's rows 0-3 see no key: -inf
    assert leaves[0].grad[5:].isfinite().all()
    assert leaves[1].grad[6:].isfinite().all() and leaves[2].grad[6:].isfinite().all()

    qd, kd, vd = (torch.randn(1, 6, 2, 8) for _ in range(3))
    qd[0, 2, 1, 0] = NAN
    _, flash_lse, _ = flash_attn_func(qd, kd, vd, return_attn_probs=True)
    assert torch.isposinf(flash_lse[0, 1, 2]) and flash_lse.isposinf().sum() == 1 and not flash_lse.isnan().any()


def test_nan_stays_in_its_batch_row_and_kv_group():
    """A NaN key of kv head 0 in batch row 0 of a GQA call (kv head 0 serves query heads 0-1) reaches the rows
    that see it and nothing else: not batch row 1, not query heads 2-3, not kv head 1's gradients."""
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    k[0, 0, 2] = NAN
    out, lse, dq, dk, dv = _grads(kernels.attention, (q, k, v), torch.randn(2, 4, 6, 8), causal=True)
    for t in (out, lse, dq):
        assert t[1].isfinite().all() and t[0, 2:].isfinite().all()
    # causal: rows 0-1 do not see key 2 (torch's math, adding -inf to its NaN score, makes them NaN too); their dq
    # is NaN as a matmul's: a zero dS times the NaN key
    assert out[0, :2, :2].isfinite().all() and out[0, :2, 2:].isnan().all()
    assert lse[0, :2, :2].isfinite().all() and lse[0, :2, 2:].isnan().all()
    for t in (dk, dv):
        assert t[1].isfinite().all() and t[0, 1].isfinite().all() and t[0, 0].isnan().any()


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_inf_inputs_give_torch_maths_nans_and_infs(where, value):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 0, 3, 5] = value
    out = kernels.attention(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v)
    _same_nans(out, expected)
    assert torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite])


def test_nan_keys_a_padding_mask_hides_change_nothing():
    """NaN keys (not values) that a key padding mask hides, before the first visible key and between: their scores
    are masked to -inf, never read into a probability (torch's math gives NaN everywhere here)."""
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, [0, 1, 2, 5]] = False
    clean = kernels.attention(q, k, v, key_padding_mask=mask)
    k[:, :, [0, 1, 2, 5]] = NAN
    torch.testing.assert_close(kernels.attention(q, k, v, key_padding_mask=mask), clean, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ low-precision range


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scores_past_fp16_range_accumulate_in_fp32(dtype):
    """q . k ~ 1e6 (inf in fp16) with scale 1e-6: torch's same-dtype math overflows, the kernels' fp32 dots do not;
    out and gradients within a rounding or two of the output dtype of float64 math."""
    q, k = ((torch.rand(1, 2, 8, 16) * 300 + 100).to(dtype) for _ in range(2))
    v = torch.randn(1, 2, 8, 16).to(dtype)
    if dtype == torch.float16:
        assert not (q.float() @ k.float().transpose(-1, -2)).to(dtype).isfinite().all()
    grad_out = torch.randn(1, 2, 8, 16)
    got = _grads(kernels.attention, (q, k, v), grad_out, scale=1e-6)
    ref = _grads(_REFERENCE, [t.double() for t in (q, k, v)], grad_out.double(), scale=1e-6)
    eps = torch.finfo(dtype).eps
    for a, r in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
        assert a.isfinite().all()
        assert (a.double() - r).abs().max() <= 2 * eps * r.abs().max()


# ------------------------------------------------------------------------------------------------ odd numerics


_CASES = {
    "scale 0 (uniform)": (dict(scale=0.0), 9),
    "scale 0 causal": (dict(scale=0.0, causal=True), 9),
    "negative scale": (dict(scale=-1.0), 9),
    "tiny scale": (dict(scale=1e-30), 9),
    "softcap 1e-3": (dict(softcap=1e-3), 9),
    "softcap 1e30": (dict(softcap=1e30), 9),
    "sinks 1e4": (dict(sinks=torch.full((2,), 1e4)), 9),
    "sinks -1e4": (dict(sinks=torch.full((2,), -1e4)), 9),
    "sinks, causal Nq > Nk": (dict(sinks=torch.full((2,), 0.5), causal=True), 4),
    "one key": (dict(), 1),
    "ALiBi -1 causal Nq > Nk": (dict(alibi_slopes=torch.full((2,), -1.0), causal=True), 5),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_odd_numerics_against_float64(case):
    kwargs, n_k = _CASES[case]
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, n_k, 8), torch.randn(1, 2, n_k, 8)
    grad_out = torch.randn(1, 2, 9, 8)
    got = _grads(kernels.attention, (q, k, v), grad_out, **kwargs)
    kwargs64 = {key: (val.double() if key == "sinks" else val) for key, val in kwargs.items()}
    ref = _grads(_REFERENCE, [t.double() for t in (q, k, v)], grad_out.double(), **kwargs64)
    _assert_rule(got, ref, _grads(_REFERENCE, (q, k, v), grad_out, **kwargs), one_key_rows=n_k == 1)
    if kwargs.get("scale") == 0.0 and not kwargs.get("causal"):  # uniform attention: the mean of v
        torch.testing.assert_close(got[0], v.mean(2, keepdim=True).expand_as(got[0]))


@pytest.mark.parametrize("d", [1, 3, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_odd_head_dims(d, dtype):
    q, k, v = (torch.randn(1, 2, 9, d).to(dtype) for _ in range(3))
    grad_out = torch.randn(1, 2, 9, d)
    got = _grads(kernels.attention, (q, k, v), grad_out, causal=True)
    ref = _grads(_REFERENCE, [t.double() for t in (q, k, v)], grad_out.double(), causal=True)
    _assert_rule(got, ref, _grads(_REFERENCE, (q, k, v), grad_out, causal=True))


def test_denormal_inputs():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    out = kernels.attention(q * 1e-40, k * 1e-40, v * 1e-42)
    ref = _REFERENCE(*(t.double() for t in (q * 1e-40, k * 1e-40, v * 1e-42)))
    assert not out.isnan().any()
    assert (out.double() - ref).abs().max() <= 4 * 2.0**-149  # a few denormal steps


def test_huge_scale_ties_are_uniform_forward():
    """Equal scores at scale 1e6 (8e6 each): the forward subtracts the row max, so exact ties share evenly."""
    q = k = torch.ones(1, 2, 9, 8)
    v = torch.randn(1, 2, 9, 8)
    torch.testing.assert_close(kernels.attention(q, k, v, scale=1e6), v.mean(2, keepdim=True).expand(1, 2, 9, 8))


def test_huge_alibi_slopes_pick_the_diagonal():
    """ALiBi slope 1e3 (and 1e30): each row's probability is all on its own diagonal key."""
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    for slope in (1e3, 1e30):
        out = kernels.attention(q, k, v, alibi_slopes=torch.full((2,), slope))
        torch.testing.assert_close(out, v, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ rows that see no key


_EMPTY = {  # kwargs, Nk, which query rows of (B=2, Nq=12) see no key
    "causal Nq > Nk": (dict(causal=True), 5, lambda: torch.arange(12)[None].expand(2, 12) < 7),
    "window (1, 0) Nq > Nk": (dict(window_size=(1, 0)), 5, lambda: torch.arange(12)[None].expand(2, 12) < 7),
    "window (0, 0) Nq > Nk": (dict(window_size=(0, 0)), 5, lambda: torch.arange(12)[None].expand(2, 12) < 7),
    "padding all False": (dict(key_padding_mask="row1"), 12, lambda: torch.tensor([[False], [True]]).expand(2, 12)),
    "padding late keys, causal": (dict(key_padding_mask="late", causal=True), 12,
                                  lambda: torch.arange(12)[None].expand(2, 12) < 10),
    "chunk, causal Nq > Nk": (dict(attention_chunk=4, causal=True), 5,
                              lambda: torch.arange(12)[None].expand(2, 12) < 7),
    "softcap + ALiBi, causal": (dict(causal=True, softcap=5.0, alibi_slopes=torch.ones(2)), 5,
                                lambda: torch.arange(12)[None].expand(2, 12) < 7),
}


@pytest.mark.parametrize("case", list(_EMPTY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_that_see_no_key_give_zeros_and_no_nan_anywhere(case, dtype):
    kwargs, n_k, empty = _EMPTY[case]
    kwargs = dict(kwargs)
    mask = {"row1": torch.tensor([[True] * 12, [False] * 12]),
            "late": torch.arange(12)[None].expand(2, 12) >= 10}.get(kwargs.get("key_padding_mask"))
    if mask is not None:
        kwargs["key_padding_mask"] = mask
    q, k, v = (torch.randn(2, 2, n, 8).to(dtype) for n in (12, n_k, n_k))
    grad_out = torch.randn(2, 2, 12, 8)
    out, lse, dq, dk, dv = _grads(kernels.attention, (q, k, v), grad_out, **kwargs)
    rows = empty()[:, None, :].expand(2, 2, 12)
    assert rows.any()
    assert (out[rows] == 0).all() and torch.isneginf(lse[rows]).all() and (dq[rows] == 0).all()
    assert lse[~rows].isfinite().all()
    for t in (out, dq, dk, dv):
        assert not t.isnan().any()
    if "attention_chunk" in kwargs:  # kernels.reference has no chunks (test_attention_chunk.py checks them)
        return
    ref_kwargs = {key: val for key, val in kwargs.items() if key != "key_padding_mask"}
    if mask is not None:
        ref_kwargs["mask"] = mask[:, None, None, :]
    ref = _grads(_REFERENCE, [t.double() for t in (q, k, v)], grad_out.double(), **ref_kwargs)
    same = _grads(_REFERENCE, (q, k, v), grad_out, **ref_kwargs)
    one_key_rows = case in ("window (0, 0) Nq > Nk", "padding late keys, causal")  # (row 10 of the latter)
    _assert_rule((out, dq, dk, dv), ref[:1] + ref[2:], same[:1] + same[2:], ("out", "dq", "dk", "dv"), one_key_rows)


def test_key_and_value_gradients_ignore_rows_that_see_no_key():
    """Only empty rows' dO is nonzero: dk, dv (and dq) are exactly zero, never NaN (also with ALiBi and softcap)."""
    q, k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    grad_out = torch.zeros(1, 2, 12, 8)
    grad_out[:, :, :7] = torch.randn(1, 2, 7, 8)  # rows 0-6 see no key under bottom-right causal
    for kwargs in (dict(), dict(softcap=3.0, alibi_slopes=torch.ones(2)), dict(dropout_p=0.5)):
        _, _, dq, dk, dv = _grads(kernels.attention, (q, k, v), grad_out, causal=True, **kwargs)
        for t in (dq, dk, dv):
            assert torch.equal(t, torch.zeros_like(t))


# --------------------------------------------------------------------------------------------------- empty shapes


@pytest.mark.parametrize("shapes", [((1, 2, 0, 8), (1, 2, 8, 8)), ((1, 2, 8, 8), (1, 2, 0, 8)),
                                    ((1, 2, 0, 8), (1, 2, 0, 8)), ((0, 2, 8, 8), (0, 2, 8, 8)),
                                    ((1, 0, 8, 8), (1, 1, 8, 8))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_shapes_with_gradients(monkeypatch, shapes, dtype):
    if dtype == torch.float64:  # float64's path is the reference, by design
        monkeypatch.setattr(reference, "attention", _REFERENCE)
    q_shape, k_shape = shapes
    q, k, v = (torch.randn(s, dtype=dtype, requires_grad=True) for s in (q_shape, k_shape, k_shape))
    out, lse = kernels.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == q_shape and lse.shape == q_shape[:3]
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


# --------------------------------------------------------------------------------------------------------- dropout


def test_dropout_one_refused_as_flash_attn_and_zeros_through_sdpa(monkeypatch):
    """dropout_p=1.0: kernels.attention and flash_attn_func raise ValueError naming dropout_p (flash-attn's
    ``TORCH_CHECK(p_dropout < 1.f)``); the SDPA drop-in gives torch's zeros."""
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p=1.0)
    monkeypatch.setattr(sdpa, "_TORCH_SDPA", torch._C._nn.scaled_dot_product_attention)  # dropout: torch's, by design
    assert torch.equal(kernels.scaled_dot_product_attention(q, k, v, dropout_p=1.0), torch.zeros_like(q))


def test_dropout_near_one_stays_finite():
    leaves = [torch.randn(1, 2, 8, 8, requires_grad=True) for _ in range(3)]
    for p in (1 - 1e-7, math.nextafter(1.0, 0.0)):  # the second rounds to 1.0 in the kernels' fp32
        out = kernels.attention(*leaves, dropout_p=p)
        out.sum().backward()
        assert out.isfinite().all() and all(t.grad.isfinite().all() for t in leaves)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decoding_a_nan_query_row_gives_lse_nan_as_the_dense_kernel(num_splits):
    """attention_with_kvcache's `l_i > 0` read a NaN row as one that sees no key: lse -inf where the dense kernel
    (and torch's math) give NaN; the other rows are untouched, split or not."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 2, 8)
    q[0, 0, 0, 0] = float("nan")
    k_cache, v_cache = torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8)
    out, lse = kernels.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([5], dtype=torch.int32),
                                              num_splits=num_splits, return_lse=True)
    dense_out, dense_lse = kernels.attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                             return_lse=True)
    assert torch.isnan(lse[0, 0, 0]) and torch.isnan(out[0, 0, 0]).all()
    torch.testing.assert_close(lse, dense_lse, equal_nan=True, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, dense_out.transpose(1, 2), equal_nan=True, atol=1e-5, rtol=1e-5)
