"""``kernels.scaled_dot_product_attention`` as users adopt it: assigned over ``F.scaled_dot_product_attention`` inside
torch's own modules (nn.MultiheadAttention, nn.TransformerEncoderLayer) and nanoGPT-style code, against the same
code with torch's SDPA, and where torch raises or keeps a dtype, the shim does the same."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels.attention import sdpa

FP32 = torch.float32


def _with_each_sdpa(monkeypatch, run):
    """(run() with torch's SDPA, run() with the shim assigned over it), from the same seed."""
    results = []
    for function in (sdpa._TORCH_SDPA, kernels.scaled_dot_product_attention):
        monkeypatch.setattr(F, "scaled_dot_product_attention", function)
        torch.manual_seed(0)
        results.append(run())
    return results


def _assert_all_close(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_runs_the_kernel_and_matches_torch(monkeypatch, device, sdpa_kernel_calls, batch_first):
    """need_weights=False is the path that calls SDPA; cross-attention (Nq != Nk) with kdim/vdim and a bias_kv row."""
    def run():
        mha = nn.MultiheadAttention(16, 2, batch_first=batch_first, kdim=6, vdim=7, add_bias_kv=True, device=device)
        shape = (lambda n, e: (2, n, e)) if batch_first else (lambda n, e: (n, 2, e))
        query = torch.randn(shape(3, 16), device=device, requires_grad=True)
        key, value = torch.randn(shape(5, 6), device=device), torch.randn(shape(5, 7), device=device)
        out, weights = mha(query, key, value, need_weights=False)
        assert weights is None
        out.square().sum().backward()
        return out, query.grad, mha.in_proj_bias.grad, mha.k_proj_weight.grad

    expected, got = _with_each_sdpa(monkeypatch, run)
    assert len(sdpa_kernel_calls) == 1
    _assert_all_close(got, expected)


def test_multihead_attention_masks_run_the_kernel_as_their_float_masks(monkeypatch, device, sdpa_kernel_calls):
    """nn.MultiheadAttention turns a bool key_padding_mask (and attn_mask) into an additive (B, H, 1 or Nq, Nk)
    float mask of 0 and -inf before SDPA: the same mask as a bool one, so the kernel runs it (it went to torch when
    the shim took bool masks only); with is_causal and an attn_mask but no padding mask it passes is_causal alone.
    Outputs and gradients equal torch's."""
    def run(padding: bool):
        mha = nn.MultiheadAttention(8, 2, batch_first=True, device=device)
        x = torch.randn(2, 4, 8, device=device, requires_grad=True)
        pad = torch.tensor([[False] * 4, [False, False, True, True]], device=device) if padding else None
        causal = torch.ones(4, 4, dtype=torch.bool, device=device).triu(1)  # True: not allowed to attend
        out = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, is_causal=True, need_weights=False)[0]
        return out, *torch.autograd.grad(out.square().sum(), (x, mha.in_proj_weight))

    for padding in (True, False):
        sdpa_kernel_calls.clear()
        expected, got = _with_each_sdpa(monkeypatch, lambda: run(padding))
        assert len(sdpa_kernel_calls) == 1
        _assert_all_close(got, expected)


def test_encoder_layer_with_a_padding_mask_trains_through_the_kernel(monkeypatch, device, sdpa_kernel_calls):
    """src_key_padding_mask alone and with a causal src_mask (both float (B, H, ...) masks of 0 and -inf by the time
    they reach SDPA), a row that sees no key included: torch's outputs (zeros there) and gradients."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, device=device)
    x = torch.randn(3, 5, 16, device=device, requires_grad=True)
    pad = torch.zeros(3, 5, dtype=torch.bool, device=device)
    pad[1, 3:] = True
    pad[2, :] = True  # every key padded: each row of batch 2 sees nothing

    for causal in (None, nn.Transformer.generate_square_subsequent_mask(5, device=device)):
        def train_step():
            out = layer.train()(x, src_mask=causal, src_key_padding_mask=pad)
            return out, *torch.autograd.grad(out.nan_to_num().square().sum(), (x, layer.self_attn.in_proj_weight))
        sdpa_kernel_calls.clear()
        expected, got = _with_each_sdpa(monkeypatch, train_step)
        assert len(sdpa_kernel_calls) == 1
        _assert_all_close(got, expected)


@pytest.mark.usefixtures("fresh_dynamo")
def test_masked_calls_compile_in_one_graph_as_torchs_sdpa(monkeypatch, device, sdpa_kernel_calls):
    """Under torch.compile(fullgraph=True) a masked call cannot read its mask (data-dependent: fullgraph failed on
    it, for a bool mask and, once the shim took them, for nn.MultiheadAttention's float masks): torch's SDPA takes
    the traced mask in the graph, with eager's result."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, device=device)
    x = torch.randn(2, 5, 16, device=device)
    pad = torch.zeros(2, 5, dtype=torch.bool, device=device)
    pad[1, 3:] = True
    q = torch.randn(2, 2, 5, 8, device=device)

    def run():
        return (torch.compile(layer, fullgraph=True, backend="aot_eager")(x, src_key_padding_mask=pad),
                torch.compile(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m), fullgraph=True,
                              backend="aot_eager")(q, ~pad[:, None, None, :]))
    expected, got = _with_each_sdpa(monkeypatch, run)
    assert not sdpa_kernel_calls
    _assert_all_close(got, expected)


@pytest.mark.parametrize("case", ["additive -10000", "another dtype", "a bias with a gradient", "heads differ",
                                  "nan"])
def test_masks_that_are_not_a_bool_mask_go_to_torch(device, sdpa_kernel_calls, case):
    """Float masks with values other than 0 and -inf (an additive -10000, a bias), of another dtype than q's, that
    require grad (torch gives the mask its gradient), or whose heads differ: torch's SDPA runs them, as before."""
    q, k, v = (torch.randn(2, 2, 5, 8, device=device) for _ in range(3))
    keep = torch.rand(2, 1, 5, 5, device=device) > 0.3
    mask = torch.zeros(2, 1, 5, 5, device=device).masked_fill(~keep, float("-inf"))
    mask = {"additive -10000": mask.clamp(min=-10000.0), "another dtype": mask.double(),
            "a bias with a gradient": mask.clone().requires_grad_(), "nan": mask.masked_fill(~keep, float("nan")),
            "heads differ": torch.cat([mask, torch.zeros_like(mask)], 1)}[case]
    try:
        expected = sdpa._TORCH_SDPA(q, k, v, attn_mask=mask)
    except RuntimeError as error:  # torch's own error for a mask of another dtype
        with pytest.raises(RuntimeError, match=str(error).split("\n")[0][:40]):
            kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        torch.testing.assert_close(kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected,
                                   equal_nan=True)
    assert not sdpa_kernel_calls


def test_a_mask_made_to_require_grad_after_a_first_call_goes_to_torch(device, sdpa_kernel_calls):
    """A 0/-inf mask the kernel ran once, then made a learnable bias (requires_grad_(), which leaves the tensor's
    version as it was): the shim's memo of its analysis kept running the kernel, so the mask got no gradient
    (out.requires_grad False with only the mask requiring grad). Now torch's SDPA runs it, with torch's gradient."""
    q, k, v = (torch.randn(2, 2, 6, 8, device=device) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 6, device=device)
    mask[0, ..., -2:] = float("-inf")
    kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(sdpa_kernel_calls) == 1
    mask.requires_grad_()
    reference = mask.detach().clone().requires_grad_()
    out = kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected = sdpa._TORCH_SDPA(q, k, v, attn_mask=reference)
    assert out.requires_grad and len(sdpa_kernel_calls) == 1
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mask.grad, reference.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_additive_lowest_value_mask_runs_the_kernel_where_every_row_sees_a_key(device, sdpa_kernel_calls, dtype):
    """``(1 - mask) * finfo.min``, the additive key mask older code builds: where every row sees a key the kernel
    runs it (torch's result: exp of a score plus the lowest value is 0); a batch row with no key is torch's mean of
    v there, not zeros, so such a mask goes to torch."""
    q, k, v = (torch.randn(2, 2, 5, 8, device=device, dtype=dtype) for _ in range(3))
    keys = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], device=device, dtype=dtype)
    for rows, kernel_runs in ((keys, 1), (torch.stack([keys[0], torch.zeros_like(keys[0])]), 0)):
        sdpa_kernel_calls.clear()
        mask = ((1 - rows) * torch.finfo(dtype).min)[:, None, None, :]
        tolerance = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   sdpa._TORCH_SDPA(q, k, v, attn_mask=mask), **tolerance)
        assert len(sdpa_kernel_calls) == kernel_runs


