"""patch() on norms: each plain norm becomes its kernel module in place (same module and Parameter objects, so
requires_grad, optimizers, sharing and hooks carry over), float64 models keep torch's numerics, and Hugging Face's
Llama- and Gemma-style RMSNorms, recognised by what they compute, keep their own numerics."""
import copy

import pytest
import torch
import torch.nn as nn

import kernels
from tolerance import assert_close
from transformer import patch

transformers = pytest.importorskip("transformers")


class LlamaLikeRMSNorm(nn.Module):
    """Llama's math and attribute names, written differently from transformers' class (and outside it)."""

    def __init__(self, n: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, x):
        wide = x.float()
        wide = wide / torch.sqrt(wide.square().mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * wide.to(x.dtype)


class GemmaLikeRMSNorm(nn.Module):
    """Gemma's math: ``1 + weight``, everything in fp32, one rounding at the end."""

    def __init__(self, n: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.eps = eps

    def forward(self, x):
        wide = x.float()
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1 + self.weight.float())).to(x.dtype)


class DoubledRMSNorm(LlamaLikeRMSNorm):
    """Named like an RMS norm, computes something else."""

    def forward(self, x):
        return 2 * super().forward(x)


class OtherEpsRMSNorm(LlamaLikeRMSNorm):
    """Its eps attribute is not the eps it uses."""

    def forward(self, x):
        wide = x.float()
        return self.weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-2)).to(x.dtype)


class Block(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm, self.proj = norm, nn.Linear(10, 10)

    def forward(self, x):
        return self.proj(self.norm(x))


class Net(nn.Module):
    """Two blocks sharing one LayerNorm, a frozen LayerNorm, a torch RMSNorm and a Llama-style RMSNorm."""

    def __init__(self):
        super().__init__()
        shared = nn.LayerNorm(10)
        self.a, self.b = Block(shared), Block(shared)
        self.frozen = nn.LayerNorm(10).requires_grad_(False)
        self.rms = nn.RMSNorm(10, eps=1e-5)
        self.llama = LlamaLikeRMSNorm(10)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.3)

    def forward(self, x):
        return self.llama(self.rms(self.frozen(self.b(self.a(x)))))


def test_patch_keeps_every_module_and_parameter_object():
    model = Net()
    modules, params = list(model.modules()), list(model.parameters())
    patch(model)
    assert all(a is b for a, b in zip(modules, model.modules())) and len(list(model.modules())) == len(modules)
    assert all(a is b for a, b in zip(params, model.parameters())) and len(list(model.parameters())) == len(params)
    assert type(model.a.norm) is kernels.LayerNorm and type(model.frozen) is kernels.LayerNorm
    assert type(model.rms) is kernels.RMSNorm and type(model.llama) is kernels.RMSNorm


def test_a_norm_shared_by_two_parents_stays_one_module():
    model = patch(Net())
    assert model.a.norm is model.b.norm
    assert [name for name, _ in model.named_parameters()].count("a.norm.weight") == 1
    assert "b.norm.weight" not in dict(model.named_parameters())  # one Parameter, listed once


def test_frozen_norms_stay_frozen():
    model = patch(Net())
    assert not model.frozen.weight.requires_grad and not model.frozen.bias.requires_grad
    model(torch.randn(3, 10)).sum().backward()
    assert model.frozen.weight.grad is None and model.rms.weight.grad is not None


def test_an_optimizer_built_before_patch_trains_what_the_patched_model_uses():
    model = Net()
    expected = copy.deepcopy(model)
    x = torch.randn(4, 10)
    for net in (model, expected):
        net.optimizer = torch.optim.SGD(net.parameters(), lr=0.5)  # built before patch
    patch(model)
    for net in (model, expected):
        net(x).square().sum().backward()
        net.optimizer.step()
    for name in ("a.norm.weight", "rms.weight", "llama.weight"):
        got, want = model.get_parameter(name), expected.get_parameter(name)
        assert not torch.equal(got, Net().get_parameter(name))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x), expected(x), rtol=1e-4, atol=1e-5)


def test_hooks_still_fire_and_the_probe_fires_none():
    model = Net()
    calls = []
    model.llama.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    model.llama.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    model.rms.register_forward_hook(lambda module, args, out: out * 0)  # a hook that changes the output
    patch(model)
    assert calls == []  # recognising the Llama-style norm ran its forward, but not through its hooks
    out = model(torch.randn(2, 10))
    assert calls == ["pre", "RMSNorm"]
    torch.testing.assert_close(out, torch.zeros_like(out))  # rms's hook zeroed what llama normalises


def test_a_float64_model_keeps_torch_numerics():
    model = nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.RMSNorm(9), nn.LayerNorm(9, bias=False)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    out = patch(model)(x)
    assert [type(m) for m in model[1:]] == [kernels.LayerNorm, kernels.RMSNorm, kernels.LayerNorm]
    assert torch.equal(out, expected)
    for got, want in zip(torch.autograd.grad(out.sum(), list(model.parameters())), expected_grads):
        assert torch.equal(got, want)


