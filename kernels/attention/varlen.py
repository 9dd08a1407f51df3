"""Variable-length ("packed", "unpadded") attention: several sequences concatenated along one token axis.

:func:`attention_varlen` is one launch per kernel for the whole batch, as flash-attn's: the kernels read each
sequence's offsets from ``cu_seqlens`` on the device (a 1-D grid of batch * heads * cdiv(max_seqlen, BLOCK)
programs, those past their sequence's end exiting at once), so no padding is computed and nothing is copied.

Host syncs: none. The offsets' values (start at 0, non-decreasing, end at the number of tokens, ``max_seqlen`` at
least the longest sequence) are checked on the device before any launch, where flash-attn checks nothing: invalid
offsets would make the kernels read and write out of bounds. One small check kernel judges them all (and a block
table's page ids) into one verdict: a bad value raises ValueError naming the argument at once on CPU and is an
asynchronous device assert on a GPU (``kernels.attention.checks.enforce``), which stops the stream before the
kernels run.

Paged keys (``block_table``, flash-attn's paged varlen): k, v are then page pools (num_blocks, page_size, Hkv, D)
and sequence b's key j is ``k[block_table[b, j // page_size], j % page_size]``. The keys are gathered on the
device into the packed layout the kernels take, sized batch * max_seqlen_k tokens (a bound of total_k =
cu_seqlens_k[-1] known on the host without reading it; the tokens past total_k are zeros the kernels never
read): a copy of up to batch * max_seqlen_k keys and values, where flash-attn reads the pages in place. The page
ids are checked with the offsets (an id outside [0, num_blocks) among the pages a sequence uses raises ValueError
on CPU, an asynchronous device assert on CUDA) and clamped, so no id makes the gather read out of bounds; unused
entries of the table are never checked.
"""
import dataclasses
import functools
import numbers
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels import _direct, _runtime
from kernels._validate import FLOAT_DTYPES, check_same
from kernels.attention.api import attention
from kernels.attention.checks import (INDEX_BLOCK, check_alibi, check_dropout, check_flag, check_qkv, check_scale,
                                      check_sinks, check_softcap, check_tensor, check_window, count, draw_rng, enforce,
                                      new_verdict, rule_bit, store_verdict, unusable_pages)
from kernels.attention.configs import MAX_HEAD_DIM
from kernels.attention.ops import attention_op, attention_packed_op, natural_lse
from kernels.attention.plan import AttentionVariant, LastTensor, VariantTensors, attention_variant
from kernels.registry import Build, declare, register_builds


