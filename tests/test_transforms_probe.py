"""Regressions found by probing the public ops under torch's tracing and transform machinery (FakeTensorMode,
torch.export, forward-mode AD)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import kernels
from kernels import flash_attn


def _attention(device):
    q, k, v = (torch.randn(2, h, n, 24, device=device) for h, n in ((3, 5), (1, 7), (1, 7)))
    return kernels.attention(q, k, v, causal=True, return_lse=True)


def _flash_attn_func(device):
    q, k, v = (torch.randn(2, n, h, 24, device=device) for n, h in ((5, 4), (7, 2), (7, 2)))
    return flash_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)[:2]


def _sdpa(device):
    q, k, v = (torch.randn(1, 2, 5, 24, device=device) for _ in range(3))
    return kernels.scaled_dot_product_attention(q, k, v, is_causal=True)


def _norms(device):
    x, residual = torch.randn(3, 5, 40, device=device), torch.randn(3, 5, 40, device=device)
    weight, bias = torch.randn(40, device=device), torch.randn(40, device=device)
    return (kernels.layer_norm(x.transpose(0, 1), (40,), weight, bias), kernels.rms_norm(x, (40,), weight),
            *kernels.add_rms_norm(x, residual, (40,), weight), *kernels.add_layer_norm(x, residual, (40,), weight),
            kernels.RMSNorm(40, device=device)(x))


def _softmaxes(device):
    x = torch.randn(3, 5, 40, device=device)
    return (kernels.softmax(x.transpose(0, 2), dim=0), kernels.softmax(x, causal=True, scale=0.5),
            kernels.log_softmax(x, dim=1), kernels.softmax(x, dtype=torch.float16))


def _layouts(outputs):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [(t.shape, t.dtype, t.device, t.stride()) for t in outputs]


@pytest.mark.parametrize("op", [_attention, _flash_attn_func, _sdpa, _norms, _softmaxes],
                         ids=lambda op: op.__name__.strip("_"))
def test_fake_tensor_mode_gives_fake_outputs(device, op):
    """Under an eager FakeTensorMode every op launched Triton on the fake tensors, which claim a CPU/GPU device but
    hold no data, and torch raised "Attempted to set the storage of a tensor on device 'meta'...". They run the
    reference's torch ops there, as on meta tensors: fake outputs shaped, typed and laid out as the kernels'."""
    torch.manual_seed(0)
    real = op(device)
    with FakeTensorMode():
        fake = op(device)
    assert all(isinstance(t, FakeTensor) for t in (fake if isinstance(fake, tuple) else (fake,)))
    assert _layouts(fake) == _layouts(real)


def test_fake_tensor_mode_backward(device):
    with FakeTensorMode():
        q, k, v = (torch.randn(1, 2, n, 24, device=device, requires_grad=True) for n in (5, 7, 7))
        x = torch.randn(3, 40, device=device, requires_grad=True)
        loss = kernels.attention(q, k, v, causal=True).sum() + kernels.layer_norm(x, (40,)).sum()
        grads = torch.autograd.grad(loss, (q, k, v, x))
    assert [(g.shape, type(g)) for g in grads] == [(t.shape, FakeTensor) for t in (q, k, v, x)]


def test_non_strict_export_still_records_the_custom_ops(device):
    """torch.export's non-strict tracing hands the ops fake tensors too (while compiling): the kernels' custom ops
    take them there, not the reference (the fake-tensor routing must not reach export)."""
    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            return kernels.rms_norm(kernels.attention(q, k, v, causal=True), (24,))

    q, k, v = (torch.randn(1, 2, n, 24, device=device) for n in (5, 7, 7))
    program = torch.export.export(Block(), (q, k, v), strict=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"kernels.flash_attention_forward.default", "kernels.norm_forward.default"} <= targets
    torch.testing.assert_close(program.module()(q, k, v), Block()(q, k, v), rtol=0, atol=0)


def test_forward_mode_ad_error_names_the_function_called(device):
    """flash_attn_func refused forward-mode AD naming "kernels.attention", which it calls, rather than itself."""
    q, k, v = (torch.randn(1, n, 2, 24, device=device) for n in (5, 7, 7))
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32, device=device), torch.tensor([0, 3, 7], dtype=torch.int32,
                                                                                        device=device)
    cases = [
        ("kernels.flash_attn.flash_attn_func", lambda: torch.func.jvp(
            lambda q: flash_attn.flash_attn_func(q, k, v), (q,), (torch.ones_like(q),))),
        ("kernels.flash_attn.flash_attn_varlen_func", lambda: torch.func.jvp(
            lambda q: flash_attn.flash_attn_varlen_func(q, k[0], v[0], *offsets, 3, 4), (q[0],), (q[0],))),
        ("kernels.attention", lambda: torch.func.jvp(
            lambda q: kernels.attention(q, k.transpose(1, 2), v.transpose(1, 2)), (q.transpose(1, 2),),
            (q.transpose(1, 2),))),
        ("kernels.attention_varlen", lambda: torch.func.jvp(
            lambda q: kernels.attention_varlen(q, k[0], v[0], *offsets, 3, 4), (q[0],), (q[0],))),
    ]
    for name, call in cases:
        with pytest.raises(NotImplementedError, match=f"^{name}: forward-mode AD"):
            call()
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="^kernels.flash_attn.flash_attn_func: "):
        flash_attn.flash_attn_func(fwAD.make_dual(q, torch.ones_like(q)), k, v)


def _decode(device):
    """attention_with_kvcache appending one token to caches of 3 and 5 positions (tensors made on ``device``)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 4, 24, device=device), *torch.randn(2, 2, 1, 2, 24, device=device)
    k_cache, v_cache = torch.randn(2, 2, 9, 2, 24, device=device)
    seqlens = torch.tensor([3, 5], dtype=torch.int32, device=device)
    return kernels.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True)


def test_fake_and_meta_tensors_through_decoding(device):
    """attention_with_kvcache raised "cannot run on cpu tensors" under an eager FakeTensorMode, and the same for
    meta ones: both now run its op's fake implementation (as torch.compile does), out shaped as the kernels'."""
    real = _decode(device)
    with FakeTensorMode():
        fake = _decode(device)
    assert isinstance(fake, FakeTensor) and _layouts(fake) == _layouts(real)
    meta = _decode("meta")
    assert meta.is_meta and meta.shape == real.shape and meta.dtype == real.dtype


def test_fake_tensors_in_varlen_raise_its_clear_error(device):
    """attention_varlen under an eager FakeTensorMode raised torch's DataDependentOutputException (the fallback's
    offset check read the fake offsets): the NotImplementedError meta tensors get, naming fake ones."""
    with FakeTensorMode():
        q, k = torch.randn(9, 4, 24, device=device), torch.randn(11, 2, 24, device=device)
        cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=device) for c in ([0, 4, 9], [0, 5, 11]))
        with pytest.raises(NotImplementedError, match="cannot run on meta or fake tensors"):
            kernels.attention_varlen(q, k, k, cu_q, cu_k, 5, 6)
