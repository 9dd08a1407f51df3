"""Mixed-precision training at the edges of fp16/bf16, as torch.amp hits them: loss scales whose backward overflows
(gradients non-finite exactly where torch's are, so GradScaler skips the step), safe scales (unscaled gradients
within the tolerance rule), non-finite inputs against plain torch math, and dtypes under CPU autocast."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels
from kernels import reference
from kernels._runtime import cast_rne
from tolerance import BACKWARD, FORWARD, assert_close
from transformer import GPT, GPTConfig

INF = math.inf


def _grads(fn, inputs, grad_out, **kwargs):
    """[out, *input grads] of ``fn(*inputs, **kwargs)`` with ``grad_out`` on its (first) output."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _torch_attention(q, k, v, softcap=0.0):
    """Plain torch autograd math of (non-causal, GQA) attention with Gemma 2's softcap."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return torch.softmax(s, -1) @ v


def _same_non_finite(got, expected, name):
    assert torch.equal(got.isnan(), expected.isnan()), f"{name}: NaN pattern"
    assert torch.equal(got.isinf(), expected.to(got.dtype).isinf()), f"{name}: inf pattern"


# ------------------------------------------------------------------------------ infinite keys/queries, regressions
_PADDING_ROWS = pytest.mark.xfail(strict=True, reason=(
    "README limits: dK/dV's unmasked loop reads the rows past Nq of a partial last query block as zeros, and 0 times "
    "an infinite key is a NaN score there (a masked tail loop fixes it but spills on sm_100)"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("where", ["q", pytest.param("k", marks=_PADDING_ROWS)])
@pytest.mark.parametrize("value", [INF, -INF])
def test_softcap_saturates_infinite_scores_in_the_gradients_as_torch(attention_kernel_only, dtype, where, value):
    """With a softcap an infinite q or k element gives scores of +-softcap and tanh' = 0 there, so torch's dk and
    dv of such a key (and dq of such a query) are finite. Regression for q: dQ's masked tail kept tanh(NaN) of the
    padding keys (read as zeros: 0 * inf) in dS, so the query's dq was NaN. For k, dK/dV's loop reads the rows
    past Nq of a partial query block the same way (xfail: README limits). Finite entries within the float64 rule."""
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 7, 8), torch.randn(1, 1, 7, 8)
    {"q": q, "k": k}[where][0, 0, 3, 2] = value
    inputs, grad_out = [t.to(dtype) for t in (q, k, v)], torch.randn(1, 2, 5, 8)
    got = _grads(kernels.attention, inputs, grad_out, softcap=2.0)
    exact = _grads(_torch_attention, [t.double() for t in inputs], grad_out.double(), softcap=2.0)
    same = _grads(_torch_attention, inputs, grad_out, softcap=2.0)
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, exact, same):
        _same_non_finite(a, r, name)
        finite = r.isfinite()
        assert_close(a[finite], r[finite], t[finite], FORWARD if name == "out" else BACKWARD, name=name)
    assert got[2][0, 0, 3].isfinite().all() if where == "k" else got[1][0, 0, 3].isfinite().all()


@pytest.mark.parametrize("n_q", [pytest.param(5, marks=_PADDING_ROWS), 32, pytest.param(37, marks=_PADDING_ROWS)])
def test_a_key_no_query_can_weigh_gets_zero_gradients(n_q):
    """A key with -inf against every query's positive component has p = 0 in every row: torch gives it dk = dv = 0
    (and the rows finite outputs). The rows past Nq of a partial query block (n_q 5, 37) make its scores NaN in
    the dK/dV loop (xfail: README limits); a whole number of query blocks (32) is exact."""
    q, k, v = torch.randn(1, 1, n_q, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    q[..., 0] = q[..., 0].abs() + 0.1
    k[0, 0, 4, 0] = -INF
    grad_out = torch.randn(1, 1, n_q, 8)
    out, dq, dk, dv = _grads(kernels.attention, (q, k, v), grad_out)
    expected = _grads(_torch_attention, [t.double() for t in (q, k, v)], grad_out.double())
    assert out.isfinite().all() and (dk[0, 0, 4] == 0).all() and (dv[0, 0, 4] == 0).all()
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected):
        _same_non_finite(a, r, name)  # dq: NaN in component 0 only (0 * -inf), as torch's matmul
        torch.testing.assert_close(a[r.isfinite()].double(), r[r.isfinite()], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- GradScaler-style backward


def _attention_case(dtype):
    q = torch.randn(1, 2, 16, 16, dtype=dtype)
    return q, torch.randn(1, 1, 16, 16, dtype=dtype), torch.randn(1, 1, 16, 16, dtype=dtype)


def _scaled_loss_grads(fn, inputs, loss_scale, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)
    (out.float().pow(2).sum() * loss_scale).backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("loss_scale", [2.0 ** 16, 2.0 ** 24])
@pytest.mark.parametrize("kwargs", [{}, {"causal": True, "window_size": (4, 0), "softcap": 5.0}])
def test_overflowing_loss_scale_gives_non_finite_grads_where_torch_does(loss_scale, kwargs):
    """fp16 with a loss scale whose dO passes 65504: every gradient is non-finite exactly where the package's torch
    math (kernels.reference in fp16) has it, so GradScaler skips the step; never finite garbage or zeros."""
    inputs = _attention_case(torch.float16)
    got = _scaled_loss_grads(kernels.attention, inputs, loss_scale, **kwargs)
    expected = _scaled_loss_grads(reference.attention, inputs, loss_scale, **kwargs)
    for name, a, r in zip(("dq", "dk", "dv"), got, expected):
        assert not r.isfinite().all()
        if loss_scale == 2.0 ** 24:  # every dO is inf: both all non-finite
            assert not a.isfinite().any(), name
        else:  # some rows' dO finite: torch's fp16 dO @ v^T overflows where the kernels' fp32 one does not, so
            assert (a.isfinite() | ~r.isfinite()).all(), name  # the kernels are non-finite only where torch is
            assert not a.isfinite().all(), name


def test_overflowing_loss_scale_rows_the_kernels_keep_finite_are_right():
    """Where torch's fp16 math overflows inside (dO @ v^T) but the gradient fits fp16, the kernels' fp32
    accumulation gives torch's own SDPA's finite values, within the rule of float64."""
    inputs = _attention_case(torch.float16)
    got = _scaled_loss_grads(kernels.attention, inputs, 2.0 ** 16)
    sdpa = _scaled_loss_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), inputs,
                              2.0 ** 16)
    for a, s in zip(got, sdpa):
        assert torch.equal(a.isfinite(), s.isfinite())
        finite = a.isfinite()
        torch.testing.assert_close(a[finite].float(), s[finite].float(), atol=0, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_safe_loss_scale_unscaled_grads_within_the_rule(dtype):
    """A GradScaler-sized scale (2^10) that does not overflow: the unscaled gradients meet the tolerance rule."""
    inputs = _attention_case(dtype)
    scale = 2.0 ** 10
    got = _scaled_loss_grads(kernels.attention, inputs, scale, causal=True)
    same = _scaled_loss_grads(reference.attention, inputs, scale, causal=True)
    exact = _scaled_loss_grads(reference.attention, [t.double() for t in inputs], scale, causal=True)
    for name, a, s, r in zip(("dq", "dk", "dv"), got, same, exact):
        assert a.isfinite().all()
        assert_close(a.double() / scale, r / scale, s.double() / scale, factor=BACKWARD, name=name)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "softmax", "log_softmax"])
def test_row_ops_overflowing_gradients_are_inf_where_torch_and_float64_are(op):
    """fp16 rows with a gradient of 40000 everywhere: dweight (a sum over 64 rows) and dx overflow fp16; the
    kernels' fp32 sums give inf exactly where float64 math rounded to fp16 does (torch's fp16 layer norm has one
    more inf in dbias, from its fp16 rounding on the way)."""
    x = torch.randn(64, 24, dtype=torch.float16)
    grad = torch.full((64, 24), 40000.0, dtype=torch.float16)
    if op in ("softmax", "log_softmax"):
        grad = torch.randn(64, 24, dtype=torch.float16) * 40000
        fns = (lambda x: getattr(kernels, op)(x, -1), lambda x: getattr(torch, op)(x, -1))
        inputs = (x,)
    else:
        fns = (lambda x, w: getattr(kernels, op)(x, (24,), w), lambda x, w: getattr(F, op)(x, (24,), w))
        inputs = (x, torch.ones(24, dtype=torch.float16))
    got = _grads(fns[0], inputs, grad)
    exact = _grads(fns[1], [t.double() for t in inputs], grad.double())
    assert not all(g.isfinite().all() for g in got[1:])
    for a, r in zip(got, exact):
        assert torch.equal(a.isfinite(), r.to(a.dtype).isfinite())


# ------------------------------------------------------------------------------ autocast, GradScaler, clipping


def _amp_step(model, idx, targets, dtype, init_scale):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    with torch.autocast("cpu", dtype=dtype):
        logits, loss = model(idx, targets)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    try:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
        clipped = True
    except RuntimeError:
        clipped = False
    scaler.step(opt)
    scaler.update()
    return logits, loss, grads, scaler.get_scale(), clipped


@pytest.mark.parametrize("dtype, init_scale", [(torch.float16, 2.0 ** 8), (torch.float16, 2.0 ** 24),
                                               (torch.bfloat16, 2.0 ** 16)])
def test_gpt_triton_backend_under_autocast_and_grad_scaler_as_sdpa(dtype, init_scale):
    """GPT on the kernels (GQA, window) under CPU autocast with a GradScaler: the same dtypes, the same skipped
    (overflowing 2^24 in fp16) or taken step and scale, clip_grad_norm_(error_if_nonfinite) raising alike, and a
    taken step's unscaled gradients within the rule of the float64 model."""
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, window=8))
    idx, targets = torch.randint(0, 50, (1, 17)), torch.randint(0, 50, (1, 17))
    fused = _amp_step(copy.deepcopy(model).set_backend("triton"), idx, targets, dtype, init_scale)
    same = _amp_step(copy.deepcopy(model).set_backend("sdpa"), idx, targets, dtype, init_scale)
    assert fused[0].dtype == same[0].dtype == dtype and fused[1].dtype == same[1].dtype == torch.float32
    assert fused[3] == same[3] and fused[4] == same[4]
    skipped = fused[3] < init_scale
    assert skipped == (dtype == torch.float16 and init_scale == 2.0 ** 24)
    exact = copy.deepcopy(model).double().set_backend("reference")
    _, loss = exact(idx, targets)
    loss.backward()
    for name, grad in fused[2].items():
        assert grad.dtype == same[2][name].dtype == torch.float32
        if skipped:
            assert torch.equal(grad.isfinite(), same[2][name].isfinite()), name
        else:
            assert_close(grad, dict(exact.named_parameters())[name].grad, same[2][name], factor=BACKWARD,
                         name=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patched_modules_under_cpu_autocast_keep_torchs_dtypes(dtype):
    """CPU autocast leaves norms and softmax in their input's dtype: the kernels' modules and functions give the
    same output and gradient dtypes as torch's for fp32 and low-precision inputs with fp32 parameters."""
    for x_dtype in (torch.float32, dtype):
        x = torch.randn(2, 5, 24, dtype=x_dtype)
        for ours, theirs in ((kernels.LayerNorm(24), torch.nn.LayerNorm(24)),
                             (kernels.RMSNorm(24), torch.nn.RMSNorm(24)),
                             (lambda t: kernels.softmax(t, -1), lambda t: torch.softmax(t, -1)),
                             (lambda t: kernels.log_softmax(t, -1), lambda t: torch.log_softmax(t, -1))):
            dtypes = []
            for module in (ours, theirs):
                leaf = x.clone().requires_grad_()
                with torch.autocast("cpu", dtype=dtype):
                    y = module(leaf)
                y.float().sum().backward()
                dtypes.append((y.dtype, leaf.grad.dtype))
            assert dtypes[0] == dtypes[1]


def test_clip_grad_norm_error_if_nonfinite_after_the_kernels_backward():
    """A NaN in one key reaches the kernels' gradients as torch's: clip_grad_norm_(error_if_nonfinite=True)
    raises; with clean inputs it returns torch's norm."""
    q, k, v = (torch.randn(1, 2, 9, 8).requires_grad_() for _ in range(3))
    kernels.attention(q, k.detach().clone().index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(4)),
                                                       torch.tensor(math.nan)), v).sum().backward()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_([q, v], 1.0, error_if_nonfinite=True)
    grads = []
    for fn in (kernels.attention, reference.attention):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves, causal=True).pow(2).sum().backward()
        grads.append(torch.nn.utils.clip_grad_norm_(leaves, 1.0, error_if_nonfinite=True))
    torch.testing.assert_close(grads[0], grads[1])


@triton.jit
def _round_to_bf16(X, Y, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(Y + offsets, cast_rne(tl.load(X + offsets), tl.bfloat16))


@pytest.mark.skipif(not kernels.INTERPRETED, reason="the rounding by hand runs only in the interpreter")
def test_rounding_to_bf16_by_hand_keeps_every_nan():
    """The round-to-nearest-even carry turned NaNs with high mantissa bits into +-0 (0x7FFFFFFF, 0xFFFFFFFF)."""
    bits = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800000, -0x800000, 0x3F808000, 0x3F818000, 0x3F810000],
                        dtype=torch.int32)
    y = torch.empty(8, dtype=torch.bfloat16)
    _round_to_bf16[(1,)](bits.view(torch.float32), y, 8)
    assert y[:3].isnan().all()
    # ties to even: 1 + 2^-8 down, 1 + 3 * 2^-8 up; 1 + 2^-7 is a bf16
    assert y[3:].tolist() == [float("inf"), float("-inf"), 1.0, 1.015625, 1.0078125]
