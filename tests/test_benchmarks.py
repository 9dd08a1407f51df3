"""The benchmark suite's own machinery: counters on hand-countable cases, records, OOM handling, slope fits, CLI."""
import importlib
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
import triton
from torch._dynamo.utils import counters

import kernels
from benchmarks import analysis, memory, plots, providers, records, runner, scaling
from benchmarks.__main__ import main, parse_size
from benchmarks.counting import counting, touched_bytes
from benchmarks.device import detect
from benchmarks.memory import measure_cpu
from benchmarks.providers import Case, Provider
from benchmarks.roofline import match_device, model_time, spec_by_name
from kernels.attention import configs
from kernels.registry import use_config
from tests.toy_kernels import copy_kernel, matmul_kernel

needs_interpreter = pytest.mark.skipif(not kernels.INTERPRETED, reason="counts Triton through its interpreter")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- counted bytes and FLOPs --------------------------------------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("n,dtype", [(1000, torch.float16), (37, torch.float32), (128, torch.float32)])
def test_copy_kernel_moves_exactly_its_elements_even_with_a_masked_tail(n, dtype):
    src = torch.randn(n, dtype=dtype)
    dst = torch.empty_like(src)
    with counting() as counts:
        copy_kernel[(triton.cdiv(n, 128),)](src, dst, n, BLOCK=128)
    assert torch.equal(dst, src)
    itemsize = src.element_size()
    assert (counts.bytes_read, counts.bytes_written, counts.bytes) == (n * itemsize, n * itemsize, 2 * n * itemsize)
    assert (counts.flops, counts.triton_launches) == (0, 1)
    assert counts.aten_ops == 0  # the interpreter's own host copies of the arguments are not counted


@torch.library.custom_op("benchmarks_test::copy", mutates_args=())
def _copy_op(src: torch.Tensor) -> torch.Tensor:
    dst = torch.empty_like(src)
    copy_kernel[(triton.cdiv(src.numel(), 128),)](src, dst, src.numel(), BLOCK=128)
    return dst


@needs_interpreter
def test_custom_op_around_a_kernel_is_counted_once():
    src = torch.randn(300)
    with counting() as counts:
        _copy_op(src)
    assert (counts.bytes, counts.triton_launches, counts.aten_ops) == (2 * 300 * 4, 1, 0)


@needs_interpreter
def test_dot_counts_two_m_n_k_flops():
    m, n, k = 16, 32, 64
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    with counting() as counts:
        matmul_kernel[(1,)](a, b, c, m, n, k)
    torch.testing.assert_close(c, a @ b)
    assert counts.flops == 2 * m * n * k
    assert (counts.bytes_read, counts.bytes_written) == ((m * k + k * n) * 4, m * n * 4)


@needs_interpreter
def test_counters_are_removed_after_the_block():
    src = torch.randn(300)
    with counting() as counts:
        pass
    copy_kernel[(3,)](src, torch.empty_like(src), 300, BLOCK=128)
    torch.ones(3) + 1
    assert counts.bytes == counts.flops == counts.triton_launches == counts.aten_ops == 0


def test_dispatch_mode_counts_a_matmul_and_an_add():
    m, n, k = 7, 5, 3
    a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    with counting() as counts:
        c = a @ b
    assert counts.flops == 2 * m * n * k
    assert (counts.bytes_read, counts.bytes_written) == ((m * k + k * n) * 8, m * n * 8)
    with counting() as counts:
        c + c
    assert (counts.bytes_read, counts.bytes_written, counts.flops) == (2 * m * n * 8, m * n * 8, 0)


def test_dispatch_mode_counts_views_as_free_and_broadcasts_once():
    x, bias = torch.randn(6, 10), torch.randn(10)
    with counting() as counts:
        x.t().reshape(60)[:3]  # .t() and slicing are views; flattening the transpose copies once
        x + bias  # bias is read once, not once per row
    assert counts.bytes_read == 60 * 4 + (60 + 10) * 4
    assert counts.bytes_written == 60 * 4 + 60 * 4
    assert touched_bytes(bias.expand(6, 10)) == 40


def test_dispatch_mode_sees_the_backward():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 3)
    with counting() as forward_only:
        x @ w
    with counting() as both:
        (x @ w).sum().backward()
    assert both.flops == 2 * forward_only.flops  # dL/dx = dy @ w^T: another 2*4*8*3


