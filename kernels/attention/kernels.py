"""The Triton kernels of fused attention, FlashAttention-2 style: forward, and a backward in three kernels.

Shapes: q (B, H, Nq, D); k, v (B, Hkv, Nk, D) with H a multiple of Hkv (grouped-query attention by indexing:
query head h reads kv head h // (H // Hkv), nothing repeated in memory); D <= BLOCK_D, the head dim padded to a
power of two >= 16 with masked loads; fp16, bf16 or fp32, any strides. Every address offset that can pass 2^31
(batch, head and row times their strides) is computed in 64 bits.

Math: out = softmax(s) @ v, block by block with an online softmax in base 2 (scale * log2(e) folded into one
multiply), never materialising the (Nq, Nk) scores; the logsumexp ``lse`` float32 (element b * stride_lb +
h * stride_lh + i: (B, H, Nq), or (1, H, total_q) for packed sequences) is kept for the backward in the kernels' base:
lse = log2(sum_j 2^(s_ij * log2 e)), the natural one times log2(e), so that the backward's p = 2^(s * log2 e - lse)
is exactly 1 where a row sees one key (a natural-log lse, rounded on the way out and back, was 1 +- 1e-5 at
logits ~100). The public functions return the natural-log lse (``api.natural_lse``). The score of query i and key j is, in FlashAttention's order,

    s_ij = scale * q_i . k_j,  then softcap * tanh(s_ij / softcap) (SOFTCAP),  then - slope_h * |i + ALIBI_SHIFT - j|
    (ALIBI, a float32 slope per head, or per batch and head when stride_ab is nonzero),

and query i sees key j iff kv_start[b] <= j < kv_end[b], the optional (B, Nk) padding mask PAD is nonzero at
(b, j), j <= i + CAUSAL_SHIFT (CAUSAL: a causal mask or a window's right edge), j >= i + WINDOW_SHIFT (WINDOW:
a window's left edge) and floor(j / CHUNK_SIZE) == floor((i + ALIBI_SHIFT) / CHUNK_SIZE) (CHUNKED: flash-attn 3's
attention_chunk; ALIBI_SHIFT is the diagonal Nk - Nq, so the chunk is that of query i's bottom-right aligned
position). Key blocks outside a query block's bounds are never visited, and only the blocks that
straddle a bound are masked. SINKS (float32, one logit per head) joins every row's softmax denominator with no
value: out_i = sum_j exp(s_ij) v_j / (exp(sink_h) + sum_j exp(s_ij)), and lse includes it. Rows that see no key
give zeros and lse = -inf (lse = sink_h * log2(e) with sinks).

Dropout (SEED, a pointer to the int64 pair (seed, offset)): after the softmax, probability p_ij is kept with
probability 1 - dropout_p and scaled by 1 / (1 - dropout_p); the keep decision is Philox(seed; j, i, b * H + h,
offset) >= dropout_p, a pure function of the element's coordinates, so the backward regenerates it and
``_dropout_mask`` reproduces it bit for bit. lse is of the undropped probabilities.

Packed sequences (varlen; CU_SEQLENS_Q/K, int32 (B + 1,) cumulative lengths, passed instead of None): sequence
b is rows [cu_q[b], cu_q[b + 1]) of q (and out, lse) and [cu_k[b], cu_k[b + 1]) of k, v, with batch strides 0;
N_Q, N_K are the longest lengths, which size the grid. A program reads its sequence's bounds, exits at once if
its block starts past the sequence's end, moves its base pointers to the sequence's first rows (64-bit offsets)
and works on the sequence's own lengths: causal, window and ALiBi are bottom-right per sequence (its own
Nk - Nq is added to the shifts). Dropout draws by position within the sequence, as a dense (B, H, N_Q, N_K) call.

Grids are one-dimensional (CUDA allows 2^31 - 1 programs on axis 0 but only 65535 on axis 1): program p owns
block p % cdiv(n, BLOCK) of head p // cdiv(n, BLOCK), so neighbouring programs share a head as a 2-D grid would.

Backward (FA2): delta = rowsum(dO * O); dK/dV by a program per key block per kv head that loops over the query
heads of its group and their query blocks (GQA sums without atomics: deterministic); dQ by a program per query
block that loops over key blocks. With dropout z_ij = keep_ij / (1 - dropout_p): dV += (p * z)^T dO and
ds = p * (z * dO v^T - delta); with softcap ds is further multiplied by 1 - tanh^2.

Disabled features cost nothing: CAUSAL, WINDOW, CHUNKED and SOFTCAP are constexpr switches, and ALIBI, SINKS, SEED,
PAD, KV_BOUNDS and CU_SEQLENS_Q/K are pointers that the launcher passes as None, which Triton specialises away.

TMA (a constexpr; the launcher allows it only for unit-stride head dims with 16-byte aligned bases and strides):
the forward's Q, K, V and O, dK/dV's streamed Q and dO and dQ's streamed K and V go through tensor descriptors made
on the device per program, one per head's (rows, HEAD_DIM) matrix (:func:`_head_rows`), instead of pointer tiles:
TMA copies on sm_90/sm_100. The descriptor's shape does the masking: rows past it and the head-dim padding read as
zeros, so a K/V descriptor has the block's key bound ``hi`` as its rows, which the pointer path's ``cols < kv_hi``
masks mean. For packed sequences the rows are the sequence's own (base moved to its first row). The interpreter
emulates descriptors with masked loads (and checks the alignment itself), so tests run this path on CPU.

UPCAST (chosen by the launcher, only when interpreted): Triton's interpreter multiplies bf16 ``tl.dot`` operands
as raw integers, so there bf16 tiles are converted to fp32 before every dot; compiled kernels keep bf16 dots.
"""
import triton
import triton.language as tl

from kernels._runtime import cast_rne

LOG2E = tl.constexpr(1.4426950408889634)  # kernels work in base 2: exp(x) = exp2(x * log2(e))
LN2 = tl.constexpr(0.6931471805599453)
MASK_BLOCK = tl.constexpr(128)
"""The cell size of a block mask's summary (block_mask.py): every kernel tile (powers of two <= 128, tiles starting
at multiples of their size) lies in one cell."""


@triton.jit
def _tile_ptrs(X, b, h, rows, offs_d, stride_b, stride_h, stride_n, stride_d):
    """Pointers to the (rows, BLOCK_D) tile at rows ``rows`` of head ``h`` of batch ``b`` (64-bit offsets, the head
    dim's too: a head-dim-outer layout has stride_d past 2^31 / BLOCK_D; with stride_d 1, which Triton specialises,
    the cast is the sign extension a pointer offset takes anyway)."""
    return (X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
            + rows.to(tl.int64)[:, None] * stride_n + offs_d.to(tl.int64)[None, :] * stride_d)


@triton.jit
def _row_offset(start, stride):
    """``start * stride`` in 64 bits: a block's row offset within a head (``start`` may be a plain loop int)."""
    return tl.cast(start, tl.int64) * stride