def _check_cu_seqlens(name: str, cu_seqlens) -> None:
    """TypeError/ValueError naming ``cu_seqlens`` unless it is a 1-D int32 tensor of batch + 1 >= 1 entries."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() == 0:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries, got an empty tensor")


def _check_offsets_tensors(q, cu_seqlens_q, cu_seqlens_k) -> None:
    """TypeError/ValueError naming the argument unless cu_seqlens_q/k are 1-D int32 offsets of one batch on q's
    device."""
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    check_same("device", q=q, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


_OFFSETS_RULE = ("cu_seqlens_q/cu_seqlens_k must start at 0, be non-decreasing and end at the number of packed "
                 "tokens, max_seqlen_q/k be at least the longest sequence, and block_table's page ids that a sequence "
                 "uses be in [0, num_blocks)")


@triton.jit
def _offsets_failed(CU, batch, total, max_seqlen, FIRST_BIT: tl.constexpr, BLOCK: tl.constexpr):
    """The failed-rule bits of one cu_seqlens (batch + 1,): from FIRST_BIT on, it starts at 0, never decreases,
    ends at ``total`` (anywhere for total < 0), and no length exceeds ``max_seqlen``."""
    decreasing = 0
    too_long = 0
    for start in range(0, batch, BLOCK):
        i = start + tl.arange(0, BLOCK)
        in_batch = i < batch
        lo = tl.load(CU + i, mask=in_batch, other=0)
        hi = tl.load(CU + i + 1, mask=in_batch, other=0)
        decreasing += count(in_batch & (hi < lo))
        too_long += count(in_batch & (hi - lo > max_seqlen))
    last = tl.load(CU + batch)
    return (rule_bit(tl.load(CU), FIRST_BIT) | rule_bit(decreasing, FIRST_BIT + 1)
            | rule_bit(((total >= 0) & (last != total)).to(tl.int32), FIRST_BIT + 2) | rule_bit(too_long, FIRST_BIT + 3))


@triton.jit
def _varlen_check(CU_Q, CU_K, BLOCK_TABLE, VERDICT, stride_tb, batch, total_q, total_k, max_seqlen_q, max_seqlen_k,
                  max_blocks, page_size, num_pages, BLOCK: tl.constexpr):
    """One program: the verdict (``checks.new_verdict``) of both offsets and (BLOCK_TABLE not None) the page ids
    each sequence's keys use, bit by bit in the order of :func:`_offsets_rules`."""
    failed = (_offsets_failed(CU_Q, batch, total_q, max_seqlen_q, 0, BLOCK)
              | _offsets_failed(CU_K, batch, total_k, max_seqlen_k, 4, BLOCK))
    if BLOCK_TABLE is not None:
        failed |= rule_bit(unusable_pages(BLOCK_TABLE, stride_tb, batch, max_blocks, page_size, num_pages, CU_K + 1,
                                          CU_K, 0, 0, BLOCK), 8)
    store_verdict(VERDICT, failed)


@register_builds
def _builds() -> List[Build]:
    """The offsets' check, paged and not (the config a GPU launches)."""
    return [declare("attention_varlen_forward_check", _varlen_check, dtype="i32", constexprs=dict(BLOCK=INDEX_BLOCK),
                    num_warps=4, num_stages=1, types=types, label=f"{label} BLOCK={INDEX_BLOCK}", default=True)
            for types, label in (({}, "paged"), ({"BLOCK_TABLE": "constexpr"}, "packed"))]


def _offsets_rules(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: Optional[int], max_seqlen_q: int,
                   max_seqlen_k: int, block_table, num_blocks: int):
    """(message, argument, its values) of each bit of ``_varlen_check``'s verdict: what a failure says on CPU."""
    rules = []
    for name, cu_seqlens, total, max_name, max_seqlen in (
            ("cu_seqlens_q", cu_seqlens_q, total_q, "max_seqlen_q", max_seqlen_q),
            ("cu_seqlens_k", cu_seqlens_k, total_k, "max_seqlen_k", max_seqlen_k)):
        rules += [(f"{name} must start at 0", name, cu_seqlens),
                  (f"{name} must be non-decreasing (cumulative lengths)", name, cu_seqlens),
                  (f"{name} must end at the number of packed tokens {total}", name, cu_seqlens),
                  (f"{max_name} = {max_seqlen} must be at least the longest sequence of {name}", name,
                   cu_seqlens)]
    return rules + [(f"block_table: a page id a sequence uses is outside [0, num_blocks = {num_blocks}) of k/v",
                     "block_table", block_table)]


_ONE_PROGRAM = (1,)


def _offsets_verdict(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_table: Optional[torch.Tensor],
                     total_q: int, total_k: int, max_seqlen_q: int, max_seqlen_k: int, num_blocks: int,
                     page_size: int, reused: bool = False) -> torch.Tensor:
    """The verdict (``checks.new_verdict``; ``reused``: this thread's, read before its next check) of one
    ``_varlen_check`` launch (``total_k`` -1: keys from pages)."""
    verdict = new_verdict(cu_seqlens_q.device, reused)
    table = None if block_table is None else block_table.contiguous()
    with _runtime.launch_device(cu_seqlens_q):
        _direct.run(_varlen_check, (cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), table, verdict,
                                    0 if table is None else table.stride(0), cu_seqlens_q.shape[0] - 1, total_q,
                                    total_k, max_seqlen_q, max_seqlen_k, 0 if table is None else table.shape[1],
                                    page_size, num_blocks), _ONE_PROGRAM, BLOCK=INDEX_BLOCK)
    return verdict


