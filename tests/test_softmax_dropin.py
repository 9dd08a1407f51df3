"""kernels.softmax / log_softmax as a drop-in for torch.softmax / torch.log_softmax: float64, the output's and the
gradient's layout (contiguous, as torch's), ``causal`` and ``scale`` checked as attention checks them, and
``dtype=`` from an integer x."""
import importlib

import numpy as np
import pytest
import torch

import kernels
from test_softmax import _torch_softmax, check_against_reference

softmax_module = importlib.import_module("kernels.softmax")  # `kernels.softmax` itself is the function


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if a kernel launches."""
    monkeypatch.setattr(softmax_module, "_launch", lambda *a, **k: pytest.fail("kernel launched"))


def _grad(fn, x, dy):
    """(fn(x), d fn(x) / dx for the upstream gradient ``dy``), the gradient as autograd returns it (no .grad
    layout contract)."""
    x = x.detach().requires_grad_()
    y = fn(x)
    return y, torch.autograd.grad(y, x, dy)[0]


@pytest.mark.parametrize("causal,log", [(False, False), (True, False), (False, True)])
def test_float64_runs_torchs_ops_with_scale_and_mask(device, no_launch, causal, log):
    """float64 raised TypeError (the norms run torch's ops for it): now torch's ops in float64, scale and causal
    mask kept, gradients through torch's autograd; ``dtype=torch.float64`` likewise from an fp32 x."""
    x = torch.randn(2, 3, 5, dtype=torch.float64, device=device)
    x[0, 1] = -float("inf")  # an all -inf row: NaN, as torch
    dy = torch.randn_like(x)
    ours = (lambda t: kernels.log_softmax(t, scale=-0.7)) if log else (
        lambda t: kernels.softmax(t, scale=-0.7, causal=causal))
    y, dx = _grad(ours, x, dy)
    want, want_dx = _grad(lambda t: _torch_softmax(t, -1, -0.7, causal, log), x, dy)
    assert y.dtype == dx.dtype == torch.float64
    torch.testing.assert_close(y, want, equal_nan=True)
    torch.testing.assert_close(dx, want_dx, equal_nan=True)
    x32 = torch.randn(3, 4, device=device)
    fn = kernels.log_softmax if log else kernels.softmax
    y, dx = _grad(lambda t: fn(t, 0, dtype=torch.float64), x32, torch.ones(3, 4, dtype=torch.float64))
    assert y.dtype == torch.float64 and dx.dtype == torch.float32
    torch.testing.assert_close(y, (torch.log_softmax if log else torch.softmax)(x32.double(), 0))


def _layouts(device):
    """Inputs of shape (3, 4, 6) in the layouts users pass: contiguous, permuted, channels-last-like, non-dense
    (a step of 2) and expanded (stride 0)."""
    return {"contiguous": torch.randn(3, 4, 6, device=device),
            "permuted": torch.randn(3, 6, 4, device=device).transpose(1, 2),
            "dim 0 innermost": torch.randn(6, 4, 3, device=device).permute(2, 1, 0),
            "non-dense": torch.randn(3, 4, 12, device=device)[..., ::2],
            "expanded": torch.randn(1, 4, 6, device=device).expand(3, 4, 6)}


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_output_and_gradient_are_laid_out_as_torchs(device, log, dim):
    """kernels.softmax(x, dim=0) of a contiguous x came back with dim 0 innermost in memory, so ``.view`` of it
    failed where torch's result (always contiguous: its meta function's layout) views fine; its gradient too."""
    ours, theirs = (kernels.log_softmax, torch.log_softmax) if log else (kernels.softmax, torch.softmax)
    dy = torch.randn(3, 6, 4, device=device).transpose(1, 2)  # an upstream gradient in another layout
    for name, x in _layouts(device).items():
        y, dx = _grad(lambda t: ours(t, dim, scale=0.5), x, dy)
        want, want_dx = _grad(lambda t: theirs(t * 0.5, dim), x, dy)
        assert y.stride() == want.stride() and dx.stride() == want_dx.stride(), name
        torch.testing.assert_close(y.view(-1), want.view(-1))
        torch.testing.assert_close(dx, want_dx)


@pytest.mark.parametrize("shape,dim", [((3, 0), 0), ((0, 4, 2), 1), ((2, 0, 3), -1)])
def test_empty_tensors_are_laid_out_as_torchs(device, shape, dim):
    """An empty x along a dim that is not last came back with that dim's strides moved last."""
    x = torch.randn(shape, device=device)
    for ours, theirs in ((kernels.softmax, torch.softmax), (kernels.log_softmax, torch.log_softmax)):
        y, want = ours(x, dim), theirs(x, dim)
        assert y.shape == want.shape and y.stride() == want.stride()


@pytest.mark.parametrize("shape", [(2, 6, 4), (3, 2, 0), (0, 4)])
def test_torch_path_masks_as_the_reference(device, no_launch, shape):
    """The torch path (float64, vmap) masks causally by the reference's helper: zeros for rows that see no key
    (Nq > Nk), never NaN, and an empty result for rows of no column."""
    x = torch.randn(shape, dtype=torch.float64, device=device)
    want = kernels.reference.softmax(x, scale=-0.7, causal=True)
    torch.testing.assert_close(kernels.softmax(x, scale=-0.7, causal=True), want)
    batched = torch.vmap(lambda t: kernels.softmax(t, scale=-0.7, causal=True))(x[None].float())
    torch.testing.assert_close(batched[0], want.float())
    assert not want.isnan().any()


def test_gradients_of_strided_inputs_within_the_float64_rule(device):
    """Non-contiguous and expanded (stride-0) fp16 inputs along a dim that is not last: forward and gradient
    within the tolerance rule of torch's fp16 error."""
    base = torch.randn(1, 5, 33, dtype=torch.float16, device=device)
    check_against_reference(base.expand(3, 5, 33), dim=1, scale=1.3)
    check_against_reference(torch.randn(4, 70, 3, dtype=torch.float16, device=device)[:, ::2].transpose(0, 2), dim=1,
                            log=True)


@pytest.mark.parametrize("bad", ["yes", "False", [1], None, 0.5, torch.tensor(True)])
def test_causal_must_be_a_bool(device, no_launch, bad):
    """``causal="yes"`` or ``[1]`` were silently true (and "False" too): attention's rule now, a bool, numpy
    bool or int, else a TypeError naming causal."""
    with pytest.raises(TypeError, match="causal must be a bool"):
        kernels.softmax(torch.randn(3, 4, device=device), causal=bad)


def test_causal_takes_numpy_bools_and_ints(device):
    x = torch.randn(3, 4, device=device)
    want = kernels.softmax(x, causal=True)
    for flag in (np.bool_(True), 1, np.int64(1)):
        torch.testing.assert_close(kernels.softmax(x, causal=flag), want)
    torch.testing.assert_close(kernels.softmax(x, causal=0), torch.softmax(x, -1))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_non_finite_scale_raises_as_attentions(device, no_launch, scale):
    """scale=nan gave NaN rows silently (and inf rows of NaN and zeros). kernels.attention refuses a non-finite
    scale with a TypeError naming it (checks.check_scale); softmax's ``scale`` follows the same rule."""
    x = torch.randn(3, 4, device=device)
    for call in (lambda: kernels.softmax(x, scale=scale), lambda: kernels.log_softmax(x, scale=scale),
                 lambda: kernels.softmax(x.double(), scale=scale, causal=True)):
        with pytest.raises(TypeError, match="scale must be a finite real number"):
            call()


def test_scale_none_is_the_default(device):
    x = torch.randn(3, 4, device=device)
    torch.testing.assert_close(kernels.softmax(x, scale=None), torch.softmax(x, -1))


@pytest.mark.parametrize("x_dtype", [torch.int64, torch.bool, torch.float64])
def test_dtype_casts_an_integer_or_float64_x_as_torch(device, x_dtype):
    """torch.softmax(x, dim, dtype=torch.float32) takes an integer (or bool) x, cast first; ours raised TypeError.
    float64 x down to fp16 runs the kernel in fp16."""
    x = torch.randint(-3, 4, (3, 5), device=device).to(x_dtype)
    for ours, theirs in ((kernels.softmax, torch.softmax), (kernels.log_softmax, torch.log_softmax)):
        for dtype in (torch.float32, torch.float16):
            y = ours(x, 0, dtype=dtype)
            assert y.dtype == dtype
            torch.testing.assert_close(y, theirs(x, 0, dtype=dtype))
    with pytest.raises(TypeError, match="x must have dtype"):
        kernels.softmax(x.long())  # without dtype= an integer x is refused, as torch refuses it


def test_no_grad_inference_mode_and_inputs_without_grad(device):
    """Outputs of torch's values and layout, and no graph, under no_grad and inference_mode."""
    x = torch.randn(4, 3, device=device, requires_grad=True)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            y = kernels.softmax(x, 0)
        assert not y.requires_grad and y.is_contiguous()
        torch.testing.assert_close(y, torch.softmax(x.detach(), 0))
    assert not kernels.log_softmax(x.detach(), 0).requires_grad
