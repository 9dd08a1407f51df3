"""``patch()`` on Hugging Face transformers models (tiny configs with random weights, no download): logits,
cached generation (dynamic and static caches), sliding windows, packed sequences and gradients equal to eager
attention, with no (B, Nq, Nk) mask built on the way; what the kernel does not take falls back exactly."""
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels.attention import sdpa
from transformer import hf, patch

transformers = pytest.importorskip("transformers")
_REFERENCE = kernels.reference.attention  # captured at import: hf_kernel_only replaces reference.attention

def tiny_llama(layers: int = 2):
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=72, num_hidden_layers=layers,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=None, pad_token_id=0,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


def tiny_mistral():
    """Sliding window 4, shorter than the test sequences, on every layer."""
    config = transformers.MistralConfig(vocab_size=50, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=4, bos_token_id=0, eos_token_id=None, pad_token_id=0,
                                        attn_implementation="eager")
    return transformers.MistralForCausalLM(config).eval()


def tiny_qwen2():
    """One sliding-window layer (window 3) and one full-attention layer: two masks per forward."""
    config = transformers.Qwen2Config(vocab_size=50, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                      use_sliding_window=True, sliding_window=3,
                                      layer_types=["sliding_attention", "full_attention"], bos_token_id=0,
                                      eos_token_id=None, pad_token_id=0, attn_implementation="eager")
    return transformers.Qwen2ForCausalLM(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=50, n_embd=48, n_layer=2, n_head=3, n_positions=64,
                                     bos_token_id=0, eos_token_id=None, pad_token_id=0,
                                     attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).eval()


def padding(batch, length, side):
    mask = torch.ones(batch, length, dtype=torch.long)
    if side == "left":
        mask[0, :4] = 0
    else:
        mask[1, length - 5:] = 0
    return mask


@pytest.mark.parametrize("build,side", [(tiny_llama, "left"), (tiny_gpt2, "right"), (tiny_mistral, "right"),
                                        (tiny_qwen2, "left")])
def test_patched_hugging_face_model_gives_the_eager_logits_padded_or_not(build, side, device, hf_kernel_only):
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


@pytest.mark.parametrize("build,cache", [(tiny_llama, "dynamic"), (tiny_gpt2, "dynamic"), (tiny_mistral, "dynamic"),
                                         (tiny_qwen2, "dynamic"), (tiny_llama, "static"), (tiny_mistral, "static")])
def test_patched_hugging_face_model_generates_the_eager_tokens_with_a_cache(build, cache, device, hf_kernel_only):
    """Decoding past the sliding windows; a static cache holds more key slots than tokens (causal alignment)."""
    model = build().to(device)
    ids = torch.randint(1, 50, (2, 7), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # generation pads on the left
    settings = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=True,
                    cache_implementation=cache)
    with torch.no_grad():
        expected = model.generate(ids, **settings)
        got = patch(model).generate(ids, **settings)
    assert got.shape == (2, 10)
    assert torch.equal(got, expected)


def test_hugging_face_training_backward_matches_eager(device, hf_kernel_only):
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


def tiny_deepseek_v3():
    """Multi-head latent attention: q and k of head dim 16 (8 without rotary + 8 rotary), v of 12."""
    config = transformers.DeepseekV3Config(vocab_size=50, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                                           n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                           first_k_dense_replace=1, n_group=1, topk_group=1,
                                           max_position_embeddings=64, bos_token_id=0, eos_token_id=None,
                                           pad_token_id=0, attn_implementation="eager")
    return transformers.DeepseekV3ForCausalLM(config).eval()


def test_latent_attention_with_a_narrower_value_runs_the_kernel_like_eager(device, hf_kernel_only):
    """DeepSeek V3's MLA: v's head dim (12) is below q's and k's (16); logits, cached tokens and gradients are
    eager's, every call on the kernels (each forward raised in check_qkv before: k's and v's shapes differ)."""
    model = tiny_deepseek_v3().to(device)
    ids = torch.randint(1, 50, (2, 7), device=device)
    mask = padding(2, 7, "left").to(device)
    settings = dict(attention_mask=mask, max_new_tokens=3, do_sample=False)
    labels = ids.clone()
    labels[0, :5] = -100  # targets predicted from padded positions
    with torch.no_grad():
        expected_logits, expected_tokens = model(ids, attention_mask=mask).logits, model.generate(ids, **settings)
    expected_loss = model(ids, attention_mask=mask, labels=labels).loss
    expected_loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    patch(model)
    with torch.no_grad():
        logits, tokens = model(ids, attention_mask=mask).logits, model.generate(ids, **settings)
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected_logits[real], rtol=1e-4, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert expected
    for name, grad in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("value_dim", [5, 12])