def test_a_mask_of_equal_heads_runs_the_kernel(device, sdpa_kernel_calls):
    """A (B, H, Nq, Nk) bool or 0/-inf float mask whose heads are all the same key-padding-and-causal mask."""
    q, k, v = (torch.randn(2, 3, 5, 8, device=device) for _ in range(3))
    keep = (torch.rand(2, 1, 1, 5, device=device) > 0.3) & torch.ones(5, 5, dtype=torch.bool, device=device).tril()
    for mask in (keep.expand(2, 3, 5, 5), torch.zeros(2, 3, 5, 5, device=device).masked_fill(~keep, float("-inf"))):
        sdpa_kernel_calls.clear()
        torch.testing.assert_close(kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   sdpa._TORCH_SDPA(q, k, v, attn_mask=mask), atol=2e-6, rtol=2e-5)
        assert len(sdpa_kernel_calls) == 1


def test_encoder_layer_trains_through_the_kernel_and_its_eval_fast_path_bypasses_sdpa(monkeypatch, device,
                                                                                        sdpa_kernel_calls):
    """Training calls SDPA (the kernel, with dropout 0); eval under no_grad takes torch's fused
    ``_transformer_encoder_layer_fwd``, which never calls ``F.scaled_dot_product_attention``."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True, device=device)
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)

    def train_step():
        causal = nn.Transformer.generate_square_subsequent_mask(5, device=device)
        out = layer.train()(x, is_causal=True, src_mask=causal)
        return out, *torch.autograd.grad(out.square().sum(), (x, layer.self_attn.in_proj_weight))

    expected, got = _with_each_sdpa(monkeypatch, train_step)
    assert len(sdpa_kernel_calls) == 1
    _assert_all_close(got, expected)
    sdpa_kernel_calls.clear()
    with torch.no_grad():
        expected, got = _with_each_sdpa(monkeypatch, lambda: layer.eval()(x))
    assert not sdpa_kernel_calls
    assert torch.equal(got, expected)


class _CausalSelfAttention(nn.Module):
    """nanoGPT's attention: (B, T, C) in and out, SDPA with is_causal=True and dropout only in training."""

    def __init__(self, embed: int, heads: int, dropout: float):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(embed, 3 * embed), nn.Linear(embed, embed)
        self.heads, self.dropout = heads, dropout

    def forward(self, x):
        batch, length, embed = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.c_attn(x).split(embed, 2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(batch, length, embed))


