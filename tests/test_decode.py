"""kernels.attention_with_kvcache (kernels/attention/decode.py) against float64 math on the gathered cache.

The reference appends the new keys/values to a copy of each row's logical cache, applies rotary embedding in torch,
and runs kernels.reference.attention with the row's visibility mask (or the same math written out, with softcap and
ALiBi); PyTorch doing the same in the inputs' dtype measures the rounding noise the kernel may double
(tests/tolerance.py). The kernels run on the ``device`` fixture's device; the reference runs on CPU copies.
"""
import math

import pytest
import torch

import kernels
from kernels import reference
from kernels.attention import decode
from tolerance import FORWARD, assert_close

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def _rotate(x, cos, sin, pos, interleaved):
    """x (S, heads, D) rotated at positions ``pos`` (S,) by cos/sin (S_ro, r / 2) on its first r dims."""
    half = cos.shape[1]
    c, s = cos[pos].to(x.dtype)[:, None, :], sin[pos].to(x.dtype)[:, None, :]
    if interleaved:
        x1, x2 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        rotated = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = x[..., :half], x[..., half:2 * half]
        rotated = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([rotated, x[..., 2 * half:]], -1)


def _logical(cache, b, batch_idx, block_table):
    """Batch row b's logical cache (capacity, Hkv, D): its cache row, or its pages in block-table order."""
    if block_table is not None:
        return cache[block_table[b].long()].flatten(0, 1)
    return cache[b if batch_idx is None else int(batch_idx[b])]


