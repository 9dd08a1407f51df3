"""The row kernels' (softmax, layer/RMS norm) launch plans and their host path: what the GPU families compile, and
what every call costs and checks on the host before a launch."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from benchmarks import overhead, static

softmax_module = importlib.import_module("kernels.softmax")


def softmax_online_builds():
    """The softmax defaults on the online (multi-block) path, fp16, both kernels, every variant, NVIDIA table (the
    child process of the static report imports this by name)."""
    return [b for b in static.load_builds(static.PROVIDER) if b.kernel.startswith("_softmax")
            and not b.constexprs["SINGLE"] and b.dtype == "fp16" and 100 in b.families]


def test_softmax_online_chunks_compile_without_spills_on_sm100():
    """16 elements a thread (4096 on 8 warps) spilled 24 B in the fp16 online forward on sm_100; the online path
    takes 8 a thread (``python -m benchmarks static --kernel _softmax --defaults``: spill-free on sm_80, sm_90,
    sm_100 and gfx942)."""
    block, single, num_warps = softmax_module._config(softmax_module.MAX_BLOCK + 1)
    assert not single and block // (32 * num_warps) == softmax_module.ONLINE_PER_THREAD == 8
    records = static.run_report(archs=("sm_100",), provider="tests.test_rows_host_path:softmax_online_builds",
                                defaults_only=True)
    assert len(records) == 6 and all(r["default"] for r in records)
    assert [p for r in records for p in static.problems(r, calls_dot=False)] == []



def _aten_ops(call):
    """The aten ops of ``call`` with every launch stubbed out (the interpreter's own ops are not ours)."""
    from aten_ops import AtenOps  # here: the static report's child process imports this module without tests/
    with overhead.stubbed_launches(), AtenOps() as ops:
        call()
    return ops.names


@pytest.mark.parametrize("rms", [False, True])
def test_eager_norms_allocate_only_what_is_used(rms):
    """Forward: y and the statistics the backward reads (no empty h without a residual, no empty mean for RMS
    norm). Backward: dx, and per wanted parameter gradient one fp32 partial buffer, its sum and the cast to the
    parameter's dtype; no zero gradients materialised for mean, rstd or an unused h, no buffer for a frozen
    parameter."""
    x = torch.randn(6, 24, dtype=torch.float16, requires_grad=True)
    weight, bias = (torch.randn(24, dtype=torch.float16) for _ in range(2))

    def norm(w, b):
        return kernels.rms_norm(x, 24, w) if rms else kernels.layer_norm(x, 24, w, b)

    y = []
    assert _aten_ops(lambda: y.append(norm(weight, bias))) == ["empty_like"] + ["new_empty"] * (1 if rms else 2)
    grad = torch.ones_like(y[0])
    assert _aten_ops(lambda: torch.autograd.grad(y[0], x, grad)) == ["empty_like"]
    trained = [weight.requires_grad_(), None if rms else bias.requires_grad_()]
    y = norm(*trained)
    per_param = ["new_empty"] if rms else ["new_empty", "new_empty"]
    ops = _aten_ops(lambda: torch.autograd.grad(y, x, grad))
    assert ops == ["empty_like", *per_param] + ["sum"] * len(per_param) + ["_to_copy"] * len(per_param)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("used", ["y", "h", "y and h"])
def test_add_norm_gradients_when_only_some_outputs_reach_the_loss(device, rms, used):
    """Gradients are not materialised on the eager path: dy is None when only the new residual h reaches the loss
    (the backward takes dy = 0), dh is None when only y does; every gradient still matches float64's."""
    shape = (5, 3, 24)
    leaves = [torch.randn(*s, device=device) for s in (shape, shape, (24,), (24,))]
    g_y, g_h = torch.randn(shape, device=device), torch.randn(shape, device=device)

    def grads(fn, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        x, residual, weight, bias = tensors
        y, h = fn(x, residual, weight, bias)
        loss = ((y * g_y.to(y.dtype)).sum() if "y" in used else 0) + ((h * g_h.to(h.dtype)).sum() if "h" in used
                                                                      else 0)
        return torch.autograd.grad(loss, tensors[:3] if rms else tensors, allow_unused=True, materialize_grads=True)

    def ours(x, residual, weight, bias):
        if rms:
            return kernels.add_rms_norm(x, residual, 24, weight, 1e-6)
        return kernels.add_layer_norm(x, residual, 24, weight, bias)

    def torch_ops(x, residual, weight, bias):
        h = x + residual
        return (F.rms_norm(h, (24,), weight, 1e-6) if rms else F.layer_norm(h, (24,), weight, bias)), h

    # imported here: the static report's child process imports this module by name, without tests/ on its path
    from tolerance import BACKWARD, assert_close
    actual, same_precision = grads(ours, leaves), grads(torch_ops, leaves)
    expected = grads(torch_ops, [t.double() for t in leaves])
    for name, a, e, p in zip(("x", "residual", "weight", "bias"), actual, expected, same_precision):
        assert_close(a, e, p, BACKWARD, name=f"d{name}")


def test_a_norm_whose_outputs_get_no_gradient_returns_none():
    """An undefined gradient reaching both outputs (a consumer whose backward returns None): no launch, no
    gradient for any input."""

    class Cut(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.sum()

        @staticmethod
        def backward(ctx, grad):
            return None

    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)
    y = kernels.rms_norm(x, 8, weight)
    loss = Cut.apply(y) + x.sum()
    dx, dweight = torch.autograd.grad(loss, (x, weight), allow_unused=True)
    assert torch.equal(dx, torch.ones_like(x)) and dweight is None


@pytest.mark.parametrize("shape", [8, (8,), [8], torch.Size([8]), (2, 4)])
def test_norm_takes_every_form_of_normalized_shape(shape):
    x = torch.randn(3, 8)
    dims = (8,) if isinstance(shape, int) or len(shape) == 1 else tuple(shape)
    torch.testing.assert_close(kernels.layer_norm(x.view(3, *dims), shape), F.layer_norm(x.view(3, *dims), dims))


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(normalized_shape=(True,)), TypeError, "normalized_shape must be an int or a sequence of ints"),
    (dict(normalized_shape=8.0), TypeError, "normalized_shape must be an int or a sequence of ints"),
    (dict(eps=True), TypeError, "eps must be a real number"),
    (dict(eps="1e-5"), TypeError, "eps must be a real number"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (dict(offset=True), TypeError, "offset must be a real number"),
    (dict(offset="1"), TypeError, "offset must be a real number"),
    (dict(offset=float("inf")), ValueError, "offset must be finite"),
    (dict(weight=torch.ones(8, device="meta")), ValueError, "input, weight must share one device"),
])
def test_fast_checks_keep_every_error(kwargs, error, words):
    """The fast paths (plain int shapes, float eps and offset, parameters on x's device) leave every other input
    to the full checks and their messages."""
    arguments = dict(normalized_shape=8, weight=None, eps=None, offset=0.0)
    arguments.update(kwargs)
    with pytest.raises(error, match=words):
        kernels.rms_norm(torch.randn(2, 8), arguments.pop("normalized_shape"), arguments.pop("weight"), **arguments)


def test_fast_checks_take_ints_and_numpy_scalars():
    x, weight = torch.randn(2, 8), torch.randn(8)
    expected = F.rms_norm(x, (8,), 1 + weight, 0.0)
    torch.testing.assert_close(kernels.rms_norm(x, 8, weight, 0, offset=1), expected)
    torch.testing.assert_close(kernels.rms_norm(x, 8, weight, np.float64(0.0), offset=np.float32(1.0)), expected)


@pytest.mark.parametrize("op", ["softmax", "rms_norm"])
def test_a_dead_functorch_wrapper_is_unwrapped_as_function_apply_does(op, dead_wrapper):
    """The eager apply skips Function.apply's Python layer but keeps its unwrapping of dead functorch wrappers (a
    tensor a finished torch.func.grad left behind): the op sees the plain tensor, so its result tracks no
    gradient, as a plain autograd.Function's does."""
    x = torch.randn(3, 8)
    call = {"softmax": lambda t: kernels.softmax(t), "rms_norm": lambda t: kernels.rms_norm(t, 8)}[op]
    expected = torch.softmax(x, -1) if op == "softmax" else F.rms_norm(x, (8,))
    result = call(dead_wrapper(x))
    assert not result.requires_grad
    torch.testing.assert_close(result, expected)
