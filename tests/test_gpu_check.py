"""``python -m benchmarks gpu-check`` without a GPU: its refusal, its enumeration of every registered build, its
config check run through the interpreter (and failing on a wrong kernel), its FLOP count and its markdown."""
import json
import os
import subprocess
import sys

import pytest
import torch

import kernels
from benchmarks import gpu_check
from benchmarks.device import detect
from kernels.attention import configs
from kernels.registry import all_builds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = gpu_check.AttentionShape(batch=1, heads=2, kv_heads=1, length=40)
UNLIMITED = 1e9


def _build(kernel, default, dtype="fp16", head_dim=64):
    return next(b for b in all_builds() if b.kernel == kernel and b.default == default
                and b.signature.get("Q") == f"*{dtype}" and b.constexprs["HEAD_DIM"] == head_dim)


def test_without_a_gpu_it_says_so_in_one_line_writes_nothing_and_exits_0(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU even on a GPU machine
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
    assert {gpu_check.variant(b) for b in attention} == set(configs._VARIANTS) - {"varlen"} | {""}
    assert len(items) == 2 * len(attention) + len(builds) - len(attention)  # nothing else, nothing left out
    assert {id(b) for b, _ in items} == {id(b) for b in builds}
    assert sorted((id(b), c) for b, c in items if c is not None) == sorted(
        (id(b), c) for b in attention for c in (True, False))
    defaults = [b.default for b, _ in items]
    assert defaults == sorted(defaults, reverse=True)


def test_each_softmax_and_norm_build_gets_a_width_its_module_launches_it_with():
    row = gpu_check.row_builds(all_builds())
    assert {b.kernel for b in row} == {"_softmax_fwd", "_softmax_bwd", "_norm_fwd", "_norm_bwd"}
    for build in row:
        module = sys.modules[gpu_check._python_fn(build).__module__]
        width = gpu_check.row_width(build)
        assert module._config(width) == (build.constexprs["BLOCK"], build.constexprs["SINGLE"], build.num_warps)


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
    fp32 = [b for b in all_builds() if b.kernel == "attention_fwd" and b.default and b.signature["Q"] == "*fp32"
            and b.constexprs["HEAD_DIM"] == 64]
    builds = [next(b for b in fp32 if gpu_check.variant(b) == name) for name in ("window", "dropout")]
    others = gpu_check.other_builds(all_builds())
    assert {b.kernel for b in others} >= {"attention_dropout_mask", "attention_decode"}
    assert {gpu_check.variant(b) for b in others if b.kernel == "attention_fwd"} == {"varlen"}
    builds.append(next(b for b in others if b.kernel == "attention_dropout_mask"))
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(UNLIMITED), shape=TINY, builds=builds)
    assert [(r.get("variant"), r["status"]) for r in recs] == [
        ("window", "pass"), ("window", "pass"), ("dropout", "pass"), ("dropout", "pass"), (None, "skipped")]
    assert recs[-1]["reason"].startswith("not launched by kernels.attention")
    assert ["causal", "window_size"] in calls and ["causal", "dropout_p"] in calls


def test_softmax_and_norm_builds_pass_through_the_interpreter():
    row = gpu_check.row_builds(all_builds())
    builds = [next(b for b in row if b.kernel == "_softmax_bwd" and b.constexprs["CAUSAL"] and b.default is False
                   and b.constexprs["SINGLE"]),
              next(b for b in row if b.kernel == "_norm_bwd" and not b.constexprs["RMS"] and b.constexprs["SINGLE"])]
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(UNLIMITED), rows=3, builds=builds)
    assert [r["status"] for r in recs] == ["pass", "pass"], [r["reason"] for r in recs]
    names = {r["kernel"]: [c["name"] for c in r["checks"]] for r in recs}
    assert names == {"_softmax_bwd": ["y", "dx"], "_norm_bwd": ["y", "h", "dx", "dresidual", "dweight", "dbias"]}


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


def test_the_overhead_phase_profiles_each_op_and_torchs_own(monkeypatch):
    """Wall time per call and the functions that take it, for ours and torch's ops on tiny inputs; in the summary."""
    monkeypatch.setattr(gpu_check, "OVERHEAD_CALLS", 2)
    recs = gpu_check.time_overhead(detect(), gpu_check.Budget(UNLIMITED))
    assert [r["op"] for r in recs] == ["layer_norm", "torch layer_norm", "rms_norm", "softmax", "torch softmax",
                                       "attention", "torch sdpa"]
    for r in recs:
        assert r["status"] == "ok" and r["us_per_call"] > 0 and len(r["top"]) == gpu_check.OVERHEAD_TOP
        assert all(t["own_us"] >= 0 and t["calls"] >= 0 and "(" in t["function"] for t in r["top"])
    text = gpu_check._overhead_section(recs)
    assert text.startswith("## Host overhead") and "| layer_norm | " in text


