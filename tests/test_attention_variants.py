"""The attention variants (sliding window, softcap, ALiBi, sinks, dropout) against float64 math.

Forward errors may be 2x, gradient errors 3x what PyTorch itself makes in the same precision (tests/tolerance.py);
the float64 truth is ``kernels.reference.attention`` with the same keyword arguments (dropout through the mask
``kernels.attention_dropout_mask`` says the call draws).
"""
import math

import pytest
import torch

import kernels
from benchmarks.counting import counting
from kernels import reference
from kernels.attention import configs, sdpa
from kernels.registry import use_config
from tolerance import BACKWARD, FORWARD, assert_close

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
_REFERENCE = reference.attention  # captured at import: attention_kernel_only replaces reference.attention
_TORCH_SDPA = sdpa._TORCH_SDPA


def _padding_mask(b, n_k, device):
    """Left padding in batch row 0, right padding and a hole in the others: (B, Nk) bool."""
    mask = torch.ones(b, n_k, dtype=torch.bool, device=device)
    mask[0, : n_k // 4] = False
    for row in range(1, b):
        mask[row, n_k - n_k // 3:] = False
        mask[row, n_k // 2] = False
    return mask


def _check(device, dtype, causal, b, h, h_kv, n_q, n_k, d, padded=False, **variants):
    """Kernel out, lse and gradients (q, k, v and sinks) against float64 with the low-precision reference as the
    noise. lse joins the loss when every row has a finite one (its gradient path is then tested too). With
    dropout, the reference takes the mask that the helper draws from the call's generator state."""
    q, k, v = (torch.randn(b, heads, n, d, dtype=dtype, device=device)
               for heads, n in ((h, n_q), (h_kv, n_k), (h_kv, n_k)))
    kpm = _padding_mask(b, n_k, device) if padded else None
    if variants.get("sinks") is not None:
        variants["sinks"] = variants["sinks"].to(device=device, dtype=dtype)
    if variants.get("alibi_slopes") is not None:
        variants["alibi_slopes"] = variants["alibi_slopes"].to(device)
    grad_out = torch.randn(b, h, n_q, d, dtype=dtype, device=device)
    grad_lse = torch.randn(b, h, n_q, dtype=FP32, device=device)
    drop = None
    if variants.get("dropout_p"):
        torch.manual_seed(1234)
        drop = kernels.attention_dropout_mask(b, h, n_q, n_k, variants["dropout_p"], device)
    leaves = [q, k, v] + ([variants["sinks"]] if variants.get("sinks") is not None else [])
    leaves = [t.requires_grad_() for t in leaves]
    torch.manual_seed(1234)  # the generator state the mask was drawn from
    out, lse = kernels.attention(q, k, v, causal=causal, return_lse=True, key_padding_mask=kpm, **variants)
    results = []
    for ref_dtype in (None, torch.float64):
        ref_leaves = [t.detach().to(ref_dtype or t.dtype).requires_grad_() for t in leaves]
        ref_variants = dict(variants, dropout_mask=drop)
        if len(ref_leaves) == 4:
            ref_variants["sinks"] = ref_leaves[3]
        ref_out, ref_lse = _REFERENCE(*ref_leaves[:3], causal=causal, return_lse=True,
                                      mask=None if kpm is None else kpm[:, None, None, :], **ref_variants)
        results.append((ref_out, ref_lse, ref_leaves))
    (low_out, low_lse, low_leaves), (exact_out, exact_lse, exact_leaves) = results
    assert out.dtype == dtype and lse.dtype == FP32 and lse.shape == (b, h, n_q)
    assert_close(out, exact_out, low_out, FORWARD)
    empty = torch.isneginf(exact_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert_close(lse[~empty], exact_lse[~empty], low_lse.float()[~empty], FORWARD, name="lse")
    assert not torch.isnan(out).any()
    with_lse = not bool(empty.any())

    def loss(o, l_):
        return (o * grad_out.to(o.dtype)).sum() + ((l_ * grad_lse.to(l_.dtype)).sum() if with_lse else 0)

    grads = torch.autograd.grad(loss(out, lse), leaves)
    low = torch.autograd.grad(loss(low_out, low_lse), low_leaves)
    exact = torch.autograd.grad(loss(exact_out, exact_lse), exact_leaves)
    for name, grad, grad_exact, grad_low in zip(("dq", "dk", "dv", "dsinks"), grads, exact, low):
        assert grad.shape == grad_exact.shape and grad.dtype == dtype
        assert_close(grad, grad_exact, grad_low, BACKWARD, name=name)
    return out, grads


H_SLOPES, BH_SLOPES = torch.tensor([0.5, 0.125, 0.03125, 0.25]), torch.tensor([[0.3, 0.7], [0.05, 0.2]])
CASES = [  # (dtype, causal, B, H, Hkv, Nq, Nk, D, padded, variants): odd lengths, odd head dims, GQA, Nq != Nk
    (FP16, False, 1, 2, 1, 70, 75, 59, False, dict(window_size=(9, 4))),
    (BF16, True, 1, 2, 2, 45, 37, 32, False, dict(window_size=(5, -1))),
    (FP32, False, 1, 1, 1, 33, 50, 1, False, dict(window_size=(-1, 3))),
    (FP32, True, 1, 2, 1, 40, 40, 20, False, dict(window_size=(1, 0))),
    (FP16, True, 1, 2, 1, 40, 41, 128, False, dict(softcap=1.0)),
    (FP32, False, 1, 2, 2, 19, 30, 59, False, dict(softcap=0.5)),
    (FP32, True, 1, 4, 2, 20, 29, 256, False, dict(alibi_slopes=H_SLOPES)),
    (BF16, False, 2, 2, 1, 30, 30, 16, False, dict(alibi_slopes=BH_SLOPES)),
    (FP16, True, 1, 3, 1, 37, 45, 64, False, dict(sinks=torch.tensor([0.5, -1.0, 3.0]))),
    (FP32, True, 1, 2, 2, 50, 33, 8, False, dict(sinks=torch.tensor([1.0, -2.0]), window_size=(3, -1))),
    (FP16, True, 2, 4, 2, 50, 61, 59, True, dict(window_size=(12, 3), softcap=2.0, alibi_slopes=H_SLOPES)),
    (BF16, False, 2, 2, 1, 41, 35, 128, True, dict(window_size=(6, 6), sinks=torch.tensor([0.0, 2.0]))),
    (FP32, True, 1, 2, 1, 37, 45, 24, False, dict(dropout_p=0.3, window_size=(20, -1))),
    (FP16, False, 2, 4, 2, 29, 40, 59, True, dict(dropout_p=0.15, softcap=3.0, alibi_slopes=H_SLOPES,
                                                  sinks=torch.tensor([0.0, 1.0, -1.0, 2.0]))),
]


@pytest.mark.parametrize("dtype,causal,b,h,h_kv,n_q,n_k,d,padded,variants", CASES)
def test_variants_match_float64(attention_kernel_only, device, dtype, causal, b, h, h_kv, n_q, n_k, d, padded, variants):
    _check(device, dtype, causal, b, h, h_kv, n_q, n_k, d, padded, **variants)


@pytest.mark.parametrize("softcap", [50.0, 1000.0])
def test_large_softcap_in_fp32(attention_kernel_only, device, softcap):
    """Gemma 2's softcap of 50 (and larger) puts the capped scores at |s / cap| < 1/8, where tanh from
    (1 - e^-2x) / (1 + e^-2x) cancels: fp32 errors were 2-100x torch's before the small-argument series."""
    _check(device, FP32, True, 1, 2, 1, 23, 30, 24, False, softcap=softcap)


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=16)])
def test_window_with_other_tiles(attention_kernel_only, device, config):
    """Tiles wider or narrower than the window: the block-range arithmetic of every kernel, both edges."""
    with use_config("attention_fwd", **config), use_config("attention_dkdv", **config), \
            use_config("attention_dq", **config):
        _check(device, FP32, False, 1, 2, 1, 90, 100, 16, True, window_size=(20, 7), alibi_slopes=H_SLOPES[:2])


def test_flash_attn_semantics_on_hand_computed_cases(attention_kernel_only, device):
    """Window edges bottom-right aligned; softcap before ALiBi; ALiBi distance from the shifted diagonal;
    a sink in the denominator and in lse."""
    values = torch.arange(4.0, device=device).reshape(1, 1, 4, 1)
    zeros = torch.zeros(1, 1, 2, 1, device=device)
    keys = torch.zeros(1, 1, 4, 1, device=device)
    # Nq = 2, Nk = 4, shift 2: query 0 sees keys [1, 2] with window (1, 0), [2, 3] with (0, 1); uniform scores.
    out = kernels.attention(zeros, keys, values, window_size=(1, 0))
    torch.testing.assert_close(out.flatten(), torch.tensor([1.5, 2.5], device=device))
    out = kernels.attention(zeros, keys, values, window_size=(0, 1))
    torch.testing.assert_close(out.flatten(), torch.tensor([2.5, 3.0], device=device))
    # causal overrides the right edge: window (1, 5) with causal is window (1, 0)
    out = kernels.attention(zeros, keys, values, causal=True, window_size=(1, 5))
    torch.testing.assert_close(out.flatten(), torch.tensor([1.5, 2.5], device=device))
    # Nq = 1, Nk = 2: scores 2 and 0 capped by tanh, then ALiBi -0.5 * |0 + 1 - j| on key 0 only.
    q = torch.ones(1, 1, 1, 1, device=device)
    k = torch.tensor([2.0, 0.0], device=device).reshape(1, 1, 2, 1)
    v = torch.tensor([1.0, 0.0], device=device).reshape(1, 1, 2, 1)
    out = kernels.attention(q, k, v, scale=1.0, softcap=1.0, alibi_slopes=torch.tensor([0.5], device=device))
    torch.testing.assert_close(out.flatten(), torch.sigmoid(torch.tanh(torch.tensor([2.0])) - 0.5).to(device))
    # a sink of log 2 with two equal scores: out = (1 + 3) / (2 + 2), lse = log 4
    v = torch.tensor([1.0, 3.0], device=device).reshape(1, 1, 2, 1)
    out, lse = kernels.attention(q * 0, k, v, sinks=torch.tensor([math.log(2.0)], device=device), return_lse=True)
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0], device=device))
    torch.testing.assert_close(lse.flatten(), torch.tensor([math.log(4.0)], device=device))


