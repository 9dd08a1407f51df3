"""A seeded sample of randomised differential ("fuzz") cases: kernels.attention_with_kvcache and
kernels.flash_attn.flash_attn_with_kvcache, kernels.softmax / log_softmax, and the norms (functions and modules,
forward and backward), each drawn from a seed over many options at once and checked against float64 math written
here from the documented semantics (flash-attn 2.x's ``flash_attn_with_kvcache``; torch's softmax, layer_norm and
rms_norm; Liger-Kernel's offset and casting modes) with FlashAttention's rule (tests/tolerance.py).

The draws cross what the hand-written tests take one or two at a time: decoding with paged caches of any page size
in shuffled page order, cache_batch_idx subsets, left padding, rotary tables (interleaved or GPT-NeoX, rotary dim
below the head dim), causal and windowed rows, softcap, ALiBi, GQA, odd head dims, non-contiguous q, both APIs'
lse conventions and every split count; row kernels at awkward widths, any dim and layout, -inf entries, large
magnitudes and offsets, lowered block limits (the multi-block paths at small widths), multi-dim normalized shapes,
mixed parameter and residual dtypes, casting modes and modules. Cases are tiny: the interpreter runs each in well
under a second.
"""
import math
import random
import sys

import pytest
import torch

import kernels
from kernels.flash_attn import flash_attn_with_kvcache
from test_fuzz_regressions import attention_math
from tolerance import BACKWARD, FORWARD, assert_close

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
norm_module, softmax_module = sys.modules["kernels.layernorm"], sys.modules["kernels.softmax"]
_TORCH_OPS = softmax_module._torch_ops  # captured at import: rows_kernel_only makes it raise
pytestmark = pytest.mark.usefixtures("rows_kernel_only")


# ------------------------------------------------------------------------------------------------------ decoding

