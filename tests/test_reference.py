"""The plain-PyTorch baselines against torch.nn.functional and float64 math, and the worked example of seed 001."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from tolerance import assert_close, max_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_worked_example_i_love_coding():
    """Seed 001: three tokens, 3-d embeddings, unscaled non-causal attention; the row for "love"."""
    x = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.float64)
    w_q = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.float64)
    w_k = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    w_v = torch.tensor([[1, 2, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float64)
    q, k, v = [(x @ w)[None, None] for w in (w_q, w_k, w_v)]
    out, probs = reference.attention(q, k, v, scale=1.0, return_probs=True)
    torch.testing.assert_close(probs[0, 0, 1], torch.tensor([0.4223188, 0.1553624, 0.4223188], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([1.68927519, 3.11159399, 0.8446376], dtype=torch.float64),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (7, 7), (5, 12), (33, 20)])
def test_causal_mask_is_bottom_right(n_q, n_k):
    mask = reference.causal_mask(n_q, n_k)
    for i in range(n_q):
        for j in range(n_k):
            assert mask[i, j].item() == (j <= i + n_k - n_q)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (3, 1), (6, 2)])
def test_attention_matches_torch_sdpa_in_float64(causal, heads, kv_heads):
    q = torch.randn(2, heads, 37, 24, dtype=torch.float64)
    k = torch.randn(2, kv_heads, 37, 24, dtype=torch.float64)
    v = torch.randn(2, kv_heads, 37, 24, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal), expected)


def test_attention_decoding_with_cache_sees_the_whole_prefix():
    """Nq < Nk causal: the queries are the last Nq positions, so they match the last rows of the full square call."""
    q = torch.randn(1, 2, 20, 16, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    full = reference.attention(q, k, v, causal=True)
    torch.testing.assert_close(reference.attention(q[:, :, -3:], k, v, causal=True), full[:, :, -3:])


def test_attention_rows_with_no_visible_key_are_zero():
    q = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    k, v = torch.randn(1, 1, 2, 8, dtype=torch.float64), torch.randn(1, 1, 2, 8, dtype=torch.float64)
    out = reference.attention(q, k, v, causal=True)  # queries 0..3 see no key (j <= i - 4)
    assert torch.equal(out[0, 0, :4], torch.zeros(4, 8, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_attention_masks_bool_and_float():
    q = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 11, 8, dtype=torch.float64), torch.randn(2, 2, 11, 8, dtype=torch.float64)
    keep = torch.rand(2, 1, 9, 11) > 0.3
    keep[..., 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(reference.attention(q, k, v, mask=keep), expected)
    bias = torch.randn(2, 2, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(reference.attention(q, k, v, mask=bias), F.scaled_dot_product_attention(q, k, v, bias))


def test_attention_probs_are_a_distribution_and_scale_defaults_to_rsqrt_d():
    q, k, v = (torch.randn(1, 1, 5, 9, dtype=torch.float64) for _ in range(3))
    out, probs = reference.attention(q, k, v, return_probs=True)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(out, reference.attention(q, k, v, scale=1 / math.sqrt(9)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_low_precision_is_as_close_as_torch(dtype):
    q, k, v = (torch.randn(1, 3, 29, 40).to(dtype) for _ in range(3))
    expected = reference.attention(q.double(), k.double(), v.double(), causal=True)
    torch_same = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(reference.attention(q, k, v, causal=True), expected, torch_same, factor=3.0)


@pytest.mark.parametrize("shape,dim", [((3, 1000), -1), ((2, 7, 5), 1), ((4099,), 0)])
def test_softmax_matches_torch(shape, dim):
    x = torch.randn(shape, dtype=torch.float64) * 10
    torch.testing.assert_close(reference.softmax(x, dim=dim, scale=0.5), torch.softmax(x * 0.5, dim=dim))


def test_softmax_causal_and_all_minus_inf_rows():
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    out = reference.softmax(x, causal=True)  # Nq=6 > Nk=4: the first two rows see no key
    assert torch.equal(out[:, :2], torch.zeros(2, 2, 4, dtype=torch.float64))
    expected = torch.softmax(x.masked_fill(~reference.causal_mask(6, 4), float("-inf"))[:, 2:], dim=-1)
    torch.testing.assert_close(out[:, 2:], expected)
    row = torch.full((1, 5), float("-inf"))
    assert torch.isnan(reference.softmax(row)).all() and torch.isnan(torch.softmax(row, -1)).all()
    with pytest.raises(ValueError, match="dim"):
        reference.softmax(x, dim=0, causal=True)


@pytest.mark.parametrize("shape,dim,causal", [((3, 0), -1, False), ((2, 4, 0), 2, True), ((0, 5), -1, True),
                                              ((2, 0, 3), 1, False)])
def test_softmax_of_rows_of_no_column_is_torchs_empty_result(shape, dim, causal):
    """Rows of no column (an empty softmax dim) raised in amax; torch.softmax gives an empty result of x's shape."""
    x = torch.randn(shape, dtype=torch.float64)
    out = reference.softmax(x, dim=dim, scale=0.5, causal=causal)
    want = torch.softmax(x * 0.5, dim=dim)
    assert out.shape == want.shape and out.dtype == want.dtype


