"""The context-length profile's content (``python -m benchmarks scaling``): counted FLOPs against hand formulas,
fitted slopes that say when they are not a scaling law, CPU peak memory below its resolution kept out of ratios
and fits, and every number's method and units said where it is printed and in the JSON's conventions."""
import contextlib
import re
import warnings

import pytest
import torch

import kernels
from benchmarks import analysis, plots, providers, records, runner
from benchmarks.counting import counting
from benchmarks.device import DeviceInfo, detect
from benchmarks.memory import CPU_METHOD
from benchmarks.providers import Case
from benchmarks.roofline import match_device
from benchmarks.table import format_fits, format_table
from kernels import reference

# fwd+bwd, B=1, H=2, D=64, float16, ten times what `scaling --max-len 512` measured on CPU (so that every reading but
# the 0 clears memory.CPU_RESOLUTION; the slopes are unchanged): the baseline's peak RSS growth (1.9, 19.9, 78.8 MB:
# still bending) and a fused kernel's that read 0 at N=128 (below RSS resolution)
BASELINE_PEAK = {128: 1_930_000, 256: 19_900_000, 512: 78_800_000}
FUSED_PEAK = {128: 0, 256: 1_392_640, 512: 5_447_680}


def _record(provider, n, peak, baseline=False, flops=None):
    return {"op": "attention", "mode": "fwd+bwd", "provider": provider, "baseline": baseline, "length": n,
            "shape": [1, 2, n, 64], "dtype": "float16", "device": "CPU (Triton interpreter)", "status": "ok",
            "reason": None, "tflops": None, "gbps": None, "min_bytes": 8 * n * 64 * 2,
            "time": {"median_ms": float(n), "method": "interpreter (CPU wall-clock)"},
            "memory": {"status": "ok", "peak_bytes": peak, "extra_bytes": peak - 4096, "method": CPU_METHOD},
            "counted": {"bytes": 64.0 * n, "flops": flops or 4.0 * n * n, "vs_min": 2.0},
            "model": {gpu: {"time_ms": 1e-3, "bound": "memory", "label": "model"}
                      for gpu in ("A100-SXM4-80GB", "H100-SXM5")}}


def _profile():
    recs = [_record("baseline", n, peak, baseline=True) for n, peak in BASELINE_PEAK.items()]
    recs += [_record("triton-window256", n, peak) for n, peak in FUSED_PEAK.items()]
    analysis.add_ratios(recs)
    return recs


def test_a_slope_through_two_points_or_a_bending_curve_says_so_and_a_power_law_does_not():
    lengths = [128, 256, 512, 1024]
    assert analysis.fit_note(lengths, [3.0 * n ** 2 for n in lengths]) is None
    assert analysis.fit_note(lengths, [5.0 * n + 1e-3 * n * n for n in lengths]) is None  # within 0.25
    assert "2 lengths only (256, 512)" in analysis.fit_note(list(FUSED_PEAK), list(FUSED_PEAK.values()))
    bending = analysis.fit_note(list(BASELINE_PEAK), list(BASELINE_PEAK.values()))
    assert bending.startswith("not settled") and "3.37, 1.99" in bending
    assert analysis.fit_note([128], [1.0]) is None  # no slope at all: nothing to qualify