def _decode_case(seed, device):
    """A random decode call's arguments (CPU tensors; ``device`` only names where the kernel runs)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    dtype = rng.choice([FP16, FP32])  # (no bf16: the interpreter's bf16 tl.dot is not bf16 arithmetic)
    batch, n_q, kv_heads = rng.randint(1, 3), rng.randint(1, 9), rng.choice([1, 2, 3])
    heads, d = kv_heads * rng.choice([1, 2, 4]), rng.choice([8, 24, 40, 64, 72, 128, 5, 13, 2])
    table = batch_idx = None
    if rng.random() < 0.4:  # paged: every row's pages distinct, in shuffled order, spare pages left over
        page_size = rng.randint(1, 16)
        pages = rng.randint(1, max(1, 80 // page_size))
        capacity, cache_rows, slots = page_size * pages, batch * pages + rng.randint(0, 3), page_size
        table = torch.randperm(cache_rows, generator=gen)[:batch * pages].view(batch, pages).int()
    else:
        capacity = slots = rng.randint(1, 80)
        cache_rows = batch + rng.randint(0, 2)
        if rng.random() < 0.4:
            batch_idx = torch.randperm(cache_rows, generator=gen)[:batch].int()
    n_new = 0 if rng.random() < 0.3 else rng.randint(1, min(9, capacity))
    seqlens = [rng.choice([0, capacity - n_new, rng.randint(0, capacity - n_new)]) for _ in range(batch)]
    int_seqlens = bool(n_new) and rng.random() < 0.1  # cache_seqlens as an int: one length for every row
    seqlens = seqlens[:1] * batch if int_seqlens else seqlens
    leftpad = [rng.randint(0, s) for s in seqlens] if rng.random() < 0.3 else None
    window = (-1, -1)
    if rng.random() < 0.35:
        window = (rng.choice([-1, rng.randint(0, 20), 2 ** 31 - 1]), rng.choice([-1, rng.randint(0, 10), 10 ** 6]))
    rotary = None
    if n_new and d >= 2 and rng.random() < 0.4:
        angle = torch.rand(capacity + n_q + rng.randint(0, 3), rng.randint(1, d // 2), generator=gen,
                           dtype=torch.float64) * 2 * math.pi
        rotary = (angle.cos().to(dtype), angle.sin().to(dtype), rng.random() < 0.5)
    alibi = None
    if rng.random() < 0.2:
        alibi = torch.rand((heads,) if rng.random() < 0.5 else (batch, heads), generator=gen) * rng.choice([0.1, 4.0])
    mag = rng.choice([1.0, 0.1] if dtype == FP32 else [1.0, 3.0, 0.1])  # (fp32: scores of tens round past 2x)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return dict(
        dtype=dtype, device=device, q=randn(batch, n_q, heads, d, scale=mag),
        q_layout=rng.choice(["", "bhsd", "slice"]),
        k_cache=randn(cache_rows, slots, kv_heads, d), v_cache=randn(cache_rows, slots, kv_heads, d),
        k=randn(batch, n_new, kv_heads, d, scale=mag) if n_new else None,
        v=randn(batch, n_new, kv_heads, d) if n_new else None, block_table=table, batch_idx=batch_idx,
        seqlens=seqlens, int_seqlens=int_seqlens, leftpad=leftpad, rotary=rotary,
        causal=rng.random() < 0.4, window=window, softcap=rng.uniform(0.5, 30.0) if rng.random() < 0.2 else 0.0,
        alibi=alibi, scale=rng.uniform(0.05, 1.0) if rng.random() < 0.3 else None,
        splits=rng.choice([0, 1, 2, 3, 7]), flash_api=rng.random() < 0.3)


def _laid_out(q, how):
    """q with the same values in another layout: heads-major strides, or every other element of a wider tensor."""
    if how == "bhsd":
        return q.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "slice":
        wide = torch.zeros(*q.shape[:-1], 2 * q.shape[-1], dtype=q.dtype, device=q.device)
        wide[..., ::2] = q
        return wide[..., ::2]
    return q


def _run_decode(case):
    """The kernel's (out, lse with -inf for rows that see no key, k_cache, v_cache after the call), on CPU."""
    dev = case["device"]
    on = {name: (None if case[name] is None else case[name].to(dev))
          for name in ("k_cache", "v_cache", "k", "v", "block_table", "batch_idx", "alibi")}
    q = _laid_out(case["q"].to(dev), case["q_layout"])
    seqlens = (case["seqlens"][0] if case["int_seqlens"]
               else torch.tensor(case["seqlens"], dtype=torch.int32, device=dev))
    leftpad = None if case["leftpad"] is None else torch.tensor(case["leftpad"], dtype=torch.int32, device=dev)
    cos, sin, interleaved = (None, None, True) if case["rotary"] is None else case["rotary"]
    cos, sin = (None, None) if cos is None else (cos.to(dev), sin.to(dev))
    common = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, cache_batch_idx=on["batch_idx"],
                  cache_leftpad=leftpad, block_table=on["block_table"], causal=case["causal"],
                  window_size=case["window"], softcap=case["softcap"], rotary_interleaved=interleaved,
                  alibi_slopes=on["alibi"], num_splits=case["splits"])
    args = (q, on["k_cache"], on["v_cache"], on["k"], on["v"])
    if case["flash_api"]:
        out, lse = flash_attn_with_kvcache(*args, softmax_scale=case["scale"], return_softmax_lse=True, **common)
        lse = lse.masked_fill(lse == math.inf, -math.inf)  # flash-attn's +inf for a row that sees no key
    else:
        out, lse = kernels.attention_with_kvcache(*args, scale=case["scale"], return_lse=True, **common)
    return out.cpu(), lse.cpu(), on["k_cache"].cpu(), on["v_cache"].cpu()


def _rotated(x, cos, sin, positions, interleaved):
    """x (S, heads, D) float64 rotated at ``positions`` (S,): each pair (x[2j], x[2j + 1]) when interleaved, else
    (x[j], x[j + r / 2]), taken as a complex number and multiplied by cos + i sin of frequency j; dims past r stay."""
    half = cos.shape[1]
    pairs = x[..., :2 * half].unflatten(-1, (half, 2) if interleaved else (2, half))
    pairs = pairs if interleaved else pairs.transpose(-1, -2)
    turn = torch.complex(cos[positions].double(), sin[positions].double())[:, None, :]
    turned = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * turn)
    turned = turned if interleaved else turned.transpose(-1, -2)
    return torch.cat([turned.flatten(-2), x[..., 2 * half:]], -1)


def _logical(cache, b, case):
    """Batch row b's cache as one sequence (capacity, Hkv, D): its cache row, or its pages in table order."""
    if case["block_table"] is not None:
        return cache[case["block_table"][b].long()].flatten(0, 1)
    return cache[b if case["batch_idx"] is None else int(case["batch_idx"][b])]


