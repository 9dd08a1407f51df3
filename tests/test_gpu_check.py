"""``python -m benchmarks gpu-check`` without a GPU: its refusal, its phase order and budgets, each phase's logic run
on CPU with tiny shapes and budgets (timing, host overhead and goals, the model run, the config checks through the
interpreter, the test suite), and the markdown every section renders from synthetic records."""
import importlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import kernels
from benchmarks import gpu_check, model
from benchmarks.device import DeviceInfo, detect
from benchmarks.providers import Case
from kernels.attention import configs
from kernels.registry import all_builds
from tests.test_bench_audit import without_optional_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = gpu_check.AttentionShape(batch=1, heads=2, kv_heads=1, length=40)
UNLIMITED = 1e9


def _build(kernel, default, dtype="fp16", head_dim=64):
    return next(b for b in all_builds() if b.kernel == kernel and b.default == default
                and b.signature.get("Q") == f"*{dtype}" and b.constexprs["HEAD_DIM"] == head_dim)


@pytest.mark.parametrize("optional_packages", [True, False])
def test_without_a_gpu_it_says_so_in_one_line_writes_nothing_and_exits_0(tmp_path, optional_packages):
    """Also where matplotlib, tqdm, pytest and transformers are missing (``python -m benchmarks`` imported matplotlib
    for every command)."""
    out = tmp_path / "out"
    env = (dict(os.environ, CUDA_VISIBLE_DEVICES="") if optional_packages  # no GPU even on a GPU machine
           else without_optional_packages(tmp_path))
    done = subprocess.run([sys.executable, "-m", "benchmarks", "gpu-check", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "gpu-check: no GPU here (torch.cuda.is_available() is False): nothing checked, nothing written."]
    assert not out.exists()


def test_every_registered_build_is_checked_attention_causal_and_not_defaults_first():
    builds = all_builds()
    items = gpu_check.config_items(builds)
    attention = gpu_check.attention_builds(builds)
    assert {b.kernel for b in attention} == set(gpu_check.ATTENTION_KERNELS)
    assert {b.variant for b in attention} == set(configs._VARIANTS) - {"varlen"} | {""}
    assert len(items) == 2 * len(attention) + len(builds) - len(attention)  # nothing else, nothing left out
    assert {id(b) for b, _ in items} == {id(b) for b in builds}
    assert sorted((id(b), c) for b, c in items if c is not None) == sorted(
        (id(b), c) for b in attention for c in (True, False))
    defaults = [b.default for b, _ in items]
    assert defaults == sorted(defaults, reverse=True)


def _has_width(build) -> bool:
    try:
        return gpu_check.row_width(build) > 0
    except LookupError:  # a build for another GPU family: the configs phase records it as skipped
        return False


def test_each_softmax_and_norm_build_gets_a_width_its_module_launches_it_with():
    row = gpu_check.row_builds(all_builds())
    assert {b.kernel for b in row} == {"_softmax_fwd", "_softmax_bwd", "_norm_fwd", "_norm_bwd"}
    launched = [b for b in row if _has_width(b)]
    assert {(b.kernel, b.constexprs["SINGLE"]) for b in launched} == {
        (kernel, single) for kernel in ("_softmax_fwd", "_softmax_bwd", "_norm_fwd", "_norm_bwd")
        for single in (True, False)}
    for build in launched:
        width = gpu_check.row_width(build)
        assert gpu_check.row_config(build, width) == (build.constexprs["BLOCK"], build.constexprs["SINGLE"],
                                                      build.num_warps)


def test_attention_configs_are_forced_and_pass_through_the_interpreter(device, monkeypatch):
    seen = []

    def spy(kernel):
        config = real(kernel)
        seen.append((kernel, config and {k: config[k] for k in ("BLOCK_M", "BLOCK_N") if k in config}))
        return config

    real = configs.forced_config
    monkeypatch.setattr(configs, "forced_config", spy)
    builds = [_build("attention_fwd", True), _build("attention_dkdv", False)]
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(UNLIMITED), shape=TINY, builds=builds)
    assert [(r["kernel"], r["causal"], r["status"]) for r in recs] == [
        ("attention_fwd", True, "pass"), ("attention_fwd", False, "pass"),
        ("attention_dkdv", True, "pass"), ("attention_dkdv", False, "pass")]
    for r in recs:
        assert [c["name"] for c in r["checks"]] == ["out", "dq", "dk", "dv"]
        assert all(0 <= c["max_error"] <= c["bound"] for c in r["checks"])
    for build in builds:
        tile = {k: build.constexprs[k] for k in ("BLOCK_M", "BLOCK_N")}
        assert (build.kernel, tile) in seen


