"""patch(): the fused kernels go into our GPT, into any module's norms, and into Hugging Face models, changing
nothing but the implementation: tiny Llama (GQA) and GPT-2 built from configs give the eager logits, padded or not,
and the same cached greedy generation."""
import copy
import sys

import pytest
import torch
import torch.nn as nn

import kernels
from transformer import GPT, GPTConfig, patch

transformers = pytest.importorskip("transformers")
ATTENTION_MODULE = sys.modules["kernels.attention"]  # the package attribute of that name is the function


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


# ------------------------------------------------------------------------------------------ Hugging Face


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=None, pad_token_id=0,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=50, n_embd=48, n_layer=2, n_head=3, n_positions=64,
                                     bos_token_id=0, eos_token_id=None, pad_token_id=0,
                                     attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture
def kernel_only(monkeypatch):
    """Fail the test if any attention call falls back to torch's SDPA instead of running the kernel."""
    def no_fallback(*args, **kwargs):
        raise AssertionError("attention fell back to torch's SDPA")

    monkeypatch.setattr(ATTENTION_MODULE, "_TORCH_SDPA", no_fallback)


def padding(batch, length, side):
    mask = torch.ones(batch, length, dtype=torch.long)
    if side == "left":
        mask[0, :4] = 0
    else:
        mask[1, length - 5:] = 0
    return mask


@pytest.mark.parametrize("build,side", [(tiny_llama, "left"), (tiny_gpt2, "right")])
def test_patched_hugging_face_model_gives_the_eager_logits_padded_or_not(build, side, device, kernel_only):
    model = build().to(device)
    ids = torch.randint(1, 50, (2, 11), device=device)
    mask = padding(2, 11, side).to(device)
    with torch.no_grad():
        expected, expected_padded = model(ids).logits, model(ids, attention_mask=mask).logits
        patch(model)
        got, got_padded = model(ids).logits, model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "fused_triton"
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    assert norms and all(type(m) in (kernels.LayerNorm, kernels.RMSNorm) for m in norms)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    real = mask.bool()  # padded positions' outputs are meaningless (eager lets them attend anywhere)
    torch.testing.assert_close(got_padded[real], expected_padded[real], rtol=1e-4, atol=1e-5)
    if side == "left":  # left padding shifts what the real positions see: the mask mattered
        assert not torch.allclose(got_padded[real], got[real], atol=1e-3)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_patched_hugging_face_model_generates_the_eager_tokens_with_a_cache(build, device, kernel_only):
    model = build().to(device)
    ids = torch.randint(1, 50, (2, 7), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # generation pads on the left
    settings = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=True)
    with torch.no_grad():
        expected = model.generate(ids, **settings)
        got = patch(model).generate(ids, **settings)
    assert got.shape == (2, 10)
    assert torch.equal(got, expected)


def test_hugging_face_training_backward_matches_eager(device, kernel_only):
    model = tiny_llama().to(device)
    ids = torch.randint(1, 50, (2, 9), device=device)
    mask = padding(2, 9, "left").to(device)
    labels = ids.clone()
    labels[0, :5] = -100  # targets predicted from padded positions (0..3), whose outputs are meaningless
    expected_loss = model(ids, attention_mask=mask, labels=labels).loss
    expected_loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = patch(model)(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_masks_the_kernel_cannot_take_fall_back_to_torch_and_stay_correct():
    """A bool mask with holes (not one run of keys per row) goes to torch's SDPA, giving the eager result."""
    from transformer.patch import hf_attention

    module = nn.Module()
    module.is_causal = True
    q = torch.randn(2, 4, 6, 8).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, like HF's views
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.rand(2, 1, 6, 6) > 0.4
    mask[..., 0] = True
    out, weights = hf_attention(module, q, k, v, mask, scaling=0.3)
    expected = kernels.reference.attention(q, k, v, scale=0.3, mask=mask)
    assert weights is None and out.shape == (2, 6, 4, 8)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_only_plain_llama_style_rms_norms_are_swapped():
    """A class named *RMSNorm computing something else (Gemma's 1 + weight) keeps its own forward."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    holder = nn.ModuleDict(dict(llama=LlamaRMSNorm(12, eps=1e-5), qwen=Qwen2RMSNorm(12), gemma=GemmaRMSNorm(12)))
    x = torch.randn(3, 12)
    expected = {name: m(x) for name, m in holder.items()}
    patch(holder)
    assert type(holder["llama"]) is kernels.RMSNorm and holder["llama"].eps == 1e-5
    assert type(holder["qwen"]) is kernels.RMSNorm and type(holder["gemma"]) is GemmaRMSNorm
    for name, module in holder.items():
        torch.testing.assert_close(module(x), expected[name])


def test_is_causal_argument_overrides_the_module_and_position_bias_goes_to_transformers(kernel_only):
    """As transformers' own SDPA path: an ``is_causal`` argument wins over ``module.is_causal``; a relative
    ``position_bias`` (T5-style) is added to the scores by transformers' function, not dropped."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformer.patch import hf_attention

    module = nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out, _ = hf_attention(module, q, k, v, None, scaling=0.5, is_causal=False)
    torch.testing.assert_close(out, kernels.reference.attention(q, k, v, scale=0.5).transpose(1, 2))

    bias = torch.randn(1, 2, 5, 5)
    with pytest.MonkeyPatch.context() as m:  # transformers' path calls torch's SDPA itself: allow it here
        m.setattr(ATTENTION_MODULE, "_TORCH_SDPA", torch.nn.functional.scaled_dot_product_attention)
        out, _ = hf_attention(module, q, k, v, None, scaling=0.5, position_bias=bias)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.5, position_bias=bias)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, kernels.reference.attention(q, k, v, scale=0.5, mask=bias,
                                                                causal=True).transpose(1, 2))