def test_fits_record_the_lengths_they_used_and_why_a_slope_is_not_a_scaling_law():
    fits = {f["provider"]: f for f in analysis.fit_slopes(_profile())}
    assert fits["triton-window256"]["lengths"]["peak_memory"] == [256, 512]  # N=128 read 0: not fitted
    assert fits["triton-window256"]["lengths"]["counted_flops"] == [128, 256, 512]
    assert fits["baseline"]["notes"]["peak_memory"].startswith("not settled")
    assert fits["baseline"]["notes"]["counted_flops"] is None
    window = "fitted from N=128 < 2 x the 256-key window: partly causal's N^2, p -> 1 only for N >> 256"
    assert fits["triton-window256"]["notes"]["counted_flops"] == window
    assert analysis.slope_note("triton-window256", "counted_flops", [512, 1024, 2048], [1.0, 2.0, 4.0]) is None
    assert analysis.slope_note("triton-window256", "peak_memory", [128, 256, 512], [1.0, 2.0, 4.0]) is None
    text = format_fits(list(fits.values()))
    assert "largest 4 lengths measured" in text
    baseline_line = next(line for line in text.splitlines() if " baseline " in line)
    assert "N=128..512" in baseline_line and "peak memory p=2.68*" in baseline_line
    assert baseline_line.endswith("FLOPs p=2.00")  # exact: no note
    footnote = re.search(r"peak memory p=2\.68\*(\d+)", baseline_line).group(1)
    assert f"\n  *{footnote}: not settled: point-to-point slopes 3.37, 1.99" in text


def test_a_metric_fitted_over_fewer_lengths_than_its_line_says_which():
    """The line printed N=128..512 for every slope, while the window's peak memory (0 at N=128, below resolution)
    was fitted over 256..512 only."""
    text = format_fits(analysis.fit_slopes(_profile()))
    window_line = next(line for line in text.splitlines() if " triton-window256 " in line)
    assert "N=128..512" in window_line
    assert re.search(r"peak memory p=[0-9.]+\S* \(N=256\.\.512\)", window_line)
    assert "FLOPs p=" in window_line and "(N=" not in window_line.split("FLOPs p=")[1]  # all lengths: no span


def test_document_bytes_fitted_where_documents_are_a_tile_or_two_say_so():
    """Each of the 8 documents of N <= 1024 fits one 128-row query tile: its K/V are read once, and the bytes'
    slope of ~1 printed as settled (the tile-counted FLOPs' as merely bending), though both grow toward causal's
    as documents span many tiles."""
    docs = f"triton-{providers.DOCUMENTS}docs"
    lengths, linear = [128, 256, 512, 1024], [1.0, 2.0, 4.0, 8.0]
    note = analysis.slope_note(docs, "counted_bytes", lengths, linear)
    assert note.startswith("fitted up to N=1024: each of the 8 documents (<= 128 tokens) spans at most 2 query tiles")
    assert analysis.slope_note(docs, "counted_flops", lengths, linear) == note  # tiles visited: whole ones
    assert analysis.slope_note(docs, "peak_memory", lengths, linear) is None
    assert analysis.slope_note(docs, "counted_bytes", [4096, 8192, 16384], [1.0, 2.0, 4.0]) is None
    assert analysis.slope_note("triton", "counted_bytes", lengths, linear) is None


def test_a_reason_many_slopes_share_is_said_once():
    """Every two-length slope printed its own two lines of the same note (60 of them in a --quick run)."""
    fit = {"op": "softmax", "mode": "fwd", "slopes": {"time": 0.5, "counted_bytes": 1.0},
           "lengths": {"time": [256, 1024], "counted_bytes": [256, 1024]},
           "notes": {"time": "2 lengths only", "counted_bytes": "2 lengths only"}}
    text = format_fits([dict(fit, provider="torch"), dict(fit, provider="triton")])
    assert text.count("2 lengths only") == 1 and text.count("*1") == 5  # 4 marks and the footnote


def test_peak_memory_below_cpu_resolution_gives_no_ratio_and_no_fit_point():
    """A 0 B peak RSS growth is below resolution, not free: its ratio to the baseline is not 0.00."""
    recs = _profile()
    at_128 = next(r for r in recs if r["provider"] == "triton-window256" and r["length"] == 128)
    assert analysis.peak_bytes(at_128) is None and at_128["vs_baseline"]["peak_memory"] is None
    row = next(line for line in format_table(recs).splitlines() if "triton-window256" in line and " 128 " in line)
    assert "  0  " in row and " 0.00 " not in row  # the reading is shown, no ratio is made of it


