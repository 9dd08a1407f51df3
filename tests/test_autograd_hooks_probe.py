"""Autograd machinery around the ops: saved-tensors hooks (what each op saves, and layouts a hook hands back),
activation checkpointing with dropout, double backward, partial gradients, odd grad_out layouts, hooks on tensors
and modules, anomaly mode and grad-mode mixtures."""
import functools

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import kernels
from kernels import reference
from kernels.flash_attn import flash_attn_func

B, H, HKV, N, D = 1, 2, 1, 8, 8
CU = (0, 3, 8)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grad_out(out):
    """A fixed, non-uniform incoming gradient."""
    return torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()


def _qkv(layout="heads_first"):
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, HKV, N, D), torch.randn(B, HKV, N, D)
    return [t.transpose(1, 2).contiguous() if layout == "seq_first" else t for t in (q, k, v)]


_ATTENTION_OPS = {
    "attention": (lambda q, k, v: kernels.attention(q, k, v, causal=True), "heads_first"),
    "flash_attn_func": (lambda q, k, v: flash_attn_func(q, k, v, causal=True), "seq_first"),
    "attention_varlen": (lambda q, k, v: kernels.attention_varlen(
        q[0], k[0], v[0], torch.tensor(CU, dtype=torch.int32), torch.tensor(CU, dtype=torch.int32), 5, 5,
        causal=True), "seq_first"),
}


def _run(op, inputs, pack=None, unpack=lambda t: t):
    """(out, grads) of ``op`` on fresh leaves, under a saved-tensors hook pair when ``pack`` is given."""
    leaves = _leaves(*inputs)
    if pack is None:
        out = op(*leaves)
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = op(*leaves)
    out.backward(_grad_out(out))
    return [out.detach(), *(t.grad for t in leaves)]


