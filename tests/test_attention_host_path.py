"""The dense attention launch path's host-side shortcuts (issue #19): runtime arguments reach the kernels by
position in their signatures' order, TMA legality is judged only where a TMA config could run, and a call's
variant and tensors are shared values."""
import math

import numpy as np
import pytest
import torch

import kernels
from kernels import flash_attn, reference
from kernels.attention import api, configs, plan
from kernels.registry import use_config
from aten_ops import AtenOps
from tolerance import BACKWARD, FORWARD, assert_close

_REFERENCE = reference.attention  # captured at import: attention_kernel_only replaces reference.attention


class _Recorder:
    """A kernel in :data:`configs.KERNELS` that records each launch's arguments by parameter name, then runs."""

    def __init__(self, name, real, launched):
        self.name, self.real, self.launched = name, real, launched

    def run(self, *args, grid, warmup, **kwargs):
        assert len(args) + len(kwargs) == len(self.real.arg_names), (self.name, len(args), sorted(kwargs))
        self.launched[self.name] = dict(zip(self.real.arg_names, args), **kwargs)
        self.launched["positional", self.name] = len(args)
        return self.real.run(*args, grid=grid, warmup=warmup, **kwargs)


@pytest.fixture
def launched(monkeypatch):
    """{kernel: {parameter: value}} of every attention launch in the test, and {("positional", kernel): how many
    arguments it took by position}."""
    record = {}
    for name, real in list(configs.KERNELS.items()):
        monkeypatch.setitem(configs.KERNELS, name, _Recorder(name, real, record))
    return record


def _strided(shape, device):
    """A (B, H, N, D) float32 tensor requiring grad whose four strides differ from a contiguous one's."""
    b, h, n, d = shape
    return torch.randn(n, b, d + 3, h, device=device).permute(1, 3, 0, 2)[..., :d].detach().requires_grad_()


def test_every_argument_reaches_its_parameter(launched, device):
    """Non-contiguous q, k, v of different layouts, GQA, key padding, 2-D ALiBi and sinks: each kernel
    parameter (pointers, strides, scalars, constexprs) gets the value it names."""
    q, k, v = _strided((2, 4, 9, 24), device), _strided((2, 2, 11, 24), device), _strided((2, 2, 11, 24), device)
    pad = torch.ones(2, 11, dtype=torch.bool, device=device)
    pad[1, 7:] = False
    slopes = torch.rand(2, 4, device=device)
    sinks = torch.randn(4, device=device)
    out, lse = kernels.attention(q, k, v, causal=True, key_padding_mask=pad, alibi_slopes=slopes, sinks=sinks,
                                 window_size=(5, -1), softcap=20.0, return_lse=True)
    grad = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)  # dO in yet another layout
    out.backward(grad)
    fwd, dkdv, dq = launched["fwd"], launched["dkdv"], launched["dq"]
    for name in ("fwd", "dkdv", "dq"):  # runtime arguments by position, compile-time ones by keyword
        assert launched["positional", name] == configs.KERNELS[name].real.arg_names.index("HEAD_DIM")
    for args in (fwd, dkdv, dq):
        assert args["Q"] is q and args["K"] is k and args["V"] is v
        assert args["ALIBI"].equal(slopes) and args["stride_ab"] == 4 and args["PAD"].shape == (2, 11)
        assert args["stride_pb"] == 11 and args["KV_BOUNDS"].tolist() == [[0, 11], [0, 7]]
        assert (args["H"], args["GROUP"], args["N_Q"], args["N_K"]) == (4, 2, 9, 11)
        assert (args["CAUSAL_SHIFT"], args["WINDOW_SHIFT"], args["ALIBI_SHIFT"]) == (2, -3, 2)
        assert args["qk_scale"] == pytest.approx(24**-0.5 * 1.4426950408889634) and args["softcap"] == 20.0
        assert (args["CAUSAL"], args["WINDOW"], args["SOFTCAP"], args["HEAD_DIM"], args["BLOCK_D"]) == \
            (True, True, True, 24, 32)
        assert args["SEED"] is None and args["CU_SEQLENS_Q"] is None and args["BLOCK_MASK"] is None
        for name, t in (("q", q), ("k", k), ("v", v)):
            assert tuple(args[f"stride_{name}{dim}"] for dim in "bhnd") == t.stride()
        assert (args["stride_lb"], args["stride_lh"]) == (4 * 9, 9)
    assert fwd["SINKS"].equal(sinks) and fwd["O"].data_ptr() == out.data_ptr()
    assert tuple(fwd[f"stride_o{dim}"] for dim in "bhnd") == out.stride()
    for args in (dkdv, dq):
        assert args["DO"] is grad and tuple(args[f"stride_do{dim}"] for dim in "bhnd") == grad.stride()
        assert args["sm_scale"] == pytest.approx(24**-0.5)
    assert dkdv["DK"].shape == k.shape and dkdv["DV"].shape == v.shape and dq["DQ"].shape == q.shape
    assert tuple(dkdv[f"stride_dk{dim}"] for dim in "bhnd") == dkdv["DK"].stride()
    assert tuple(dq[f"stride_dq{dim}"] for dim in "bhnd") == dq["DQ"].stride()