def test_table_says_device_shape_dtype_how_time_and_memory_were_taken_and_that_the_model_is_a_model():
    lines = format_table(_profile()).splitlines()
    assert lines[0] == "device: CPU (Triton interpreter); inputs: attention (1, 2, N, 64) float16"
    assert "interpreter (CPU wall-clock)" in lines[1] and "not GPU speed" in lines[1]
    assert CPU_METHOD in lines[2] and "above the inputs" in lines[2]
    assert "counted" in lines[3] and "not measured" in lines[3]
    assert "roofline MODEL" in lines[4] and "not a measurement" in lines[4]
    assert lines[5].startswith("op ")


def test_conventions_document_every_measured_field_and_the_fits():
    identity = {"op", "mode", "provider", "baseline", "length", "shape", "dtype", "causal", "device", "status",
                "reason"}
    fields = set(runner._base_record(Case("attention", "fwd", 128), providers.provider("attention", "triton"),
                                     detect())) - identity
    assert fields <= set(records.CONVENTIONS), fields - set(records.CONVENTIONS)
    assert {"vs_baseline", "fits"} <= set(records.CONVENTIONS)
    assert "RSS" in records.CONVENTIONS["memory"] and "not a scaling law" in records.CONVENTIONS["fits"]


def test_memory_panel_names_its_method_and_a_two_point_slope_is_marked(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.plot_op(_profile(), "attention", "fwd+bwd", detect(), str(tmp_path / "scaling.png"))
    assert figures[0]._suptitle.get_text() == "attention fwd+bwd  shape (1, 2, N, 64)  float16  on " + detect().name
    panels = {ax.get_title().split("\n")[0]: ax for ax in figures[0].axes if ax.get_visible()}
    memory = panels["peak memory beyond inputs (bytes)"]
    assert memory.get_title().split("\n")[1:] == [CPU_METHOD]
    assert [line.get_label() for line in memory.lines] == ["baseline (N^2.68?)", "triton-window256 (N^1.97?)"]
    assert [line.get_label() for line in panels["FLOPs, counted"].lines] == [
        "baseline (N^2.00)", "triton-window256 (N^2.00?)"]  # from N=128: the 256-key window barely binds
    monkeypatch.undo()
    plots.plt.close(figures[0])


@pytest.mark.skipif(not kernels.INTERPRETED, reason="counts Triton through its interpreter")
def test_forward_backward_flops_are_the_hand_count_of_the_tiles_each_kernel_visits():
    """Causal fwd+bwd, fp16, H=1, D=16, N=256, counted with sm_90's default tiles (as the scaling run counts).
    Forward: each BLOCK_M query block visits the key blocks up to its diagonal, 2 dots each. dK/dV: each key block
    of BLOCK_N visits the BLOCK_M query blocks from its own start on, 4 dots (scores, dP, dV, dK). dQ: each query
    block visits its key blocks up to the diagonal, 3 dots (scores, dP, dQ). The baseline: every score, forward 2
    matmuls, backward 4, whatever the mask."""
    n, d = 256, 16
    case = Case("attention", "fwd+bwd", n, dtype="float16", heads=1, head_dim=d)
    forcing, tiles = runner._count_tiles(case)

    def visits(rows: int, cols: int, from_diagonal_of: str) -> int:
        """Tiles of rows x cols visited: query-major up to the diagonal, or key-major from it."""
        if from_diagonal_of == "query":
            return sum(-(-min(start + rows, n) // cols) for start in range(0, n, rows))
        return sum((n - start) // rows for start in range(0, n, cols))

    (fm, fn), (km, kn), (qm, qn) = tiles["fwd"], tiles["dkdv"], tiles["dq"]
    assert kn % km == 0 and n % kn == 0 and n % qm == 0  # the hand count's key-major loop starts on a block
    hand = (visits(fm, fn, "query") * 2 * 2 * fm * fn * d + visits(km, kn, "key") * 4 * 2 * km * kn * d
            + visits(qm, qn, "query") * 3 * 2 * qm * qn * d)
    counted = {}
    for name, context in (("triton", forcing), ("baseline", contextlib.nullcontext())):
        inputs = providers.make_inputs(case, torch.device("cpu"))
        fn = providers.provider("attention", name).resolve()
        with counting() as counts, context:
            fn(*inputs.args).backward(inputs.grad_out)
        counted[name] = counts.flops
    assert counted["triton"] == hand
    assert counted["baseline"] == 3 * 4 * n * n * d


@pytest.mark.parametrize("name,spec", [("NVIDIA H100 80GB HBM3", "H100-SXM5"), ("NVIDIA H100 PCIe", "H100-PCIe"),
                                       ("NVIDIA H200", "H200-SXM"), ("NVIDIA H100 NVL", None),
                                       ("NVIDIA GH200 480GB", None), ("NVIDIA H200 NVL", None)])
def test_a_gpu_gets_a_datasheet_peak_only_when_it_is_that_model(name, spec):
    """An H100 NVL (3.9 TB/s, 835 dense fp16 TFLOPS) was given the H100 SXM5's peaks and a GH200 the H200 SXM's
    4.8 TB/s, so a record's pct_of_peak was against another GPU's datasheet."""
    matched = match_device(name)
    assert (matched and matched.name) == spec


def test_a_fused_op_counted_from_outside_marks_its_counts_as_a_floor():
    """torch's SDPA is one aten op (flash-attn a custom op): its counted bytes are its inputs and outputs, its
    FLOPs torch's non-causal formula; the count says it holds such an op and the table marks it."""
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    with counting() as sdpa:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with counting() as matmul:
        q @ k.transpose(-2, -1)
    assert (sdpa.opaque_ops, matmul.opaque_ops) == (1, 0)
    recs = _profile()
    recs[0]["counted"]["opaque_ops"] = sdpa.opaque_ops
    rows = format_table(recs).splitlines()
    assert "*: holds a fused op seen from outside" in rows[3]
    assert "0.00819*" in rows[7] and rows[7].count("0.001*") == 2  # moved MB and both model columns
    assert "*" not in rows[8]


@pytest.mark.parametrize("name,pairs", [("triton", None), ("triton-window256", 256 * 257 // 2 + 768 * 256),
                                        ("triton-8docs", 8 * 128 * 129 // 2)])
def test_gpu_tflops_of_a_sparser_mask_count_only_the_pairs_it_keeps(name, pairs):
    """At N=1024 a 256-key window keeps 44% of causal's pairs and 8 documents 12.6%: their TFLOPS were taken
    over full causal's FLOPs, up to 8x what they computed (beyond the GPU's peak for a fast kernel)."""
    n = 1024
    case = Case("attention", "fwd+bwd", n, dtype="float16", batch=2, heads=4, head_dim=64)
    gpu = DeviceInfo("NVIDIA H100 80GB HBM3", "cuda", False, "do_bench", {"flops": {"float16": 989e12}})
    record = {"time": {"median_ms": 1.0}, "min_bytes": 1}
    runner._throughput(record, case, providers.provider("attention", name), gpu)
    causal = 3.5 * 4 * 2 * 4 * 64 * n * n / 2
    work = causal if pairs is None else causal * pairs / (n * (n + 1) / 2)
    assert record["tflops"] == pytest.approx(work / 1e-3 / 1e12)
    assert record["pct_of_peak"] == pytest.approx(100 * work / 1e-3 / 989e12)


def test_the_quadratic_baselines_causal_mask_moves_a_byte_per_entry():
    """reference.window_mask built the band from (N, N) int64 offsets: 8 bytes per entry written and read again by
    each comparison, which counted into the baseline's bytes (fwd at N=1024: 103 MB against 66 MB) as a cost a
    plain causal mask does not have. A bool tril/triu writes one byte per entry and reads it once."""
    n = 256
    with counting() as counts:
        mask = reference.causal_mask(n, n)
    assert torch.equal(mask, torch.ones(n, n, dtype=torch.bool).tril())
    assert counts.bytes <= 3 * n * n