def test_rows_outside_every_window_give_zeros_and_the_sink(attention_kernel_only, device):
    """Nq > Nk with window (0, 0): the first Nq - Nk queries see no key: zeros, lse -inf, or lse = sink."""
    q, k, v = torch.randn(1, 2, 9, 16, device=device), torch.randn(1, 1, 4, 16, device=device), \
        torch.randn(1, 1, 4, 16, device=device)
    out, lse = kernels.attention(q, k, v, window_size=(0, 0), return_lse=True)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5])) and torch.isneginf(lse[:, :, :5]).all()
    sinks = torch.tensor([0.25, -3.0], device=device)
    out, lse = kernels.attention(q, k, v, window_size=(0, 0), return_lse=True, sinks=sinks)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    torch.testing.assert_close(lse[0, :, :5], sinks[:, None].expand(2, 5))


def test_dropout_is_reproducible_and_its_mask_is_the_helpers(device):
    """Same seed: bit-identical output and gradients; another seed: another mask; the helper's mask has the
    expected keep rate and matches the rows the call zeroes."""
    q, k, v = (torch.randn(1, 2, 33, 16, device=device, requires_grad=True) for _ in range(3))
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        out = kernels.attention(q, k, v, dropout_p=0.4, causal=True)
        runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])
    torch.manual_seed(3)
    mask = kernels.attention_dropout_mask(1, 2, 33, 33, 0.4, device)
    assert mask.dtype == torch.bool and mask.shape == (1, 2, 33, 33)
    assert abs(mask.float().mean().item() - 0.6) < 0.05
    # v = one-hot key indicators, so out[i, j] = p_ij * keep_ij / (1 - p): zero exactly where the mask drops
    q, k = torch.randn(1, 2, 33, 33, device=device), torch.randn(1, 1, 33, 33, device=device)
    torch.manual_seed(3)
    probs = kernels.attention(q, k, torch.eye(33, device=device)[None, None], dropout_p=0.4, causal=True)
    visible = reference.causal_mask(33, 33, device)
    assert torch.equal(probs != 0, mask & visible)
    assert kernels.attention_dropout_mask(0, 2, 3, 4, 0.5, device).shape == (0, 2, 3, 4)