def _decode_math(case, dtype):
    """(out (B, Sq, H, D), lse (B, H, Sq), each row's cache (K, V) after the append) with the attention in
    ``dtype``: rotary in float64 (then rounded to ``dtype``), scores, softmax and the weighted sum in ``dtype``."""
    q_all, k_new, v_new = case["q"], case["k"], case["v"]
    n_q, _, d = q_all.shape[1:]
    n_new = 0 if k_new is None else k_new.shape[1]
    scale = 1 / math.sqrt(d) if case["scale"] is None else case["scale"]
    left, right = case["window"][0], 0 if case["causal"] else case["window"][1]
    outs, lses, caches = [], [], []
    for b, start in enumerate(case["seqlens"]):
        end = start + n_new
        keys, values = (_logical(case[name], b, case).to(dtype).clone() for name in ("k_cache", "v_cache"))
        q = q_all[b].double()
        if n_new:
            k = k_new[b].double()
            if case["rotary"] is not None:
                cos, sin, interleaved = case["rotary"]
                k = _rotated(k, cos, sin, torch.arange(start, end), interleaved)
                q_at = start + (torch.arange(n_q) if case["causal"] or case["window"] != (-1, -1) else 0)
                q = _rotated(q, cos, sin, q_at + torch.zeros(n_q, dtype=torch.long), interleaved)
            keys[start:end], values[start:end] = k.to(dtype), v_new[b].to(dtype)
        caches.append((keys, values))
        pos, diag = torch.arange(len(keys)), torch.arange(n_q)[:, None] + end - n_q
        lo = 0 if case["leftpad"] is None else case["leftpad"][b]
        seen = (pos >= lo) & (pos < end) & ((pos >= diag - left) | (left < 0)) & ((pos <= diag + right) | (right < 0))
        slopes = None if case["alibi"] is None else (case["alibi"] if case["alibi"].dim() == 1 else case["alibi"][b])
        out, lse = attention_math(*(t.transpose(0, 1)[None] for t in (q.to(dtype), keys, values)), seen, scale,
                                  case["softcap"], None if slopes is None else slopes[None], shift=end - n_q)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses), caches


