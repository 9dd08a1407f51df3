"""The norms as a drop-in for torch's and Liger-Kernel's, and for the Hugging Face norms ``patch`` swaps: argument
names, output dtypes of mixed-dtype weights, patched models' outputs, gradients of awkward shapes against a float64
reference (tests/tolerance.py's rule)."""
import copy
import importlib
import inspect
import io

import pytest
import torch
import torch.nn.functional as F

import kernels
from tolerance import BACKWARD, assert_close
from transformer import patch

transformers = pytest.importorskip("transformers")
norm_module = importlib.import_module("kernels.layernorm")

HF_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)
LLAMA_STYLE = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
               "mistral": ("MistralForCausalLM", "MistralConfig")}
HF_MODELS = dict(LLAMA_STYLE, gemma=("GemmaForCausalLM", "GemmaConfig"))

pytestmark = pytest.mark.usefixtures("rows_kernel_only")


def _hf_model(name: str) -> torch.nn.Module:
    """A one-layer model of family ``name`` with random norm weights (theirs start at ones or zeros)."""
    model_class, config_class = HF_MODELS[name]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**HF_CONFIG)).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_()
    return model


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.norm


@pytest.mark.parametrize("name", HF_MODELS)
@pytest.mark.parametrize("x_dtype, weight_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                                   (torch.float32, torch.bfloat16)])
def test_patched_hf_norms_keep_their_output_dtype_with_a_weight_of_another_dtype(name, x_dtype, weight_dtype):
    """Llama's ``weight * x_hat.to(input_dtype)`` returns the dtype torch promotes weight and x to (fp32 for bf16 x
    and an fp32 weight), Gemma's ``.type_as(x)`` x's: the patched module returns the same dtype, within the
    tolerance rule of the original's own output, and its gradients as the original's."""
    theirs = _final_norm(_hf_model(name)).to(weight_dtype)
    ours = patch(copy.deepcopy(theirs))
    assert type(ours) is kernels.RMSNorm
    x = (torch.randn(3, 32) * 3).to(x_dtype).requires_grad_()
    got, want = ours(x), theirs(x)
    assert got.dtype == want.dtype
    offset = ours.offset
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, theirs.weight))
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + ours.eps) * (offset + w64)
    assert_close(got, exact, want)
    dy = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (x, ours.weight), dy)
    want_grads = torch.autograd.grad(want, (x, theirs.weight), dy)
    exact_grads = torch.autograd.grad(exact, (x64, w64), dy.double())
    for name, g, w, e in zip(("dx", "dweight"), got_grads, want_grads, exact_grads):
        assert g.dtype == w.dtype
        assert_close(g, e, w, BACKWARD, name=name)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's own, on its CPU op
def test_patched_torch_rms_norm_keeps_x_dtype():
    """torch.nn.RMSNorm returns x's dtype whatever its weight's: so does the module patch makes of it."""
    theirs = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
    ours = patch(copy.deepcopy(theirs))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert ours(x).dtype == theirs(x).dtype == torch.bfloat16
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("name", HF_MODELS)
def test_patched_hf_models_keep_their_logits_and_weights(hf_kernel_only, name):
    """A whole patched model (its norms and attention on the kernels): the same state_dict, bit for bit, the
    logits of the unpatched model in float32, and in bfloat16 within the tolerance rule against a float64 copy."""
    model = _hf_model(name)
    copies = {dtype: copy.deepcopy(model).to(dtype) for dtype in (torch.float64, torch.bfloat16)}
    before = {key: t.clone() for key, t in model.state_dict().items()}
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (2, 5))
    with torch.no_grad():
        want = model(ids).logits
        reference, want_low = (copies[dtype](ids).logits for dtype in (torch.float64, torch.bfloat16))
        patch(model)
        patch(copies[torch.bfloat16])
        got = model(ids).logits
        got_low = copies[torch.bfloat16](ids).logits
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[key]) for key, t in model.state_dict().items())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_close(got_low, reference, want_low)


