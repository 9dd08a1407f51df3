"""A user's probe of the baselines (kernels.reference), the launch-config seam (kernels.registry) and the public
ops under torch.func / torch.compile: regressions for what it found."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import kernels
from kernels import reference
from kernels.flash_attn import flash_attn_func
from kernels.registry import forced_config, use_config


# ------------------------------------------------------------------------------------------- kernels.reference


def _qkv(heads=2, kv_heads=1, n_q=5, n_k=7, d=8, dtype=torch.float64):
    return (torch.randn(1, heads, n_q, d, dtype=dtype), torch.randn(1, kv_heads, n_k, d, dtype=dtype),
            torch.randn(1, kv_heads, n_k, d, dtype=dtype))


@pytest.mark.parametrize("shapes", [
    ((1, 1, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)),   # more kv heads than query heads: was an empty (1, 0, 4, 8) output
    ((2, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8)),   # batch 1 k/v broadcast to q's batch
    ((1, 4, 8), (1, 4, 8), (1, 4, 8)),            # 3-D
    ((1, 3, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)),   # H not a multiple of Hkv
])
def test_reference_attention_refuses_shapes_it_would_broadcast(shapes):
    q, k, v = (torch.randn(s, dtype=torch.float64) for s in shapes)
    with pytest.raises(ValueError, match="attention: q"):
        reference.attention(q, k, v)


def test_reference_attention_refuses_bad_variant_arguments():
    q, k, v = _qkv(heads=1)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):  # was a (5, 1, 5, 8) output
        reference.attention(q, k, v, alibi_slopes=torch.rand(5))
    with pytest.raises(ValueError, match="sinks must have shape"):  # was a (1, 5, 5, 8) output
        reference.attention(q, k, v, sinks=torch.rand(5))
    with pytest.raises(TypeError, match="mask must be bool"):  # an int 0/1 mask was added to the scores
        reference.attention(q, k, v, mask=torch.ones(5, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="softcap must be >= 0"):  # was silently no cap
        reference.attention(q, k, v, softcap=-1.0)
    with pytest.raises(TypeError, match="window_size must be a pair"):
        reference.attention(q, k, v, window_size=3)
    with pytest.raises(TypeError, match="one dtype"):
        reference.attention(q, k.float(), v.float())


def test_reference_attention_float_mask_of_another_dtype_is_added_as_torchs_sdpa_adds_it():
    q, k, v = _qkv(heads=2, kv_heads=2, dtype=torch.float32)
    bias = torch.randn(5, 7, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.float())
    torch.testing.assert_close(reference.attention(q, k, v, mask=bias), expected)  # was a matmul dtype error


def test_reference_norms_refuse_parameters_and_shapes_torch_refuses():
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight must have shape"):  # a (1,) weight broadcast silently
        reference.layer_norm(x, (4,), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias must have shape"):
        reference.layer_norm(x, (4,), None, torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight must have shape"):
        reference.rms_norm(x, (4,), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="normalized_shape"):  # () normalised over every dim
        reference.layer_norm(x, ())
    with pytest.raises(ValueError, match="normalized_shape"):
        reference.rms_norm(x, (2, 3, 4))


def test_reference_softmax_of_a_scalar_and_causal_on_one_dim():
    x = torch.tensor(2.0, dtype=torch.float64)
    assert torch.equal(reference.softmax(x), F.softmax(x, 0))  # was an IndexError
    with pytest.raises(ValueError, match="at least 2 dims"):  # was an IndexError
        reference.softmax(torch.randn(5), causal=True)


def test_reference_and_kernel_agree_bottom_right_for_nq_not_nk():
    """Both documented bottom-right (flash-attn), not torch SDPA's top-left: rows that see nothing are zeros."""
    for n_q, n_k in ((3, 8), (8, 3)):
        q, k, v = _qkv(heads=2, kv_heads=1, n_q=n_q, n_k=n_k, dtype=torch.float32)
        expected = reference.attention(q.double(), k.double(), v.double(), causal=True, window_size=(2, -1))
        out = kernels.attention(q, k, v, causal=True, window_size=(2, -1))
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
        assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- kernels.registry


def test_use_config_refuses_unknown_kernels_and_keys_before_any_launch():
    with pytest.raises(ValueError, match="kernel must be one of"):  # a typo was ignored without a word
        with use_config("attention_forward", BLOCK_M=16, BLOCK_N=16):
            pass
    with pytest.raises(ValueError, match="kernel must be one of"):  # no row launcher reads a forced config
        with use_config("_softmax_fwd", BLOCK=16):
            pass
    for config, error in (({"BLOCK_Q": 16, "BLOCK_N": 16}, ValueError),   # was KeyError 'BLOCK_M' at launch
                          ({"BLOCK_M": 16}, ValueError),                 # was a TypeError inside Triton
                          ({"BLOCK_M": 48, "BLOCK_N": 16}, ValueError),  # was an InterpreterError at launch
                          ({"BLOCK_M": 16, "BLOCK_N": 16, "TMA": 1}, TypeError)):
        with pytest.raises(error, match="use_config"):
            with use_config("attention_fwd", **config):
                pass
    assert forced_config("attention_fwd") is None
    with use_config("attention_decode", BLOCK_N=32):  # decoding takes a partial config over its table
        assert forced_config("attention_decode") == {"BLOCK_N": 32}


# ------------------------------------------------------------------------------- torch.func / torch.compile