_offsets_verdict_op = torch.library.custom_op("kernels::attention_varlen_check", _offsets_verdict, mutates_args=())
""":func:`_offsets_verdict` as the op torch.compile traces (it cannot trace into an interpreted launch)."""


@_offsets_verdict_op.register_fake
def _(cu_seqlens_q, *args):
    return cu_seqlens_q.new_empty(2)


_offsets_passed = LastTensor()
"""The offsets (and block table) whose checks passed last, and what :func:`_judge_offsets` returned for them: a
model's layers pass the same tensors."""


def _checked_offsets(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q, cu_seqlens_k, block_table,
                     judged: tuple) -> VariantTensors:
    """The offsets as the kernels take them (contiguous, as a :class:`VariantTensors`), once checked against
    ``judged``: (q's device, total_q, total_k (-1: keys from pages), max_seqlen_q, max_seqlen_k, num_blocks,
    page_size). TypeError/ValueError naming the argument unless cu_seqlens_q/k are 1-D int32 offsets of one batch on
    q's device (:func:`_check_offsets_tensors`) and ``block_table`` (None: keys not paged) a table of that batch for
    k's pages (:func:`_check_block_table`); then ValueError naming the argument (on CPU at once; on a GPU a device
    assert, with no host sync: ``checks.enforce``) unless each cu_seqlens starts at 0, never decreases and ends at
    its token count (total_k -1: anywhere, for keys gathered from pages), each max_seqlen is at least its longest
    sequence (the grid is sized by it, so a smaller value would silently drop rows), and the ``block_table`` ids
    that a sequence's keys use are pages of [0, num_blocks). Run before any launch: the kernels read only the rows
    the offsets name. One ``_varlen_check`` launch and one assert for all of it.

    Checked once while the same tensors come back unmodified with the same ``judged`` (``plan.LastTensor``: the
    tensors' identities and ``_version``, which every in-place torch op bumps, and no op changes a tensor's dtype,
    shape or device without bumping): the checks depend on nothing else, so a repeat would judge the same tensors
    again. A check that raises is not memoised; on a GPU the first call's device assert stands for the calls after
    it. Writes that bypass torch's version counter (through a numpy view or ``.data``) are not seen. The offsets
    must be plain tensors or pass :func:`_check_offsets_tensors` first (the memo reads the first one's ``is_cuda``
    and each one's ``_version``, and takes weak references)."""
    if block_table is not None:
        tensors = (cu_seqlens_q, cu_seqlens_k, block_table)
    else:  # self-attention passes one offsets tensor for both: compared once (a memo of one tensor is another)
        tensors = cu_seqlens_q if cu_seqlens_k is cu_seqlens_q else (cu_seqlens_q, cu_seqlens_k)
    copies = _offsets_passed.get(tensors, judged, _judge_offsets, q, k, cu_seqlens_q, cu_seqlens_k, block_table,
                                 judged)
    if copies is not None:
        return copies
    # by position (kv_bounds, pad, alibi_slopes, sinks, rng_state, cu_seqlens_q/k): keywords cost more
    return VariantTensors(None, None, None, None, None, cu_seqlens_q, cu_seqlens_k)