def test_variant_builds_run_with_their_variant_and_the_others_are_left_to_the_tests(monkeypatch):
    """A window or dropout build is checked by a call that launches that specialisation (dropout against the
    keep-mask its seed draws); builds kernels.attention never launches are recorded as skipped, with the reason."""
    calls = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *args, **kw: calls.append(sorted(kw)) or real(*args, **kw))
    fp32 = [b for b in all_builds() if b.kernel == "attention_fwd" and b.default and b.dtype == "fp32"
            and b.head_dim == 64]
    builds = [next(b for b in fp32 if b.variant == name) for name in ("window", "dropout")]
    others = gpu_check.other_builds(all_builds())
    assert {b.kernel for b in others} >= {"attention_dropout_mask", "attention_decode"}
    assert {b.variant for b in others if b.kernel == "attention_fwd"} == {"varlen"}
    builds.append(next(b for b in others if b.kernel == "attention_dropout_mask"))
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(UNLIMITED), shape=TINY, builds=builds)
    assert [(r.get("variant"), r["status"]) for r in recs] == [
        ("window", "pass"), ("window", "pass"), ("dropout", "pass"), ("dropout", "pass"), (None, "skipped")]
    assert recs[-1]["reason"].startswith("not launched by kernels.attention")
    assert ["causal", "window_size"] in calls and ["causal", "dropout_p"] in calls


def test_softmax_and_norm_builds_pass_through_the_interpreter():
    row = gpu_check.row_builds(all_builds())
    builds = [next(b for b in row if b.kernel == "_softmax_bwd" and b.constexprs["CAUSAL"] and b.constexprs["SINGLE"]
                   and _has_width(b)),
              next(b for b in row if b.kernel == "_norm_bwd" and not b.constexprs["RMS"] and b.constexprs["SINGLE"]
                   and _has_width(b))]
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(UNLIMITED), rows=3, builds=builds)
    assert [r["status"] for r in recs] == ["pass", "pass"], [r["reason"] for r in recs]
    names = {r["kernel"]: [c["name"] for c in r["checks"]] for r in recs}
    assert names == {"_softmax_bwd": ["y", "dx"], "_norm_bwd": ["y", "h", "dx", "dresidual", "dweight", "dbias"]}


def test_a_row_build_no_width_launches_on_this_gpu_is_skipped_with_the_reason():
    """A build of another GPU family's table (other warps for the same block) is never launched here."""
    import dataclasses

    build = next(b for b in gpu_check.row_builds(all_builds()) if _has_width(b))
    foreign = dataclasses.replace(build, num_warps=build.num_warps * 2 + 1)
    [record] = gpu_check.check_configs(detect(), gpu_check.Budget(UNLIMITED), rows=3, builds=[foreign])
    assert record["status"] == "skipped" and record["reason"].startswith("no row width selects")


