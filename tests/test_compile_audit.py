"""Attention as a user compiles and exports it: a scale that varies from call to call, torch.export with a
dynamic sequence length, flash-attn's return_attn_probs under fullgraph, no warning from dynamo, and how often
dynamic shapes and packed offsets recompile. Compiled results equal eager ones exactly (the same launches)."""
import warnings

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (a @triton.jit function needs it in scope)

import kernels
from kernels import flash_attn
from kernels.attention import block_mask, checks, ops
from kernels.attention.plan import VariantTensors, attention_variant


def _exact(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _compiled_versions(fn) -> int:
    """How many compiled versions of ``fn`` dynamo holds: 1 unless something recompiled."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__))


def _qkv(device, n_q=5, n_k=5, requires_grad=False):
    """q (2, 4, n_q, 8), k, v (2, 2, n_k, 8) float32: GQA, odd lengths."""
    shapes = ((2, 4, n_q, 8), (2, 2, n_k, 8), (2, 2, n_k, 8))
    return [torch.randn(*s, device=device, requires_grad=requires_grad) for s in shapes]


_SCALED = {
    "attention": lambda q, k, v, scale: kernels.attention(q, k, v, causal=True, scale=scale),
    "sdpa": lambda q, k, v, scale: kernels.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                        enable_gqa=True),
    "flash_attn_func": lambda q, k, v, scale: flash_attn.flash_attn_func(
        *(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=scale, causal=True),
}


@pytest.mark.parametrize("entry", sorted(_SCALED))
def test_a_scale_that_varies_compiles_in_one_graph(entry, device):
    """Dynamo makes a float argument that changed symbolic (automatic dynamic): the scale check traces on it
    (it called math.isfinite, which dynamo cannot put in a graph: fullgraph failed at the second scale)."""
    torch._dynamo.reset()
    fn = _SCALED[entry]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    q, k, v = _qkv(device)
    for scale in (0.25, 0.5, 0.75):
        _exact(compiled(q, k, v, scale), fn(q, k, v, scale))


class _Block(torch.nn.Module):
    """A projection, attention (causal, GQA) and an RMS norm: what a user exports."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.norm = kernels.RMSNorm(8)

    def forward(self, x, kv):
        return self.norm(kernels.attention(self.proj(x), kv, kv, causal=True))


def test_export_with_a_dynamic_sequence_length(device):
    """torch.export (non-strict: the Python runs on symbolic sizes) with dynamic lengths: the variant's memo
    hashed the symbolic Nk - Nq (TypeError: unhashable SymInt). The program runs at other lengths as eager."""
    model = _Block().to(device)
    x, kv = torch.randn(2, 4, 5, 8, device=device), torch.randn(2, 2, 7, 8, device=device)
    n_q, n_k = torch.export.Dim("n_q", min=2, max=64), torch.export.Dim("n_k", min=2, max=64)
    program = torch.export.export(model, (x, kv), dynamic_shapes={"x": {2: n_q}, "kv": {2: n_k}})
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "kernels.flash_attention_forward.default" in ops
    for lengths in ((5, 7), (9, 4), (3, 11)):
        x, kv = torch.randn(2, 4, lengths[0], 8, device=device), torch.randn(2, 2, lengths[1], 8, device=device)
        _exact(program.module()(x, kv), model(x, kv))


class _Packed(torch.nn.Module):
    def forward(self, q, k, v, cu_seqlens):
        return kernels.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, 16, 16, causal=True)


