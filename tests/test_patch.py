"""patch(): the fused kernels go into our GPT and into any module's norms, changing nothing but the implementation
(Hugging Face models: tests/test_hf.py)."""
import copy

import pytest
import torch
import torch.nn as nn

import kernels
from transformer import GPT, GPTConfig, patch


def test_patch_switches_our_gpt_to_the_triton_backend_and_keeps_its_weights():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32))
    before = copy.deepcopy(model.state_dict())
    assert patch(model) is model and model.config.backend == "triton"
    assert all(module.backend == "triton" for module in model.modules() if hasattr(module, "backend"))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


class Tower(nn.Module):
    """A plain module with norms at several depths, one without bias, one RMSNorm, one nn.LayerNorm subclass."""

    class CustomNorm(nn.LayerNorm):  # a subclass may change forward: it must be left alone
        pass

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(13, 21), nn.LayerNorm(21), nn.GELU(), nn.Linear(21, 21))
        self.norm_no_bias = nn.LayerNorm(21, eps=1e-3, bias=False)
        self.rms = nn.RMSNorm(21, eps=1e-4)
        self.custom = Tower.CustomNorm(21)

    def forward(self, x):
        return self.custom(self.rms(self.norm_no_bias(self.inner(x))))


def test_patch_replaces_the_norms_of_any_module_keeping_their_state(device):
    model = Tower().to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms with non-trivial weights and biases
    model.eval()
    x = torch.randn(4, 7, 13, device=device, requires_grad=True)
    expected = model(x)
    expected.square().sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    state = copy.deepcopy(model.state_dict())
    x.grad = None
    model.zero_grad()

    assert patch(model) is model
    assert type(model.inner[1]) is kernels.LayerNorm and type(model.norm_no_bias) is kernels.LayerNorm
    assert type(model.rms) is kernels.RMSNorm and type(model.custom) is Tower.CustomNorm
    assert model.norm_no_bias.eps == 1e-3 and model.rms.eps == 1e-4 and not model.rms.training
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip([p.grad for p in model.parameters()] + [x.grad], expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_patch_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="model"):
        patch(lambda x: x)