def test_rms_norms_are_recognised_by_what_they_compute():
    """Classes outside transformers: Llama's and Gemma's math written differently are swapped with their options,
    a class named like an RMS norm computing something else, or with another eps than it says, is left alone."""
    holder = nn.ModuleDict(dict(llama=LlamaLikeRMSNorm(12, eps=1e-5), gemma=GemmaLikeRMSNorm(12),
                                doubled=DoubledRMSNorm(12), other_eps=OtherEpsRMSNorm(12)))
    with torch.no_grad():
        for p in holder.parameters():
            p.normal_()
    x = torch.randn(3, 12)
    expected = {name: m(x) for name, m in holder.items()}
    patch(holder)
    options = {name: (type(m), getattr(m, "offset", None), getattr(m, "casting_mode", None), getattr(m, "eps", None))
               for name, m in holder.items()}
    assert options == {"llama": (kernels.RMSNorm, 0.0, "llama", 1e-5), "gemma": (kernels.RMSNorm, 1.0, "gemma", 1e-6),
                       "doubled": (DoubledRMSNorm, None, None, None), "other_eps": (OtherEpsRMSNorm, None, None, None)}
    for name, module in holder.items():
        torch.testing.assert_close(module(x), expected[name], rtol=1e-5, atol=1e-5)


class ThreeDimRMSNorm(LlamaLikeRMSNorm):
    """Llama's math on (B, T, C) inputs only: asserts the rank, as user code does."""

    def forward(self, x):
        assert x.dim() == 3, "expected (B, T, C)"
        return super().forward(x)


class GatedRMSNorm(LlamaLikeRMSNorm):
    """Mamba-2's gated norm: Llama's math, times silu(gate) when a gate is given."""

    def forward(self, x, gate=None):
        y = super().forward(x)
        return y if gate is None else y * nn.functional.silu(gate)


class DropoutRMSNorm(LlamaLikeRMSNorm):
    """Llama's math, then dropout in training: another function in each mode."""

    def forward(self, x):
        return nn.functional.dropout(super().forward(x), 0.5, self.training)


@pytest.mark.parametrize("training", [True, False])
def test_classes_the_probe_cannot_tell_apart_are_left_alone(training):
    """An RMS norm asserting a 3-D input made patch() raise its AssertionError (the probe runs 2-D rows); a gated
    norm was swapped and its gate became the kernels' residual (a tuple came back); a norm with dropout was
    swapped when patched in eval mode, losing the dropout in training. Each is left alone, and computes as before."""
    holder = nn.ModuleDict(dict(three_dim=ThreeDimRMSNorm(12), gated=GatedRMSNorm(12), dropout=DropoutRMSNorm(12),
                                llama=LlamaLikeRMSNorm(12))).train(training)
    patch(holder)
    assert {name: type(m) for name, m in holder.items()} == {
        "three_dim": ThreeDimRMSNorm, "gated": GatedRMSNorm, "dropout": DropoutRMSNorm, "llama": kernels.RMSNorm}
    x, gate = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    torch.testing.assert_close(holder["gated"](x, gate), GatedRMSNorm.forward(holder["gated"], x, gate))


def test_patched_norms_trace_and_script_as_torchs():
    """torch.jit.trace of a patched model raised a Triton error (a launch's sizes traced as tensors), torch.jit.script
    an unsupported annotation: trace now records torch's ops (as the SDPA drop-in's does), and script compiles
    torch's op in the modules' forward; a scripted RMSNorm with options torch's lacks says so."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.RMSNorm(8))
    x = torch.randn(4, 8)
    expected = model(x)
    patch(model)
    assert [type(m) for m in model[1:]] == [kernels.LayerNorm, kernels.RMSNorm]
    for compiled in (torch.jit.trace(model, x), torch.jit.script(model)):
        torch.testing.assert_close(compiled(x), expected)
    assert [type(m) for m in model[1:]] == [kernels.LayerNorm, kernels.RMSNorm]  # the model itself is unchanged
    traced = torch.jit.trace(lambda t: kernels.softmax(t, -1), x)
    torch.testing.assert_close(traced(x), torch.softmax(x, -1))
    with pytest.raises(torch.jit.Error, match="a scripted kernels.RMSNorm computes torch.nn.RMSNorm.s function"):
        torch.jit.script(kernels.RMSNorm(8, offset=1.0))(x)


HF_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)
HF_MODELS = {  # model class, config class, the offset and casting mode its RMSNorm computes with
    "llama": ("LlamaForCausalLM", "LlamaConfig", 0.0, "llama"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", 1.0, "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", 1.0, "gemma"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", 1.0, "gemma"),
}


@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_rms_norms_keep_their_numerics(name):
    """Every RMSNorm of the model becomes kernels.RMSNorm with the model's offset and casting mode; one norm of each
    width is run (the interpreter is slow): float32 as the original, bfloat16 within the tolerance rule of the
    original module's own bfloat16 output."""
    model_class, config_class, offset, casting_mode = HF_MODELS[name]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**HF_CONFIG)).eval()
    originals = {key: m for key, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    with torch.no_grad():
        for m in originals.values():
            m.weight.normal_()
    originals = copy.deepcopy(originals)
    patch(model)
    patched = dict(model.named_modules())
    assert {(type(patched[key]), patched[key].offset, patched[key].casting_mode, patched[key].eps == m.eps
             if hasattr(m, "eps") else patched[key].eps == m.variance_epsilon)
            for key, m in originals.items()} == {(kernels.RMSNorm, offset, casting_mode, True)}
    run = {m.weight.numel(): key for key, m in originals.items()}
    for width, key in run.items():
        theirs, ours = originals[key], patched[key]
        x = torch.randn(2, 3, width) * 3
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        x, theirs, ours = x.bfloat16(), copy.deepcopy(theirs).bfloat16(), copy.deepcopy(ours).bfloat16()
        x64, w64 = x.double(), theirs.weight.double()
        exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + ours.eps) * (offset + w64)
        assert_close(ours(x), exact, theirs(x), name=f"{name} {key}")