def test_export_of_varlen_with_a_dynamic_token_count(device):
    """torch.export with a dynamic token count: clamping max_seqlen (16) to the count guarded the count to below
    16 ('Constraints violated'); while compiling the grid takes max_seqlen as given, as flash-attn's does."""
    q, k, v = (torch.randn(11, 2, 8, device=device) for _ in range(3))
    cu = torch.tensor([0, 5, 11], dtype=torch.int32, device=device)
    tokens = torch.export.Dim("tokens", min=2, max=1024)
    program = torch.export.export(_Packed(), (q, k, v, cu), dynamic_shapes={
        "q": {0: tokens}, "k": {0: tokens}, "v": {0: tokens}, "cu_seqlens": None})
    for total in (11, 14, 30):  # 30: past max_seqlen, as two sequences of 15
        q, k, v = (torch.randn(total, 2, 8, device=device) for _ in range(3))
        cu = torch.tensor([0, total // 2, total], dtype=torch.int32, device=device)
        _exact(program.module()(q, k, v, cu), _Packed()(q, k, v, cu))


def test_flash_attn_return_attn_probs_without_dropout_compiles_fullgraph(device):
    """return_attn_probs=True without dropout (for softmax_lse) read the generator's state on the host first,
    which dynamo cannot trace (a graph break: fullgraph failed); only dropout's S_dmask needs it."""
    torch._dynamo.reset()
    q, k, v = (t.transpose(1, 2) for t in _qkv(device, n_q=5, n_k=6))
    cu = torch.tensor([0, 3, 7, 9], dtype=torch.int32, device=device)
    packed = [torch.randn(9, h, 8, device=device) for h in (4, 2, 2)]

    def dense(q, k, v):
        return flash_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)

    def varlen(q, k, v, cu):
        return flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True, return_attn_probs=True)

    for fn, args in ((dense, (q, k, v)), (varlen, (*packed, cu))):
        (out, lse, s_dmask), (want_out, want_lse, _) = torch.compile(fn, fullgraph=True, backend="aot_eager")(
            *args), fn(*args)
        _exact(out, want_out)
        _exact(lse, want_lse)
        assert s_dmask is None


def test_compiling_attention_and_varlen_warns_nothing(device, monkeypatch):
    """Dynamo warned on every process's first compile that it traced past the variants' (and the row ops'
    DTensor lookup's) lru_cache."""
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # dynamo warns once per process
    torch._dynamo.reset()
    q, k, v = _qkv(device)
    cu = torch.tensor([0, 3, 7, 9], dtype=torch.int32, device=device)
    packed = [torch.randn(9, h, 8, device=device) for h in (4, 2, 2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(lambda q, k, v: kernels.attention(q, k, v, causal=True), fullgraph=True,
                      backend="aot_eager")(q, k, v)
        torch.compile(lambda q, k, v, cu: kernels.attention_varlen(q, k, v, cu, cu, 4, 4), fullgraph=True,
                      backend="aot_eager")(*packed, cu)
        torch.compile(lambda x: kernels.rms_norm(kernels.softmax(x), (8,)), fullgraph=True,
                      backend="aot_eager")(torch.randn(3, 8, device=device))
    assert [str(w.message) for w in caught if "lru_cache" in str(w.message)] == []


def test_dynamic_lengths_compile_once_forward_and_backward(device):
    """dynamic=True: three sequence lengths (with a padding mask, sinks and a window) share one graph, and
    outputs and gradients equal eager's."""
    torch._dynamo.reset()
    sinks = torch.randn(4, device=device, requires_grad=True)

    def fn(q, k, v, mask):
        return kernels.attention(q, k, v, causal=True, key_padding_mask=mask, sinks=sinks, window_size=(3, 0))

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (5, 8, 11):
        q, k, v = _qkv(device, n_q=n, n_k=n + 2, requires_grad=True)
        mask = torch.arange(n + 2, device=device) < torch.tensor([[n], [n + 2]], device=device)
        got, want = compiled(q, k, v, mask), fn(q, k, v, mask)
        _exact(got, want)
        for g, w in zip(torch.autograd.grad(got.square().sum(), (q, k, v, sinks)),
                        torch.autograd.grad(want.square().sum(), (q, k, v, sinks))):
            _exact(g, w)
    assert _compiled_versions(fn) == 1


def test_new_packed_offsets_do_not_recompile(device):
    """cu_seqlens are device tensors: new boundaries (same batch and total) reuse the graph."""
    torch._dynamo.reset()
    packed = [torch.randn(9, h, 8, device=device) for h in (4, 2, 2)]

    def fn(q, k, v, cu):
        return kernels.attention_varlen(q, k, v, cu, cu, 9, 9, causal=True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for offsets in ([0, 3, 7, 9], [0, 1, 1, 9], [0, 5, 8, 9]):
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        _exact(compiled(*packed, cu), fn(*packed, cu))
    assert _compiled_versions(fn) == 1


def _op_cases(device):
    """(name, q, k, v, VariantTensors, AttentionVariant) for the attention ops: flash-attn's layout (transposed
    views) with GQA, a key padding mask and sinks; packed sequences with ALiBi."""
    def seq_first(heads, n):
        return torch.randn(2, n, heads, 5, device=device, requires_grad=True).transpose(1, 2)

    q, k, v = seq_first(4, 3), seq_first(2, 6), seq_first(2, 6)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.uint8, device=device)
    dense = VariantTensors(kv_bounds=torch.tensor([[0, 6], [1, 4]], dtype=torch.int32, device=device), pad=pad,
                           sinks=torch.randn(4, device=device, requires_grad=True))
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32, device=device)
    packed = [torch.randn(8, heads, 5, device=device, requires_grad=True).transpose(0, 1)[None] for heads in (4, 2, 2)]
    offsets = VariantTensors(alibi_slopes=torch.rand(4, device=device), cu_seqlens_q=cu, cu_seqlens_k=cu)
    return (("dense", q, k, v, dense, attention_variant(True, 3, 0.4, 2, 0, 0, 5.0)),
            ("packed", *packed, offsets, attention_variant(True, 0, 0.4, -1, -1, 0, 0.0, 0.0, -1, -1, 5, 5)))


def test_attention_ops_pass_opcheck(device):
    """The ops torch.compile and torch.export put in graphs: schema, fake (shapes, dtypes, strides against the
    launches') and autograd registration, forward and backward (with an lse gradient)."""
    for name, q, k, v, tensors, variant in _op_cases(device):
        args = ops._flat(tensors, variant)
        torch.library.opcheck(ops._forward_op, (q, k, v, *args))
        out, lse = ops._forward_op(q, k, v, *args)
        # the backward op runs inside the forward's backward, on tensors that need no grad (first-order kernels)
        saved = [t.detach() for t in (q, k, v, out, lse)]
        detached = ops._flat(VariantTensors(*(t if t is None else t.detach() for t in tensors)), variant)
        torch.library.opcheck(ops._backward_op, (torch.randn_like(out), *saved, torch.randn_like(lse), *detached))


@triton.jit
def _band(b, h, q_idx, kv_idx, width):
    return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < width)


