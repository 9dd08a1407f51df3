"""Row ops as a user of torch, Liger-Kernel and Hugging Face meets them: a fused residual norm differentiated through
its residual stream only, and the Liger/Hugging Face casting modes under CUDA autocast (shown on CPU by declaring it
an fp32-autocast device)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _rows as rows_module
from transformer.patch import patch

# numpy's notes on the arithmetic the interpreter does
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")


@pytest.mark.parametrize("rms", [False, True])
def test_only_the_residual_stream_differentiated_leaves_parameter_grads_none(device, rms):
    """With y unused, torch's autograd gives the weight and bias no gradient (they have no path to h): None, not
    zeros, which an optimizer would count as a step (AdamW's weight decay and moments); x and residual get h's."""
    x, residual = (torch.randn(5, 24, device=device, requires_grad=True) for _ in range(2))
    module = (kernels.RMSNorm if rms else kernels.LayerNorm)(24, device=device)
    y, h = module(x, residual)
    dh = torch.randn_like(h)
    h.backward(dh)
    assert all(p.grad is None for p in module.parameters())
    assert torch.equal(x.grad, dh) and torch.equal(residual.grad, dh)


@pytest.fixture
def cuda_like_autocast(monkeypatch, device):
    """Autocast whose fp32 list holds the norms, as CUDA's: on CPU, CPU autocast declared such a device."""
    if device.type == "cpu":
        monkeypatch.setattr(rows_module, "AUTOCAST_FP32_DEVICES", ("cpu",))
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


@pytest.mark.parametrize("offset,casting_mode", [(0.0, "llama"), (0.0, "none"), (1.0, "gemma"), (1.0, "llama")])
def test_cuda_autocast_leaves_liger_modes_in_x_dtype(device, cuda_like_autocast, offset, casting_mode):
    """Autocast's fp32 policy is for torch's rms_norm; Liger's modes and offset are elementwise code it does not
    touch: the same bf16 result as without autocast. torch's own function (no offset, "gemma") still goes to fp32."""
    x = torch.randn(6, 40, dtype=torch.bfloat16, device=device) * 3
    weight = torch.randn(40, dtype=torch.bfloat16, device=device)
    plain = kernels.rms_norm(x, 40, weight, 1e-6, offset=offset, casting_mode=casting_mode)
    with cuda_like_autocast():
        got = kernels.rms_norm(x, 40, weight, 1e-6, offset=offset, casting_mode=casting_mode)
        torchs = kernels.rms_norm(x, 40, weight, 1e-6)
    assert got.dtype == torch.bfloat16 and torch.equal(got, plain)
    assert torchs.dtype == torch.float32


def test_patched_hugging_face_norm_under_cuda_autocast_is_the_class(device, cuda_like_autocast):
    """A bf16 Llama norm, patched to casting mode "llama", keeps the class's bf16 output and roundings under
    autocast (the class is elementwise code autocast leaves alone)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(64, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    norm = norm.bfloat16()
    patched = patch(copy.deepcopy(norm))
    assert type(patched) is kernels.RMSNorm and patched.casting_mode == "llama"
    x = torch.randn(8, 64, dtype=torch.bfloat16, device=device) * 3
    with cuda_like_autocast():
        got, want = patched(x), norm(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert not torch.equal(want, F.rms_norm(x.float(), (64,), norm.weight.float(), 1e-6).bfloat16())
