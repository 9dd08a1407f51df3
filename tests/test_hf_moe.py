"""``patch()`` on Hugging Face mixture-of-experts models (tiny configs, random weights, no download): Mixtral,
Qwen3-MoE and GPT-OSS (attention sinks, alternating sliding-window layers) pass keywords such as
``output_router_logits`` to the attention function; every attention call still runs a kernel, with eager's logits
and greedy tokens."""
import pytest
import torch

import kernels
from test_hf import padding
from transformer import patch

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=0, eos_token_id=None,
            pad_token_id=0, attn_implementation="eager")
PROMPT, NEW = 11, 3  # PROMPT > hf.DECODE_MAX_QUERIES: the prefill runs kernels.attention


def _config(name: str, **settings):
    """transformers' config class ``name`` with the tiny sizes and ``settings``; skips where it does not exist."""
    config = getattr(transformers, name, None)
    if config is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return config(**TINY, **settings)


def tiny_mixtral():
    config = _config("MixtralConfig", num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config).eval()


def tiny_qwen3_moe():
    config = _config("Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def tiny_gpt_oss():
    """Sliding window 4 on every other layer; sinks far from their near-zero initialisation."""
    config = _config("GptOssConfig", num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the attention kernels hf_attention launches, in call order."""
    calls = []
    for name in ("attention", "attention_with_kvcache"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _kernel=kernel, _name=name, **k: calls.append(_name)
                            or _kernel(*a, **k))
    return calls


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen3_moe, tiny_gpt_oss])
def test_patched_moe_model_runs_the_kernel_with_eager_logits_and_tokens(build, device, hf_kernel_only, kernel_calls):
    model = build().to(device)
    layers = model.config.num_hidden_layers
    ids = torch.randint(1, 50, (2, PROMPT), device=device)
    mask = padding(2, PROMPT, "left").to(device)
    settings = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, output_router_logits=True).logits
        expected_tokens = model.generate(ids, **settings)
        patch(model)
        got = model(ids, attention_mask=mask, output_router_logits=True).logits
        assert kernel_calls == ["attention"] * layers
        kernel_calls.clear()
        tokens = model.generate(ids, **settings)
    assert len(kernel_calls) == layers * NEW  # the prefill and NEW - 1 decoding steps, every layer on a kernel
    real = mask.bool()  # padded positions' outputs are meaningless
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
    assert tokens.shape == (2, PROMPT + NEW)
    assert torch.equal(tokens, expected_tokens)