def _offsets_verdict_by_torch(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                              block_table: Optional[torch.Tensor], total_q: int, total_k: int, max_seqlen_q: int,
                              max_seqlen_k: int, num_blocks: int, page_size: int) -> torch.Tensor:
    """``_varlen_check``'s verdict (the same rule bits, in :func:`_offsets_rules`' order) computed by torch ops on
    the offsets' device: for tensors the check kernel cannot be launched on (the fallback's)."""
    failed = []
    for cu_seqlens, total, max_seqlen in ((cu_seqlens_q, total_q, max_seqlen_q),
                                          (cu_seqlens_k, total_k, max_seqlen_k)):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        failed += [cu_seqlens[0] != 0, (lengths < 0).any(), (cu_seqlens[-1] != total) & (total >= 0),
                   (lengths > max_seqlen).any()]
    if block_table is not None:  # the ids of the pages holding a position below the sequence's length (lengths: k's)
        used = torch.arange(block_table.shape[1], device=block_table.device) * page_size < lengths[:, None]
        failed.append((used & ((block_table < 0) | (block_table >= num_blocks))).any())
    bits = sum(fail.int() << bit for bit, fail in enumerate(failed))
    return torch.stack([(bits == 0).int(), ~bits])


def _judge_offsets(q, k, cu_seqlens_q, cu_seqlens_k, block_table, judged: tuple,
                   kernels_run: bool = True) -> Optional[VariantTensors]:
    """:func:`_checked_offsets`'s checks, launch and verdict, every call; without ``kernels_run`` (tensors the
    kernels cannot take) the verdict is computed by torch ops instead of the check kernel. Returns None where both
    offsets are contiguous (the kernels read them as they are), else the :class:`VariantTensors` of contiguous
    copies of both: what the memo keeps holds no tensor of the caller's, which it would keep alive (with any buffer
    it views) until a call with other offsets."""
    _, total_q, total_k, max_seqlen_q, max_seqlen_k, num_blocks, page_size = judged
    _check_offsets_tensors(q, cu_seqlens_q, cu_seqlens_k)
    if block_table is not None:
        _check_block_table(block_table, k, cu_seqlens_q.shape[0] - 1, max_seqlen_k)
    args = (cu_seqlens_q, cu_seqlens_k, block_table, total_q, total_k, max_seqlen_q, max_seqlen_k, num_blocks,
            page_size)
    if not kernels_run:
        verdict = _offsets_verdict_by_torch(*args)
    elif torch.compiler.is_compiling():
        verdict = _offsets_verdict_op(*args)
    else:  # eager: the thread's one verdict, read just below (a custom op's output must be a new tensor)
        verdict = _offsets_verdict(*args, reused=True)
    enforce(verdict, _OFFSETS_RULE, lambda: _offsets_rules(cu_seqlens_q, cu_seqlens_k, total_q,
                                                           None if total_k < 0 else total_k, max_seqlen_q,
                                                           max_seqlen_k, block_table, num_blocks))
    if cu_seqlens_q.is_contiguous() and cu_seqlens_k.is_contiguous():
        return None
    return VariantTensors(None, None, None, None, None, cu_seqlens_q.clone(memory_format=torch.contiguous_format),
                          cu_seqlens_k.clone(memory_format=torch.contiguous_format))


MAX_SEQLEN = 2**31 - 1
"""The largest ``max_seqlen_q/k``: the kernels' positions are int32 (flash-attn's C++ takes an int too)."""


def _check_max_seqlen(name: str, max_seqlen) -> int:
    """``max_seqlen`` as a Python int (what a launch takes); TypeError unless it is an int (numpy's too), ValueError
    outside [0, :data:`MAX_SEQLEN`] (its value is also checked against the offsets)."""
    if type(max_seqlen) is not int:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {max_seqlen!r}")
        max_seqlen = int(max_seqlen)
    if not 0 <= max_seqlen <= MAX_SEQLEN:
        raise ValueError(f"{name} must be in [0, {MAX_SEQLEN}] (int32 positions), got {max_seqlen}")
    return max_seqlen


