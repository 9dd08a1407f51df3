"""kernels.softmax / log_softmax against float64 math and torch: every dtype, odd widths, any dim, the online
multi-block path, the causal mask, -inf rows, huge values, bad input, and that the Triton kernels really run."""
import functools
import importlib

import pytest
import torch
from torch.autograd import forward_ad

import kernels
from kernels import reference
from tolerance import BACKWARD, assert_close

# numpy's notes on the NaN/inf arithmetic the interpreter does for -inf, fully masked and overflowing rows
pytestmark = [pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning"),
              pytest.mark.usefixtures("rows_kernel_only")]
softmax_module = importlib.import_module("kernels.softmax")  # `kernels.softmax` itself is the function
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _torch_softmax(x, dim, scale, causal, log):
    """``torch.softmax(x * scale, dim)`` (or log_softmax) in x's dtype; with ``causal``, masked entries are -inf
    before it and rows that see no key are zeros after it, as kernels.softmax defines them."""
    z = x * scale
    if log:
        return torch.log_softmax(z, dim)
    if not causal:
        return torch.softmax(z, dim)
    return reference.causal_softmax(z, functools.partial(torch.softmax, dim=dim))


def check_against_reference(x, dim=-1, scale=1.0, causal=False, log=False):
    """Forward and input gradient of the kernel vs float64, within the tolerance rule's multiple of torch's error."""
    fn = kernels.log_softmax if log else kernels.softmax
    extra = {} if log else {"causal": causal}
    x = x.detach().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    x_pt = x.detach().clone().requires_grad_()
    out = fn(x, dim, scale=scale, **extra)
    out64 = _torch_softmax(x64, dim, scale, causal, log)
    out_pt = _torch_softmax(x_pt, dim, scale, causal, log)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, out64, out_pt, name="y")
    dy = torch.randn_like(out)
    for y in (out, out64, out_pt):
        y.backward(dy.to(y.dtype))
    assert_close(x.grad, x64.grad, x_pt.grad, BACKWARD, name="dx")
    return out


@pytest.fixture
def online_path(monkeypatch):
    """Lower the block limits so rows wider than 16 take the multi-block online path with 8-wide chunks."""
    monkeypatch.setattr(softmax_module, "MAX_BLOCK", 16)
    monkeypatch.setattr(softmax_module, "LONG_BLOCK", 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 7, 1000, 4099])
