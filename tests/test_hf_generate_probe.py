"""Hugging Face generation on the kernels for what test_hf_decode / test_hf_paged leave out: Gemma 2 (softcap,
alternating sliding layers) and Phi-3 decoding left-padded batches with dynamic and static caches, beam search,
a second generate() continuing the first one's cache past a sliding window, and continuous batching with
requests that finish at different steps: eager's greedy tokens and per-step scores, every decoding step on
``kernels.attention_with_kvcache`` and no dense mask on the dynamic-cache path."""
import copy

import pytest
import torch

import kernels
from test_hf import tiny_mistral
from transformer import hf, patch

transformers = pytest.importorskip("transformers")


def _config(**options):
    return dict(vocab_size=50, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=None,
                pad_token_id=0, attn_implementation="eager", **options)


def tiny_gemma2():
    """Softcap 5, head dim 24, layers alternating sliding window 4 and full attention (transformers' default)."""
    config = transformers.Gemma2Config(**_config(head_dim=24, attn_logit_softcapping=5.0, sliding_window=4,
                                                 query_pre_attn_scalar=24))
    return transformers.Gemma2ForCausalLM(config).eval()


def tiny_phi3():
    """Sliding window 5 on every layer (fused qkv projection)."""
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**_config(sliding_window=5))).eval()


@pytest.fixture
def calls(monkeypatch):
    """Names of the attention kernels run ("attention", "decode"), and of dense masks built ("dense")."""
    from transformers import masking_utils

    names = []
    attention, decode, dense = kernels.attention, kernels.attention_with_kvcache, masking_utils.sdpa_mask
    monkeypatch.setattr(kernels, "attention", lambda *a, **k: names.append("attention") or attention(*a, **k))
    monkeypatch.setattr(kernels, "attention_with_kvcache", lambda *a, **k: names.append("decode") or decode(*a, **k))
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda *a, **k: names.append("dense") or dense(*a, **k))
    return names


def _generate(model, ids, mask, new, **options):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **options)
    return out, torch.stack(out.scores)


def _left_padded(batch, length, pads, device):
    ids = torch.randint(1, 50, (batch, length), device=device)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("build,cache", [(tiny_gemma2, "dynamic"), (tiny_gemma2, "static"), (tiny_phi3, "static")])
def test_left_padded_generation_decodes_on_the_kernel(build, cache, device, hf_kernel_only, calls):
    """Prompts of 10 tokens (a dense prefill) with 0, 2 and 9 slots of left padding (more than the windows), 6 new
    tokens (past the windows): eager's tokens and scores, 5 decoding steps per layer on the decode kernel; the
    dynamic cache builds no dense mask."""
    model = build().to(device)
    ids, mask = _left_padded(3, 10, (0, 2, 9), device)
    options = dict(cache_implementation="static", disable_compile=True) if cache == "static" else {}
    expected, expected_scores = _generate(model, ids, mask, 6, **options)
    calls.clear()
    got, scores = _generate(patch(model), ids, mask, 6, **options)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-5)
    layers = model.config.num_hidden_layers
    kernel_calls = [c for c in calls if c != "dense"]
    assert kernel_calls == ["attention"] * layers + ["decode"] * layers * 5
    assert cache == "static" or "dense" not in calls


def test_beam_search_reorders_the_cache_the_kernel_reads(device, hf_kernel_only, calls):
    """num_beams=2 on Gemma 2: the cache rows are reordered between steps; short prompts (7 tokens) are prefilled
    on the decode kernel too."""
    model = tiny_gemma2().to(device)
    ids, mask = _left_padded(2, 7, (3, 0), device)
    expected, expected_scores = _generate(model, ids, mask, 4, num_beams=2)
    calls.clear()
    got, scores = _generate(patch(model), ids, mask, 4, num_beams=2)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-5)
    assert set(calls) == {"decode"}


def test_a_second_generate_continues_the_first_ones_cache(device, hf_kernel_only):
    """Multi-turn: generate() again on the first call's sequences plus 3 new tokens, reusing its past_key_values
    (Mistral, window 4, well past it): eager's tokens and scores in both turns."""
    model = tiny_mistral().to(device)
    ids, mask = _left_padded(2, 6, (2, 0), device)
    follow_up = torch.randint(1, 50, (2, 3), device=device)
    results = []
    for current in (model, patch(copy.deepcopy(model))):
        first, _ = _generate(current, ids, mask, 5)
        turn = torch.cat([first.sequences, follow_up], 1)
        turn_mask = torch.cat([mask, torch.ones_like(turn[:, ids.shape[1]:])], 1)
        second, scores = _generate(current, turn, turn_mask, 6, past_key_values=first.past_key_values)
        results.append((first.sequences, second.sequences, scores))
    (first, second, expected_scores), (got_first, got_second, scores) = results
    assert torch.equal(got_first, first) and torch.equal(got_second, second)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-5)


def test_continuous_batching_requests_finishing_at_different_steps(device, hf_kernel_only):
    """Gemma 2 through the continuous-batching manager: prompts of 1 to 13 tokens asking 1 to 7 new tokens (the
    batch shrinks as they finish; 4-token pages, at most 6 tokens per batch: chunked prefills mixed with decoding)
    give each prompt's own greedy generate() tokens, and the model is back on the kernel afterwards."""
    configs = pytest.importorskip("transformers.generation.configuration_utils")
    if not hasattr(configs, "ContinuousBatchingConfig"):
        pytest.skip("this transformers has no ContinuousBatchingConfig")
    model = tiny_gemma2().to(device)
    prompts = [torch.randint(1, 50, (n,)).tolist() for n in (1, 13, 5, 2)]
    new = [7, 1, 4, 6]
    with torch.no_grad():
        expected = [model.generate(torch.tensor([p], device=device), max_new_tokens=n,
                                   do_sample=False)[0, len(p):].tolist() for p, n in zip(prompts, new)]
    patch(model)
    settings = transformers.GenerationConfig(max_new_tokens=max(new), do_sample=False, eos_token_id=None,
                                             pad_token_id=0)
    paged = configs.ContinuousBatchingConfig(page_size=4, num_blocks=32, max_batch_tokens=6)
    manager = model.init_continuous_batching(generation_config=settings, continuous_batching_config=paged)
    manager.start()
    try:
        ids = [manager.add_request(p, max_new_tokens=n) for p, n in zip(prompts, new)]
        results = {}
        for _ in range(120):  # one-second waits: a failed manager ends the test, not the run
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
            if len(results) == len(ids):
                break
    finally:
        manager.stop(block=True)
    assert [results[i].generated_tokens for i in ids] == expected
    assert model.config._attn_implementation == hf.ATTENTION_NAME
