"""Attention on tensor descriptors (TMA, issue #20): every variant under the float64 rule with the kernels' TMA
switch forced on, the plan's legality rule, the autotune lists and defaults of the TMA families, the scratch
allocator, and counted traffic equal to the pointer path's.

On CPU Triton's interpreter emulates descriptors (masked loads and stores, with its own alignment asserts), so
every check here runs without a GPU; a spy on the launches and a count of the interpreter's descriptor loads prove
the TMA path ran (a layout the plan finds illegal would quietly run pointers instead). On a GPU the same numerics
run the compiled path where the GPU has TMA; the build report (tests/test_static_build.py) holds the compiled
defaults to showing UTMALDG without spilling.
"""
import contextlib
import contextvars

import pytest
import torch
from triton.runtime import _allocation, interpreter

import kernels
from benchmarks.counting import counting
from kernels.attention import configs
from kernels.attention.varlen import attention_varlen
from kernels.registry import use_config
from test_attention import _REFERENCE
from test_attention_mods import _check as _check_masked, _documents, _qkv
from test_attention_chunk import _check as _check_chunked
from test_attention_variants import H_SLOPES, _check, _padding_mask
from test_varlen import _cu, _per_sequence
from tolerance import BACKWARD, FORWARD, assert_close

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
# Small tiles, so that the interpreter stays quick and lengths in the tens still take several blocks each.
TMA_TILES = {"attention_fwd": dict(BLOCK_M=32, BLOCK_N=16), "attention_dkdv": dict(BLOCK_M=16, BLOCK_N=32),
             "attention_dq": dict(BLOCK_M=32, BLOCK_N=16)}


@pytest.fixture
def tma_spy(monkeypatch, device):
    """The (kernel, TMA) of every attention launch in the test; at the end, checks that every launch ran TMA and,
    interpreted, that descriptor loads happened."""
    if not kernels.INTERPRETED and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs compute capability 9.0 or later")
    launched, descriptor_loads = [], []
    for name, real in list(configs.KERNELS.items()):
        monkeypatch.setitem(configs.KERNELS, name, _Spy(name, real, launched))
    if kernels.INTERPRETED:
        builder = interpreter.interpreter_builder
        real_load = builder.create_descriptor_load
        monkeypatch.setattr(builder, "create_descriptor_load",
                            lambda *args, **kw: descriptor_loads.append(1) or real_load(*args, **kw))
    yield launched
    assert launched and all(tma for _, tma in launched), launched
    assert descriptor_loads or not kernels.INTERPRETED


@pytest.fixture
def on_tma(tma_spy):
    """Force TMA (and small tiles) on the three kernels; yields :func:`tma_spy`'s launches."""
    with contextlib.ExitStack() as stack:
        for kernel, tile in TMA_TILES.items():
            stack.enter_context(use_config(kernel, **tile, TMA=True))
        yield tma_spy


class _Spy:
    """A kernel in :data:`configs.KERNELS` that records (kernel, TMA) of each launch and runs the real one."""

    def __init__(self, name, real, launched):
        self.name, self.real, self.launched = name, real, launched

    def run(self, *args, grid, warmup, **kwargs):
        self.launched.append((self.name, kwargs["TMA"]))
        return self.real.run(*args, grid=grid, warmup=warmup, **kwargs)


SINKS = torch.tensor([0.5, -1.0, 3.0])
CASES = [  # (dtype, causal, B, H, Hkv, Nq, Nk, D, padded, variants): head dims 40/72/128, odd lengths, GQA
    (FP16, False, 1, 2, 1, 37, 45, 40, False, {}),
    (FP16, True, 1, 2, 2, 45, 37, 72, False, {}),
    (FP32, True, 2, 2, 1, 33, 33, 128, False, {}),
    (FP32, False, 1, 2, 1, 40, 50, 40, False, dict(window_size=(9, 4))),
    (FP16, True, 1, 2, 1, 33, 40, 128, False, dict(softcap=1.0)),
    (FP32, True, 1, 4, 2, 20, 29, 72, False, dict(alibi_slopes=H_SLOPES)),
    (FP16, True, 1, 3, 1, 37, 45, 40, False, dict(sinks=SINKS)),
    (BF16, True, 2, 2, 1, 41, 35, 72, True, dict(window_size=(6, 6))),
    (FP16, False, 2, 4, 2, 29, 40, 40, True, dict(dropout_p=0.15, softcap=3.0, alibi_slopes=H_SLOPES,
                                                  sinks=torch.tensor([0.0, 1.0, -1.0, 2.0]))),
]


