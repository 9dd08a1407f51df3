"""kernels.layer_norm / rms_norm / add_* and the LayerNorm / RMSNorm modules against float64 math and torch: every
dtype, odd widths, multi-dim normalized shapes, optional affine parameters, every gradient, the two-pass path for
wide rows, the fused residual, RMS norm's offset and casting modes, state_dict round-trips, bad input, mixed dtypes
and autocast, torch's own ops for what the kernels do not take, forward-mode AD, and that the kernels really run."""
import importlib
import multiprocessing
import types
import warnings
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import kernels
from kernels import _rows as rows_module, reference
from conftest import _forbidden, free_port
from tolerance import BACKWARD, assert_close, max_error

norm_module = importlib.import_module("kernels.layernorm")
_TORCH_NORM = norm_module._torch_norm  # captured at import: rows_kernel_only makes it raise
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.usefixtures("rows_kernel_only")


def _reference(rms, h, shape, weight, bias, eps, offset=0.0, casting_mode=None):
    """Exact math (the casting modes differ only in rounding): pass float64 tensors."""
    if rms:
        return reference.rms_norm(h, shape, weight if weight is None else offset + weight, eps)
    return reference.layer_norm(h, shape, weight, bias, eps)


def _in_mode(h, shape, weight, eps, offset, casting_mode):
    """RMS norm rounded as each casting mode's model computes it in h's dtype (Hugging Face's Llama and Gemma
    RMSNorms, and plain low-precision ops for "none"): the same-precision yardstick for that mode."""
    dims = tuple(range(-len(shape), 0))
    if casting_mode == "none":  # rsqrt rounded once (torch's own fp16/bf16 rsqrt on CPU can be an ulp off)
        return h * torch.rsqrt(((h * h).mean(dims, keepdim=True) + eps).float()).to(h.dtype) * (offset + weight)
    wide = h.float()
    normed = wide * torch.rsqrt(wide.pow(2).mean(dims, keepdim=True) + eps)
    if casting_mode == "llama":
        return ((offset + weight.float()) * normed.to(h.dtype)).to(h.dtype)
    return (normed * (offset + weight.float())).to(h.dtype)


def _torch(rms, h, shape, weight, bias, eps, offset=0.0, casting_mode=None):
    if rms and casting_mode is not None:
        return _in_mode(h, shape, weight, eps, offset, casting_mode)
    if rms:
        return F.rms_norm(h, shape, weight, eps)
    return F.layer_norm(h, shape, weight, bias, eps)


def check_norm(rms, x, shape, affine=("weight", "bias"), residual=False, eps=1e-5, **options):
    """Kernel vs float64 reference vs torch in x's dtype: y, the new residual, and every input's gradient.

    A default RMS eps (None) is the computation dtype's (fp32's for fp16/bf16), as torch's; the float64 reference is
    given that same value. ``options``: RMS norm's offset and casting_mode, passed to the kernel and to the
    same-precision yardstick.
    """
    n = shape if isinstance(shape, tuple) else (shape,)
    inputs = {"x": x, "residual": torch.randn_like(x) if residual else None,
              "weight": torch.randn(n, dtype=x.dtype) if "weight" in affine else None,
              "bias": torch.randn(n, dtype=x.dtype) if "bias" in affine and not rms else None}
    present = {k: v for k, v in inputs.items() if v is not None}
    runs = {}
    for name, cast in (("kernel", lambda t: t), ("float64", torch.Tensor.double), ("torch", lambda t: t)):
        leaves = {k: cast(v.detach()).requires_grad_() for k, v in present.items()}
        x_, r_, w_, b_ = (leaves.get(k) for k in ("x", "residual", "weight", "bias"))
        ref_eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps if rms and eps is None else eps
        if name == "kernel":
            if residual:
                fn = kernels.add_rms_norm if rms else kernels.add_layer_norm
                y, h = fn(x_, r_, shape, w_, eps=eps, **options) if rms else fn(x_, r_, shape, w_, b_, eps)
            else:
                y = (kernels.rms_norm(x_, shape, w_, eps, **options) if rms
                     else kernels.layer_norm(x_, shape, w_, b_, eps))
                h = x_
        else:
            h = x_ + r_ if residual else x_
            y = (_reference if name == "float64" else _torch)(rms, h, n, w_, b_, ref_eps, **options)
        runs[name] = (y, h, leaves)
    (y, h, leaves), (y64, h64, leaves64), (y_pt, h_pt, leaves_pt) = runs.values()
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y64, y_pt, name="y")
    if residual:
        assert torch.equal(h, h_pt), "new residual differs from x + residual in x's dtype"
    dy, dh = torch.randn_like(y), torch.randn_like(y)
    for y_, h_ in ((y, h), (y64, h64), (y_pt, h_pt)):
        outs = (y_, h_) if residual else (y_,)
        torch.autograd.backward(outs, [g.to(y_.dtype) for g in (dy, dh)[:len(outs)]])
    for k in present:
        assert leaves[k].grad.dtype == present[k].dtype
        assert_close(leaves[k].grad, leaves64[k].grad, leaves_pt[k].grad, BACKWARD, name=f"d{k}")