def test_window_reads_grow_with_n_times_window_not_n_squared(device):
    """Counted dot FLOPs (each a key block visited) of forward + backward with window (16, 0): doubling N
    doubles them; without the window, causal attention quadruples."""
    if not kernels.INTERPRETED:
        pytest.skip("counting needs the interpreter")

    def flops(n, **variants):
        q, k, v = (torch.randn(1, 1, n, 16, device=device, requires_grad=True) for _ in range(3))
        with counting() as counts:
            out = kernels.attention(q, k, v, causal=True, **variants)
            out.backward(torch.ones_like(out))
        return counts.flops

    windowed = flops(256, window_size=(16, 0)) / flops(128, window_size=(16, 0))
    full = flops(256) / flops(128)
    assert windowed < 2.3 and full > 3.3, (windowed, full)


def test_compiles_with_fullgraph(attention_kernel_only, device):
    """torch.compile(fullgraph=True): the variants' arguments reach the custom ops and their fake impls."""
    q, k, v = (torch.randn(1, 2, 20, 16, device=device, requires_grad=True) for _ in range(3))
    sinks = torch.zeros(2, device=device, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25], device=device)

    def f(q, k, v, sinks):
        return kernels.attention(q, k, v, causal=True, window_size=(4, 0), softcap=2.0, alibi_slopes=slopes,
                                 sinks=sinks)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, sinks)
    grads = torch.autograd.grad(out.sum(), (q, k, v, sinks))
    eager = f(q, k, v, sinks)
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, torch.autograd.grad(eager.sum(), (q, k, v, sinks))):
        torch.testing.assert_close(got, want)
    dropped = torch.compile(lambda q, k, v: kernels.attention(q, k, v, dropout_p=0.5), fullgraph=True,
                            backend="aot_eager")(q, k, v)
    assert dropped.shape == q.shape and torch.isfinite(dropped).all()