@pytest.mark.parametrize("dtype,causal,b,h,h_kv,n_q,n_k,d,padded,variants", CASES)
def test_variants_on_tma_match_float64(attention_kernel_only, on_tma, device, dtype, causal, b, h, h_kv, n_q, n_k, d, padded,
                                       variants):
    """Plain, causal, window, softcap, ALiBi, sinks, key padding (left padding, holes, right padding) and dropout:
    forward, lse and gradients on descriptors obey the float64 rule."""
    _check(device, dtype, causal, b, h, h_kv, n_q, n_k, d, padded, **dict(variants))
    assert {name for name, _ in on_tma} == {"fwd", "dkdv", "dq"}


def test_chunked_attention_on_tma_matches_float64(attention_kernel_only, on_tma, device):
    """flash-attn 3's attention_chunk (its rule written out in test_attention_chunk.py) with causal, key padding
    and GQA, D = 72."""
    _check_chunked(device, FP16, 2, 2, 1, 45, 53, 72, 17, causal=True, padding=_padding_mask(2, 53, device))


@pytest.mark.parametrize("family, d", [(90, 72), (100, 40)])
def test_tma_families_default_configs_give_float64_results(attention_kernel_only, tma_spy, device, family, d):
    """sm_90's and sm_100's first configs as a GPU launches them (their tiles, on TMA), at an awkward shape:
    partial blocks, causal, GQA, a padded head dim."""
    defaults = configs.default_configs(family, FP16, d)
    assert all(config["TMA"] for config in defaults.values())
    with contextlib.ExitStack() as stack:
        for kernel, config in defaults.items():
            stack.enter_context(use_config(kernel, **config))
        _check(device, FP16, True, 1, 2, 1, 70, 75, d)


def test_varlen_on_tma_matches_float64_per_sequence(attention_kernel_only, on_tma, device):
    """Packed sequences (lengths 0 and 1, Lq != Lk, GQA): a descriptor has its own sequence's rows, so the keys past
    a sequence's end, real values of the next one in the packed tensor, read as zeros."""
    lens_q, lens_k, h, h_kv, d = [1, 0, 37, 5], [3, 0, 30, 40], 4, 2, 40
    q = torch.randn(sum(lens_q), h, d, dtype=FP16)
    k, v = torch.randn(2, sum(lens_k), h_kv, d, dtype=FP16)
    grad_out = torch.randn(q.shape, dtype=FP16)
    results = []
    for precision in (FP16, torch.float64):
        leaves = [t.to(precision).requires_grad_() for t in (q, k, v)]
        out, _ = _per_sequence(*leaves, lens_q, lens_k, causal=True)
        results.append((out, *torch.autograd.grad((out * grad_out.to(precision)).sum(), leaves)))
    (low, *grads_low), (exact, *grads_exact) = results
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = attention_varlen(*leaves, _cu(lens_q, device), _cu(lens_k, device), max(lens_q), max(lens_k), causal=True)
    grads = torch.autograd.grad((out * grad_out.to(device)).sum(), leaves)
    assert_close(out.cpu(), exact, low, FORWARD)
    for name, grad, grad_exact, grad_low in zip(("dq", "dk", "dv"), grads, grads_exact, grads_low):
        assert_close(grad.cpu(), grad_exact, grad_low, BACKWARD, name=name)


def test_mask_and_score_mods_on_tma_match_float64(attention_kernel_only, on_tma, device):
    """A document mask (empty, partial and full cells) with a softcap score mod, causal, GQA, D = 40."""
    doc = _documents([20, 50, 9], device)
    q, k, v = _qkv(1, 2, 1, 79, 79, 40, FP16, device)
    dense = (doc[:, None] == doc[None, :]) & torch.ones(79, 79, dtype=torch.bool, device=device).tril()
    _check_masked(q, k, v, dense, dict(causal=True, mask_mod=kernels.document_mask(doc),
                                       score_mod=kernels.softcap_score(2.0)), dict(causal=True, softcap=2.0))