@triton.jit
def _program_block(n, BLOCK: tl.constexpr):
    """(first row of this program's block, flat batch * head index) of a 1-D grid over cdiv(n, BLOCK) blocks per
    head."""
    blocks = tl.cdiv(n, BLOCK)
    pid = tl.program_id(0)
    return (pid % blocks) * BLOCK, pid // blocks


@triton.jit
def _sequence(CU_SEQLENS, b, N):
    """(first row, length) of batch ``b``'s sequence: packed rows [cu[b], cu[b + 1]) of the int32 cumulative
    lengths ``CU_SEQLENS`` (varlen), else [0, N)."""
    if CU_SEQLENS is None:
        start = 0
        n = N
    else:
        start = tl.load(CU_SEQLENS + b)
        n = tl.load(CU_SEQLENS + b + 1) - start
    return start, n


@triton.jit
def _load_tile(ptrs, row_ok, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile: zeros for the head-dim padding and, with CHECK_ROWS, where ``row_ok`` is False.

    Masks are only emitted when needed so that full, power-of-two tiles load unmasked (vectorised).
    """
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, tile, row_ok, offs_d, HEAD_DIM: tl.constexpr):
    tl.store(ptrs, tile, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _head_rows(X, b, h, n_rows, stride_b, stride_h, stride_n, stride_d, BLOCK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """Where blocks of BLOCK rows of head ``h`` of batch ``b`` are read or written (:func:`_load_rows`). With TMA, a tensor descriptor over the head's (n_rows, HEAD_DIM) matrix (the launcher
    checked that the head dim is unit-stride and the base and row strides 16-byte aligned): the hardware fills
    rows from ``n_rows`` on and the head-dim padding with zeros and drops their writes, as the pointer path's
    masks do. Else pointers to the (BLOCK, BLOCK_D) tile at row 0 (:func:`_tile_ptrs`).

    Interpreted, a descriptor is emulated by masked loads and stores through the same builder calls as pointers
    (so benchmarks/counting.py counts its traffic), after asserting the alignment that the launcher's check
    guarantees: a test forcing TMA on a misaligned layout would die there, hence the launcher drops TMA instead."""
    if TMA:
        base = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        rows = tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_n, 1],
                                         block_shape=[BLOCK, BLOCK_D])
    else:
        rows = _tile_ptrs(X, b, h, tl.arange(0, BLOCK), tl.arange(0, BLOCK_D), stride_b, stride_h, stride_n,
                          stride_d)
    return rows


@triton.jit
def _load_rows(rows, start, row_ok, stride_n, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """The (BLOCK, BLOCK_D) tile at row ``start`` of :func:`_head_rows`' ``rows``: zeros where ``row_ok`` is False
    (pointers, with CHECK_ROWS; a descriptor checks its own rows) and in the head-dim padding."""
    if TMA:
        tile = rows.load([start, 0])
    else:
        tile = _load_tile(rows + _row_offset(start, stride_n), row_ok, tl.arange(0, BLOCK_D), CHECK_ROWS, HEAD_DIM,
                          BLOCK_D)
    return tile


@triton.jit
def _key_rows(K, V, b, kv_h, n_rows, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
              stride_vd, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """(K, V) row sources (:func:`_head_rows`) of a loop over key blocks of kv head ``kv_h``.

    The forward and dQ make descriptors after the query block's key range (their rows: its bound ``hi``, past
    which no key is visible), but pointers before it, where the kernels always made them: made after it, ptxas
    spills 64 B in the sm_90 fp32 d256 mask-mod forward."""
    return (_head_rows(K, b, kv_h, n_rows, stride_kb, stride_kh, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D,
                       TMA),
            _head_rows(V, b, kv_h, n_rows, stride_vb, stride_vh, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D,
                       TMA))


@triton.jit
def _key_bounds(KV_BOUNDS, b, N_K):
    """The batch's visible key range [lo, hi): all keys, or the (B, 2) int32 ``KV_BOUNDS`` row of a padding mask
    (its first and one past its last visible key)."""
    if KV_BOUNDS is None:
        lo = 0
        hi = N_K
    else:
        lo = tl.load(KV_BOUNDS + 2 * b)
        hi = tl.load(KV_BOUNDS + 2 * b + 1)
    return lo, hi


@triton.jit
def _keys_visible(PAD, b, stride_pb, cols, kv_hi):
    """(BLOCK_N,) bool: keys ``cols`` below ``kv_hi`` that the batch's padding-mask row (uint8, unit stride) keeps."""
    visible = cols < kv_hi
    if PAD is not None:
        visible = visible & (tl.load(PAD + b.to(tl.int64) * stride_pb + cols, mask=visible, other=0) != 0)
    return visible


@triton.jit
def _chunk_start(position, CHUNK_SIZE):
    """The first position of the attention chunk holding ``position``: floor(position / CHUNK_SIZE) * CHUNK_SIZE.
    Computed on non-negative numbers (Triton's // truncates toward zero): a position below -CHUNK_SIZE is raised to
    it first, which changes no visibility (its chunk and [-CHUNK_SIZE, 0) both hold no key)."""
    return (tl.maximum(position, -CHUNK_SIZE) + CHUNK_SIZE) // CHUNK_SIZE * CHUNK_SIZE - CHUNK_SIZE