def test_odd_widths(dtype, width):
    check_against_reference(torch.randn(3, width, dtype=dtype) * 3, scale=0.7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_width_70000_takes_the_online_path(dtype):
    assert softmax_module._config(70000)[1] is False
    check_against_reference(torch.randn(2, 70000, dtype=dtype) * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_3d_any_dim(dtype, dim):
    check_against_reference(torch.randn(5, 6, 9, dtype=dtype), dim=dim, scale=1.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, -1])
def test_log_softmax(dtype, dim):
    check_against_reference(torch.randn(4, 33, 10, dtype=dtype), dim=dim, scale=0.5, log=True)


def test_non_contiguous_input_and_scalar():
    check_against_reference(torch.randn(11, 6).t(), dim=-1)
    check_against_reference(torch.randn(4, 24)[:, ::3], dim=-1)
    assert kernels.softmax(torch.tensor(3.0)).item() == 1.0
    assert kernels.softmax(torch.empty(0, 5)).shape == (0, 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("width,dim", [(17, -1), (100, -1), (40, 0)])
def test_online_path_at_small_widths(online_path, dtype, log, width, dim):
    assert softmax_module._config(width)[1] is False
    check_against_reference(torch.randn(3, width, dtype=dtype) * 5, dim=dim, scale=0.9, log=log)


@pytest.mark.slow
def test_million_wide_row():
    assert softmax_module._config(1_000_000)[1] is False
    check_against_reference(torch.randn(2, 1_000_000) * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q,n_k", [(13, 13), (5, 21), (21, 5), (1, 9)])
def test_causal(dtype, n_q, n_k):
    x = torch.randn(2, 3, n_q, n_k, dtype=dtype)
    out = check_against_reference(x, scale=0.125, causal=True)
    hidden = ~reference.causal_mask(n_q, n_k)
    assert (out[..., hidden] == 0).all()
    assert not out.isnan().any()


@pytest.mark.parametrize("n_q,n_k", [(20, 20), (9, 30), (30, 9)])
def test_causal_online_path(online_path, n_q, n_k):
    out = check_against_reference(torch.randn(2, n_q, n_k, dtype=torch.bfloat16), scale=0.3, causal=True)
    assert not out.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("online", [False, True])
def test_all_minus_inf_rows_match_torch(monkeypatch, dtype, online):
    if online:
        monkeypatch.setattr(softmax_module, "MAX_BLOCK", 16)
        monkeypatch.setattr(softmax_module, "LONG_BLOCK", 8)
    x = torch.randn(4, 40, dtype=dtype)
    x[1] = float("-inf")
    x[2, :30] = float("-inf")  # -inf over the first chunks, finite later: the online sum must not turn NaN
    x[3, ::2] = float("-inf")
    out = kernels.softmax(x)
    torch.testing.assert_close(out, torch.softmax(x, -1), equal_nan=True)
    assert out[1].isnan().all() and not out[[0, 2, 3]].isnan().any()
    torch.testing.assert_close(kernels.log_softmax(x), torch.log_softmax(x, -1), equal_nan=True)


def test_causal_row_all_minus_inf_in_input_is_nan_but_hidden_rows_are_zero():
    x = torch.randn(6, 4)
    x[3] = float("-inf")  # query 3 sees keys 0..1, all -inf: NaN as in torch; queries 0 and 1 see nothing: 0
    out = kernels.softmax(x, causal=True)
    torch.testing.assert_close(out, reference.softmax(x, causal=True), equal_nan=True)
    assert out[3].isnan().all() and (out[:2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, -0.8])
@pytest.mark.parametrize("shape,causal,log", [((3, 7), False, False), ((2, 16), False, False), ((3, 7), False, True),
                                              ((2, 5, 7), True, False), ((7, 4), True, False), ((4, 4), True, False)])
def test_zero_and_negative_scales_match_torch(dtype, scale, shape, causal, log):
    """Padding and masked lanes must stay -inf after scaling (-inf * 0 is NaN, -inf * -0.8 is +inf)."""
    out = check_against_reference(torch.randn(shape, dtype=dtype), scale=scale, causal=causal, log=log)
    assert not out.isnan().any()


@pytest.mark.parametrize("scale", [0.0, -0.8])
@pytest.mark.parametrize("shape,causal,log", [((3, 21), False, False), ((3, 21), False, True), ((20, 23), True, False)])
def test_zero_and_negative_scales_on_the_online_path(online_path, scale, shape, causal, log):
    out = check_against_reference(torch.randn(shape), scale=scale, causal=causal, log=log)
    assert not out.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,log", [(False, False), (True, False), (False, True)])
def test_forward_mode_derivative_matches_torch(dtype, causal, log):
    """torch.func.jvp and the forward_ad dual-number API give J @ tangent, within the rule (not a silent zero)."""
    x, tangent = torch.randn(2, 6, 9, dtype=dtype), torch.randn(2, 6, 9, dtype=dtype)
    kernel = kernels.log_softmax if log else functools.partial(kernels.softmax, causal=causal)
    out, jvp = torch.func.jvp(lambda t: kernel(t, scale=0.7), (x,), (tangent,))
    out64, jvp64 = torch.func.jvp(lambda t: _torch_softmax(t, -1, 0.7, causal, log), (x.double(),), (tangent.double(),))
    out_pt, jvp_pt = torch.func.jvp(lambda t: _torch_softmax(t, -1, 0.7, causal, log), (x,), (tangent,))
    assert jvp.dtype == dtype
    assert_close(out, out64, out_pt, name="y")
    assert_close(jvp, jvp64, jvp_pt, BACKWARD, name="jvp")
    with forward_ad.dual_level():
        dual = kernel(forward_ad.make_dual(x, tangent), scale=0.7)
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, jvp, rtol=0, atol=0)


def test_jacfwd_and_a_jvp_of_a_jvp_give_torch_derivatives(torch_ops_allowed, device):
    """jacfwd (vmap over jvp: torch's ops, as under any vmap) works, nested too; a jvp of a jvp gives the
    second-order tangent of the written-out softmax (it raised NotImplementedError: the kernel's jvp is one level
    deep, so such calls run torch's ops)."""
    x, tangent = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)
    for kernel, torch_fn in [(kernels.softmax, torch.softmax), (kernels.log_softmax, torch.log_softmax)]:
        torch.testing.assert_close(torch.func.jacfwd(kernel)(x), torch.func.jacfwd(lambda t: torch_fn(t, -1))(x))
        torch.testing.assert_close(torch.func.jacfwd(torch.func.jacfwd(kernel))(x),
                                   torch.func.jacfwd(torch.func.jacfwd(lambda t: torch_fn(t, -1)))(x))

        def second(fn):
            return torch.func.jvp(lambda a: torch.func.jvp(fn, (a,), (tangent,))[1], (x,), (tangent,))[1]
        written = reference.softmax if kernel is kernels.softmax else (lambda t: reference.softmax(t).log())
        want = second(written)
        assert want.abs().max() > 0.01
        torch.testing.assert_close(second(kernel), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_values_stay_finite(dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big, big / 2, 0.0, big], [-big, -big, -big, -big, -big]], dtype=dtype)
    for scale in (1.0, 0.5):
        out = kernels.softmax(x, scale=scale)
        assert out.isfinite().all()
        assert_close(out, reference.softmax(x.double(), scale=scale), _torch_softmax(x, -1, scale, False, False),
                     name=f"scale {scale}")