def test_attention_grid_is_flashattentions_and_flops_follow_its_convention():
    cases = gpu_check.attention_cases()
    assert len(cases) == 2 * 2 * 2 * 6 * 2  # dtypes x head dims x causal x lengths x modes
    for case in cases:
        assert (case.batch * case.length, case.heads * case.head_dim) == (16384, 2048)
        forward = 4 * case.batch * case.heads * case.length ** 2 * case.head_dim / (2 if case.causal else 1)
        assert case.conventional_flops() == forward * (3.5 if case.mode == "fwd+bwd" else 1)
    big = next(c for c in cases if c.length == 16384 and c.head_dim == 128 and c.causal and c.mode == "fwd")
    assert big.conventional_flops() == 2 ** 40  # 4 * 1 * 16 * 16384^2 * 128 / 2


def _fake_doc():
    device = detect()
    check = {"phase": "configs", "kernel": "attention_fwd", "label": "fp16 d64 causal 128x64 w4 s3",
             "dtype": "float16", "causal": True, "default": True}
    recs = [
        {"phase": "tests", "command": "pytest -q tests -x", "status": "passed", "counts": {"passed": 310},
         "reason": None},
        {**check, "status": "pass", "worst": "dq", "max_error": 1e-3, "bound": 2e-3, "reason": None},
        {**check, "status": "fail", "worst": "out", "max_error": 6e-3, "bound": 2e-3, "reason": "out: too far"},
        {"phase": "attention", "op": "attention", "mode": "fwd", "provider": "triton", "length": 512,
         "shape": [32, 32, 512, 64], "dtype": "float16", "causal": True, "status": "ok",
         "time": {"median_ms": 1.5}, "tflops": 100.0, "gbps": None},
        {"phase": "attention", "op": "attention", "mode": "fwd", "provider": "flash-attn", "length": 512,
         "shape": [32, 32, 512, 64], "dtype": "float16", "causal": True, "status": "unavailable",
         "reason": "ImportError: no flash_attn"},
        {"phase": "rows", "op": "softmax", "mode": "fwd", "provider": "torch", "length": 1024, "shape": [4096, 1024],
         "dtype": "float16", "causal": None, "status": "ok", "time": {"median_ms": 0.02}, "tflops": None,
         "gbps": 840.0},
    ]
    phases = [{"phase": name, "status": "ok", "reason": None, "budget_s": 60.0, "duration_s": 1.0, "records": n,
               "skipped": 0, "failed": int(name == "configs")}
              for name, n in (("tests", 1), ("configs", 2), ("attention", 2), ("rows", 1))]
    return gpu_check.document(device, {}, recs, phases)


def test_markdown_tables_from_fake_records(tmp_path):
    doc = _fake_doc()
    assert doc["status"] == "failed"
    text = gpu_check.markdown(doc)
    assert "| configs | ok | 1.0 | 60.0 | 2 | 0 | 1 |  |" in text
    assert "| pytest -q tests -x | passed | 310 passed |  |" in text
    assert "| attention_fwd | float16 | 2 | 1 | 1 | 0 | 0 | 3.00 |" in text
    assert "| attention_fwd | fp16 d64 causal 128x64 w4 s3 | True | fail | out | 3.00 | out: too far |" in text
    assert "| dtype | causal | mode | shape | triton | flash-attn |" in text
    assert "| float16 | True | fwd | 32x32x512x64 | 1.5 ms, 100 TFLOPS | unavailable |" in text
    assert "- flash-attn: ImportError: no flash_attn" in text
    assert "| softmax | float16 | fwd | 4096x1024 | 0.02 ms, 840 GB/s |" in text
    paths = gpu_check.write(str(tmp_path), doc)
    assert [os.path.basename(p) for p in paths] == ["gpu_check.json", "gpu_check.csv", "gpu_check.md"]
    with open(paths[0]) as f:
        saved = json.load(f)
    assert (saved["status"], len(saved["records"]), saved["phases"][1]["failed"]) == ("failed", 6, 1)
    assert "cuda" in saved["versions"]
