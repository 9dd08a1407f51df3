"""Numerics of the row ops at the edges users hit, against torch and float64: softmax's ``dtype=``, NaN and +inf
in softmax rows (one-block and online paths), norms of constant rows with eps 0, fp16 rows near 65504, rows wider
than one block, and parameter gradients that are bitwise the same from run to run."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _rows as rows_module
from test_layernorm import check_norm
from test_softmax import check_against_reference
from tolerance import BACKWARD, assert_close

# numpy's notes on the NaN/inf arithmetic the interpreter does for the rows below
pytestmark = [pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning"),
              pytest.mark.usefixtures("rows_kernel_only")]
softmax_module = importlib.import_module("kernels.softmax")
norm_module = importlib.import_module("kernels.layernorm")
INF, NAN = float("inf"), float("nan")


def _softmax_pair(log):
    """(ours, torch's) softmax or log-softmax."""
    return (kernels.log_softmax, torch.log_softmax) if log else (kernels.softmax, torch.softmax)


def _forward_and_grad(fn, x, dy, *args, **kwargs):
    """(fn(x, ...), dx) for the upstream gradient ``dy``."""
    x = x.detach().clone().requires_grad_()
    y = fn(x, *args, **kwargs)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("x_dtype,dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float16)])
def test_softmax_dtype_casts_x_first_as_torch(device, log, x_dtype, dtype):
    """``dtype=`` as torch.softmax's: x cast to it before the op, the output in it, the gradient in x's dtype;
    both within the float64 rule (the reference: the op on x as cast, in float64)."""
    ours, theirs = _softmax_pair(log)
    x = torch.randn(3, 5, 37, dtype=x_dtype, device=device)
    dy = torch.randn(3, 5, 37, device=device)
    for dim in (-1, 1):
        y, dx = _forward_and_grad(ours, x, dy, dim, dtype=dtype)
        want, want_dx = _forward_and_grad(theirs, x, dy, dim, dtype=dtype)
        exact, exact_dx = _forward_and_grad(theirs, x.to(dtype).double(), dy, dim)
        assert y.dtype == dtype and dx.dtype == x_dtype
        assert_close(y, exact, want, name="y")
        assert_close(dx, exact_dx, want_dx, BACKWARD, name="dx")


@pytest.mark.parametrize("log", [False, True])
def test_softmax_dtype_wins_over_cuda_autocast_as_torch(monkeypatch, device, log):
    """CUDA autocast runs softmax in fp32 only when no ``dtype`` is given (its fp32_set_opt_dtype policy keeps an
    explicit one): bf16 out for dtype=bf16. Shown on CPU by declaring it an fp32-autocast device."""
    if device.type == "cpu":
        monkeypatch.setattr(rows_module, "AUTOCAST_FP32_DEVICES", ("cpu",))
    ours = _softmax_pair(log)[0]
    x = torch.randn(4, 24, dtype=torch.float16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert ours(x).dtype == torch.float32
        assert ours(x, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("log", [False, True])
def test_softmax_dtype_on_the_fallback_path(torch_ops_allowed, monkeypatch, log):
    """Where the kernels cannot run (torch ops), ``dtype=`` still casts x first."""
    monkeypatch.setattr(softmax_module, "kernel_runs_on", lambda *tensors: False)
    monkeypatch.setattr(softmax_module, "_launch", lambda *a, **k: pytest.fail("kernel launched"))
    ours, theirs = _softmax_pair(log)
    x = torch.randn(5, 7, dtype=torch.float16)
    y = ours(x, 0, dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, theirs(x, 0, dtype=torch.float32))


def test_softmax_dtype_must_be_a_float_dtype_it_takes(device):
    x = torch.randn(2, 8, device=device)
    for fn in (kernels.softmax, kernels.log_softmax):
        for bad in (torch.int32, torch.complex64, "float32"):
            with pytest.raises(TypeError, match="dtype must be None or one of"):
                fn(x, dtype=bad)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("online", [False, True])
def test_softmax_nan_and_plus_inf_propagate_as_torch(monkeypatch, device, log, dtype, online):
    """A NaN anywhere in a row (first or a later chunk of the online path) makes the row NaN, a +inf makes it NaN
    (inf - inf), as torch's; the other rows are untouched. Forward and input gradient alike."""
    if online:
        monkeypatch.setattr(softmax_module, "MAX_BLOCK", 16)
        monkeypatch.setattr(softmax_module, "LONG_BLOCK", 8)
    x = torch.randn(6, 40, dtype=dtype, device=device)
    x[0, 3] = NAN
    x[1, 35] = NAN
    x[2, 5] = INF
    x[3, [4, 30]] = INF
    x[4] = -INF
    x[4, 39] = NAN  # NaN among -inf: NaN, not the all -inf row's answer by luck
    dy = torch.randn(6, 40, device=device)
    ours, theirs = _softmax_pair(log)
    y, dx = _forward_and_grad(ours, x, dy, -1)
    want, want_dx = _forward_and_grad(theirs, x, dy, -1)
    exact, exact_dx = _forward_and_grad(theirs, x.double(), dy, -1)
    assert exact[:5].isnan().all() and not exact[5].isnan().any()
    # the rule counts NaN in both as equal and NaN in one only as an infinite error
    assert_close(y, exact, want, name="y")
    assert_close(dx, exact_dx, want_dx, BACKWARD, name="dx")


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("online", [False, True])
def test_softmax_of_fp16_rows_near_65504_within_torch_error(monkeypatch, device, log, online):
    """Scores at fp16's limits: fp32 math inside, so the output and input gradient stay finite and within the
    float64 rule. Softmax takes +-65504 (x - max overflows fp16); log-softmax a spread of 65504, the widest whose
    results fp16 can hold."""
    if online:
        monkeypatch.setattr(softmax_module, "MAX_BLOCK", 16)
        monkeypatch.setattr(softmax_module, "LONG_BLOCK", 8)
    low = 0.0 if log else -65504.0
    x = low + torch.rand(4, 40, device=device) * (65000 - low)
    x[:, 0] = 65504.0
    x[:, 25] = low
    x[2, 30] = 65504.0  # a tie for the max in a later chunk
    check_against_reference(x.half(), log=log)


def _norm_pair(rms):
    """(ours, torch's) layer or RMS norm, each called as fn(x, shape, weight, bias, eps)."""
    if rms:
        return (lambda x, s, w, b, eps: kernels.rms_norm(x, s, w, eps),
                lambda x, s, w, b, eps: F.rms_norm(x, s, w, eps))
    return kernels.layer_norm, F.layer_norm


def _ours_and_torchs(rms, x, params, dy, eps):
    """[y, dx, dweight(, dbias)] of ours and of torch's norm over x's last dim, params = [weight, bias or None]."""
    results = []
    for fn in _norm_pair(rms):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, *params)]
        y = fn(leaves[0], x.shape[-1:], leaves[1], leaves[2], eps)
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves if t is not None])
    return results


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("path", ["one block", "two pass"])
def test_norm_of_constant_and_zero_rows_as_torch(monkeypatch, device, rms, eps, path):
    """Rows of variance 0 (layer norm) or of zeros (RMS norm): with eps 0, 0 * inf = NaN as torch; with eps > 0
    the bias (layer norm) or zeros. Forward and every gradient, NaN exactly where torch's."""
    if path == "two pass":
        monkeypatch.setattr(norm_module, "MAX_BLOCK", 8)
        monkeypatch.setattr(norm_module, "LONG_BLOCK", 4)
    x = torch.randn(4, 11, device=device)
    x[1] = 3.0
    x[2] = 0.0
    params = [torch.randn(11, device=device), None if rms else torch.randn(11, device=device)]
    dy = torch.randn(4, 11, device=device)
    results = _ours_and_torchs(rms, x, params, dy, eps)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, equal_nan=True)
    assert results[0][0][2 if rms else 1].isnan().all() == (eps == 0.0)


