"""float64 through ``kernels.attention`` (``kernels.reference``'s torch ops, every variant it expresses) and the SDPA
drop-in, and the drop-in under autocast with float masks (nn.MultiheadAttention's float32 masks of 0 and -inf)."""
import pytest
import torch

import kernels
import kernels.reference
from kernels.attention import sdpa
from kernels.attention.mods import document_mask
from tests.tolerance import assert_close
from transformer.model import GPT, GPTConfig

F64 = torch.float64


def _with_grads(q, k, v, dtype, sinks=None, **options):
    """out, lse and the gradients of q, k, v (and sinks) of kernels.attention on copies of the inputs in dtype."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    inputs = [q, k, v]
    if sinks is not None:
        sinks = sinks.detach().to(dtype).requires_grad_()
        inputs.append(sinks)
    out, lse = kernels.attention(q, k, v, return_lse=True, sinks=sinks, **options)
    weights = torch.linspace(-1, 1, out.numel(), dtype=dtype, device=out.device).view(out.shape)
    loss = (out * weights).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
    return (out, lse, *torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("options", [
    dict(causal=True),
    dict(causal=True, window_size=(3, 0), softcap=2.0),
    dict(window_size=(2, 1), alibi_slopes="per batch"),
    dict(attention_chunk=3, causal=True, scale=0.3),
    dict(key_padding_mask="first row empty"),
    dict(sinks="per head"),
])
def test_float64_attention_runs_the_reference_with_every_variant(device, options):
    """float64 q, k, v raised TypeError; they run kernels.reference.attention: the fp32 kernel's numbers within
    fp32 rounding, lse -inf on the same rows and in float64, gradients of q, k, v and sinks."""
    b, h, h_kv, n_q, n_k, d = 2, 4, 2, 5, 9, 24
    q, k, v = torch.randn(b, h, n_q, d, device=device), *torch.randn(2, b, h_kv, n_k, d, device=device)
    if options.get("alibi_slopes") == "per batch":
        options = dict(options, alibi_slopes=torch.rand(b, h, device=device))
    if options.get("key_padding_mask") == "first row empty":
        padding = torch.rand(b, n_k, device=device) > 0.3
        padding[0] = False
        options = dict(options, key_padding_mask=padding)
    if options.get("sinks") == "per head":
        options = dict(options, sinks=torch.randn(h, device=device))
    exact = _with_grads(q, k, v, F64, **options)
    fused = _with_grads(q, k, v, torch.float32, **options)
    assert exact[0].dtype == exact[1].dtype == F64
    assert torch.equal(torch.isinf(exact[1]), torch.isinf(fused[1]))
    for got, kernel in zip(exact, fused):
        torch.testing.assert_close(torch.where(torch.isfinite(got), got, 0), torch.where(torch.isfinite(kernel),
                                   kernel, 0).double(), atol=2e-5, rtol=0)


def test_float64_dropout_keeps_the_kernels_mask(device):
    """float64 dropout draws the kernels' Philox keep-mask, so a float64 call equals the fp32 call from the same
    seed (and attention_dropout_mask's mask)."""
    q, k, v = torch.randn(3, 2, 3, 7, 40, device=device)
    torch.manual_seed(7)
    fp32 = kernels.attention(q, k, v, causal=True, dropout_p=0.4)
    torch.manual_seed(7)
    fp64 = kernels.attention(q.double(), k.double(), v.double(), causal=True, dropout_p=0.4)
    torch.testing.assert_close(fp64, fp32.double(), atol=1e-5, rtol=0)


def test_float64_attention_compiles_whole(device):
    """float64 attention (dropout too) traces into one graph: torch ops, its dropout mask from torch's generator."""
    q, k, v = torch.randn(3, 1, 2, 6, 24, device=device, dtype=F64)
    compiled = torch.compile(lambda q, k, v, p: kernels.attention(q, k, v, causal=True, dropout_p=p),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, 0.0), kernels.attention(q, k, v, causal=True))
    assert compiled(q, k, v, 0.5).shape == q.shape


def test_float64_attention_has_forward_mode_ad(device):
    """float64 runs torch ops, so torch.func.jvp gives torch's tangent (the kernels' refusal does not apply)."""
    q, k, v, tangent = torch.randn(4, 1, 2, 5, 24, device=device, dtype=F64)
    got = torch.func.jvp(lambda q: kernels.attention(q, k, v, causal=True), (q,), (tangent,))
    expected = torch.func.jvp(lambda q: kernels.reference.attention(q, k, v, causal=True), (q,), (tangent,))
    for actual, reference in zip(got, expected):
        torch.testing.assert_close(actual, reference)


