"""``kernels.scaled_dot_product_attention`` assigned over ``F.scaled_dot_product_attention`` inside models that pass
several masks per forward: hybrid models alternate a sliding-window mask with a full one from layer to layer and
encoder-decoders a decoder's causal mask with its cross-attention mask. Each mask tensor is analysed (a host read)
once per forward, not at every layer, and every call runs the kernel with torch's result."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.attention import sdpa
from tolerance import assert_close

transformers = pytest.importorskip("transformers")
_TORCH_SDPA = sdpa._TORCH_SDPA  # captured at import: attention_kernel_only makes the shim's fallback raise


@pytest.fixture
def analyses(monkeypatch):
    """A list that gets one entry per mask analysis (``sdpa._mask_plan``, the call that reads the mask): its id."""
    seen = []
    analyse = sdpa._mask_plan
    monkeypatch.setattr(sdpa, "_mask_plan", lambda mask, *args: seen.append(id(mask)) or analyse(mask, *args))
    return seen


def _masks(device):
    """A causal and a sliding-window (3 keys) bool mask, (2, 1, 6, 6), over the same left padding."""
    keys = torch.ones(2, 6, dtype=torch.bool, device=device)
    keys[1, :2] = False
    i, j = torch.arange(6, device=device)[:, None], torch.arange(6, device=device)
    causal = keys[:, None, None, :] & (j <= i)
    return causal, causal & (j > i - 3)


def test_alternating_masks_are_analysed_once_each(device, attention_kernel_only, sdpa_kernel_calls, analyses):
    """Layers alternating two masks (Gemma 2/3, Qwen2 with layer_types): two analyses for six layers (it was six:
    the memo kept the last mask only); a mask modified in place is analysed again and gives its new answer."""
    q, k, v = (torch.randn(2, 4, 6, 16, device=device) for _ in range(3))
    causal, window = _masks(device)
    outs = [kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask) for mask in (causal, window) * 3]
    assert analyses == [id(causal), id(window)] and len(sdpa_kernel_calls) == 6
    for out, mask in zip(outs, (causal, window) * 3):
        torch.testing.assert_close(out, _TORCH_SDPA(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    causal[1, 0, 5, 3] = False  # in place: a hole in the last query's keys, neither padding nor a band
    window[0, 0, 5, 5] = False  # in place: key 5 hidden from the one query that saw it, a padded key now
    with pytest.raises(AssertionError, match="torch's SDPA"):  # analysed again: not the kernel's mask any more
        kernels.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    out = kernels.scaled_dot_product_attention(q, k, v, attn_mask=window)
    assert analyses[2:] == [id(causal), id(window)]
    torch.testing.assert_close(out, _TORCH_SDPA(q, k, v, attn_mask=window), atol=1e-5, rtol=1e-5)


def test_the_memo_keeps_the_last_four_masks(device, sdpa_kernel_calls, analyses):
    """Four masks (an encoder-decoder's three and one more) are each analysed once; a fifth evicts the oldest."""
    q, k, v = (torch.randn(1, 2, 6, 8, device=device) for _ in range(3))
    masks = [torch.ones(1, 1, 6, 6, dtype=torch.bool, device=device).tril(d) for d in range(5)]
    for mask in masks[:4] * 2:
        kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert analyses == [id(m) for m in masks[:4]]
    for mask in (masks[4], masks[0]):
        kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert analyses[4:] == [id(masks[4]), id(masks[0])] and len(sdpa_kernel_calls) == 10


def _config(cls, **options):
    return cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, pad_token_id=0, attn_implementation="sdpa", **options)


def test_a_hybrid_model_reads_each_mask_once_per_forward(monkeypatch, device, sdpa_kernel_calls, analyses):
    """Qwen2 with sliding and full layers alternating, left-padded: every call runs the kernel, the two masks are
    analysed once each per forward (four times in all before), logits and gradients are torch's SDPA's in float64
    within the FlashAttention rule."""
    config = _config(transformers.Qwen2Config, num_hidden_layers=4, use_sliding_window=True, sliding_window=3,
                     layer_types=["sliding_attention", "full_attention"] * 2)
    model = transformers.Qwen2ForCausalLM(config).to(device)
    ids = torch.randint(1, 64, (2, 8), device=device)
    padding = torch.ones(2, 8, dtype=torch.long, device=device)
    padding[1, :3] = 0

    def run(dtype, function):
        monkeypatch.setattr(F, "scaled_dot_product_attention", function)
        model.to(dtype).zero_grad()
        logits = model(ids, attention_mask=padding).logits[padding.bool()]
        logits.float().square().mean().backward()
        return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    exact, same_precision = run(torch.float64, _TORCH_SDPA), run(torch.float32, _TORCH_SDPA)
    monkeypatch.setattr(sdpa, "_TORCH_SDPA", lambda *args, **kwargs: pytest.fail("torch's SDPA ran"))
    got = run(torch.float32, kernels.scaled_dot_product_attention)
    assert len(sdpa_kernel_calls) == 4 and len(set(analyses)) == len(analyses) == 2
    assert_close(got[0], exact[0], same_precision[0])
    assert_close(got[1], exact[1], same_precision[1], factor=3.0, name="dq_proj")