def _rows(x):
    return kernels.softmax(x) + kernels.log_softmax(x) + kernels.layer_norm(x, (5,)) + kernels.rms_norm(x, (5,))


def _torch_rows(x):
    return F.softmax(x, -1) + F.log_softmax(x, -1) + F.layer_norm(x, (5,)) + F.rms_norm(x, (5,))


def test_batched_gradients_through_the_row_kernels():
    """is_grads_batched=True and jacobian(vectorize=True) run the backward on (legacy) batched gradients; so does
    torch.func.vmap over autograd.grad (functorch's): the launch raised 'Cannot access storage of
    BatchedTensorImpl'."""
    x = torch.randn(3, 5)
    expected = torch.autograd.functional.jacobian(_torch_rows, x)
    torch.testing.assert_close(torch.autograd.functional.jacobian(_rows, x, vectorize=True), expected)
    leaf = x.clone().requires_grad_()
    y = _rows(leaf)
    basis = torch.eye(15).reshape(15, 3, 5)
    by_engine = torch.autograd.grad(y, leaf, basis, retain_graph=True, is_grads_batched=True)[0]
    by_vmap = torch.func.vmap(lambda g: torch.autograd.grad(y, leaf, g, retain_graph=True)[0])(basis)
    for got in (by_engine, by_vmap):
        torch.testing.assert_close(got.reshape(3, 5, 3, 5), expected)


def test_batched_gradients_through_attention_with_lse_and_sinks():
    q, k, _ = _qkv(heads=2, kv_heads=1, n_q=3, n_k=4, d=4, dtype=torch.float32)
    sinks = torch.randn(2)

    def flat(attention):
        return lambda q, k, s: torch.cat([t.flatten() for t in attention(q, k, k, causal=True, sinks=s,
                                                                         return_lse=True)])

    got = torch.autograd.functional.jacobian(flat(kernels.attention), (q, k, sinks), vectorize=True)
    expected = torch.autograd.functional.jacobian(flat(reference.attention), (q, k, sinks))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_torch_func_grad_of_attention():
    """torch.compile of torch.func.grad: the custom op got functorch's wrappers ('must override the
    setup_context' error); it now runs the reference's torch ops there, as eager torch.func does."""
    q, k, v = _qkv(heads=2, kv_heads=1, n_q=4, n_k=4, d=8, dtype=torch.float32)

    def loss(attention):
        return lambda q: attention(q, k, v, causal=True).pow(2).sum()

    got = torch.compile(torch.func.grad(loss(kernels.attention)), backend="aot_eager", fullgraph=True)(q)
    torch.testing.assert_close(got, torch.func.grad(loss(reference.attention))(q), atol=1e-5, rtol=1e-4)


def test_plain_compile_still_runs_the_kernels_custom_op():
    """The functorch check above must not send torch.compile's own tracing to the reference."""
    q, k, v = _qkv(heads=2, kv_heads=1, n_q=4, n_k=4, d=8, dtype=torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda q: kernels.attention(q, k, v, causal=True), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(q), reference.attention(q, k, v, causal=True), atol=1e-5, rtol=1e-4)
    assert any("flash_attention_forward" in str(node.target) for gm in graphs for node in gm.graph.nodes)


# ------------------------------------------------------------------------------------------------- make_fx


@pytest.mark.parametrize("op", [
    lambda x: kernels.attention(x, x, x, causal=True),
    lambda x: flash_attn_func(x, x, x, causal=True),
    lambda x: kernels.softmax(x),
    lambda x: kernels.rms_norm(x, 8),
], ids=["attention", "flash_attn_func", "softmax", "rms_norm"])
def test_make_fx_records_torchs_ops_where_a_launch_cannot_be_traced(op):
    """make_fx's proxy mode cannot see into a Triton launch (it failed on 'argument of type UntypedStorage'): the
    ops record their torch-op fallback, and the graph replays eager's result."""
    x = torch.randn(1, 3, 5, 8)
    graph = make_fx(op)(x)
    torch.testing.assert_close(graph(x), op(x), atol=1e-5, rtol=1e-5)
    y = torch.randn(1, 3, 5, 8)
    torch.testing.assert_close(graph(y), op(y), atol=1e-5, rtol=1e-5)  # recorded ops, not the traced values


@pytest.mark.parametrize("op", [kernels.softmax, lambda x: kernels.layer_norm(x, (5,))],
                         ids=["softmax", "layer_norm"])
def test_linearize_matches_float64_jvp(op):
    x, t = torch.randn(3, 5), torch.randn(3, 5)
    _, jvp = torch.func.linearize(op, x)
    expected = torch.func.jvp(op, (x.double(),), (t.double(),))[1]
    torch.testing.assert_close(jvp(t).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", [kernels.softmax, kernels.log_softmax, lambda x: kernels.layer_norm(x, (5,)),
                                lambda x: kernels.rms_norm(x, (5,))],
                         ids=["softmax", "log_softmax", "layer_norm", "rms_norm"])
def test_compiled_torch_func_grad_of_the_row_ops(op):
    """torch.compile around torch.func.grad: the custom op's autograd raised 'must override the setup_context'
    inside the transform; torch's ops run there, with torch's gradient."""
    x = torch.randn(3, 5)
    grad = torch.func.grad(lambda t: op(t).square().sum())
    compiled = torch.compile(grad, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), grad(x.double()).float(), atol=1e-5, rtol=1e-5)
