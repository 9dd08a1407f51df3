"""The benchmarks on a machine with only torch, triton and numpy (a lent GPU machine can install nothing): every
optional package (matplotlib, tqdm, pytest, transformers) missing degrades to a message or an "unavailable" record,
never a crash or a failure of ours; and ``gpu-check`` keeps what it measured as it goes, within the command's
time limit counted from the process's start."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import decode, gpu_check, model, plots, records
from benchmarks.__main__ import main as benchmarks_main
from benchmarks.device import detect
from benchmarks.table import format_fits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("matplotlib", "tqdm", "pytest", "xdist", "pytest_benchmark", "transformers", "liger_kernel",
            "flash_attn")


def without_optional_packages(tmp_path) -> dict:
    """An environment that sees no GPU and whose Python cannot import :data:`OPTIONAL`: a package of each name on
    PYTHONPATH, ahead of the installed one, that raises ModuleNotFoundError as a missing one would."""
    site = tmp_path / "site"
    for name in OPTIONAL:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", "
                                                 f"name={name!r})\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]), CUDA_VISIBLE_DEVICES="")


def _missing(monkeypatch, *names):
    """Imports of ``names`` fail in this process (None in sys.modules: ImportError, and find_spec gives None)."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_suite_without_matplotlib_or_tqdm_writes_its_records_and_says_there_are_no_plots(tmp_path):
    env = without_optional_packages(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "suite", "--quick", "--ops", "softmax", "--providers",
                           "torch", "--max-len", "256", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["suite.csv", "suite.json"]
    assert "matplotlib is not installed: no plots written" in done.stderr
    with open(out / "suite.json") as f:
        doc = json.load(f)
    assert {r["status"] for r in doc["records"]} == {"ok"} and len(doc["records"]) == 2
    assert doc["device"]["name"] == "CPU (Triton interpreter)"


def test_decode_without_matplotlib_writes_its_json_and_tables(tmp_path, monkeypatch, capsys):
    _missing(monkeypatch, "matplotlib", "matplotlib.pyplot")
    monkeypatch.setattr(plots, "plt", None)
    assert decode.main(["--out", str(tmp_path), "--no-count"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["decode.json", "decode.md"]
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert captured.out.rstrip().endswith(f"wrote: {tmp_path / 'decode.json'}, {tmp_path / 'decode.md'}")


def test_model_without_transformers_records_the_llama_workloads_unavailable_not_failed(monkeypatch):
    _missing(monkeypatch, "transformers")
    recs = model.run(detect(), quick=True, repeats=1, only=["llama"])
    assert recs and {r["status"] for r in recs} == {"unavailable"}
    assert all(r["reason"].startswith("transformers is not installed") for r in recs)
    assert not any(gpu_check.is_failure(r) for r in recs)  # "triton (patch)" is ours: an error would fail the run


def test_gpu_check_tests_phase_without_pytest_is_unavailable_not_failed(monkeypatch):
    _missing(monkeypatch, "pytest")
    [record] = gpu_check.run_tests(detect(), gpu_check.Budget(30.0), ["tests/test_tolerance.py"])
    assert record["status"] == "unavailable" and record["reason"] == "pytest is not installed"
    assert not gpu_check.is_failure(record)
    assert "| pytest -q tests/test_tolerance.py | unavailable | - | pytest is not installed |" in \
        gpu_check._tests_section([record])


def test_gpu_check_writes_each_phase_records_as_it_goes_and_keeps_them_when_the_phase_fails(monkeypatch):
    """Inside a phase the files are rewritten with its records so far (status "running"); a phase that raises
    keeps the records it made before the exception."""
    monkeypatch.setattr(gpu_check, "PARTIAL_SAVE_S", 0.0)

    def phase(device, budget):
        gpu_check.within(budget, [1, 2], lambda item: {"phase": "rows", "status": "ok", "item": item}, dict)
        raise RuntimeError("a CUDA error")

    monkeypatch.setattr(gpu_check, "PHASES", {"rows": phase})
    saves = []
    gpu_check.run_phases(detect(), ["rows"], {"rows": 30.0},
                         lambda recs, phases: saves.append(([r["item"] for r in recs], [dict(p) for p in phases])))
    assert [items for items, _ in saves] == [[1], [1, 2], [1, 2]]
    assert [p[0]["status"] for _, p in saves] == ["running", "running", "error"]
    assert saves[-1][1][0]["reason"] == "RuntimeError: a CUDA error" and saves[-1][1][0]["records"] == 2
    running = gpu_check.document(detect(), {}, [], saves[0][1])
    assert running["status"] == "incomplete"


def test_gpu_check_summary_survives_a_section_that_cannot_render():
    """The summary is rewritten after every phase: a record a section does not expect must not end the run."""
    host = {"phase": "overhead", "kind": "host", "op": "softmax", "pass": "forward", "provider": "ours",
            "us_per_call": 20.0, "status": "ok", "launches": "real"}  # torch's and the minimal op's are missing
    phases = [{"phase": "overhead", "status": "ok", "reason": None, "budget_s": 60.0, "duration_s": 1.0,
               "records": 1, "skipped": 0, "failed": 0}]
    text = gpu_check.markdown(gpu_check.document(detect(), {}, [host], phases))
    assert "## overhead\n\nThis section could not be rendered (KeyError: " in text
    assert "## Phases" in text


def test_gpu_check_counts_its_total_from_the_process_start(monkeypatch):
    """Importing torch, triton and the kernels takes seconds of the command's limit too (counted in a fresh process:
    this one may be older than STARTUP_TRUSTED_S, where startup_s says 0)."""
    assert 0.0 <= gpu_check.startup_s() <= gpu_check.STARTUP_TRUSTED_S
    started = subprocess.run([sys.executable, "-c", "import time; time.sleep(1.0); from benchmarks import gpu_check;"
                              "print(gpu_check.startup_s())"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert 1.0 <= float(started.stdout) <= gpu_check.STARTUP_TRUSTED_S, started.stderr
    totals = []
    monkeypatch.setattr(gpu_check, "no_gpu_message", lambda device: None)
    monkeypatch.setattr(gpu_check, "startup_s", lambda: 25.0)
    monkeypatch.setattr(gpu_check, "run_phases", lambda device, names, budgets, save, total_s: (
        totals.append(total_s), save([], []))[1])
    monkeypatch.setattr(gpu_check, "write", lambda out, doc: [])
    gpu_check.main(["--phases", "tests"])
    assert totals == [gpu_check.TOTAL_S - 25.0]


def test_records_json_writes_values_json_has_no_type_for_as_text(tmp_path):
    doc = records.document("suite", detect(), {"dtype": torch.float16, "started": time.monotonic}, [], [])
    [json_path, _] = records.write(str(tmp_path), "suite", doc)
    with open(json_path) as f:
        assert json.load(f)["config"]["dtype"] == "torch.float16"


def test_a_csv_cell_holding_a_list_of_records_is_its_json_text(tmp_path):
    """hf_masks.csv's mask_handed_per_layer was Python dict reprs joined by 'x' (the shape rule): now a shape is
    still 2x16, and a list holding dicts one JSON cell a reader can parse."""
    handed = [{"type": "Tensor", "shape": [2, 1, 4, 4]}, {"type": "None"}]
    doc = records.document("hf-masks", detect(), {}, [{"shape": [2, 16], "handed": handed}], [])
    [_, csv_path] = records.write(str(tmp_path), "hf_masks", doc)
    with open(csv_path) as f:
        [row] = list(csv.DictReader(f))
    assert row["shape"] == "2x16" and json.loads(row["handed"]) == handed


@pytest.mark.parametrize("argv,message", [
    (["overhead", "--ops", "nosuch"], "argument --ops: invalid choice: 'nosuch'"),
    (["hf-masks", "--seq-lens", "0"], "argument --seq-lens: expected an integer >= 1, got '0'"),
    (["hf-masks", "--layers", "-1"], "argument --layers: expected an integer >= 1, got '-1'"),
    (["suite", "--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (["suite", "--batch", "-1"], "argument --batch: expected an integer >= 1, got '-1'"),
    (["scaling", "--max-len", "two"], "argument --max-len: expected an integer >= 1, got 'two'"),
    (["suite", "--providers", "bogus"], "argument --providers: invalid choice: 'bogus'"),
    (["scaling", "--max-len", "64"], "nothing to measure: no point of attention has a length within --max-len"),
    (["suite", "--ops", "attention", "--providers", "torch"], "nothing to measure: no point of attention"),
    (["varlen", "--max-len", "0"], "argument --max-len: expected an integer >= 1, got '0'"),
    (["varlen", "--batch", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    (["varlen", "--time-budget", "nan"], "argument --time-budget: expected a number >= 0.0, got 'nan'"),
    (["model", "--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (["model", "--only", "bogus"], "no workload's name contains any of --only bogus; the workloads: gpt2-small"),
])
def test_bad_options_are_argparse_errors_before_anything_runs(argv, message, tmp_path, capsys):
    """Zero threads was a RuntimeError traceback from torch, varlen's --max-len 0 a math domain error, a zero batch
    or head count the default in silence, zero repeats an error record per point; a selection with no point wrote
    empty files."""
    with pytest.raises(SystemExit) as exit_info:
        benchmarks_main(argv + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_fitted_slopes_say_when_there_is_none():
    assert format_fits([]).splitlines()[1] == "  none: a slope needs two or more lengths of a provider that ran"


def test_model_table_marks_interpreted_times_as_not_gpu_speed():
    timing = "CPU wall time, median; Triton providers run in Triton's interpreter: not a GPU figure"
    recs = [{"workload": "w", "provider": p, "mode": "eager", "status": "ok", "ms_per_step": ms,
             "tokens_per_s": 1000 / ms, "timing": timing} for p, ms in (("triton (patch)", 60.0), ("hf sdpa", 0.5))]
    ours, theirs = model.format_table(recs).splitlines()[1:]
    assert ours.endswith(" 0.0083x  (interpreted: not GPU speed)") and theirs.endswith(" 1.00x")


def test_model_table_shows_small_ratios_with_significant_digits():
    """".2f" printed an interpreted kernel's 0.001x as 0.00x: the table hid how far behind it was."""
    recs = [{"workload": "w", "provider": p, "mode": "eager", "status": "ok", "ms_per_step": ms,
             "tokens_per_s": 1000 / ms, "timing": "CPU wall time"} for p, ms in (("triton", 800.0), ("sdpa", 1.0))]
    assert model.format_table(recs).splitlines()[1].endswith(" 0.0013x")


def test_gpu_check_refuses_an_output_folder_it_cannot_write_before_the_first_phase(tmp_path, monkeypatch, capsys):
    """The files were first written after the attention phase: a bad --out cost its 200 s of a lent GPU."""
    ran = []
    monkeypatch.setattr(gpu_check, "no_gpu_message", lambda device: None)
    monkeypatch.setattr(gpu_check, "PHASES", {"rows": lambda device, budget: ran.append("rows") or []})
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(not_a_folder / "out"), "--phases", "rows"])
    assert exit_info.value.code == 2 and ran == []
    assert f"argument --out: cannot write into '{not_a_folder / 'out'}'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["suite", "scaling", "decode", "varlen", "hf-masks", "overhead", "launch-path",
                                     "model", "static"])
def test_every_command_refuses_an_output_folder_it_cannot_write_before_measuring(command, tmp_path, capsys):
    """--out under a file was a NotADirectoryError traceback once everything was measured (minutes of a scaling or
    static run); now argparse's usage error naming --out, before anything runs."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        benchmarks_main([command, "--out", str(not_a_folder / "sub")])
    assert exit_info.value.code == 2
    assert f"argument --out: cannot write into '{not_a_folder / 'sub'}'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--provider", "nosuch:fn"], "--provider 'nosuch:fn' (module:function returning the builds): No module named"),
    (["--kernel", "nosuch"], "--kernel 'nosuch': no registered build's kernel name contains it"),
])
def test_static_refuses_a_provider_or_kernel_it_cannot_use(argv, message, tmp_path, capsys):
    """A bad --provider was a ModuleNotFoundError traceback; a --kernel matching nothing printed a line, exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        benchmarks_main(["static", "--quick", "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_static_quick_compiles_each_default_only_for_its_families():
    """--quick compiled every family's defaults for every arch (588 of 945 pairs off-family: AMD wave64 builds for
    sm_90, sm_90 TMA builds for sm_80, every reported spill among them); now only where the tile tables hold them,
    and without --quick/--defaults every selected build for every arch, as before."""
    from benchmarks import static
    builds = static.load_builds(static.PROVIDER)
    archs = ("sm_80", "sm_90", "gfx942")
    selected = static.select(builds, quick=True)
    quick = static.pairs(builds, selected, archs, own_families=True)
    assert quick and all(static.on_family(builds[i], arch) for i, arch in quick)
    assert {arch for _, arch in quick} == set(archs)
    assert len(static.pairs(builds, selected, archs, own_families=False)) == len(selected) * len(archs) > len(quick)


def test_gpu_check_model_phase_keeps_each_point_as_it_is_measured(monkeypatch):
    """A model point (a whole model under torch.compile) can take a minute: a run killed in the phase keeps the
    points before it."""
    monkeypatch.setattr(model, "points", lambda device, **options: iter([{"workload": "a"}, {"workload": "b"}]))
    seen = []
    budget = gpu_check.Budget(90.0, on_record=lambda done: seen.append([r["workload"] for r in done]))
    assert gpu_check.time_model(detect(), budget) == [{"workload": w, "phase": "model"} for w in "ab"]
    assert seen == [["a"], ["a", "b"]]


def test_overhead_and_the_ring_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    """overhead wrote its JSON/CSV and then crashed importing matplotlib (exit 1); the ring benchmark's plot too."""
    from benchmarks import context_parallel, overhead
    _missing(monkeypatch, "matplotlib", "matplotlib.pyplot")
    monkeypatch.setattr(plots, "plt", None)
    assert overhead.main(["--quick", "--ops", "softmax", "--out", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["overhead.csv", "overhead.json"]
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert context_parallel._plot([], str(tmp_path / "ring.png")) == []


def test_static_without_tqdm_compiles_and_writes_its_report(tmp_path, monkeypatch):
    from benchmarks import static
    _missing(monkeypatch, "tqdm")
    # one build, test_static_build's copy kernel (the package's builds are that file's to compile)
    argv = ["--provider", "tests.test_static_build:tiny_builds", "--kernel", "copy", "--arch", "sm_80"]
    assert static.main(argv + ["--out", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["builds.json", "builds.md", "defaults.md"]