@pytest.mark.parametrize("rms", [False, True])
def test_norm_of_fp16_rows_near_65504_stays_within_torch_error(device, rms):
    """x * x overflows fp16 at these magnitudes; the statistics are fp32, as torch's, so the output is finite and
    within the float64 rule, forward and backward."""
    x = (torch.rand(5, 37, device=device) * 2 - 1) * 65000
    x[0, 0] = 65504.0
    check_norm(rms, x.half(), 37, residual=False)


def test_rms_norm_of_rows_wider_than_one_block(device):
    """An aligned width past MAX_BLOCK (20000) takes the two-pass path both ways, with the residual."""
    assert norm_module._config(20000)[1] is False
    check_norm(True, torch.randn(2, 20000, dtype=torch.bfloat16, device=device), 20000, residual=True)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("path", ["one block", "two pass"])
def test_norm_parameter_gradients_are_bitwise_deterministic(monkeypatch, device, rms, path):
    """dweight and dbias over many rows (several programs, an uneven last run) are the same bits run after run:
    fp32 partial rows reduced by one sum, no atomics."""
    if path == "two pass":
        monkeypatch.setattr(norm_module, "MAX_BLOCK", 32)
        monkeypatch.setattr(norm_module, "LONG_BLOCK", 16)
    x = torch.randn(203, 40, device=device)
    dy = torch.randn(203, 40, device=device)
    params = [torch.randn(40, device=device), None if rms else torch.randn(40, device=device)]
    ours = _norm_pair(rms)[0]
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in params if t is not None]
        ours(x, (40,), *leaves, *[None] * (2 - len(leaves)), 1e-5).backward(dy)
        runs.append([t.grad for t in leaves])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("rms", [False, True])
def test_norm_with_infinite_eps_gives_torch_zeros_and_zero_gradients(torch_ops_allowed, device, rms):
    """eps = inf makes rstd 0: y is zeros (RMS norm) or the bias, and every gradient of x is 0, as torch's; not
    the NaN the kernels' backward gives a row whose mean square overflowed."""
    x = torch.randn(3, 9, device=device)
    params = [torch.randn(9, device=device), None if rms else torch.randn(9, device=device)]
    dy = torch.randn(3, 9, device=device)
    results = _ours_and_torchs(rms, x, params, dy, float("inf"))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    assert (results[0][1] == 0).all()
