"""The benchmark numbers say what they measure: --mem-limit judged on the reported peak, no fits or ratios of memory
readings below their resolution, a decode record's counted bytes one step."""
import json
import subprocess
import time

import pytest
import torch

from benchmarks import analysis, memory, model
from benchmarks.device import detect
from benchmarks.providers import Case


# ---- B5: --mem-limit ------------------------------------------------------------------------------------------

def test_a_point_whose_reported_peak_passes_the_limit_is_oom(monkeypatch):
    """The address-space cap lets a point through that the reported (resident) peak puts over the limit."""
    monkeypatch.setattr(memory.resource, "setrlimit", lambda *args: None)  # not this test process's address space
    monkeypatch.setattr(memory, "_measure_one", lambda step: {"status": "ok", "peak_bytes": 2_650_000,
                                                              "extra_bytes": 0, "method": memory.CPU_METHOD})
    case = Case("attention", "fwd", 16).as_record()
    limited = list(memory._worker("attention", "baseline", [case], 2_000_000, threads=1))
    assert limited[0]["status"] == "oom" and "beyond --mem-limit 2000000 B" in limited[0]["reason"]
    assert list(memory._worker("attention", "baseline", [case], None, threads=1))[0]["status"] == "ok"


@pytest.mark.parametrize("mem_limit, status", [(0, "oom"), (None, "error")])
def test_a_worker_dying_by_a_signal_under_a_limit_marks_its_point_oom(monkeypatch, mem_limit, status):
    """A segfault under the address-space cap is the limit's doing; without a limit it stays an error."""
    calls = []
    ok = json.dumps({"status": "ok", "peak_bytes": 1}) + "\n"

    def fake_run(cmd, input, **kwargs):  # the first worker segfaults after one point
        calls.append(len(json.loads(input)["cases"]))
        if len(calls) == 1:
            return subprocess.CompletedProcess(cmd, -11, stdout=ok, stderr="")
        return subprocess.CompletedProcess(cmd, 0, stdout=ok * calls[-1], stderr="")

    monkeypatch.setattr(memory.os.path, "exists", lambda path: True)
    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    results = memory.measure_cpu("attention", "baseline", [Case("attention", "fwd", n) for n in (64, 128, 256)],
                                 mem_limit)
    assert [r["status"] for r in results][:2] == ["ok", status]
    if status == "oom":
        assert [r["status"] for r in results] == ["ok", "oom", "ok"] and calls == [3, 1]


# ---- B6: memory resolution ------------------------------------------------------------------------------------

def _record(provider, length, peak, baseline=False):
    return {"op": "attention", "mode": "fwd+bwd", "provider": provider, "baseline": baseline, "length": length,
            "status": "ok", "time": {"median_ms": 1.0}, "counted": None,
            "memory": {"status": "ok", "peak_bytes": peak, "method": memory.CPU_METHOD}}


def test_cpu_memory_readings_below_the_resolution_are_neither_fitted_nor_compared():
    lengths = (128, 256, 512, 1024)
    base = [_record("baseline", n, 4 * n * n, baseline=True) for n in lengths]
    window = [_record("triton-window256", n, peak) for n, peak in zip(lengths, (4096, 8192, 172_000, 700_000))]
    recs = base + window
    analysis.add_ratios(recs)
    assert [r["vs_baseline"]["peak_memory"] for r in window][:3] == [None, None, None]
    assert window[3]["vs_baseline"]["peak_memory"] == pytest.approx(700_000 / (4 * 1024 ** 2))
    fit = next(f for f in analysis.fit_slopes(recs) if f["provider"] == "triton-window256")
    assert fit["slopes"]["peak_memory"] is None and fit["lengths"]["peak_memory"] == [1024]
    gpu = {**window[0], "memory": {**window[0]["memory"], "method": memory.GPU_METHOD}}  # exact: kept
    assert analysis.peak_bytes(gpu) == 4096


# ---- B8: model records ------------------------------------------------------------------------------------------

PREFILL, STEP = 4096, 64  # elements a fake generate's prefill and each of its decoding steps write


def _fake_generate(new_tokens):
    """A prefill, then new_tokens - 1 decoding steps slow enough to stand out of timing noise."""
    torch.ones(PREFILL)
    for _ in range(new_tokens - 1):
        torch.ones(STEP)
        time.sleep(0.002)


def test_a_decode_record_counts_one_step_not_the_prefill(monkeypatch):
    workload = next(w for w in model.workloads("cpu", quick=True) if w.kind == "decode")
    monkeypatch.setattr(model, "build", lambda *args: (_fake_generate, 1))
    record = model.measure(workload, "hf eager", "eager", detect(), repeats=1)
    assert record["status"] == "ok", record
    assert record["counted_bytes"] == 4 * STEP  # float32 ones: one step's writes, no prefill


def test_model_json_conventions_describe_its_own_fields(tmp_path, monkeypatch):
    record = {"workload": "w", "kind": "train", "model": "gpt", "provider": "triton", "mode": "eager",
              "device": "cpu", "shape": {}, "status": "ok", "timing": "t", "tokens_per_s": 1.0, "ms_per_step": 1.0,
              "peak_bytes": None, "mfu": None, "counted_bytes": 1}
    monkeypatch.setattr(model, "run", lambda *args: [record])
    monkeypatch.setattr(model, "plot", lambda *args: [])
    assert model.main(["--out", str(tmp_path), "--only", "gpt2-small"]) == 0
    conventions = json.loads((tmp_path / "model.json").read_text())["conventions"]
    text = " ".join(conventions.values())
    assert "do_bench" not in text and "min_bytes" not in text  # the suite's records, not these
    assert all(field in conventions or field in text for field in record), sorted(set(record) - set(conventions))


def test_mfu_divides_by_the_peak_of_the_dtype_a_gpu_runs():
    """measure() divided by DeviceInfo.peak["flops"], a dict per dtype: a TypeError on every known GPU, so every
    model record of gpu-check's model phase would have been an error. Now bf16's peak (the GPUs' dtype)."""
    workload = next(w for w in model.workloads("cuda", quick=True) if w.kind == "train")
    peak = {"flops": {"bfloat16": 1e12, "float16": 5e11, "float32": 1e9}}
    half_of_bf16 = 0.5e12 / model._flops_per_token(workload)  # tokens/s that use half of the bf16 peak
    assert model.mfu(workload, half_of_bf16, peak) == 0.5
