"""``patch()`` on Hugging Face models held by another module (a user's wrapper, torch.compile's): the attention
is switched to the kernel as for a model passed itself, as a GPT inside a wrapper gets the triton backend."""
import copy
import sys

import pytest
import torch
import torch.nn as nn

from transformer import patch

transformers = pytest.importorskip("transformers")
from test_hf import tiny_llama  # noqa: E402  (after the skip: it imports transformers)


class Pair(nn.Module):
    """A user's module holding two Hugging Face models (a policy and a reference model, say)."""

    def __init__(self):
        super().__init__()
        self.policy, self.reference = tiny_llama(), tiny_llama()


def test_hugging_face_models_inside_a_wrapper_get_the_kernel_attention(device):
    pair = Pair().to(device)
    ids = torch.randint(1, 50, (2, 11), device=device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        expected = pair.policy(ids, attention_mask=mask).logits
        assert patch(pair) is pair
        got = pair.policy(ids, attention_mask=mask).logits
    assert [m.config._attn_implementation for m in (pair.policy, pair.reference)] == ["fused_triton"] * 2
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_a_compiled_hugging_face_model_gets_the_kernel_attention():
    model = tiny_llama()
    patch(torch.compile(model))  # only wraps: nothing is compiled until a call
    assert model.config._attn_implementation == "fused_triton"
    assert model.model.layers[0].self_attn.config._attn_implementation == "fused_triton"


def test_only_the_outermost_hugging_face_model_is_switched(monkeypatch):
    """set_attn_implementation on the outer model switches the models nested in it: they are not called again."""
    patch_module = sys.modules["transformer.patch"]  # the module: the package's name ``patch`` is the function
    outer = tiny_llama()
    outer.model.nested = copy.deepcopy(outer)  # a PreTrainedModel inside another (a composite's language model)
    switched = []
    monkeypatch.setattr(patch_module, "use_kernel_attention", switched.append)
    patch(nn.Sequential(outer))
    assert switched == [outer]


def test_a_fallback_inside_a_compiled_graph_keeps_it_whole(device, monkeypatch, fresh_dynamo):
    """A call the kernel does not take (softcap or sinks with transformers' dense mask: Gemma 2's or GPT-OSS's
    compiled static-cache decoding steps) runs the eager attention inside the graph: its warning, which dynamo
    cannot trace, is not issued while compiling (it stopped fullgraph=True)."""
    from transformer import hf

    monkeypatch.setattr(hf, "_WARNED", set())
    config = transformers.Gemma2Config(vocab_size=50, hidden_size=48, intermediate_size=72, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                       attn_logit_softcapping=5.0, attn_implementation="eager")
    module = transformers.Gemma2ForCausalLM(config).model.layers[0].self_attn.to(device)
    q = torch.randn(2, 4, 3, 24, device=device)
    k, v = torch.randn(2, 2, 7, 24, device=device), torch.randn(2, 2, 7, 24, device=device)
    mask = torch.ones(2, 1, 3, 7, dtype=torch.bool, device=device).tril(4)
    mask[0, :, :, :2] = False  # left padding

    def attend(q, k, v, mask):
        return hf.hf_attention(module, q, k, v, mask, scaling=0.2, softcap=5.0)[0]

    got = torch.compile(attend, fullgraph=True, backend="eager")(q, k, v, mask)
    with pytest.warns(UserWarning, match="softcap"):
        expected = attend(q, k, v, mask)
    torch.testing.assert_close(got, expected)