def _checked_variant(causal, scale, window_size, softcap, dropout_p, head_dim: int, max_seqlen_q,
                     max_seqlen_k) -> AttentionVariant:
    """The :class:`AttentionVariant` of varlen's scalars (``scale`` None: 1/sqrt(head_dim)); TypeError/ValueError
    naming the argument unless max_seqlen_q/k are ints, scale a finite real or None, window_size a pair of ints
    >= -1, softcap in [0, inf) and dropout_p in [0, 1)."""
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    scale = check_scale(scale, head_dim)
    window_left, window_right = check_window(window_size)
    softcap = check_softcap(softcap)
    dropout_p = check_dropout(dropout_p)
    causal = check_flag("causal", causal)
    return attention_variant(causal, 0, scale, window_left, window_right, 0, softcap, dropout_p, -1, -1,
                             max_seqlen_q, max_seqlen_k)


_plain_variant = functools.lru_cache(maxsize=256)(_checked_variant)
""":func:`_checked_variant` of plain scalars (bool causal, float or None scale, a tuple of two ints, float softcap
and dropout_p, int max_seqlen), cached by value: a model's calls repeat a handful. Only for those types, since
values equal across types share an entry (True == 1 == 1.0) where the checks tell them apart."""


def _check_kv_rank(name: str, t, paged: bool) -> None:
    """TypeError/ValueError naming ``name`` unless ``t`` is a float tensor of the rank the keys take: 4-D page pools
    with a block_table, else 3-D packed tokens (the message says which, and why)."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES)
    if paged and t.dim() != 4:
        raise ValueError(f"{name} must be 4-D with block_table: a page pool (num_blocks, page_size, nheads_k, "
                         f"headdim), got shape {tuple(t.shape)}")
    if not paged and t.dim() != 3:
        raise ValueError(f"{name} must be 3-D without block_table: packed tokens (total_k, nheads_k, headdim), got "
                         f"shape {tuple(t.shape)}")


def _check_page_pools(k, v) -> None:
    """ValueError unless the 4-D k, v are page pools (num_blocks >= 1, page_size >= 1, Hkv, D) of one shape."""
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must be a page pool (num_blocks >= 1, page_size >= 1, nheads_k, headdim) with "
                             f"block_table, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (num_blocks, page_size, nheads_k, headdim), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")


def _check_block_table(block_table, k, batch: int, max_seqlen_k: int) -> None:
    """TypeError/ValueError naming block_table unless it is an int32 (batch, max_num_blocks) table on k's device
    whose pages hold ``max_seqlen_k`` keys. Its ids' values are checked on the device (:func:`gather_pages`)."""
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
    check_same("device", k=k, block_table=block_table)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have one row per sequence (batch = {batch}, max_num_blocks), got shape "
                         f"{tuple(block_table.shape)}")
    if block_table.shape[1] * k.shape[1] < max_seqlen_k:
        raise ValueError(f"block_table's {block_table.shape[1]} pages of {k.shape[1]} keys must hold max_seqlen_k = "
                         f"{max_seqlen_k} keys, got shape {tuple(block_table.shape)}")


