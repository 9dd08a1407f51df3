"""fp32 layer norm of rows whose mean is large next to their spread (mean/std 70-100), on the one-block and the
two-pass (chunked) paths, forward and backward, within the float64 rule against torch's fp32 error. A plain fp32
sum of such a row can be ulps of the mean off, which dividing by the small std magnifies (found by fuzzing:
~9x torch's error on one block, 8x on 63 merged chunks)."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from tolerance import BACKWARD, assert_close

norm_module = importlib.import_module("kernels.layernorm")


def _run(name, x, residual, weight, bias, dy, dh):
    """(y, [dx, dweight, dbias]) of the kernel ("kernel"), or of torch's layer norm on h = x + residual rounded
    to fp32 (as the kernel's h), in float64 ("float64") or in fp32 ("torch"); upstream gradients dy of y and dh
    of h (with a residual)."""
    cast = torch.Tensor.double if name == "float64" else torch.Tensor.clone
    h_fp32 = x if residual is None else x + residual
    leaves = [cast(t).requires_grad_() for t in ((x if name == "kernel" else h_fp32), weight, bias)]
    shape = x.shape[-1:]
    if name == "kernel" and residual is not None:
        y, h = kernels.add_layer_norm(leaves[0], residual, shape, leaves[1], leaves[2])
    elif name == "kernel":
        y, h = kernels.layer_norm(leaves[0], shape, leaves[1], leaves[2]), leaves[0]
    else:
        y, h = F.layer_norm(leaves[0], shape, leaves[1], leaves[2]), leaves[0]
    outputs = (y, h) if residual is not None else (y,)
    torch.autograd.backward(outputs, [cast(g) for g in (dy, dh)[:len(outputs)]])
    return y.detach(), [t.grad for t in leaves]


def _ulp(value: float) -> float:
    """The spacing of fp32 numbers at ``value``."""
    return torch.finfo(torch.float32).eps * 2.0 ** (math.frexp(abs(value))[1] - 1)


def _on_grid(values, mean):
    """``values`` rounded to a grid of 128 ulps of ``mean``."""
    step = 128 * _ulp(mean)
    return torch.round(values / step) * step


def _check_large_mean(device, width, mean, std, residual):
    """Rows of ``width`` fp32 values of the given mean and std (h = x + residual has them with a residual): y,
    dx, dweight and dbias against float64, within the rule against torch's fp32 layer norm. The values lie on a
    grid less 7 ulps of the mean, so that a plain fp32 sum of a row rounds the same way at each step (its worst
    case, which fuzzing met at random; on the grid alone it would be exact)."""
    h = _on_grid(torch.randn(6, width, device=device) * std + mean, mean) - 7 * _ulp(mean)
    res = _on_grid(torch.randn(6, width, device=device) * std / 2, mean) if residual else None
    x = h - res if residual else h  # exact: x + residual gives h back
    weight, bias = torch.randn(width, device=device), torch.randn(width, device=device)
    dy, dh = torch.randn(6, width, device=device), torch.randn(6, width, device=device)
    ours, exact, theirs = (_run(name, x, res, weight, bias, dy, dh) for name in ("kernel", "float64", "torch"))
    assert_close(ours[0], exact[0], theirs[0], name="y")
    for name, got, want, baseline in zip(("dx", "dweight", "dbias"), ours[1], exact[1], theirs[1]):
        assert_close(got, want, baseline, BACKWARD, name=name)


MEANS_AND_STDS = [(-0.95, 0.01), (100.0, 1.0)]
"""mean/std 95 and 100."""


@pytest.mark.parametrize("mean,std", MEANS_AND_STDS)
@pytest.mark.parametrize("residual", [False, True])
def test_one_block_rows_of_large_mean_within_torch_error(device, mean, std, residual):
    """An unaligned 1000-wide row: one 1024 block."""
    assert norm_module._config(1000)[:2] == (1024, True)
    _check_large_mean(device, 1000, mean, std, residual)


@pytest.mark.parametrize("mean,std", MEANS_AND_STDS)
@pytest.mark.parametrize("residual", [False, True])
def test_chunked_rows_of_large_mean_within_torch_error(monkeypatch, device, mean, std, residual):
    """63 chunks of 16 (the last one short), as the limits lowered take a 1003-wide row."""
    monkeypatch.setattr(norm_module, "MAX_BLOCK", 32)
    monkeypatch.setattr(norm_module, "LONG_BLOCK", 16)
    assert norm_module._config(1003)[:2] == (16, False)
    _check_large_mean(device, 1003, mean, std, residual)
