"""The fused attention kernels (kernels/attention/) against float64 math, and the SDPA drop-in against torch.

Forward errors may be 2x, gradient errors 3x what PyTorch itself makes in the same precision (tests/tolerance.py).
"""
import contextlib
import inspect
import itertools
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from kernels.attention import api, configs, sdpa
from kernels.registry import use_config
from tolerance import BACKWARD, FORWARD, assert_close

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
_REFERENCE = reference.attention  # captured at import: attention_kernel_only replaces reference.attention


def _inputs(b, h, h_kv, n_q, n_k, d, dtype, device, requires_grad=False):
    q = torch.randn(b, h, n_q, d, dtype=dtype, device=device)
    k = torch.randn(b, h_kv, n_k, d, dtype=dtype, device=device)
    v = torch.randn(b, h_kv, n_k, d, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _lse(q, k, causal, scale, key_padding_mask=None):
    """Natural-log logsumexp of the scaled, masked scores, in q's dtype (-inf for rows that see no key)."""
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-2, -1) * scale
    visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        visible = reference.causal_mask(q.shape[2], k.shape[2], q.device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    return torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)


def _assert_lse_close(lse, lse_ref, lse_low):
    """Rows that see no key must be -inf exactly where the reference is; the rest obey the forward rule."""
    empty = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), empty)
    assert_close(lse[~empty], lse_ref[~empty], lse_low.float()[~empty], FORWARD, name="lse")


FORWARD_CASES = [  # (dtype, causal, B, H, Hkv, Nq, Nk, D): odd lengths, non-power-of-two head dims, GQA
    (FP32, False, 1, 2, 2, 7, 7, 8),
    (FP16, True, 1, 3, 1, 100, 100, 80),
    (BF16, True, 1, 2, 1, 257, 257, 32),
    (FP16, False, 2, 2, 2, 1, 1, 64),
    (BF16, False, 1, 3, 1, 33, 100, 128),
    (FP32, True, 1, 2, 2, 100, 7, 256),
    (FP16, True, 1, 3, 3, 7, 100, 256),
    (BF16, False, 1, 1, 1, 100, 33, 1),
]


@pytest.mark.parametrize("dtype,causal,b,h,h_kv,n_q,n_k,d", FORWARD_CASES)
def test_forward_and_lse_match_float64(attention_kernel_only, device, dtype, causal, b, h, h_kv, n_q, n_k, d):
    q, k, v = _inputs(b, h, h_kv, n_q, n_k, d, dtype, device)
    out, lse = kernels.attention(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == FP32 and lse.shape == (b, h, n_q)
    scale = 1 / math.sqrt(d)
    exact = _REFERENCE(q.double(), k.double(), v.double(), causal=causal)
    low = _REFERENCE(q, k, v, causal=causal)
    assert_close(out, exact, low, FORWARD)
    _assert_lse_close(lse, _lse(q.double(), k.double(), causal, scale), _lse(q, k, causal, scale))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_gradients_long_sequence(device, causal):
    q, k, v = _inputs(1, 2, 1, 1000, 1000, 64, FP16, device, requires_grad=True)
    _check_gradients(q, k, v, causal)


def _gradient_references(q, k, v, causal, key_padding_mask=None):
    """(grad_out, low, exact): a random output gradient, and the reference's (out, dq, dk, dv) for it in q's dtype
    (the noise) and in float64."""
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    results = []
    for dtype in (None, torch.float64):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        out = _REFERENCE(*leaves, causal=causal, mask=mask)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))))
    return grad_out, *results


def _check_gradients(q, k, v, causal, key_padding_mask=None, references=None):
    """Forward and q/k/v gradients of the kernel against float64, with the low-precision reference as the noise
    (``references``: :func:`_gradient_references` of the same arguments, computed here if not given)."""
    if references is None:
        references = _gradient_references(q, k, v, causal, key_padding_mask)
    grad_out, low, exact = references
    out = kernels.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert_close(out, exact[0], low[0], FORWARD)
    for name, grad, grad_exact, grad_low in zip("qkv", grads, exact[1:], low[1:]):
        assert grad.shape == grad_exact.shape and grad.dtype == q.dtype
        assert_close(grad, grad_exact, grad_low, BACKWARD, name=f"d{name}")
    return grads