def _causal_forward_counts(n: int, tile, h=2, h_kv=1, d=64, dtype=torch.float16):
    q = torch.randn(1, h, n, d, dtype=dtype)
    k, v = (torch.randn(1, h_kv, n, d, dtype=dtype) for _ in range(2))
    with counting() as counts, use_config("attention_fwd", BLOCK_M=tile[0], BLOCK_N=tile[1]):
        kernels.attention(q, k, v, causal=True)
    return counts


@needs_interpreter
def test_attention_forward_counted_with_gpu_tiles_is_the_hand_count_and_below_the_small_tiles():
    """Causal forward, fp16, d64, H=2 query heads sharing one KV head, at two lengths that end in a partial block.

    Per query head: Q read once, O written once (plus the fp32 LSE); the query block [s, s + BLOCK_M) reads K and V
    rows [0, min(s + BLOCK_M, N)): whole BLOCK_N blocks below the diagonal, then masked ones whose masked-off lanes
    (keys past the block's last row) move nothing; each visited key block costs two BLOCK_M x BLOCK_N x BLOCK_D
    dots whatever the mask. Bigger query blocks re-read K/V fewer times.
    """
    h, d, itemsize = 2, 64, 2
    forced = runner._count_tiles(Case("attention", "fwd", 200, dtype="float16"))[1]
    gpu_tile = forced["fwd"]
    assert gpu_tile == tuple(configs.tiles("fwd", 90, 64, False)[0][:2]) == (128, 64)

    def hand(n, block_m, block_n):
        ends = [min(start + block_m, n) for start in range(0, n, block_m)]
        read = h * (n * d + 2 * sum(ends) * d) * itemsize
        written = h * (n * d * itemsize + n * 4)
        flops = h * sum(-(-end // block_n) for end in ends) * 2 * (2 * block_m * block_n * d)
        return read, written, flops

    for n in (200, 320):
        small = _causal_forward_counts(n, (32, 32))
        gpu = _causal_forward_counts(n, gpu_tile)
        assert (small.bytes_read, small.bytes_written, small.flops) == hand(n, 32, 32)
        assert (gpu.bytes_read, gpu.bytes_written, gpu.flops) == hand(n, *gpu_tile)
        assert (gpu.triton_launches, gpu.aten_ops) == (1, 0)
        assert gpu.bytes < small.bytes
        # Q/O traffic is the same; K/V re-reads shrink with the query block (not 4x: the diagonal blocks remain)
        kv_small = small.bytes_read - h * n * d * itemsize
        kv_gpu = gpu.bytes_read - h * n * d * itemsize
        assert kv_gpu < 0.6 * kv_small


# ---- records, ratios, fits ----------------------------------------------------------------------------------

def test_slope_fit_recovers_known_exponents():
    lengths = [128, 256, 512, 1024, 2048]
    assert analysis.loglog_slope(lengths, [3.0 * n ** 2 for n in lengths]) == pytest.approx(2.0)
    # a fixed overhead dominates the small lengths: the fit uses the largest four
    assert analysis.loglog_slope(lengths, [1e9 if n == 128 else 5.0 * n for n in lengths]) == pytest.approx(1.0)
    assert analysis.loglog_slope(lengths, [None, 0, 4.0, None, 64.0]) == pytest.approx(2.0)
    assert analysis.loglog_slope([128], [1.0]) is None


def test_scaling_lengths_double_from_128_up_to_the_cap():
    assert scaling.lengths(1000) == [128, 256, 512]
    assert scaling.lengths(128) == [128] and scaling.lengths(100) == []


def _fake(provider, length, ms, peak, nbytes, baseline=False):
    return {"op": "attention", "mode": "fwd", "provider": provider, "baseline": baseline, "length": length,
            "status": "ok", "time": {"median_ms": ms}, "memory": {"status": "ok", "peak_bytes": peak},
            "counted": {"bytes": nbytes, "flops": 2 * nbytes}}


def test_ratios_and_fits_against_the_baseline():
    recs = [_fake("baseline", n, ms=n * n, peak=n * n, nbytes=4 * n * n, baseline=True) for n in (128, 256)]
    recs += [_fake("triton", n, ms=n, peak=n, nbytes=n * n) for n in (128, 256)]
    analysis.add_ratios(recs)
    assert recs[3]["vs_baseline"] == {"time": 1 / 256, "peak_memory": 1 / 256, "counted_bytes": 0.25,
                                      "counted_flops": 0.25}
    fits = {f["provider"]: f["slopes"] for f in analysis.fit_slopes(recs)}
    assert fits["baseline"] == pytest.approx({"time": 2.0, "peak_memory": 2.0, "counted_bytes": 2.0,
                                              "counted_flops": 2.0})
    assert fits["triton"] == pytest.approx({"time": 1.0, "peak_memory": 1.0, "counted_bytes": 2.0,
                                            "counted_flops": 2.0})


def test_roofline_model():
    h100 = spec_by_name("H100-SXM5")
    compute = model_time(h100, flops=989e12, nbytes=1.0, dtype="float16")
    assert compute == {"time_ms": pytest.approx(1e3), "bound": "compute", "label": "model"}
    assert model_time(h100, flops=1.0, nbytes=3.35e12, dtype="float32")["bound"] == "memory"
    assert match_device("NVIDIA H100 80GB HBM3").name == "H100-SXM5"
    assert match_device("NVIDIA A100-SXM4-80GB").name == "A100-SXM4-80GB"
    assert match_device("NVIDIA A100-SXM4-40GB") is None  # different bandwidth: no guessing
    assert parse_size("500MB") == 500_000_000 and parse_size("2GiB") == 2 ** 31


def test_records_carry_device_method_and_counts(tmp_path, monkeypatch):
    """The CPU memory worker is stubbed (test_memory_limit_gives_oom_and_the_worker_goes_on runs it): each record
    carries its own point's result of one worker per provider."""
    device = detect()
    cases = [Case("softmax", mode, 48, rows=5) for mode in ("fwd", "fwd+bwd")]
    workers = []

    def worker(op, name, points, mem_limit=None, threads=1):
        workers.append((op, name, [c.mode for c in points], mem_limit, threads))
        return [{"status": "ok", "peak_bytes": 1000 * len(workers) + i, "method": memory.CPU_METHOD}
                for i in range(len(points))]

    monkeypatch.setattr(memory, "measure_cpu", worker)
    recs = runner.run({"softmax": cases}, device, time_budget_s=0.01, providers=["naive", "torch"], threads=2)
    analysis.add_ratios(recs)
    assert [(r["provider"], r["mode"], r["status"]) for r in recs] == [
        ("naive", "fwd", "ok"), ("naive", "fwd+bwd", "ok"), ("torch", "fwd", "ok"), ("torch", "fwd+bwd", "ok")]
    fwd = recs[2]
    assert fwd["device"] == device.name
    assert fwd["min_bytes"] == 2 * 5 * 48 * 4  # read x once, write y once
    assert fwd["counted"]["bytes"] >= fwd["min_bytes"] and fwd["counted"]["vs_min"] >= 1
    assert set(fwd["model"]) == {"A100-SXM4-80GB", "H100-SXM5"} and fwd["model"]["H100-SXM5"]["label"] == "model"
    assert fwd["memory"]["status"] == "ok" and fwd["memory"]["method"] in (memory.CPU_METHOD, memory.GPU_METHOD)
    if device.kind == "cpu":
        assert workers == [("softmax", name, ["fwd", "fwd+bwd"], None, 2) for name in ("naive", "torch")]
        assert [r["memory"]["peak_bytes"] for r in recs] == [1000, 1001, 2000, 2001]
        assert device.name == "CPU (Triton interpreter)"
        assert fwd["time"]["method"] == "CPU wall-clock" and fwd["tflops"] is None
    paths = records.write(str(tmp_path), "suite", records.document("suite", device, {}, recs, []))
    doc = json.load(open(paths[0]))
    assert {"schema", "command", "created", "device", "config", "conventions", "versions", "records",
            "fits"} <= set(doc)
    assert {"op", "mode", "provider", "length", "shape", "dtype", "status", "time", "memory", "counted",
            "min_bytes", "model", "vs_baseline", "device"} <= set(doc["records"][0])
    header = open(paths[1]).readline()
    assert "time.median_ms" in header and "counted.bytes" in header


def test_plot_leaves_out_zeros_a_log_axis_cannot_show(tmp_path, monkeypatch):
    """The norms count no FLOPs and a point may measure no memory growth: every panel is log-scaled, so zeros are
    left out (a panel of them hidden, as an empty one is) instead of drawn off the axis with matplotlib's
    'no positive values' warning."""
    recs = [{**_fake(name, n, ms=n, peak=0 if name == "torch" else n, nbytes=n, baseline=name == "naive"),
             "op": "rms_norm", "counted": {"bytes": n, "flops": 0}, "min_bytes": n, "shape": [4, n],
             "dtype": "float32"} for name in ("naive", "torch") for n in (256, 1024)]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.plot_op(recs, "rms_norm", "fwd", detect(), str(tmp_path / "rms_norm_fwd.png"))
    panels = {ax.get_title(): ax for ax in figures[0].axes if ax.get_visible()}
    assert "bytes moved, counted" in panels and "FLOPs, counted" not in panels
    # two lengths: the slope is marked as no fit
    assert [line.get_label() for line in panels["peak memory beyond inputs (bytes)"].lines] == ["naive (N^1.00?)"]
    monkeypatch.undo()
    plots.plt.close(figures[0])


def test_unavailable_provider_is_recorded_not_crashed(monkeypatch):
    missing = Provider("missing-kernel", "attention", lambda: importlib.import_module("kernels.no_such_kernel"))
    monkeypatch.setattr(runner, "providers_for", lambda op, names, variants: [missing])
    recs = runner.run({"attention": [Case("attention", "fwd", 16), Case("attention", "fwd", 32)]}, detect())
    assert [r["status"] for r in recs] == ["unavailable"] * 2
    assert "no_such_kernel" in recs[0]["reason"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="CPU memory needs Linux /proc")
def test_torch_compile_provider_is_timed_compiled_and_its_memory_leaves_out_the_compiler():
    """The runner counts bytes first, under a dispatch mode, where dynamo would skip the function for good (every
    later call eager); and a first call at a new shape compiles, which is neither the op's time nor its memory
    (about 30 MB of compiler on CPU against 8 KB of softmax)."""
    cases = [Case("softmax", mode, 256, rows=4, dtype="float32") for mode in providers.MODES]
    prov = providers.provider("softmax", "torch.compile")
    counters.clear()
    recs = [runner.measure_point(case, prov, prov.resolve(), detect(), None, 0.01) for case in cases]
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert counters["stats"]["unique_graphs"] == 2  # one graph per case: its timed calls ran compiled
    memory_of = measure_cpu("softmax", "torch.compile", cases)
    assert [m["status"] for m in memory_of] == ["ok", "ok"]
    assert all(m["peak_bytes"] < 2 ** 20 for m in memory_of), memory_of


# ---- out of memory ------------------------------------------------------------------------------------------

def test_simulated_oom_is_recorded():
    def runs_out(q, k, v, causal):
        raise torch.OutOfMemoryError("simulated")

    prov = Provider("greedy", "attention", lambda: runs_out)
    record = runner.measure_point(Case("attention", "fwd", 16), prov, runs_out, detect(), None, 0.01)
    assert record["status"] == "oom" and "simulated" in record["reason"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="CPU memory needs Linux /proc")
def test_memory_limit_gives_oom_and_the_worker_goes_on():
    big, small = Case("attention", "fwd", 1024), Case("attention", "fwd", 64)
    results = measure_cpu("attention", "baseline", [big, small], mem_limit=4_000_000)  # scores alone are 8 MB
    assert results[0]["status"] == "oom"
    assert results[1]["status"] == "ok" and 0 <= results[1]["peak_bytes"] < 4_000_000  # small: may reuse freed pages
    record = runner.measure_point(big, Provider("baseline", "attention", None, baseline=True), None, detect(),
                                  results[0], 0.01)
    assert record["status"] == "oom"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="CPU memory needs Linux /proc")
def test_a_killed_worker_marks_its_point_oom_and_a_new_worker_does_the_rest(monkeypatch):
    calls = []
    ok = json.dumps({"status": "ok", "peak_bytes": 1}) + "\n"

    def fake_run(cmd, input, **kwargs):  # the first worker dies (SIGKILL) after one point
        calls.append(len(json.loads(input)["cases"]))
        if len(calls) == 1:
            return subprocess.CompletedProcess(cmd, -9, stdout=ok, stderr="")
        return subprocess.CompletedProcess(cmd, 0, stdout=ok * calls[-1], stderr="")

    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    results = measure_cpu("attention", "baseline", [Case("attention", "fwd", n) for n in (64, 128, 256, 512)])
    assert [r["status"] for r in results] == ["ok", "oom", "ok", "ok"] and calls == [4, 2]


# ---- the command line ---------------------------------------------------------------------------------------

def test_static_is_delegated_lazily(monkeypatch):
    seen = []
    fake = types.ModuleType("benchmarks.static")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "benchmarks.static", fake)
    assert main(["static", "--arch", "sm_90"]) == 7 and seen == [["--arch", "sm_90"]]


