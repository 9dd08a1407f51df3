"""kernels.layer_norm / rms_norm / add_* and the LayerNorm / RMSNorm modules against float64 math and torch: every
dtype, odd widths, multi-dim normalized shapes, optional affine parameters, every gradient, the two-pass path for
wide rows, the fused residual, state_dict round-trips, bad input, and that the Triton kernels really run."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from tolerance import BACKWARD, assert_close

norm_module = importlib.import_module("kernels.layernorm")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference(rms, h, shape, weight, bias, eps):
    if rms:
        return reference.rms_norm(h, shape, weight, eps)
    return reference.layer_norm(h, shape, weight, bias, eps)


def _torch(rms, h, shape, weight, bias, eps):
    if rms:
        return F.rms_norm(h, shape, weight, eps)
    return F.layer_norm(h, shape, weight, bias, eps)


def check_norm(rms, x, shape, affine=("weight", "bias"), residual=False, eps=1e-5):
    """Kernel vs float64 reference vs torch in x's dtype: y, the new residual, and every input's gradient.

    A default RMS eps (None) is finfo(x.dtype).eps; the float64 reference is given that same value.
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
        ref_eps = torch.finfo(x.dtype).eps if rms and eps is None else eps
        if name == "kernel":
            if residual:
                fn = kernels.add_rms_norm if rms else kernels.add_layer_norm
                y, h = fn(x_, r_, shape, w_, eps=eps) if rms else fn(x_, r_, shape, w_, b_, eps)
            else:
                y = kernels.rms_norm(x_, shape, w_, eps) if rms else kernels.layer_norm(x_, shape, w_, b_, eps)
                h = x_
        else:
            h = x_ + r_ if residual else x_
            y = (_reference if name == "float64" else _torch)(rms, h, n, w_, b_, ref_eps)
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
    monkeypatch.setattr(norm_module, "_forward_op", None)  # any launch attempt fails differently
    x = torch.randn(3, 8)
    cases = [
        (TypeError, "x must be a torch.Tensor", lambda: kernels.layer_norm(x.tolist(), 8)),
        (TypeError, "x must have dtype", lambda: kernels.rms_norm(x.double(), 8)),
        (TypeError, "normalized_shape must be an int or a sequence", lambda: kernels.layer_norm(x, "8")),
        (ValueError, r"normalized_shape \(7,\)", lambda: kernels.layer_norm(x, 7)),
        (ValueError, "normalized_shape", lambda: kernels.layer_norm(x, (2, 3, 8))),
        (ValueError, "weight must have shape", lambda: kernels.layer_norm(x, 8, torch.ones(4))),
        (TypeError, "bias must have dtype", lambda: kernels.layer_norm(x, 8, None, torch.ones(8, dtype=torch.int64))),
        (ValueError, "residual must have x's shape", lambda: kernels.add_layer_norm(x, x[:2], 8)),
        (TypeError, "x, residual must share one dtype", lambda: kernels.add_rms_norm(x, x.half(), 8)),
        (TypeError, "eps must be a real number", lambda: kernels.rms_norm(x, 8, eps="small")),
        (TypeError, "eps must be a real number", lambda: kernels.layer_norm(x, 8, eps=None)),
        (ValueError, "eps must be >= 0", lambda: kernels.layer_norm(x, 8, eps=-1.0)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_kernel_path_is_taken(monkeypatch):
    monkeypatch.setattr(norm_module, "reference", None)
    monkeypatch.setattr(norm_module, "_fallback", lambda *a: pytest.fail("fell back to the reference"))
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y, h = kernels.add_layer_norm(x, x, 16, w)
    (y.sum() + kernels.rms_norm(h, 16, w).sum()).backward()
    assert x.grad is not None and w.grad is not None


def test_fallback_when_the_kernels_cannot_run(monkeypatch):
    monkeypatch.setattr(norm_module, "kernel_runs_on", lambda *tensors: False)
    monkeypatch.setattr(norm_module, "_forward_op", None)
    x, r, w, b = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(kernels.layer_norm(x, 8, w, b), F.layer_norm(x, (8,), w, b))
    y, h = kernels.add_rms_norm(x, r, 8, w)
    torch.testing.assert_close(y, F.rms_norm(x + r, (8,), w))
    assert kernels.layer_norm(x.bfloat16(), 8, w).dtype == torch.bfloat16


def test_custom_ops_pass_opcheck_and_compile_in_one_graph():
    x, r = torch.randn(3, 4, 10, requires_grad=True), torch.randn(3, 4, 10, requires_grad=True)
    w, b = torch.randn(10, requires_grad=True), torch.randn(10, requires_grad=True)
    for args in [(x, r, w, b, 10, 1e-5, False), (x, None, w, None, 10, 1e-6, True), (x, None, None, b, 10, 0.0, False)]:
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
