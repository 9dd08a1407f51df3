"""The GPT's KV cache with gradients and without blocks: a cached forward with grad enabled on the triton backend
(the decode kernel is forward only) and generate(compile=True) of a model with n_layer=0."""
import copy

import pytest
import torch

from test_model import tiny_config, tokens
from transformer import GPT
from transformer.model import KVCache


def _cached_step_grads(model, prompt, step):
    """Logits of ``step`` (B, T) after ``prompt`` in a KVCache, and every parameter's gradient of their sum."""
    model.zero_grad(set_to_none=True)
    cache = KVCache(model.config.block_size)
    with torch.no_grad():
        model(prompt, cache=cache)
    logits, _ = model(step, cache=cache)
    logits.float().pow(2).mean().backward()
    return logits, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("step_length,window", [(1, None), (3, 4)])
def test_a_cached_forward_with_grad_on_the_triton_backend_matches_sdpa(device, step_length, window):
    """The triton backend ran every cached forward through the decode kernel, which has no backward: with grad
    enabled it raised NotImplementedError where the sdpa backend runs. The cached step's logits and every
    gradient now match sdpa's (the new keys' grads flow through the cache's buffers)."""
    model = GPT(tiny_config(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window=window)).to(device).train()
    prompt, step = tokens(length=5).to(device), tokens(length=step_length).to(device)
    expected = _cached_step_grads(copy.deepcopy(model).set_backend("sdpa"), prompt, step)
    got = _cached_step_grads(model.set_backend("triton"), prompt, step)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    assert got[1].keys() == expected[1].keys()
    for name, grad in got[1].items():
        assert grad is not None, name
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_chunks_through_one_cache_with_grad_give_the_uncached_gradients(device, backend):
    """Two cached forwards with grad (a prompt, then its continuation) and one backward over both: the sdpa and
    triton backends raised torch's in-place error (the first chunk's attention had saved views of the cache's
    buffers, which the second chunk's write bumped). Every gradient now equals one uncached forward's over the
    whole sequence, and the cache still serves a no_grad step after."""
    model = GPT(tiny_config(n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).to(device).train()
    idx = tokens(length=6).to(device)
    whole = copy.deepcopy(model)
    whole(idx)[0].pow(2).sum().backward()
    model.set_backend(backend)
    cache = KVCache(model.config.block_size)
    (model(idx[:, :4], cache=cache)[0].pow(2).sum() + model(idx[:, 4:], cache=cache)[0].pow(2).sum()).backward()
    for (name, p), q in zip(model.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        assert model(tokens(length=1).to(device), cache=cache)[0].shape == (2, 1, 50)


def test_generate_compiled_without_blocks_gives_the_eager_tokens(device):
    """n_layer=0 (allowed: embeddings into the head) with compile=True raised decode_step's 'needs a cache a
    forward has filled' (the lengths were allocated by the first layer's cache write). Same tokens as eager."""
    model = GPT(tiny_config(n_layer=0, n_head=2, n_embd=32, backend="triton")).to(device).eval()
    prompt = tokens(length=3).to(device)
    expected = model.generate(prompt, max_new_tokens=4, temperature=0)
    got = model.generate(prompt, max_new_tokens=4, temperature=0, compile=True)
    assert torch.equal(got, expected)