def test_nanogpt_attention_eval_and_compiled_runs_the_kernel_training_dropout_is_torchs(monkeypatch, device,
                                                                                        sdpa_kernel_calls):
    """Eval (dropout_p 0) and torch.compile(model) with the patched global: the kernel; training with dropout:
    torch's own function, so the same RNG draws give the same result."""
    model = _CausalSelfAttention(16, 2, dropout=0.5).to(device)
    x = torch.randn(2, 7, 16, device=device)
    expected, got = _with_each_sdpa(monkeypatch, lambda: model.eval()(x))
    assert len(sdpa_kernel_calls) == 1
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, atol=2e-5, rtol=2e-5)  # F's attribute is the shim still
    assert len(sdpa_kernel_calls) == 2
    sdpa_kernel_calls.clear()
    expected, got = _with_each_sdpa(monkeypatch, lambda: model.train()(x))
    assert not sdpa_kernel_calls
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 5), (2, 5, 0)], ids=["batch0", "nq0", "nk0"])
def test_bool_mask_with_an_empty_dimension_gives_torchs_result(device, shape):
    """A bool mask on an empty batch, query or key dimension: the shim read the mask's extreme offsets (amin of
    nothing) and raised; torch returns an empty result, or zeros for no keys."""
    batch, n_q, n_k = shape
    q = torch.randn(batch, 2, n_q, 8, device=device)
    k, v = torch.randn(batch, 2, n_k, 8, device=device), torch.randn(batch, 2, n_k, 8, device=device)
    mask = torch.ones(batch, 1, n_q, n_k, dtype=torch.bool, device=device)
    got = kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(got, sdpa._TORCH_SDPA(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("is_causal", [1, 0])
def test_is_causal_must_be_a_bool_as_in_torch(device, is_causal):
    q = torch.randn(1, 2, 3, 8, device=device)
    for function in (sdpa._TORCH_SDPA, kernels.scaled_dot_product_attention):
        with pytest.raises(TypeError, match="is_causal"):
            function(q, q, q, is_causal=is_causal)


@pytest.mark.parametrize("enable_gqa", ["yes", 1])
def test_enable_gqa_must_be_a_bool_as_in_torch(device, enable_gqa):
    """The shim took enable_gqa="yes" (any truthy value) as True and ran the kernel; torch raises."""
    q = torch.randn(1, 2, 3, 8, device=device)
    for function in (sdpa._TORCH_SDPA, kernels.scaled_dot_product_attention):
        with pytest.raises(TypeError, match="enable_gqa"):
            function(q, q[:, :1], q[:, :1], enable_gqa=enable_gqa)


def test_autocast_keeps_float64_as_torch_does(device):
    """Autocast casts floating tensors except float64: fp64 q, k, v stay fp64 (torch's result, exactly), and
    fp32 q with fp64 k, v becomes mixed dtypes, which torch rejects; the shim cast all three and ran the kernel."""
    q64 = torch.randn(1, 2, 3, 8, device=device, dtype=torch.float64)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = kernels.scaled_dot_product_attention(q64, q64, q64, is_causal=True)
        assert got.dtype == torch.float64
        assert torch.equal(got, sdpa._TORCH_SDPA(q64, q64, q64, is_causal=True))
        with pytest.raises(RuntimeError, match="same dtype"):
            kernels.scaled_dot_product_attention(q64.float(), q64, q64)


_RELOADED = r"""
import importlib, torch, torch.nn.functional as F, kernels
from kernels.attention import sdpa
F.scaled_dot_product_attention = kernels.scaled_dot_product_attention
importlib.reload(sdpa)  # as IPython's autoreload does, with the shim assigned over torch's function
q = torch.randn(1, 2, 3, 8)
torch.manual_seed(1)
got = kernels.scaled_dot_product_attention(q, q, q, dropout_p=0.5)  # torch's fallback
torch.manual_seed(1)
assert torch.equal(got, torch._C._nn.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
print("ok")
"""


def test_the_fallback_calls_torchs_own_after_a_reload_over_the_assignment():
    """The fallback captured ``F.scaled_dot_product_attention`` at import; reloaded after the assignment it
    captured the shim itself and recursed until RecursionError."""
    result = subprocess.run([sys.executable, "-c", _RELOADED], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


class _Recording(torch.Tensor):
    """A tensor subclass that records the torch functions it is handed (as DTensor and other wrappers take them)."""
    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", None))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_torch_function_subclass_is_handed_the_sdpa_call_as_torch_does(monkeypatch, device):
    """torch's SDPA hands a ``__torch_function__`` subclass the call itself; the shim launched the kernel on it,
    so the subclass saw only shape reads and copies (DTensor, below, could not be read at all)."""
    q = torch.randn(1, 2, 3, 8, device=device).as_subclass(_Recording)
    monkeypatch.setattr(_Recording, "calls", [])
    out = kernels.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert "scaled_dot_product_attention" in _Recording.calls
    assert type(out) is _Recording
    torch.testing.assert_close(out.as_subclass(torch.Tensor), sdpa._TORCH_SDPA(*(q.as_subclass(torch.Tensor),) * 3,
                                                                               is_causal=True))


_DTENSOR = r"""
import torch, torch.distributed as dist, kernels
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
q = torch.randn(1, 2, 3, 8)
heads = distribute_tensor(q, init_device_mesh("cpu", (1,)), [Shard(1)])  # tensor parallelism shards heads
out = kernels.scaled_dot_product_attention(heads, heads, heads)  # is_causal: DTensor has no CPU strategy for it
assert torch.equal(out.full_tensor(), torch._C._nn.scaled_dot_product_attention(q, q, q))
dist.destroy_process_group()
print("ok")
"""


def test_dtensor_inputs_run_torchs_sdpa():
    """DTensor q, k, v (tensor parallelism; torch's context_parallel wraps F's SDPA and passes DTensors): the shim
    launched on them and raised "Attempted to access the data pointer on an invalid python storage"."""
    result = subprocess.run([sys.executable, "-c", _DTENSOR], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


class _MaskedAttention(nn.Module):
    """SDPA on q, k, v as given, with an optional bool mask (causal without one)."""

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def test_torch_jit_trace_records_torchs_sdpa(monkeypatch, device):
    """Under torch.jit.trace (the TorchScript ONNX exporter traces too) sizes are traced as tensors: the shim's
    Python raised AttributeError ('Tensor' object has no attribute 'bit_length'). It now records torch's op."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", kernels.scaled_dot_product_attention)
    q, k, v = (torch.randn(1, 2, 5, 8, device=device) for _ in range(3))
    traced = torch.jit.trace(_MaskedAttention(), (q, k, v))
    assert "aten::scaled_dot_product_attention" in str(traced.graph)
    q = torch.randn(1, 2, 5, 8, device=device)
    torch.testing.assert_close(traced(q, k, v), sdpa._TORCH_SDPA(q, k, v, is_causal=True))


def test_torch_jit_script_of_multihead_attention_after_the_assignment(monkeypatch, device):
    """Scripting nn.MultiheadAttention compiles torch's forward, which calls F's SDPA: it found the shim and
    raised NotSupportedError (keyword-only arguments). It compiles the shim as torch's op now."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True, device=device).eval()
    x = torch.randn(2, 4, 8, device=device)
    expected = mha(x, x, x, need_weights=False)[0]
    monkeypatch.setattr(F, "scaled_dot_product_attention", kernels.scaled_dot_product_attention)
    scripted = torch.jit.script(mha)
    torch.testing.assert_close(scripted(x, x, x, need_weights=False)[0], expected)


def test_torch_export_keeps_the_kernel_without_a_mask_and_exports_torchs_sdpa_with_one(monkeypatch, device):
    """torch.export cannot break the graph where the shim reads a bool mask's pattern: it failed with
    GuardOnDataDependentSymNode. A masked call exports torch's op; an unmasked one still exports the kernel."""
    q, k, v = (torch.randn(1, 2, 5, 8, device=device) for _ in range(3))
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool, device=device)
    monkeypatch.setattr(F, "scaled_dot_product_attention", kernels.scaled_dot_product_attention)
    for args, op in (((q, k, v), "kernels.flash_attention_forward.default"),
                     ((q, k, v, mask), "aten.scaled_dot_product_attention.default")):
        program = torch.export.export(_MaskedAttention(), args)
        assert op in {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        torch.testing.assert_close(program.module()(*args), _MaskedAttention()(*args), atol=1e-5, rtol=1e-5)


def test_forward_mode_ad_gets_torchs_sdpa(device):
    """A forward-AD dual q (torch.autograd.forward_ad): torch's math backend gives its tangent; the kernel has no
    jvp and raised NotImplementedError ('You must implement the jvp function ...')."""
    q, tangent = torch.randn(1, 2, 3, 8, device=device), torch.randn(1, 2, 3, 8, device=device)
    tangents = []
    for function in (sdpa._TORCH_SDPA, kernels.scaled_dot_product_attention):
        with sdpa_kernel(SDPBackend.MATH), forward_ad.dual_level():
            out = function(forward_ad.make_dual(q, tangent), q, q, is_causal=True)
            tangents.append(forward_ad.unpack_dual(out).tangent)
    assert torch.equal(tangents[1], tangents[0])


def test_sdpa_kernel_math_only_runs_torchs_math_and_fused_backends_run_the_kernel(device, sdpa_kernel_calls):
    """A user forcing SDPBackend.MATH (a reference, double backward) got the kernel; torch's math runs now, bit for
    bit, and a context leaving a fused backend enabled still runs the kernel."""
    q, k, v = (torch.randn(2, 3, 5, 8, device=device) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        got = kernels.scaled_dot_product_attention(q, k, v, is_causal=True)
        expected = sdpa._TORCH_SDPA(q, k, v, is_causal=True)
    assert sdpa_kernel_calls == []
    assert torch.equal(got, expected)
    for backends in ([SDPBackend.FLASH_ATTENTION], [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                     [SDPBackend.CUDNN_ATTENTION]):
        with sdpa_kernel(backends):
            kernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert len(sdpa_kernel_calls) == 3