@triton.jit
def _query_block_keys(KV_BOUNDS, b, start_m, N_Q, N_K, CAUSAL_SHIFT, WINDOW_SHIFT, DIAGONAL, CHUNK_SIZE, CELLS,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                      CHUNKED: tl.constexpr, HAS_PAD: tl.constexpr):
    """Keys [lo, hi) that some row of the query block at ``start_m`` sees, split by lo <= full_lo <= full_hi <= hi:
    [full_lo, full_hi) is whole key blocks that every row of the block sees, so only [lo, full_lo) and
    [full_hi, hi) need the score mask (all of [lo, hi) with a padding mask, which may hide any key). Key blocks
    past the causal diagonal, before the window's left edge or outside the rows' attention chunks (CHUNKED: from
    the first row's chunk to the last's) lie outside [lo, hi) and are never visited; with a block mask (CELLS,
    :func:`_cells`), nor are keys outside the query cell's first..last non-empty key cell, and lo is a multiple
    of BLOCK_N so that every key block lies in one cell ([lo, full_lo) is then masked always)."""
    lo, hi = _key_bounds(KV_BOUNDS, b, N_K)
    last_row = tl.minimum(start_m + BLOCK_M, N_Q) - 1
    full_lo = lo
    full_hi = hi
    if HAS_PAD:
        full_hi = lo
    if CAUSAL:
        hi = tl.minimum(hi, last_row + CAUSAL_SHIFT + 1)
        full_hi = tl.minimum(full_hi, start_m + CAUSAL_SHIFT + 1)
    if WINDOW:
        lo = tl.maximum(lo, start_m + WINDOW_SHIFT)
        full_lo = tl.maximum(lo, last_row + WINDOW_SHIFT)
    if CHUNKED:  # every row sees only its own chunk: keys of the first row's chunk through the last row's
        first_chunk = _chunk_start(start_m + DIAGONAL, CHUNK_SIZE)
        last_chunk = _chunk_start(last_row + DIAGONAL, CHUNK_SIZE)
        lo = tl.maximum(lo, first_chunk)
        hi = tl.minimum(hi, last_chunk + CHUNK_SIZE)
        full_lo = tl.maximum(full_lo, last_chunk)
        full_hi = tl.minimum(full_hi, first_chunk + CHUNK_SIZE)
    if CELLS is not None:
        key_cells = CELLS + tl.cdiv(N_Q, MASK_BLOCK) * tl.cdiv(N_K, MASK_BLOCK) + 2 * (start_m // MASK_BLOCK)
        lo = tl.maximum(lo, tl.load(key_cells) * MASK_BLOCK)
        hi = tl.minimum(hi, tl.load(key_cells + 1) * MASK_BLOCK)
        full_lo = tl.maximum(full_lo, lo)
        full_hi = tl.minimum(full_hi, hi)
        lo = lo // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N, hi)
    full_hi = full_lo + (tl.maximum(full_hi - full_lo, 0) // BLOCK_N) * BLOCK_N
    return lo, full_lo, full_hi, hi


@triton.jit
def _tanh(x, ACCURATE: tl.constexpr = False):
    """tanh in fp32 from one exp2, without overflow for large |x|: (1 - e) / (1 + e), e = exp2(-2|x| log2(e)).
    1 - e cancels below |x| ~ 0.55 (e > 1/3), amplifying exp2's rounding by e / (1 - e): ~eps / |x| relative at
    small |x|, where a softcap of 50 puts most scores; far below fp16/bf16 rounding but up to ~100x torch's fp32
    error. ACCURATE (fp32) takes the odd Taylor series to x^17 (Horner in x^2) below |x| = 0.55 instead: its
    truncation is ~0.05 ulp there and each term is under 1/8 of the one before, so rounding stays ~1 ulp (the exp2
    formula above 0.55: ~2 ulps). Not for fp16/bf16, whose tightest builds the series would make spill: they take
    x itself below |x| = 2^-12 (one select), so their error stays ~eps / 2^-12 relative at most."""
    a = tl.abs(x)
    e = tl.math.exp2(a * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    if ACCURATE:
        x2 = x * x
        p = 6404582.0 / 10854718875.0
        p = p * x2 - 929569.0 / 638512875.0
        p = p * x2 + 21844.0 / 6081075.0
        p = p * x2 - 1382.0 / 155925.0
        p = p * x2 + 62.0 / 2835.0
        p = p * x2 - 17.0 / 315.0
        p = p * x2 + 2.0 / 15.0
        p = p * x2 - 1.0 / 3.0
        t = tl.where(a < 0.55, x + x * x2 * p, t)
    else:  # tanh(x) = x to fp32 rounding below 2^-12 (x^2 / 3 < 2^-25), where 1 - e keeps few bits and is 0 below
        # ~2^-26: with a huge cap (1e5 and up, scores far below it) the capped scores were noise, or all 0
        t = tl.where(a < 2.0**-12, x, t)
    return t


@triton.jit
def _scores(qk, rows, cols, visible, qk_scale, cap_log2, slope_log2, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT,
            CHUNK_SIZE, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHUNKED: tl.constexpr,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ACCURATE_TANH: tl.constexpr):
    """(log2-unit scores, tanh of the capped score) of the dot products ``qk``; ``rows``/``cols`` broadcast to
    qk's shape (either orientation). With MASKED, scores outside ``visible``, the causal/window bounds and (CHUNKED)
    the row's attention chunk are -inf. The second result is only meaningful with SOFTCAP (the backward's
    1 - tanh^2). ACCURATE_TANH: :func:`_tanh`'s series below |x| = 0.55 (within ~1 ulp where the exp2 formula
    cancels), for fp32 q (callers pass q.dtype == fp32: interpreted bf16, upcast, takes it too, which only makes it
    more accurate)."""
    s = qk * qk_scale
    t = s
    if SOFTCAP:  # softcap * tanh(s / softcap), in log2 units: cap_log2 = softcap * log2(e)
        t = _tanh(s * (1.0 / cap_log2), ACCURATE_TANH)
        s = t * cap_log2
    if ALIBI:
        s -= slope_log2 * tl.abs(rows + ALIBI_SHIFT - cols).to(tl.float32)
    if MASKED:
        if CAUSAL:
            visible = visible & (cols <= rows + CAUSAL_SHIFT)
        if WINDOW:
            visible = visible & (cols >= rows + WINDOW_SHIFT)
        if CHUNKED:
            chunk = _chunk_start(rows + ALIBI_SHIFT, CHUNK_SIZE)
            visible = visible & (cols >= chunk) & (cols < chunk + CHUNK_SIZE)
        s = tl.where(visible, s, float("-inf"))
        if SOFTCAP:  # a hidden score's p is 0: so is its dS, unless 1 - t^2 is NaN (0 * inf: a padding row or
            # column, read as zeros, against an infinite key or query), which tanh's saturation makes finite in torch
            t = tl.where(visible, t, 0.0)
    return s, t


@triton.jit
def _cells(BLOCK_MASK, stride_mb, stride_mh, b, h):
    """This (batch, query head)'s block-mask summary (block_mask.py), int32: the cell states (QC, KC) row-major
    (0 empty, 1 partial, 2 full; QC = cdiv(N_Q, MASK_BLOCK), KC = cdiv(N_K, MASK_BLOCK)), then per query cell the
    [first, last + 1) of its non-empty key cells (QC, 2), then per key cell that of its query cells (KC, 2)."""
    return BLOCK_MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh


@triton.jit
def _mask_mod_shows(keep, kv_idx):
    """A mask mod's result as a bool tile: nonzero = visible (one meaning wherever a mod is evaluated). Adding
    integer zeros makes a constant result (a Python bool) a tile too, and leaves a float tile float for the check."""
    keep = keep + tl.zeros_like(kv_idx)
    tl.static_assert(keep.dtype.is_int(), "mask_mod must return a bool or int tile")  # bool is int1
    return keep != 0


@triton.jit
def _score_mod_result(value, score):
    """A score mod's (or its grad_fn's) result as an fp32 tile of ``score``'s shape (a mod may return a tile that
    broadcasts to it, such as a per-row value)."""
    tl.static_assert(value.dtype.is_floating(), "score_mod and its grad_fn must return a floating-point tile")
    return tl.broadcast_to(value.to(tl.float32), score.shape)


@triton.jit
def _mod_scores(qk, rows, cols, visible, q_idx, kv_idx, state, b, h, qk_scale, cap_log2, slope_log2, CAUSAL_SHIFT,
                WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, MASK_ARGS, SCORE_ARGS, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHUNKED: tl.constexpr, SOFTCAP: tl.constexpr,
                ALIBI: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr,
                ACCURATE_TANH: tl.constexpr):
    """:func:`_scores` with the user's mods: (log2-unit scores, tanh of the capped score, d score_mod / d score).

    SCORE_MOD(score, b, h, q_idx, kv_idx, *SCORE_ARGS) maps the natural-unit scaled score qk * scale first (before
    softcap and ALiBi); the third result is SCORE_GRAD of the same arguments (qk itself, unused, without it: a
    helper returns no None). MASK_MOD(b, h, q_idx, kv_idx, *MASK_ARGS) hides the scores where it is False, evaluated
    only in a partial cell (``state`` 1) of the block mask: a full cell (2) runs unmasked by it. The mods see
    ``q_idx``/``kv_idx``, the indices clamped into range (so they may index per-position tensors unmasked), in the
    tile's orientation."""
    grad = qk
    if SCORE_MOD is not None:
        score = qk * (qk_scale * LN2)
        if SCORE_GRAD is not None:
            grad = _score_mod_result(SCORE_GRAD(score, b, h, q_idx, kv_idx, *SCORE_ARGS), score)
        qk = _score_mod_result(SCORE_MOD(score, b, h, q_idx, kv_idx, *SCORE_ARGS), score)
        qk_scale = LOG2E
    s, t = _scores(qk, rows, cols, visible, qk_scale, cap_log2, slope_log2, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT,
                   CHUNK_SIZE, MASKED, CAUSAL, WINDOW, CHUNKED, SOFTCAP, ALIBI, ACCURATE_TANH)
    if MASK_MOD is not None:
        if state == 1:
            s = tl.where(_mask_mod_shows(MASK_MOD(b, h, q_idx, kv_idx, *MASK_ARGS), kv_idx), s, float("-inf"))
    return s, t, grad


@triton.jit
def _dropout_keep(seed, offset, bh, rows, cols, dropout_p):
    """Bool keep-mask of dropout over ``rows`` x ``cols`` (broadcast shapes, either orientation) of flat head
    ``bh``: Philox of the element's coordinates, so every kernel and orientation draws the same bits."""
    zero = rows * 0 + cols * 0
    bits, _, _, _ = tl.philox(seed, cols + zero, rows + zero, zero + bh, zero + offset)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _rng(SEED):
    """(seed, offset) of a dropout launch from its int64 pair; the offset is one of Philox's 32-bit counters."""
    return tl.load(SEED), tl.load(SEED + 1).to(tl.int32)


@triton.jit
def _alibi_slope(ALIBI, stride_ab, b, h):
    """The head's ALiBi slope in log2 units (0 without ALiBi)."""
    slope = 0.0
    if ALIBI is not None:
        slope = tl.load(ALIBI + b.to(tl.int64) * stride_ab + h) * LOG2E
    return slope


@triton.jit
def _sequence_diagonal(diagonal, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT):
    """The mask and ALiBi diagonals of a varlen sequence: moved by its own Nk - Nq (bottom-right per sequence)."""
    return CAUSAL_SHIFT + diagonal, WINDOW_SHIFT + diagonal, ALIBI_SHIFT + diagonal


@triton.jit
def _key_block(k_rows, v_rows, start_n, stride_kn, stride_vn, offs_n, kv_hi, MASKED: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """(cols, k, v) of the key block at ``start_n`` in a loop over key blocks: its key indices and its K and V tiles
    (fp32 when UPCAST), zeros from ``kv_hi`` on (:func:`_load_rows`; descriptors made with kv_hi rows)."""
    cols = start_n + offs_n
    k = _load_rows(k_rows, start_n, cols < kv_hi, stride_kn, MASKED, HEAD_DIM, BLOCK_D, TMA)
    v = _load_rows(v_rows, start_n, cols < kv_hi, stride_vn, MASKED, HEAD_DIM, BLOCK_D, TMA)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return cols, k, v


@triton.jit
def _key_block_scores(q, k_rows, v_rows, start_n, stride_kn, stride_vn, offs_m, offs_n, kv_hi, q_idx, state,
                      PAD, b, h, stride_pb, qk_scale, cap_log2, slope_log2, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT,
                      CHUNK_SIZE, MASK_ARGS, SCORE_ARGS, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                      WINDOW: tl.constexpr, CHUNKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr,
                      SCORE_GRAD: tl.constexpr, TMA: tl.constexpr):
    """The forward's and dQ's step over the key block at ``start_n`` for the query tile ``q`` (rows ``offs_m``,
    clamped ``q_idx``): (cols, k, v) as :func:`_key_block`, then (s, t, grad) as :func:`_mod_scores`."""
    cols, k, v = _key_block(k_rows, v_rows, start_n, stride_kn, stride_vn, offs_n, kv_hi, MASKED, HEAD_DIM, BLOCK_D,
                            UPCAST, TMA)
    visible = _keys_visible(PAD, b, stride_pb, cols, kv_hi)[None, :] if MASKED else None
    s, t, grad = _mod_scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), offs_m[:, None], cols[None, :],
                             visible, q_idx[:, None], tl.minimum(cols, kv_hi - 1)[None, :], state, b, h, qk_scale,
                             cap_log2, slope_log2, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, MASK_ARGS,
                             SCORE_ARGS, MASKED, CAUSAL, WINDOW, CHUNKED, SOFTCAP, ALIBI, MASK_MOD, SCORE_MOD,
                             SCORE_GRAD, q.dtype == tl.float32)
    return cols, k, v, s, t, grad


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_rows, v_rows, stride_kn, stride_vn, offs_m, offs_n,
               start, end, kv_hi, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, qk_scale, cap_log2, slope_log2,
               PAD, b, h, stride_pb, seed, rng_offset, off_bh, dropout_p, q_idx, CELLS, MASK_ARGS, SCORE_ARGS,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHUNKED: tl.constexpr,
               SOFTCAP: tl.constexpr,
               ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASK_MOD: tl.constexpr,
               SCORE_MOD: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [start, end); scores in log2 units. CELLS: the
    query cell's row of block-mask cell states, or None."""
    for start_n in range(start, end, BLOCK_N):
        state = 2 if CELLS is None else tl.load(CELLS + start_n // MASK_BLOCK)
        if state != 0:  # an empty cell of the block mask is skipped: its K/V are never loaded
            cols, k, v, s, _, _ = _key_block_scores(
                q, k_rows, v_rows, start_n, stride_kn, stride_vn, offs_m, offs_n, kv_hi, q_idx, state, PAD,
                b, h, stride_pb, qk_scale, cap_log2, slope_log2, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE,
                MASK_ARGS, SCORE_ARGS, MASKED, CAUSAL, WINDOW, CHUNKED, SOFTCAP, ALIBI, HEAD_DIM, BLOCK_D, UPCAST,
                PRECISION, MASK_MOD, SCORE_MOD, None, TMA)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED or MASK_MOD is not None or SCORE_MOD is not None:
                # A row that has seen no key yet still has max -inf: subtract 0 instead so exp2 gives 0, not NaN
                # (a score mod may return -inf too: FlexAttention's way to mask, also in a block needing no mask)
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_sub = m_new
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)  # the undropped sum: lse and the normalisation ignore dropout
            if DROPOUT:
                keep = _dropout_keep(seed, rng_offset, off_bh, offs_m[:, None], cols[None, :], dropout_p)
                p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV_BOUNDS, PAD, ALIBI, SINKS, SEED, CU_SEQLENS_Q, CU_SEQLENS_K, BLOCK_MASK, MASK_ARGS,
              SCORE_ARGS, stride_pb, stride_ab, stride_mb, stride_mh, stride_lb, stride_lh,
              stride_qb, stride_qh, stride_qn, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_on, stride_od,
              H, GROUP, N_Q, N_K, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, qk_scale, softcap, dropout_p,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHUNKED: tl.constexpr, SOFTCAP: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr,
              TMA: tl.constexpr):
    """One program per (query block, batch * head): O (B, H, Nq, D) and LSE (b * stride_lb + h * stride_lh + row)
    natural log, fp32. TMA: Q, K, V and O through tensor descriptors (:func:`_head_rows`)."""
    start_m, off_bh = _program_block(N_Q, BLOCK_M)
    b = off_bh // H
    h = off_bh % H
    q_start, N_Q = _sequence(CU_SEQLENS_Q, b, N_Q)
    k_start, N_K = _sequence(CU_SEQLENS_K, b, N_K)
    if CU_SEQLENS_Q is not None:
        if start_m >= N_Q:  # the grid covers the longest sequence; this one ends before this block
            return
        Q += _row_offset(q_start, stride_qn)
        O += _row_offset(q_start, stride_on)
        LSE += q_start
        K += _row_offset(k_start, stride_kn)
        V += _row_offset(k_start, stride_vn)
        CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT = _sequence_diagonal(N_K - N_Q, CAUSAL_SHIFT, WINDOW_SHIFT,
                                                                     ALIBI_SHIFT)
    kv_h = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q

    # Q and O: pointers at the block's rows, as the kernel always made them (made at row 0 and moved like K/V's,
    # ptxas spills 24-72 B in sm_90's fp32 forward defaults)
    if TMA:
        q = _head_rows(Q, b, h, N_Q, stride_qb, stride_qh, stride_qn, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D,
                       TMA).load([start_m, 0])
    else:
        q = _load_tile(_tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd), row_ok,
                       offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    if not TMA:
        k_rows, v_rows = _key_rows(K, V, b, kv_h, N_K, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                                   stride_vh, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, TMA)
    slope_log2 = _alibi_slope(ALIBI, stride_ab, b, h)
    seed, rng_offset = (0, 0) if SEED is None else _rng(SEED)

    cells = None if BLOCK_MASK is None else _cells(BLOCK_MASK, stride_mb, stride_mh, b, h)
    lo, full_lo, full_hi, hi = _query_block_keys(KV_BOUNDS, b, start_m, N_Q, N_K, CAUSAL_SHIFT, WINDOW_SHIFT,
                                                 ALIBI_SHIFT, CHUNK_SIZE, cells, BLOCK_M, BLOCK_N, CAUSAL, WINDOW,
                                                 CHUNKED, PAD is not None)
    if TMA:  # keys from hi on are never visible to this block: descriptors of hi rows read them as zeros
        k_rows, v_rows = _key_rows(K, V, b, kv_h, hi, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                                   stride_vh, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, TMA)
    q_cells = None if BLOCK_MASK is None else cells + (start_m // MASK_BLOCK) * tl.cdiv(N_K, MASK_BLOCK)
    if SINKS is None:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    else:  # the sink is a key of score sink_h and value 0: it starts the running max and sum
        m_i = tl.full([BLOCK_M], 0.0, tl.float32) + tl.load(SINKS + h) * LOG2E
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for part in tl.static_range(3):  # the masked blocks below the full ones (a window's or chunk's start), full, masked
        if part != 0 or WINDOW or CHUNKED or BLOCK_MASK is not None:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_rows, v_rows, stride_kn, stride_vn, offs_m, offs_n,
                                       (lo, full_lo, full_hi)[part], (full_lo, full_hi, hi)[part], hi,
                                       CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, qk_scale,
                                       softcap * LOG2E, slope_log2, PAD, b, h, stride_pb, seed, rng_offset, off_bh,
                                       dropout_p, tl.minimum(offs_m, N_Q - 1), q_cells, MASK_ARGS, SCORE_ARGS,
                                       part != 1, CAUSAL, WINDOW, CHUNKED, SOFTCAP, ALIBI is not None,
                                       SEED is not None, HEAD_DIM,
                                       BLOCK_D, BLOCK_N, UPCAST, PRECISION, MASK_MOD, SCORE_MOD, TMA)

    # empty where the sum is 0: a NaN sum (NaN or inf in q or a visible key) leaves lse NaN, as torch's math has
    # it, not -inf, which would say that the row saw no key and make the backward drop it
    empty = l_i == 0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    out = cast_rne(out, O.dtype.element_ty)
    if TMA:
        _head_rows(O, b, h, N_Q, stride_ob, stride_oh, stride_on, stride_od, BLOCK_M, HEAD_DIM, BLOCK_D,
                   TMA).store([start_m, 0], out)
    else:
        _store_tile(_tile_ptrs(O, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od), out, row_ok,
                    offs_d, HEAD_DIM)
    tl.store(LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_oh, stride_on, stride_od,
                    stride_dob, stride_doh, stride_don, stride_dod,
                    H, N_Q,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), (B, H, Nq) fp32: the softmax-Jacobian term shared by every key block."""
    start_m, off_bh = _program_block(N_Q, BLOCK_M)
    b = off_bh // H
    h = off_bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    o_ptrs = _tile_ptrs(O, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od)
    do_ptrs = _tile_ptrs(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod)
    o = _load_tile(o_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(do_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * N_Q + offs_m, delta, mask=row_ok)


@triton.jit
def _row_stats(LSE, DELTA, row_base, rows, row_ok):
    """The backward's per-row logsumexp (log2 units, as stored) and delta. Rows past the end and rows that saw no
    key (lse = -inf) get +inf, so exp2(s - lse) = 0 removes them from every gradient."""
    lse = tl.load(LSE + row_base + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _score_grad(p, dp, delta, t, keep, dropout_p, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr):
    """(dS, the probabilities dV takes) from p = softmax, dp = dO v^T and delta, either orientation (``delta``
    broadcast): dS = p * (z * dp - delta) * (1 - t^2 with SOFTCAP) with z the dropout's keep / (1 - p)."""
    p_drop = p
    if DROPOUT:
        z = tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
        p_drop = p * z
        dp = dp * z
    ds = p * (dp - delta)
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds, p_drop


@triton.jit
def _backward_sequence(Q, DO, LSE, DELTA, K, V, q_start, k_start, diagonal, stride_qn, stride_don, stride_kn,
                       stride_vn, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT):
    """A backward varlen program's inputs moved to its sequence: the query side (Q, dO and the per-row LSE and
    DELTA) to row ``q_start``, the key side (K, V) to ``k_start``, and the shifts by the sequence's Nk - Nq."""
    CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT = _sequence_diagonal(diagonal, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT)
    return (Q + _row_offset(q_start, stride_qn), DO + _row_offset(q_start, stride_don), LSE + q_start,
            DELTA + q_start, K + _row_offset(k_start, stride_kn), V + _row_offset(k_start, stride_vn),
            CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT)


@triton.jit
def _key_block_queries(first_col, last_col, q_lo, q_hi, N_Q, CAUSAL_SHIFT, WINDOW_SHIFT, DIAGONAL, CHUNK_SIZE,
                       BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHUNKED: tl.constexpr,
                       ALIGN: tl.constexpr):
    """(m_lo, mid, m_full_end, m_end): query rows [m_lo, m_end) see some key of [first_col, last_col]; [mid,
    m_full_end) see all of them (whole query blocks, unmasked), the rest is masked: rows before mid straddle the
    causal diagonal or a chunk's start, rows from m_full_end on the window's left edge or a chunk's end (CHUNKED:
    row i sees the keys of the chunk holding i + DIAGONAL). Rows outside [q_lo, q_hi) (a block mask's non-empty
    query cells) are not visited; with ALIGN, m_lo is a multiple of BLOCK_M so that every query block lies in one
    cell (rows it adds before the causal diagonal are masked)."""
    m_lo = 0
    if CAUSAL:
        m_lo = tl.maximum(first_col - CAUSAL_SHIFT, 0)
    if CHUNKED:  # the first row whose chunk reaches first_col
        m_lo = tl.maximum(m_lo, _chunk_start(first_col, CHUNK_SIZE) - DIAGONAL)
    m_lo = tl.maximum(tl.minimum(m_lo, N_Q), q_lo)
    if ALIGN:
        m_lo = m_lo // BLOCK_M * BLOCK_M
    mid = m_lo
    if CAUSAL or CHUNKED:
        m_full = m_lo
        if CAUSAL:
            m_full = tl.maximum(m_full, last_col - CAUSAL_SHIFT)
        if CHUNKED:  # the first row whose chunk starts at or before first_col and reaches last_col
            m_full = tl.maximum(m_full, _chunk_start(last_col, CHUNK_SIZE) - DIAGONAL)
        mid = m_lo + tl.cdiv(tl.minimum(m_full, N_Q) - m_lo, BLOCK_M) * BLOCK_M
    # a block with no visible key skips the loops
    m_end = tl.where(first_col <= last_col, tl.maximum(tl.minimum(q_hi, N_Q), m_lo), m_lo)
    if WINDOW:
        m_end = tl.minimum(m_end, tl.maximum(last_col - WINDOW_SHIFT + 1, m_lo))
    if CHUNKED:  # past the last row whose chunk reaches last_col
        m_end = tl.minimum(m_end, tl.maximum(_chunk_start(last_col, CHUNK_SIZE) + CHUNK_SIZE - DIAGONAL, m_lo))
    mid = tl.minimum(mid, m_end)
    m_full_end = m_end
    if WINDOW or CHUNKED:
        full_end = m_end
        if WINDOW:
            full_end = tl.minimum(full_end, first_col - WINDOW_SHIFT + 1)
        if CHUNKED:  # past the last row whose chunk still holds first_col
            full_end = tl.minimum(full_end, _chunk_start(first_col, CHUNK_SIZE) + CHUNK_SIZE - DIAGONAL)
        m_full_end = mid + (tl.maximum(full_end - mid, 0) // BLOCK_M) * BLOCK_M
    return m_lo, mid, m_full_end, m_end


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_rows, do_rows, stride_qn, stride_don, LSE, DELTA, row_base,
                    cols, offs_m, start, end, N_Q, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE,
                    qk_scale, cap_log2, slope_log2, seed, rng_offset, bh, dropout_p, b, h, kv_idx, CELLS,
                    n_k_cells, MASK_ARGS, SCORE_ARGS,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHUNKED: tl.constexpr,
                    SOFTCAP: tl.constexpr,
                    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASK_MOD: tl.constexpr,
                    SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [start, end) of one query head (transposed scores).
    CELLS: the key cell's block-mask cell states (n_k_cells apart), or None."""
    for start_m in range(start, end, BLOCK_M):
        state = 2 if CELLS is None else tl.load(CELLS + (start_m // MASK_BLOCK) * n_k_cells)
        if state != 0:  # an empty cell of the block mask is skipped: its Q/dO are never loaded
            rows = start_m + offs_m
            row_ok = rows < N_Q
            q = _load_rows(q_rows, start_m, row_ok, stride_qn, True, HEAD_DIM, BLOCK_D, TMA)
            do = _load_rows(do_rows, start_m, row_ok, stride_don, True, HEAD_DIM, BLOCK_D, TMA)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse, delta = _row_stats(LSE, DELTA, row_base, rows, row_ok)
            s_t, t_t, g_t = _mod_scores(tl.dot(k, tl.trans(q), input_precision=PRECISION), rows[None, :],
                                        cols[:, None], row_ok[None, :], tl.minimum(rows, N_Q - 1)[None, :], kv_idx,
                                        state, b, h, qk_scale, cap_log2, slope_log2, CAUSAL_SHIFT, WINDOW_SHIFT,
                                        ALIBI_SHIFT, CHUNK_SIZE, MASK_ARGS, SCORE_ARGS, MASKED, CAUSAL, WINDOW,
                                        CHUNKED, SOFTCAP, ALIBI, MASK_MOD, SCORE_MOD, SCORE_GRAD,
                                        q.dtype == tl.float32)
            p_t = tl.math.exp2(s_t - lse[None, :])
            keep_t = _dropout_keep(seed, rng_offset, bh, rows[None, :], cols[:, None], dropout_p) if DROPOUT else None
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t, p_t = _score_grad(p_t, dp_t, delta[None, :], t_t, keep_t, dropout_p, SOFTCAP, DROPOUT)
            if SCORE_MOD is not None:
                ds_t = ds_t * g_t
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV_BOUNDS, PAD, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
                   BLOCK_MASK, MASK_ARGS, SCORE_ARGS, stride_pb, stride_ab, stride_mb, stride_mh, stride_lb, stride_lh,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   H, GROUP, N_Q, N_K, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, qk_scale, sm_scale,
                   softcap, dropout_p,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHUNKED: tl.constexpr, SOFTCAP: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr,
                   SCORE_GRAD: tl.constexpr, TMA: tl.constexpr):
    """One program per (key block, batch * kv head): dK, dV (B, Hkv, Nk, D), contiguous, in the input dtype.
    TMA: the streamed Q and dO tiles through tensor descriptors (:func:`_head_rows`).

    The program owns its key block for every query head of its GQA group, so the group's gradients are summed
    in registers: no atomics, deterministic.
    """
    start_n, off_bh = _program_block(N_K, BLOCK_N)
    h_kv = H // GROUP
    b = off_bh // h_kv
    kv_h = off_bh % h_kv
    q_start, N_Q = _sequence(CU_SEQLENS_Q, b, N_Q)
    k_start, N_K = _sequence(CU_SEQLENS_K, b, N_K)
    if CU_SEQLENS_K is not None:
        if start_n >= N_K:  # the grid covers the longest sequence; this one ends before this block
            return
        Q, DO, LSE, DELTA, K, V, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT = _backward_sequence(
            Q, DO, LSE, DELTA, K, V, q_start, k_start, N_K - N_Q, stride_qn, stride_don, stride_kn, stride_vn,
            CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT)
        DK += _row_offset(k_start, stride_dkn)
        DV += _row_offset(k_start, stride_dkn)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    lo, hi = _key_bounds(KV_BOUNDS, b, N_K)
    col_ok = (cols >= lo) & _keys_visible(PAD, b, stride_pb, cols, hi)
    # A key's dK/dV row depends on that key alone, so hidden keys need no masking inside the loops: they load as
    # zeros (outside [lo, hi)) or as themselves (padding-mask holes), and whatever they accumulate (it may
    # overflow in fp16) is replaced by zeros at the store.
    k_ptrs = _tile_ptrs(K, b, kv_h, cols, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, b, kv_h, cols, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)
    k = _load_tile(k_ptrs, col_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    v = _load_tile(v_ptrs, col_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    seed, rng_offset = (0, 0) if SEED is None else _rng(SEED)

    first_col = tl.maximum(start_n, lo)
    last_col = tl.minimum(start_n + BLOCK_N, hi) - 1
    if BLOCK_MASK is None:
        m_lo, mid, m_full_end, m_end = _key_block_queries(first_col, last_col, 0, N_Q, N_Q, CAUSAL_SHIFT,
                                                          WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, BLOCK_M, CAUSAL,
                                                          WINDOW, CHUNKED, False)
    n_k_cells = tl.cdiv(N_K, MASK_BLOCK)
    kv_idx = tl.minimum(cols, N_K - 1)[:, None]

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        q_rows = _head_rows(Q, b, h, N_Q, stride_qb, stride_qh, stride_qn, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, TMA)
        do_rows = _head_rows(DO, b, h, N_Q, stride_dob, stride_doh, stride_don, stride_dod, BLOCK_M, HEAD_DIM,
                             BLOCK_D, TMA)
        bh = b * H + h
        row_base = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
        slope_log2 = _alibi_slope(ALIBI, stride_ab, b, h)
        cells = None
        if BLOCK_MASK is not None:  # this head's mask: only its key cell's non-empty query cells are visited
            head_cells = _cells(BLOCK_MASK, stride_mb, stride_mh, b, h)
            cells = head_cells + start_n // MASK_BLOCK
            q_cells = head_cells + tl.cdiv(N_Q, MASK_BLOCK) * (n_k_cells + 2) + 2 * (start_n // MASK_BLOCK)
            m_lo, mid, m_full_end, m_end = _key_block_queries(
                first_col, last_col, tl.load(q_cells) * MASK_BLOCK, tl.load(q_cells + 1) * MASK_BLOCK, N_Q,
                CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, BLOCK_M, CAUSAL, WINDOW, CHUNKED, True)
        for part in tl.static_range(3):  # masked (causal diagonal, chunk start), full, masked (window, chunk end)
            if (part != 0 or CAUSAL or CHUNKED) and (part != 2 or WINDOW or CHUNKED):
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_rows, do_rows, stride_qn, stride_don, LSE, DELTA,
                                         row_base, cols, offs_m, (m_lo, mid, m_full_end)[part],
                                         (mid, m_full_end, m_end)[part], N_Q, CAUSAL_SHIFT, WINDOW_SHIFT,
                                         ALIBI_SHIFT, CHUNK_SIZE, qk_scale, softcap * LOG2E, slope_log2, seed,
                                         rng_offset, bh, dropout_p, b, h, kv_idx, cells, n_k_cells, MASK_ARGS,
                                         SCORE_ARGS, part != 1, CAUSAL, WINDOW, CHUNKED, SOFTCAP, ALIBI is not None,
                                         SEED is not None, HEAD_DIM,
                                         BLOCK_D, BLOCK_M, UPCAST, PRECISION, MASK_MOD, SCORE_MOD, SCORE_GRAD,
                                         TMA)

    dk = tl.where(col_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(col_ok[:, None], dv, 0.0)
    dk_ptrs = _tile_ptrs(DK, b, kv_h, cols, offs_d, stride_dkb, stride_dkh, stride_dkn, stride_dkd)
    dv_ptrs = _tile_ptrs(DV, b, kv_h, cols, offs_d, stride_dkb, stride_dkh, stride_dkn, stride_dkd)  # same layout
    _store_tile(dk_ptrs, cast_rne(dk, DK.dtype.element_ty), cols < N_K, offs_d, HEAD_DIM)
    _store_tile(dv_ptrs, cast_rne(dv, DV.dtype.element_ty), cols < N_K, offs_d, HEAD_DIM)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_rows, v_rows, stride_kn, stride_vn, offs_m, offs_n,
                  start, end, kv_hi, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, qk_scale, cap_log2,
                  slope_log2, PAD, b, h, stride_pb, seed, rng_offset, off_bh, dropout_p, q_idx, CELLS, MASK_ARGS,
                  SCORE_ARGS, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  CHUNKED: tl.constexpr, SOFTCAP: tl.constexpr,
                  ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASK_MOD: tl.constexpr,
                  SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end) (CELLS as in :func:`_fwd_inner`)."""
    for start_n in range(start, end, BLOCK_N):
        state = 2 if CELLS is None else tl.load(CELLS + start_n // MASK_BLOCK)
        if state != 0:  # an empty cell of the block mask is skipped: its K/V are never loaded
            cols, k, v, s, t, g = _key_block_scores(
                q, k_rows, v_rows, start_n, stride_kn, stride_vn, offs_m, offs_n, kv_hi, q_idx, state, PAD,
                b, h, stride_pb, qk_scale, cap_log2, slope_log2, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE,
                MASK_ARGS, SCORE_ARGS, MASKED, CAUSAL, WINDOW, CHUNKED, SOFTCAP, ALIBI, HEAD_DIM, BLOCK_D, UPCAST,
                PRECISION, MASK_MOD, SCORE_MOD, SCORE_GRAD, TMA)
            p = tl.math.exp2(s - lse[:, None])
            keep = _dropout_keep(seed, rng_offset, off_bh, offs_m[:, None], cols[None, :], dropout_p) if DROPOUT \
                else None
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds, _ = _score_grad(p, dp, delta[:, None], t, keep, dropout_p, SOFTCAP, DROPOUT)
            if SCORE_MOD is not None:
                ds = ds * g
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_BOUNDS, PAD, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
                 BLOCK_MASK, MASK_ARGS, SCORE_ARGS, stride_pb, stride_ab, stride_mb, stride_mh, stride_lb, stride_lh,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                 H, GROUP, N_Q, N_K, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, qk_scale, sm_scale, softcap,
                 dropout_p,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHUNKED: tl.constexpr, SOFTCAP: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr,
                 SCORE_GRAD: tl.constexpr, TMA: tl.constexpr):
    """One program per (query block, batch * head): dQ (B, H, Nq, D), contiguous, in the input dtype. TMA: the
    streamed K and V tiles through tensor descriptors (:func:`_head_rows`)."""
    start_m, off_bh = _program_block(N_Q, BLOCK_M)
    b = off_bh // H
    h = off_bh % H
    q_start, N_Q = _sequence(CU_SEQLENS_Q, b, N_Q)
    k_start, N_K = _sequence(CU_SEQLENS_K, b, N_K)
    if CU_SEQLENS_Q is not None:
        if start_m >= N_Q:  # the grid covers the longest sequence; this one ends before this block
            return
        Q, DO, LSE, DELTA, K, V, CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT = _backward_sequence(
            Q, DO, LSE, DELTA, K, V, q_start, k_start, N_K - N_Q, stride_qn, stride_don, stride_kn, stride_vn,
            CAUSAL_SHIFT, WINDOW_SHIFT, ALIBI_SHIFT)
        DQ += _row_offset(q_start, stride_dqn)
    kv_h = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    q_ptrs = _tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
    do_ptrs = _tile_ptrs(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod)
    q = _load_tile(q_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(do_ptrs, row_ok, offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse, delta = _row_stats(LSE, DELTA, b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh, offs_m, row_ok)
    if not TMA:
        k_rows, v_rows = _key_rows(K, V, b, kv_h, N_K, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                                   stride_vh, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, TMA)
    slope_log2 = _alibi_slope(ALIBI, stride_ab, b, h)
    seed, rng_offset = (0, 0) if SEED is None else _rng(SEED)

    cells = None if BLOCK_MASK is None else _cells(BLOCK_MASK, stride_mb, stride_mh, b, h)
    lo, full_lo, full_hi, hi = _query_block_keys(KV_BOUNDS, b, start_m, N_Q, N_K, CAUSAL_SHIFT, WINDOW_SHIFT,
                                                 ALIBI_SHIFT, CHUNK_SIZE, cells, BLOCK_M, BLOCK_N, CAUSAL, WINDOW,
                                                 CHUNKED, PAD is not None)
    if TMA:
        k_rows, v_rows = _key_rows(K, V, b, kv_h, hi, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                                   stride_vh, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, TMA)
    q_cells = None if BLOCK_MASK is None else cells + (start_m // MASK_BLOCK) * tl.cdiv(N_K, MASK_BLOCK)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for part in tl.static_range(3):  # as in the forward: masked below the full blocks, full, masked
        if part != 0 or WINDOW or CHUNKED or BLOCK_MASK is not None:
            dq = _bwd_dq_inner(dq, q, do, lse, delta, k_rows, v_rows, stride_kn, stride_vn, offs_m, offs_n,
                               (lo, full_lo, full_hi)[part], (full_lo, full_hi, hi)[part], hi, CAUSAL_SHIFT,
                               WINDOW_SHIFT, ALIBI_SHIFT, CHUNK_SIZE, qk_scale, softcap * LOG2E, slope_log2, PAD, b,
                               h, stride_pb, seed, rng_offset, off_bh, dropout_p, tl.minimum(offs_m, N_Q - 1),
                               q_cells, MASK_ARGS, SCORE_ARGS, part != 1, CAUSAL, WINDOW, CHUNKED, SOFTCAP,
                               ALIBI is not None, SEED is not None,
                               HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION, MASK_MOD, SCORE_MOD, SCORE_GRAD,
                               TMA)
    _store_tile(_tile_ptrs(DQ, b, h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd),
                cast_rne(dq * sm_scale, DQ.dtype.element_ty), row_ok, offs_d, HEAD_DIM)


@triton.jit
def _dropout_mask(SEED, MASK, N_Q, N_K, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (B, H, Nq, Nk) uint8 keep-mask (1 = kept) that the attention kernels draw from the same SEED."""
    start_m, off_bh = _program_block(N_Q, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)
    seed, rng_offset = _rng(SEED)
    row_ptrs = MASK + (off_bh.to(tl.int64) * N_Q + rows)[:, None] * N_K
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, rng_offset, off_bh, rows[:, None], cols[None, :], dropout_p)
        tl.store(row_ptrs + cols[None, :], keep.to(tl.uint8), mask=(rows < N_Q)[:, None] & (cols < N_K)[None, :])


@triton.jit
def _block_mask_cells(STATE, MASK_ARGS, H, N_Q, N_K, MASK_MOD: tl.constexpr, CHUNK: tl.constexpr):
    """One program per (query cell, batch * head): STATE (B * H, QC, KC) int32, the state of every
    MASK_BLOCK x MASK_BLOCK cell of MASK_MOD(b, h, q_idx, kv_idx, *MASK_ARGS) within [0, N_Q) x [0, N_K): 0 if it
    hides every pair, 2 if it shows every pair, else 1. Evaluated CHUNK query rows at a time."""
    q_start, bh = _program_block(N_Q, MASK_BLOCK)
    b = bh // H
    h = bh % H
    n_k_cells = tl.cdiv(N_K, MASK_BLOCK)
    row_ptr = STATE + (bh.to(tl.int64) * tl.cdiv(N_Q, MASK_BLOCK) + q_start // MASK_BLOCK) * n_k_cells
    for kc in range(0, n_k_cells):
        cols = kc * MASK_BLOCK + tl.arange(0, MASK_BLOCK)
        kv_idx = tl.minimum(cols, N_K - 1)[None, :]
        shown = 0
        hidden = 0
        for r in tl.static_range(0, MASK_BLOCK, CHUNK):
            rows = q_start + r + tl.arange(0, CHUNK)
            inside = (rows < N_Q)[:, None] & (cols < N_K)[None, :]
            keep = _mask_mod_shows(MASK_MOD(b, h, tl.minimum(rows, N_Q - 1)[:, None], kv_idx, *MASK_ARGS), kv_idx)
            shown += tl.sum(tl.sum((inside & keep).to(tl.int32), 1), 0)
            hidden += tl.sum(tl.sum((inside & ~keep).to(tl.int32), 1), 0)
        tl.store(row_ptr + kc, tl.where(shown == 0, 0, tl.where(hidden == 0, 2, 1)))