def test_quick_run_writes_json_and_png(tmp_path):
    out = tmp_path / "results"
    max_len = "64" if detect().kind == "cpu" else "1024"  # the smallest quick length on each device
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--ops", "attention", "--max-len", max_len,
           "--providers", "baseline", "triton", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"device: {detect().name}")
    doc = json.load(open(out / "suite.json"))
    assert {(r["provider"], r["mode"]) for r in doc["records"]} == {
        (p, m) for p in ("baseline", "triton") for m in ("fwd", "fwd+bwd")}
    assert all(r["status"] in ("ok", "unavailable") for r in doc["records"])
    if detect().kind == "cpu":  # interpreted kernels are counted with sm_90's default tiles (fp16, d64)
        tiles = {r["mode"]: r["counted"]["tiles"] for r in doc["records"] if r["provider"] == "triton"}
        assert tiles == {"fwd": "counted with sm_90 default tiles (BLOCK_M x BLOCK_N per kernel): fwd 128x64",
                         "fwd+bwd": "counted with sm_90 default tiles (BLOCK_M x BLOCK_N per kernel): "
                                    "fwd 128x64, dkdv 32x128, dq 64x64"}
    assert (out / "suite.csv").exists()
    for mode in ("fwd", "fwd_bwd"):
        png = out / f"suite_attention_{mode}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pytest_benchmark_points_run_on_one_cpu_thread_as_the_command_does(tmp_path):
    """``pytest benchmarks/`` times the suite's cases as ``python -m benchmarks`` does: on CPU with one torch thread
    (with two, a small op on a shared machine waited milliseconds for the busy second thread)."""
    report = tmp_path / "points.json"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "benchmarks/", "--benchmark-only", "--quick-cases",
           "-k", "softmax-fwd-torch-N", f"--benchmark-json={report}"]
    # not as an xdist worker (make test's -n 2): pytest-benchmark reads the worker variable and disables itself
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:]
    points = json.load(open(report))["benchmarks"]
    assert len(points) == 2 and {p["extra_info"]["provider"] for p in points} == {"torch"}
    assert {p["extra_info"]["threads"] for p in points} == {1 if detect().kind == "cpu" else None}


