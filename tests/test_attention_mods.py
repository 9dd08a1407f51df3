"""User mask/score mods and block masks (kernels/attention/block_mask.py, mods.py) against float64 math.

Forward errors may be 2x, gradient errors 3x what PyTorch itself makes in the same precision (tests/tolerance.py).
Shapes are small and awkward (lengths past one 128-cell, odd head dims, GQA, Nq != Nk): the interpreter is slow.
"""
import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import reference
from kernels.attention import block_mask, configs, ops
from tolerance import BACKWARD, FORWARD, assert_close

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
_REFERENCE = reference.attention  # captured at import: attention_kernel_only replaces reference.attention


@triton.jit
def _window(b, h, q_idx, kv_idx, left, right, shift):
    """flash-attn's window (left, right) around the diagonal i + shift, as a mask mod."""
    return (kv_idx >= q_idx + shift - left) & (kv_idx <= q_idx + shift + right)


@triton.jit
def _hide_first_rows(b, h, q_idx, kv_idx, rows):
    """Queries below ``rows`` see nothing; the others every key but those of the second 128-key cell."""
    return (q_idx >= rows) & ((kv_idx < 128) | (kv_idx >= 256))


@triton.jit
def _first_cell(b, h, q_idx, kv_idx):
    return kv_idx < 128


def _qkv(b, h, h_kv, n_q, n_k, d, dtype, device):
    return [torch.randn(b, heads, n, d, dtype=dtype, device=device).requires_grad_()
            for heads, n in ((h, n_q), (h_kv, n_k), (h_kv, n_k))]