GRADIENT_CASES = [  # (dtype, causal, H, Hkv, Nq, Nk, D)
    (FP32, True, 3, 1, 37, 45, 20),
    (FP16, False, 2, 2, 100, 100, 80),
    (BF16, True, 3, 1, 45, 37, 64),
    (FP16, True, 2, 1, 1, 7, 128),
    (BF16, False, 1, 1, 7, 1, 8),
]


@pytest.mark.parametrize("dtype,causal,h,h_kv,n_q,n_k,d", GRADIENT_CASES)
def test_gradients_match_float64(attention_kernel_only, device, dtype, causal, h, h_kv, n_q, n_k, d):
    q, k, v = _inputs(1, h, h_kv, n_q, n_k, d, dtype, device, requires_grad=True)
    _check_gradients(q, k, v, causal)


def _every_config(dtype, d):
    """(kernel, config) for every config of every family's autotune list of the attention kernels."""
    seen = []
    for kernel in configs.KERNELS:
        for family in configs.FAMILIES:
            for bm, bn, warps, stages in configs.tiles(kernel, family, configs.d_bucket(d), dtype == FP32):
                entry = (f"attention_{kernel}", dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages))
                if entry not in seen:
                    seen.append(entry)
    return seen


def _config_rounds(dtype, d):
    """Lists of (kernel, config) to force together, which between them force every config of
    :func:`_every_config`: on a GPU one config per list; under the interpreter, which ignores num_warps and
    num_stages, each kernel's distinct tiles, the i-th tile of every kernel in the i-th list (one forward and
    backward runs all three kernels)."""
    every = _every_config(dtype, d)
    if not kernels.INTERPRETED:
        return [[entry] for entry in every]
    tiles = {}
    for kernel, config in every:
        tile = dict(BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"])
        if tile not in tiles.setdefault(kernel, []):
            tiles[kernel].append(tile)
    return [[(kernel, tile) for kernel, tile in zip(tiles, column) if tile is not None]
            for column in itertools.zip_longest(*tiles.values())]


@pytest.mark.skipif(not kernels.INTERPRETED, reason="on a GPU each config is forced on its own")
def test_config_rounds_force_every_tile_of_every_kernel_once():
    for dtype, d in [(FP16, 64), (FP32, 256)]:
        rounds = _config_rounds(dtype, d)
        forced = [(kernel, c["BLOCK_M"], c["BLOCK_N"]) for round_ in rounds for kernel, c in round_]
        tiles = {(kernel, c["BLOCK_M"], c["BLOCK_N"]) for kernel, c in _every_config(dtype, d)}
        assert sorted(forced) == sorted(tiles)
        assert all(len({kernel for kernel, _ in round_}) == len(round_) for round_ in rounds)  # one tile a kernel


@pytest.mark.parametrize("dtype,d", [(FP16, 64), (FP16, 80), (BF16, 256), (FP32, 48), (FP32, 128), (FP32, 256)])
def test_every_autotune_config_gives_float64_results(attention_kernel_only, device, dtype, d):
    """Each config a GPU may pick (forced through ``use_config``, which bypasses the autotuner and the
    interpreter's default tile), at an awkward shape: partial query and key blocks, causal, GQA, a padded head
    dim; forward and gradients obey the float64 rule."""
    q, k, v = _inputs(1, 2, 1, 70, 75, d, dtype, device, requires_grad=True)
    references = _gradient_references(q, k, v, causal=True)
    for forced in _config_rounds(dtype, d):
        with contextlib.ExitStack() as stack:
            for kernel, config in forced:
                stack.enter_context(use_config(kernel, **config))
            _check_gradients(q, k, v, causal=True, references=references)


def test_use_config_is_what_runs(monkeypatch, device):
    """The forced tile reaches the launch, innermost block winning; outside, the interpreter's default runs."""
    launched = []
    real = configs.KERNELS["fwd"]

    class Spy:
        def run(self, *args, grid, warmup, **kwargs):
            launched.append((grid, kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
            return real.run(*args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setitem(configs.KERNELS, "fwd", Spy())
    q, k, v = _inputs(2, 3, 1, 40, 40, 16, FP32, device)
    with use_config("attention_fwd", BLOCK_M=64, BLOCK_N=16):
        with use_config("attention_fwd", BLOCK_M=16, BLOCK_N=64):
            kernels.attention(q, k, v)
        kernels.attention(q, k, v)
    expected = [((3 * 6,), 16, 64), ((1 * 6,), 64, 16)]
    if kernels.INTERPRETED:  # unforced, the interpreter's tile runs (a GPU autotunes, around the real kernel)
        kernels.attention(q, k, v)
        expected.append(((2 * 6,), 32, 32))
    assert launched == expected


def test_default_configs_are_each_tables_first_entry():
    got = configs.default_configs(90, FP16, 80)
    assert got["attention_fwd"] == dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
                                            configs.tiles("fwd", 90, 128, False)[0]), TMA=True)  # sm_90: TMA first
    assert set(got) == {"attention_fwd", "attention_dkdv", "attention_dq"}
    with pytest.raises(ValueError, match="family"):
        configs.default_configs(75, FP16, 64)


def test_worked_example_i_love_coding(attention_kernel_only, device):
    """Seed 001: three tokens, 3-d head, unscaled non-causal attention; the output row for "love"."""
    x = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=FP32)
    w_q = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=FP32)
    w_k = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=FP32)
    w_v = torch.tensor([[1, 2, 1], [0, 1, 0], [1, 1, 0]], dtype=FP32)
    q, k, v = [(x @ w)[None, None].to(device) for w in (w_q, w_k, w_v)]
    out = kernels.attention(q, k, v, scale=1.0)
    torch.testing.assert_close(out[0, 0, 1].cpu(), torch.tensor([1.68927519, 3.11159399, 0.8446376]), atol=1e-5, rtol=0)
    # any real scale, as torch takes it: a numpy scalar or an int gives the same answer
    torch.testing.assert_close(kernels.attention(q, k, v, scale=np.float32(1.0)), out)
    torch.testing.assert_close(kernels.attention(q, k, v, scale=1), out)


