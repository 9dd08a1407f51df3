"""Regression tests of the benchmarks' honesty fixes: stale gradients in the GPU memory peak, the RSS resolution
floor of every CPU method, the MFU's parameter count, the tiles note of semi-fused, the opaque mark in the plots,
the A100 PCIe roofline match and the committed scaling example matching the current analysis."""
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import analysis, context_parallel, memory, model, plots, runner
from benchmarks.device import DeviceInfo
from benchmarks.measure import make_step
from benchmarks.providers import Case, Provider, make_inputs, provider
from benchmarks.roofline import match_device
from benchmarks.varlen import CPU_MEMORY_METHOD
from kernels import reference

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "example", "scaling.json")


def _stub_cuda(monkeypatch, leaves, seen):
    """torch.cuda's memory counters on CPU: the base read records whether the leaves still hold gradients."""
    def allocated():
        seen.append([leaf.grad is None for leaf in leaves])
        return 0
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 1 << 20)


def test_measure_gpu_base_holds_no_stale_grads(monkeypatch):
    inputs = make_inputs(Case("attention", "fwd+bwd", 16, heads=1, head_dim=16), torch.device("cpu"))
    step = make_step(lambda q, k, v, c: reference.attention(q, k, v, causal=c), inputs)
    step()  # the warm-up leaves every leaf's grad set, as runner._measure's counted run does
    leaves = [t for t in inputs.tensors if t.requires_grad]
    assert leaves and all(leaf.grad is not None for leaf in leaves)
    seen = []
    _stub_cuda(monkeypatch, leaves, seen)
    result = memory.measure_gpu(step, inputs.tensors)
    assert seen == [[True] * len(leaves)]  # the base was read with no gradient held
    assert result["method"] == memory.GPU_METHOD


def test_context_parallel_peak_base_holds_no_stale_grads(monkeypatch):
    q = torch.randn(1, 1, 8, 16, requires_grad=True)

    def step():
        out = q.sum()
        out.backward()
        return out
    step()
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(memory, "_measure_one", lambda s: seen.append(q.grad is None) or {"peak_bytes": 7})
    assert context_parallel._peak(step, [q]) == 7 and seen == [True]


@pytest.mark.parametrize("method,kept", [(memory.CPU_METHOD, False), (CPU_MEMORY_METHOD, False),
                                         (memory.GPU_METHOD, True)])
def test_peak_bytes_floors_every_rss_method(method, kept):
    record = {"status": "ok", "memory": {"status": "ok", "peak_bytes": 100_000, "method": method}}
    assert analysis.peak_bytes(record) == (100_000 if kept else None)
    record["memory"]["peak_bytes"] = memory.CPU_RESOLUTION + 1
    assert analysis.peak_bytes(record) == memory.CPU_RESOLUTION + 1


@pytest.mark.parametrize("name", ["gpt2-small train", "llama-gqa train"])
def test_flops_per_token_matches_flop_counter(name):
    workload = next(w for w in model.workloads("cpu", False) if w.name == name)
    s = workload.shape
    ids = torch.randint(2, s.vocab, (s.batch, s.length), generator=torch.Generator().manual_seed(0))
    if workload.model == "gpt":
        module = model._gpt(s, "reference", torch.device("cpu"))
        forward = lambda: module(ids)  # noqa: E731
    else:
        module = model._llama(s, "eager", torch.device("cpu"))
        forward = lambda: module(input_ids=ids)  # noqa: E731
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    counted = counter.get_total_flops() / (s.batch * s.length)
    estimate = model._flops_per_token(workload) / 3  # a training token's estimate is 3 forward tokens'
    assert estimate == pytest.approx(counted, rel=0.05)


def test_num_params_is_nanogpt_non_embedding_count():
    shape = model.workloads("cpu", False)[0].shape
    gpt = model._gpt(shape, "reference", torch.device("cpu"))
    total = sum(p.numel() for p in gpt.parameters())  # wte counted once: tied to the LM head
    assert model._num_params("gpt", shape) == total - gpt.transformer.wpe.weight.numel()


def _measure_tiles(prov: Provider) -> dict:
    device = DeviceInfo("CPU (Triton interpreter)", "cpu", True, "wall-clock", None)
    case = Case("attention", "fwd", 16, heads=1, head_dim=16)
    record = runner._base_record(case, prov, device)
    runner._measure(case, prov, prov.resolve(), device, record, 0.0)
    return record["counted"]


def test_tiles_note_only_for_attention_kernel_providers():
    torch_attention = lambda: lambda q, k, v, c: reference.attention(q, k, v, causal=c)  # noqa: E731
    assert "tiles" not in _measure_tiles(Provider("softmax-only", "attention", torch_attention, triton=True))
    assert "tiles" in _measure_tiles(Provider("fused", "attention", torch_attention, triton=True,
                                              attention_kernels=True))
    assert not provider("attention", "semi-fused").attention_kernels
    assert provider("attention", "triton").attention_kernels


def test_plot_marks_opaque_providers(monkeypatch):
    pytest.importorskip("matplotlib")
    doc = json.load(open(EXAMPLE))
    records = [r for r in doc["records"] if r["provider"] in ("baseline", "torch-sdpa", "triton")]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    device = DeviceInfo(**doc["device"])
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda *a, **k: None)
    plots.plot_op(records, "attention", "fwd", device, "unused.png")
    labels = {text.get_text() for ax in figures[0].axes if ax.get_legend() for text in ax.get_legend().get_texts()}
    assert any(label.startswith("torch-sdpa*") for label in labels)
    assert not any(label.startswith(("triton*", "baseline*")) for label in labels)
    assert any(label.startswith("torch-sdpa ") for label in labels)  # time and memory are measured: no mark


def test_match_device_a100_pcie_is_not_sxm():
    assert match_device("NVIDIA A100 80GB PCIe") is None
    assert match_device("NVIDIA A100-SXM4-80GB").name == "A100-SXM4-80GB"


def test_committed_scaling_example_matches_current_analysis():
    doc = json.load(open(EXAMPLE))
    records = doc["records"]
    assert json.loads(json.dumps(analysis.fit_slopes(records))) == doc["fits"]
    assert all("tiles" not in r["counted"] for r in records if r["provider"] == "semi-fused")
