"""Regression tests of the row kernels (softmax, layer/RMS norm) as torch's users call them: second derivatives
(create_graph=True, torch.func.grad / jacrev), each against float64 torch within the tolerance rule."""
import pytest
import torch

import kernels
from kernels import reference
from tolerance import BACKWARD, assert_close

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")


def _torch_softmax(x, dim=-1, *, scale=1.0, causal=False, log=False):
    """torch's (log-)softmax of ``x * scale``; with ``causal``, kernels.softmax's bottom-right mask."""
    z = x * scale
    if causal:
        z = z.masked_fill(~reference.causal_mask(x.shape[-2], x.shape[-1], x.device), float("-inf"))
    return torch.log_softmax(z, dim) if log else torch.softmax(z, dim)


SOFTMAXES = {
    "softmax": (lambda x: kernels.softmax(x, 1, scale=0.7), lambda x: _torch_softmax(x, 1, scale=0.7)),
    "causal": (lambda x: kernels.softmax(x, scale=-1.3, causal=True),
               lambda x: _torch_softmax(x, scale=-1.3, causal=True)),
    "log_softmax": (lambda x: kernels.log_softmax(x, 0, scale=2.0), lambda x: _torch_softmax(x, 0, scale=2.0, log=True)),
}


def _gradient_penalty(fn, x, weights):
    """d/dx of |d/dx sum(weights * fn(x)^2)|^2: a second derivative through ``fn`` (create_graph=True)."""
    x = x.detach().requires_grad_()
    y = fn(x)
    (g,) = torch.autograd.grad((weights.to(y.dtype) * y * y).sum(), x, create_graph=True)
    (penalty_grad,) = torch.autograd.grad(g.pow(2).sum(), x)
    return penalty_grad


@pytest.mark.parametrize("name", SOFTMAXES)
def test_softmax_second_derivative(name, device):
    """Double backward through kernels.softmax / log_softmax: was silently wrong (the kernel's dx carried no graph,
    so the second derivative missed every term through the softmax's backward)."""
    ours, theirs = SOFTMAXES[name]
    x = torch.randn(2, 5, 7, device=device)
    weights = torch.randn(2, 5, 7, device=device)
    got = _gradient_penalty(ours, x, weights)
    assert_close(got, _gradient_penalty(theirs, x.double(), weights), _gradient_penalty(theirs, x, weights),
                 BACKWARD, name="second derivative")


@pytest.mark.parametrize("name", SOFTMAXES)
def test_softmax_torch_func_grad_and_jacrev(name, device):
    """torch.func.grad and jacrev run the backward on functorch's wrapped tensors: they crashed inside the Triton
    launcher (NotImplementedError: Cannot access storage of TensorWrapper)."""
    ours, theirs = SOFTMAXES[name]
    x = torch.randn(3, 4, 5, device=device)
    weights = torch.randn(3, 4, 5, device=device)
    for transform in (lambda f: torch.func.grad(lambda t: (weights.to(t.dtype) * f(t)).sum()), torch.func.jacrev):
        assert_close(transform(ours)(x), transform(theirs)(x.double()), transform(theirs)(x), BACKWARD)