def test_non_contiguous_inputs_give_the_same_results(attention_kernel_only, device):
    """Hugging Face passes (B, N, H, D) projections transposed to (B, H, N, D): strides, not copies."""
    q_bnhd = torch.randn(1, 19, 3, 24, device=device)
    kv_bnhd = torch.randn(1, 23, 2, 1, 24, device=device)
    q, k, v = q_bnhd.transpose(1, 2), kv_bnhd[:, :, 0].transpose(1, 2), kv_bnhd[:, :, 1].transpose(1, 2)
    q_c, k_c, v_c = (t.contiguous() for t in (q, k, v))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    grad_out = torch.randn(1, 3, 19, 24, device=device).transpose(2, 3).contiguous().transpose(2, 3)
    results = []
    for inputs in ((q, k, v), (q_c, k_c, v_c)):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = kernels.attention(*leaves, causal=True)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for strided, contiguous in zip(*results):
        assert torch.equal(strided, contiguous)


def test_lse_gradient(device):
    """lse is differentiable too (d lse / d s = softmax): its gradient folds into the backward's delta."""
    q, k, v = _inputs(1, 2, 1, 9, 13, 16, FP32, device, requires_grad=True)
    out, lse = kernels.attention(q, k, v, causal=True, return_lse=True)
    weights = torch.arange(9.0, device=device)
    grads = torch.autograd.grad(out.sum() + (lse * weights).sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _REFERENCE(*leaves, causal=True).sum() + (_lse(leaves[0], leaves[1], True, 0.25) * weights).sum()
    for grad, grad_ref in zip(grads, torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(grad.double(), grad_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape_q,shape_kv", [((1, 2, 0, 16), (1, 1, 5, 16)), ((1, 2, 5, 16), (1, 1, 0, 16)),
                                              ((0, 2, 5, 16), (0, 1, 5, 16))])
def test_empty_inputs_launch_nothing(monkeypatch, device, shape_q, shape_kv):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for an empty input")

    monkeypatch.setattr(configs, "launch", no_launch)
    monkeypatch.setattr(configs, "launch_delta", no_launch)
    q = torch.randn(shape_q, device=device, requires_grad=True)
    k, v = (torch.randn(shape_kv, device=device, requires_grad=True) for _ in range(2))
    out, lse = kernels.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == shape_q and lse.shape == shape_q[:3]
    assert torch.equal(out, torch.zeros(shape_q, device=device)) and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape] and all((g == 0).all() for g in grads)