def test_a_mask_mod_whose_block_mask_is_built_per_call_compiles(device):
    """A MaskMod (not a BlockMask) builds its block mask in each call, by a launch dynamo could not trace
    (fullgraph failed on Triton's launch lock): the launch is a custom op while tracing. One graph for three
    lengths under dynamic=True, forward and backward equal to eager."""
    torch._dynamo.reset()
    band = kernels.MaskMod(_band, 3)

    def fn(q, k, v):
        return kernels.attention(q, k, v, mask_mod=band)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (5, 9, 12):
        q, k, v = _qkv(device, n_q=n, n_k=n, requires_grad=True)
        got, want = compiled(q, k, v), fn(q, k, v)
        _exact(got, want)
        for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
            _exact(g, w)
    assert _compiled_versions(fn) == 1


def test_a_mask_mod_made_inside_the_compiled_function(device, monkeypatch):
    """document_mask(ids) per step inside a compiled model: the registry entry a new mod adds is made at once
    (dynamo replayed the traced append after the graph, whose kernels had already looked the key up: IndexError).
    Registering is a graph break (fullgraph needs the mod made outside); the results equal eager ones."""
    monkeypatch.setattr(block_mask, "_REGISTRY", [])  # a fresh registry: the mod is new to it
    monkeypatch.setattr(block_mask, "_KEYS", {})
    monkeypatch.setattr(checks, "_PROBED", set())  # (keyed by registry index: the fresh registry's own)
    torch._dynamo.reset()

    def fn(q, k, v, doc_ids):
        return kernels.attention(q, k, v, causal=True, mask_mod=kernels.document_mask(doc_ids))

    compiled = torch.compile(fn, backend="aot_eager")
    q, k, v = _qkv(device, n_q=9, n_k=9)
    for ids in ([0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 2]):
        doc_ids = torch.tensor(ids, dtype=torch.int32, device=device)
        _exact(compiled(q, k, v, doc_ids), fn(q, k, v, doc_ids))