def _qkv_like(device, d=40, dtype=FP16, offset=0):
    """q, k, v (1, 2, 33, d) views starting ``offset`` elements into their storage."""
    return [torch.randn(2 * 33 * d + offset, dtype=dtype, device=device)[offset:].view(1, 2, 33, d)
            for _ in range(3)]


@pytest.mark.parametrize("make, legal", [
    (lambda dev: _qkv_like(dev), True),
    (lambda dev: _qkv_like(dev, d=36), False),  # fp16 rows of 72 bytes: a row stride TMA cannot take
    (lambda dev: _qkv_like(dev, d=36, dtype=FP32), True),  # fp32 rows of 144 bytes
    (lambda dev: _qkv_like(dev, offset=4), False),  # base 8 bytes past an aligned address
    (lambda dev: [t.transpose(2, 3) for t in _qkv_like(dev, d=32)], False),  # head dim not unit-stride
    (lambda dev: [t[:, :, :, :32] for t in _qkv_like(dev)], True),  # a slice of the head dim: rows still aligned
    # batch 1 and one head: their strides are never multiplied, so an odd one does not matter
    (lambda dev: [t.as_strided((1, 1, 33, 40), (7, 3, 40, 1)) for t in _qkv_like(dev)], True),
])
def test_tma_legal_follows_the_hardware_rule(device, make, legal):
    """Unit head-dim stride, 16-byte aligned base and strides; a forced TMA launch on an illegal layout runs the
    pointer path instead, with the same float64-checked result."""
    if not kernels.INTERPRETED and torch.cuda.get_device_capability(device)[0] < 9:
        assert not configs.tma_legal(*make(device))
        return
    q, k, v = make(device)
    assert configs.tma_legal(q, k, v) is legal
    launched = []
    real = configs.KERNELS["fwd"]
    with use_config("attention_fwd", **TMA_TILES["attention_fwd"], TMA=True), \
            pytest.MonkeyPatch.context() as patch:
        patch.setitem(configs.KERNELS, "fwd", _Spy("fwd", real, launched))
        out = kernels.attention(q, k, v, causal=True)
    assert launched == [("fwd", legal)]
    exact = _REFERENCE(q.double(), k.double(), v.double(), causal=True)
    assert_close(out, exact, _REFERENCE(q, k, v, causal=True), FORWARD)


