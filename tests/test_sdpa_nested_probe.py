"""``kernels.scaled_dot_product_attention`` assigned over F's with what else torch's SDPA takes: torch's
``CausalBias`` masks (``causal_upper_left``/``causal_lower_right``), ``sdpa_kernel`` contexts, nested tensors, and
corner values of its arguments, against float64 math and torch's own function."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import kernels
from kernels.attention import sdpa

F64 = torch.float64


@pytest.fixture
def assigned(monkeypatch):
    """The drop-in assigned over ``F.scaled_dot_product_attention``, as the README shows."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", kernels.scaled_dot_product_attention)


def _exact(q, k, v, visible):
    """float64 attention of q (B, H, L, D) over k, v (B, H, S, D) with a bool (L, S) mask; rows that see no key 0."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return weights @ v.double()


def _qkv(n_q, n_k, requires_grad=False, device="cpu"):
    q = torch.randn(2, 2, n_q, 16, device=device)
    k, v = torch.randn(2, 2, 2, n_k, 16, device=device)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _bias(variant, n_q, n_k):
    with warnings.catch_warnings():  # torch warns that its own kernels give NaN for a lower-right bias with L > S
        warnings.simplefilter("ignore")
        return (causal_upper_left if variant == "upper_left" else causal_lower_right)(n_q, n_k)


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("n_q,n_k", [(5, 9), (9, 5)])
def test_causal_bias_with_the_shim_assigned_runs_the_kernel(assigned, device, sdpa_kernel_calls, variant, n_q, n_k):
    """CausalBias takes torch's SDPA call only when the function is F's attribute: with the shim assigned the builtin
    ran on the bias's own uninitialised storage as a float mask and returned garbage typed CausalBias. It runs the
    kernel now (no mask read), forward and backward, as the materialised bool mask."""
    q, k, v = _qkv(n_q, n_k, requires_grad=True, device=device)
    bias = _bias(variant, n_q, n_k)
    visible = bias._materialize(device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert type(out) is torch.Tensor and len(sdpa_kernel_calls) == 1
    torch.testing.assert_close(out.double(), _exact(q, k, v, visible), atol=2e-6, rtol=2e-6)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(sdpa._TORCH_SDPA(q, k, v, attn_mask=visible), (q, k, v), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)


def test_causal_bias_compiles_in_one_graph_through_the_kernel(assigned, device, sdpa_kernel_calls):
    """A bias built outside the compiled function, as torch documents: fullgraph=True failed inside aot_autograd
    (the builtin on the bias's storage); it traces the kernel's launch now."""
    q, k, v = _qkv(5, 9, device=device)
    bias = causal_lower_right(5, 9)
    compiled = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v).double(), _exact(q, k, v, bias._materialize(device)), atol=2e-6,
                               rtol=2e-6)
    assert len(sdpa_kernel_calls) == 1


def test_causal_bias_calls_the_kernel_cannot_run_get_torchs_dispatch(assigned, device, sdpa_kernel_calls):
    """Where the kernel does not take the call, torch's CausalBias dispatch does what torch does: its ValueError with
    is_causal, its dropout, its math backend under ``sdpa_kernel(MATH)``, and its materialised mask for a
    lower-right bias of other lengths than q's and k's (a broadcast error here)."""
    q, k, v = _qkv(5, 9, device=device)
    bias = causal_lower_right(5, 9)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    with pytest.raises(RuntimeError, match="must match"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 8))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out.double(), _exact(q, k, v, bias._materialize(device)), atol=2e-6, rtol=2e-6)
    torch.manual_seed(1)
    dropped = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.5)
    torch.manual_seed(1)
    torch.testing.assert_close(dropped, sdpa._TORCH_SDPA(q, k, v, attn_mask=bias._materialize(device), dropout_p=0.5))
    assert not sdpa_kernel_calls


def test_an_upper_left_or_square_bias_is_is_causal_whatever_the_lengths(assigned, device, sdpa_kernel_calls):
    """torch runs ``causal_upper_left`` and a square ``causal_lower_right`` as ``is_causal=True`` (top-left), without
    comparing the bias's lengths with q's and k's; so does the shim."""
    q, k, v = _qkv(5, 9, device=device)
    top_left = sdpa._TORCH_SDPA(q, k, v, is_causal=True)
    for bias in (causal_upper_left(3, 4), causal_lower_right(7, 7)):
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), top_left)
    assert len(sdpa_kernel_calls) == 2


def test_jagged_nested_tensors_run_torchs_sdpa_as_per_sequence_attention(assigned, device, sdpa_kernel_calls):
    """NJT q, k, v (B, j, H, D) transposed to (B, H, j, D) as torch's NJT tutorial passes them: torch's own nested
    SDPA runs (the README's fallback), each sequence attended alone, and gradients reach the nested inputs."""
    lengths = (3, 6)
    q, k, v = (torch.nested.nested_tensor([torch.randn(n, 2, 16, device=device) for n in lengths],
                                          layout=torch.jagged, requires_grad=True) for _ in range(3))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert out.is_nested and not sdpa_kernel_calls
    for o, qi, ki, vi in zip(out.unbind(), q.unbind(), k.unbind(), v.unbind()):
        n = qi.shape[0]
        exact = _exact(*(t.transpose(0, 1)[None] for t in (qi, ki, vi)), torch.ones(n, n, dtype=torch.bool,
                                                                                     device=device))
        torch.testing.assert_close(o.transpose(0, 1)[None].double(), exact, atol=2e-6, rtol=2e-6)
    out.values().sum().backward()
    assert q.grad is not None and q.grad.is_nested


def test_zero_scale_with_is_causal_is_each_rows_mean_of_its_visible_values(assigned, device, sdpa_kernel_calls):
    """scale=0.0: every visible score is 0, so row i is the mean of v[:i + 1] (torch's CPU flash path returns NaN
    there; its math backend the mean)."""
    q, k, v = _qkv(5, 5, device=device)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.0)
    means = v.double().cumsum(2) / torch.arange(1, 6, device=device, dtype=F64)[:, None]
    torch.testing.assert_close(out.double(), means, atol=2e-6, rtol=2e-6)
    assert len(sdpa_kernel_calls) == 1
