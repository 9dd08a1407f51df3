"""The benchmark commands as a user runs them on CPU: usage errors that say what to change, help text that keeps its
lists, timings on the thread count the suite uses, and plots without empty holes. Measurement is stubbed."""
import csv
import json
import os
import re
import types

import pytest
import torch

from benchmarks import (context_parallel, decode, hf_masks, launch_path, model, overhead, plots, records, runner,
                        varlen)
from benchmarks.__main__ import main as benchmarks_main
from benchmarks.device import detect


class _Measured(Exception):
    """Raised by a stubbed ``measure`` once it has seen what it was called with."""


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        benchmarks_main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["scaling", "--max-len", "64"], "within --max-len 64 (scaling's smallest is 128)"),
    (["suite", "--quick", "--ops", "attention", "softmax", "--max-len", "32"],
     "within --max-len 32 (suite's smallest is 64)"),
    (["suite", "--ops", "softmax", "--providers", "baseline"],
     "no point of softmax runs on --providers baseline (choose from: naive, torch, torch.compile, triton)"),
    (["scaling", "--providers", "naive"], "no point of attention runs on --providers naive (choose from: baseline"),
])
def test_nothing_to_measure_says_whether_the_lengths_or_the_providers_left_nothing(argv, message, tmp_path, capsys):
    """Both used to read "no point ... has a length within --max-len and one of the chosen --providers", naming
    --providers when none was given and neither the smallest length nor the providers that would run."""
    assert message in _usage_error(argv + ["--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_varlen_lengths_refuse_the_options_that_draw_lengths(tmp_path, capsys):
    """--lengths with --max-len or --batch measured the given lengths and dropped the other options silently."""
    err = _usage_error(["varlen", "--lengths", "16", "40", "--max-len", "32", "--batch", "4",
                        "--out", str(tmp_path)], capsys)
    assert "--lengths gives the batch itself; it does not take --max-len or --batch" in err


@pytest.mark.skipif(detect().kind != "cpu", reason="the thread count applies to CPU timing")
def test_varlen_times_on_one_cpu_thread_as_the_suite_and_restores_the_count(monkeypatch):
    """varlen timed on torch's default threads: on a shared 2-core machine the baseline's (2, 1, 40, 16) forward read
    62 ms instead of 0.2 ms (a small op waiting for a busy second thread), next to the suite's one-thread figures."""
    seen = []

    def measure(lengths, dims, device, time_budget_s, modes):
        seen.append(torch.get_num_threads())
        raise _Measured

    monkeypatch.setattr(varlen, "measure", measure)
    monkeypatch.setattr(varlen, "ctypes", types.SimpleNamespace(CDLL=lambda _: types.SimpleNamespace(
        mallopt=lambda *args: 1)))  # keep glibc's allocator settings of the test process as they are
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(_Measured):
            varlen.main(["--lengths", "16", "40"])
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(_Measured):
            varlen.main(["--lengths", "16", "40", "--threads", "2"])
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(detect().kind != "cpu", reason="the thread count applies to CPU timing")
@pytest.mark.parametrize("module,argv,patch", [
    (overhead, ["--ops", "softmax"], "measure"),
    (launch_path, [], "measure"),
    (model, ["--only", "gpt2-small"], "run"),
])
def test_timed_commands_run_on_one_cpu_thread_and_restore_the_callers_count(module, argv, patch, monkeypatch,
                                                                            tmp_path):
    """overhead and launch-path set one torch thread for good: a test (or any process) calling their main kept
    running on one thread afterwards. model timed on torch's default threads: on a shared 2-core machine the GPT's
    SDPA training step read 825 ms against 5.8 ms on one thread."""
    seen = []

    def measure(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise _Measured

    monkeypatch.setattr(module, patch, measure)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(_Measured):
            module.main(argv + ["--out", str(tmp_path)])
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("command,item", [("overhead", "- ``minimal``: a Python"),
                                          ("launch-path", "- ``binder`` (CPU only):")])
def test_help_keeps_the_description_lists_one_item_a_line(command, item, capsys):
    """argparse's default formatter ran the docstrings' bullet lists into one paragraph ("... output; - ``torch``:
    torch's own op ...")."""
    with pytest.raises(SystemExit) as exit_info:
        benchmarks_main([command, "--help"])
    assert exit_info.value.code == 0
    assert any(line.startswith(item) for line in capsys.readouterr().out.splitlines())


def _softmax_record(provider: str, n: int, ms: float, nbytes: int, baseline: bool = False) -> dict:
    """A softmax record as the runner writes one on CPU: no FLOPs counted, no memory growth above the resolution."""
    return {"op": "softmax", "mode": "fwd", "provider": provider, "baseline": baseline, "length": n,
            "shape": [4, n], "dtype": "float16", "status": "ok", "time": {"median_ms": ms},
            "memory": {"status": "ok", "peak_bytes": 0, "method": "peak RSS growth (VmHWM after reset) in a worker "
                                                                  "process"},
            "counted": {"bytes": nbytes, "flops": 0}, "min_bytes": 4 * n * 4,
            "model": {"H100-SXM5": {"time_ms": nbytes / 3e9}}, "vs_causal": None}


def test_a_plot_leaves_no_hole_where_a_panel_has_nothing_to_show(tmp_path, monkeypatch):
    """Softmax and the norms on CPU fill 4 of the 8 panels (no FLOPs, memory below the resolution, no causal
    kernel): the empty ones were hidden in place, leaving blank columns in the middle of a 22-inch-wide PNG."""
    recs = [_softmax_record(name, n, ms=n * (1 + (name == "naive")), nbytes=n * (4 if name == "naive" else 2),
                            baseline=name == "naive") for name in ("naive", "triton") for n in (256, 1024)]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    path = tmp_path / "softmax_fwd.png"
    plots.plot_op(recs, "softmax", "fwd", detect(), str(path))
    monkeypatch.undo()
    fig = figures[0]
    try:
        assert path.read_bytes()[:4] == b"\x89PNG"
        assert all(ax.get_visible() and ax.lines for ax in fig.axes)
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[:2] == ["time (ms, interpreter / CPU wall-clock: not GPU speed)", "bytes moved, counted"]
        assert not any(title.startswith(("FLOPs", "peak memory")) for title in titles)
        grid = fig.axes[0].get_subplotspec().get_gridspec()
        assert grid.get_geometry() == (1, len(fig.axes))  # one row of the panels there are, not 2 x 4
        assert fig.get_size_inches()[0] == pytest.approx(5.5 * len(fig.axes))
    finally:
        plots.plt.close(fig)


@pytest.mark.parametrize("argv,note", [
    (["--quick", "--ops", "rms_norm", "attention", "--max-len", "64"], "not measured: rms_norm (no length within "
                                                                       "--max-len)"),
    (["--quick", "--ops", "attention", "softmax", "--max-len", "64", "--providers", "triton"],
     "not measured: softmax (no length within --max-len)"),
    (["--quick", "--ops", "attention", "softmax", "--providers", "baseline"],
     "not measured: softmax (none of --providers runs it)"),
])
def test_an_op_the_other_options_exclude_is_said_not_dropped_in_silence(argv, note, tmp_path, monkeypatch, capsys):
    """`--ops rms_norm attention --max-len 64` measured attention alone and said nothing about rms_norm (its
    smallest row is 256)."""
    measured = []
    monkeypatch.setattr(runner, "run", lambda groups, device, **kwargs: measured.append(groups) or [])
    assert benchmarks_main(argv + ["--out", str(tmp_path)]) == 0
    assert note in capsys.readouterr().out.splitlines()
    assert measured[0]["attention"]  # the rest still runs


def _documented(doc: dict) -> set:
    """The record fields a JSON document's conventions name: its keys and the words of its texts."""
    words = set(doc["conventions"]) | set(re.findall(r"\w+", json.dumps(doc["conventions"])))
    return {key for record in doc["records"] for key in record if key in words}


def _overhead_records(*args, **kwargs):
    return [{"op": "softmax", "provider": provider, "pass": "forward", "us_per_call": us, "x_minimal": us / 5,
             "launches": "stubbed"} for provider, us in (("ours", 10.0), ("torch", 4.0), ("minimal", 5.0))]


def _launch_records(*args, **kwargs):
    return [{"kernel": kernel, "path": path, "us_per_call": 10.0, "how": "simulated sm_90 path, launches stubbed"}
            for kernel in launch_path.KERNELS for path in launch_path.PATHS]


def _hf_record(path, seq_len, device, layers):
    counts = {"bytes_read": seq_len, "bytes_written": seq_len, "flops": 0, "bytes": 2 * seq_len}
    return {"path": path, "attn_implementation": path, "seq_len": seq_len, "batch": 2, "layers": layers,
            "forward": counts, "attention_bytes": seq_len, "outside_attention_bytes": seq_len,
            "mask_build": {**counts, "largest_tensor_bytes": seq_len, "largest_tensor_shape": [seq_len]},
            "mask_handed_per_layer": [{"type": "Tensor", "shape": [2, seq_len], "bytes": 2 * seq_len}]}


@pytest.mark.parametrize("module,name,argv,stub", [
    (overhead, "overhead", ["--ops", "softmax"], _overhead_records),
    (launch_path, "launch_path", [], _launch_records),
    (hf_masks, "hf_masks", ["--seq-lens", "16", "32"], _hf_record),
])
def test_every_json_documents_its_own_record_fields(module, name, argv, stub, tmp_path, monkeypatch, capsys):
    """overhead.json, launch_path.json and hf_masks.json carried the suite's conventions (time, tflops, gbps, ...),
    none of which is one of their fields: us_per_call, x_minimal, path or mask_build were described nowhere."""
    monkeypatch.setattr(module, "measure", stub)
    assert module.main(argv + ["--out", str(tmp_path)]) == 0
    doc = json.load(open(tmp_path / f"{name}.json"))
    assert _documented(doc) == set(doc["records"][0])
    assert "tflops" not in doc["conventions"]


def test_varlen_json_documents_its_own_fields_beside_the_suites(tmp_path, monkeypatch, capsys):
    """varlen.json's lengths, tokens, ideal_flops and tile_model_flops were described nowhere, and its CPU memory,
    measured in-process, was described as the suite's worker process."""
    monkeypatch.setattr(varlen, "measure", lambda *args: [])
    monkeypatch.setattr(varlen, "ctypes", types.SimpleNamespace(CDLL=lambda _: types.SimpleNamespace(
        mallopt=lambda *args: 1)))
    assert varlen.main(["--lengths", "16", "40", "--out", str(tmp_path)]) == 0
    doc = json.load(open(tmp_path / "varlen.json"))
    doc["records"] = [dict.fromkeys(["lengths", "tokens", "ideal_flops", "tile_model_flops", "time", "counted"])]
    assert _documented(doc) == set(doc["records"][0])
    assert "in this process" in doc["conventions"]["memory"]


def test_decode_json_documents_its_record_fields(tmp_path, capsys):
    """decode.json's conventions were the module docstring alone, which names none of minimum_bytes, flops or
    paths' fields."""
    assert decode.main(["--no-count", "--out", str(tmp_path)]) == 0
    doc = json.load(open(tmp_path / "decode.json"))
    assert _documented(doc) == {key for record in doc["records"] for key in record}
    assert "decode" in doc["conventions"] and "tflops" not in doc["conventions"]


def test_ring_json_documents_its_record_fields_not_the_suites(tmp_path, monkeypatch, capsys):
    """scaling --context-parallel's JSON carried the suite's conventions (time, tflops, vs_baseline, ...) beside
    its docstring: peak_bytes_per_rank, counted_flops_per_rank or flops_max_over_mean were described nowhere."""
    link = {"label": "model", "compute_ms": 1e-3, "ring_ms": 2e-3, "communication_hidden": False}
    record = {"layout": "zigzag", "length": 128, "world": 2, "batch": 1, "heads": 1, "head_dim": 16,
              "dtype": "float16", "peak_bytes_per_rank": [0, 0],
              "sent_bytes_per_rank_per_layer": {"forward": 8192, "backward": 16384},
              "counted_flops_per_rank": [1e6, 1e6], "flops_max_over_mean": 1.0,
              "model": {name: link for name in context_parallel.LINKS}}
    monkeypatch.setattr(context_parallel, "_spawn", lambda world, points: [record])
    monkeypatch.setattr(context_parallel, "_record", lambda ranks: ranks)
    assert context_parallel.run(2, [], detect(), str(tmp_path), {"command": "scaling"}) == 0
    doc = json.load(open(tmp_path / "scaling_context_parallel.json"))
    assert _documented(doc) == set(record)
    assert "context_parallel" in doc["conventions"] and "tflops" not in doc["conventions"]


@pytest.mark.parametrize("argv,command", [(["--quick", "scaling"], "scaling"), (["scaling", "--quick", "decode"],
                                                                               "decode")])
def test_a_command_after_the_options_is_named_as_misplaced(argv, command, tmp_path, capsys):
    """`python -m benchmarks --quick scaling` said only "unrecognized arguments: scaling"."""
    err = _usage_error(argv + ["--out", str(tmp_path / "out")], capsys)
    assert f"'{command}' is a command: one command, given first (python -m benchmarks {command} [options])" in err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_named_like_a_command_is_still_a_folder(tmp_path, monkeypatch, capsys):
    measured = []
    monkeypatch.setattr(runner, "run", lambda groups, device, **kwargs: measured.append(groups) or [])
    monkeypatch.chdir(tmp_path)
    assert benchmarks_main(["--quick", "--ops", "softmax", "--max-len", "256", "--out", "scaling"]) == 0
    assert measured and (tmp_path / "scaling" / "suite.json").exists()


def test_a_plot_of_failed_points_says_so_instead_of_a_blank_page(tmp_path, monkeypatch):
    recs = [{**_softmax_record(name, 256, ms=1.0, nbytes=1), "status": "oom", "time": None, "counted": None}
            for name in ("naive", "triton")]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.plot_op(recs, "softmax", "fwd", detect(), str(tmp_path / "softmax_fwd.png"))
    monkeypatch.undo()
    try:
        assert not figures[0].axes
        assert "no point measured (status: oom; reasons in the records)" in [t.get_text() for t in figures[0].texts]
    finally:
        plots.plt.close(figures[0])


def test_csv_has_no_empty_column_for_a_failed_points_missing_dict(tmp_path):
    """A run with an oom point wrote a "time" column, empty in every row, beside "time.median_ms"."""
    recs = [{"provider": "naive", "status": "ok", "time": {"median_ms": 1.5}, "reason": None},
            {"provider": "triton", "status": "oom", "time": None, "reason": "beyond --mem-limit"}]
    _, csv_path = records.write(str(tmp_path), "suite", records.document("suite", detect(), {}, recs, []))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["provider", "status", "time.median_ms", "reason"]
    assert [(r["time.median_ms"], r["reason"]) for r in rows] == [("1.5", ""), ("", "beyond --mem-limit")]


def test_a_rerun_into_the_same_folder_drops_the_figures_it_no_longer_makes(tmp_path):
    """A second run with fewer ops left the first run's PNGs beside a JSON without their records; another
    command's figures with the same prefix (scaling_context_parallel.png beside scaling_*) stay."""
    first = [_softmax_record("triton", n, ms=1.0, nbytes=n) for n in (256, 1024)]
    second = [{**r, "op": "rms_norm"} for r in first]
    other = tmp_path / "suite_context_parallel.png"
    other.write_bytes(b"x")
    assert [os.path.basename(p) for p in plots.plot_all(first, detect(), str(tmp_path), "suite")] == \
        ["suite_softmax_fwd.png"]
    plots.plot_all(second, detect(), str(tmp_path), "suite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite_context_parallel.png", "suite_rms_norm_fwd.png"]


def test_the_model_benchmark_drops_the_figures_of_workloads_it_no_longer_runs(tmp_path):
    recs = [{"workload": name, "provider": "triton", "mode": "eager", "status": "ok", "tokens_per_s": 1.0}
            for name in ("gpt train", "llama prefill")]
    model.plot(recs, detect(), str(tmp_path))
    model.plot(recs[1:], detect(), str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["model_llama_prefill.png"]