def test_tma_legality_is_judged_only_where_tma_could_run(monkeypatch, launched, device):
    """The common interpreted launch never asks :func:`configs.tma_legal`; a forced TMA config asks it about the
    tensors its kernel streams (and runs on pointers when they are not legal)."""
    if not kernels.INTERPRETED:
        pytest.skip("the interpreter's launch path")
    asked = []
    real = configs.tma_legal
    monkeypatch.setattr(configs, "tma_legal",
                        lambda *tensors, **layout: asked.append(tensors) or real(*tensors, **layout))
    q, k, v = (torch.randn(1, 2, 16, 16, device=device, requires_grad=True) for _ in range(3))
    kernels.attention(q, k, v, causal=True).sum().backward()
    assert asked == []
    strided_k = torch.randn(1, 2, 16, 32, device=device)[..., ::2]  # a head-dim stride of 2: no descriptor
    with torch.no_grad(), use_config("attention_fwd", BLOCK_M=16, BLOCK_N=16, TMA=True):
        kernels.attention(q, k, v)
        assert launched["fwd"]["TMA"] is True
        kernels.attention(q, strided_k, v)
        assert launched["fwd"]["TMA"] is False
    assert [len(tensors) for tensors in asked] == [4, 4] and asked[0][:3] == (q, k, v) and asked[1][1] is strided_k


def test_plain_calls_share_their_variant_and_tensors(monkeypatch, device):
    """A call without masks, slopes, sinks, dropout or mods passes NO_TENSORS, and equal calls one variant."""
    seen = []
    monkeypatch.setattr(api, "attention_op", lambda q, k, v, tensors, variant: seen.append((tensors, variant)) or
                        (q, q[..., 0]))
    q, k, v = (torch.randn(1, 2, 5, 8, device=device) for _ in range(3))
    for _ in range(2):
        api.attention(q, k, v, causal=True, window_size=(3, 0))
    (tensors, variant), (tensors_2, variant_2) = seen
    assert tensors is plan.NO_TENSORS and tensors_2 is plan.NO_TENSORS and variant is variant_2
    assert variant == plan.AttentionVariant(causal=True, scale=1 / math.sqrt(8), window_left=3, window_right=0)