def test_each_backward_kernel_takes_tma_by_the_tensors_it_streams(device):
    """dK/dV streams Q and dO through descriptors, dQ streams K and V: a loss.sum()'s dO (a stride-0 expand) sends
    dK/dV to the pointers and leaves dQ on TMA."""
    if not kernels.INTERPRETED and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs compute capability 9.0 or later")
    q, k, v = (t.requires_grad_() for t in _qkv_like(device))
    launched = []
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        for kernel, tile in TMA_TILES.items():
            stack.enter_context(use_config(kernel, **tile, TMA=True))
        for name, real in list(configs.KERNELS.items()):
            patch.setitem(configs.KERNELS, name, _Spy(name, real, launched))
        grads = torch.autograd.grad(kernels.attention(q, k, v, causal=True).sum(), (q, k, v))
    assert launched == [("fwd", True), ("dkdv", False), ("dq", True)]
    exact = torch.autograd.grad(_REFERENCE(*(t.double() for t in (q, k, v)), causal=True).sum(), (q, k, v))
    low = torch.autograd.grad(_REFERENCE(q, k, v, causal=True).sum(), (q, k, v))
    for name, grad, grad_exact, grad_low in zip(("dq", "dk", "dv"), grads, exact, low):
        assert_close(grad, grad_exact, grad_low, BACKWARD, name=name)


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_tma_families_autotune_tma_first_and_pointers_too(family):
    """On sm_90 and sm_100, fp16/bf16: every tile on descriptors first (the default), then every tile on pointers,
    so that the autotuner chooses on the GPU; fp32 and the other families run pointers only. default_configs says
    TMA where the family's list starts with it."""
    for kernel in configs.KERNELS:
        for fp32 in (False, True):
            on = family in (90, 100) and not fp32
            assert configs.uses_tma(family, fp32) is on
            for d in (64, 128, 256):
                table, tma_table = (configs.tiles(kernel, family, d, fp32, tma=tma) for tma in (False, True))
                tuned = configs._tuned(kernel, family, d, fp32, "", (4096, 4096), True)
                got = [((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c.kwargs["TMA"])
                       for c in tuned.configs]
                assert got == [(t, True) for t in tma_table] * on + [(t, False) for t in table]
                assert sorted(tma_table) == sorted(set(tma_table)) and set(table) <= set(tma_table)
            default = configs.default_configs(family, FP32 if fp32 else FP16, 128)[f"attention_{kernel}"]
            assert default.get("TMA", False) is on
    builds = [b for b in configs._builds() if b.default and family in b.families and "TMA" in b.constexprs]
    assert builds and {b.constexprs["TMA"] for b in builds if b.dtype != "fp32"} == {family in (90, 100)}
    assert {b.constexprs["TMA"] for b in builds if b.dtype == "fp32"} == {False}


def test_scratch_allocator_is_set_once_and_never_over_a_users():
    """Device-side descriptors need global scratch from ``triton.set_allocator``: the launch path sets torch's
    allocator where none is set (per thread: Triton keeps it in a ContextVar) and leaves a user's own alone."""
    def in_a_fresh_context():
        _allocation._allocator.set(_allocation.NullAllocator())
        configs._ensure_scratch_allocator()
        assert _allocation._allocator.get() is configs._scratch

        def users(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        _allocation._allocator.set(users)
        configs._ensure_scratch_allocator()
        assert _allocation._allocator.get() is users

    before = _allocation._allocator.get()
    contextvars.copy_context().run(in_a_fresh_context)
    assert _allocation._allocator.get() is before


@pytest.mark.skipif(not kernels.INTERPRETED, reason="counts interpreted loads and stores")
@pytest.mark.parametrize("variants", [dict(causal=True), dict(key_padding_mask=True)])
def test_counted_traffic_on_tma_is_the_pointer_paths(variants):
    """Descriptor loads and stores are counted (the interpreter runs them as masked loads and stores), and they
    move what the pointer path moves: the same rows, the head-dim padding excluded."""
    q, k, v = (t.requires_grad_() for t in _qkv_like("cpu"))
    padded = variants.pop("key_padding_mask", False)
    counted = []
    for tma in (False, True):
        if padded:  # a new mask each time: the key range derived from one is memoised (plan.LastTensor)
            variants["key_padding_mask"] = (torch.arange(33) < 20)[None]
        with contextlib.ExitStack() as stack:
            for kernel, tile in TMA_TILES.items():
                stack.enter_context(use_config(kernel, **tile, TMA=tma))
            with counting() as counts:  # autograd.grad: no accumulation into .grad, which is traffic too
                torch.autograd.grad(kernels.attention(q, k, v, **variants).sum(), (q, k, v))
        counted.append((counts.bytes_read, counts.bytes_written, counts.flops))
    assert counted[0] == counted[1] and counted[0][0] > 0


def test_keys_past_the_visible_range_are_never_read_on_tma(attention_kernel_only, on_tma, device):
    """NaN in K and V past a padding mask's last visible key (a cache's unwritten slots) stays out of the result
    and the gradients: the descriptors end at the block's key bound, as the pointer path's masks do, so those rows
    read as zeros rather than as NaN that a zero probability would still turn into NaN."""
    q, k, v = _qkv_like(device)
    k[:, :, 20:], v[:, :, 20:] = float("nan"), float("nan")
    visible = (torch.arange(33, device=device) < 20)[None]
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = kernels.attention(*leaves, key_padding_mask=visible)
    dq, dk, dv = torch.autograd.grad(out.square().sum(), leaves)
    cut = (q.detach(), k.detach()[:, :, :20], v.detach()[:, :, :20])
    exact = _REFERENCE(*(t.double() for t in cut))
    assert_close(out, exact, _REFERENCE(*cut), FORWARD)
    assert torch.isfinite(dq).all() and torch.isfinite(dk[:, :, :20]).all() and torch.isfinite(dv[:, :, :20]).all()
    assert not dk[:, :, 20:].any() and not dv[:, :, 20:].any()