@pytest.fixture
def two_pass(monkeypatch):
    """Lower the block limits so rows wider than 32 take the two-pass path with 16-wide chunks."""
    monkeypatch.setattr(norm_module, "MAX_BLOCK", 32)
    monkeypatch.setattr(norm_module, "LONG_BLOCK", 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("width", [1, 7, 1000, 4099])
def test_odd_widths(dtype, rms, width):
    check_norm(rms, torch.randn(5, width, dtype=dtype) * 2 + 0.5, width, eps=1e-5 if width > 1 else 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("affine", [(), ("weight",), ("bias",)])
def test_3d_input_two_normalized_dims_and_affine_options(dtype, rms, affine):
    check_norm(rms, torch.randn(3, 5, 6, 10, dtype=dtype), (6, 10), affine=affine, eps=None if rms else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
def test_fused_residual(dtype, rms):
    check_norm(rms, torch.randn(2, 19, 96, dtype=dtype), 96, residual=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_two_pass_path_at_small_widths(two_pass, dtype, rms, residual):
    assert norm_module._config(50)[1] is False
    check_norm(rms, torch.randn(9, 50, dtype=dtype) * 3 - 1, 50, residual=residual)


@pytest.mark.parametrize("rms", [False, True])
def test_rows_one_block_forward_two_pass_backward(monkeypatch, rms):
    """Rows between the backward's one-block limit and the forward's: the forward holds them in one block."""
    monkeypatch.setattr(norm_module, "BACKWARD_MAX_BLOCK", 32)
    monkeypatch.setattr(norm_module, "LONG_BLOCK", 16)
    assert norm_module._config(50)[1] and not norm_module._config(50, backward=True)[1]
    check_norm(rms, torch.randn(9, 50, dtype=torch.bfloat16), 50, residual=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
def test_aligned_rows_stay_one_block_both_ways(monkeypatch, dtype, rms):
    """A width that is a multiple of 16 (VECTOR_ALIGNMENT: 128-bit loads) holds a MAX_BLOCK row in one block
    backward too, and its forward programs share weight and bias across their rows; an unaligned width as wide
    keeps the narrower limits (two-pass backward, a program a row forward). Limits lowered: 48 aligned, 47 not."""
    monkeypatch.setattr(norm_module, "MAX_BLOCK", 64)
    monkeypatch.setattr(norm_module, "BACKWARD_MAX_BLOCK", 32)
    monkeypatch.setattr(norm_module, "MULTI_ROW_MAX_BLOCK", 32)
    monkeypatch.setattr(norm_module, "LONG_BLOCK", 16)
    assert norm_module._multi_row(48) and norm_module._config(48, backward=True)[1]
    assert not norm_module._multi_row(47) and not norm_module._config(47, backward=True)[1]
    for width in (47, 48):
        check_norm(rms, torch.randn(9, width, dtype=dtype) * 2 - 1, width, residual=True)


def test_gpu_check_launches_each_norm_build_with_its_own_specialisation():
    """``make gpu-check`` runs every NVIDIA-table norm build at a width that launches exactly it: aligned builds
    (``n_cols`` declared divisible by 16) at an aligned width, so the GPU checks the multi-row forward and the
    one-block backward of aligned 8192-wide rows (an odd width would run the unaligned path instead)."""
    from benchmarks import gpu_check
    from kernels.registry import all_builds

    norm_builds = [b for b in gpu_check.row_builds(all_builds()) if b.kernel.startswith("_norm") and 80 in b.families]
    for build in norm_builds:
        width = gpu_check.row_width(build)
        backward = build.kernel == "_norm_bwd"
        block, single, num_warps, multi_row, _, _ = norm_module._plan(width, backward, 32)
        assert (width % 16 == 0) == ("n_cols" in build.divisible_by_16), build.label
        assert (block, single, num_warps) == (build.constexprs["BLOCK"], build.constexprs["SINGLE"], build.num_warps)
        assert backward or multi_row == build.constexprs["MULTI_ROW"], build.label
    assert any(b.constexprs["BLOCK"] == norm_module.MAX_BLOCK and "n_cols" in b.divisible_by_16 for b in norm_builds)


@pytest.mark.parametrize("rms", [False, True])
def test_hidden_size_5120_is_one_block_both_ways(rms):
    """A real aligned hidden size masked inside the 8192 block: several rows a program forward, one block
    backward, at the float64 rule."""
    assert norm_module._multi_row(5120) and norm_module._config(5120, backward=True) == (8192, True, 16)
    check_norm(rms, torch.randn(9, 5120, dtype=torch.bfloat16), 5120, residual=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_size_wider_than_one_block(dtype):
    width = norm_module.MAX_BLOCK + 1808
    assert norm_module._config(width)[1] is False
    check_norm(False, torch.randn(2, width, dtype=dtype), width, residual=True)


@pytest.mark.parametrize("path", ["one block", "two pass"])
def test_large_mean_is_stable(monkeypatch, path):
    """Statistics from E[x^2] - E[x]^2 would lose every digit here; the kernels must stay within torch's error."""
    if path == "two pass":
        monkeypatch.setattr(norm_module, "MAX_BLOCK", 32)
        monkeypatch.setattr(norm_module, "LONG_BLOCK", 16)
    check_norm(False, torch.randn(4, 77) * 0.01 + 3000.0, 77)


MODES = list(norm_module.CASTING_MODES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("casting_mode", MODES)
@pytest.mark.parametrize("width,offset,residual", [(7, 0.0, False), (301, 1.0, True)])
def test_rms_casting_modes_and_offset(dtype, casting_mode, width, offset, residual):
    check_norm(True, torch.randn(6, width, dtype=dtype) * 2, width, residual=residual, eps=1e-6, offset=offset,
               casting_mode=casting_mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("casting_mode", MODES)
def test_rms_casting_modes_on_the_two_pass_path(two_pass, dtype, casting_mode):
    check_norm(True, torch.randn(5, 50, dtype=dtype), 50, residual=True, offset=1.0, casting_mode=casting_mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_each_casting_mode_rounds_where_its_model_does(monkeypatch, dtype):
    """Each mode's output is its own model's rounding, bit for bit but for rare ties (rstd summed in another order),
    and visibly not another mode's; the torch fallback of each mode computes exactly what the kernel does."""
    x, w = torch.randn(12, 157, dtype=dtype) * 2, torch.randn(157, dtype=dtype)
    for offset in (0.0, 1.0):
        got = {m: kernels.rms_norm(x, 157, w, 1e-6, offset=offset, casting_mode=m) for m in MODES}
        with monkeypatch.context() as m:
            m.setattr(norm_module, "kernel_runs_on", lambda *tensors: False)
            m.setattr(norm_module, "_torch_norm", _TORCH_NORM)
            fallback = {m: kernels.rms_norm(x, 157, w, 1e-6, offset=offset, casting_mode=m) for m in MODES}
        for mode in MODES:
            mismatch = {m: (got[mode] != _in_mode(x, (157,), w, 1e-6, offset, m)).float().mean().item() for m in MODES}
            assert mismatch.pop(mode) < 0.01 and min(mismatch.values()) > 0.1, (mode, offset, mismatch)
            assert (got[mode] != fallback[mode]).float().mean().item() < 0.01


def test_llama_mode_weight_gradient_uses_the_rounded_xhat():
    """Llama multiplies the weight by xhat rounded to x's dtype, so dweight sums dy times that rounded xhat (as
    Liger-Kernel); the other modes sum dy * xhat in fp32. An fp32 weight keeps dweight's difference visible."""
    x, dy = torch.randn(24, 157, dtype=torch.bfloat16), torch.randn(24, 157, dtype=torch.bfloat16)
    x64 = x.double()
    xhat = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    sums = {"rounded": (dy.double() * xhat.to(torch.bfloat16).double()).sum(0), "exact": (dy.double() * xhat).sum(0)}
    for mode, expected, other in (("llama", "rounded", "exact"), ("gemma", "exact", "rounded")):
        w = torch.randn(157, requires_grad=True)
        kernels.rms_norm(x, 157, w, 1e-6, casting_mode=mode).backward(dy)
        error = max_error(w.grad, sums[expected])
        assert error < 1e-4 and error * 10 < max_error(w.grad, sums[other]), mode


@pytest.mark.parametrize("rms", [False, True])
def test_forward_mode_ad_gives_torch_tangents(rms):
    """torch.func.jvp through every input (x, residual, weight, bias) and torch.autograd.forward_ad on x alone:
    the tangents torch's own ops give (the custom op alone would give a silent zero)."""
    primals = (torch.randn(5, 19), torch.randn(5, 19), torch.randn(19), torch.randn(19))
    tangents = tuple(torch.randn_like(p) for p in primals)
    if rms:
        def ours(x, r, w, _):
            return kernels.add_rms_norm(x, r, 19, w, 1e-6, offset=1.0, casting_mode="llama")

        def theirs(x, r, w, _):
            return F.rms_norm(x + r, (19,), 1.0 + w, 1e-6), x + r
    else:
        def ours(x, r, w, b):
            return kernels.add_layer_norm(x, r, 19, w, b)

        def theirs(x, r, w, b):
            return F.layer_norm(x + r, (19,), w, b), x + r
    (got, got_tangents), (want, want_tangents) = (torch.func.jvp(f, primals, tangents) for f in (ours, theirs))
    for a, b in zip(got + got_tangents, want + want_tangents):
        torch.testing.assert_close(a, b)
    fn = kernels.rms_norm if rms else kernels.layer_norm
    _, expected = torch.func.jvp(lambda x: fn(x, 19), primals[:1], tangents[:1])
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(fn(forward_ad.make_dual(primals[0], tangents[0]), 19)).tangent
    torch.testing.assert_close(tangent, expected)


def _written_out_norm(rms: bool, n: int):
    """(x, residual, weight, bias) -> y of the add_* norms in the written-out torch ops of ``kernels.reference``,
    which every transform differentiates exactly (torch's F.layer_norm treats mean and rstd as constants when
    reverse mode differentiates its tangent)."""
    if rms:
        return lambda x, r, w, _: reference.rms_norm(x + r, n, 1.0 + w, 1e-6)
    return lambda x, r, w, b: reference.layer_norm(x + r, n, w, b)


def _ours_norm(rms: bool, n: int):
    if rms:
        return lambda x, r, w, _: kernels.add_rms_norm(x, r, n, w, 1e-6, offset=1.0)[0]
    return lambda x, r, w, b: kernels.add_layer_norm(x, r, n, w, b)[0]


@pytest.mark.parametrize("rms", [False, True])
def test_reverse_mode_through_a_tangent_matches_float64(rms):
    """The gradient of a JVP-based loss sum(c * J v) in x, residual, weight and bias (torch.func.grad of jvp, and
    .backward() of a forward_ad tangent), against the written-out norm's in float64 within the rule: RMS norm's
    x gradient was off by up to 2 (its jvp read the saved rstd, which has no graph)."""
    n = 19
    primals = (torch.randn(5, n), torch.randn(5, n), torch.randn(n), torch.randn(n))
    tangents = tuple(torch.randn_like(p) for p in primals)
    c = torch.randn(5, n)

    def grads(fn, dtype):
        def loss(*ps):
            return (torch.func.jvp(fn, ps, tuple(t.to(dtype) for t in tangents))[1] * c.to(dtype)).sum()
        return torch.func.grad(loss, argnums=(0, 1, 2, 3))(*(p.to(dtype) for p in primals))

    got = grads(_ours_norm(rms, n), torch.float32)
    want = grads(_written_out_norm(rms, n), torch.float64)
    same = grads(_written_out_norm(rms, n), torch.float32)
    for name, g, w, t in zip(("x", "residual", "weight", "bias"), got, want, same):
        if rms and name == "bias":
            continue
        assert_close(g, w, t, BACKWARD, name=name)
    leaf = primals[0].clone().requires_grad_()
    with forward_ad.dual_level():
        dual = _ours_norm(rms, n)(forward_ad.make_dual(leaf, tangents[0]), *primals[1:])
        (forward_ad.unpack_dual(dual).tangent * c).sum().backward()
    only_x = torch.func.grad(lambda x: (torch.func.jvp(lambda y: _ours_norm(rms, n)(y, *primals[1:]), (x,),
                                                       tangents[:1])[1] * c).sum())(primals[0])
    torch.testing.assert_close(leaf.grad, only_x)


@pytest.mark.parametrize("rms", [False, True])
def test_a_jvp_of_a_jvp_gives_the_second_order_tangent(torch_ops_allowed, rms):
    """jvp(jvp(norm)): the written-out norm's second-order tangent (it came out all zeros: torch gives a Function's
    jvp no tangent of its saved tensors at the outer level; such calls now run torch's ops)."""
    n = 11
    primals = (torch.randn(3, n), torch.randn(3, n), torch.randn(n), torch.randn(n))
    tangents = tuple(torch.randn_like(p) for p in primals)

    def second(fn):
        def tangent(*ps):
            return torch.func.jvp(fn, ps, tangents)[1]
        return torch.func.jvp(tangent, primals, tangents)[1]

    got, want = second(_ours_norm(rms, n)), second(_written_out_norm(rms, n))
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["add_layer_norm", "add_rms_norm", "LayerNorm", "RMSNorm"])
def test_h_needs_grad_only_where_x_or_the_residual_does(name):
    """h = x + residual has no path to the weight or bias: with only the weight requiring grad it needs none, as
    torch's add (it had a FusedNorm grad_fn, so a norm-only fine-tune carried a graph down the residual stream),
    and it does once x or the residual needs one, with torch's gradients."""
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    if name in ("LayerNorm", "RMSNorm"):
        module = getattr(kernels, name)(8)
        call, params = (lambda a, b: module(a, b)), list(module.parameters())
    else:
        w = torch.randn(8, requires_grad=True)
        fn = getattr(kernels, name)
        call, params = (lambda a, b: fn(a, b, 8, w)), [w]
    y, h = call(x, r)
    assert y.requires_grad and not h.requires_grad and h.grad_fn is None
    y.sum().backward()
    assert all(p.grad is not None for p in params)
    for which in (0, 1):
        leaves = [x.clone(), r.clone()]
        leaves[which].requires_grad_()
        y, h = call(*leaves)
        assert h.requires_grad
        (y.sum() + (h * h).sum()).backward()
        expected = 2 * (x + r)  # y's part added below: the kernels' dy through h, compared with torch's
        y_only = leaves[which].grad - expected
        check = [t.clone() for t in (x, r)]
        check[which].requires_grad_()
        call(*check)[0].sum().backward()
        torch.testing.assert_close(y_only, check[which].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rms", [False, True])
def test_float64_parameters_with_a_float32_input_give_the_mixed_result(torch_ops_allowed, rms):
    """A float64 weight or bias with an fp32 input (and an fp32 weight with a float64 input): computed in float64,
    output in the input's dtype, each gradient in its tensor's dtype. layer_norm raised torch's 'mixed dtype (CPU)'
    RuntimeError, which named no argument, where rms_norm and the README's promise took them."""
    fn = kernels.rms_norm if rms else kernels.layer_norm
    for x_dtype, w_dtype in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        x = torch.randn(4, 8, dtype=x_dtype, requires_grad=True)
        w = torch.randn(8, dtype=w_dtype, requires_grad=True)
        params = (w,) if rms else (w, torch.randn(8, dtype=torch.float64, requires_grad=True))
        y = fn(x, 8, *params)
        assert y.dtype == x_dtype
        y.backward(torch.ones_like(y))
        assert [t.grad.dtype for t in (x, *params)] == [t.dtype for t in (x, *params)]
        written = reference.rms_norm if rms else reference.layer_norm
        want = written(x.detach().double(), 8, *(p.detach().double() for p in params))
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    if not rms:
        module = kernels.LayerNorm(8).double()
        assert module(torch.randn(3, 8)).dtype == torch.float32


def _forbid_kernels(monkeypatch):
    """Both ways into the kernels (the eager Function and the custom op) fail if called."""
    monkeypatch.setattr(norm_module, "_forward_op", None)
    monkeypatch.setattr(norm_module, "_norm_function", None)


def test_float64_and_meta_tensors_run_torch_own_ops_silently(torch_ops_allowed, monkeypatch):
    _forbid_kernels(monkeypatch)
    x, r = torch.randn(3, 9, dtype=torch.float64, requires_grad=True), torch.randn(3, 9, dtype=torch.float64)
    w, b = torch.randn(9, dtype=torch.float64, requires_grad=True), torch.randn(9, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = kernels.layer_norm(x, 9, w, b)
        assert torch.equal(y, F.layer_norm(x, (9,), w, b))
        grads = torch.autograd.grad(y.sum(), (x, w))
        for got, want in zip(grads, torch.autograd.grad(F.layer_norm(x, (9,), w, b).sum(), (x, w))):
            assert torch.equal(got, want)
        y, h = kernels.add_rms_norm(x, r, 9, w)
        assert torch.equal(h, x + r) and torch.equal(y, F.rms_norm(x + r, (9,), w))
        torch.testing.assert_close(kernels.rms_norm(x, 9, w, 1e-6, offset=1.0, casting_mode="llama"),
                                   reference.rms_norm(x, 9, 1.0 + w, 1e-6))
        meta = torch.empty(2, 4, 9, device="meta", dtype=torch.bfloat16)
        y, h = kernels.add_layer_norm(meta, meta, 9, torch.empty(9, device="meta"))
        assert y.device.type == h.device.type == "meta" and y.shape == h.shape == meta.shape
        assert kernels.RMSNorm(9, device="meta", dtype=torch.bfloat16)(meta).shape == meta.shape


def test_mixed_dtypes_add_in_the_dtype_torch_promotes_to():
    """bf16 x + fp32 residual (a bf16 branch added to an fp32 residual stream): h and y in fp32, as torch's add."""
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    r, w = torch.randn(4, 24, requires_grad=True), torch.randn(24)
    y, h = kernels.add_layer_norm(x, r, 24, w)
    assert y.dtype == h.dtype == torch.float32 and torch.equal(h, x.float() + r)
    torch.testing.assert_close(y, F.layer_norm(x.float() + r, (24,), w))
    grads = torch.autograd.grad((y * h).sum(), (x, r))
    want = torch.autograd.grad((F.layer_norm(x + r, (24,), w) * (x + r)).sum(), (x, r))
    for got, expected in zip(grads, want):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected)


def test_autocast_normalises_in_the_dtype_torch_would(monkeypatch, device):
    """CPU autocast leaves torch's norms in their input dtype, CUDA autocast runs them in fp32 (its fp32 list: the
    dispatcher says which); the kernels follow, shown on CPU by declaring it such a device."""
    for op in ("aten::layer_norm", "aten::rms_norm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCPU")
    x, r = (torch.randn(4, 24, dtype=torch.bfloat16, device=device) for _ in range(2))
    if device.type == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernels.layer_norm(x, 24).dtype == F.layer_norm(x, (24,)).dtype == torch.bfloat16
        monkeypatch.setattr(rows_module, "AUTOCAST_FP32_DEVICES", ("cpu",))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = kernels.rms_norm(x, 24)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, F.rms_norm(x.float(), (24,)))
        y, h = kernels.add_layer_norm(x, r, 24)
    assert h.dtype == torch.bfloat16 and torch.equal(h, x + r)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.layer_norm((x + r).float(), (24,)))


def test_rmsnorm_module_offset_casting_mode_and_initial_weight():
    module = kernels.RMSNorm(12, eps=1e-6, offset=1.0, casting_mode="llama", dtype=torch.bfloat16)
    assert torch.equal(module.weight, torch.zeros(12, dtype=torch.bfloat16))  # 1 - offset: scales by one
    assert "offset=1.0" in repr(module) and "casting_mode='llama'" in repr(module)
    assert list(module.state_dict()) == ["weight"]
    torch.nn.init.normal_(module.weight)
    x = torch.randn(3, 5, 12, dtype=torch.bfloat16)
    assert torch.equal(module(x), kernels.rms_norm(x, 12, module.weight, 1e-6, offset=1.0, casting_mode="llama"))
    y, h = module(x, x)
    assert torch.equal(y, module(x + x)) and torch.equal(h, x + x)
    assert torch.equal(kernels.RMSNorm(12).weight, torch.ones(12))


def test_weight_in_another_dtype_than_x():
    """bf16 activations with fp32 parameters: output in x's dtype, parameter gradients in theirs, as in torch."""
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    w = torch.randn(40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    y = kernels.layer_norm(x, 40, w, b)
    expected = F.layer_norm(x, (40,), w.detach(), b.detach())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, torch.full((40,), 6.0))


def test_strided_inputs_and_gradients():
    """Row-strided views are read in place, column-strided ones copied; a non-contiguous dy works too."""
    base = torch.randn(7, 40, requires_grad=True)
    x = base[:, 3:33]  # rows 40 apart: read in place
    xt = torch.randn(30, 7, requires_grad=True)  # .t(): columns 7 apart, copied
    w = torch.randn(60, requires_grad=True)[::2]
    y, h = kernels.add_layer_norm(x, xt.t(), 30, w)
    dy = torch.randn(30, 7).t()
    y.backward(dy)
    expected_h = x + xt.t()
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(y, F.layer_norm(expected_h, (30,), w))
    grads = [t.grad.clone() for t in (base, xt)]
    base.grad = xt.grad = None
    F.layer_norm(x + xt.t(), (30,), w).backward(dy)
    for got, t in zip(grads, (base, xt)):
        torch.testing.assert_close(got, t.grad)


def test_residual_gradients_reach_both_inputs():
    x = torch.randn(3, 24, requires_grad=True)
    r = torch.randn(3, 24, requires_grad=True)
    y, h = kernels.add_rms_norm(x, r, 24)
    (y.sum() + 2 * h.sum()).backward()
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    h2 = x2 + r2
    (F.rms_norm(h2, (24,)).sum() + 2 * h2.sum()).backward()
    for got, want in ((x.grad, x2.grad), (r.grad, r2.grad)):
        torch.testing.assert_close(got, want)


def test_only_the_requested_gradients_and_empty_batches():
    w = torch.randn(12, requires_grad=True)
    x = torch.randn(4, 12)
    kernels.layer_norm(x, 12, w).sum().backward()
    torch.testing.assert_close(w.grad, F.layer_norm(x, (12,)).sum(0))
    empty = torch.randn(0, 12, requires_grad=True)
    out = kernels.layer_norm(empty, 12, w)
    out.sum().backward()
    assert out.shape == (0, 12) and empty.grad.shape == (0, 12)


def check_drop_in(ours, theirs, x):
    """Same state_dict keys; weights load both ways and give torch's output; forward(x, residual) fuses the add."""
    for p in theirs.parameters():
        torch.nn.init.normal_(p)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x))
    for p in ours.parameters():
        torch.nn.init.normal_(p)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), theirs(x))
    y, h = ours(x, torch.ones_like(x))
    torch.testing.assert_close(y, theirs(x + 1))
    torch.testing.assert_close(h, x + 1)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layernorm_module_is_a_drop_in(affine, bias):
    ours = kernels.LayerNorm((4, 6), eps=1e-4, elementwise_affine=affine, bias=bias, dtype=torch.float32)
    theirs = torch.nn.LayerNorm((4, 6), eps=1e-4, elementwise_affine=affine, bias=bias)
    check_drop_in(ours, theirs, torch.randn(3, 4, 6))


@pytest.mark.parametrize("affine", [True, False])
def test_rmsnorm_module_is_a_drop_in(affine):
    ours = kernels.RMSNorm(10, eps=None, elementwise_affine=affine)
    theirs = torch.nn.RMSNorm(10, elementwise_affine=affine)
    check_drop_in(ours, theirs, torch.randn(2, 5, 10))


def test_bad_input_raises_before_launch(monkeypatch):
    _forbid_kernels(monkeypatch)
    x = torch.randn(3, 8)
    cases = [
        (TypeError, "input must be a torch.Tensor", lambda: kernels.layer_norm(x.tolist(), 8)),
        (TypeError, "input must have dtype", lambda: kernels.rms_norm(x.long(), 8)),
        (TypeError, "normalized_shape must be an int or a sequence", lambda: kernels.layer_norm(x, "8")),
        (ValueError, r"normalized_shape \(7,\)", lambda: kernels.layer_norm(x, 7)),
        (ValueError, "normalized_shape", lambda: kernels.layer_norm(x, (2, 3, 8))),
        (ValueError, r"normalized_shape \(\) must have at least one dim", lambda: kernels.rms_norm(x, ())),
        (ValueError, "weight must have shape", lambda: kernels.layer_norm(x, 8, torch.ones(4))),
        (TypeError, "bias must have dtype", lambda: kernels.layer_norm(x, 8, None, torch.ones(8, dtype=torch.int64))),
        (ValueError, "residual must have x's shape", lambda: kernels.add_layer_norm(x, x[:2], 8)),
        (TypeError, "residual must have dtype", lambda: kernels.add_rms_norm(x, x.int(), 8)),
        (ValueError, "casting_mode must be one of", lambda: kernels.rms_norm(x, 8, torch.ones(8), casting_mode="fp32")),
        (ValueError, "casting_mode must be one of", lambda: kernels.add_rms_norm(x, x, 8, casting_mode=None)),
        (ValueError, "casting_mode must be one of", lambda: kernels.RMSNorm(8, casting_mode="Llama")),
        (TypeError, "offset must be a real number", lambda: kernels.rms_norm(x, 8, torch.ones(8), offset=True)),
        (ValueError, "offset must be finite", lambda: kernels.rms_norm(x, 8, torch.ones(8), offset=float("nan"))),
        (TypeError, "eps must be a real number", lambda: kernels.rms_norm(x, 8, eps="small")),
        (TypeError, "eps must be a real number", lambda: kernels.layer_norm(x, 8, eps=None)),
        (ValueError, "eps must be >= 0", lambda: kernels.layer_norm(x, 8, eps=-1.0)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_kernel_path_is_taken(monkeypatch, device):
    """Both forwards and both backwards launch the Triton kernels, none falls back to torch's ops."""
    launches = []
    real_run = norm_module._direct.run
    recorder = types.SimpleNamespace(run=lambda jit, *a, **k: launches.append(jit) or real_run(jit, *a, **k))
    monkeypatch.setattr(norm_module, "_direct", recorder)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    y, h = kernels.add_layer_norm(x, x, 16, w)
    (y.sum() + kernels.rms_norm(h, 16, w).sum()).backward()
    assert launches == [norm_module._norm_fwd] * 2 + [norm_module._norm_bwd] * 2
    assert x.grad is not None and w.grad is not None


def test_fallback_when_the_kernels_cannot_run(torch_ops_allowed, monkeypatch):
    monkeypatch.setattr(norm_module, "kernel_runs_on", lambda *tensors: False)
    _forbid_kernels(monkeypatch)
    x, r, w, b = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(kernels.layer_norm(x, 8, w, b), F.layer_norm(x, (8,), w, b))
    y, h = kernels.add_rms_norm(x, r, 8, w)
    torch.testing.assert_close(y, F.rms_norm(x + r, (8,), w))
    assert kernels.layer_norm(x.bfloat16(), 8, w).dtype == torch.bfloat16


def test_custom_ops_pass_opcheck_and_compile_in_one_graph(device):
    x, r = (torch.randn(3, 4, 10, device=device, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(10, device=device, requires_grad=True) for _ in range(2))
    llama, gemma = norm_module.CASTING_MODES["llama"], norm_module.CASTING_MODES["gemma"]
    for args in [(x, r, w, b, 10, 1e-5, False, 0.0, gemma), (x, r, w, None, 10, 1e-6, True, 0.5, llama),
                 (x, None, None, b, 10, 0.0, False, 0.0, gemma)]:
        torch.library.opcheck(norm_module._forward_op, args)

    def step(a, c):
        y, h = kernels.add_layer_norm(a, c, 10, w, b)
        return (kernels.rms_norm(h, 10, w) * y).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, step):
        out = fn(x, r)
        out.backward()
        results.append([out.detach()] + [t.grad.clone() for t in (x, r, w, b)])
        for t in (x, r, w, b):
            t.grad = None
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_offset_without_a_weight_applies_none_as_liger():
    """Liger-Kernel's RMSNorm with elementwise_affine=False ignores its offset: y = x_hat, whatever the offset."""
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    for call in (lambda t: kernels.rms_norm(t, 8, None, 1e-6, offset=1.0, casting_mode="llama"),
                 kernels.RMSNorm(8, 1e-6, elementwise_affine=False, offset=1.0, casting_mode="llama")):
        y = call(x)
        (dx,) = torch.autograd.grad(y.float().square().sum(), x)
        x2 = x.detach().requires_grad_()
        want = F.rms_norm(x2, (8,), None, 1e-6)
        (want_dx,) = torch.autograd.grad(want.float().square().sum(), x2)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(dx, want_dx)
    assert kernels.RMSNorm(8, elementwise_affine=False, offset=1.0).weight is None


def _empty_case(name, x):
    """(kernel result, torch result) of op ``name`` on x (..., 0) with parameters of shape (0,)."""
    w, b, r = torch.randn(0), torch.randn(0), torch.randn_like(x)
    ours = {"layer_norm": lambda: kernels.layer_norm(x, (0,), w, b),
            "rms_norm": lambda: kernels.rms_norm(x, (0,), w, offset=1.0),
            "add_layer_norm": lambda: kernels.add_layer_norm(x, r, 0, w, b)[0],
            "add_rms_norm": lambda: kernels.add_rms_norm(x, r, 0, w)[0],
            "LayerNorm": lambda: kernels.LayerNorm(0)(x),
            "RMSNorm": lambda: kernels.RMSNorm(0)(x, r)[0]}[name]
    theirs = {"layer_norm": lambda: F.layer_norm(x, (0,), w, b), "rms_norm": lambda: F.rms_norm(x, (0,), 1 + w),
              "add_layer_norm": lambda: F.layer_norm(x + r, (0,), w, b),
              "add_rms_norm": lambda: F.rms_norm(x + r, (0,), w),
              "LayerNorm": lambda: torch.nn.LayerNorm(0)(x), "RMSNorm": lambda: torch.nn.RMSNorm(0)(x + r)}[name]
    return ours, theirs


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "LayerNorm", "RMSNorm"])
def test_an_empty_normalized_shape_gives_torch_empty_result(torch_ops_allowed, monkeypatch, name):
    """normalized_shape (0,): an empty output of x's shape and empty gradients, as torch's; no kernel launches."""
    _forbid_kernels(monkeypatch)
    x = torch.randn(4, 0, requires_grad=True)
    results = []
    for call in _empty_case(name, x):
        y = call()
        y.sum().backward()
        results.append((y, x.grad))
        x.grad = None
    (y, dx), (want, want_dx) = results
    assert y.shape == want.shape == (4, 0) and y.dtype == want.dtype and dx.shape == want_dx.shape == (4, 0)
    assert kernels.layer_norm(torch.randn(2, 0, 3), (0, 3)).shape == F.layer_norm(torch.randn(2, 0, 3), (0, 3)).shape


OVERFLOWS = [3e38, -3e38, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("path", ["one block", "two pass"])
def test_overflowing_statistics_give_what_torch_gives(monkeypatch, rms, path):
    """Rows holding +-3e38 (fp32 statistics overflow), +-inf or nan, beside a normal row: y is torch's (layer norm
    NaN; RMS norm 0, NaN at infinite entries), and so are dweight and dbias; dx is NaN wherever torch's is, and
    over the whole row (no finite garbage), the normal row's as torch's."""
    if path == "two pass":  # 7-wide rows in chunks of 4: torch's CPU layer norm gives NaN at this width
        monkeypatch.setattr(norm_module, "MAX_BLOCK", 4)
        monkeypatch.setattr(norm_module, "LONG_BLOCK", 4)
    x = torch.randn(2 * len(OVERFLOWS), 7)
    x[::2, 3] = torch.tensor(OVERFLOWS)
    inputs, dy = (x, torch.randn(7), torch.randn(7)), torch.randn_like(x)
    ours, theirs = ([t.clone().requires_grad_() for t in inputs] for _ in range(2))
    y = kernels.rms_norm(ours[0], 7, ours[1]) if rms else kernels.layer_norm(ours[0], 7, *ours[1:])
    want = F.rms_norm(theirs[0], (7,), theirs[1]) if rms else F.layer_norm(theirs[0], (7,), *theirs[1:])
    torch.testing.assert_close(y, want, equal_nan=True)
    y.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(ours[1].grad, theirs[1].grad, equal_nan=True)  # dweight
    if not rms:
        torch.testing.assert_close(ours[2].grad, theirs[2].grad, equal_nan=True)  # dbias
    dx, want_dx = ours[0].grad, theirs[0].grad
    assert want_dx[::2].isnan().any(-1).all() and dx[::2].isnan().all()
    torch.testing.assert_close(dx[1::2], want_dx[1::2])


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("x_dim", [0, 1, 2, None])  # rows sharded (data/sequence parallel), hidden (tensor), replicated
def test_dtensor_inputs_normalise_local_rows_as_torch_places_them(mesh, rms, x_dim):
    """DTensor x and residual with replicated DTensor parameters: y, h and every gradient hold torch's values on
    the full tensors; y keeps a sharding of the rows and gathers a sharded hidden dim (as torch's layer_norm on
    DTensors), parameter gradients are Partial over row shards (each rank's rows add theirs) as torch's."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    rows_sharded = x_dim in (0, 1)
    x_placements, y_placements = ([Shard(x_dim) if x_dim is not None else Replicate()],
                                  [Shard(x_dim) if rows_sharded else Replicate()])
    full = [torch.randn(2, 5, 12), torch.randn(2, 5, 12), torch.randn(12), torch.randn(12)]
    placements = [x_placements, x_placements, [Replicate()], [Replicate()]]
    leaves = [distribute_tensor(t, mesh, p).requires_grad_() for t, p in zip(full, placements)]
    x, r, w, b = leaves
    y, h = kernels.add_rms_norm(x, r, 12, w) if rms else kernels.add_layer_norm(x, r, 12, w, b)
    (y * h).sum().backward()
    full = [t.requires_grad_() for t in full]
    want_h = full[0] + full[1]
    want = F.rms_norm(want_h, (12,), full[2]) if rms else F.layer_norm(want_h, (12,), *full[2:])
    (want * want_h).sum().backward()
    assert list(y.placements) == list(h.placements) == y_placements
    grads = [(t.grad, u.grad) for t, u in zip(leaves, full) if u.grad is not None]
    for got, expected in [(y, want), (h, want_h)] + grads:
        torch.testing.assert_close(got.full_tensor(), expected)
    assert list(w.grad.placements) == [Partial() if rows_sharded else Replicate()]
    assert list(kernels.RMSNorm(12)(x).placements) == y_placements


def _two_rank_dtensor_case(rank, port, results):
    """One rank of a 2-rank gloo group: rows and hidden-dim shardings of x against torch on the full tensors; puts
    None (passed) or the traceback on ``results``."""
    import traceback

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    norm_module._torch_norm = _forbidden("torch's ops (the norms' fallback)")  # (a spawned process: no fixture)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)
        full = [t.requires_grad_() for t in (torch.randn(4, 3, 10), torch.randn(10), torch.randn(10))]
        want = F.layer_norm(full[0], (10,), *full[1:])
        (want * want).sum().backward()
        for x_placement in (Shard(0), Shard(2)):
            x = distribute_tensor(full[0].detach(), mesh, [x_placement]).requires_grad_()
            w, b = (distribute_tensor(t.detach(), mesh, [Replicate()]).requires_grad_() for t in full[1:])
            y = kernels.layer_norm(x, 10, w, b)
            (y * y).sum().backward()
            for got, expected in [(y, want)] + [(t.grad, u.grad) for t, u in zip((x, w, b), full)]:
                torch.testing.assert_close(got.full_tensor(), expected)
        results.put((rank, None))
    except Exception:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_dtensor_norm_on_two_gloo_ranks():
    """Two processes on 127.0.0.1: each rank's rows (Partial parameter gradients summed over the ranks) and a
    gathered hidden dim give torch's values on the full tensors; bounded by a timeout, processes always reaped."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    results = context.Queue()
    ranks = [context.Process(target=_two_rank_dtensor_case, args=(rank, port, results)) for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        outcomes = dict(results.get(timeout=180) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    assert outcomes == {0: None, 1: None}, outcomes