def _check(q, k, v, dense_mask, kernel_kwargs, ref_kwargs=None):
    """Kernel out, lse and dq, dk, dv against float64 with ``dense_mask`` (bool, broadcastable to (B, H, Nq, Nk))
    and the reference's ``ref_kwargs``, torch in q's dtype as the noise; returns the kernel's (out, grads)."""
    ref_kwargs = ref_kwargs or {}
    grad_out = torch.randn_like(q)
    out, lse = kernels.attention(q, k, v, return_lse=True, **kernel_kwargs)
    runs = []
    for dtype in (q.dtype, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = _REFERENCE(*leaves, mask=dense_mask, return_lse=True, **ref_kwargs)
        runs.append((ref_out, ref_lse, torch.autograd.grad((ref_out * grad_out.to(dtype)).sum(), leaves)))
    (low_out, low_lse, low_grads), (exact_out, exact_lse, exact_grads) = runs
    assert_close(out, exact_out, low_out, FORWARD)
    empty = torch.isneginf(exact_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert_close(lse[~empty], exact_lse[~empty], low_lse.float()[~empty], FORWARD, name="lse")
    grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
    for name, grad, exact, low in zip(("dq", "dk", "dv"), grads, exact_grads, low_grads):
        assert_close(grad, exact, low, BACKWARD, name=name)
    return out, grads


def _documents(lengths, device):
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                   torch.tensor(lengths)).to(device)


def test_document_mask_with_causal_gqa_matches_float64(attention_kernel_only, device):
    """fp16, GQA, D = 40, three documents over two 128-cells (empty, partial and full cells), causal."""
    doc = _documents([100, 120, 50], device)
    q, k, v = _qkv(1, 2, 1, 270, 270, 40, FP16, device)
    dense = (doc[:, None] == doc[None, :]) & reference.causal_mask(270, 270, device)
    _check(q, k, v, dense, dict(causal=True, mask_mod=kernels.document_mask(doc)))


def test_prefix_lm_per_batch_matches_float64(attention_kernel_only, device):
    """bf16, B = 2 with prefixes 140 and 7 (the mod reads a per-batch tensor), D = 24."""
    prefix = torch.tensor([140, 7], dtype=torch.int32, device=device)
    q, k, v = _qkv(2, 1, 1, 150, 150, 24, BF16, device)
    j, i = torch.arange(150, device=device), torch.arange(150, device=device)[:, None]
    dense = ((j <= i) | (j < prefix[:, None, None]))[:, None]
    _check(q, k, v, dense, dict(mask_mod=kernels.prefix_lm_mask(prefix)))


def test_mods_compose_with_every_variant(attention_kernel_only, device):
    """fp32, Nq != Nk, GQA: a mask mod and a score mod (softcap) with a window, ALiBi, sinks-free padding."""
    q, k, v = _qkv(2, 2, 1, 140, 300, 9, FP32, device)
    padding = torch.ones(2, 300, dtype=torch.bool, device=device)
    padding[1, 250:] = False
    j, i = torch.arange(300, device=device), torch.arange(140, device=device)[:, None]
    dense = ((i >= 5) & ((j < 128) | (j >= 256)))[None, None] & padding[:, None, None, :]
    slopes = torch.tensor([0.1, 0.02], device=device)
    _check(q, k, v, dense,
           dict(mask_mod=kernels.MaskMod(_hide_first_rows, 5), score_mod=kernels.softcap_score(2.0),
                key_padding_mask=padding, window_size=(200, 30), alibi_slopes=slopes),
           dict(softcap=2.0, window_size=(200, 30), alibi_slopes=slopes))


@pytest.mark.parametrize("builtin,as_mod", [
    (dict(window_size=(40, 7)), lambda n_q, n_k: dict(mask_mod=kernels.MaskMod(_window, 40, 7, n_k - n_q))),
    (dict(softcap=0.7), lambda n_q, n_k: dict(score_mod=kernels.softcap_score(0.7))),
    (dict(alibi_slopes=torch.tensor([0.3, 0.05])),
     lambda n_q, n_k: dict(score_mod=kernels.alibi_score(torch.tensor([0.3, 0.05]), n_k - n_q))),
])
def test_builtin_variants_equal_the_same_written_as_mods(attention_kernel_only, device, builtin, as_mod):
    """Same output and gradients (to fp32 rounding) from the built-in variant and the mod computing it."""
    q, k, v = _qkv(1, 2, 2, 131, 150, 16, FP32, device)
    builtin = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in builtin.items()}
    results = []
    for kwargs in (builtin, as_mod(131, 150)):
        out = kernels.attention(q, k, v, causal=True, **kwargs)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_document_mask_equals_varlen(attention_kernel_only, device):
    """Packed documents under a document mask are attention_varlen of the same tokens (causal per document)."""
    lengths = [60, 130, 3, 40]
    doc = _documents(lengths, device)
    q, k, v = _qkv(1, 2, 2, 233, 233, 16, FP16, device)
    masked = kernels.attention(q, k, v, mask_mod=kernels.document_mask(doc))
    cu = torch.tensor([0, 60, 190, 193, 233], dtype=torch.int32, device=device)
    packed = kernels.attention_varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, cu, 130, 130)
    torch.testing.assert_close(masked[0].transpose(0, 1), packed, atol=2e-3, rtol=2e-3)


def test_block_mask_is_built_once_and_reused_by_the_backward(attention_kernel_only, monkeypatch, device):
    """A BlockMask is summarised once (create_block_mask); calls given it never evaluate the summary again, and
    the backward reads the forward's summary tensor; a bare mod is summarised once per call, not in backward."""
    builds, summaries = [], []
    create, backward = block_mask.create_block_mask, ops.attention_backward
    monkeypatch.setattr(block_mask, "create_block_mask", lambda *a, **kw: builds.append(1) or create(*a, **kw))
    monkeypatch.setattr(ops, "attention_backward", lambda *a: summaries.append(a[7].block_mask) or backward(*a))
    mod = kernels.MaskMod(_hide_first_rows, 3)
    mask = block_mask.create_block_mask(mod, None, None, 40, 300)
    q, k, v = _qkv(1, 2, 1, 40, 300, 8, FP32, device)
    for _ in range(2):  # reused across calls (e.g. layers)
        kernels.attention(q, k, v, mask_mod=mask).sum().backward()
    assert len(builds) == 1
    assert all(s.data_ptr() == mask.summary.data_ptr() for s in summaries) and len(summaries) == 2
    kernels.attention(q, k, v, mask_mod=mod).sum().backward()
    assert len(builds) == 2


