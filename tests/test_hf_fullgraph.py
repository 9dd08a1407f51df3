"""Hugging Face sliding-window models under torch.compile(fullgraph=True) with the kernel registered: the mask
function's pattern is found by calling it on probes (hf._band_pattern), not by reading its closure, which dynamo
cannot do (fullgraph raised Unsupported at ``__closure__``)."""
import pytest
import torch

from test_hf import _packed_batch, tiny_llama, tiny_mistral, tiny_qwen2
from transformer import hf, patch

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # each test compiles the same transformers code anew


def tiny_gemma2():
    """Alternating sliding (window 4) and full layers, with attention logit softcapping."""
    config = transformers.Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                       attn_logit_softcapping=0.5, final_logit_softcapping=None, pad_token_id=0,
                                       attn_implementation="eager")
    return transformers.Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("build", [tiny_mistral, tiny_qwen2, tiny_gemma2])
def test_a_sliding_window_model_compiles_in_one_graph_with_the_eager_logits(build, device, hf_kernel_only):
    """Mistral (window 4 on every layer), Qwen2 (a window-3 layer and a full one: two masks per forward) and
    Gemma 2 (softcap too), a prompt longer than the windows: the compiled patched model gives eager's logits."""
    model = build().to(device)
    ids = torch.randint(1, 50, (2, 9), device=device)
    with torch.no_grad():
        expected = model(ids).logits
        patch(model)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mask_functions_give_their_key_range_or_none():
    """What the probes find: one range of key distances per query that the kernel expresses, (causal, window,
    None); None (transformers' dense mask) for what it does not (a bidirectional window, chunks, a union, a
    padding tensor, an index compared with a constant); packed batches still give their sequence ids in eager."""
    mu = pytest.importorskip("transformers.masking_utils")
    padding = torch.ones(1, 4, dtype=torch.bool)
    ids = torch.tensor([[0, 0, 1, 1]])
    assert hf._pattern(mu.causal_mask_function) == (True, None, None)
    assert hf._pattern(mu.sliding_window_causal_mask_function(3)) == (True, 3, None)
    assert hf._pattern(mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv >= q - 5)) == (True, 6, None)
    assert hf._pattern(mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: q - 2 < kv)) == (True, 2, None)
    for unknown in (mu.sliding_window_bidirectional_mask_function(2),
                    mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)),
                    mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv == 0),
                    mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(padding)),
                    mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv >= 1),
                    mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv <= q + h),
                    lambda b, h, q, kv: kv > q):
        assert hf._pattern(unknown) is None
    causal, window, packed = hf._pattern(mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(ids)))
    assert (causal, window) == (True, None) and torch.equal(packed, ids)


def tiny_llama4_chunked():
    """Llama 4's chunked attention (chunks of 4 keys) on both layers: its mask function reads a tensor."""
    config = transformers.Llama4TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                           intermediate_size_mlp=48, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8, pad_token_id=0, attention_chunk_size=4,
                                           no_rope_layers=[1, 1], num_local_experts=2, moe_layers=[])
    return transformers.Llama4ForCausalLM(config)


@pytest.mark.parametrize("build,use_cache", [(tiny_llama, False), (tiny_llama4_chunked, True)])
def test_a_mask_function_reading_a_tensor_compiles_in_one_graph_with_the_eager_logits_and_gradients(
        build, use_cache, device):
    """Mask functions that index a tensor: transformers' packed-sequence check, which under torch.compile it always
    ands into the causal mask of a forward without a cache and without an attention mask (a training forward with
    use_cache=False), and Llama 4's chunks. The probes give up on them inside the graph (``band & tensor`` stopped
    fullgraph) and the dense mask transformers builds goes to torch's SDPA (the drop-in's reading of it would break
    the graph)."""
    model = build().to(device)
    ids = torch.randint(1, 50, (2, 9), device=device)
    expected = model(ids, use_cache=use_cache).logits
    expected.square().mean().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    patch(model)
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, use_cache=use_cache).logits
    got.square().mean().backward()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for grad, expected_grad in zip((p.grad for p in model.parameters()), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_cache", [False, True])
def test_padding_free_training_with_cu_seq_lens_compiles_in_one_graph(use_cache, device, monkeypatch):
    """DataCollatorWithFlattening's batch (position_ids restarting at 0 and the cu_seq_lens/max_length keywords)
    through a compiled model gives the packed sequences' logits and gradients (the unpatched model's without a
    cache: with one it ignores the packing). With a cache transformers' mask is the causal
    pattern and the keywords run attention_varlen; without one (use_cache=False, as under gradient checkpointing)
    transformers ands its packed-sequence check into a traced mask, which runs as transformers' SDPA path would
    (it raised 'cu_seq_lens_q (packed sequences) together with a padding mask', stopping fullgraph)."""
    model = tiny_llama(layers=1).to(device)  # compiling dominates: one layer shows the mask's and keywords' path
    ids, position_ids = _packed_batch([5, 1, 7], device)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32, device=device)
    packed = dict(position_ids=position_ids, use_cache=use_cache, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=7, max_length_k=7)
    expected = model(ids, **dict(packed, use_cache=False)).logits  # the unpatched model packs without a cache only
    expected.square().mean().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    patch(model)
    calls, varlen = [], hf.attention_varlen
    monkeypatch.setattr(hf, "attention_varlen", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, **packed).logits
    got.square().mean().backward()
    assert len(calls) == (model.config.num_hidden_layers if use_cache else 0)  # traced once per layer
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for grad, expected_grad in zip((p.grad for p in model.parameters()), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_a_gradient_checkpointed_model_compiles_in_one_graph(device):
    """Gradient checkpointing (each decoder layer a checkpoint, a higher-order op inside which dynamo refuses any
    mutation of Python state) with a right-padded batch: the compiled patched model gives the unpatched model's
    logits and gradients."""
    model = tiny_llama(layers=1).to(device)  # compiling dominates: one checkpointed layer shows the path
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(1, 50, (2, 9), device=device)
    mask = torch.ones(2, 9, dtype=torch.long, device=device)
    mask[1, 6:] = 0
    real = mask.bool()
    expected = model(ids, attention_mask=mask, use_cache=False).logits
    expected[real].square().mean().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    patch(model)
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, attention_mask=mask, use_cache=False).logits
    got[real].square().mean().backward()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
    for grad, expected_grad in zip((p.grad for p in model.parameters()), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