def _assert_same(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ saved-tensors hooks


def _relaid(t):
    """``t``'s values in another memory layout (last dim no longer unit-stride): what a hook may hand back."""
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() >= 2 and t.shape[-1] > 1 else t


@pytest.mark.parametrize("name", list(_ATTENTION_OPS))
def test_saved_lse_in_another_layout_gives_the_same_gradients(name):
    # regression: the backward passed only lse's batch/head strides to the kernels (rows read at unit stride),
    # so a saved-tensors hook returning lse (or any saved tensor) in another layout gave wrong dq, dk, dv
    op, layout = _ATTENTION_OPS[name]
    inputs = _qkv(layout)
    _assert_same(_run(op, inputs, pack=_relaid), _run(op, inputs))


def test_saved_lse_in_another_layout_under_torch_compile(fresh_dynamo):
    # the traced backward's custom op gets the lse the hook hands back at run time, not the traced one's layout
    op = torch.compile(_ATTENTION_OPS["attention"][0], backend="aot_eager", fullgraph=True)
    inputs = _qkv()
    _assert_same(_run(op, inputs, pack=_relaid), _run(op, inputs))


def test_attention_saves_only_inputs_output_and_lse():
    """FA2: q, k, v, out and the (B, H, Nq) lse, nothing quadratic in the sequence."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    q, k, v = _leaves(*_qkv())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.attention(q, k, v, causal=True)
    assert saved == [((B, H, N, D), torch.float32), ((B, HKV, N, D), torch.float32), ((B, HKV, N, D), torch.float32),
                     ((B, H, N, D), torch.float32), ((B, H, N), torch.float32)]
    saved.clear()
    x = torch.randn(4, D, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.softmax(x)
    assert saved == [((4, D), torch.float32)]  # y alone


@pytest.mark.parametrize("context", ["save_on_cpu", "disable_hooks", "dtype_roundtrip"])
def test_hooks_leave_attention_unchanged(context):
    inputs = _qkv()
    op = _ATTENTION_OPS["attention"][0]
    expected = _run(op, inputs)
    if context == "dtype_roundtrip":
        got = _run(op, inputs, pack=lambda t: (t.dtype, t.double() if t.is_floating_point() else t),
                   unpack=lambda p: p[1].to(p[0]))
    else:
        manager = (torch.autograd.graph.save_on_cpu(pin_memory=False) if context == "save_on_cpu"
                   else torch.autograd.graph.disable_saved_tensors_hooks("off"))
        with manager:
            got = _run(op, inputs)
    _assert_same(got, expected)


def test_norm_and_attention_under_allow_mutation_on_saved_tensors():
    inputs = _qkv()
    expected = _run(lambda q, k, v: kernels.attention(q * 1, k, v * 1), inputs)
    leaves = _leaves(*inputs)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        a, c = leaves[0] * 1, leaves[2] * 1
        out = kernels.attention(a, leaves[1], c)
        a.add_(5)  # the backward must read the values the forward saw
        c.mul_(3)
        out.backward(_grad_out(out))
    _assert_same([t.grad for t in leaves], expected[1:])


def test_inplace_change_of_a_saved_tensor_raises():
    q, k, v = _leaves(*_qkv())
    out = kernels.attention(q, k, v * 1)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# --------------------------------------------------------------------------------------------- checkpointing


def _dropout_block(q, k, v):
    return kernels.rms_norm(kernels.attention(q * 2, k, v, causal=True, dropout_p=0.3), D)


@pytest.mark.parametrize("how", ["reentrant", "non_reentrant", "selective"])
def test_checkpoint_recomputes_the_same_dropout_mask(how):
    inputs = _qkv()

    def run(wrap):
        leaves = _leaves(*inputs)
        torch.manual_seed(7)
        out = wrap(*leaves)
        torch.rand(10)  # the generator moves on before the backward's recomputation
        out.backward(_grad_out(out))
        return [out.detach(), *(t.grad for t in leaves)]

    options = {"reentrant": dict(use_reentrant=True), "non_reentrant": dict(use_reentrant=False),
               "selective": dict(use_reentrant=False, context_fn=functools.partial(
                   create_selective_checkpoint_contexts, lambda *_, **__: CheckpointPolicy.PREFER_RECOMPUTE))}[how]
    expected = run(_dropout_block)
    _assert_same(run(lambda *a: checkpoint(_dropout_block, *a, **options)), expected)
    assert not torch.equal(expected[0], _dropout_block(*inputs))  # dropout on: another seed, another output


def test_checkpoint_dropout_flash_attn_and_varlen():
    q, k, v = _qkv("seq_first")
    cu = torch.tensor(CU, dtype=torch.int32)
    for op in (lambda q, k, v: flash_attn_func(q, k, v, dropout_p=0.25, causal=True),
               lambda q, k, v: kernels.attention_varlen(q[0], k[0], v[0], cu, cu, 5, 5, dropout_p=0.25)):
        results = []
        for wrap in (op, lambda *a: checkpoint(op, *a, use_reentrant=False)):
            torch.manual_seed(3)
            leaves = _leaves(q, k, v)
            out = wrap(*leaves)
            torch.rand(3)
            out.backward(_grad_out(out))
            results.append([out.detach(), *(t.grad for t in leaves)])
        _assert_same(*results)


# ------------------------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("name", list(_ATTENTION_OPS))
def test_attention_double_backward_raises_naming_the_op(name):
    op, layout = _ATTENTION_OPS[name]
    leaves = _leaves(*_qkv(layout))
    grads = torch.autograd.grad(op(*leaves).square().sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="kernels.attention: its backward is not differentiable"):
        torch.autograd.grad(grads[0].square().sum(), leaves)


def test_create_graph_first_order_values_and_unrelated_second_order():
    q, k, v = _leaves(*_qkv())
    x = torch.randn(3, requires_grad=True)
    grads = torch.autograd.grad(kernels.attention(q, k, v).square().sum() + x.pow(3).sum(), (q, k, v, x),
                                create_graph=True)
    plain = torch.autograd.grad(kernels.attention(q, k, v).square().sum(), (q, k, v))
    _assert_same(grads[:3], plain)
    torch.testing.assert_close(torch.autograd.grad(grads[3].sum(), x)[0], 6 * x.detach())


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "layer_norm", "add_rms_norm"])
def test_row_ops_double_backward_matches_float64(name):
    x0, w0, b0, r0 = torch.randn(5, D), torch.randn(D), torch.randn(D), torch.randn(5, D)
    ops = {"softmax": lambda x, w, b, r: kernels.softmax(x, causal=True, scale=0.7),
           "log_softmax": lambda x, w, b, r: kernels.log_softmax(x),
           "layer_norm": lambda x, w, b, r: kernels.layer_norm(x, D, w, b),
           "add_rms_norm": lambda x, w, b, r: sum(kernels.add_rms_norm(x, r, D, w))}

    def second(dtype):
        args = [t.to(dtype).requires_grad_() for t in (x0, w0, b0, r0)]
        out = ops[name](*args)
        firsts = torch.autograd.grad(out.pow(3).sum(), args, create_graph=True, allow_unused=True)
        return torch.autograd.grad(sum(g.pow(3).sum() for g in firsts if g is not None), args, allow_unused=True)

    for got, expected in zip(second(torch.float32), second(torch.float64)):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_gradgradcheck_float64():
    q, k, v = (torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[True, True, False, True]])
    assert torch.autograd.gradgradcheck(lambda q, k, v, s: kernels.attention(
        q, k, v, causal=True, sinks=s, key_padding_mask=pad, window_size=(1, 0), softcap=3.0), (q, k, v, sinks))
    assert torch.autograd.gradgradcheck(lambda x: kernels.softmax(x, causal=True, scale=0.7), (q,))


# ------------------------------------------------------------------------ partial gradients, layouts, hooks


@pytest.mark.parametrize("wanted", [(True, False, False), (False, False, True), (False, True, True)])
def test_gradients_for_some_inputs_only(wanted):
    inputs = _qkv()
    leaves = [t.clone().requires_grad_(w) for t, w in zip(inputs, wanted)]
    refs = [t.double().requires_grad_(w) for t, w in zip(inputs, wanted)]
    kernels.attention(*leaves, causal=True).sum().backward()  # dO: a stride-0 expand
    reference.attention(*refs, causal=True).sum().backward()
    for t, r, w in zip(leaves, refs, wanted):
        assert (t.grad is None) == (not w)
        if w:
            torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


def test_view_leaves_and_strided_grad_out():
    base = torch.randn(B, N, H, D, requires_grad=True)
    k_row = torch.randn(B, HKV, 1, D, requires_grad=True)
    v_wide = torch.randn(B, HKV, N, 2 * D, requires_grad=True)
    grad = torch.randn(B, H, 1, D).expand(B, H, N, D)  # stride 0 along the rows
    out = kernels.attention(base.transpose(1, 2), k_row.expand(B, HKV, N, D), v_wide[..., ::2], causal=True)
    out.backward(grad)
    refs = [t.detach().double().requires_grad_() for t in (base, k_row, v_wide)]
    reference.attention(refs[0].transpose(1, 2), refs[1].expand(B, HKV, N, D), refs[2][..., ::2],
                        causal=True).backward(grad.double())
    for t, r in zip((base, k_row, v_wide), refs):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


def test_retain_graph_and_tensor_hooks():
    q, k, v = _leaves(*_qkv())
    seen = []
    q.register_hook(lambda g: g * 2)
    v.register_hook(lambda g: seen.append("v"))
    out = kernels.attention(q, k, v, causal=True)
    out.register_hook(lambda g: seen.append("out"))
    out.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (q, k, v)]
    out.sum().backward()
    assert seen == ["out", "v", "out", "v"]
    for t, g in zip((q, k, v), first):
        torch.testing.assert_close(t.grad, 2 * g)
    plain = _leaves(q)[0]
    kernels.attention(plain, k.detach(), v.detach(), causal=True).sum().backward()
    torch.testing.assert_close(first[0], 2 * plain.grad)  # the hook's doubling reached the accumulated grad
    unused = torch.randn(2, requires_grad=True)
    assert torch.autograd.grad(kernels.attention(q, k, v).sum(), (q, unused), allow_unused=True)[1] is None


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("module", [kernels.LayerNorm, kernels.RMSNorm])
def test_norm_module_backward_hooks_and_weight_only_grad(module):
    norm = module(D)
    calls = []
    norm.register_full_backward_pre_hook(lambda m, grad_out: calls.append("pre"))
    norm.register_full_backward_hook(lambda m, grad_in, grad_out: calls.append(grad_in[0] is None) or (None,))
    x = torch.randn(4, D)
    norm(x).sum().backward()  # x needs no gradient: the weight's alone
    assert calls == ["pre", True] and norm.weight.grad is not None
    x.requires_grad_()
    norm(x).sum().backward()
    assert calls[2:] == ["pre", False] and x.grad is None  # the hook replaced grad_input with None


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_anomaly_mode_and_grad_mode_mixtures():
    q, k, v = _leaves(*_qkv())
    with torch.autograd.detect_anomaly(check_nan=True):
        kernels.attention(q, k, v, causal=True).sum().backward()
        kernels.layer_norm(q, D).sum().backward()
    with torch.no_grad():
        assert kernels.attention(q, k, v).grad_fn is None
        with torch.enable_grad():
            assert kernels.attention(q, k, v).requires_grad
    with torch.inference_mode():
        frozen = kernels.attention(q, k, v)
    assert frozen.is_inference() and not frozen.requires_grad
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        kernels.attention(frozen, k, v)