def _check_decode(case):
    out, lse, k_after, v_after = _run_decode(case)
    exact_out, exact_lse, exact_caches = _decode_math(case, torch.float64)
    low_out, low_lse, low_caches = _decode_math(case, case["dtype"])
    assert out.dtype == case["dtype"] and out.shape == case["q"].shape and lse.dtype == FP32
    assert_close(out, exact_out, low_out, FORWARD)
    empty = torch.isneginf(exact_lse)
    assert torch.equal(torch.isneginf(lse), empty) and torch.all(out.transpose(1, 2)[empty] == 0)
    assert_close(lse[~empty], exact_lse[~empty], low_lse.float()[~empty], FORWARD, name="lse")
    # The new keys/values sit at [seqlen, seqlen + Sk_new) of each row's cache; every other slot is untouched.
    n_new = 0 if case["k"] is None else case["k"].shape[1]
    for name, after, index in (("k_cache", k_after, 0), ("v_cache", v_after, 1)):
        expected_after = case[name].clone()
        for b, start in enumerate(case["seqlens"]):
            got = _logical(after, b, case)[start:start + n_new]
            assert_close(got, exact_caches[b][index][start:start + n_new], low_caches[b][index][start:start + n_new],
                         FORWARD, name=f"{name} row {b}")
            _logical(expected_after, b, case)[start:start + n_new] = got  # (a view for contiguous caches)
            if case["block_table"] is not None:  # pages: write the slots back page by page
                page_size = after.shape[1]
                for p in range(start, start + n_new):
                    page = int(case["block_table"][b, p // page_size])
                    expected_after[page, p % page_size] = after[page, p % page_size]
        assert torch.equal(after, expected_after), f"{name}: slots outside the append changed"


DECODE_SEEDS = [0, 12, 26, 30, 45, 48, 53, 54, 78, 99]


@pytest.mark.parametrize("seed", DECODE_SEEDS)
def test_decode_sample(device, seed):
    with torch.no_grad():
        _check_decode(_decode_case(seed, device))


# ---------------------------------------------------------------------------------------------------- row kernels

WIDTHS = [1, 2, 3, 5, 7, 17, 31, 100, 127, 257, 1000, 1025, 3000, 5000]


def _rows_tensor(rng, gen, shape, dtype, magnitude):
    """randn * magnitude, sometimes on a large offset (a mean far from zero, a small spread), in ``dtype``."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    if rng.random() < 0.2:
        x = x + rng.choice([-1, 1]) * magnitude * rng.choice([10.0, 100.0])
    return x.to(dtype)


def _lowered_limits(monkeypatch, rng, width):
    """Half the draws lower the one-block and chunk limits (powers of two, at most 64 chunks a row) so that small
    widths take the multi-block paths."""
    if rng.random() < 0.5:
        return
    least = max(2, (max(1, width // 64) - 1).bit_length())

    def power():
        return 2 ** rng.randint(least, max(9, least))
    softmax_max = power()
    monkeypatch.setattr(softmax_module, "MAX_BLOCK", softmax_max)
    monkeypatch.setattr(softmax_module, "LONG_BLOCK", min(softmax_max, power()))
    norm_max = power()
    for name in ("MAX_BLOCK", "LONG_BLOCK", "BACKWARD_MAX_BLOCK", "MULTI_ROW_MAX_BLOCK"):
        monkeypatch.setattr(norm_module, name, norm_max if name == "MAX_BLOCK" else min(norm_max, power()))
    monkeypatch.setattr(norm_module, "INTERPRETER_PROGRAMS", rng.randint(1, 7))


def _laid_out_rows(rng, x):
    """x's values in a random layout: contiguous, transposed in memory, or every other element of a wider tensor."""
    how = rng.choice(["", "transposed", "strided"])
    if how == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.clone()


def _softmax_math(x, dim, scale, causal, log):
    """(log-)softmax of x * scale in x's dtype; causal: (Nq, Nk) last, j > i + Nk - Nq hidden, hidden rows zero."""
    z = x * scale
    if not causal:
        return torch.log_softmax(z, dim) if log else torch.softmax(z, dim)
    n_q, n_k = z.shape[-2:]
    hidden = torch.arange(n_k) > torch.arange(n_q)[:, None] + n_k - n_q
    return torch.softmax(z.masked_fill(hidden, -math.inf), -1).masked_fill(hidden.all(-1, keepdim=True), 0.0)


def _gradients(fn, leaves, upstream, dtype):
    """fn's outputs and the gradients of leaves (cast to ``dtype``, upstream too) in that dtype."""
    cast = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    outs = fn(*cast)
    return outs, torch.autograd.grad(outs, cast, [g.to(dtype) for g in upstream])


@pytest.mark.parametrize("seed", [1000, 1003, 1011, 1017, 1024, 1042, 1055])
def test_softmax_sample(device, monkeypatch, seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    dtype, width = rng.choice([FP16, BF16, FP32]), rng.choice(WIDTHS)
    causal = rng.random() < 0.25
    log = not causal and rng.random() < 0.4
    if causal:
        shape, dim = [rng.randint(1, 2), rng.randint(1, 6), width], -1
    else:
        shape = rng.choice([[width], [rng.randint(1, 4), width], [rng.randint(1, 3), width, rng.randint(1, 3)]])
        dim = shape.index(width) - rng.choice([0, len(shape)])
    x = _rows_tensor(rng, gen, shape, dtype, rng.choice([1.0, 10.0, 100.0]))
    if rng.random() < 0.3:  # -inf entries
        x = x.masked_fill(torch.rand(shape, generator=gen) < 0.3, -math.inf)
    scale = rng.choice([1.0, 0.125, -1.0, 0.0, 3.0])
    _lowered_limits(monkeypatch, rng, width)
    x = _laid_out_rows(rng, x)

    def math_of(t):
        return _softmax_math(t, dim, scale, causal, log)
    leaf = x.to(device).requires_grad_(True)
    y = kernels.log_softmax(leaf, dim, scale=scale) if log else kernels.softmax(leaf, dim, scale=scale, causal=causal)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    (dx,) = torch.autograd.grad(y, leaf, dy.to(device))
    (exact,), (exact_dx,) = _gradients(lambda t: (math_of(t),), [x], [dy], torch.float64)
    (low,), (low_dx,) = _gradients(lambda t: (math_of(t),), [x], [dy], dtype)
    if not torch.equal(low.isfinite(), exact.isfinite()):  # x * scale overflowed in fp16: torch in fp32, rounded
        (low,), (low_dx,) = _gradients(lambda t: (_rounded(math_of(t), dtype),), [x], [dy], FP32)
    assert y.dtype == dtype and y.is_contiguous()
    assert_close(y.cpu(), exact, low.to(dtype), FORWARD)
    assert_close(dx.cpu(), exact_dx, low_dx.to(dtype), BACKWARD, name="dx")


def _norm_math(h, weight, bias, shape, eps, rms, offset):
    """layer norm (biased variance) or RMS norm ((offset + weight) scaling) of h over its trailing ``shape``."""
    dims = tuple(range(-len(shape), 0))
    if rms:
        y = h * torch.rsqrt((h * h).mean(dims, keepdim=True) + eps)
        return y if weight is None else y * (offset + weight)
    centred = h - h.mean(dims, keepdim=True)
    y = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _rounded(t, dtype):
    """t rounded to dtype and back, with the identity gradient (a rounding the backward ignores)."""
    return t + (t.detach().to(dtype).to(t.dtype) - t.detach())


@pytest.mark.parametrize("seed", [2000, 2001, 2004, 2009, 2013, 2020, 2031, 2046])
def test_norm_sample(device, monkeypatch, seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    dtype, rms, width = rng.choice([FP16, BF16, FP32]), rng.random() < 0.5, rng.choice(WIDTHS)
    divisors = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
    split = rng.choice(divisors)
    shape = rng.choice([(width,), (split, width // split), (1, split, width // split)])
    x_shape = [rng.randint(1, 3) for _ in range(rng.randint(0, 2 if width <= 1000 else 1))] + list(shape)
    magnitude = rng.choice([1.0, 0.01, 30.0])
    x = _rows_tensor(rng, gen, x_shape, dtype, magnitude)
    residual = None
    if rng.random() < 0.4:
        residual = _rows_tensor(rng, gen, x_shape, rng.choice([dtype, dtype, FP32]), magnitude)
    param_dtype = rng.choice([dtype, dtype, FP16, BF16, FP32])
    weight = (1 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(param_dtype)
    weight = None if rng.random() < 0.2 else weight
    bias = None if rms or rng.random() < 0.3 else torch.randn(shape, generator=gen, dtype=torch.float64).to(param_dtype)
    eps = rng.choice([None, 1e-6, 0.5]) if rms else rng.choice([1e-5, 1e-2, 1.0])
    offset = rng.choice([0.0, 1.0, -0.5]) if rms else 0.0
    casting = rng.choice(["gemma", "llama", "none"]) if rms else "gemma"
    module = rng.random() < 0.3
    bias = None if module and weight is None else bias  # (a module has both affine parameters or neither)
    _lowered_limits(monkeypatch, rng, width)
    x = _laid_out_rows(rng, x)

    given = {name: t for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias))
             if t is not None}
    leaves = {name: t.to(device).requires_grad_(True) for name, t in given.items()}
    if module:
        cls = kernels.RMSNorm if rms else kernels.LayerNorm
        options = dict(offset=offset, casting_mode=casting) if rms else dict(bias=bias is not None)
        norm = cls(shape, eps=eps, elementwise_affine=weight is not None, dtype=param_dtype, device=device, **options)
        with torch.no_grad():
            for name, param in norm.named_parameters():
                param.copy_(leaves[name])
                leaves[name] = param
        result = norm(leaves["x"]) if residual is None else norm(leaves["x"], leaves["residual"])
    else:
        args = (shape, leaves.get("weight")) if rms else (shape, leaves.get("weight"), leaves.get("bias"))
        options = dict(offset=offset, casting_mode=casting) if rms else {}
        fn = {(False, False): kernels.layer_norm, (False, True): kernels.add_layer_norm,
              (True, False): kernels.rms_norm, (True, True): kernels.add_rms_norm}[rms, residual is not None]
        inputs = (leaves["x"],) if residual is None else (leaves["x"], leaves["residual"])
        result = fn(*inputs, *args, eps, **options)
    outs = (result,) if residual is None else result
    h_dtype = dtype if residual is None else torch.promote_types(dtype, residual.dtype)
    upstream = [torch.randn(x_shape, generator=gen, dtype=torch.float64).to(h_dtype) for _ in outs]
    grads = torch.autograd.grad(outs, list(leaves.values()), [g.to(device) for g in upstream])

    eps_value = torch.finfo(torch.promote_types(h_dtype, FP32)).eps if eps is None else eps

    def math_of(low):
        """The norm in float64 (low None) or as the casting mode rounds it (fp32 math, roundings to ``low``)."""
        def fn(x, *rest):
            named = dict(zip([n for n in leaves if n != "x"], rest))
            h = x if residual is None else _rounded(x + named["residual"], h_dtype)  # h in its dtype, as returned
            if low is not None and rms and casting != "gemma":
                y = _in_mode(h, named.get("weight"), shape, eps_value, offset, casting, low)
            else:
                y = _norm_math(h, named.get("weight"), named.get("bias"), shape, eps_value, rms, offset)
            return (y,) if residual is None else (y, h)
        return fn

    names = list(leaves)
    exact, exact_grads = _gradients(math_of(None), list(given.values()), upstream, torch.float64)
    low, low_grads = _gradients(math_of(h_dtype), list(given.values()), upstream, FP32)
    for name, got, want, noise in zip(["y", "h"], outs, exact, low):
        assert got.dtype == h_dtype and got.shape == tuple(x_shape)
        assert_close(got.cpu(), want, noise.to(h_dtype), FORWARD, name=name)
    for name, got, want, noise in zip(names, grads, exact_grads, low_grads):
        assert got.dtype == leaves[name].dtype
        assert_close(got.cpu(), want, noise.to(got.dtype), BACKWARD, name=f"d{name}")


def _in_mode(h, weight, shape, eps, offset, casting, low):
    """RMS norm as Liger-Kernel's "llama" (xhat rounded to ``low`` before the weight) or "none" (every step rounded
    to ``low``, sums in fp32) computes it: the same-precision yardstick of those modes."""
    dims = tuple(range(-len(shape), 0))
    if casting == "llama":
        y = _rounded(h * torch.rsqrt((h * h).mean(dims, keepdim=True) + eps), low)
        return y if weight is None else y * (offset + weight)
    rstd = _rounded(torch.rsqrt(_rounded(_rounded(_rounded(h * h, low).mean(dims, keepdim=True), low) + eps, low)),
                    low)
    y = _rounded(h * rstd, low)
    return y if weight is None else _rounded(y * _rounded(offset + _rounded(weight, low), low), low)


# ------------------------------------------------------------------------------- failures the fuzzing found, fixed

@pytest.mark.parametrize("online", [False, True])
def test_causal_softmax_masked_columns_of_a_nan_row_get_zero_gradient(device, monkeypatch, online):
    """A causal row made NaN by its input (-inf * scale 0) gave NaN, not 0, at its masked columns in the backward
    (0 * the row's NaN sum); torch's gradient through the mask, which the float64 path takes, is 0 there."""
    if online:
        monkeypatch.setattr(softmax_module, "MAX_BLOCK", 4)
        monkeypatch.setattr(softmax_module, "LONG_BLOCK", 4)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    x[0, 0, 1] = x[1, 2, 6] = -math.inf  # NaN rows: (0, 0), whose columns 5 and 6 are masked, and (1, 2)
    dy = torch.randn(2, 3, 7, dtype=torch.float64)

    def softmax_and_grad(x):
        x = x.requires_grad_(True)
        y = kernels.softmax(x, scale=0.0, causal=True)
        return y, torch.autograd.grad(y, x, dy.to(y))[0]
    y, dx = softmax_and_grad(x.float().to(device))
    monkeypatch.setattr(softmax_module, "_torch_ops", _TORCH_OPS)
    want_y, want_dx = softmax_and_grad(x.clone())  # float64: torch's ops
    torch.testing.assert_close(y.cpu(), want_y.float(), equal_nan=True)
    torch.testing.assert_close(dx.cpu(), want_dx.float(), equal_nan=True)
    assert torch.all(dx[0, 0, 5:] == 0) and dx[0, 0, :5].isnan().all()


def test_rms_norm_module_promote_output_adds_the_offset_in_the_promoted_dtype(device):
    """RMSNorm(promote_output=True) with a weight in another 16-bit dtype than x's (fp16 x, bf16 weight: fp32 out)
    added the offset to the weight in the weight's dtype, rounding offset + weight to bf16, where its docstring
    (and the fp32 weight case) multiply x_hat by offset + weight in the promoted dtype."""
    norm = kernels.RMSNorm(24, offset=0.3, promote_output=True, dtype=BF16, device=device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, dtype=torch.float64).to(BF16))
    x = torch.randn(3, 24, dtype=torch.float64).to(FP16).to(device)
    x_hat = kernels.rms_norm(x, 24)  # in x's dtype
    torch.testing.assert_close(norm(x), (0.3 + norm.weight.float()) * x_hat.float(), rtol=0, atol=0)