def _norm_call(rms: bool, with_residual: bool, n: int, impl: str):
    """f(x, residual, weight, bias) -> y, or (y, h) with a residual: ours (impl "ours"), or torch's ops in the
    inputs' precision ("torch") or in float64 ("float64")."""
    def call(x, residual, weight, bias):
        if impl == "ours":
            if with_residual:
                return (kernels.add_rms_norm(x, residual, n, weight) if rms
                        else kernels.add_layer_norm(x, residual, n, weight, bias))
            return kernels.rms_norm(x, n, weight) if rms else kernels.layer_norm(x, n, weight, bias)
        h = x + residual if with_residual else x
        wide = (lambda t: t.double()) if impl == "float64" else (lambda t: t)
        y = F.rms_norm(wide(h), (n,), wide(weight)) if rms else F.layer_norm(wide(h), (n,), wide(weight), wide(bias))
        return (y, h) if with_residual else y
    return call


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("n, rows, dtype, weight_dtype, strided, wants", [
    (1, 2, torch.float32, torch.float32, False, "xrwb"),
    (3, 3, torch.float32, torch.float32, True, "xrwb"),
    (1000, 2, torch.bfloat16, torch.float32, False, "xrwb"),
    (4099, 2, torch.float32, torch.float32, True, "wb"),
    (40, 0, torch.float32, torch.float32, False, "xrwb"),
    (40, 3, torch.float16, torch.float16, True, "x"),
    (40, 3, torch.bfloat16, torch.bfloat16, False, "rb"),
])
def test_gradients_against_float64(rms, with_residual, n, rows, dtype, weight_dtype, strided, wants):
    """Output and the gradients of the inputs that want one (x, residual, weight, bias), in torch's dtypes, within
    the tolerance rule: awkward widths, a strided x, zero rows, weights wider than x, requires_grad on some only."""
    x = torch.randn(rows, 2 * n, dtype=dtype)[:, ::2] if strided else torch.randn(rows, n, dtype=dtype)
    inputs = dict(x=x, r=torch.randn(rows, n, dtype=dtype), w=torch.randn(n, dtype=weight_dtype),
                  b=torch.randn(n, dtype=weight_dtype))
    for key, t in inputs.items():
        t.requires_grad_(key in wants)
    used = [t for key, t in inputs.items() if t.requires_grad and (with_residual or key != "r")
            and not (rms and key == "b")]
    cotangents = [torch.randn(rows, n, dtype=dtype) for _ in range(2)]
    results = {}
    for impl in ("ours", "torch", "float64"):
        out = _norm_call(rms, with_residual, n, impl)(*inputs.values())
        outs = out if with_residual else (out,)
        loss = sum((o.double() * dy.double()).sum() for o, dy in zip(outs, cotangents))
        results[impl] = (outs[0], torch.autograd.grad(loss, used) if used else ())
    (y, grads), (y_torch, grads_torch), (y_ref, grads_ref) = results.values()
    assert y.dtype == y_torch.dtype and y.shape == y_torch.shape
    assert_close(y, y_ref, y_torch)
    for i, (g, g_torch, g_ref) in enumerate(zip(grads, grads_torch, grads_ref)):
        assert g.dtype == g_torch.dtype
        assert_close(g, g_ref, g_torch, BACKWARD, name=f"gradient {i}")


def _torch_parameters(fn) -> list:
    """(name, default, kind) of ``fn``'s parameters but keyword-only ones (ours add offset and casting_mode)."""
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()
            if p.kind is not p.KEYWORD_ONLY]


@pytest.mark.parametrize("ours, theirs", [(kernels.layer_norm, F.layer_norm), (kernels.rms_norm, F.rms_norm),
                                          (kernels.LayerNorm.__init__, torch.nn.LayerNorm.__init__),
                                          (kernels.RMSNorm.__init__, torch.nn.RMSNorm.__init__)])
def test_signatures_are_torchs(ours, theirs):
    """Names, order and defaults of torch's arguments, so that keyword calls carry over."""
    assert _torch_parameters(ours) == _torch_parameters(theirs)


def test_keyword_calls_and_errors_use_torchs_argument_names():
    """``input=`` as torch's functions and LayerNorm take it (RMSNorm's forward: ``x=``); a bad input is named
    ``input`` in the error."""
    x, weight, bias = torch.randn(3, 2, 4), torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(kernels.layer_norm(input=x, normalized_shape=[2, 4], weight=weight, bias=bias, eps=1e-3),
                               F.layer_norm(input=x, normalized_shape=[2, 4], weight=weight, bias=bias, eps=1e-3))
    torch.testing.assert_close(kernels.rms_norm(input=x, normalized_shape=(2, 4), weight=weight, eps=None),
                               F.rms_norm(input=x, normalized_shape=(2, 4), weight=weight, eps=None))
    torch.testing.assert_close(kernels.LayerNorm(4)(input=x), torch.nn.LayerNorm(4)(input=x))
    torch.testing.assert_close(kernels.RMSNorm(4)(x=x), torch.nn.RMSNorm(4)(x=x))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        kernels.layer_norm(x.tolist(), 4)
    with pytest.raises(TypeError, match="input must have dtype"):
        kernels.rms_norm(input=x.long(), normalized_shape=4)
    with pytest.raises(ValueError, match="trailing dims of input"):
        kernels.rms_norm(x, 3)
    with pytest.raises(TypeError, match="x must have dtype"):
        kernels.add_rms_norm(x.long(), x, 4)


