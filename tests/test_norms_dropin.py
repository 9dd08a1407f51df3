"""The norms as a drop-in for torch's and Liger-Kernel's, and for the Hugging Face norms ``patch`` swaps: argument
names, output dtypes of mixed-dtype weights, patched models' outputs, gradients of awkward shapes against a float64
reference (tests/tolerance.py's rule)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import kernels
from tolerance import BACKWARD, assert_close
from transformer import patch

transformers = pytest.importorskip("transformers")

HF_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)
LLAMA_STYLE = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
               "mistral": ("MistralForCausalLM", "MistralConfig")}
HF_MODELS = dict(LLAMA_STYLE, gemma=("GemmaForCausalLM", "GemmaConfig"))


def _hf_model(name: str) -> torch.nn.Module:
    """A one-layer model of family ``name`` with random norm weights (theirs start at ones or zeros)."""
    model_class, config_class = HF_MODELS[name]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**HF_CONFIG)).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_()
    return model


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.norm


@pytest.mark.parametrize("name", HF_MODELS)
@pytest.mark.parametrize("x_dtype, weight_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                                   (torch.float32, torch.bfloat16)])
def test_patched_hf_norms_keep_their_output_dtype_with_a_weight_of_another_dtype(name, x_dtype, weight_dtype):
    """Llama's ``weight * x_hat.to(input_dtype)`` returns the dtype torch promotes weight and x to (fp32 for bf16 x
    and an fp32 weight), Gemma's ``.type_as(x)`` x's: the patched module returns the same dtype, within the
    tolerance rule of the original's own output, and its gradients as the original's."""
    theirs = _final_norm(_hf_model(name)).to(weight_dtype)
    ours = patch(copy.deepcopy(theirs))
    assert type(ours) is kernels.RMSNorm
    x = (torch.randn(3, 32) * 3).to(x_dtype).requires_grad_()
    got, want = ours(x), theirs(x)
    assert got.dtype == want.dtype
    offset = ours.offset
    x64, w64 = x.detach().double(), theirs.weight.detach().double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + ours.eps) * (offset + w64)
    assert_close(got, exact, want)
    dy = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (x, ours.weight), dy)
    want_grads = torch.autograd.grad(want, (x, theirs.weight), dy)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's own, on its CPU op
def test_patched_torch_rms_norm_keeps_x_dtype():
    """torch.nn.RMSNorm returns x's dtype whatever its weight's: so does the module patch makes of it."""
    theirs = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
    ours = patch(copy.deepcopy(theirs))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert ours(x).dtype == theirs(x).dtype == torch.bfloat16
    torch.testing.assert_close(ours(x), theirs(x))