def test_block_mask_states(device):
    """Cells are empty/partial/full as the dense mask says; per-batch masks differ, B/H None broadcast."""
    prefix = torch.tensor([130, 0], dtype=torch.int32, device=device)
    mask = kernels.create_block_mask(kernels.prefix_lm_mask(prefix), 2, None, 300, 260, device=device)
    assert mask.states().shape == (2, 1, 3, 3)
    j, i = torch.arange(260, device=device), torch.arange(300, device=device)[:, None]
    dense = (j <= i) | (j < prefix[:, None, None])
    cells = torch.nn.functional.pad(dense, (0, 384 - 260, 0, 384 - 300)).unflatten(1, (3, 128)).unflatten(3, (3, 128))
    inside = torch.nn.functional.pad(torch.ones(300, 260, dtype=torch.bool, device=device),
                                     (0, 384 - 260, 0, 384 - 300)).unflatten(0, (3, 128)).unflatten(2, (3, 128))
    shown = (cells & inside).any(4).any(2)
    full = (cells | ~inside).all(4).all(2)
    expected = torch.where(full, 2, torch.where(shown, 1, 0)).int()
    assert torch.equal(mask.states()[:, 0], expected)
    doc = kernels.create_block_mask(kernels.document_mask(_documents([128, 128], device)), None, None, 256, 256)
    assert doc.states().tolist() == [[[[2, 0], [0, 2]]]]


def test_empty_cells_are_never_read(attention_kernel_only, device):
    """K/V rows of cells the mask hides entirely are NaN: nothing propagates, as if they were not there (they
    would poison every output and gradient if loaded), and their dK/dV are zeros."""
    q, k, v = _qkv(1, 2, 1, 70, 300, 16, FP32, device)
    with torch.no_grad():
        k[:, :, 128:] = float("nan")
        v[:, :, 128:] = float("nan")
    out = kernels.attention(q, k, v, mask_mod=_first_cell)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    short = [t[:, :, :128].detach().clone().requires_grad_() for t in (k, v)]
    want = kernels.attention(q, *short)
    torch.testing.assert_close(out, want)
    want_grads = torch.autograd.grad(want.sum(), (q, *short))
    torch.testing.assert_close(dq, want_grads[0])
    torch.testing.assert_close(dk[:, :, :128], want_grads[1])
    assert torch.equal(dk[:, :, 128:], torch.zeros_like(dk[:, :, 128:])) and torch.equal(dv[:, :, 128:], dk[:, :, 128:])


def test_rows_the_mask_hides_give_zeros(attention_kernel_only, device):
    """Queries that see no key: zeros, lse -inf, zero gradients, never NaN (also with a sink: lse = sink)."""
    q, k, v = _qkv(1, 1, 1, 20, 40, 8, FP16, device)
    out, lse = kernels.attention(q, k, v, return_lse=True, mask_mod=kernels.MaskMod(_hide_first_rows, 6))
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6])) and torch.isneginf(lse[:, :, :6]).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.equal(dq[:, :, :6], 0 * dq[:, :, :6])
    sinks = torch.tensor([0.5], device=device)
    out, lse = kernels.attention(q, k, v, return_lse=True, sinks=sinks, mask_mod=kernels.MaskMod(_hide_first_rows, 6))
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    torch.testing.assert_close(lse[0, 0, :6], sinks.expand(6))


@triton.jit
def _minus_inf_before(score, b, h, q_idx, kv_idx, first_key, hidden_rows):
    return tl.where((kv_idx >= first_key) & (q_idx >= hidden_rows), score, float("-inf"))


@triton.jit
def _minus_inf_before_grad(score, b, h, q_idx, kv_idx, first_key, hidden_rows):
    return tl.where((kv_idx >= first_key) & (q_idx >= hidden_rows), 1.0, 0.0)