def test_float64_mods_raise_a_type_error_naming_float64(device):
    q = torch.randn(1, 1, 4, 8, device=device, dtype=F64)
    mask = kernels.create_block_mask(document_mask(torch.zeros(4, dtype=torch.int32, device=device)), None, None, 4,
                                     4, device=device)
    with pytest.raises(TypeError, match="float64"):
        kernels.attention(q, q, q, mask_mod=mask)


def test_gpt_triton_backend_trains_in_float64():
    """A float64 GPT on the triton backend gives the reference backend's loss and gradients (it raised TypeError)."""
    config = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=48, dropout=0.0)
    model = GPT(config).double()
    idx = torch.randint(0, 37, (2, 11))
    results = []
    for backend in ("reference", "triton"):
        model.set_backend(backend)
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for triton, reference in zip(*results):
        torch.testing.assert_close(triton, reference, atol=1e-12, rtol=1e-12)


def test_gpt_triton_backend_generates_in_float64():
    """A float64 GPT on the triton backend decodes with its cache as the reference backend does (the decode kernel,
    which takes no float64, raised TypeError at the first cached step)."""
    config = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=48, dropout=0.0)
    model = GPT(config).double().eval()
    prompt = torch.randint(0, 37, (2, 4), generator=torch.Generator().manual_seed(0))
    tokens = {}
    for backend in ("reference", "triton"):
        model.set_backend(backend)
        tokens[backend] = model.generate(prompt, 5, temperature=0.0)
    assert tokens["triton"].shape == (2, 9)
    assert torch.equal(tokens["triton"], tokens["reference"])


def test_sdpa_float64_is_torchs_own(device, sdpa_kernel_calls):
    """The drop-in hands float64 to torch's SDPA, the semantics it copies (top-left is_causal, any mask)."""
    q, k, v = torch.randn(1, 2, 3, 7, 24, device=device, dtype=F64), *torch.randn(2, 2, 3, 5, 24, device=device,
                                                                                  dtype=F64)
    mask = torch.randn(7, 5, device=device, dtype=F64)
    for options in (dict(is_causal=True), dict(attn_mask=mask), dict(attn_mask=mask > 0)):
        assert torch.equal(kernels.scaled_dot_product_attention(q, k, v, **options),
                           sdpa._TORCH_SDPA(q, k, v, **options))
    assert not sdpa_kernel_calls


@pytest.mark.parametrize("mask_dtype,hidden", [(torch.float32, float("-inf")), (torch.float32, "lowest"),
                                               (torch.float16, "lowest")])
def test_sdpa_float_mask_under_autocast_runs_the_kernel(monkeypatch, device, sdpa_kernel_calls, mask_dtype, hidden):
    """Under autocast torch adds the float mask cast to autocast's dtype; the drop-in saw a mask of another dtype
    than the cast q and handed every such call (nn.MultiheadAttention's float32 masks under autocast) to torch. The
    mask is judged in its own dtype and memoised on itself: the kernel runs, once analysed for both calls."""
    q, k, v = torch.randn(3, 2, 3, 6, 24, device=device)
    padding = torch.ones(2, 1, 1, 6, dtype=torch.bool, device=device)
    padding[1, ..., 4:] = False
    lowest = torch.finfo(mask_dtype).min if hidden == "lowest" else hidden
    mask = torch.zeros(2, 3, 1, 6, dtype=mask_dtype, device=device).masked_fill(~padding, lowest)
    exact = sdpa._TORCH_SDPA(q.double(), k.double(), v.double(), attn_mask=padding)
    analyses = []
    analyse = sdpa._mask_plan
    monkeypatch.setattr(sdpa, "_mask_plan", lambda *args: analyses.append(args[-1]) or analyse(*args))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        same_precision = sdpa._TORCH_SDPA(q, k, v, attn_mask=mask)
        for _ in range(2):
            out = kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            assert out.dtype == torch.bfloat16
            assert_close(out, exact, same_precision)
    assert len(sdpa_kernel_calls) == 2 and analyses == [mask_dtype]