def test_bad_input_raises_before_launch(monkeypatch):
    monkeypatch.setattr(softmax_module, "_launch", lambda *a, **k: pytest.fail("kernel launched on bad input"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        kernels.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="x must have dtype"):
        kernels.softmax(torch.randn(3, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="x must have dtype"):
        kernels.log_softmax(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="dim must be in"):
        kernels.softmax(torch.randn(3, 4), dim=2)
    with pytest.raises(IndexError, match="dim must be in"):  # also what torch raises, for code that catches it
        kernels.log_softmax(torch.randn(3, 4), dim=-3)
    with pytest.raises(TypeError, match="dim must be an int"):
        kernels.softmax(torch.randn(3, 4), dim=1.0)
    with pytest.raises(TypeError, match="scale must be a finite real number"):
        kernels.softmax(torch.randn(3, 4), scale="0.5")
    with pytest.raises(ValueError, match="causal=True needs x of at least 2 dims"):
        kernels.softmax(torch.randn(4), causal=True)
    with pytest.raises(ValueError, match="causal=True needs dim=-1"):
        kernels.softmax(torch.randn(3, 4), dim=0, causal=True)


def test_kernel_path_is_taken(monkeypatch, device):
    launches = []
    real_launch = softmax_module._launch
    monkeypatch.setattr(softmax_module, "_launch", lambda *a: launches.append(a[0]) or real_launch(*a))
    monkeypatch.setattr(softmax_module, "reference", None)  # any use of the fallback raises
    x = torch.randn(3, 10, device=device, requires_grad=True)
    kernels.softmax(x, causal=True).sum().backward()
    kernels.log_softmax(x).sum().backward()
    assert launches == [softmax_module._softmax_fwd, softmax_module._softmax_bwd] * 2


def test_fallback_when_the_kernels_cannot_run(torch_ops_allowed, monkeypatch):
    monkeypatch.setattr(softmax_module, "kernel_runs_on", lambda *tensors: False)
    monkeypatch.setattr(softmax_module, "_launch", lambda *a, **k: pytest.fail("kernel launched"))
    x = torch.randn(5, 7)
    torch.testing.assert_close(kernels.softmax(x, scale=2.0, causal=True), reference.softmax(x, -1, 2.0, True))
    torch.testing.assert_close(kernels.log_softmax(x, 0), torch.log_softmax(x, 0))


def test_custom_ops_pass_opcheck_and_compile_in_one_graph(device):
    x = torch.randn(3, 5, 7, device=device, requires_grad=True)
    for args in [(x, 1, 0.5, False, False), (x, 2, 2.0, True, False), (x, 0, 1.0, False, True)]:
        torch.library.opcheck(softmax_module._forward_op, args)
    y = kernels.softmax(x.detach(), causal=True)
    torch.library.opcheck(softmax_module._backward_op, (y, torch.randn_like(y), 2, 0.5, True, False))

    def step(t):
        return (kernels.softmax(t, 1, scale=0.5) * 2).sum() + (kernels.log_softmax(t) ** 2).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, step):
        out = fn(x)
        out.backward()
        results.append((out.detach(), x.grad))
        x.grad = None
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
