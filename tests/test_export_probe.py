"""Regressions from deploying models as an ML engineer does after training: torch.export with dynamic lengths
(every backend, the exported program saved and loaded), meta-device initialisation (``to_empty``,
``load_state_dict(assign=True)``) keeping the GPT's tied embedding, and a patched model's pickle, state_dict and
dtype conversions."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from transformer import GPT, GPTConfig, patch

CONFIG = dict(vocab_size=17, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)


class Logits(nn.Module):
    """The GPT's logits alone: what an exported serving graph returns."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)[0]


def assert_tied(model: GPT) -> None:
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(list(model.parameters())) == len(list(GPT(model.config).parameters()))


def test_meta_init_then_to_empty_keeps_the_embedding_tied():
    """to_empty makes a new Parameter per module reference (meta tensors take no ``.data``): lm_head and wte became
    two tensors, trained and saved apart, with no error."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**CONFIG))
    model.to_empty(device="cpu")
    assert_tied(model)
    source = GPT(GPTConfig(**CONFIG))
    model.load_state_dict(source.state_dict())
    model(torch.randint(0, 17, (1, 4)), torch.randint(0, 17, (1, 4)))[1].backward()
    assert_tied(model)  # one gradient, the sum of both uses
    model.half()  # conversions that set .data kept it tied before; they still do
    assert_tied(model)


@pytest.mark.parametrize("shared", [True, False], ids=["torch.load", "separate tensors"])
def test_meta_init_then_load_with_assign_keeps_the_embedding_tied(shared):
    """load_state_dict(assign=True) (the meta-init idiom of gpt-fast and torchtune) gave wte and lm_head a
    Parameter each; the model keeps lm_head's values, as a load into the tied model does."""
    source = GPT(GPTConfig(**CONFIG))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # wte and lm_head: one storage
    if not shared:
        state = {name: t.clone() for name, t in state.items()}
    with torch.device("meta"):
        wrapper = nn.Sequential(GPT(GPTConfig(**CONFIG)))  # a GPT inside a model of the user's
    wrapper.load_state_dict({"0." + name: t for name, t in state.items()}, assign=True)
    model = wrapper[0]
    assert_tied(model)
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)
    assert not hasattr(model, "_tie_to_lm_head")
    idx = torch.randint(0, 17, (2, 6))
    torch.testing.assert_close(model(idx)[0], source(idx)[0], rtol=0, atol=0)


def test_assign_load_of_a_checkpoint_without_the_tied_copy_keeps_the_loaded_embedding():
    """safetensors' save_model drops one of two shared tensors: a strict=False load holds wte's, not a meta head."""
    source = GPT(GPTConfig(**CONFIG))
    state = {name: t.clone() for name, t in source.state_dict().items() if name != "lm_head.weight"}
    with torch.device("meta"):
        model = GPT(GPTConfig(**CONFIG))
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    assert missing == ["lm_head.weight"]
    assert_tied(model)
    assert model.lm_head.weight.device.type == "cpu"
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)


def test_a_model_untied_by_its_user_stays_untied_on_load():
    model = GPT(GPTConfig(**CONFIG))
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.load_state_dict({name: t.clone() for name, t in model.state_dict().items()}, assign=True)
    assert model.lm_head.weight is not model.transformer.wte.weight
    model.to_empty(device="cpu")
    assert model.lm_head.weight is not model.transformer.wte.weight


@pytest.mark.parametrize("backend,window", [("sdpa", None), ("sdpa", 4), ("reference", 4), ("triton", None)])
def test_export_with_a_dynamic_length_matches_eager(backend, window):
    """The sdpa backend handed torch's SDPA ``is_causal=n_q > 1`` on symbolic lengths: a TypeError (SymBool) in
    torch.export with a Dim for the length."""
    model = GPT(GPTConfig(**CONFIG, backend=backend, window=window)).eval()
    dims = {"idx": {0: torch.export.Dim("B", max=4), 1: torch.export.Dim("T", max=CONFIG["block_size"])}}
    program = torch.export.export(Logits(model), (torch.randint(0, 17, (2, 8)),), dynamic_shapes=dims)
    for shape in ((1, 1), (3, 19)):
        idx = torch.randint(0, 17, shape)
        torch.testing.assert_close(program.module()(idx), model(idx)[0], rtol=0, atol=0)


def test_sdpa_backend_still_decodes_as_the_reference():
    """The sdpa change keeps one query against a cache unmasked and a whole prompt bottom-right causal."""
    model = GPT(GPTConfig(**CONFIG, backend="reference")).eval()
    idx = torch.randint(0, 17, (2, 5))
    want = model.generate(idx, 6, temperature=0)
    assert torch.equal(model.set_backend("sdpa").generate(idx, 6, temperature=0), want)


def test_exported_triton_gpt_saves_loads_and_keeps_its_checks():
    """The package's ops in the exported graph survive torch.export.save/load; the length bound is a guard."""
    model = GPT(GPTConfig(**CONFIG, backend="triton")).eval()
    program = torch.export.export(Logits(model), (torch.randint(0, 17, (2, 8)),),
                                  dynamic_shapes={"idx": {1: torch.export.Dim("T", max=CONFIG["block_size"])}})
    assert any("kernels.flash_attention_forward" in str(node.target) for node in program.graph.nodes)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    idx = torch.randint(0, 17, (2, 13))
    torch.testing.assert_close(loaded(idx), model(idx)[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"token ids must be in \[0, 17\)"):
        loaded(torch.full((2, 3), 17))


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.lin, self.rms = nn.LayerNorm(16), nn.Linear(16, 16), nn.RMSNorm(16, eps=1e-6)

    def forward(self, x):
        return self.rms(self.lin(self.ln(x)))


def test_patched_module_pickles_copies_loads_and_exports():
    model = patch(Normed())
    x = torch.randn(2, 5, 16)
    want = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert type(other.rms).__name__ == "RMSNorm" and other.rms.casting_mode == model.rms.casting_mode
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
    plain = Normed()
    assert list(plain.state_dict()) == list(model.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(plain(x), want)
    with torch.device("meta"):
        fresh = patch(Normed())
    fresh.to_empty(device="cpu").load_state_dict(plain.state_dict(), strict=True)
    with torch.inference_mode():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    for strict in (False, True):
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {1: torch.export.Dim("T", max=64)}},
                                      strict=strict).run_decompositions()
        longer = torch.randn(2, 9, 16)
        torch.testing.assert_close(program.module()(longer), model(longer), rtol=0, atol=0)


def test_patched_hf_model_exports_with_a_dynamic_length_and_a_padding_mask():
    """hf_attention compared the symbolic length with the decode kernel's 8 queries: export pinned T to <= 8."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = patch(transformers.LlamaForCausalLM(config).eval())

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    length = torch.export.Dim("length", min=2, max=64)
    example = (torch.randint(0, 50, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    exported = torch.export.export(Logits(), example, dynamic_shapes={"ids": {1: length}, "mask": {1: length}})
    assert any("kernels" in str(node.target) and "attention" in str(node.target) for node in exported.graph.nodes)
    for n in (3, 13):
        ids, mask = torch.randint(0, 50, (2, n)), torch.ones(2, n, dtype=torch.long)
        mask[0, :n // 2] = 0
        torch.testing.assert_close(exported.module()(ids, mask), Logits()(ids, mask), atol=1e-5, rtol=1e-5)