def test_outputs_and_gradients_take_their_inputs_layouts(device):
    """Dense permuted inputs (flash-attn's (B, S, H, D) transposed) give out and gradients laid out as them, so
    flash_attn_func copies nothing; k and v in different layouts still get exact dK and dV (dv is laid out as dk,
    the one set of strides the dK/dV kernel takes). Forward and gradients against float64."""
    torch.manual_seed(0)
    q = torch.randn(2, 13, 4, 24, device=device).transpose(1, 2).requires_grad_()  # (B, H, S, D) view
    k = torch.randn(2, 19, 2, 24, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 2, 19, 24, device=device, requires_grad=True)  # contiguous
    grad_out = torch.randn(2, 4, 13, 24, device=device)
    out = kernels.attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert out.stride() == q.stride() and grads[0].stride() == q.stride()
    results = []
    for dtype in (torch.float32, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        expected = reference.attention(*leaves, causal=True)
        results.append((expected, *torch.autograd.grad(expected, leaves, grad_out.to(dtype))))
    (low, *low_grads), (exact, *exact_grads) = results
    assert_close(out, exact, low, FORWARD)
    for name, grad, grad_exact, grad_low in zip("qkv", grads, exact_grads, low_grads):
        assert_close(grad, grad_exact, grad_low, BACKWARD, name=f"d{name}")
    out_bshd = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    assert out_bshd.is_contiguous() and out_bshd.transpose(1, 2).equal(out)


def _next_leaves(out):
    return [next_fn.variable for next_fn, _ in out.grad_fn.next_functions if next_fn is not None]


def test_flash_attn_func_node_takes_its_inputs_with_no_view_nodes(device):
    """Before: q, k, v reached the kernels' node through TransposeBackward nodes and out left it through another
    (four recorded views, each a host cost in both passes). Now the node takes the (B, S, H, D) tensors themselves;
    out is contiguous (B, S, H, D); forward, gradients and the gradients of lse alone against float64."""
    torch.manual_seed(0)
    q = torch.randn(2, 13, 4, 24, device=device, requires_grad=True)
    k, v = (torch.randn(2, 19, 2, 24, device=device, requires_grad=True) for _ in range(2))
    out, lse, _ = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(7, -1), return_attn_probs=True)
    assert type(out.grad_fn).__name__ == "FlashAttentionSeqFirstBackward" and _next_leaves(out) == [q, k, v]
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (2, 4, 13)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse), retain_graph=True)
    lse_grads = torch.autograd.grad(lse, (q, k, v), grad_lse)
    results = []
    for dtype in (torch.float32, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        expected, expected_lse = reference.attention(*(t.transpose(1, 2) for t in leaves), causal=True,
                                                     window_size=(7, -1), return_lse=True)
        expected = expected.transpose(1, 2)
        both = torch.autograd.grad((expected, expected_lse), leaves, (grad_out.to(dtype), grad_lse.to(dtype)),
                                   retain_graph=True)
        lse_alone = torch.autograd.grad(expected_lse, leaves, grad_lse.to(dtype), materialize_grads=True)  # dv: 0
        results.append((expected, expected_lse, both, lse_alone))
    (low, low_lse, low_grads, low_lse_grads), (exact, exact_lse, exact_grads, exact_lse_grads) = results
    assert_close(out, exact, low, FORWARD)
    assert_close(lse, exact_lse, low_lse, FORWARD, name="lse")
    for name, grad, lse_grad, *expected in zip("qkv", grads, lse_grads, exact_grads, low_grads, exact_lse_grads,
                                               low_lse_grads):
        assert_close(grad, expected[0], expected[1], BACKWARD, name=f"d{name}")
        assert_close(lse_grad, expected[2], expected[3], BACKWARD, name=f"d{name} of lse alone")


@pytest.mark.parametrize("k_shape, message", [((2, 7, 2, 16), "head dim 24"), ((2, 7, 3, 24), "divide q's 4 heads"),
                                              ((3, 7, 2, 24), "batch size 2")])
def test_flash_attn_func_bad_shapes_keep_their_messages(device, k_shape, message):
    """Inputs the (B, S, H, D) fast check does not pass go to kernels.attention's checks and messages."""
    q = torch.randn(2, 5, 4, 24, device=device)
    k = torch.randn(k_shape, device=device)
    with pytest.raises(ValueError, match=message):
        flash_attn.flash_attn_func(q, k, k)


def test_flash_attn_func_launches_on_its_tensors_with_their_heads_first_strides(launched, device):
    """flash-attn's (B, S, H, D) tensors reach every kernel as they are, with the sizes and strides their
    (B, H, S, D) views would give (GQA, q, k, v and dO in different layouts)."""
    q = torch.randn(2, 4, 9, 24, device=device).permute(0, 2, 1, 3).requires_grad_()  # (B, S, H, D), S-major
    k = torch.randn(2, 11, 2, 24, device=device, requires_grad=True)
    v = torch.randn(2, 11, 2, 32, device=device)[..., :24].requires_grad_()
    out = flash_attn.flash_attn_func(q, k, v, causal=True)
    grad = torch.randn(9, 2, 4, 24, device=device).transpose(0, 1)  # dO in yet another layout
    out.backward(grad)
    for name in ("fwd", "dkdv", "dq"):
        args = launched[name]
        assert args["Q"] is q and args["K"] is k and args["V"] is v
        assert (args["H"], args["GROUP"], args["N_Q"], args["N_K"], args["CAUSAL_SHIFT"]) == (4, 2, 9, 11, 2)
        for letter, t in (("q", q), ("k", k), ("v", v)):
            assert tuple(args[f"stride_{letter}{dim}"] for dim in "bhnd") == t.transpose(1, 2).stride()
    kernel_out = launched["fwd"]["O"]  # laid out as q (out is its contiguous copy: flash-attn's out is contiguous)
    assert kernel_out.stride() == q.stride() and out.is_contiguous() and out.equal(kernel_out)
    assert tuple(launched["fwd"][f"stride_o{dim}"] for dim in "bhnd") == kernel_out.transpose(1, 2).stride()
    for name in ("dkdv", "dq"):
        assert launched[name]["DO"] is grad
        assert tuple(launched[name][f"stride_do{dim}"] for dim in "bhnd") == grad.transpose(1, 2).stride()
    assert tuple(launched["dq"][f"stride_dq{dim}"] for dim in "bhnd") == q.grad.transpose(1, 2).stride()


@pytest.mark.parametrize("sizes, strides, legal", [
    ((1, 16, 2, 32), None, True), ((1, 16, 2, 36), None, False),  # fp16 rows of 72 bytes
    ((2, 16, 3, 32), (1600, 96, 32, 1), True), ((2, 16, 3, 32), (1604, 96, 32, 1), False),  # batch stride
    ((1, 33, 1, 40), (7, 40, 3, 1), True),  # batch 1, one head: their odd strides never multiply
    ((1, 16, 2, 32), (2048, 32, 512, 1), True), ((1, 16, 2, 32), (2048, 32, 516, 1), False),  # head-major
])
def test_tma_legality_of_seq_first_tensors_is_their_views(launched, device, sizes, strides, legal):
    """tma_legal(..., seq_first=True) of (B, S, H, D) tensors is tma_legal of their (B, H, S, D) views, and a
    forced TMA launch of flash_attn_func takes TMA exactly then."""
    if not kernels.INTERPRETED and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("no TMA before sm_90")
    base = torch.randn(4096, device=device).half()
    t = base[:math.prod(sizes)].view(sizes) if strides is None else base.as_strided(sizes, strides)
    assert configs.tma_legal(t, seq_first=True) is legal
    assert configs.tma_legal(t.transpose(1, 2)) is legal
    with use_config("attention_fwd", BLOCK_M=16, BLOCK_N=16, TMA=True):
        flash_attn.flash_attn_func(t, t, t)
    assert launched["fwd"]["TMA"] is legal


def test_flash_attn_func_plain_options_pass_through_with_every_check(device):
    """Plain Python options skip flash_attn's conversions (attention_seq_first checks them); a window given as a
    list or tensor is still converted, and bad values keep their messages (softmax_scale by its own name)."""
    q, k, v = (torch.randn(1, 7, 2, 16, device=device) for _ in range(3))
    expected = flash_attn.flash_attn_func(q, k, v, causal=np.bool_(True), window_size=(2, 0))
    for window in ([2, 0], torch.tensor([2, 0]), np.array([2, 0])):
        assert flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window).equal(expected)
    with pytest.raises(ValueError, match="attention_chunk must be >= 0"):
        flash_attn.flash_attn_func(q, k, v, attention_chunk=-1)
    with pytest.raises(TypeError, match="softmax_scale must be a finite real number"):
        flash_attn.flash_attn_func(q, k, v, softmax_scale=math.inf)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        flash_attn.flash_attn_func(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash_attn.flash_attn_func(q, k, v, causal=1)
    for scale in (None, 0.5):  # checked before the head dim is read, and on the path without a scale
        with pytest.raises(TypeError, match="q must be a torch.Tensor"):
            flash_attn.flash_attn_func(q.tolist(), k, v, softmax_scale=scale)
        with pytest.raises(ValueError, match="k must be 4-D"):
            flash_attn.flash_attn_func(q, k[0], v, softmax_scale=scale)


@pytest.mark.parametrize("call", [
    lambda q, k, v: kernels.attention(q, k, v, causal=True),
    lambda q, k, v: flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True),
])
def test_an_unused_lse_adds_nothing_to_the_backward(device, call):
    """Before: autograd materialised lse's zero gradient, and the backward subtracted (zeros * log2 e) from delta
    (a zeros, a mul and a sub_ per call); the gradients are those of an explicit zero lse gradient."""
    q, k, v = (torch.randn(1, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, 2, 9, 16, device=device)
    out = call(q, k, v)
    with AtenOps() as ops:
        out.backward(grad_out if out.shape == q.shape else grad_out.transpose(1, 2))
    assert not {"mul", "sub", "sub_", "zeros", "zero_", "fill_"} & set(ops.work), ops.work
    grads = [t.grad for t in (q, k, v)]
    out, lse = kernels.attention(q, k, v, causal=True, return_lse=True)
    expected = torch.autograd.grad((out, lse), (q, k, v), (grad_out, torch.zeros_like(lse)))
    for grad, grad_expected in zip(grads, expected):
        torch.testing.assert_close(grad, grad_expected, rtol=0, atol=0)


def test_a_key_padding_mask_alone_saves_only_its_tensors(attention_kernel_only, device):
    """Before: the backward's context saved all 8 variant slots (Nones included; each costs host time) after q, k,
    v, out, lse. Now a mask alone saves its key range and uint8 view, and the gradients are the reference's; a mask
    with sinks still saves and gets back every slot."""
    q, k, v = (torch.randn(2, 2, 7, 16, device=device, requires_grad=True) for _ in range(3))
    pad = torch.ones(2, 7, dtype=torch.bool, device=device)
    pad[0, 5:] = False
    pad[1, :2] = False
    out = kernels.attention(q, k, v, causal=True, key_padding_mask=pad)
    assert len(out.grad_fn.saved_tensors) == 7
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    references = []  # (out, gradients) in float64 and in q's dtype
    for cast in (torch.Tensor.double, torch.Tensor.detach):
        leaves = [cast(t.detach()).requires_grad_() for t in (q, k, v)]
        ref_out = _REFERENCE(*leaves, causal=True, mask=pad[:, None, None, :])
        references.append((ref_out, torch.autograd.grad(ref_out, leaves, torch.ones_like(ref_out))))
    (exact_out, exact), (low_out, low) = references
    assert_close(out, exact_out, low_out, FORWARD)
    for name, grad, grad_exact, grad_low in zip("qkv", grads, exact, low):
        assert_close(grad, grad_exact, grad_low, BACKWARD, name=f"d{name}")
    sinks = torch.randn(2, device=device, requires_grad=True)
    out = kernels.attention(q, k, v, key_padding_mask=pad, sinks=sinks)
    assert len(out.grad_fn.saved_tensors) == 5 + 8
    out.sum().backward()
    assert sinks.grad is not None and torch.isfinite(sinks.grad).all()


@pytest.mark.parametrize("mask, error, message", [
    ([[True] * 7] * 2, TypeError, "key_padding_mask must be a torch.Tensor"),
    (torch.ones(2, 7), TypeError, "key_padding_mask must have dtype in \\(bool\\), got float32"),
    (torch.ones(2, 1, 7, dtype=torch.bool), ValueError, "key_padding_mask must be 2-D"),
    (torch.ones(1, 7, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(B, Nk\) = \(2, 7\)"),
    (torch.ones(2, 6, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(B, Nk\) = \(2, 7\)"),
    (torch.ones(2, 7, dtype=torch.bool, device="meta"), ValueError, "q, key_padding_mask must share one device"),
])
def test_bad_key_padding_masks_keep_their_messages(device, mask, error, message):
    """The mask's checks read its Size once and skip the generic checks for a 2-D bool tensor: every other input
    still gets its message, before anything launches."""
    q, k, v = (torch.randn(2, 2, 7, 16, device=device) for _ in range(3))
    mask = mask.to(device) if isinstance(mask, torch.Tensor) and mask.device.type != "meta" else mask
    with pytest.raises(error, match=message):
        kernels.attention(q, k, v, key_padding_mask=mask)


def test_a_key_padding_mask_is_checked_again_for_other_shapes_and_on_the_fallback(monkeypatch, device):
    """The mask's checks run inside its memo (issue #19), keyed by (batch, Nk, q's device): the mask that passed
    for k of 7 keys raises for k of 6 keys (the memo holds it), and where the kernels cannot run (the reference
    fallback, no memo) a bad mask still raises before anything runs."""
    q, k, v = (torch.randn(2, 2, 7, 16, device=device) for _ in range(3))
    pad = torch.ones(2, 7, dtype=torch.bool, device=device)
    kernels.attention(q, k, v, key_padding_mask=pad)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\) = \(2, 6\)"):
        kernels.attention(q, k[:, :, :6], v[:, :, :6], key_padding_mask=pad)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\) = \(1, 7\)"):
        kernels.attention(q[:1], k[:1], v[:1], key_padding_mask=pad)
    monkeypatch.setattr(api._runtime, "kernel_runs_on", lambda t: False)
    with pytest.raises(TypeError, match=r"key_padding_mask must have dtype in \(bool\), got float32"):
        kernels.attention(q, k, v, key_padding_mask=pad.float())
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\) = \(2, 7\)"):
        kernels.attention(q, k, v, key_padding_mask=pad[:, :6])
    out = kernels.attention(q, k, v, key_padding_mask=pad)
    assert_close(out, reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v), FORWARD)