@pytest.mark.parametrize("first_key,hidden_rows", [(70, 0), (0, 3)])
def test_a_score_mod_returning_minus_inf_masks_as_in_flex_attention(attention_kernel_only, device, first_key, hidden_rows):
    """FlexAttention masks in a score_mod with -inf. Where a row's first key block (which needs no mask) came out
    all -inf, its running max stayed -inf and exp2(-inf - -inf) made the row NaN (out, lse, dq, dk); keys 70.. of
    80 hid the first block of every row, and rows the mod hides entirely must give zeros. Now the masked
    reference's values within the rule."""
    q, k, v = _qkv(1, 2, 1, 20, 80, 16, torch.float32, device)
    visible = (torch.arange(80, device=device) >= first_key) & (torch.arange(20, device=device)[:, None] >= hidden_rows)
    mod = kernels.ScoreMod(_minus_inf_before, _minus_inf_before_grad, first_key, hidden_rows)
    out, _ = _check(q, k, v, visible, dict(score_mod=mod))
    assert torch.equal(out[:, :, :hidden_rows], torch.zeros_like(out[:, :, :hidden_rows]))


@triton.jit
def _times_square(score, b, h, q_idx, kv_idx, w):
    return score + kv_idx * w * w * 1e-12


@triton.jit
def _one(score, b, h, q_idx, kv_idx, w):
    return score * 0.0 + 1.0


def test_a_float_scalar_stays_a_float_after_an_equal_int(attention_kernel_only, device):
    """Mods are registered by their scalars' values, and 50000 == 50000.0 in Python: a float mod made after the
    int one ran with the int, whose int32 product kv_idx * w * w overflows. Scalars now key by type and exact
    value (0.0 and -0.0 too)."""
    q, k, v = _qkv(1, 1, 1, 8, 8, 16, torch.float32, device)
    as_int = kernels.ScoreMod(_times_square, _one, 50000)
    as_float = kernels.ScoreMod(_times_square, _one, 50000.0)
    assert as_int.key != as_float.key
    assert kernels.ScoreMod(_times_square, _one, 0.0).key != kernels.ScoreMod(_times_square, _one, -0.0).key
    assert kernels.ScoreMod(_times_square, _one, 50000.0).key == as_float.key  # equal mods still share a key
    bias = torch.arange(8, device=device, dtype=torch.float64) * 50000.0 ** 2 * 1e-12
    want = _REFERENCE(*(t.detach().double() for t in (q, k, v)), mask=bias.expand(8, 8))
    torch.testing.assert_close(kernels.attention(q, k, v, score_mod=as_float).double(), want, rtol=1e-5, atol=1e-5)