def test_a_value_head_dim_other_than_qs_runs_with_zeros_appended(value_dim, device, hf_kernel_only):
    """v narrower (5) or wider (12) than q and k (8), scale left to its default (q's 1/sqrt(8)): torch's SDPA."""
    module = nn.Module()
    module.is_causal = True
    q, k = torch.randn(2, 4, 6, 8, device=device), torch.randn(2, 2, 6, 8, device=device)
    v = torch.randn(2, 2, 6, value_dim, device=device)
    out, weights = hf.hf_attention(module, q, k, v, None)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert weights is None and out.shape == (2, 6, 4, value_dim)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_masks_the_kernel_cannot_take_fall_back_to_torch_and_stay_correct(device):
    """A bool mask with holes (not one run of keys per row) goes to torch's SDPA, giving the eager result."""
    from transformer.hf import hf_attention

    module = nn.Module()
    module.is_causal = True
    q = torch.randn(2, 4, 6, 8, device=device).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous views
    k, v = torch.randn(2, 2, 6, 8, device=device), torch.randn(2, 2, 6, 8, device=device)
    mask = torch.rand(2, 1, 6, 6, device=device) > 0.4
    mask[..., 0] = True
    out, weights = hf_attention(module, q, k, v, mask, scaling=0.3)
    expected = _REFERENCE(q, k, v, scale=0.3, mask=mask)
    assert weights is None and out.shape == (2, 6, 4, 8)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_softcap_with_a_mask_the_kernel_cannot_take_runs_eager_attention_and_says_so(device, monkeypatch):
    """kernels.scaled_dot_product_attention has no softcap: with transformers' dense mask, Gemma 2's eager
    attention runs the call, with a warning naming the keyword."""
    config = transformers.Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       attn_logit_softcapping=0.5, attn_implementation="eager")
    module = transformers.Gemma2ForCausalLM(config).eval().model.layers[0].self_attn.to(device)
    q = torch.randn(1, 4, 6, 8, device=device)
    k, v = torch.randn(1, 2, 6, 8, device=device), torch.randn(1, 2, 6, 8, device=device)
    mask = torch.rand(1, 1, 6, 6, device=device) > 0.4
    mask[..., 0] = True
    monkeypatch.setattr(hf, "_WARNED", set())
    with pytest.warns(UserWarning, match=r"\['softcap'\] \(with transformers' dense mask.*modeling_gemma2's eager"):
        out, _ = hf.hf_attention(module, q, k, v, mask, scaling=0.3, softcap=0.5)
    expected = _REFERENCE(q, k, v, scale=0.3, mask=mask, softcap=0.5)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_is_causal_argument_overrides_the_module_and_position_bias_goes_to_transformers(device, hf_kernel_only):
    """As transformers' own SDPA path: an ``is_causal`` argument wins over ``module.is_causal``; a relative
    ``position_bias`` (T5-style) is added to the scores by transformers' function, not dropped."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformer.hf import hf_attention

    module = nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, 5, 8, device=device) for _ in range(3))
    out, _ = hf_attention(module, q, k, v, None, scaling=0.5, is_causal=False)
    torch.testing.assert_close(out, _REFERENCE(q, k, v, scale=0.5).transpose(1, 2))

    bias = torch.randn(1, 2, 5, 5, device=device)
    with pytest.MonkeyPatch.context() as m:  # transformers' path calls torch's SDPA itself: allow it here
        m.setattr(sdpa, "_TORCH_SDPA", torch.nn.functional.scaled_dot_product_attention)
        m.setattr(hf, "_WARNED", set())
        with pytest.warns(UserWarning, match=r"\['position_bias'\].*transformers' SDPA attention, not the kernel"):
            out, _ = hf_attention(module, q, k, v, None, scaling=0.5, position_bias=bias)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.5, position_bias=bias)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, _REFERENCE(q, k, v, scale=0.5, mask=bias,
                                                                causal=True).transpose(1, 2))


def test_gemma2_softcap_and_sliding_window_run_the_kernel_after_patch(device, hf_kernel_only):
    """Gemma 2 passes ``softcap`` (logit softcapping) and alternates sliding and full layers: eager's logits."""
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


