"""attention_varlen's in-kernel packed sequences: one launch per kernel, against float64 per sequence.

Each sequence of a packed batch must equal dense attention on that sequence alone (bottom-right causal/window per
sequence), outputs and gradients within the tolerance rule (tests/tolerance.py); the work must follow the
sequences' own lengths (sum of L_i^2 / 2 causal), not the longest one's.
"""
import pytest
import torch

import kernels
from benchmarks.counting import counting
from kernels import reference
from kernels.attention.varlen import attention_varlen, gather_pages
from kernels.registry import use_config
from tolerance import BACKWARD, FORWARD, assert_close

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
_REFERENCE = reference.attention  # captured at import: attention_kernel_only replaces reference.attention


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _per_sequence(q, k, v, lens_q, lens_k, alibi_slopes=None, sinks=None, dropout_mask=None, **variants):
    """(out (total_q, H, D), lse (H, total_q)) of the reference on each sequence alone, in q's dtype. A sequence
    with no key gives zeros and lse -inf, or the sink (the reference cannot reduce over no key)."""
    outs, lses, start_q, start_k = [], [], 0, 0
    for b, (len_q, len_k) in enumerate(zip(lens_q, lens_k)):
        qs, ks, vs = (t[s:s + n].transpose(0, 1)[None] for t, s, n in
                      ((q, start_q, len_q), (k, start_k, len_k), (v, start_k, len_k)))
        start_q, start_k = start_q + len_q, start_k + len_k
        if len_k == 0:
            outs.append(qs[0].transpose(0, 1) * 0)
            empty = torch.full((q.shape[1], len_q), float("-inf"), dtype=q.dtype)
            lses.append(empty if sinks is None else sinks.to(q.dtype)[:, None] + empty.nan_to_num(0, 0, 0))
            continue
        seq = dict(variants, alibi_slopes=None if alibi_slopes is None else alibi_slopes[b], sinks=sinks,
                   dropout_mask=None if dropout_mask is None else dropout_mask[b:b + 1, :, :len_q, :len_k])
        out, lse = _REFERENCE(qs, ks, vs, return_lse=True, **seq)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