def test_compiles_with_fullgraph(attention_kernel_only, device):
    """torch.compile(fullgraph=True): the mods pass through the custom ops as registry keys and tensor lists."""
    q, k, v = _qkv(1, 2, 1, 30, 140, 16, FP32, device)
    doc = _documents([70, 70], device)
    mask = kernels.create_block_mask(kernels.document_mask(doc), None, None, 30, 140)
    score = kernels.alibi_score(torch.tensor([0.2, 0.1], device=device))

    def f(q, k, v):
        return kernels.attention(q, k, v, mask_mod=mask, score_mod=score, dropout_p=0.0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    eager = f(q, k, v)
    torch.testing.assert_close(out, eager)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(eager.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


@triton.jit
def _two_extra(b, h, q_idx, kv_idx, A, n):
    return q_idx >= 0


def _bad_cases(device):
    other = block_mask.create_block_mask(_first_cell, None, None, 5, 6)
    mod = kernels.MaskMod(_first_cell)
    return [
        (dict(mask_mod=lambda b, h, i, j: i >= j), TypeError, "mask_mod"),
        (dict(mask_mod="causal"), TypeError, "mask_mod"),
        (dict(mask_mod=block_mask.create_block_mask(_first_cell, 2, None, 5, 5)), ValueError, "mask_mod"),
        (dict(mask_mod=other), ValueError, "mask_mod"),
        (dict(mask_mod=block_mask.BlockMask(mod, (None, None, 5, 5), torch.device("meta"), other.summary)),
         ValueError, "mask_mod"),
        (dict(score_mod=_first_cell), TypeError, "score_mod"),
    ]


def test_bad_mod_arguments_raise_before_launch(attention_kernel_only, monkeypatch, device):
    cases = _bad_cases(device)
    monkeypatch.setattr(configs, "launch", None)  # a launch would fail otherwise
    q = torch.randn(1, 2, 5, 8, device=device)
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            kernels.attention(q, q, q, **kwargs)
    with pytest.raises(TypeError, match="mask_mod"):  # arity: 4 + the extras
        kernels.MaskMod(_two_extra, torch.zeros(1))
    with pytest.raises(TypeError, match="mask_mod"):
        kernels.MaskMod(_two_extra, torch.zeros(1), "3")
    with pytest.raises(TypeError, match="score_mod"):
        kernels.ScoreMod(_first_cell, _first_cell)
    with pytest.raises(TypeError, match="doc_ids"):
        kernels.document_mask(torch.zeros(4))
    with pytest.raises(ValueError, match="Nq"):
        kernels.create_block_mask(_first_cell, None, None, -1, 4)


@triton.jit
def _hide_first_rows_as_twos(b, h, q_idx, kv_idx, rows):
    """:func:`_hide_first_rows` as ints 0/2 (any nonzero int means visible)."""
    return tl.where((q_idx >= rows) & ((kv_idx < 128) | (kv_idx >= 256)), 2, 0)


@triton.jit
def _always(b, h, q_idx, kv_idx):
    return True


@triton.jit
def _float_mask(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx).to(tl.float32)


@triton.jit
def _int_score(score, b, h, q_idx, kv_idx):
    return kv_idx - q_idx


@triton.jit
def _row_zero(score, b, h, q_idx, kv_idx):
    """One zero per query row, a (BLOCK_M, 1) tile: every key gets the same score, so uniform attention."""
    return q_idx.to(tl.float32) * 0.0


@triton.jit
def _first_head_sees_all(b, h, q_idx, kv_idx):
    return (h == 0) | (kv_idx <= q_idx)


def test_int_mask_mod_results_mean_nonzero_is_visible(attention_kernel_only, device):
    """A mod returning 0/2 masks as the same mod returning bools, in the block mask and in the kernels, and
    matches float64 (its cells were all empty, so zeros, when the summary combined the ints bitwise)."""
    q, k, v = _qkv(1, 2, 1, 20, 300, 8, FP32, device)
    twos = kernels.MaskMod(_hide_first_rows_as_twos, 3)
    bools = kernels.MaskMod(_hide_first_rows, 3)
    assert torch.equal(kernels.create_block_mask(twos, 1, 2, 20, 300).states(),
                       kernels.create_block_mask(bools, 1, 2, 20, 300).states())
    j, i = torch.arange(300, device=device), torch.arange(20, device=device)[:, None]
    dense = (i >= 3) & ((j < 128) | (j >= 256))
    out, _ = _check(q, k, v, dense, dict(mask_mod=twos))
    want = kernels.attention(q, k, v, mask_mod=bools)
    assert torch.equal(out, want) and out[:, :, 3:].abs().amax() > 0


def test_a_mask_mod_returning_a_constant_shows_everything(attention_kernel_only, device):
    """A constant result (a Python bool, not a tile) is one: every cell full, the plain attention's output."""
    q, k, v = _qkv(1, 2, 1, 20, 30, 8, FP32, device)
    assert (kernels.create_block_mask(_always, 1, 2, 20, 30).states() == 2).all()
    _check(q, k, v, torch.ones(20, 30, dtype=torch.bool, device=device), dict(mask_mod=_always))


def test_float_mask_mod_is_a_type_error_naming_it(attention_kernel_only, device):
    q = torch.randn(1, 1, 9, 8, device=device)
    with pytest.raises(TypeError, match="mask_mod _float_mask must return a bool or int"):
        kernels.create_block_mask(_float_mask, None, None, 9, 9)
    with pytest.raises(TypeError, match="_float_mask"):
        kernels.attention(q, q, q, mask_mod=_float_mask)


def test_score_mod_results_must_be_float_and_broadcast(attention_kernel_only, device):
    """An int score is a TypeError naming the score mod (the kernels' build-time check; it surfaced as nested
    InterpreterErrors); a per-row score broadcasts to every key (uniform attention here, as the float64 reference
    with scale 0)."""
    q, k, v = _qkv(1, 2, 1, 19, 37, 8, FP32, device)
    with pytest.raises(TypeError, match=r"score_mod _int_score \(or its grad_fn\) must return a floating-point tile"):
        kernels.attention(q, k, v, score_mod=kernels.ScoreMod(_int_score, _int_score))
    _check(q, k, v, None, dict(score_mod=kernels.ScoreMod(_row_zero, _row_zero)), dict(scale=0.0))


def test_extra_tensors_shorter_than_the_call_raise(attention_kernel_only, monkeypatch, device):
    """doc_ids shorter than Nq/Nk (or than B), prefix_lengths shorter than B, slopes shorter than H: ValueError
    naming the tensor and the length needed, before any launch (the kernels would read past their ends)."""
    q = torch.randn(2, 3, 9, 8, device=device)
    k = torch.randn(2, 3, 11, 8, device=device)
    ids = torch.zeros(10, dtype=torch.int32, device=device)
    per_batch = torch.zeros(1, 11, dtype=torch.int32, device=device)
    one_row = kernels.create_block_mask(kernels.document_mask(per_batch), None, None, 9, 11)  # for batch 1 only
    monkeypatch.setattr(configs, "launch", None)
    monkeypatch.setattr(block_mask, "_block_mask_cells", None)
    cases = [(dict(mask_mod=kernels.document_mask(ids)), "doc_ids .* kv_idx and needs length >= Nk = 11"),
             (dict(mask_mod=kernels.document_mask(per_batch)), "doc_ids .* b and needs length >= B = 2"),
             (dict(mask_mod=kernels.prefix_lm_mask(torch.zeros(1, dtype=torch.int32, device=device))),
              "prefix_lengths .* B = 2"),
             (dict(score_mod=kernels.alibi_score(torch.ones(2, device=device))), "slopes .* H = 3")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            kernels.attention(q, k, k, **kwargs)
    with pytest.raises(ValueError, match="doc_ids .* q_idx and needs length >= Nq = 12"):
        kernels.create_block_mask(kernels.document_mask(ids), None, None, 12, 4)
    with pytest.raises(ValueError, match="doc_ids .* B = 2"):
        kernels.attention(q, k, k, mask_mod=one_row)
    with pytest.raises(ValueError, match="index_dims"):
        kernels.MaskMod(_two_extra, ids, 3, index_dims={"n": ("b",)})
    with pytest.raises(ValueError, match="index_dims"):
        kernels.MaskMod(_two_extra, ids, 3, index_dims={"A": ("b", "h")})
    with pytest.raises(ValueError, match="index_dims"):
        kernels.MaskMod(_two_extra, ids, 3, index_dims={"A": ("batch",)})


def test_broadcast_block_mask_of_a_batch_or_head_dependent_mod_raises(device):
    """B=None / H=None with a mod whose cells differ at b = 1 / h = 1: ValueError (its rows would be wrong);
    the same mods with B / H given, and b-independent mods with B=None, build."""
    prefix = torch.tensor([140, 7], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="B=None .* _prefix_lm"):
        kernels.create_block_mask(kernels.prefix_lm_mask(prefix), None, 1, 150, 150)
    with pytest.raises(ValueError, match="H=None .* _first_head_sees_all"):
        kernels.create_block_mask(_first_head_sees_all, 1, None, 150, 150)
    assert kernels.create_block_mask(_first_head_sees_all, None, 2, 150, 150).states().shape == (1, 2, 2, 2)
    same = kernels.prefix_lm_mask(torch.tensor([140, 140], dtype=torch.int32, device=device))
    assert kernels.create_block_mask(same, None, None, 150, 150).states().shape == (1, 1, 2, 2)


def test_block_mask_on_a_device_the_kernels_do_not_run_on_raises(device):
    with pytest.raises(ValueError, match="device=meta"):
        kernels.create_block_mask(_first_cell, None, None, 5, 6, device="meta")
    assert kernels.create_block_mask(_first_cell, 0, None, 5, 6).states().shape == (0, 1, 1, 1)
