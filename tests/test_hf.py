"""``patch()`` on Hugging Face transformers models (tiny configs with random weights, no download): logits,
cached generation and gradients equal to eager attention; what the kernel does not take falls back exactly."""
import pytest
import torch
import torch.nn as nn

import kernels
from kernels.attention import sdpa
from transformer import patch

transformers = pytest.importorskip("transformers")

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

    monkeypatch.setattr(sdpa, "_TORCH_SDPA", no_fallback)


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
    from transformer.hf import hf_attention

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


def test_is_causal_argument_overrides_the_module_and_position_bias_goes_to_transformers(kernel_only):
    """As transformers' own SDPA path: an ``is_causal`` argument wins over ``module.is_causal``; a relative
    ``position_bias`` (T5-style) is added to the scores by transformers' function, not dropped."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformer.hf import hf_attention

    module = nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out, _ = hf_attention(module, q, k, v, None, scaling=0.5, is_causal=False)
    torch.testing.assert_close(out, kernels.reference.attention(q, k, v, scale=0.5).transpose(1, 2))

    bias = torch.randn(1, 2, 5, 5)
    with pytest.MonkeyPatch.context() as m:  # transformers' path calls torch's SDPA itself: allow it here
        m.setattr(sdpa, "_TORCH_SDPA", torch.nn.functional.scaled_dot_product_attention)
        out, _ = hf_attention(module, q, k, v, None, scaling=0.5, position_bias=bias)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.5, position_bias=bias)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, kernels.reference.attention(q, k, v, scale=0.5, mask=bias,
                                                                causal=True).transpose(1, 2))


def test_gemma2_softcap_runs_the_models_eager_attention_after_patch(device):
    """Gemma 2 passes ``softcap`` (logit softcapping): the call must give eager's logits, not raise or drop it."""
    config = transformers.Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                       attn_logit_softcapping=0.5, final_logit_softcapping=None, pad_token_id=0,
                                       attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(config).eval().to(device)
    ids = torch.randint(1, 50, (2, 9), device=device)
    mask = padding(2, 9, "left").to(device)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = patch(model)(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "fused_triton"
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