def test_causal_softmax_wraps_the_softmax_it_is_given():
    """The causal mask kernels.softmax's torch path shares: -inf before the given softmax, zero rows after it."""
    x = torch.randn(5, 3, dtype=torch.float64)  # Nq=5 > Nk=3: the first two rows see no key
    seen = []
    out = reference.causal_softmax(x, lambda z: seen.append(z) or torch.softmax(z, -1))
    assert torch.equal(seen[0], x.masked_fill(~reference.causal_mask(5, 3), float("-inf")))
    assert torch.equal(out[:2], torch.zeros(2, 3, dtype=torch.float64)) and not out.isnan().any()
    torch.testing.assert_close(out[2:], torch.softmax(seen[0][2:], -1))


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 1000), (5, 1)])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_and_rms_norm_match_torch(shape, affine):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    w = torch.randn(shape[-1], dtype=torch.float64) if affine else None
    b = torch.randn(shape[-1], dtype=torch.float64) if affine else None
    torch.testing.assert_close(reference.layer_norm(x, shape[-1:], w, b), F.layer_norm(x, shape[-1:], w, b))
    torch.testing.assert_close(reference.rms_norm(x, shape[-1:], w), F.rms_norm(x, shape[-1:], w))
    torch.testing.assert_close(reference.rms_norm(x, shape[-1:], w, eps=1e-3), F.rms_norm(x, shape[-1:], w, eps=1e-3))


def test_norms_over_several_trailing_dims_and_bad_shape():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(reference.layer_norm(x, (4, 5)), F.layer_norm(x, (4, 5)))
    with pytest.raises(ValueError, match="normalized_shape"):
        reference.layer_norm(x, (4,))


def test_tolerance_rule_can_fail():
    ref = torch.zeros(4, dtype=torch.float64)
    noise = torch.full((4,), 1e-3)
    assert_close(torch.full((4,), 1.9e-3), ref, noise)
    with pytest.raises(AssertionError, match="max error"):
        assert_close(torch.full((4,), 2.2e-3), ref, noise)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([0.0, float("nan"), 0, 0]), ref, noise)
    assert max_error(torch.tensor([float("nan")]), torch.tensor([float("nan")])) == 0.0


def _run(code: str, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_importing_kernels_on_cpu_turns_on_the_interpreter():
    done = _run("import os, kernels; print(kernels.INTERPRETED, os.environ['TRITON_INTERPRET'])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_triton_imported_first_on_cpu_falls_back_with_a_warning():
    code = (
        "import triton, warnings, torch\n"
        "import kernels\n"
        "from kernels._runtime import kernel_runs_on\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    print(kernels.INTERPRETED, kernel_runs_on(torch.zeros(1)), 'reference' in str(w[0].message))\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rms_norm_default_eps_is_torchs(dtype):
    """eps=None: the machine epsilon of the dtype torch computes in (fp32's for fp16/bf16), so small rows agree."""
    x = torch.full((2, 8), 0.01, dtype=dtype)
    torch.testing.assert_close(reference.rms_norm(x, (8,)), F.rms_norm(x, (8,)))


@pytest.mark.parametrize("sinks", [None, torch.tensor([0.5, -1.0])])
def test_attention_with_no_keys_gives_zeros(sinks):
    """Nk = 0: every row sees no key, so zeros (lse -inf, or the sink), as the kernels give; no amax error."""
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 0, 8)
    out, lse = reference.attention(q, k, k, causal=True, sinks=sinks, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q))
    expected = torch.full((1, 2, 3), float("-inf")) if sinks is None else sinks[:, None].expand(1, 2, 3)
    torch.testing.assert_close(lse, expected)