def _counted_forward(provider_name: str, n: int):
    """Counts of one fp16 forward of ``provider_name`` at length n, as the scaling run takes them (sm_90 tiles)."""
    case = Case("attention", "fwd", n, dtype="float16", heads=1, head_dim=16)
    fn = providers.provider("attention", provider_name).resolve()
    inputs = providers.make_inputs(case, torch.device("cpu"))
    with counting() as counts, runner._count_tiles(case)[0]:
        fn(*inputs.args)
    return counts


@needs_interpreter
def test_sliding_window_flops_grow_linearly_and_documents_cost_an_eighth_of_causal():
    """Window 256: counted FLOPs ~ N * 256 (fitted slope ~1, where causal's is ~2). 8 equal documents of L tokens:
    each 128-row query block of a document visits its key blocks up to the diagonal, so with d = L / 128 the
    ratio to causal is exactly 8 d (d + 1) / (8 d (8 d + 1)) = (d + 1) / (8 d + 1), which tends to 1/8."""
    assert (providers.WINDOW, providers.DOCUMENTS) == (256, 8)
    lengths = [512, 1024, 2048]
    window = [_counted_forward("triton-window256", n).flops for n in lengths]
    causal = [_counted_forward("triton", n).flops for n in lengths[1:]]
    assert 0.9 < analysis.loglog_slope(lengths, window) < 1.25
    assert analysis.loglog_slope(lengths[1:], causal) > 1.85
    for n, full in zip(lengths[1:], causal):
        blocks = n // providers.DOCUMENTS // 128
        documents = _counted_forward("triton-8docs", n).flops
        assert documents / full == pytest.approx((blocks + 1) / (8 * blocks + 1))


def test_decode_benchmark_says_its_times_are_a_model(tmp_path, capsys):
    """``python -m benchmarks decode``: its µs come from a roofline model, and its output says so first."""
    decode_benchmark = importlib.import_module("benchmarks.decode")
    assert decode_benchmark.main(["--no-count", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "computed, not measured" in first and "H100-SXM5" in first
    doc = json.loads((tmp_path / "decode.json").read_text())
    assert {r["kind"] for r in doc["records"]} == {"model"}
    # the device, versions and conventions every command's JSON carries (decode's had none)
    assert doc["device"]["name"] and doc["versions"]["torch"] and "roofline" in doc["conventions"]["decode"]
    assert (tmp_path / "decode.md").read_text().startswith("Model of an H100 SXM")
    assert (tmp_path / "decode.png").stat().st_size > 0
