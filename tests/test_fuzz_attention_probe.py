"""Attention (dense, varlen, decode): regressions found by a randomised differential probe of combinations the
fuzz-regression files do not draw (strided variant tensors, large head dims at small lengths, paged varlen,
...), each checked against float64 math with FlashAttention's rule (tests/tolerance.py)."""
import math

import pytest
import torch

import kernels
from test_fuzz_regressions import attention_math, varlen_math
from tolerance import FORWARD, assert_close


def _sink_views(heads: int, device):
    """(H,) float32 sinks on ``device`` as strided and expanded views (made there: ``.to`` would copy them dense):
    every other element of a (2H,) tensor, one logit broadcast."""
    wide = torch.randn(2 * heads, device=device)
    return {"strided": wide[::2], "expanded": wide[:1].expand(heads)}


@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_sinks_of_any_stride(device, view):
    """The forward kernel read sink h at SINKS + h, and float32 sinks reached it as the caller's view: a strided
    (sinks[::2]) or expanded (s.expand(H)) one gave other heads' (or past-the-end) logits, silently wrong by ~1."""
    torch.manual_seed(0)
    heads, n, d = 4, 5, 24
    q = torch.randn(1, heads, n, d, dtype=torch.float64)
    k, v = (torch.randn(1, 2, n, d, dtype=torch.float64) for _ in "kv")
    sinks = _sink_views(heads, device)[view]
    sinks64 = sinks.double().cpu()
    exact, exact_lse = attention_math(q, k, v, torch.ones(n, n, dtype=torch.bool), 1 / math.sqrt(d), sinks=sinks64)
    low, low_lse = attention_math(q.float(), k.float(), v.float(), torch.ones(n, n, dtype=torch.bool),
                                  1 / math.sqrt(d), sinks=sinks64.float())
    out, lse = kernels.attention(*(t.float().to(device) for t in (q, k, v)), return_lse=True, sinks=sinks)
    assert_close(out.cpu(), exact, low, FORWARD)
    assert_close(lse.cpu(), exact_lse, low_lse, FORWARD, name="lse")


def test_varlen_sinks_of_any_stride(device):
    """attention_varlen handed its sinks to the same kernel: a strided view was read as contiguous."""
    torch.manual_seed(1)
    heads, d, lens = 4, 8, [3, 6]
    q, k, v = (torch.randn(9, h, d, dtype=torch.float64) for h in (heads, 2, 2))
    sinks = _sink_views(heads, device)["strided"]
    sinks64 = sinks.double().cpu()
    exact, _ = varlen_math(q, k, v, lens, lens, False, (-1, -1), 1 / math.sqrt(d), 0.0, None, sinks64)
    low, _ = varlen_math(q.float(), k.float(), v.float(), lens, lens, False, (-1, -1), 1 / math.sqrt(d), 0.0, None,
                         sinks64.float())
    offsets = torch.tensor([0, 3, 9], dtype=torch.int32, device=device)
    out = kernels.attention_varlen(*(t.float().to(device) for t in (q, k, v)), offsets, offsets, 6, 6,
                                   sinks=sinks)
    assert_close(out.cpu(), exact, low, FORWARD)