def test_sdpa_runs_the_kernel_for_sliding_window_masks(attention_kernel_only, device):
    """Hugging Face's sliding-window mask (padding AND causal AND i - j < w) runs the kernel, matching torch."""
    b, h, n, d, w = 2, 2, 45, 16, 7
    q, k, v = (torch.randn(b, h, n, d, device=device) for _ in range(3))
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    keys = _padding_mask(b, n, device)
    for window in ((j <= i) & (i - j < w), (i - j < w) & (j - i < 3), (j < i) & (i - j <= w)):
        mask = (keys[:, None, :] & window)[:, None]
        out = kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        expected = _TORCH_SDPA(q, k, v, attn_mask=mask)
        seen = mask.any(-1, keepdim=True)  # torch gives NaN for rows that see no key; the kernel zeros
        torch.testing.assert_close(out, torch.where(seen, expected, 0.0), atol=1e-5, rtol=1e-5)


def test_sdpa_falls_back_for_masks_that_are_not_windows(monkeypatch, device):
    """A bool mask with a gap inside the band is no window: torch's function runs."""
    calls = []
    monkeypatch.setattr(sdpa, "_TORCH_SDPA", lambda *a, **kw: calls.append(1) or _TORCH_SDPA(*a, **kw))
    q = torch.randn(1, 1, 10, 8, device=device)
    i = torch.arange(10, device=device)[:, None]
    j = torch.arange(10, device=device)[None, :]
    mask = (j <= i) & (i - j < 4) & (i - j != 1)
    kernels.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert calls == [1]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window_size=5), TypeError, "window_size"),
    (dict(window_size=(1, 2, 3)), TypeError, "window_size"),
    (dict(window_size=(1.0, 2)), TypeError, "window_size"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap="1"), TypeError, "softcap"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(2, 2, 2)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.float64)), TypeError, "alibi_slopes"),
    (dict(alibi_slopes=[0.5, 0.5]), TypeError, "alibi_slopes"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_p"),
    (dict(sinks=torch.ones(3)), ValueError, "sinks"),
    (dict(sinks=torch.ones(2, dtype=torch.int64)), TypeError, "sinks"),
])
def test_bad_variant_arguments_raise_before_launch(attention_kernel_only, monkeypatch, device, kwargs, error, match):
    monkeypatch.setattr(configs, "launch", None)  # a launch would fail otherwise
    q = torch.randn(1, 2, 5, 8, device=device)
    kwargs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    with pytest.raises(error, match=match):
        kernels.attention(q, q, q, **kwargs)


def test_bad_dropout_mask_arguments_raise(device):
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.attention_dropout_mask(1, 1, 2, 2, 1.5, device)
    with pytest.raises(ValueError, match="n_q"):
        kernels.attention_dropout_mask(1, 1, -2, 2, 0.5, device)