def paged_cache(packed, lengths, page_size: int, num_blocks: int):
    """(*pages, block_table): each packed (total_k, Hkv, D) tensor's sequences in the same shuffled pages of a
    (num_blocks, page_size, Hkv, D) pool of random values, block_table int32 (batch, most pages); table entries
    past a sequence's pages are ids outside the pool (never read)."""
    page_counts = [-(-n // page_size) for n in lengths]
    table = torch.full((len(lengths), max(page_counts)), num_blocks + 7, dtype=torch.int32)
    ids = iter(torch.randperm(num_blocks).tolist())
    pools = [torch.randn((num_blocks, page_size) + t.shape[1:], dtype=t.dtype) for t in packed]
    for b, (start, count) in enumerate(zip(_cu(lengths, "cpu").tolist(), page_counts)):
        table[b, :count] = torch.tensor([next(ids) for _ in range(count)], dtype=torch.int32)
        for j in range(lengths[b]):
            for pool, t in zip(pools, packed):
                pool[table[b, j // page_size], j % page_size] = t[start + j]
    return (*pools, table)


CASES = [  # (dtype, q lengths, k lengths, H, Hkv, D, variants): lengths 0 and 1, Lq != Lk, GQA, several blocks
    (FP16, [1, 0, 37, 5], [1, 0, 37, 9], 4, 2, 32, dict(causal=True)),
    (BF16, [3, 40, 1, 0], [7, 33, 0, 2], 2, 1, 16, dict(causal=True, window_size=(6, 0))),
    (FP32, [0, 21, 1, 34], [2, 30, 1, 34], 3, 1, 24, dict(window_size=(4, 2), softcap=2.0)),
    (FP32, [9, 1, 26], [9, 3, 40], 2, 2, 8, dict(causal=True, alibi=True, sinks=torch.tensor([0.5, -1.0]))),
]


@pytest.mark.parametrize("dtype,lens_q,lens_k,h,h_kv,d,variants", CASES)
def test_varlen_matches_float64_per_sequence_with_gradients(attention_kernel_only, device, dtype, lens_q, lens_k, h, h_kv, d,
                                                             variants):
    variants = dict(variants)
    alibi = torch.rand(len(lens_q), h) if variants.pop("alibi", False) else None
    q = torch.randn(sum(lens_q), h, d, dtype=dtype)
    k, v = torch.randn(2, sum(lens_k), h_kv, d, dtype=dtype)
    grad_out = torch.randn(q.shape, dtype=dtype)
    grad_lse = torch.randn(h, sum(lens_q))
    sinks = variants.pop("sinks", None)
    results = []
    for precision in (dtype, torch.float64):
        leaves = [t.to(precision).requires_grad_() for t in (q, k, v)]
        out, lse = _per_sequence(*leaves, lens_q, lens_k, alibi_slopes=alibi, sinks=sinks, **variants)
        loss = (out * grad_out.to(precision)).sum() + (lse.nan_to_num(0, 0, 0) * grad_lse.to(precision)).sum()
        results.append((out, lse, *torch.autograd.grad(loss, leaves)))
    (low, lse_low, *grads_low), (exact, lse_exact, *grads_exact) = results

    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    with use_config("attention_fwd", BLOCK_M=16, BLOCK_N=16), use_config("attention_dkdv", BLOCK_M=16, BLOCK_N=16), \
            use_config("attention_dq", BLOCK_M=16, BLOCK_N=16):  # several blocks per sequence, partial last ones
        out, lse = attention_varlen(*leaves, _cu(lens_q, device), _cu(lens_k, device), max(lens_q), max(lens_k),
                                    return_lse=True, sinks=None if sinks is None else sinks.to(device),
                                    alibi_slopes=None if alibi is None else alibi.to(device), **variants)
        loss = (out * grad_out.to(device)).sum() + (lse.nan_to_num(0, 0, 0) * grad_lse.to(device)).sum()
        grads = torch.autograd.grad(loss, leaves)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (h, sum(lens_q)) and lse.dtype == FP32
    assert_close(out.cpu(), exact, low, FORWARD)
    empty = torch.isneginf(lse_exact)
    assert torch.equal(torch.isneginf(lse.cpu()), empty)
    assert_close(lse.cpu()[~empty], lse_exact[~empty], lse_low.float()[~empty], FORWARD, name="lse")
    for name, grad, grad_exact, grad_low in zip(("dq", "dk", "dv"), grads, grads_exact, grads_low):
        assert grad.shape == grad_exact.shape and grad.dtype == dtype
        assert_close(grad.cpu(), grad_exact, grad_low, BACKWARD, name=name)


def test_varlen_block_table_is_the_packed_keys_with_gradients_into_the_pages(attention_kernel_only, device):
    """Paged keys (pages of 3, shuffled, sequences of 0..9 keys, out-of-range ids in unused table entries) give
    the packed keys' output, lse and dq bit for bit, and dk/dv land in the pages the keys came from."""
    lens_q, lens_k, page_size = [3, 1, 0, 6], [5, 9, 4, 0], 3
    q, grad_out = torch.randn(2, sum(lens_q), 2, 16, dtype=FP16)
    k, v = torch.randn(2, sum(lens_k), 1, 16, dtype=FP16)
    k_pages, v_pages, table = paged_cache((k, v), lens_k, page_size, 12)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    results = []
    for keys, values, block_table in ((k, v, None), (k_pages, v_pages, table)):
        leaves = [t.to(device).requires_grad_() for t in (q, keys, values)]
        out, lse = attention_varlen(*leaves, cu_q, cu_k, 6, 9, causal=True, return_lse=True, window_size=(4, 0),
                                    block_table=None if block_table is None else block_table.to(device))
        results.append((out, lse, *torch.autograd.grad(out, leaves, grad_out.to(device))))
    (out, lse, dq, dk, dv), (out_paged, lse_paged, dq_paged, dk_pages, dv_pages) = results
    for expected, actual in ((out, out_paged), (lse, lse_paged), (dq, dq_paged)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for packed, pages in ((dk, dk_pages), (dv, dv_pages)):
        assert pages.shape == k_pages.shape
        gathered = gather_pages(pages, table.to(device), cu_k, 4 * 9)[:sum(lens_k)]  # batch * max_seqlen_k tokens
        torch.testing.assert_close(gathered, packed, rtol=0, atol=0)
        assert (pages != 0).sum() == (packed != 0).sum()  # nothing outside the sequences' slots


def test_varlen_block_table_page_ids_outside_the_pool_raise_naming_it():
    """Checked with the offsets by one check kernel (kernels.attention.checks.enforce): ValueError at once on CPU
    (on CUDA an asynchronous device assert, which would end the process's CUDA context, so this runs on CPU); ids
    are clamped for the gather."""
    lens = [2, 4]
    q, k, v = torch.randn(3, 6, 2, 8)
    k_pages, v_pages, table = paged_cache((k, v), lens, 3, 4)
    for bad_id in (4, -1):
        bad = table.clone()
        bad[1, 1] = bad_id  # sequence 1's second page: used
        with pytest.raises(ValueError, match="block_table: a page id a sequence uses is outside"):
            attention_varlen(q, k_pages, v_pages, _cu(lens, "cpu"), _cu(lens, "cpu"), 4, 4, block_table=bad)


def test_varlen_dropout_is_the_dense_masks_corner_of_each_sequence(attention_kernel_only, device):
    """Sequence b's keep-mask is attention_dropout_mask(batch, H, max_q, max_k)[b, :, :len_q, :len_k]."""
    lens_q, lens_k, h, d, p = [5, 19, 0, 12], [8, 19, 3, 1], 2, 16, 0.3
    q = torch.randn(sum(lens_q), h, d, dtype=torch.float64).float()
    k, v = torch.randn(2, sum(lens_k), h, d)
    torch.manual_seed(7)
    mask = kernels.attention_dropout_mask(len(lens_q), h, max(lens_q), max(lens_k), p, device).cpu()
    torch.manual_seed(7)
    out = attention_varlen(q.to(device), k.to(device), v.to(device), _cu(lens_q, device), _cu(lens_k, device),
                           max(lens_q), max(lens_k), causal=True, dropout_p=p)
    expected, _ = _per_sequence(q.double(), k.double(), v.double(), lens_q, lens_k, dropout_mask=mask,
                                dropout_p=p, causal=True)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_varlen_work_follows_each_sequences_length_in_one_launch_per_kernel(device):
    """Causal, one long and several short sequences: the counted dot FLOPs (forward + backward) are those of
    dense attention on each sequence alone, summed (~ sum L_i^2 / 2), far below a padded batch's B * max L^2 / 2;
    the forward is one launch after the offsets' check and the backward three (delta, dK/dV, dQ), whatever the
    batch."""
    if not kernels.INTERPRETED:
        pytest.skip("counting needs the interpreter")
    lens, h, d = [128, 16, 16, 32, 0, 16], 2, 16

    def counted(q, k, v, fn):
        with counting() as counts:
            out = fn(q, k, v)
            out.backward(torch.ones_like(out))
        return counts

    q, k, v = (torch.randn(sum(lens), h, d, device=device, requires_grad=True) for _ in range(3))
    packed = counted(q, k, v, lambda q, k, v: attention_varlen(q, k, v, _cu(lens, device), _cu(lens, device),
                                                               max(lens), max(lens), causal=True))
    assert packed.triton_launches == 5
    alone = [counted(*(torch.randn(1, h, n, d, device=device, requires_grad=True) for _ in range(3)),
                     lambda q, k, v: kernels.attention(q, k, v, causal=True)).flops for n in lens if n]
    assert packed.flops == sum(alone)
    assert packed.flops < 0.4 * len(lens) * alone[0]  # alone[0]: the longest sequence, what padding costs each