def token_sequences(cu_seqlens: torch.Tensor, n_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position within it), int64 (n_tokens,) each, of the first ``n_tokens`` packed tokens of
    the sequences int32 ``cu_seqlens`` (batch + 1,) delimits, on the device without a host sync; tokens at or past
    the last offset count as the last sequence's."""
    starts = cu_seqlens.long()
    tokens = torch.arange(n_tokens, device=cu_seqlens.device)
    sequence = torch.searchsorted(starts[1:], tokens, right=True).clamp_(max=max(starts.shape[0] - 2, 0))
    return sequence, tokens - starts[sequence]


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor, cu_seqlens_k: torch.Tensor,
                 n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` packed keys (or values) of paged sequences, on the device without a host sync:
    (n_tokens, Hkv, D), token t = cu_seqlens_k[b] + j being ``pages[block_table[b, j // page_size], j %
    page_size]``. Tokens at or past cu_seqlens_k[-1] are zeros. ``pages`` (num_blocks,
    page_size, Hkv, D), ``block_table`` int32 (batch, max_num_blocks), ``cu_seqlens_k`` int32 (batch + 1,), all
    checked. Differentiable in ``pages``.

    Every id is clamped, so none reads out of bounds; :func:`attention_varlen` checks first that those a sequence
    uses are pages of ``pages``."""
    num_blocks, page_size = pages.shape[:2]
    max_blocks = block_table.shape[1]
    table = block_table.long().clamp(0, num_blocks - 1)
    seq, position = token_sequences(cu_seqlens_k, n_tokens)
    page = table[seq, (position // page_size).clamp(0, max_blocks - 1)]
    # filler is zeros, so none of the kernels' (unwritten) gradient rows past the total reaches the pages
    real = (torch.arange(n_tokens, device=pages.device) < cu_seqlens_k[-1])[:, None, None]
    return torch.where(real, pages[page, position % page_size], 0)


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """A packed (total, heads, D) tensor as the (1, heads, total, D) view the kernels take."""
    return t.unsqueeze(0).transpose(1, 2)


def _as_packed(t: torch.Tensor) -> torch.Tensor:
    """A (1, heads, total, D) tensor as its packed (total, heads, D) view: the inverse of :func:`_as_batch`."""
    return t[0].transpose(0, 1)


def _plain_sizes(q, k, v, paged: bool) -> Optional[Tuple[torch.Size, torch.Size, torch.device]]:
    """(q's shape, k's shape, q's device) where q, k, v pass every check of :func:`_check_tensors`, tested at once
    for plain tensors (the common case: each size, dtype and device read once); None sends any other input to the
    full checks and their messages."""
    tensor, strided = torch.Tensor, torch.strided
    if not (type(q) is tensor and type(k) is tensor and type(v) is tensor
            and q.layout is strided and k.layout is strided and v.layout is strided  # is_dense, inline
            and not (q.is_nested or k.is_nested or v.is_nested)):
        return None
    q_shape, k_shape = q.shape, k.shape
    dtype, device = q.dtype, q.device
    if not (len(q_shape) == 3 and len(k_shape) == 3 + paged and k_shape == v.shape and dtype in FLOAT_DTYPES
            and k.dtype is dtype and v.dtype is dtype and k.device == device == v.device):
        return None
    _, heads, d = q_shape
    kv_heads = k_shape[-2]
    if (k_shape[-1] == d and 1 <= d <= MAX_HEAD_DIM and kv_heads > 0 and heads % kv_heads == 0
            and (not paged or (k_shape[0] > 0 and k_shape[1] > 0))):
        return q_shape, k_shape, device
    return None


def _check_tensors(q, k, v, paged: bool) -> Tuple[torch.Size, torch.Size, torch.device]:
    """TypeError/ValueError naming the argument unless q (total_q, H, D) and k, v (total_k, Hkv, D), or with
    ``paged`` page pools (num_blocks, page_size, Hkv, D), are valid attention inputs; returns (q's shape, k's
    shape, q's device). The offsets are checked with their values (:func:`_checked_offsets`)."""
    sizes = _plain_sizes(q, k, v, paged)
    if sizes is not None:
        return sizes
    check_tensor("q", q, ndim=3)
    _check_kv_rank("k", k, paged)
    _check_kv_rank("v", v, paged)
    if paged:
        _check_page_pools(k, v)
    # a page pool's (num_blocks, Hkv, D) first-slot views stand for the keys in the dtype/device/head checks,
    # whose messages show the shapes passed
    check_qkv(*(_as_batch(t[:, 0] if paged and t is not q else t) for t in (q, k, v)),
              shown=(q.shape, k.shape, v.shape, "(total_q, H, D)",
                     "(num_blocks, page_size, Hkv, D)" if paged else "(total_k, Hkv, D)"))
    return q.shape, k.shape, q.device


def _per_sequence(q, k, v, offsets_q, offsets_k, causal, scale, **variants):
    """The fallback where the kernels cannot run: :func:`kernels.attention` (itself the reference there) on each
    sequence's views, as (out (total_q, H, D), lse (H, total_q))."""
    alibi_slopes = variants.pop("alibi_slopes")
    outs, lses = [q.new_empty((0,) + q.shape[1:])], [torch.empty((q.shape[1], 0), device=q.device)]
    for b in range(len(offsets_q) - 1):
        rows, keys = slice(*offsets_q[b:b + 2]), slice(*offsets_k[b:b + 2])
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = attention(_as_batch(q[rows]), _as_batch(k[keys]), _as_batch(v[keys]), causal, scale, True,
                             alibi_slopes=slopes, **variants)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                     scale: Optional[float] = None, return_lse: bool = False, *,
                     window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                     sinks: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None):
    """Attention of each packed sequence to its own keys: sequence b's queries are q tokens [cu_seqlens_q[b],
    cu_seqlens_q[b+1]) and its keys/values k, v tokens [cu_seqlens_k[b], cu_seqlens_k[b+1]).

    q: (total_q, H, D); k, v: (total_k, Hkv, D), H a multiple of Hkv; fp16/bf16/fp32, any strides.
    cu_seqlens_q/k: int32 (batch + 1,) cumulative lengths from 0 to total, on q's device (sequences of length 0
    are allowed); max_seqlen_q/k: ints from the longest sequence to 2**31 - 1 (they size the grid, capped at the
    token counts). ``causal`` is bottom-right per sequence (query i of a sequence sees key j iff j <= i + len_k -
    len_q), as are the window and ALiBi distances. ``alibi_slopes`` is float32 (H,) or (batch, H); the other
    variants are those of :func:`kernels.attention`. Under dropout, sequence b's keep-mask is
    ``attention_dropout_mask(batch, H, max_seqlen_q, max_seqlen_k, dropout_p)[b, :, :len_q, :len_k]`` of the same
    generator state.

    ``block_table``: int32 (batch, max_num_blocks); k, v are then page pools (num_blocks, page_size, Hkv, D) and
    sequence b's keys are its first len_k pages' slots in table order (see the module docstring); max_seqlen_k is
    then at most max_num_blocks * page_size (ValueError naming block_table: the gather is sized by it).

    Returns out (total_q, H, D) in q's dtype, contiguous, and with ``return_lse`` lse (H, total_q) float32
    (flash-attn's varlen layout; -inf for rows that see no key). Differentiable in q, k, v (and sinks). One
    launch per kernel; no host sync (see the module docstring).
    """
    paged = block_table is not None
    # dtypes, devices, head counts and dims
    q_shape, k_shape, device = _check_tensors(q, k, v, paged)
    total_q, _, head_dim = q_shape
    return_lse = check_flag("return_lse", return_lse)
    compiling = torch.compiler.is_compiling()
    if (type(causal) is bool and (scale is None or type(scale) is float) and type(window_size) is tuple
            and len(window_size) == 2 and type(window_size[0]) is int and type(window_size[1]) is int
            and type(softcap) is float and type(dropout_p) is float and type(max_seqlen_q) is int
            and type(max_seqlen_k) is int and not compiling):  # dynamo warns past a cache
        variant = _plain_variant(causal, scale, window_size, softcap, dropout_p, head_dim, max_seqlen_q,
                                 max_seqlen_k)
    else:
        variant = _checked_variant(causal, scale, window_size, softcap, dropout_p, head_dim, max_seqlen_q,
                                   max_seqlen_k)
    if type(cu_seqlens_q) is not torch.Tensor or type(cu_seqlens_k) is not torch.Tensor:  # before the memo, which
        _check_offsets_tensors(q, cu_seqlens_q, cu_seqlens_k)  # reads .is_cuda, _version: TypeError for a non-tensor
    if alibi_slopes is not None:  # before the offsets' check launches; against their batch: (H,) or (batch, H)
        _check_offsets_tensors(q, cu_seqlens_q, cu_seqlens_k)
        check_alibi(alibi_slopes, _as_batch(q).expand(cu_seqlens_q.shape[0] - 1, -1, -1, -1))
    if sinks is not None:
        check_sinks(sinks, _as_batch(q))
    num_blocks, page_size = k_shape[:2] if paged else (0, 0)
    judged = (device, total_q, -1 if paged else k_shape[0], variant.max_seqlen_q, variant.max_seqlen_k, num_blocks,
              page_size)
    # k, v are on q's device (_check_tensors); under a torch.func transform the per-sequence fallback runs (the
    # kernels' backward cannot read functorch's wrapped gradients)
    kernels_run = _runtime.kernel_runs_on(q) and not _runtime.in_functorch_transform()
    if kernels_run:  # the offsets' (and block table's) checks, the tensors' and their values', memoised
        offsets = _checked_offsets(q, k, cu_seqlens_q, cu_seqlens_k, block_table, judged)
    else:  # no check kernel launches on tensors the kernels cannot take: the same checks by torch ops
        _judge_offsets(q, k, cu_seqlens_q, cu_seqlens_k, block_table, judged, kernels_run=False)
        if _runtime.holds_no_data(q):
            raise NotImplementedError("attention_varlen: the Triton kernels cannot run on meta or fake tensors, and "
                                      "the fallback slices each sequence by the offsets' values, which they do not "
                                      "hold")
    # a max_seqlen past its token count (keys from pages: bounded by the block table) sizes the grid by the count
    # instead: no sequence is longer, so the same rows are computed, and a generous one (any up to int32's) does not
    # launch programs that would all exit at once. Not while compiling: the token counts may be symbolic there, and
    # comparing them would guard a dynamic count to below max_seqlen (flash-attn's grid takes max_seqlen as given)
    bounded_k = variant.max_seqlen_k if paged else min(variant.max_seqlen_k, k_shape[0])
    if not compiling and (variant.max_seqlen_q > total_q or bounded_k < variant.max_seqlen_k):
        variant = dataclasses.replace(variant, max_seqlen_q=min(variant.max_seqlen_q, total_q), max_seqlen_k=bounded_k)
    _runtime.refuse_forward_ad("kernels.attention_varlen", q, k, v)
    if paged:
        n_keys = (cu_seqlens_q.shape[0] - 1) * variant.max_seqlen_k  # batch * max_seqlen_k: a bound of total_k
        k, v = (gather_pages(t, block_table, cu_seqlens_k, n_keys) for t in (k, v))
    if not kernels_run:  # the fallback slices each sequence on the host: it reads the offsets (no kernel path does)
        out, lse = _per_sequence(q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), causal, variant.scale,
                                 window_size=window_size, softcap=variant.softcap, alibi_slopes=alibi_slopes,
                                 dropout_p=variant.dropout_p, sinks=sinks)
        return (out, lse) if return_lse else out
    tensors = offsets
    if alibi_slopes is not None or sinks is not None or variant.dropout_p > 0:
        tensors = offsets._replace(alibi_slopes=None if alibi_slopes is None else alibi_slopes.contiguous(),
                                   sinks=None if sinks is None else sinks.float(),
                                   rng_state=draw_rng(q.device) if variant.dropout_p > 0 else None)
    if compiling:  # the custom ops, on the kernels' views
        out, lse = attention_op(_as_batch(q), _as_batch(k), _as_batch(v), tensors, variant)
        out = _as_packed(out)
    else:  # launched on the packed tensors themselves
        out, lse = attention_packed_op(q, k, v, tensors, variant)
    return (out, natural_lse(lse[0])) if return_lse else out
