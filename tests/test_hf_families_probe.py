"""``patch()`` across Hugging Face families, from a user's sweep of tiny random-weight models (no download):
encoder-decoder cross-attention, whose keys (the encoder's) outnumber the decoder's queries, must see every
encoder key, with or without the encoder's padding mask, and get that mask as a (B, Nk) key mask, not a dense one."""
import copy

import pytest
import torch

from transformer import hf, patch

transformers = pytest.importorskip("transformers")

ENCODER, DECODER = 13, 6  # more encoder keys than decoder queries; DECODER <= hf.DECODE_MAX_QUERIES


def tiny_bart():
    """Weights wide enough (init_std 0.5) that greedy decoding does not repeat one token."""
    config = transformers.BartConfig(vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0, init_std=0.5,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=None, decoder_start_token_id=2,
                                     forced_eos_token_id=None, attn_implementation="eager")
    return transformers.BartForConditionalGeneration(config).eval()


@pytest.fixture
def masks(monkeypatch):
    """What hf.kernel_mask returns, per call: (q_length, kv_length, the mask)."""
    made = []
    make = hf.kernel_mask

    def recorded(*args, **kwargs):
        mask = make(*args, **kwargs)
        made.append((kwargs["q_length"], kwargs["kv_length"], mask))
        return mask

    monkeypatch.setattr(hf, "kernel_mask", recorded)  # what patch() registers with transformers
    yield made
    monkeypatch.undo()
    for name in (hf.ATTENTION_NAME, hf.PAGED_ATTENTION_NAME):
        hf.register_hf_attention(name)  # the original function again


def _cross(masks):
    return [mask for q_length, kv_length, mask in masks if (q_length, kv_length) == (DECODER, ENCODER)]


def test_cross_attention_without_an_encoder_mask_sees_every_encoder_key(device, hf_kernel_only, masks):
    """The bidirectional pattern has no query alignment: its keys were cut to the decoder's length (Nq < Nk),
    silently attending to the first Nq encoder tokens only."""
    reference = tiny_bart().to(device)
    model = patch(copy.deepcopy(reference))
    ids = torch.randint(3, 50, (2, ENCODER), device=device)
    with torch.no_grad():
        want = reference(input_ids=ids, decoder_input_ids=ids[:, :DECODER]).logits
        got = model(input_ids=ids, decoder_input_ids=ids[:, :DECODER]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    (cross,) = _cross(masks)
    assert isinstance(cross, hf.KernelMask) and not cross.causal and cross.n_keys == ENCODER
    new = dict(max_new_tokens=4, do_sample=False)
    want = reference.generate(input_ids=ids, **new)
    assert len(set(want[:, 1:].flatten().tolist())) > 1  # tokens that tell a wrong attention apart
    assert torch.equal(model.generate(input_ids=ids, **new), want)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_encoder_reaches_cross_attention_as_a_key_mask(side, device, hf_kernel_only, masks):
    """The encoder's (B, Nk) padding mask is a key mask for the decoder's queries too: no (B, 1, Nq, Nk) tensor."""
    reference = tiny_bart().to(device)
    model = patch(copy.deepcopy(reference))
    ids = torch.randint(3, 50, (2, ENCODER), device=device)
    padding = torch.ones(2, ENCODER, dtype=torch.long, device=device)
    if side == "left":
        padding[0, :4] = 0
    else:
        padding[1, ENCODER - 5:] = 0
    inputs = dict(input_ids=ids, attention_mask=padding)
    with torch.no_grad():
        want = reference(**inputs, decoder_input_ids=ids[:, :DECODER]).logits
        got = model(**inputs, decoder_input_ids=ids[:, :DECODER]).logits
    (cross,) = _cross(masks)
    assert isinstance(cross, hf.KernelMask) and torch.equal(cross.key_padding, padding.bool())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fallback_warnings_point_at_the_code_calling_the_attention(monkeypatch):
    """At the model's attention module (here this file), not at hf.py's head-dim wrapper around hf_attention."""
    monkeypatch.setattr(hf, "_WARNED", set())
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    with pytest.warns(UserWarning, match="output_attentions") as record:
        hf.hf_attention(module, q, k, v, None, output_attentions=True)
    assert [warning.filename for warning in record] == [__file__]


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), transformers.LlamaConfig()])
def test_use_kernel_attention_on_a_non_transformers_model_is_a_type_error(model):
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel, got"):
        hf.use_kernel_attention(model)


def test_training_through_cross_attention_gives_eagers_gradients(device, hf_kernel_only):
    """Encoder-decoder training without an encoder mask: every encoder key gets its share of the gradient."""
    reference = tiny_bart().to(device).train()
    model = patch(copy.deepcopy(reference))
    ids = torch.randint(3, 50, (2, ENCODER), device=device)
    labels = ids[:, 1:DECODER + 1].contiguous()
    for each in (reference, model):
        each(input_ids=ids, decoder_input_ids=ids[:, :DECODER], labels=labels).loss.backward()
    for (name, want), got in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4, msg=name)