def test_each_specialisations_default_build_is_the_config_its_launch_tries_first(monkeypatch, device):
    """One source of truth: every (kernel, dtype, head dim, specialisation) has, for each GPU family, one build
    marked default for that family, the first entry of the family's table that its launch autotunes over
    (dropout's forward: its own smaller tiles; a specialisation's own first entry where the table's spills with
    it), and a dropout or mod call asks the launcher for that table."""
    seen = set()
    for b in configs._builds():
        if not b.default or b.kernel not in ("attention_fwd", "attention_dkdv", "attention_dq"):
            continue
        kernel = b.kernel.removeprefix("attention_")
        assert b.families, b.label
        for family in b.families:
            expected = configs.flavoured(kernel, family, b.head_dim, b.dtype == "fp32", b.variant, tma=True)[0]
            assert ((b.constexprs["BLOCK_M"], b.constexprs["BLOCK_N"], b.num_warps, b.num_stages),
                    b.constexprs["TMA"]) == expected, (b.label, family)
            key = (kernel, b.dtype, b.head_dim, b.variant, family)
            assert key not in seen, key
            seen.add(key)
    # families x dtypes x head dims x (plain + variants): fwd (+ sinks), dK/dV and dQ, each with window, chunk,
    # softcap, alibi, dropout, varlen, mask_mod and score_mod
    assert len(seen) == len(configs.FAMILIES) * 9 * (10 + 9 + 9)
    for variant in ("dropout", "mask_mod"):
        tuned = configs._tuned("fwd", 90, 64, False, variant, (4096, 4096))  # long: no pruning
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuned.configs] == \
            configs.tiles("fwd", 90, 64, False, variant)
    asked = []
    launch = configs.launch
    monkeypatch.setattr(configs, "launch", lambda *args, **kwargs: asked.append(
        (args[0], configs.specialisation(args[4], kwargs["dropout"], kwargs["varlen"], kwargs["alibi"],
                                         kwargs.get("sinks", False)))) or
        launch(*args, **kwargs))
    q = torch.randn(1, 1, 8, 16, device=device, requires_grad=True)
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2], dtype=torch.int32, device=device)
    kernels.attention(q, q, q, dropout_p=0.5).sum().backward()
    kernels.attention(q, q, q).sum().backward()
    kernels.attention(q, q, q, mask_mod=kernels.document_mask(doc)).sum().backward()
    kernels.attention(q, q, q, score_mod=kernels.softcap_score(5.0)).sum().backward()
    kernels.attention(q, q, q, softcap=5.0).sum().backward()
    # varlen's and chunk's firsts were certified by the build report but never tried first (their specialisation
    # was not asked for)
    packed, offsets = q[0].transpose(0, 1), torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    kernels.attention_varlen(packed, packed, packed, offsets, offsets, 5, 5, softcap=5.0).sum().backward()
    kernels.attention(q, q, q, causal=True, attention_chunk=4, softcap=5.0).sum().backward()
    kernels.attention(q, q, q, alibi_slopes=torch.ones(1, device=device)).sum().backward()
    kernels.attention(q, q, q, window_size=(3, 0)).sum().backward()
    kernels.attention(q, q, q, sinks=torch.zeros(1, device=device)).sum().backward()  # the backward has no sinks
    assert asked == [(kernel, variant) for variant in ("dropout", "", "mask_mod", "score_mod", "softcap", "varlen",
                                                       "chunk", "alibi", "window") for kernel in ("fwd", "dkdv", "dq")
                     ] + [("fwd", "sinks"), ("dkdv", ""), ("dq", "")]


def test_a_forced_tile_larger_than_a_block_mask_cell_is_refused(device):
    q = torch.randn(1, 1, 8, 16, device=device)
    doc = torch.zeros(8, dtype=torch.int32, device=device)
    for kernel, block in (("attention_fwd", "BLOCK_M"), ("attention_fwd", "BLOCK_N"), ("attention_dkdv", "BLOCK_N")):
        config = {"BLOCK_M": 32, "BLOCK_N": 32, block: 256}
        with use_config(kernel, **config), pytest.raises(ValueError, match=f"{block}=256 is larger than a block"):
            if kernel == "attention_fwd":
                kernels.attention(q, q, q, mask_mod=kernels.document_mask(doc))
            else:
                qg = q.clone().requires_grad_()
                kernels.attention(qg, qg, qg, mask_mod=kernels.document_mask(doc)).sum().backward()
