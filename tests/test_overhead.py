"""The host-overhead benchmark (``python -m benchmarks overhead``) and the lean eager path it measures."""
import importlib
import json

import pytest
import torch

import kernels
from benchmarks import overhead
from kernels import flash_attn


def test_overhead_benchmark_writes_every_provider_and_pass(tmp_path):
    assert overhead.main(["--quick", "--ops", "softmax", "rms_norm", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "overhead.json").read_text())
    seen = {(r["op"], r["provider"], r["pass"]) for r in doc["records"]}
    assert seen == {(op, provider, passes) for op in ("softmax", "rms_norm") for provider in ("ours", "torch", "minimal")
                    for passes in ("forward", "forward+backward", "inference")}
    assert all(r["us_per_call"] > 0 and r["launches"] == "stubbed" for r in doc["records"])
    assert (tmp_path / "overhead.csv").exists() and (tmp_path / "overhead.png").exists()


def test_an_op_with_no_backward_is_timed_forward_only(tmp_path):
    """Decoding has no backward: no "forward+backward" or "inference" row that would time its forward (which
    records no graph) again under another name."""
    recs = overhead.measure(overhead.detect(), ["attention_with_kvcache", "softmax"], repeats=1, calls=2)
    passes = {(r["op"], r["pass"]) for r in recs}
    assert passes == {("attention_with_kvcache", "forward"), ("softmax", "forward"), ("softmax", "forward+backward"),
                      ("softmax", "inference")}
    table = overhead.format_table(recs)
    assert "attention_with_kvcache" in table and "attention_with_kvcache forward+backward" not in " ".join(table.split())
    assert overhead.plot(recs, overhead.detect(), str(tmp_path)) == [str(tmp_path / "overhead.png")]


def test_every_public_op_has_a_case():
    names = set(overhead.cases(torch.device("cpu")))
    for op in ("softmax", "log_softmax", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "attention",
               "attention_varlen", "attention_with_kvcache", "flash_attn_func", "scaled_dot_product_attention"):
        assert op in names


def test_stubbed_launches_restore_the_interpreter():
    x = torch.randn(3, 5)
    with overhead.stubbed_launches():
        kernels.softmax(x)
    torch.testing.assert_close(kernels.softmax(x), torch.softmax(x, -1))


@pytest.mark.parametrize("log", [False, True])
def test_eager_softmax_skips_the_custom_op(monkeypatch, log):
    """Eager calls take the plain autograd.Function; the torch.library op is for torch.compile only."""
    module = importlib.import_module("kernels.softmax")  # the module: kernels.softmax is also the function

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op ran in eager mode")

    monkeypatch.setattr(module, "_forward_op", refuse)
    x = torch.randn(4, 7, requires_grad=True)
    y = (kernels.log_softmax if log else kernels.softmax)(x)
    y.sum().backward()
    reference = (torch.log_softmax if log else torch.softmax)(x.detach(), -1)
    torch.testing.assert_close(y, reference)


def test_eager_attention_skips_the_custom_op(monkeypatch):
    ops = importlib.import_module("kernels.attention.ops")

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op ran in eager mode")

    monkeypatch.setattr(ops, "_forward_op", refuse)
    monkeypatch.setattr(ops, "_backward_op", refuse)
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    out = kernels.attention(q, k, v, causal=True)
    out.sum().backward()
    expected = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    torch.testing.assert_close(out, expected)
    assert q.grad is not None and k.grad is not None and v.grad is not None


def _counting_function():
    """A toy :func:`kernels._autograd.autograd_function` (y = 2x) that records what its forward saw and how often
    its setup_context ran."""
    from kernels._autograd import autograd_function

    seen = {"setup": 0, "grad_mode": [], "inputs": []}

    def forward(x):
        seen["grad_mode"].append(torch.is_grad_enabled())
        seen["inputs"].append(x)
        return x * 2

    def setup_context(ctx, inputs, output):
        seen["setup"] += 1

    def backward(ctx, grad):
        return grad * 2

    return autograd_function("Doubled", forward, setup_context, backward, jvp=lambda ctx, t: t * 2), seen


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_inference_calls_the_forward_without_the_function(context, dead_wrapper):
    """Under no_grad / inference_mode nothing is recorded, so the forward runs alone (no Function.apply, ~5 µs of
    host time), still without grad and on plain tensors (a dead functorch wrapper unwrapped, as apply does)."""
    double, seen = _counting_function()
    leaked = dead_wrapper(torch.randn(3))
    x = torch.randn(3, requires_grad=True)
    with context():
        y = double(x)
        z = double(leaked)
    assert seen["setup"] == 0 and seen["grad_mode"] == [False, False]
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(y, 2 * x.detach())
    assert not torch._C._functorch.is_functorch_wrapped_tensor(seen["inputs"][1])
    torch.testing.assert_close(z, 2 * torch._C._functorch.unwrap_if_dead(leaked))


def test_grad_mode_and_forward_ad_still_go_through_the_function():
    """With grad enabled the Function records the graph; under no_grad inside a forward-AD level it still runs
    (no_grad does not stop forward mode), so a tangent is never dropped."""
    import torch.autograd.forward_ad as fwAD

    double, seen = _counting_function()
    x = torch.randn(3, requires_grad=True)
    double(x).sum().backward()
    assert seen["setup"] == 1 and seen["grad_mode"] == [False]
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    with fwAD.dual_level(), torch.no_grad():
        y = double(fwAD.make_dual(torch.randn(3), torch.ones(3)))
        tangent = fwAD.unpack_dual(y).tangent
    assert seen["setup"] == 2
    torch.testing.assert_close(tangent, torch.full((3,), 2.0))


OPS_UNDER_NO_GRAD = {
    "softmax": lambda x, q, k, v: kernels.softmax(x),
    "layer_norm": lambda x, q, k, v: kernels.layer_norm(x, 24, torch.ones(24), torch.zeros(24)),
    "add_rms_norm": lambda x, q, k, v: kernels.add_rms_norm(x, x.flip(0), 24, torch.ones(24)),
    "attention": lambda x, q, k, v: kernels.attention(q, k, v, causal=True, return_lse=True),
    "attention_varlen": lambda x, q, k, v: kernels.attention_varlen(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
        torch.tensor([0, 2, 7], dtype=torch.int32), torch.tensor([0, 2, 7], dtype=torch.int32), 5, 5),
    "flash_attn_func": lambda x, q, k, v: flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                                     v.transpose(1, 2), causal=True),
}


@pytest.mark.parametrize("op", list(OPS_UNDER_NO_GRAD))
def test_ops_under_no_grad_give_the_grad_mode_result(op):
    """Each family's forward called directly (inference) gives what its Function gives, bit for bit, with no
    graph: outputs are the forward's own allocations either way."""
    torch.manual_seed(0)
    x = torch.randn(5, 24, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 7, 16, requires_grad=True) for _ in range(3))
    call = OPS_UNDER_NO_GRAD[op]
    recorded = call(x, q, k, v)
    with torch.no_grad():
        inferred = call(x, q, k, v)
    recorded, inferred = (r if isinstance(r, tuple) else (r,) for r in (recorded, inferred))
    assert recorded[0].requires_grad
    for a, b in zip(recorded, inferred):
        assert not b.requires_grad and b.grad_fn is None
        assert torch.equal(a.detach(), b) and a.stride() == b.stride()
