"""Row ops (softmax, log_softmax, the norms) as a demanding user drives them: saved tensors a hook hands back in
another layout, DTensor parameters beside a plain input, launch-plan caches under many widths, and torch's
argument semantics and module conventions."""
import sys

import pytest
import torch

import kernels
from kernels import _rows

layernorm, softmax = sys.modules["kernels.layernorm"], sys.modules["kernels.softmax"]  # (kernels.softmax: the op)

ROWS, N = 6, 8


def _stride2(t):
    """``t``'s values as a view with every stride doubled: what a saved-tensors hook may hand back."""
    return torch.stack([t, t], -1)[..., 0]


_OPS = {
    "rms_norm": lambda x, r, w, b: kernels.rms_norm(x, N, w),
    "layer_norm": lambda x, r, w, b: kernels.layer_norm(x, N, w, b),
    "add_layer_norm": lambda x, r, w, b: kernels.add_layer_norm(x, r, N, w, b),
    "add_rms_norm": lambda x, r, w, b: kernels.add_rms_norm(x, r, N, w, offset=1.0, casting_mode="llama"),
    "softmax": lambda x, r, w, b: kernels.softmax(x, scale=0.5),
    "log_softmax dim 0": lambda x, r, w, b: kernels.log_softmax(x, 0),
}


def _grads(op, inputs, pack):
    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = op(*leaves)
    loss = sum((o * o.detach().cos()).sum() for o in (out if isinstance(out, tuple) else (out,)))
    return torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name", list(_OPS))
def test_saved_statistics_in_another_layout_give_the_same_gradients(name, compiled, fresh_dynamo):
    # regression: the norms' backward read the saved mean and rstd at MEAN + row, as if contiguous, so a hook
    # returning them strided (a stride-2 view) gave wrong dx and dweight (rms_norm's dx off by 2.0), eager and
    # under torch.compile's backward custom op alike
    inputs = [torch.randn(ROWS, N), torch.randn(ROWS, N), torch.randn(N), torch.randn(N)]
    op = _OPS[name]
    expected = _grads(op, inputs, lambda t: t)
    if compiled:
        op = torch.compile(op, backend="aot_eager", fullgraph=True)
    for got, want in zip(_grads(op, inputs, _stride2), expected):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_dtensor_weight_beside_a_plain_input_names_both(mesh):
    # regression: said "x and residual must both be DTensors when any input is one, got x: Tensor, residual:
    # NoneType" to a caller who passed no residual (a module FSDP2 sharded, called without its hooks)
    from torch.distributed.tensor import Replicate, distribute_tensor
    w = distribute_tensor(torch.randn(N), mesh, [Replicate()])
    x = torch.randn(ROWS, N)
    with pytest.raises(TypeError, match=r"^input must be a DTensor when weight is one, got input: Tensor, "
                                        r"weight: DTensor$"):
        kernels.rms_norm(x, N, w)
    with pytest.raises(TypeError, match=r"^input must be a DTensor when weight and bias are, got input: Tensor, "
                                        r"weight: DTensor, bias: DTensor$"):
        kernels.layer_norm(x, N, w, w)
    module = kernels.LayerNorm(N)
    module.weight = torch.nn.Parameter(w)
    with pytest.raises(TypeError, match="input must be a DTensor when weight is one") as info:
        module(x)
    assert "residual" not in str(info.value)
    with pytest.raises(TypeError, match=r"^residual must be a DTensor when x is one, got x: DTensor, "
                                        r"residual: Tensor$"):
        kernels.add_rms_norm(distribute_tensor(x, mesh, [Replicate()]), x, N)
    with pytest.raises(TypeError, match=r"^x and residual must be DTensors when bias is one"):
        kernels.add_layer_norm(x, x, N, None, w)


_PLAN_CACHES = {  # each cached function and its arguments at a row width n
    "row_config": (_rows.row_config, lambda n: (n, 8192, 2048, 8)),
    "softmax": (softmax._launch_constants, lambda n: (n, 32, (softmax.MAX_BLOCK, softmax.LONG_BLOCK), False, False)),
    "norm plan": (layernorm._launch_plan, lambda n: (n, False, 32, *layernorm._limits())),
    "norm": (layernorm._launch_constants, lambda n: (False, n, 32, layernorm._limits(), True, 1, False, True, False)),
}


@pytest.mark.parametrize("name", list(_PLAN_CACHES))
def test_launch_plan_caches_are_bounded(name):
    # regression: each was an lru_cache(maxsize=None), so every distinct row width a process saw stayed cached
    cached, args = _PLAN_CACHES[name]
    maxsize = cached.cache_info().maxsize
    assert maxsize is not None and maxsize <= 4096
    for n in range(1, maxsize + 50):
        cached(*args(n))
    assert cached.cache_info().currsize == maxsize