class SameDtypeRMSNorm(torch.nn.Module):
    """Llama's math, refusing a weight of another dtype than x (as some fused norms do)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        if self.weight.dtype != x.dtype:
            raise RuntimeError("weight and x must share a dtype")
        wide = x.float()
        return self.weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


class FloatOutputRMSNorm(SameDtypeRMSNorm):
    """Llama's math in bf16, but an fp32 weight gives an fp32 x_hat times it: nothing the kernels compute."""

    def forward(self, x):
        wide = x.float()
        xhat = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * (xhat if self.weight.dtype == torch.float32 else xhat.to(x.dtype))


def test_patch_probes_the_weight_dtype_only_where_the_class_takes_it():
    """A class that refuses a weight of another dtype is still patched (Llama's numerics, x's dtype); one whose
    mixed-dtype output the kernels do not compute is left alone."""
    holder = torch.nn.ModuleDict(dict(same=SameDtypeRMSNorm(16), other=FloatOutputRMSNorm(16)))
    x = torch.randn(3, 16)
    want = holder["same"](x)
    patch(holder)
    assert type(holder["same"]) is kernels.RMSNorm and type(holder["other"]) is FloatOutputRMSNorm
    assert (holder["same"].casting_mode, holder["same"].promote_output) == ("llama", False)
    torch.testing.assert_close(holder["same"](x), want)


def test_promoted_output_with_a_residual_and_its_gradients():
    """``promote_output`` with a residual: (weight * x_hat, h) as Llama's norm after ``h = x + residual``, and the
    gradients of x, residual and weight as torch's ops give them."""
    norm = kernels.RMSNorm(24, eps=1e-6, casting_mode="llama", promote_output=True)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = (torch.randn(2, 3, 24, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    y, h = norm(x, residual)
    h_want = x + residual
    wide = h_want.float()
    y_want = norm.weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h_want.dtype)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h_want, norm.weight))
    y_exact = w64 * h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert y.dtype == torch.float32 and h.dtype == torch.bfloat16
    torch.testing.assert_close(h, h_want, rtol=0, atol=0)
    assert_close(y, y_exact, y_want)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), (x, residual, norm.weight), (dy, dh))
    want = torch.autograd.grad((y_want, h_want), (x, residual, norm.weight), (dy, dh))
    dh_exact, dw_exact = torch.autograd.grad(y_exact, (h64, w64), dy.double())
    exact = (dh_exact + dh.double(), dh_exact + dh.double(), dw_exact)  # h = x + residual passes dh on to both
    for name, g, w, e in zip(("dx", "dresidual", "dweight"), got, want, exact):
        assert g.dtype == w.dtype
        assert_close(g, e, w, BACKWARD, name=name)


def test_rms_norm_module_keeps_its_options_through_copies_and_dtype_moves():
    """deepcopy, pickle (torch.save of the module) and ``.to(dtype)`` keep offset, casting mode and
    promote_output; ``reset_parameters`` gives 1 - offset; the state_dict loads into torch's module and back."""
    norm = kernels.RMSNorm(torch.Size([2, 3]), eps=1e-5, offset=1.0, casting_mode="llama", promote_output=True)
    options = lambda m: (m.normalized_shape, m.eps, m.offset, m.casting_mode, m.promote_output)  # noqa: E731
    buffer = io.BytesIO()
    torch.save(norm, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(norm), torch.load(buffer, weights_only=False), copy.deepcopy(norm).to(torch.bfloat16)]
    assert [options(m) for m in copies] == [options(norm)] * 3
    assert copies[2].weight.dtype == torch.bfloat16
    assert "promote_output=True" in repr(norm)
    with torch.no_grad():
        norm.weight.normal_()
    theirs = torch.nn.RMSNorm([2, 3], eps=1e-5)
    theirs.load_state_dict(norm.state_dict())
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.zeros(2, 3))
    norm.load_state_dict(theirs.state_dict())
    assert torch.equal(norm.weight, theirs.weight)


def test_promote_output_must_be_a_bool():
    with pytest.raises(TypeError, match="promote_output must be a bool"):
        kernels.RMSNorm(8, promote_output="yes")


def test_promoted_output_checks_the_weight_it_applies_after_the_norm():
    """The weight ``promote_output`` multiplies by after the norm is checked as the norm checks it (a wrong shape
    would broadcast silently), and a non-tensor input gets the norm's TypeError."""
    norm = kernels.RMSNorm(8, casting_mode="llama", promote_output=True)
    norm.weight = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="weight must have shape normalized_shape"):
        norm(torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        kernels.RMSNorm(8, promote_output=True)([1.0] * 8)
