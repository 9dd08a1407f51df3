"""What a newcomer following README.md meets in the benchmark commands: a bad flag is an argparse usage error (exit
2, no traceback), every measuring command names its device on its first line, a repeated option value is measured
once, and an interpreted time never passes for a GPU one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels
from benchmarks import decode, gpu_check, static, varlen
from benchmarks.__main__ import main as bench_main
from benchmarks.device import detect

ROOT = Path(__file__).resolve().parent.parent


def _usage_error(main, argv, capsys) -> str:
    """``main(argv)`` must stop with argparse's exit status 2; returns its message."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_a_mem_limit_past_a_float_is_a_usage_error(capsys):
    """'1e400' parsed as inf, and int(inf) raised OverflowError: a traceback instead of a usage error."""
    assert "argument --mem-limit: expected a size like 500MB" in _usage_error(
        bench_main, ["--mem-limit", "1e400"], capsys)
    assert "expected a size like 500MB" in _usage_error(bench_main, ["--mem-limit", "1.5.5"], capsys)


def test_context_parallel_refuses_the_options_it_would_ignore(capsys):
    """``scaling --context-parallel 2 --mem-limit 1GB`` (or ``--providers``) spawned the ranks with neither applied."""
    message = _usage_error(bench_main, ["scaling", "--context-parallel", "2", "--providers", "baseline",
                                        "--mem-limit", "1GB"], capsys)
    assert "--context-parallel runs ring attention only; it does not take --providers or --mem-limit" in message


def test_a_gpu_check_budget_that_is_no_number_says_so(capsys):
    """'attention=1.2.3' passed the digits-and-dots check and failed in float(): argparse's bare "invalid _budget
    value"; a negative or NaN value was told that its phase was unknown."""
    for value in ("attention=1.2.3", "attention=-1", "attention=nan"):
        assert "SECONDS a number >= 0" in _usage_error(gpu_check.main, ["--budget", value], capsys), value
    assert "PHASE one of" in _usage_error(gpu_check.main, ["--budget", "nope=1"], capsys)
    assert gpu_check._budget("attention=.5") == ("attention", 0.5)


def test_decode_names_its_device_first(tmp_path, capsys):
    """README: "The first line printed names the device". decode printed its table's legend first (after minutes of
    counted runs when counting), with "counted on (not run)"."""
    assert decode.main(["--no-count", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"device: {detect().name}  (nothing timed") and "skipped (--no-count)" in first
    assert (tmp_path / "decode.json").exists() and (tmp_path / "decode.md").exists()


@pytest.mark.skipif(not kernels.INTERPRETED, reason="a few interpreted launches")
def test_varlen_measures_a_repeated_mode_once(tmp_path):
    """``--modes fwd fwd`` measured every provider twice: doubled records and numpy's RankWarning from the fits."""
    assert varlen.main(["--lengths", "3", "--modes", "fwd", "fwd", "--time-budget", "0", "--heads", "1",
                        "--head-dim", "16", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "varlen.json").read_text())["records"]
    assert sorted(r["provider"] for r in records) == ["baseline", "padded", "varlen"]


def test_static_compiles_a_repeated_arch_once(tmp_path, capsys):
    """``--arch sm_80 sm_80`` compiled and reported every build twice."""
    provider = "tests.test_static_build:tiny_builds"  # one small copy kernel, as tests/test_static_build.py's
    assert static.main(["--provider", provider, "--kernel", "copy", "--arch", "sm_80", "sm_80", "--jobs", "1",
                        "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "builds.json").read_text())
    assert document["archs"] == ["sm_80"] and len(document["records"]) == 1
    assert "1/1 (build, arch) pairs compiled" in capsys.readouterr().out


@pytest.mark.skipif(not kernels.INTERPRETED, reason="only interpreted times need the mark")
def test_pytest_benchmark_ids_mark_interpreted_times():
    """``pytest benchmarks/ --benchmark-only`` prints pytest-benchmark's table with the test ids alone: an interpreted
    Triton time was shown as 'softmax-fwd-triton-N256', beside the GPU-looking name of a kernel."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST")}
    collected = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                                "benchmarks/", "--quick-cases", "--collect-only"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
    ids = [line for line in collected.stdout.splitlines() if "test_point[" in line]
    assert collected.returncode == 0 and ids, collected.stdout[-2000:]
    triton = [i for i in ids if "-triton-" in i or "-semi-fused-" in i]
    assert triton and all(i.endswith("-interp]") for i in triton), triton
    assert not any(i.endswith("-interp]") for i in ids if "-torch-" in i or "-baseline-" in i)