def test_rows_with_no_visible_key_are_zero_with_finite_gradients(attention_kernel_only, device):
    """Causal with Nq > Nk (bottom-right): the first Nq - Nk queries see nothing; so does a fully padded batch row."""
    q, k, v = _inputs(2, 2, 1, 40, 9, 16, FP32, device, requires_grad=True)
    padding = torch.ones(2, 9, dtype=torch.bool, device=device)
    padding[1] = False
    out, lse = kernels.attention(q, k, v, causal=True, return_lse=True, key_padding_mask=padding)
    zeros = torch.zeros(2, 40, 16, device=device)
    assert torch.equal(out[0, :, :31], zeros[:, :31]) and torch.equal(out[1], zeros)
    assert torch.isneginf(lse[0, :, :31]).all() and torch.isfinite(lse[0, :, 31:]).all()
    assert torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[0, :, :31], zeros[:, :31]) and torch.equal(dk[1], torch.zeros_like(dk[1]))


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_left_and_right(device, causal):
    q, k, v = _inputs(3, 2, 1, 21, 21, 16, FP32, device, requires_grad=True)
    padding = torch.ones(3, 21, dtype=torch.bool, device=device)
    padding[0, :6] = False  # left padding (Hugging Face decoders)
    padding[1, 15:] = False  # right padding
    padding[2, 3:19] = False
    padding[2] = ~padding[2]  # a run in the middle
    _check_gradients(q, k, v, causal, key_padding_mask=padding)


@pytest.mark.parametrize("dtype,causal", [(FP32, False), (FP16, True)])
def test_key_padding_mask_with_holes(device, dtype, causal):
    """Any pattern of visible keys, e.g. several packed sequences' keys or random holes, non-contiguous mask."""
    q, k, v = _inputs(2, 2, 1, 37, 70, 24, dtype, device, requires_grad=True)
    padding = torch.rand(70, 2, device=device) > 0.4
    padding[:5, 1] = False
    _check_gradients(q, k, v, causal, key_padding_mask=padding.t())


def test_falls_back_to_the_reference_when_the_kernels_cannot_run(monkeypatch, device):
    monkeypatch.setattr(api._runtime, "kernel_runs_on", lambda *tensors: False)
    monkeypatch.setattr(api, "attention_op", None)  # calling the kernel would now fail
    q, k, v = _inputs(1, 2, 1, 5, 8, 8, FP32, device)
    padding = torch.tensor([[False, True, True, True, True, True, True, False]], device=device)
    out, lse = kernels.attention(q, k, v, causal=True, return_lse=True, key_padding_mask=padding)
    torch.testing.assert_close(out, _REFERENCE(q, k, v, causal=True, mask=padding[:, None, None, :]))
    torch.testing.assert_close(lse, _lse(q, k, True, 1 / math.sqrt(8), padding))