class _WrongGradient(torch.autograd.Function):
    """Identity forward, gradient 10% too large: only the backward checks can see it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return dy * 1.1


@pytest.mark.parametrize("perturb,failing", [
    (lambda out: out + 1e-2, {"out"}),
    (_WrongGradient.apply, {"dq", "dk", "dv"}),
])
def test_a_wrong_kernel_result_fails_the_config_check(monkeypatch, perturb, failing):
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *args, **kw: perturb(real(*args, **kw)))
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(UNLIMITED), shape=TINY,
                                   builds=[_build("attention_fwd", True)])
    assert [r["status"] for r in recs] == ["fail", "fail"]
    for r in recs:
        assert {c["name"] for c in r["checks"] if not c["passed"]} == failing
        assert r["max_error"] > r["bound"] and r["reason"]


def test_a_spent_budget_skips_the_rest_with_the_reason():
    run = gpu_check.within(gpu_check.Budget(UNLIMITED), [1, 2], lambda i: {"i": i, "status": "ok"}, dict)
    assert run == [{"i": 1, "status": "ok"}, {"i": 2, "status": "ok"}]
    spent = gpu_check.within(gpu_check.Budget(0.0), [1], lambda i: {"status": "ok"}, lambda i: {"i": i})
    assert spent == [{"i": 1, "status": "skipped", "reason": "phase budget of 0 s spent"}]


def test_the_test_phase_counts_outcomes_and_stops_at_its_budget(tmp_path):
    suite = tmp_path / "test_two.py"
    suite.write_text("def test_passes():\n    pass\n\n\ndef test_fails():\n    assert False\n")
    [record] = gpu_check.run_tests(detect(), gpu_check.Budget(120), args=[str(suite), "-p", "no:cacheprovider"])
    assert (record["status"], record["counts"]) == ("failed", {"failed": 1, "passed": 1})
    [record] = gpu_check.run_tests(detect(), gpu_check.Budget(0.01), args=[str(suite)])
    assert record["status"] == "timeout" and record["counts"] == {}
    assert gpu_check.pytest_counts("x\n3 failed, 310 passed, 2 skipped, 1 error in 9.1s\n") == {
        "failed": 3, "passed": 310, "skipped": 2, "error": 1}



# ---------------------------------------------------------------------------------------------- phases and budgets
def test_phases_run_in_priority_order_within_a_ten_minute_window():
    assert list(gpu_check.PHASES) == ["attention", "rows", "overhead", "model", "configs", "tests"]
    assert list(gpu_check.BUDGETS) == list(gpu_check.PHASES)
    assert sum(gpu_check.BUDGETS.values()) <= gpu_check.TOTAL_S <= 570


def test_the_command_line_takes_a_subset_of_phases_and_a_budget_per_phase():
    args = gpu_check._parser().parse_args(["--phases", "tests", "rows", "--budget", "rows=12.5"])
    assert (args.phases, args.budget, args.out) == (["tests", "rows"], [("rows", 12.5)], gpu_check.DEFAULT_OUT)
    with pytest.raises(SystemExit):
        gpu_check._parser().parse_args(["--budget", "warmup=5"])


def test_run_phases_keeps_the_order_caps_the_total_and_saves_after_each_phase(monkeypatch):
    """Phases named in any order run in PHASES order; one gets min(its budget, what is left of the total), one
    with too little left is recorded as skipped; the files are saved after every phase."""
    given = {}

    def fake(name, sleep):
        def phase(device, budget):
            given[name] = budget.seconds
            time.sleep(sleep)
            return [{"phase": name, "status": "ok"}]
        return phase

    monkeypatch.setattr(gpu_check, "PHASES", {"attention": fake("attention", 1.0), "rows": fake("rows", 2.0),
                                              "overhead": fake("overhead", 0), "tests": fake("tests", 0)})
    monkeypatch.setattr(gpu_check, "MIN_PHASE_S", 0.2)
    saves = []
    last = gpu_check.run_phases(detect(), ["tests", "rows", "attention"], {"attention": 1.0, "rows": 100, "tests": 9},
                                lambda recs, phases: saves.append([(p["phase"], p["status"]) for p in phases])
                                or len(saves), total_s=3.0)
    ran = [("attention", "ok"), ("rows", "ok")]
    assert saves == [ran[:1], ran, ran + [("tests", "skipped")]] and last == 3
    assert given["attention"] == 1.0 and 1.0 < given["rows"] < 2.0 and "tests" not in given


def test_a_spent_budget_skips_the_rest_and_lists_of_records_are_flattened():
    run = gpu_check.within(gpu_check.Budget(UNLIMITED), [1, 2], lambda i: [{"i": i, "status": "ok"}] * i, dict)
    assert run == [{"i": 1, "status": "ok"}, {"i": 2, "status": "ok"}, {"i": 2, "status": "ok"}]


# ---------------------------------------------------------------------------------------------- phase 1: attention
def test_attention_grid_puts_both_dtypes_at_the_key_shapes_first_and_head_dim_256_last():
    cases = gpu_check.attention_cases()
    assert len(cases) == 3 * 2 * 6 * 2 * 2  # head dims x causal x lengths x dtypes x modes
    for case in cases:
        assert (case.batch * case.length, case.heads * case.head_dim) == (16384, 2048)
        forward = 4 * case.batch * case.heads * case.length ** 2 * case.head_dim / (2 if case.causal else 1)
        assert case.conventional_flops() == forward * (3.5 if case.mode == "fwd+bwd" else 1)
    key = {(128, n) for n in (512, 2048, 16384)} | {(64, 512), (64, 16384)}
    first = cases[:len(key) * 2 * 2 * 2]  # x causal x dtypes x modes
    assert {(c.head_dim, c.length) for c in first} == key
    assert {(c.head_dim, c.length, c.causal, c.dtype, c.mode) for c in first} == {
        (d, n, causal, dtype, mode) for d, n in key for causal in (True, False)
        for dtype in ("float16", "bfloat16") for mode in ("fwd", "fwd+bwd")}
    priorities = [gpu_check.attention_priority(c.head_dim, c.length) for c in cases]
    assert priorities == sorted(priorities) and cases[-1].head_dim == 256


def test_attention_phase_times_ours_and_records_why_a_backend_cannot_run(monkeypatch):
    """On CPU: ours and SDPA's flash backend are timed, cuDNN's backend errors (recorded with torch's reason) and
    flash-attn is unavailable; a spent budget skips the rest."""
    case = Case("attention", "fwd", 40, dtype="float32", causal=True, batch=1, heads=2, head_dim=16)
    recs = gpu_check.time_attention(detect(), gpu_check.Budget(UNLIMITED), cases=[case])
    assert [(r["provider"], r["status"]) for r in recs] == [
        ("triton", "ok"), ("torch-sdpa-flash", "ok"), ("torch-sdpa-cudnn", "error"), ("flash-attn", "unavailable")]
    assert all(r["phase"] == "attention" for r in recs) and recs[0]["time"]["median_ms"] > 0
    assert "scaled_dot_product_attention" in recs[2]["reason"] and "CUDA GPU" in recs[3]["reason"]
    spent = gpu_check.time_attention(detect(), gpu_check.Budget(0.0), cases=[case])
    assert {r["status"] for r in spent} == {"skipped"} and len(spent) == 4


# ---------------------------------------------------------------------------------------------- phase 2: rows
def test_rows_phase_compiles_torch_once_per_shape_and_defers_compiles_off_the_key_widths(monkeypatch):
    """torch.compile gets a fresh static graph for each input shape (the recompile limit never turns it into
    eager), at the key widths beside the eager points and at the other widths after all of them."""
    compiled = []

    def backend(graph, inputs):
        compiled.append(tuple(inputs[0].shape))
        return graph.forward

    monkeypatch.setattr(gpu_check, "COMPILE_BACKEND", backend)
    monkeypatch.setattr(gpu_check, "KEY_ROW_WIDTHS", (48,))
    cases = [c for c in gpu_check.row_cases(("float32",), widths=(48, 80), rows=3) if c.op == "softmax"]
    recs = gpu_check.time_rows(detect(), gpu_check.Budget(UNLIMITED), cases=cases)
    assert [(r["length"], r["mode"], r["provider"]) for r in recs] == [
        (48, "fwd", "triton"), (48, "fwd", "torch"), (48, "fwd", "torch-compile"), (48, "fwd", "liger"),
        (48, "fwd+bwd", "triton"), (48, "fwd+bwd", "torch"), (48, "fwd+bwd", "torch-compile"), (48, "fwd+bwd", "liger"),
        (80, "fwd", "triton"), (80, "fwd", "torch"), (80, "fwd", "liger"),
        (80, "fwd+bwd", "triton"), (80, "fwd+bwd", "torch"), (80, "fwd+bwd", "liger"),
        (80, "fwd", "torch-compile"), (80, "fwd+bwd", "torch-compile")]
    assert {r["status"] for r in recs if r["provider"] != "liger"} == {"ok"}
    assert compiled == [(3, 48), (3, 48), (3, 80), (3, 80)]  # fwd, then fwd+bwd (a grad-requiring input)
    assert len(gpu_check.row_cases()) == 10 * 2 * 3 * 2  # widths x dtypes x ops x modes
    fp32 = gpu_check.all_row_cases()[len(gpu_check.row_cases()):]  # after the 16-bit points
    assert {(c.dtype, c.length) for c in fp32} == {("float32", 4096), ("float32", 262144)} and len(fp32) == 2 * 3 * 2
    assert {768, 1024, 2048, 4096, 5120, 8192, 16384, 32768, 65536, 262144} == set(gpu_check.ROW_WIDTHS)


def test_rows_phase_times_layer_norm_backward_on_one_program_per_sm_beside_ours(monkeypatch):
    """Issue #21's open trade: ours caps the backward's programs by its partial rows' bytes; the phase also times
    it with the cap off (fwd+bwd only), which launches more programs (more partial rows counted here: 4
    interpreter programs against 2), and leaves the cap as it was."""
    norms = importlib.import_module("kernels.layernorm")
    share, every_provider = norms.PARTIAL_SHARE, gpu_check.timed_providers
    monkeypatch.setattr(gpu_check, "timed_providers", lambda op: [
        p for p in every_provider(op) if p.name in ("triton", gpu_check.ONE_PER_SM)])
    cases = [c for c in gpu_check.row_cases(("float32",), widths=(64,), rows=8) if c.op == "layer_norm"]
    recs = gpu_check.time_rows(detect(), gpu_check.Budget(UNLIMITED), cases=cases)
    assert [(r["mode"], r["provider"]) for r in recs] == [
        ("fwd", "triton"), ("fwd+bwd", "triton"), ("fwd+bwd", gpu_check.ONE_PER_SM)]
    assert {r["status"] for r in recs} == {"ok"} and norms.PARTIAL_SHARE == share
    ours, one_per_sm = (r["counted"]["bytes"] for r in recs[1:])
    # two more programs: their dweight and dbias rows (written and read back) and their weight reads
    assert one_per_sm - ours == 2 * (2 * 64 * 4 * 2 + 64 * 4)


# ---------------------------------------------------------------------------------------------- phase 3: overhead
def test_overhead_phase_gives_goal_lines_host_times_and_profiles(monkeypatch):
    monkeypatch.setattr(gpu_check, "OVERHEAD_REPEATS", 1)
    monkeypatch.setattr(gpu_check, "OVERHEAD_CALLS", 2)
    monkeypatch.setattr(gpu_check, "GOAL_ROWS", (3, 64))
    recs = gpu_check.time_overhead(detect(), gpu_check.Budget(UNLIMITED), names=["softmax", "attention"])
    goals = [r for r in recs if r["kind"] == "goal"]
    assert [r["goal"] for r in goals] == [
        f"{op} {mode} 3x64 fp16 <= {factor}x torch" for op in ("softmax", "layer_norm", "rms_norm")
        for mode, factor in (("fwd", 1.5), ("fwd+bwd", 1))] + [
        "attention fwd 1x8x128x64 fp16 causal <= torch SDPA flash + 10 µs"]
    for r in goals:
        assert r["status"] == ("met" if r["ours_us"] <= r["limit_us"] else "missed") and r["torch_us"] > 0
    host = [r for r in recs if r["kind"] == "host"]
    assert sorted((r["op"], r["provider"], r["pass"]) for r in host) == sorted(
        (op, p, passes) for op in ("softmax", "attention") for p in ("ours", "torch", "minimal")
        for passes in ("forward", "forward+backward", "inference"))
    assert all(r["us_per_call"] > 0 and r["launches"] == "stubbed" for r in host)
    profiles = [r for r in recs if r["kind"] == "profile"]
    assert [r["op"] for r in profiles] == ["softmax", "attention"]
    assert all(len(r["top"]) == gpu_check.OVERHEAD_TOP and "(" in r["top"][0]["function"] for r in profiles)
    launches = [r for r in recs if r["kind"] == "launch"]
    assert {(r["kernel"], r["path"]) for r in launches} == {
        (kernel, path) for kernel in ("fwd", "dkdv", "dq") for path in ("autotuner", "memo", "direct", "run", "binder")}
    assert all(r["status"] == "ok" and r["us_per_call"] > 0 for r in launches)
    text = gpu_check._overhead_section(recs, {})
    assert "| softmax | forward+backward | " in text and ("- MET: " in text or "- MISSED: " in text)
    assert "| kernel | autotuner | memo | direct | run | binder |" in text and "\n| dkdv | " in text
    spent = gpu_check.time_overhead(detect(), gpu_check.Budget(0.0), names=["softmax"])
    assert [(r["kind"], r["status"]) for r in spent] == [("goal", "skipped")] * 7 + [
        ("host", "skipped"), ("profile", "skipped"), ("launch", "skipped")]


def test_overhead_phase_records_a_failing_launch_table_and_goes_on(monkeypatch):
    from benchmarks import launch_path

    def fail(*args):
        raise RuntimeError("no launcher")
    monkeypatch.setattr(launch_path, "measure", fail)
    recs = gpu_check.launch_layers(detect())
    assert recs == [{"phase": "overhead", "kind": "launch", "status": "error",
                     "reason": "RuntimeError: no launcher"}]
    assert "Attention launch layers: error: RuntimeError: no launcher" in gpu_check._overhead_section(recs, {})


# ---------------------------------------------------------------------------------------------- phase 4: model
def test_model_phase_runs_the_full_model_benchmark_until_a_deadline_inside_its_budget(monkeypatch):
    seen = {}

    def fake_run(device, quick, repeats, only=None, deadline=None):
        seen.update(quick=quick, repeats=repeats, deadline=deadline)
        return [{"workload": "w", "provider": "triton", "mode": "eager", "status": "ok"}]

    monkeypatch.setattr(model, "points", fake_run)
    budget = gpu_check.Budget(90.0)
    assert gpu_check.time_model(detect(), budget) == [
        {"workload": "w", "provider": "triton", "mode": "eager", "status": "ok", "phase": "model"}]
    assert (seen["quick"], seen["repeats"]) == (False, 3)
    assert budget.start + 30 <= seen["deadline"] <= budget.start + 90 - gpu_check.MODEL_RESERVE_S


def test_model_phase_past_its_deadline_records_every_point_as_skipped():
    recs = gpu_check.time_model(detect(), gpu_check.Budget(0.0))
    assert recs and {(r["phase"], r["status"]) for r in recs} == {("model", "skipped")}
    text = gpu_check._model_section(recs, {})
    assert "| gpt2-small train | triton | eager | skipped | - | - |" in text


# ---------------------------------------------------------------------------------------------- the files
H200 = DeviceInfo("NVIDIA H200", "cuda", False, "do_bench", {"spec": "H200-SXM", "flops": {}, "bandwidth": 4.8e12,
                                                            "source": "datasheet"})


def _timed(phase, op, provider, status="ok", **fields):
    point = {"phase": phase, "op": op, "mode": "fwd", "provider": provider, "dtype": "float16", "status": status,
             "reason": None, "time": {"median_ms": 1.5}, "tflops": None, "gbps": None, "pct_of_peak": None}
    return {**point, **fields}


def _synthetic_doc():
    attention = dict(length=512, shape=[32, 16, 512, 128], causal=True)
    host = [{"phase": "overhead", "kind": "host", "op": "softmax", "pass": "forward", "provider": p,
             "us_per_call": us, "x_minimal": us / 10, "launches": "real", "status": "ok"}
            for p, us in (("ours", 20.0), ("torch", 10.0), ("minimal", 10.0))]
    recs = [
        _timed("attention", "attention", "triton", tflops=400.0, **attention),
        _timed("attention", "attention", "torch-sdpa-flash", tflops=320.0, **attention),
        _timed("attention", "attention", "torch-sdpa-cudnn", "error", reason="RuntimeError: no cuDNN", **attention),
        _timed("rows", "softmax", "triton", length=1024, shape=[4096, 1024], gbps=2400.0, pct_of_peak=50.0),
        _timed("rows", "softmax", "torch-compile", length=1024, shape=[4096, 1024], gbps=3000.0, pct_of_peak=62.5),
        {"phase": "overhead", "kind": "goal", "goal": "softmax fwd 4096x1024 fp16 <= 1.5x torch", "ours_us": 12.0,
         "torch_us": 10.0, "limit_us": 15.0, "status": "met", "reason": None},
        {"phase": "overhead", "kind": "goal", "goal": "attention fwd", "status": "unmeasured",
         "reason": "torch: RuntimeError: no flash"},
        *host,
        {"phase": "overhead", "kind": "profile", "op": "softmax", "status": "ok", "us_per_call": 40.0,
         "top": [{"function": "api.py:10(softmax)", "calls": 1, "own_us": 5.0}]},
        {"phase": "model", "workload": "gpt2-small train", "provider": "triton", "mode": "eager", "status": "ok",
         "ms_per_step": 100.0, "tokens_per_s": 90000.0},
        {"phase": "model", "workload": "gpt2-small train", "provider": "torch sdpa", "mode": "compile",
         "status": "ok", "ms_per_step": 125.0, "tokens_per_s": 72000.0},
        {"phase": "configs", "kernel": "attention_fwd", "label": "fp16 d64 causal 128x64 w4 s3", "dtype": "float16",
         "causal": True, "default": True, "status": "fail", "worst": "out", "max_error": 6e-3, "bound": 2e-3,
         "reason": "out: too far"},
        {"phase": "tests", "command": "pytest -q tests -x", "status": "passed", "counts": {"passed": 310},
         "reason": None},
    ]
    phases = [{"phase": name, "status": "ok", "reason": None, "budget_s": 60.0, "duration_s": 1.0, "records": 1,
               "skipped": 0, "failed": int(name == "configs")} for name in gpu_check.PHASES]
    return gpu_check.document(H200, {}, recs, phases)


def test_markdown_renders_every_phase_section_from_synthetic_records(tmp_path):
    doc = _synthetic_doc()
    assert doc["status"] == "failed"  # the failing config
    text = gpu_check.markdown(doc)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert [h.split(" (")[0] for h in headings] == [
        "## Phases", "## Attention", "## Softmax and norms", "## Host overhead", "## Model", "## Config checks",
        "## Test suite"]
    assert "| head dim | causal | mode | N | batch x heads | triton | torch-sdpa-flash | torch-sdpa-cudnn | " \
           "ours / best other |" in text
    assert "| 128 | True | fwd | 512 | 32x16 | 400 (1.5 ms) | 320 (1.5 ms) | error | 1.25x |" in text
    assert "- torch-sdpa-cudnn: RuntimeError: no cuDNN" in text
    assert "GB/s (% of H200-SXM's 4.80 TB/s)" in text
    assert "| softmax | fwd | 1024 | 2400 (50%) | 3000 (62%) | 0.80x |" in text
    assert "- MET: softmax fwd 4096x1024 fp16 <= 1.5x torch: ours 12.0 µs, torch 10.0 µs, limit 15.0 µs" in text
    assert "- UNMEASURED: attention fwd: torch: RuntimeError: no flash" in text
    assert "| softmax | forward | 20.0 | 10.0 | 10.0 | 2.00x | 2.00x |" in text
    assert "| softmax | 40.0 | api.py:10(softmax) 5.0 |" in text
    assert "| gpt2-small train | triton | eager | 100.0 | 90000.0 | 1.25x |" in text
    assert "| attention_fwd | float16 | 1 | 0 | 1 | 0 | 0 | 3.00 |" in text
    assert "| pytest -q tests -x | passed | 310 passed |  |" in text
    paths = gpu_check.write(str(tmp_path), doc)
    assert [os.path.basename(p) for p in paths] == ["gpu_check_h200.json", "gpu_check_h200.csv", "gpu_check_h200.md"]
    with open(paths[0]) as f:
        saved = json.load(f)
    assert (saved["status"], len(saved["records"]), saved["device"]["peak"]["bandwidth"]) == ("failed", 15, 4.8e12)


def test_file_names_and_percent_of_peak_know_the_gpus_we_are_lent():
    from benchmarks.roofline import match_device

    assert [gpu_check.gpu_slug(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB")] == [
        "h100", "h200", "a100"]
    assert match_device("NVIDIA H200").bandwidth == 4.8e12 and match_device("NVIDIA H200 NVL") is None
    assert gpu_check.DEFAULT_OUT == os.path.join(ROOT, "benchmarks", "example")


def test_main_on_a_faked_gpu_runs_the_phases_and_writes_the_three_files(tmp_path, monkeypatch, capsys):
    """The command end to end with every phase faked (their records from the synthetic document): the files are
    named after the GPU, the summary is printed, and a failing config makes the exit status 1."""
    by_phase = {}
    for r in _synthetic_doc()["records"]:
        by_phase.setdefault(r["phase"], []).append(r)
    monkeypatch.setattr(gpu_check, "detect", lambda: H200)
    monkeypatch.setattr(gpu_check, "no_gpu_message", lambda device: None)
    monkeypatch.setattr(gpu_check, "PHASES", {name: lambda device, budget, name=name: by_phase[name]
                                              for name in gpu_check.PHASES})
    assert gpu_check.main(["--out", str(tmp_path), "--budget", "rows=7"]) == 1
    assert sorted(os.listdir(tmp_path)) == ["gpu_check_h200.csv", "gpu_check_h200.json", "gpu_check_h200.md"]
    with open(tmp_path / "gpu_check_h200.json") as f:
        saved = json.load(f)
    assert [p["phase"] for p in saved["phases"]] == list(gpu_check.PHASES)
    assert saved["config"]["budgets"]["rows"] == 7 and saved["phases"][1]["budget_s"] == 7
    out = capsys.readouterr().out
    assert "## Softmax and norms" in out and out.rstrip().endswith("gpu_check_h200.md")