def _expected(dtype, q, k_cache, v_cache, k=None, v=None, cos=None, sin=None, interleaved=True, seqlens=None,
              batch_idx=None, leftpad=None, block_table=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None):
    """(out (B, Sq, H, D), lse (B, H, Sq), [each row's logical K and V after the append]) computed by torch in
    ``dtype`` from the same (CPU) inputs."""
    batch, n_q, heads, d = q.shape
    n_new = 0 if k is None else k.shape[1]
    outs, lses, caches = [], [], []
    for b in range(batch):
        keys = _logical(k_cache, b, batch_idx, block_table).to(dtype).clone()
        values = _logical(v_cache, b, batch_idx, block_table).to(dtype).clone()
        start = keys.shape[0] if seqlens is None else int(seqlens[b])
        qb = q[b].to(dtype)
        if k is not None:
            new_pos = torch.arange(start, start + n_new)
            kb = k[b].to(dtype) if cos is None else _rotate(k[b].to(dtype), cos, sin, new_pos, interleaved)
            keys[start:start + n_new], values[start:start + n_new] = kb, v[b].to(dtype)
        if cos is not None:
            same = not causal and window_size == (-1, -1)
            qb = _rotate(qb, cos, sin, torch.full((n_q,), start) if same else torch.arange(start, start + n_q),
                         interleaved)
        caches.append((keys, values))
        end = start + n_new
        lo = 0 if leftpad is None else int(leftpad[b])
        pos = torch.arange(keys.shape[0])[None, :]
        diag = torch.arange(n_q)[:, None] + end - n_q
        visible = (pos >= lo) & (pos < end)
        right = 0 if causal else window_size[1]
        if window_size[0] >= 0:
            visible = visible & (pos >= diag - window_size[0])
        if right >= 0:
            visible = visible & (pos <= diag + right)
        qh, kh, vh = qb.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
        if softcap or alibi_slopes is not None:
            group = heads // kh.shape[1]
            scores = qh @ kh.repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(d)
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            if alibi_slopes is not None:  # flash-attn's |i + seqlen_k - seqlen_q - j| with the row's own seqlen_k
                slopes = (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]).to(dtype)
                scores = scores - slopes[:, None, None] * (diag - pos).abs().to(dtype)
            scores = scores.masked_fill(~visible, float("-inf"))
            lse = torch.logsumexp(scores, -1)
            probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
            out = probs @ vh.repeat_interleave(group, 1)
        else:
            out, lse = reference.attention(qh, kh, vh, mask=visible, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses), caches


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _check(dtype, q, k_cache, v_cache, k=None, v=None, **kw):
    """Run the kernel on copies of the caches (on the inputs' device) and check out, lse and the appended cache
    against float64 on CPU; returns the kernel's (out, lse) moved to CPU."""
    k_run, v_run = k_cache.clone(), v_cache.clone()
    out, lse = kernels.attention_with_kvcache(q, k_run, v_run, k, v, return_lse=True, **kw)
    q, k_cache, v_cache, k, v, k_run, v_run, out, lse = map(_cpu, (q, k_cache, v_cache, k, v, k_run, v_run, out, lse))
    args = {name: _cpu(value) for name, value in kw.items()}
    args["cos"], args["sin"] = args.pop("rotary_cos", None), args.pop("rotary_sin", None)
    args["interleaved"] = args.pop("rotary_interleaved", True)
    args["seqlens"], args["batch_idx"] = args.pop("cache_seqlens", None), args.pop("cache_batch_idx", None)
    args["leftpad"] = args.pop("cache_leftpad", None)
    if isinstance(args["seqlens"], int):
        args["seqlens"] = torch.full((q.shape[0],), args["seqlens"])
    args.pop("num_splits", None)
    exact_out, exact_lse, exact_cache = _expected(torch.float64, q, k_cache, v_cache, k, v, **args)
    low_out, low_lse, low_cache = _expected(dtype, q, k_cache, v_cache, k, v, **args)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == FP32
    assert_close(out, exact_out, low_out, FORWARD)
    empty = torch.isneginf(exact_lse)
    assert torch.equal(torch.isneginf(lse), empty) and torch.all(out[empty.transpose(1, 2)] == 0)
    assert_close(lse[~empty], exact_lse[~empty], low_lse.float()[~empty], FORWARD, name="lse")
    batch_idx, table, seqlens = args["batch_idx"], args.get("block_table"), args["seqlens"]
    for b, ((keys, values), (low_keys, _)) in enumerate(zip(exact_cache, low_cache)):
        got_k, got_v = _logical(k_run, b, batch_idx, table), _logical(v_run, b, batch_idx, table)
        assert torch.equal(got_v, values.to(dtype)), "v_cache: the appended values are copied exactly, the rest kept"
        assert_close(got_k, keys, low_keys, FORWARD, name="k_cache")
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool)  # cache slots no batch row may write
    n_new = 0 if k is None else k.shape[1]
    for b in range(q.shape[0]):
        start = 0 if seqlens is None else int(seqlens[b])
        for p in range(start, start + n_new):
            if table is not None:
                untouched[int(table[b, p // k_cache.shape[1]]), p % k_cache.shape[1]] = False
            else:
                untouched[b if batch_idx is None else int(batch_idx[b]), p] = False
    assert torch.equal(k_run[untouched], k_cache[untouched]) and torch.equal(v_run[untouched], v_cache[untouched])
    return out, lse


def _inputs(dtype, device, b, n_q, h, h_kv, d, b_cache, capacity, n_new):
    q = torch.randn(b, n_q, h, d, dtype=dtype, device=device)
    k_cache, v_cache = (torch.randn(b_cache, capacity, h_kv, d, dtype=dtype, device=device) for _ in range(2))
    k, v = (torch.randn(b, n_new, h_kv, d, dtype=dtype, device=device) if n_new else None for _ in range(2))
    return q, k_cache, v_cache, k, v


def _rotary(dtype, device, rows, rotary_dim):
    angle = torch.rand(rows, rotary_dim // 2, dtype=torch.float64, device=device) * 2 * math.pi
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _paged(cache, page_size, generator_seed=1):
    """A paged copy of a contiguous cache (B, capacity, Hkv, D): (pages (B * max_blocks + 1, page_size, Hkv, D) in
    shuffled order with one spare page, block_table (B, max_blocks) int32)."""
    batch, capacity = cache.shape[:2]
    blocks = capacity // page_size
    order = torch.randperm(batch * blocks + 1, generator=torch.Generator().manual_seed(generator_seed))
    table = order[:batch * blocks].view(batch, blocks).to(device=cache.device, dtype=torch.int32)
    pages = torch.randn(batch * blocks + 1, page_size, *cache.shape[2:], device=cache.device).to(cache.dtype)
    pages[table.flatten().long()] = cache.reshape(batch * blocks, page_size, *cache.shape[2:])
    return pages, table


CASES = [  # (dtype, B, Sq, H, Hkv, D, capacity, Sk_new, causal, num_splits): GQA, MQA, MHA; Sq 1, 2, 7
    (FP16, 3, 1, 8, 2, 64, 96, 1, True, 0),
    (BF16, 2, 7, 3, 1, 80, 64, 7, True, 3),
    (FP32, 2, 2, 4, 4, 64, 40, 2, False, 1),
    (FP16, 2, 2, 6, 2, 80, 64, 0, False, 0),
]


@pytest.mark.parametrize("dtype,b,n_q,h,h_kv,d,capacity,n_new,causal,splits", CASES)
def test_matches_float64_with_append(device, dtype, b, n_q, h, h_kv, d, capacity, n_new, causal, splits):
    """Rows of different lengths, including an empty cache and a cache the append fills to its last slot."""
    q, k_cache, v_cache, k, v = _inputs(dtype, device, b, n_q, h, h_kv, d, b, capacity, n_new)
    seqlens = _int32([0, capacity - n_new, 13][:b], device)
    _check(dtype, q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal, num_splits=splits)


def test_paged_cache_equals_contiguous(device):
    """Shuffled pages (page size 16, not a multiple of the key block) give bit-identical outputs and caches."""
    q, k_cache, v_cache, k, v = _inputs(FP16, device, 2, 2, 4, 2, 64, 2, 64, 2)
    cos, sin = _rotary(FP16, device, 64, 32)
    kw = dict(cache_seqlens=_int32([5, 41], device), causal=True, rotary_cos=cos, rotary_sin=sin,
              return_lse=True)
    k_pages, table = _paged(k_cache, 16)
    v_pages, _ = _paged(v_cache, 16)
    out, lse = kernels.attention_with_kvcache(q, k_cache, v_cache, k, v, **kw)
    paged_out, paged_lse = kernels.attention_with_kvcache(q, k_pages, v_pages, k, v, block_table=table, **kw)
    assert torch.equal(out, paged_out) and torch.equal(lse, paged_lse)
    assert torch.equal(k_pages[table.long()].flatten(1, 2), k_cache)
    assert torch.equal(v_pages[table.long()].flatten(1, 2), v_cache)
    kw.pop("return_lse")
    _check(FP16, q, k_pages, v_pages, k, v, block_table=table, **kw)


@pytest.mark.parametrize("interleaved,causal,window", [(True, True, (-1, -1)), (False, False, (-1, -1)),
                                                       (False, False, (9, 2))])
def test_rotary_matches_torch(device, interleaved, causal, window):
    """q and the new keys rotated at cache_seqlens + i (q all at cache_seqlens when neither causal nor windowed),
    a rotary dim smaller than the head dim (80), both pair layouts."""
    q, k_cache, v_cache, k, v = _inputs(BF16, device, 2, 3, 4, 2, 80, 2, 48, 3)
    cos, sin = _rotary(BF16, device, 50, 48)
    _check(BF16, q, k_cache, v_cache, k, v, cache_seqlens=_int32([20, 44], device),
           rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, causal=causal, window_size=window)


def test_split_kv_matches_unsplit(device):
    """The heuristic splits this decode shape on 132 SMs; 1, chosen and 5 splits all meet the rule."""
    q, k_cache, v_cache, k, v = _inputs(FP16, device, 1, 1, 8, 2, 64, 1, 200, 1)
    _, gpu_block_n = decode.tile(FP16, 64, 4, decode.ASSUMED_FAMILY)
    assert decode.choose_splits(2, 4, 200, 64, 2, gpu_block_n, decode.ASSUMED_SMS) > 1
    for splits in (1, 0, 5):
        _check(FP16, q, k_cache, v_cache, k, v, cache_seqlens=150, num_splits=splits)


def test_several_row_blocks_per_kv_head(device):
    """Forced 16-row tiles: 3 query heads x 7 tokens of one kv head span two row blocks (causal bounds per block)."""
    from kernels.registry import use_config

    q, k_cache, v_cache, k, v = _inputs(FP16, device, 1, 7, 6, 2, 64, 1, 40, 7)
    with use_config("attention_decode", BLOCK_M=16, BLOCK_N=16):
        _check(FP16, q, k_cache, v_cache, k, v, cache_seqlens=20, causal=True, window_size=(11, -1), num_splits=2)


def test_leftpad_batch_idx_window_softcap(device):
    """cache_leftpad hides each row's first keys, cache_batch_idx picks (permuted) cache rows, and a sliding
    window with a softcap bounds and caps the scores; Sq = 3 new tokens against 1 key leaves rows with no key."""
    q, k_cache, v_cache, k, v = _inputs(FP32, device, 3, 3, 2, 1, 64, 4, 40, 3)
    idx, seqlens, leftpad = _int32([3, 0, 2], device), _int32([30, 0, 17], device), _int32([7, 0, 16], device)
    _check(FP32, q, k_cache, v_cache, k, v, cache_seqlens=seqlens, cache_batch_idx=idx, cache_leftpad=leftpad,
           causal=True, window_size=(5, -1), softcap=2.5, num_splits=2)
    _, lse = _check(FP32, q, k_cache, v_cache, k[:, :1], v[:, :1], cache_seqlens=_int32([0, 0, 0], device),
                    causal=True)
    assert torch.isneginf(lse[:, :, :2]).all() and not lse[:, :, 2].isinf().any()


ALIBI_CASES = [  # (Sq, Sk_new, slopes per batch row, num_splits, page size or 0, other variants)
    (1, 1, False, 1, 0, {}),
    (1, 1, True, 0, 16, {}),
    (3, 3, True, 3, 0, dict(window_size=(9, -1), softcap=3.0)),
    (3, 0, False, 2, 16, dict(causal=False, window_size=(20, 1))),
    (3, 3, False, 2, 0, dict(cache_leftpad=[0, 40, 30])),  # row 1: every cached key padding, the new ones seen
]


@pytest.mark.parametrize("n_q,n_new,per_batch,splits,page_size,variants", ALIBI_CASES)
def test_alibi_matches_float64(device, n_q, n_new, per_batch, splits, page_size, variants):
    """ALiBi slopes (H,) or (B, H) under GQA (3 query heads per kv head), split or not, paged or not, with rows of
    cached length 0 (no key at all without an append), short and full; each row's distance is to its own
    diagonal i + seqlen_k - Sq."""
    q, k_cache, v_cache, k, v = _inputs(FP16, device, 3, n_q, 6, 2, 64, 3, 64, n_new)
    slopes = torch.rand((3, 6) if per_batch else (6,), device=device) * 0.3
    kw = dict(cache_seqlens=_int32([0, 40, 64 - n_new], device), causal=True, alibi_slopes=slopes, num_splits=splits)
    kw.update(variants)
    if "cache_leftpad" in kw:
        kw["cache_leftpad"] = _int32(kw["cache_leftpad"], device)
    if page_size:
        (k_cache, kw["block_table"]), (v_cache, _) = _paged(k_cache, page_size), _paged(v_cache, page_size)
    _check(FP16, q, k_cache, v_cache, k, v, **kw)


def test_choose_splits():
    """Deterministic: no split once the programs fill the SMs; at B=1, Hkv=8, a 4k fp16 cache gets >= 2 waves on
    an H100's 132 SMs; the partials stay under 1/12 of the cache bytes."""
    assert decode.choose_splits(132, 4, 4096, 128, 2, 64, 132) == 1
    splits = decode.choose_splits(8, 4, 4096, 128, 2, 64, 132)
    assert 8 * splits >= 2 * 132
    assert splits * 2 * 4 * 129 * 4 * decode.PARTIAL_TRAFFIC <= 2 * 4096 * 128 * 2
    assert decode.choose_splits(8, 4, 64, 128, 2, 64, 132) == 1


@pytest.mark.parametrize("capacity, splits", [(64, 1), (200, 4)])
def test_interpreted_calls_split_as_a_gpu_would(capacity, splits):
    """The heuristic counts in the GPU's key block (64 at fp16 d64), not the interpreter's smaller one: a 64-key
    cache is one block on a GPU, so no interpreted call splits it (nor pays the combine launch a GPU would not)."""
    plan = decode._attend_plan((2, 1, 2, 64), FP16, torch.device("cpu"), 2, capacity, 0, 2, 0, (-1, -1), 0.0,
                               0.125, 0, False, None)
    assert plan.splits == splits == decode.choose_splits(2 * 2, 1, capacity, 64, 2, 64, decode.ASSUMED_SMS)


def _bad_calls():
    q, k_cache, v_cache, k, v = _inputs(FP16, "cpu", 2, 1, 4, 2, 64, 2, 32, 1)
    seq = _int32([3, 4], "cpu")
    cos, sin = _rotary(FP16, "cpu", 32, 16)
    return [
        (dict(q=q.float()), TypeError, "dtype"),
        (dict(k_cache=k_cache[:, :, :1].expand(2, 32, 3, 64), v_cache=v_cache[:, :, :1].expand(2, 32, 3, 64)),
         ValueError, "kv heads"),
        (dict(v_cache=v_cache[:, :16]), ValueError, "same shape"),
        (dict(k=k), ValueError, "k and v"),
        (dict(k=k, v=v, cache_seqlens=None), ValueError, "cache_seqlens is required"),
        (dict(k=k, v=v, cache_seqlens=32), ValueError, "exceeds"),
        (dict(cache_seqlens=seq.long()), TypeError, "cache_seqlens"),
        (dict(cache_seqlens=seq[:1]), ValueError, r"cache_seqlens must have shape \(2,\)"),
        (dict(cache_leftpad=seq.float()), TypeError, "cache_leftpad"),
        (dict(block_table=torch.zeros(2, 2, dtype=torch.int32), cache_batch_idx=seq), ValueError, "cache_batch_idx"),
        (dict(block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "block_table"),
        (dict(k_cache=k_cache[:, :0], v_cache=v_cache[:, :0], block_table=torch.zeros(2, 2, dtype=torch.int32)),
         ValueError, "page_size >= 1"),
        (dict(k_cache=k_cache[:0], v_cache=v_cache[:0], cache_batch_idx=seq), ValueError, "no cache rows"),
        (dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=seq), ValueError, "need the new k"),
        (dict(k=k, v=v, cache_seqlens=seq, rotary_cos=cos[:8], rotary_sin=sin[:8]), ValueError, "S_ro"),
        (dict(k=k, v=v, cache_seqlens=seq, rotary_cos=cos), ValueError, "together"),
        (dict(window_size=(-2, 0)), ValueError, "window_size"),
        (dict(window_size=3), TypeError, "window_size"),
        (dict(softcap=-1.0), ValueError, "softcap must be in"),
        (dict(alibi_slopes=torch.ones(4, dtype=FP16)), TypeError, "alibi_slopes"),
        (dict(alibi_slopes=torch.ones(2, 2)), ValueError, r"alibi_slopes must have shape \(H,\) = \(4,\)"),
        (dict(alibi_slopes=torch.ones(4, device="meta")), ValueError, "alibi_slopes"),
        (dict(num_splits=129), ValueError, "num_splits"),
        (dict(num_splits=1.5), TypeError, "num_splits"),
        (dict(scale=float("nan")), TypeError, "scale"),
        (dict(q=q.clone().requires_grad_()), NotImplementedError, "forward only"),
    ], dict(q=q, k_cache=k_cache, v_cache=v_cache)


def test_bad_inputs_raise_before_launch(monkeypatch):
    monkeypatch.setattr(decode, "_attend", lambda *a, **k: pytest.fail("launched"))
    monkeypatch.setattr(decode, "_append", lambda *a, **k: pytest.fail("launched"))
    calls, base = _bad_calls()
    for change, error, match in calls:
        with pytest.raises(error, match=match):
            kernels.attention_with_kvcache(**{**base, **change})



def _index_calls():
    """(base call: B = 2 rows appending 2 keys at cache_seqlens (3, 20) to a (3, 32, 2, 64) cache or 5 pages of 16,
    [(changes, message) of index values that would take the append or the attention outside the cache]) on CPU."""
    q, k_cache, v_cache, k, v = _inputs(FP16, "cpu", 2, 1, 4, 2, 64, 3, 32, 2)
    pages = dict(k_cache=torch.randn(5, 16, 2, 64, dtype=FP16), v_cache=torch.randn(5, 16, 2, 64, dtype=FP16))
    seq = _int32([3, 20], "cpu")
    cos, sin = _rotary(FP16, "cpu", 32, 16)
    base = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=seq)
    return base, [
        (dict(cache_seqlens=_int32([-1, 20], "cpu")), "cache_seqlens must be >= 0"),
        (dict(cache_seqlens=_int32([3, 31], "cpu")), "cache_seqlens .* 32 positions"),  # 31 + 2 new keys > 32
        (dict(k=None, v=None, cache_seqlens=_int32([3, 33], "cpu")), "cache_seqlens .* 32 positions"),
        (dict(cache_leftpad=_int32([-1, 0], "cpu")), "cache_leftpad"),
        (dict(cache_leftpad=_int32([4, 0], "cpu")), "cache_leftpad must be >= 0 and <= cache_seqlens"),
        (dict(k=None, v=None, cache_seqlens=None, cache_leftpad=_int32([0, 33], "cpu")), "cache_leftpad"),
        (dict(cache_batch_idx=_int32([-1, 0], "cpu")), "cache_batch_idx must index"),
        (dict(cache_batch_idx=_int32([0, 3], "cpu")), "cache_batch_idx must index"),
        (dict(cache_batch_idx=_int32([2, 2], "cpu")), "cache_batch_idx must not repeat"),
        (dict(pages, block_table=_int32([[0, 1], [2, -1]], "cpu")), "block_table's pages"),  # row 1 reads page 1
        (dict(pages, block_table=_int32([[0, 1], [2, 5]], "cpu")), "block_table's pages"),
        (dict(pages, block_table=_int32([[0], [2]], "cpu")), "cache_seqlens .* 16 positions"),  # too few pages
        (dict(pages, block_table=_int32([[0, 1], [2, 0]], "cpu"), cache_seqlens=_int32([3, 19], "cpu")),
         "block_table maps the new keys of two batch rows to the same cache slot"),  # both write page 0, slots 3, 4
        (dict(q=torch.randn(2, 3, 4, 64, dtype=FP16), cache_seqlens=_int32([3, 30], "cpu"), rotary_cos=cos,
              rotary_sin=sin, causal=True), "rotary_cos/rotary_sin need a row"),  # causal q rows at 30, 31, 32
    ]


def test_bad_index_values_raise_before_the_cache_is_written():
    """Index values that would send a kernel outside the cache raise ValueError naming the argument (checked on
    the device, read at once on CPU) before the append: the cache is unchanged. flash_attn_with_kvcache too."""
    from kernels.flash_attn import flash_attn_with_kvcache

    base, calls = _index_calls()
    for change, match in calls:
        call = {**base, **change}
        caches = call["k_cache"].clone(), call["v_cache"].clone()
        for function in (kernels.attention_with_kvcache, flash_attn_with_kvcache):
            with pytest.raises(ValueError, match=match):
                function(**call)
            assert torch.equal(call["k_cache"], caches[0]) and torch.equal(call["v_cache"], caches[1])


def test_index_values_that_stay_inside_the_cache_run(device):
    """Not errors: block_table entries past a row's last page (never read) may be anything, a row's left padding
    may cover its whole cache, cache rows may repeat when nothing is appended, causal queries may sit past the cache
    where rotary_cos has rows for them; a column-major block_table reads the same pages as a contiguous one."""
    q, k_cache, v_cache, k, v = _inputs(FP16, device, 2, 1, 4, 2, 64, 3, 32, 2)
    _check(FP16, q, k_cache, v_cache, cache_seqlens=_int32([5, 9], device), cache_batch_idx=_int32([1, 1], device),
           cache_leftpad=_int32([5, 0], device))
    pages, table = _paged(k_cache[:2], 16)
    v_pages, _ = _paged(v_cache[:2], 16)
    table[0, 1] = -1  # row 0's keys end at 3 + 2 < 16: page 1 is not read (the reference indexes -1 too)
    column_major = table.t().contiguous().t()
    _check(FP16, q, pages, v_pages, k, v, cache_seqlens=_int32([3, 20], device), block_table=column_major)
    cos, sin = _rotary(FP16, device, 40, 32)  # the 3 queries of row 0 at positions 30, 31, 32 >= capacity 32
    _check(FP16, torch.randn(2, 3, 4, 64, dtype=FP16, device=device), k_cache, v_cache, k, v, rotary_cos=cos,
           rotary_sin=sin, cache_seqlens=_int32([30, 4], device), causal=True)


def _guarded(shape, device):
    """(buffer (rows + 2, ...) whose first and last rows are NaN guards, the random view of its other rows)."""
    buffer = torch.full((shape[0] + 2, *shape[1:]), float("nan"), dtype=FP16, device=device)
    buffer[1:-1] = torch.randn(shape, device=device).to(FP16)
    return buffer, buffer[1:-1]


@pytest.mark.parametrize("paged", [False, True])
def test_kernels_stay_inside_the_cache_without_the_checks(device, monkeypatch, paged):
    """With the value checks off (as if device asserts were disabled), out-of-range batch rows, pages, positions
    and left padding are clamped or masked in the kernels: the NaN guard rows around the cache are neither read
    (the output stays finite) nor written."""
    monkeypatch.setattr(decode, "_check_index_values", lambda *args: None)
    q, _, _, k, v = _inputs(FP16, device, 3, 2, 4, 2, 64, 1, 32, 2)
    rows = 4 if paged else 2
    (k_buffer, k_cache), (v_buffer, v_cache) = (_guarded((rows, 16 if paged else 32, 2, 64), device) for _ in "kv")
    # Each bad index lands in a guard row (not past the buffer, so that a kernel without the clamps fails the
    # asserts rather than crashing): row -1 or page -1, the row or page just past the cache, positions below 0 of
    # its first row or page, a new key at position 31 + 1 past the capacity 32.
    kw = dict(cache_seqlens=_int32([3, 31, -5], device), cache_leftpad=_int32([0, 40, -9], device))
    if paged:
        kw["block_table"] = _int32([[-1, 4], [2, 4], [0, 1]], device)
    else:
        kw["cache_batch_idx"] = _int32([-1, 2, 0], device)
    for splits in (1, 3):
        out = kernels.attention_with_kvcache(q, k_cache, v_cache, k, v, causal=True, num_splits=splits, **kw)
        assert out.isfinite().all(), "a kernel read a guard row outside the cache"
    assert k_buffer[[0, -1]].isnan().all() and v_buffer[[0, -1]].isnan().all(), "a kernel wrote outside the cache"

def test_flash_attn_with_kvcache_signature_and_conventions(device):
    """flash-attn 2.x's parameter names, order and defaults; its outputs are attention_with_kvcache's, with +inf
    (flash-attn's convention) where a row sees no key, and out alone without return_softmax_lse."""
    import inspect

    from kernels.flash_attn import flash_attn_with_kvcache

    expected = dict(q=None, k_cache=None, v_cache=None, k=None, v=None, rotary_cos=None, rotary_sin=None,
                    cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                    alibi_slopes=None, num_splits=0, return_softmax_lse=False)
    params = inspect.signature(flash_attn_with_kvcache).parameters
    assert list(params) == list(expected)
    assert {n: p.default for n, p in params.items() if p.default is not p.empty} == \
        {n: d for n, d in expected.items() if n not in ("q", "k_cache", "v_cache")}
    q, k_cache, v_cache, k, v = _inputs(FP16, device, 2, 2, 4, 2, 64, 2, 32, 1)
    seqlens = _int32([0, 9], device)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(3)]
    out, lse = flash_attn_with_kvcache(q, *caches[0], k, v, cache_seqlens=seqlens, causal=True, softmax_scale=0.3,
                                       return_softmax_lse=True)
    ref_out, ref_lse = kernels.attention_with_kvcache(q, *caches[1], k, v, cache_seqlens=seqlens, causal=True,
                                                      scale=0.3, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(caches[0][0], caches[1][0])
    assert torch.isposinf(lse[0, :, 0]).all() and torch.isneginf(ref_lse[0, :, 0]).all()
    assert torch.equal(lse[ref_lse.isfinite()], ref_lse[ref_lse.isfinite()])
    assert torch.equal(flash_attn_with_kvcache(q, *caches[2], k, v, cache_seqlens=seqlens, causal=True,
                                               softmax_scale=0.3), out)


# --------------------------------------------------------------------------------------------- torch.compile


def test_custom_op_passes_opcheck():
    """The op torch.compile traces declares its in-place append (mutates_args k_cache, v_cache) and has a fake:
    opcheck's schema, fake-tensor and AOT-dispatch tests pass, appending with rotary and attending without."""
    q, k_cache, v_cache, k, v = _inputs(FP32, "cpu", 2, 2, 4, 2, 16, 2, 40, 2)
    cos, sin = _rotary(FP32, "cpu", 40, 8)
    seqlens, leftpad = _int32([5, 17], "cpu"), _int32([1, 2], "cpu")
    for args in [(q, k_cache, v_cache, k, v, cos, sin, seqlens, None, None, None, None, True, False, -1, 0, 0.0,
                  0.25, 0),
                 (q, k_cache, v_cache, None, None, None, None, seqlens, leftpad, None, None, None, True, True, 3, -1,
                  2.0, 0.25, 2)]:
        torch.library.opcheck(decode._launch_op, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_in_one_graph_with_the_lengths_on_the_device(device, backend):
    """torch.compile(fullgraph=True) of a decoding step (a contiguous cache with rotary and left padding, then a
    paged one windowed with ALiBi and splits): one graph for every cache_seqlens value (no recompilation, no host
    read), bit-identical outputs and caches to eager's (the same launches), and a bad value still raises eager's
    ValueError naming cache_seqlens and its values (the checks run inside the op, before its append)."""
    q, k_cache, v_cache, k, v = _inputs(FP16, device, 2, 1, 4, 2, 64, 2, 32, 1)
    cos, sin = _rotary(FP16, device, 32, 32)
    k_pages, table = _paged(k_cache, 16)
    v_pages, _ = _paged(v_cache, 16)
    slopes = torch.rand(4, device=device)

    def step(caches, seqlens, leftpad):
        contiguous = kernels.attention_with_kvcache(q, caches[0], caches[1], k, v, rotary_cos=cos, rotary_sin=sin,
                                                    cache_seqlens=seqlens, cache_leftpad=leftpad, causal=True)
        paged = kernels.attention_with_kvcache(q, caches[2], caches[3], k, v, cache_seqlens=seqlens,
                                               block_table=table, window_size=(9, 0), alibi_slopes=slopes,
                                               num_splits=2, return_lse=True)
        return contiguous, *paged

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for lengths, pads in [([5, 20], [1, 0]), ([0, 31], [0, 30])]:
        seqlens, leftpad = _int32(lengths, device), _int32(pads, device)
        caches = [[t.clone() for t in (k_cache, v_cache, k_pages, v_pages)] for _ in range(2)]
        got, want = compiled(caches[0], seqlens, leftpad), step(caches[1], seqlens, leftpad)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert all(torch.equal(a, b) for a, b in zip(*caches))
    assert counter.frame_count == 1
    if device.type == "cpu":  # on a GPU a device assert, which would end the process's CUDA context
        with pytest.raises(ValueError, match=r"cache_seqlens must be >= 0.*; got cache_seqlens = \[5, 32\]"):
            compiled(caches[0], _int32([5, 32], device), leftpad)
        assert counter.frame_count == 1
