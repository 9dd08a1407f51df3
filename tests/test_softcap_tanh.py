"""The softcap tanh (kernels/attention/kernels.py ``_tanh``) in fp32, and fp32 attention whose capped scores fall where
its exp2 formula cancels (|s / cap| in [1/8, 0.55]), through the built-in softcap and the softcap score mod.

``_tanh`` is checked elementwise against float64 tanh in ulps of the fp32 result; the attention cases against
float64 with the 2x/3x rule of tests/tolerance.py.
"""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels.attention.kernels import _tanh
from test_attention_mods import _check as _check_mods
from test_attention_variants import _check as _check_variants

FP32 = torch.float32
_BLOCK = 4096


@triton.jit
def _tanh_kernel(X, Y, N, ACCURATE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < N
    tl.store(Y + offs, _tanh(tl.load(X + offs, mask=keep, other=0.0), ACCURATE), mask=keep)


def _edges():
    """0, +-1e-30, the series/formula switch +-0.55, the old switch +-1/8 (each with its fp32 neighbours), and
    saturation (+-20, +-100)."""
    points = np.array([1e-30, 0.125, 0.55], dtype=np.float32)
    near = np.concatenate([points, np.nextafter(points, np.float32(0)), np.nextafter(points, np.float32(1))])
    near = np.concatenate([near, [20.0, 100.0]]).astype(np.float32)
    return np.concatenate([[0.0], near, -near]).astype(np.float32)


def _inputs():
    """The edges, a dense grid over [-4, 4] and a geometric one over [1e-30, 4] (both signs): fp32."""
    dense = np.linspace(-4.0, 4.0, 60001, dtype=np.float32)
    geometric = np.geomspace(1e-30, 4.0, 4000).astype(np.float32)
    return np.concatenate([_edges(), dense, geometric, -geometric])


def _run_tanh(x: np.ndarray, accurate: bool) -> np.ndarray:
    xs = torch.from_numpy(x)
    ys = torch.empty_like(xs)
    _tanh_kernel[(triton.cdiv(xs.numel(), _BLOCK),)](xs, ys, xs.numel(), accurate, _BLOCK)
    return ys.numpy()


def _ulps(got: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|got - tanh(x)| in units of the fp32 spacing at the float64 result."""
    exact = np.tanh(x.astype(np.float64))
    return np.abs(got.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("accurate", [True, False])
def test_tanh_is_odd_and_bounded(accurate):
    """Sign symmetry is exact and |tanh| <= 1 on both paths, saturated at +-1 far out."""
    x = _inputs()
    t = _run_tanh(x, accurate)
    assert np.array_equal(_run_tanh(-x, accurate), -t)
    assert np.all(np.abs(t) <= 1.0)
    assert np.all(t[np.abs(x) >= 20.0] == np.sign(x[np.abs(x) >= 20.0]))


def test_accurate_tanh_within_two_ulps():
    """ACCURATE (fp32 builds and the softcap score mod): within 2 ulps of float64 tanh everywhere, also across
    the series/formula switch at 0.55 and far below (tiny |x| returns x)."""
    x = _inputs()
    ulps = _ulps(_run_tanh(x, True), x)
    worst = int(np.argmax(ulps))
    assert ulps[worst] <= 2.0, f"{ulps[worst]:.2f} ulps at x = {x[worst]!r}"


def test_builtin_softcap_fp32_where_tanh_cancels(attention_kernel_only, device):
    """fp32, default scale (scaled scores ~ N(0, 1)), cap 3: |s / cap| is mostly in [1/8, 0.55]."""
    torch.manual_seed(0)
    _check_variants(device, FP32, False, 1, 2, 1, 37, 70, 32, softcap=3.0)


@pytest.mark.parametrize("cap", [50.0, pytest.param(1000.0, marks=pytest.mark.xfail(
    strict=True, reason="the score mod's tanh is the exp2 formula (the series spills fp16/bf16 score_mod builds)"))])
def test_softcap_score_mod_fp32_large_cap(attention_kernel_only, device, cap):
    """fp32 softcap score mod with a large cap: scores far below it, where the exp2 formula alone loses ~eps / |x|
    relative in tanh, ~cap * eps in the score (at 1000, 8-15x the output's bound)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 24, dtype=FP32, device=device).requires_grad_() for n in (29, 45, 45))
    _check_mods(q, k, v, None, dict(causal=True, score_mod=kernels.softcap_score(cap)),
                dict(causal=True, softcap=cap))
