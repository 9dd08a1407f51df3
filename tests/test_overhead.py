"""The host-overhead benchmark (``python -m benchmarks overhead``) and the lean eager path it measures."""
import importlib
import json

import pytest
import torch

import kernels
from benchmarks import overhead


def test_overhead_benchmark_writes_every_provider_and_pass(tmp_path):
    assert overhead.main(["--quick", "--ops", "softmax", "rms_norm", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "overhead.json").read_text())
    seen = {(r["op"], r["provider"], r["pass"]) for r in doc["records"]}
    assert seen == {(op, provider, passes) for op in ("softmax", "rms_norm") for provider in ("ours", "torch", "minimal")
                    for passes in ("forward", "forward+backward")}
    assert all(r["us_per_call"] > 0 and r["launches"] == "stubbed" for r in doc["records"])
    assert (tmp_path / "overhead.csv").exists() and (tmp_path / "overhead.png").exists()


def test_an_op_with_no_backward_is_timed_forward_only(tmp_path):
    """Decoding has no backward: no "forward+backward" row that would time its forward again under that name."""
    recs = overhead.measure(overhead.detect(), ["attention_with_kvcache", "softmax"], repeats=1, calls=2)
    passes = {(r["op"], r["pass"]) for r in recs}
    assert passes == {("attention_with_kvcache", "forward"), ("softmax", "forward"), ("softmax", "forward+backward")}
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
