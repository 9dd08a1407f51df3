"""User-level audit of ``patch()`` on Hugging Face models (tiny configs, random weights, no download): what a
user does beyond a plain forward or generate() runs on the kernels and gives the eager model's answer."""
import copy

import pytest
import torch

from tolerance import FORWARD, assert_close
from transformer import hf, patch

transformers = pytest.importorskip("transformers")


def _no_eager_attention(*args, **kwargs):
    raise AssertionError("the call ran the model's eager attention, not the kernel")


def tiny_mistral(sliding_window=3):
    config = transformers.MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=sliding_window, bos_token_id=0, eos_token_id=None,
                                        pad_token_id=0, attn_implementation="eager")
    return transformers.MistralForCausalLM(config).eval()


def test_packed_cu_seq_lens_with_a_sliding_window_and_the_default_cache_run_each_sequence_alone(device):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True)'s batch on a sliding-window model, with
    use_cache left at its default: transformers skips packing detection when a cache exists, so the mask function
    sees a plain sliding-window pattern (no padding) and the cu_seq_lens keywords say where sequences start. It
    raised 'cu_seq_lens_q (packed sequences) together with a padding mask'."""
    model = tiny_mistral().to(device)
    lengths = [5, 1, 7]
    ids = torch.randint(1, 50, (1, sum(lengths)), device=device)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32, device=device)
    with torch.no_grad():
        expected = torch.cat([model(piece[None]).logits[0] for piece in ids[0].split(lengths)])
        got = patch(model)(ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                           max_length_k=7).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_modernbert_runs_the_kernels_not_its_eager_attention(device, monkeypatch):
    """ModernBERT passes flash-attn's ``deterministic`` flag on every call; the kernels' backward is deterministic,
    so the flag changes nothing. Unknown to hf_attention, it sent every call to the eager attention, with a
    warning."""
    config = transformers.ModernBertConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=64, local_attention=4,
                                           global_attn_every_n_layers=2, pad_token_id=0, attn_implementation="eager")
    model = transformers.ModernBertModel(config).eval().to(device)
    ids = torch.randint(1, 50, (2, 9), device=device)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
        patch(model)
        monkeypatch.setattr(hf, "_eager_attention", _no_eager_attention)
        got = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_autocast_runs_the_kernels_in_autocasts_dtype_as_sdpa_does(hf_kernel_only, device):
    """Under autocast a fp32 Mistral's (Llama's) rotary embedding gives fp32 q and k but its v projection bf16 (fp16 on a
    GPU); transformers' SDPA path runs all three in autocast's dtype (SDPA is on autocast's lower-precision list).
    hf_attention raised 'q, k, v must share one dtype', so mixed-precision training of a patched model failed.
    Logits within the float64 rule: the model in float64, torch's SDPA path under the same autocast the noise."""
    model = tiny_mistral(sliding_window=None).to(device)
    sdpa_model = copy.deepcopy(model)
    sdpa_model.set_attn_implementation("sdpa")
    model64 = copy.deepcopy(sdpa_model).double()
    patch(model)
    ids = torch.randint(1, 50, (2, 9), device=device)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        expected = sdpa_model(ids, labels=ids)
        got = model(ids, labels=ids)
    got.loss.backward()
    with torch.no_grad():
        exact = model64(ids).logits
    assert_close(got.logits, exact, expected.logits, FORWARD)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_model_outside_the_attention_interface_keeps_its_attention_and_gets_kernel_norms(device):
    """Falcon (ALiBi) does not route attention through transformers' AttentionInterface, so patch() cannot switch
    it (transformers says so): it keeps its own attention and gets the kernels' norms only, with the eager model's
    logits and generated tokens, as the README says."""
    import kernels

    config = transformers.FalconConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       alibi=True, pad_token_id=0)
    model = transformers.FalconForCausalLM(config).to(device).eval()
    ids = torch.randint(1, 60, (2, 11), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        want, want_tokens = model(ids, attention_mask=mask).logits, model.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        implementation = model.config._attn_implementation
        patch(model)
        got, tokens = model(ids, attention_mask=mask).logits, model.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert model.config._attn_implementation == implementation != hf.ATTENTION_NAME
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, kernels.LayerNorm) for m in norms)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    assert torch.equal(tokens, want_tokens)
