"""Regressions found by probing the attention variants (kernels.attention) against float64 math, with the 2x/3x
rule of tests/tolerance.py."""
import numpy as np
import pytest
import torch

import kernels
from kernels import reference
from test_attention_mods import _check as _check_mods
from test_softcap_tanh import _run_tanh
from tolerance import BACKWARD, FORWARD, assert_close

FP16, BF16 = torch.float16, torch.bfloat16
_REFERENCE = reference.attention  # captured at import: attention_kernel_only replaces reference.attention


def test_fast_tanh_is_x_for_tiny_arguments():
    """The fp16/bf16 builds' tanh (not ACCURATE) at |x| < 2^-12: x itself. (1 - e) / (1 + e) kept a few bits of it
    there and gave 0 below ~2^-26."""
    x = np.geomspace(1e-30, 2.0**-12, 500, endpoint=False).astype(np.float32)
    x = np.concatenate([x, -x])
    assert np.array_equal(_run_tanh(x, False), x)


@pytest.mark.parametrize("cap", [1e6, 1e30])
def test_huge_softcap_in_fp16(attention_kernel_only, device, cap):
    """A cap far above the scores is no cap: at 1e6 the scores were noise (output error 18x torch's), at 1e30 all
    0. The noise is torch's fp16 attention without a cap (with it, torch's fp16 backward overflows)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 24, dtype=FP16, device=device).requires_grad_() for n in (21, 30, 30))
    grad_out = torch.randn_like(q)
    out = kernels.attention(q, k, v, causal=True, softcap=cap)
    grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
    runs = []
    for dtype, softcap in ((FP16, 0.0), (torch.float64, cap)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        ref = _REFERENCE(*leaves, causal=True, softcap=softcap)
        runs.append((ref, torch.autograd.grad((ref * grad_out.to(dtype)).sum(), leaves)))
    (low, low_grads), (exact, exact_grads) = runs
    assert_close(out, exact, low, FORWARD)
    for name, grad, grad_exact, grad_low in zip(("dq", "dk", "dv"), grads, exact_grads, low_grads):
        assert_close(grad, grad_exact, grad_low, BACKWARD, name=name)


def test_huge_softcap_score_mod_in_bf16(attention_kernel_only, device):
    """The softcap score mod shares the tanh."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 24, dtype=BF16, device=device).requires_grad_() for n in (19, 25, 25))
    _check_mods(q, k, v, None, dict(causal=True, score_mod=kernels.softcap_score(1e30)),
                dict(causal=True, softcap=1e30))


def test_a_softcap_past_fp32_raises_naming_it():
    """The kernels take softcap * log2(e) in fp32: a finite cap above ~2.36e38 overflowed it to inf
    and gave all-NaN outputs, silently. ValueError naming softcap in every front end (and cap in the score mod);
    the largest cap allowed runs, and equals no cap."""
    from kernels.attention.checks import SOFTCAP_MAX
    from kernels.attention.mods import softcap_score
    from kernels.flash_attn import flash_attn_func

    q = torch.randn(1, 2, 5, 24)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    calls = {
        "attention": lambda cap: kernels.attention(q, q, q, softcap=cap),
        "flash_attn_func": lambda cap: flash_attn_func(*(q.transpose(1, 2),) * 3, softcap=cap),
        "attention_varlen": lambda cap: kernels.attention_varlen(*(q[0].transpose(0, 1),) * 3, cu, cu, 5, 5,
                                                                 softcap=cap),
        "attention_with_kvcache": lambda cap: kernels.attention_with_kvcache(*(q.transpose(1, 2),) * 3, softcap=cap),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"softcap must be in \[0.0, 1\.70"):
            call(3e38)
        assert call(SOFTCAP_MAX).isfinite().all(), name
    torch.testing.assert_close(calls["attention"](SOFTCAP_MAX), calls["attention"](0.0))
    with pytest.raises(ValueError, match="cap must be in"):
        softcap_score(3.5e38)