def _bad(**changes):
    args = dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 8))
    args.update(changes)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(q=torch.randn(4, 5, 8)), ValueError, "q must be 4-D"),
    (_bad(k=[[1.0]]), TypeError, "k must be a torch.Tensor"),
    (_bad(v=torch.randn(2, 2, 6, 8, dtype=torch.float64)), TypeError, "q, k, v must share one dtype"),
    (_bad(v=torch.ones(2, 2, 6, 8, dtype=torch.int32)), TypeError,
     r"v must have dtype in \(float16, bfloat16, float32, float64\), got int32"),
    (_bad(k=torch.randn(2, 2, 6, 8, dtype=FP16), v=torch.randn(2, 2, 6, 8, dtype=FP16)), TypeError, "dtype"),
    (_bad(k=torch.randn(3, 2, 6, 8), v=torch.randn(3, 2, 6, 8)), ValueError, "batch size 2"),
    (_bad(k=torch.randn(2, 2, 6, 4), v=torch.randn(2, 2, 6, 4)), ValueError, "head dim 8"),
    (_bad(v=torch.randn(2, 2, 7, 8)), ValueError, "k and v must have the same shape"),
    (_bad(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError, "kv heads must divide"),
    (_bad(q=torch.randn(1, 1, 2, 257), k=torch.randn(1, 1, 2, 257), v=torch.randn(1, 1, 2, 257)), ValueError,
     "head dim must be in 1..256"),
    (_bad(scale="big"), TypeError, "scale"),
    (_bad(scale=float("nan")), TypeError, "scale must be a finite real number"),
    (_bad(key_padding_mask=torch.ones(2, 6)), TypeError, "key_padding_mask must have dtype"),
    (_bad(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(B, Nk\)"),
])
def test_bad_inputs_raise_before_any_launch(monkeypatch, args, error, match):
    monkeypatch.setattr(configs, "launch", None)
    with pytest.raises(error, match=match):
        kernels.attention(**args)


# ------------------------------------------------------------------------------------------ the SDPA drop-in

def _sdpa_pair(monkeypatch, *args, **kwargs):
    """(shim result, torch result): the shim with torch's fallback disabled, so the kernel must have run."""
    expected = F.scaled_dot_product_attention(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(sdpa, "_TORCH_SDPA", None)
        return kernels.scaled_dot_product_attention(*args, **kwargs), expected


@pytest.mark.parametrize("n_q,n_k", [(13, 13), (5, 17), (17, 5)])
def test_sdpa_is_causal_is_top_left_like_torch(monkeypatch, device, n_q, n_k):
    q, k, v = _inputs(2, 2, 2, n_q, n_k, 16, FP32, device)
    got, expected = _sdpa_pair(monkeypatch, q, k, v, is_causal=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sdpa_scale_and_enable_gqa(monkeypatch, device):
    q, k, v = _inputs(1, 6, 2, 11, 14, 24, FP32, device)
    got, expected = _sdpa_pair(monkeypatch, q, k, v, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["causal_padding", "key_padding", "decode_bottom_right"])
def test_sdpa_bool_padding_masks_run_the_kernel(monkeypatch, device, layout):
    """Masks as Hugging Face builds them: (B, 1, Nq, Nk) causal AND padding, (B, 1, 1, Nk) padding only, and at
    decode time the cached queries' bottom-right causal mask with left padding."""
    n_q, n_k = (3, 12) if layout == "decode_bottom_right" else (12, 12)
    q, k, v = _inputs(2, 2, 2, n_q, n_k, 16, FP32, device)
    keys = torch.ones(2, n_k, dtype=torch.bool, device=device)
    keys[0, :4] = False
    keys[1, 9:] = False
    if layout == "key_padding":
        mask = keys[:, None, None, :]
    else:
        mask = keys[:, None, None, :] & reference.causal_mask(n_q, n_k, device)
    got, expected = _sdpa_pair(monkeypatch, q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, expected.nan_to_num(0.0), atol=1e-5, rtol=1e-5)


def _no_kernel(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the kernel ran where torch's fallback was expected")

    monkeypatch.setattr(sdpa, "attention_op", forbidden)


@pytest.mark.parametrize("mask_kind", ["float", "scattered_bool"])
def test_sdpa_other_masks_fall_back_to_torch(monkeypatch, device, mask_kind):
    _no_kernel(monkeypatch)
    q, k, v = _inputs(2, 2, 2, 6, 9, 8, FP32, device)
    mask = torch.randn(2, 1, 6, 9, device=device) if mask_kind == "float" else torch.rand(2, 1, 6, 9, device=device) > 0.5
    # Assigned over torch's own function: the fallback must call the original, not recurse into the shim.
    monkeypatch.setattr(F, "scaled_dot_product_attention", kernels.scaled_dot_product_attention)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, sdpa._TORCH_SDPA(q, k, v, attn_mask=mask), atol=0, rtol=0)


def test_sdpa_dropout_falls_back_to_torch(monkeypatch, device):
    _no_kernel(monkeypatch)
    q, k, v = _inputs(1, 2, 2, 6, 6, 8, FP32, device)
    torch.manual_seed(1)
    got = kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))


def test_sdpa_gradients_flow_through_the_kernel(attention_kernel_only, sdpa_kernel_calls, device):
    """The shim's gradients are torch's, and came from the kernel: its fallbacks (torch's SDPA, the reference)
    raise, and the shim handed the call to the kernel."""
    q, k, v = _inputs(1, 2, 1, 9, 9, 8, FP32, device, requires_grad=True)
    grads = [torch.autograd.grad(f(q, k, v, is_causal=True, enable_gqa=True).sum(), (q, k, v))
             for f in (kernels.scaled_dot_product_attention, F.scaled_dot_product_attention)]
    assert sdpa_kernel_calls == [q.shape]
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- large sizes, threads, AD

_FAR_ROWS = r"""
import torch, kernels
stride = 2**29  # row 4 starts 2^31 elements in: past what 32-bit offset arithmetic can address
base = torch.empty(4 * stride + 16, dtype=torch.float16)  # ~4 GiB of address space; only 5 rows are touched
q = base.as_strided((1, 1, 5, 16), (0, 0, stride, 1))
near = torch.randn(1, 1, 5, 16, dtype=torch.float16)
q.copy_(near)
k, v = torch.randn(1, 1, 5, 16, dtype=torch.float16), torch.randn(1, 1, 5, 16, dtype=torch.float16)
assert torch.equal(kernels.attention(q, k, v), kernels.attention(near, k, v))
print("ok")
"""


@pytest.mark.skipif(not kernels.INTERPRETED, reason="a 4 GiB address-space view: CPU only")
def test_rows_beyond_2_to_the_31_elements_are_addressed_in_64_bits():
    """A (B, N, H, D)-style view whose row stride times row index passes 2^31: 32-bit offsets would wrap and read
    (or crash on) the wrong memory. Run in a child process so that a crash fails this test, not the session."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _FAR_ROWS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_grids_are_one_dimensional_and_bounded():
    """B * H beyond CUDA's 65535 grid-y limit is fine on the 1-D grid's first axis; past 2^31 - 1 programs a
    ValueError comes before any launch."""
    assert configs.grid(100, 70000, 32) == (4 * 70000,)
    with pytest.raises(ValueError, match="programs"):
        configs.grid(2**20, 2**17, 16)


def test_concurrent_calls_from_threads_give_the_single_thread_results(device):
    q, k, v = _inputs(1, 2, 1, 40, 40, 16, FP32, device)
    expected = kernels.attention(q, k, v, causal=True)
    results, errors = [], []

    def worker():
        try:
            for _ in range(3):
                results.append(kernels.attention(q, k, v, causal=True))
        except Exception as error:  # noqa: BLE001  (collected and re-raised by the main thread)
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(results) == 9 and all(torch.equal(r, expected) for r in results)


def test_forward_mode_ad_raises_instead_of_a_zero_tangent(device):
    q, k, v = _inputs(1, 1, 1, 4, 4, 8, FP32, device)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda q: kernels.attention(q, k, v), (q,), (torch.ones_like(q),))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="kernels.attention"):
        kernels.attention(q, fwAD.make_dual(k, torch.ones_like(k)), v)


# --------------------------------------------------------------------------------------------- torch.compile

def test_torch_compile_fullgraph_forward_and_backward(attention_kernel_only, device):
    torch._dynamo.reset()

    def f(q, k, v):
        return kernels.attention(q, k, v, causal=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = _inputs(1, 2, 1, 5, 7, 8, FP32, device, requires_grad=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = torch.autograd.grad(f(q, k, v), (q, k, v))
    torch.testing.assert_close(loss, f(q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_with_a_key_padding_mask(attention_kernel_only, device):
    """The padding mask's key ranges are derived on the device: no host sync, no graph break."""
    torch._dynamo.reset()

    def f(q, k, v, mask):
        return kernels.attention(q, k, v, causal=True, key_padding_mask=mask).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = _inputs(2, 2, 1, 6, 9, 8, FP32, device, requires_grad=True)
    mask = torch.tensor([[False, False, True, True, True, True, True, True, True],
                         [True, True, True, False, True, True, True, False, False]], device=device)
    loss = compiled(q, k, v, mask)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = torch.autograd.grad(f(q, k, v, mask), (q, k, v))
    torch.testing.assert_close(loss, f(q, k, v, mask))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


# -------------------------------------------------------------------------------------------------- GPU builds

def test_every_config_is_registered_for_fp16_bf16_fp32_and_head_dims():
    builds = [b for b in configs._builds()]
    for kernel, fn in configs.KERNELS.items():
        plain = [b for b in builds if b.fn is fn and not b.variant]
        configs_built = {(b.dtype, b.head_dim, b.constexprs["BLOCK_M"], b.constexprs["BLOCK_N"], b.num_warps,
                          b.num_stages) for b in plain}
        for family in configs.FAMILIES:  # one per dtype and head dim (each variant's specialisation has its own)
            assert len([b for b in plain if b.default and family in b.families]) == 9
        for family in configs.FAMILIES:
            for d in (64, 128, 256):
                for dtype in ("fp16", "bf16", "fp32"):
                    for bm, bn, warps, stages in configs.tiles(kernel, family, d, dtype == "fp32"):
                        assert (dtype, d, bm, bn, warps, stages) in configs_built
    for b in builds:  # the signature names every parameter, in order, and each constexpr has a value
        params = list(inspect.signature(b.fn.fn).parameters)
        assert list(b.signature) == params
        assert {n for n, t in b.signature.items() if t == "constexpr"} == set(b.constexprs)


@pytest.mark.parametrize("dtype", [FP32, torch.bfloat16])
def test_one_visible_key_gives_probability_exactly_one(device, dtype):
    """A row that sees one key has p = 1 exactly, so dV is dO exactly (and out is v), as torch gives, even at
    logits ~100: the backward recomputes p from the forward's statistics in the base the kernel summed in (a
    natural-log lse taken back to base 2 gave p = 1 +- 1e-5)."""
    q = (torch.randn(1, 2, 40, 16, device=device) * 3).to(dtype)
    scale = 100.0 / (q.float() ** 2).sum(-1).mean().item()  # diagonal logits about 100
    q, k, v = q.requires_grad_(), q.detach().clone().requires_grad_(), torch.randn_like(q).requires_grad_()
    out, lse = kernels.attention(q, k, v, causal=True, window_size=(0, 0), scale=scale, return_lse=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(out, v) and torch.equal(v.grad, grad)
    torch.testing.assert_close(lse, scale * (q.detach().float() ** 2).sum(-1), rtol=1e-6, atol=0)


def test_the_ops_spell_out_the_variants_fields_in_order():
    """The custom ops take VariantTensors then AttentionVariant, field by field: their schemas follow the
    dataclasses, so a field added to either reaches the traced path in the right place."""
    import dataclasses

    from kernels.attention import ops, plan

    fields = [*plan.VariantTensors._fields, *(f.name for f in dataclasses.fields(plan.AttentionVariant))]
    forward = [a.name for a in ops._forward_op._opoverload._schema.arguments]
    backward = [a.name for a in ops._backward_op._opoverload._schema.arguments]
    assert forward == ["q", "k", "v", *fields]
    assert backward == ["grad_out", "q", "k", "v", "out", "lse", "grad_lse", *fields]
