"""transformers' continuous batching (``generate_batch``, its paged cache) on the kernels: after patch(), packed
prefills run attention_varlen and decoding steps attention_with_kvcache on the packed keys, with the greedy tokens
of transformers' own paged SDPA; the model is back on the kernel's implementation afterwards."""
import pytest
import torch

import kernels
from test_hf import tiny_llama, tiny_qwen2
from transformer import hf, patch

transformers = pytest.importorskip("transformers")
configs = pytest.importorskip("transformers.generation.configuration_utils")
if not hasattr(configs, "ContinuousBatchingConfig"):
    pytest.skip("this transformers has no ContinuousBatchingConfig (hf.continuous_batching_on_kernels follows "
                "5.24's continuous-batching API)", allow_module_level=True)

PROMPTS, NEW = (5, 9, 3), 3


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the kernels hf_attention calls ("varlen", "decode"), in order."""
    calls = []
    varlen, decode = hf.attention_varlen, kernels.attention_with_kvcache
    monkeypatch.setattr(hf, "attention_varlen", lambda *a, **k: calls.append("varlen") or varlen(*a, **k))
    monkeypatch.setattr(kernels, "attention_with_kvcache", lambda *a, **k: calls.append("decode") or decode(*a, **k))
    return calls


def _generate_batch(model, prompts, max_batch_tokens=32):
    """Greedy tokens of each prompt through generate_batch, on a small paged cache (16 pages of 16 tokens)."""
    settings = transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    paged = configs.ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=max_batch_tokens)
    out = model.generate_batch(prompts, generation_config=settings, continuous_batching_config=paged)
    return [result.generated_tokens for result in out.values()]


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_generate_batch_runs_the_kernels_and_gives_the_paged_sdpa_tokens(build, device, hf_kernel_only, kernel_calls):
    """The three prompts are prefilled together (one packed batch per layer) and decoded together: NEW - 1
    decoding steps, one query per sequence. Qwen2's sliding layer (window 3) reads its rolling paged cache."""
    model = build().to(device)
    prompts = [torch.randint(1, 50, (n,)).tolist() for n in PROMPTS]
    model.set_attn_implementation("sdpa")  # transformers' paged path: a dense block-diagonal mask per batch
    expected = _generate_batch(model, prompts)
    got = _generate_batch(patch(model), prompts)
    assert len(got) == len(PROMPTS) and all(len(tokens) == NEW for tokens in got)  # no request failed
    assert got == expected
    layers = model.config.num_hidden_layers
    assert kernel_calls == ["varlen"] * layers + ["decode"] * layers * (NEW - 1)
    assert model.config._attn_implementation == hf.ATTENTION_NAME


def test_chunked_prefills_mixed_with_decoding_steps_give_the_paged_sdpa_tokens(device, hf_kernel_only, kernel_calls):
    """At most 8 tokens per batch: the 9-token prompt is prefilled in chunks (queries against keys already in the
    paged cache, bottom-right causal) while the other requests decode in the same packed batches."""
    model = tiny_llama().to(device)
    prompts = [torch.randint(1, 50, (n,)).tolist() for n in PROMPTS]
    model.set_attn_implementation("sdpa")
    expected = _generate_batch(model, prompts, max_batch_tokens=8)
    assert _generate_batch(patch(model), prompts, max_batch_tokens=8) == expected
    assert "varlen" in kernel_calls and "decode" in kernel_calls


def test_packed_decode_reads_each_sequences_keys_in_place(device):
    """One query per packed sequence against keys of lengths 4, 1 and 6 (GQA, window 3): the decode kernel on the
    packed keys as one-token pages gives attention_varlen's output."""
    cu_k = torch.tensor([0, 4, 5, 11], dtype=torch.int32, device=device)
    cu_q = torch.arange(4, dtype=torch.int32, device=device)
    q = torch.randn(1, 4, 3, 8, device=device)
    k, v = torch.randn(1, 2, 11, 8, device=device), torch.randn(1, 2, 11, 8, device=device)
    out = hf._packed_decode(q, k, v, cu_k, 6, True, 0.3, (2, 0), 0.0)
    expected = hf._packed(q, k, v, cu_q, cu_k, 1, 6, True, 0.3, window_size=(2, 0))
    torch.testing.assert_close(out, expected)