class LargestAttentionShape(TorchDispatchMode):
    """Records every tensor an aten op returns that has two dims equal to ``n`` (a (.., Nq, Nk) mask or score
    matrix when Nq = Nk = n and no other size of the model is n)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and list(t.shape).count(self.n) >= 2:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral])
def test_no_quadratic_mask_is_built_for_a_padded_batch(build, device, hf_kernel_only):
    """Eager attention (the control) makes (B, 1, S, S)-shaped tensors; the patched model makes none."""
    model = build().to(device)
    n = 23  # no other size of the tiny models is 23
    ids = torch.randint(1, 50, (2, n), device=device)
    mask = padding(2, n, "left").to(device)
    with torch.no_grad():
        with LargestAttentionShape(n) as eager:
            model(ids, attention_mask=mask)
        patch(model)
        with LargestAttentionShape(n) as patched:
            model(ids, attention_mask=mask)
    assert eager.seen, "the detector saw no (S, S) tensor under eager attention"
    assert patched.seen == []


def _packed_batch(lengths, device):
    ids = torch.randint(1, 50, (1, sum(lengths)), device=device)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    return ids, position_ids


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_sequences_give_the_separate_sequences_logits_and_gradients(how, device, hf_kernel_only, monkeypatch):
    """Packed as DataCollatorWithFlattening packs them (position_ids restarting at 0, optionally with the
    cu_seq_lens/max_length keywords); attention_varlen runs, and the loss and every gradient equal those of
    running each sequence on its own."""
    lengths = [5, 1, 7]
    model = tiny_llama(layers=1).to(device)  # one layer: its q/k/v gradients need all of varlen's backward
    ids, position_ids = _packed_batch(lengths, device)
    pieces = ids[0].split(lengths)
    expected_loss = sum(model(p[None], labels=p[None]).loss * (len(p) - 1) for p in pieces if len(p) > 1)
    expected_loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    patch(model)
    calls, varlen = [], hf.attention_varlen
    monkeypatch.setattr(hf, "attention_varlen", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    extra = {}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32, device=device)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    logits = model(ids, position_ids=position_ids, use_cache=False, **extra).logits[0]  # packing needs no cache
    targets = torch.cat([torch.cat([p[1:], p.new_full((1,), -100)]) for p in pieces])
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    loss.backward()
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral])
def test_a_float64_model_runs_torch_ops_with_eager_results(build, device, monkeypatch):
    """A patched float64 model raised the kernels' dtype TypeError in every layer; float64 attention now runs the
    package's torch-op reference (as its norms run torch's ops): transformers' SDPA path's logits on the real
    tokens of a left-padded batch (its eager path gives NaN there in float64: the padded rows' NaN times a zero
    probability), its loss gradients, and packed sequences' (cu_seq_lens) the separate sequences'."""
    model = build().to(device).double()
    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(kernels, "attention", None)  # no kernel entry point is reached in float64
    ids = torch.randint(1, 50, (2, 9), device=device)
    mask = padding(2, 9, "left").to(device)
    expected = model(ids, attention_mask=mask).logits
    model(ids, labels=ids).loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    patch(model)
    got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    # eager's RMSNorm computes in fp32 even for a float64 model, the patched norm in float64
    torch.testing.assert_close(got[real], expected[real], rtol=1e-6, atol=1e-6)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    lengths = [5, 1, 3]
    packed, position_ids = _packed_batch(lengths, device)
    cu = torch.tensor([0, 5, 6, 9], dtype=torch.int32, device=device)
    with torch.no_grad():
        got = model(packed, position_ids=position_ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=5, max_length_k=5).logits[0]
        separate = torch.cat([model(p[None]).logits[0] for p in packed[0].split(lengths)])
    torch.testing.assert_close(got, separate, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 3])
def test_packing_anded_with_the_flat_causal_pattern_is_recognised_too(window, device):
    """transformers 5.17 has no remap_positions_for_packed_sequence: it ands the (sliding) causal pattern over the
    flat indices with the packing mask. kernel_mask reads the same packed sequences from it."""
    from transformers import masking_utils as mu

    sequence_ids = torch.tensor([[0] * 5 + [1] + [2] * 7], device=device)
    causal = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    pattern = mu.and_masks(causal, mu.packed_sequence_mask_function(sequence_ids))
    mask = hf.kernel_mask(1, 13, 13, mask_function=pattern)
    assert isinstance(mask, hf.KernelMask) and mask.causal and mask.window == window and mask.max_seqlen == 7
    assert mask.cu_seqlens.tolist() == [0, 5, 6, 13] and mask.cu_seqlens.device == sequence_ids.device


def test_attention_sinks_run_the_kernel_like_gpt_oss_eager(device, hf_kernel_only):
    """GPT-OSS passes ``s_aux`` (a per-head sink logit): the kernel's sinks give its eager attention's output."""
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    module = nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, False
    q = torch.randn(2, 4, 6, 8, device=device)
    k, v = torch.randn(2, 2, 6, 8, device=device), torch.randn(2, 2, 6, 8, device=device)
    module.sinks = sinks = torch.randn(4, device=device)  # GPT-OSS's eager reads the module's sinks; s_aux is passed
    causal = torch.zeros(6, 6, device=device).masked_fill(~torch.ones(6, 6, dtype=torch.bool, device=device).tril(),
                                                          float("-inf"))
    expected, _ = gpt_oss.eager_attention_forward(module, q, k, v, causal[None, None], scaling=0.3, dropout=0.0,
                                                  s_aux=sinks)
    out, _ = hf.hf_attention(module, q, k, v, None, scaling=0.3, s_aux=sinks)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keyword,why", [("mystery_bias", "unknown to it"), ("head_mask", "they change")])
def test_unknown_keywords_run_the_models_eager_attention_never_dropped(keyword, why, monkeypatch):
    """A keyword the kernel does not know (or knows it lacks) reaches the model's own eager attention with the
    dense mask, and the fallback is said once per process."""
    seen = {}

    def eager(module, q, k, v, mask, **kwargs):
        seen.update(kwargs, mask=mask)
        return q.transpose(1, 2), None

    module = tiny_llama().model.layers[0].self_attn
    monkeypatch.setattr(sys.modules[type(module).__module__], "eager_attention_forward", eager)
    monkeypatch.setattr(hf, "_WARNED", set())
    q = torch.randn(1, 6, 4, 8)
    with pytest.warns(UserWarning, match=rf"\['{keyword}'\] \({why}.*modeling_llama's eager attention"):
        hf.hf_attention(module, q, q[:, :2], q[:, :2], None, scaling=0.5, **{keyword: torch.ones(1)})
    assert torch.equal(seen[keyword], torch.ones(1))
    assert torch.equal(seen["mask"][0, 0] == 0, torch.ones(4, 4, dtype=torch.bool).tril())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.hf_attention(module, q, q[:, :2], q[:, :2], None, scaling=0.5, **{keyword: torch.ones(1)})


def test_keywords_that_leave_the_math_alone_run_the_kernel(device, hf_kernel_only, monkeypatch):
    """The keywords models pass along with their forward's (MoE router flags, output flags, loss scaling, Mamba's
    seq_idx) do not send a call off the kernel; ``output_attentions=True`` warns that no weights come back, as
    transformers' SDPA path does."""
    module = nn.Module()
    module.is_causal = True
    q = torch.randn(1, 4, 6, 8, device=device)
    k, v = torch.randn(1, 2, 6, 8, device=device), torch.randn(1, 2, 6, 8, device=device)
    expected = _REFERENCE(q, k, v, scale=0.3, causal=True).transpose(1, 2)
    passed_along = dict(output_router_logits=True, output_hidden_states=True, num_items_in_batch=torch.tensor(5),
                        seq_idx=torch.zeros(1, 6, dtype=torch.int32, device=device), use_cache=False,
                        position_ids=torch.arange(6, device=device)[None])
    assert set(passed_along) <= set(hf._NO_MATH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, weights = hf.hf_attention(module, q, k, v, None, scaling=0.3, **passed_along)
    assert weights is None
    torch.testing.assert_close(out, expected)
    monkeypatch.setattr(hf, "_WARNED", set())
    with pytest.warns(UserWarning, match="output_attentions=True.*None"):
        out, weights = hf.hf_attention(module, q, k, v, None, scaling=0.3, output_attentions=True)
    assert weights is None
    torch.testing.assert_close(out, expected)
