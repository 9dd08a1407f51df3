"""``python -m benchmarks gpu-check``: the one command for a GPU machine, in about ten minutes.

Four phases, each with a time budget; an item that would start after its phase's budget is spent is recorded as
"skipped" with the reason, so the whole run stays bounded:

1. ``tests``: the project's test suite (``pytest -q tests -x``) in a subprocess, killed at the budget;
2. ``configs``: every registered build (``kernels.registry.all_builds``) run directly against the float64 reference
   by the tests' tolerance rule (``tests/tolerance.py``): each attention autotune config forced with ``use_config``
   (forward and backward, causal and not), each softmax/norm build at a row width that selects it;
3. ``attention``: fwd and fwd+bwd timing against torch's SDPA (flash backend) and flash-attn at FlashAttention's
   benchmark shapes (16k tokens per batch, 2048 model width), in ms and TFLOPS;
4. ``rows``: softmax and layer/RMS norm timing against torch (and Liger-Kernel if installed), in GB/s;
5. ``overhead``: where a call's host time goes, for inputs so small that the GPU's work is negligible: wall time
   per call of each op and of torch's, and the Python functions that take it (cProfile).

It writes ``gpu_check.json`` (every record, the device, versions, each phase's duration), ``gpu_check.csv`` and
``gpu_check.md`` (the summary tables, also printed) into ``--out``. Without a CUDA GPU it prints one line saying
so, writes nothing and exits 0.
"""
import argparse
import contextlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from kernels.attention import configs
from kernels.registry import TRITON_DTYPES, Build, all_builds, pointee_types, use_config
from benchmarks import records, runner
from benchmarks.device import DeviceInfo, detect
from benchmarks.providers import Case, Provider, Unavailable, provider

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("results", "gpu_check")
BUDGETS = {"tests": 200.0, "configs": 200.0, "attention": 120.0, "rows": 60.0, "overhead": 30.0}
"""Seconds per phase (the whole run stays under ten minutes); ``--budget PHASE=SECONDS`` changes one."""
DTYPES = {name: dtype for dtype, name in TRITON_DTYPES.items()}


def _tolerance():
    """``tests/tolerance.py``, the tests' rule, loaded by path: ``tests`` is not an installed package."""
    spec = importlib.util.spec_from_file_location("tolerance", os.path.join(ROOT, "tests", "tolerance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tolerance = _tolerance()


# ---------------------------------------------------------------------------------------------- time budgets
@dataclass
class Budget:
    """A phase's time allowance; an item may start while the time left covers the longest item seen so far."""

    seconds: float
    start: float = field(default_factory=time.monotonic)
    longest: float = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows_another(self) -> bool:
        return self.elapsed() + self.longest <= self.seconds


def within(budget: Budget, items: Iterable, run_one: Callable[[object], dict],
           describe: Callable[[object], dict]) -> List[dict]:
    """``run_one(item)`` for each item while the budget allows; the rest become ``describe(item)`` records with
    status "skipped" and the reason."""
    out = []
    for item in items:
        if not budget.allows_another():
            out.append({**describe(item), "status": "skipped",
                        "reason": f"phase budget of {budget.seconds:.0f} s spent"})
            continue
        start = time.monotonic()
        out.append(run_one(item))
        budget.longest = max(budget.longest, time.monotonic() - start)
    return out


# ---------------------------------------------------------------------------------------------- phase 1: tests
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_counts(output: str) -> Dict[str, int]:
    """{outcome: count} from pytest's last summary line (e.g. "2 failed, 310 passed, 3 skipped in 90.1s")."""
    summary = next((line for line in reversed(output.splitlines()) if _COUNT.search(line)), "")
    return {outcome.rstrip("s") if outcome == "errors" else outcome: int(n) for n, outcome in _COUNT.findall(summary)}


def _test_args() -> List[str]:
    """``tests -x``, spread over up to 16 workers when pytest-xdist is installed: on a GPU machine the suite's time
    goes to compiling kernels, which is CPU work (on an H200 with 16 cores, 8 workers ran 11% of it in 170 s, a
    cold Triton cache; 16 ran 490 tests in 135 s, a warm one)."""
    workers = min(16, os.cpu_count() or 1)
    return ["tests", "-x"] + (["-n", str(workers)] if importlib.util.find_spec("xdist") and workers > 1 else [])


def run_tests(device: DeviceInfo, budget: Budget, args: Optional[Sequence[str]] = None) -> List[dict]:
    """The test suite in a subprocess (``python -m pytest -q *args`` from the repository root), killed when the
    budget is spent; one record with the pass/fail counts and the end of the output."""
    command = [sys.executable, "-m", "pytest", "-q", *(_test_args() if args is None else args)]
    record = {"phase": "tests", "command": " ".join(command[2:])}
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=budget.seconds)
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else error.stdout
        return [{**record, "status": "timeout", "reason": f"killed after its {budget.seconds:.0f} s budget",
                 "counts": {}, "tail": (output or "")[-2000:]}]
    counts = pytest_counts(done.stdout)
    status = "passed" if done.returncode == 0 else "failed"
    return [{**record, "status": status, "returncode": done.returncode, "counts": counts,
             "reason": None if status == "passed" else "pytest exited with code %d" % done.returncode,
             "tail": (done.stdout + done.stderr)[-2000:]}]


# ---------------------------------------------------------------------------------------------- phase 2: configs
@dataclass(frozen=True)
class AttentionShape:
    """The awkward attention shape every attention config is checked at (GQA, a length no tile divides)."""

    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    length: int = 300


ROWS = 37
"""Rows of the softmax/norm checks (more than one program, not a round number)."""
SOFTMAX_SCALE = 0.5
EPS = 1e-5


def _python_fn(build: Build):
    fn = build.fn
    while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
        fn = fn.fn
    return fn


def build_dtype(build: Build) -> Optional[torch.dtype]:
    """The dtype a build was declared for: that of its first floating-point pointer parameter (index tensors such
    as cu_seqlens or block tables may come first); None for a build with none (the dropout keep-mask helper)."""
    return next((DTYPES[t] for t in pointee_types(build) if t in DTYPES), None)


ATTENTION_KERNELS = ("attention_fwd", "attention_bwd_delta", "attention_dkdv", "attention_dq")
"""The builds ``kernels.attention`` launches (forward, then the backward's three passes)."""


def variant(build: Build) -> str:
    """The specialisation an attention build was declared for ("window", "dropout", ...; "" for the plain one),
    read from its label as ``kernels.attention.configs`` writes it."""
    return next((name for name in configs._VARIANTS if f" {name} " in f" {build.label} "), "")


def attention_builds(builds: Sequence[Build]) -> List[Build]:
    """The attention builds this phase can launch through ``kernels.attention`` with their config forced."""
    return [b for b in builds if b.kernel in ATTENTION_KERNELS and variant(b) != "varlen"]


def other_builds(builds: Sequence[Build]) -> List[Build]:
    """The attention builds launched by another entry point (decoding, varlen, the dropout-mask helper): the test
    suite checks those (tests/test_decode.py, tests/test_varlen.py, tests/test_attention_variants.py)."""
    checked = {id(b) for b in attention_builds(builds) + row_builds(builds)}
    return [b for b in builds if id(b) not in checked]


def row_builds(builds: Sequence[Build]) -> List[Build]:
    """The softmax and layer/RMS norm builds (their block follows from the row width; nothing is autotuned)."""
    return [b for b in builds if _python_fn(b).__module__ in ("kernels.softmax", "kernels.layernorm")]


def forced_config(build: Build) -> Dict[str, int]:
    """The ``use_config`` arguments that launch ``build``'s tile, warps and stages."""
    tile = {k: build.constexprs[k] for k in ("BLOCK_M", "BLOCK_N") if k in build.constexprs}
    return dict(tile, num_warps=build.num_warps, num_stages=build.num_stages)


def row_width(build: Build) -> int:
    """A row width whose launch config is exactly ``build``'s (BLOCK, SINGLE, num_warps), as the module's own
    ``_config`` chooses it: an odd width inside the block, or past the module's one-block limit for the looped
    path. LookupError if neither selects it."""
    module = sys.modules[_python_fn(build).__module__]
    block, single = build.constexprs["BLOCK"], build.constexprs["SINGLE"]
    for width in (block // 2 + 1, module.MAX_BLOCK + block // 2 + 1):
        if module._config(width) == (block, single, build.num_warps):
            return width
    raise LookupError(f"no row width selects {build.kernel} {build.label}")


@dataclass
class Run:
    """One implementation's outputs and, after a backward, its inputs' gradients."""

    outputs: List[torch.Tensor]
    grads: List[torch.Tensor]


def run_once(fn: Callable, inputs: Sequence[torch.Tensor], cast: Callable, dys: Optional[List[torch.Tensor]]) -> Run:
    """``fn`` on fresh leaves ``cast(input)``; backward from ``dys`` (one per output) unless None."""
    leaves = [cast(t.detach()).requires_grad_(dys is not None) for t in inputs]
    outputs = fn(*leaves)
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    if dys is None:
        return Run(outputs, [])
    torch.autograd.backward(outputs, [dy.to(o.dtype) for dy, o in zip(dys, outputs)])
    return Run(outputs, [leaf.grad for leaf in leaves])


@dataclass
class Problem:
    """A computation to check: the kernel, the same math as plain torch (``same``, run in float64 too), inputs,
    the names of its outputs and of its inputs' gradients, and whether the backward is checked."""

    kernel: Callable
    same: Callable
    inputs: List[torch.Tensor]
    output_names: List[str]
    grad_names: List[str]
    backward: bool


@dataclass
class Baselines:
    """The float64 reference and torch in the inputs' precision, and the upstream gradients both used."""

    exact: Run
    torch: Run
    dys: Optional[List[torch.Tensor]]


def baselines(problem: Problem) -> Baselines:
    dys = None
    if problem.backward:
        shapes = run_once(problem.same, problem.inputs, lambda t: t, None).outputs
        dys = [torch.randn_like(o) for o in shapes]
    return Baselines(run_once(problem.same, problem.inputs, torch.Tensor.double, dys),
                     run_once(problem.same, problem.inputs, lambda t: t, dys), dys)


def compare(name: str, actual: torch.Tensor, exact: torch.Tensor, same: torch.Tensor, factor: float) -> dict:
    """One check by the tests' rule; the verdict is ``tolerance.assert_close``'s own, the numbers its terms."""
    torch_error = tolerance.max_error(same, exact)
    try:
        tolerance.assert_close(actual, exact, same, factor, name=name)
        passed, reason = True, None
    except AssertionError as error:
        passed, reason = False, str(error)
    return {"name": name, "max_error": tolerance.max_error(actual, exact), "torch_error": torch_error,
            "factor": factor, "bound": factor * torch_error + tolerance.slack(actual, exact), "passed": passed,
            "reason": reason}


def check(problem: Problem, base: Baselines) -> List[dict]:
    """The kernel against the baselines: every output (forward rule) and, with a backward, every gradient."""
    got = run_once(problem.kernel, problem.inputs, lambda t: t, base.dys)
    checks = [compare(name, *values, tolerance.FORWARD) for name, *values in
              zip(problem.output_names, got.outputs, base.exact.outputs, base.torch.outputs)]
    checks += [compare(name, *values, tolerance.BACKWARD) for name, *values in
               zip(problem.grad_names, got.grads, base.exact.grads, base.torch.grads)]
    return checks


DROPOUT_P, DROPOUT_SEED = 0.2, 1234


def variant_arguments(name: str, shape: AttentionShape, dtype: torch.dtype, device: torch.device) -> dict:
    """``kernels.attention`` keywords that launch the ``name`` specialisation at ``shape``."""
    if name == "window":
        return dict(window_size=(shape.length // 3, 7))
    if name == "softcap":
        return dict(softcap=2.0)
    if name == "alibi":
        return dict(alibi_slopes=torch.linspace(0.05, 0.5, shape.heads, device=device))
    if name == "sinks":
        return dict(sinks=torch.linspace(-1.0, 2.0, shape.heads, device=device, dtype=dtype))
    if name == "dropout":
        return dict(dropout_p=DROPOUT_P)
    return {}


def attention_problem(dtype: torch.dtype, head_dim: int, causal: bool, shape: AttentionShape,
                      device: torch.device, variant_name: str = "") -> Problem:
    """Forward and backward attention at ``shape`` with one specialisation's arguments; kernels.attention is
    looked up per call (tests replace it). With dropout, the kernel runs from a fixed seed and the reference takes
    the keep-mask ``kernels.attention_dropout_mask`` draws from that same generator state."""
    torch.manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, shape.length, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(shape.batch, shape.kv_heads, shape.length, head_dim, dtype=dtype, device=device)
            for _ in range(2))
    options = variant_arguments(variant_name, shape, dtype, device)
    same_options = dict(options)
    if options.get("dropout_p"):
        torch.manual_seed(DROPOUT_SEED)
        same_options["dropout_mask"] = kernels.attention_dropout_mask(shape.batch, shape.heads, shape.length,
                                                                      shape.length, DROPOUT_P, device)

    def kernel(*qkv):
        torch.manual_seed(DROPOUT_SEED)
        return kernels.attention(*qkv, causal=causal, **options)

    return Problem(kernel, lambda *qkv: reference.attention(*qkv, causal=causal, **same_options),
                   [q, k, v], ["out"], ["dq", "dk", "dv"], backward=True)


def _softmax_same(causal: bool, log: bool) -> Callable:
    if log:
        return lambda x: torch.log_softmax(x * SOFTMAX_SCALE, -1)
    return lambda x: reference.softmax(x, -1, scale=SOFTMAX_SCALE, causal=causal)


def _norm_same(rms: bool, residual: bool) -> Callable:
    def same(x, *rest):
        h = x + rest[0] if residual else x
        params = rest[1:] if residual else rest
        y = F.rms_norm(h, h.shape[-1:], *params, eps=EPS) if rms else F.layer_norm(h, h.shape[-1:], *params, EPS)
        return (y, h) if residual else y
    return same


def _norm_kernel(rms: bool, residual: bool, options: dict) -> Callable:
    def kernel(x, *rest):
        if residual:
            fused = kernels.add_rms_norm if rms else kernels.add_layer_norm
            return fused(x, rest[0], x.shape[-1:], *rest[1:], eps=EPS, **options)
        return (kernels.rms_norm if rms else kernels.layer_norm)(x, x.shape[-1:], *rest, eps=EPS, **options)
    return kernel


def _norm_options(module, flags: dict) -> dict:
    """RMS norm's ``casting_mode`` that launches a build's ``CASTING`` flag (when the module has modes)."""
    if not flags["RMS"] or "CASTING" not in flags:
        return {}
    return {"casting_mode": next(name for name, code in module.CASTING_MODES.items() if code == flags["CASTING"])}


def row_problem(build: Build, rows: int, device: torch.device) -> Problem:
    """The softmax or norm call that launches ``build``: its flags, at :func:`row_width`; a backward build is
    checked forward and backward."""
    torch.manual_seed(0)
    flags, width, dtype = build.constexprs, row_width(build), build_dtype(build)
    backward = build.kernel.endswith("_bwd")
    x = torch.randn(rows, width, dtype=dtype, device=device)
    if build.kernel.startswith("_softmax"):
        causal, log = flags["CAUSAL"], flags["LOG"]
        kernel = ((lambda t: kernels.log_softmax(t, -1, scale=SOFTMAX_SCALE)) if log else
                  (lambda t: kernels.softmax(t, -1, scale=SOFTMAX_SCALE, causal=causal)))
        return Problem(kernel, _softmax_same(causal, log), [x], ["y"], ["dx"], backward)
    module = sys.modules[_python_fn(build).__module__]
    rms, residual = flags["RMS"], flags.get("HAS_RES", False) or flags.get("HAS_DH", False)
    params = [torch.randn(width, dtype=dtype, device=device) for _ in range(1 if rms else 2)]
    extra = [torch.randn_like(x)] if residual else []
    names = ["dx"] + ["dresidual"] * residual + ["dweight", "dbias"][:len(params)]
    return Problem(_norm_kernel(rms, residual, _norm_options(module, flags)), _norm_same(rms, residual), [x] + extra + params,
                   ["y", "h"][:1 + residual], names, backward)


def _verdict(checks: List[dict]) -> dict:
    """The record's summary of its checks: pass/fail and the worst check (largest error over bound)."""
    worst = max(checks, key=lambda c: c["max_error"] / c["bound"] if c["bound"] else float(c["max_error"] > 0))
    return {"status": "pass" if all(c["passed"] for c in checks) else "fail", "worst": worst["name"],
            "max_error": worst["max_error"], "bound": worst["bound"],
            "reason": next((c["reason"] for c in checks if not c["passed"]), None)}


def _describe(build: Build) -> dict:
    dtype = build_dtype(build)
    return {"phase": "configs", "kernel": build.kernel, "label": build.label, "default": build.default,
            "dtype": "-" if dtype is None else str(dtype).removeprefix("torch.")}


def _checked(describe: dict, problem: Callable[[], Problem], base: Callable[[Problem], Baselines],
             context) -> dict:
    """A config record: run the check inside ``context`` (an error is recorded, not raised)."""
    record = dict(describe, checks=[])
    try:
        p = problem()
        with context:
            record["checks"] = check(p, base(p))
        record.update(_verdict(record["checks"]))
    except Exception as error:  # noqa: BLE001  (recorded; the other configs still run)
        record.update(status="error", reason=f"{type(error).__name__}: {error}"[:300])
    return record


def config_items(builds: Sequence[Build]) -> List[tuple]:
    """(build, causal) for every attention build launched through ``kernels.attention`` (causal and not), then
    (build, None) for every row build and every other attention build; the default configs first, so a spent
    budget skips the alternatives."""
    items = [(b, causal) for b in attention_builds(builds) for causal in (True, False)]
    items += [(b, None) for b in row_builds(builds) + other_builds(builds)]
    return sorted(items, key=lambda item: not item[0].default)


def check_configs(device: DeviceInfo, budget: Budget, shape: AttentionShape = AttentionShape(), rows: int = ROWS,
                  builds: Optional[Sequence[Build]] = None) -> List[dict]:
    """Phase 2: one record per (attention build, causal) and per row build, with every check's error and bound.
    Attention baselines are computed once per (dtype, head dim, causal) group."""
    builds = all_builds() if builds is None else builds
    cache: Dict[tuple, Baselines] = {}

    def attention_baselines(key):
        return lambda p: cache[key] if key in cache else cache.setdefault(key, baselines(p))

    row = {id(b) for b in row_builds(builds)}

    def run_one(item):
        build, causal = item
        if causal is None and id(build) in row:
            return _checked(dict(_describe(build), width=row_width(build), rows=rows),
                            lambda: row_problem(build, rows, device.torch_device), baselines, contextlib.nullcontext())
        if causal is None:
            return dict(_describe(build), status="skipped",
                        reason="not launched by kernels.attention: the tests phase checks it")
        key = (build_dtype(build), build.constexprs["HEAD_DIM"], causal, variant(build))
        config = forced_config(build)
        return _checked(dict(_describe(build), causal=causal, config=config, variant=key[3] or "plain",
                             shape=[shape.batch, shape.heads, shape.kv_heads, shape.length, key[1]]),
                        lambda: attention_problem(*key[:3], shape, device.torch_device, key[3]),
                        attention_baselines(key), use_config(build.kernel, **config))

    return within(budget, config_items(builds), run_one, lambda item: _describe(item[0]))


# ---------------------------------------------------------------------------------------------- phases 3 and 4: timing
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
TOKENS, MODEL_DIM, HEAD_DIMS = 16384, 2048, (64, 128)
"""FlashAttention's benchmark shapes: batch = 16384 // seqlen, heads = 2048 // head dim."""
TIMED_DTYPES = ("float16", "bfloat16")
ROW_COUNT = 4096
ROW_WIDTHS = {"softmax": (1024, 4096, 16384, 32768), "layer_norm": (1024, 2048, 4096, 8192, 16384),
              "rms_norm": (1024, 2048, 4096, 8192, 16384)}


def attention_cases(dtypes: Sequence[str] = TIMED_DTYPES) -> List[Case]:
    """FlashAttention's benchmark grid, dtype by dtype (so a spent budget drops whole dtypes last first)."""
    return [Case("attention", mode, n, dtype=dtype, causal=causal, batch=TOKENS // n, heads=MODEL_DIM // d,
                 head_dim=d)
            for dtype in dtypes for d in HEAD_DIMS for causal in (False, True) for n in SEQLENS
            for mode in ("fwd", "fwd+bwd")]


def row_cases(dtypes: Sequence[str] = TIMED_DTYPES) -> List[Case]:
    return [Case(op, mode, width, dtype=dtype, rows=ROW_COUNT)
            for dtype in dtypes for op, widths in ROW_WIDTHS.items() for width in widths
            for mode in ("fwd", "fwd+bwd")]


def _sdpa_flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the backward follows the backend the forward chose
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return flash


def _liger(op: str) -> Callable[[], Callable]:
    def load():
        if op == "softmax":
            from liger_kernel.ops.softmax import LigerSoftmaxFunction  # optional dependency

            return LigerSoftmaxFunction.apply
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

        if op == "layer_norm":
            return lambda x, w, b: liger_layer_norm(x, w, b, EPS)
        return lambda x, w: liger_rms_norm(x, w, EPS)

    return load


def timed_providers(op: str) -> List[Provider]:
    """Ours and the competition: SDPA's flash backend and flash-attn, or torch and Liger-Kernel."""
    if op == "attention":
        return [provider(op, "triton"), Provider("torch-sdpa-flash", op, _sdpa_flash), provider(op, "flash-attn")]
    return [provider(op, "torch"), provider(op, "triton"), Provider("liger", op, _liger(op), triton=True)]


def _point(phase: str, case: Case, prov: Provider) -> dict:
    return {"phase": phase, "op": case.op, "mode": case.mode, "provider": prov.name, "length": case.length,
            "shape": list(case.shape), "dtype": case.dtype, "causal": case.causal if case.op == "attention" else None}


def time_points(device: DeviceInfo, budget: Budget, phase: str, cases: Sequence[Case]) -> List[dict]:
    """``benchmarks.runner.measure_point`` (do_bench time, TFLOPS or GB/s, memory) for every case and provider."""
    loaded = {}
    for op in dict.fromkeys(c.op for c in cases):
        for prov in timed_providers(op):
            try:
                loaded[(op, prov.name)] = prov.resolve()
            except Unavailable as error:
                loaded[(op, prov.name)] = error

    def run_one(item):
        case, prov = item
        fn = loaded[(case.op, prov.name)]
        if isinstance(fn, Unavailable):
            return {**_point(phase, case, prov), "status": "unavailable", "reason": str(fn)}
        return {**runner.measure_point(case, prov, fn, device, None, 0.0), "phase": phase}

    items = [(case, prov) for case in cases for prov in timed_providers(case.op)]
    return within(budget, items, run_one, lambda item: _point(phase, *item))


def time_attention(device: DeviceInfo, budget: Budget) -> List[dict]:
    """Phase 3: attention fwd and fwd+bwd at FlashAttention's benchmark shapes."""
    return time_points(device, budget, "attention", attention_cases())


def time_rows(device: DeviceInfo, budget: Budget) -> List[dict]:
    """Phase 4: softmax and layer/RMS norm, fwd and fwd+bwd, 4096 rows of realistic widths."""
    return time_points(device, budget, "rows", row_cases())


# ---------------------------------------------------------------------------------------------- phase 5: host overhead
OVERHEAD_CALLS = 50
OVERHEAD_TOP = 8


def overhead_cases(device: torch.device) -> Dict[str, Callable[[], object]]:
    """name -> one forward+backward call on tiny inputs (one row of 1024, or 1x1x16x64 attention), ours and torch's."""
    torch.manual_seed(0)
    x = torch.randn(1, 1024, device=device, dtype=torch.float16, requires_grad=True)
    w, b = (torch.randn(1024, device=device, dtype=torch.float16, requires_grad=True) for _ in range(2))
    q = torch.randn(1, 1, 16, 64, device=device, dtype=torch.float16, requires_grad=True)

    def both(f):
        return lambda: f().float().sum().backward()

    return {"layer_norm": both(lambda: kernels.layer_norm(x, 1024, w, b)),
            "torch layer_norm": both(lambda: F.layer_norm(x, (1024,), w, b)),
            "rms_norm": both(lambda: kernels.rms_norm(x, 1024, w)),
            "softmax": both(lambda: kernels.softmax(x)),
            "torch softmax": both(lambda: torch.softmax(x, -1)),
            "attention": both(lambda: kernels.attention(q, q, q, causal=True)),
            "torch sdpa": both(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))}


def profile_call(name: str, call: Callable[[], object], device: torch.device) -> dict:
    """Wall time per forward+backward call (synchronised at the end of :data:`OVERHEAD_CALLS` calls) and the
    :data:`OVERHEAD_TOP` functions of largest own time over those calls (cProfile), in µs per call."""
    import cProfile
    import pstats

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        call()
    synchronize()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(OVERHEAD_CALLS):
        call()
    synchronize()
    profiler.disable()
    wall = (time.perf_counter() - start) / OVERHEAD_CALLS * 1e6
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive calls, own s, total s, callers)}
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:OVERHEAD_TOP]
    return {"phase": "overhead", "op": name, "status": "ok", "us_per_call": round(wall, 1),
            "top": [{"function": f"{os.path.basename(file)}:{line}({function})", "calls": n // OVERHEAD_CALLS,
                     "own_us": round(own / OVERHEAD_CALLS * 1e6, 1)}
                    for (file, line, function), (n, _, own, _, _) in top]}


def time_overhead(device: DeviceInfo, budget: Budget) -> List[dict]:
    """Phase 5: host time per call of each op on tiny inputs, with its profile."""
    cases = overhead_cases(device.torch_device)
    return within(budget, list(cases.items()), lambda item: profile_call(*item, device.torch_device),
                  lambda item: {"phase": "overhead", "op": item[0]})


# ---------------------------------------------------------------------------------------------- the run and its files
PHASES = {"tests": run_tests, "configs": check_configs, "attention": time_attention, "rows": time_rows,
          "overhead": time_overhead}
FAILED = {"failed", "timeout", "fail", "error"}


def is_failure(record: dict) -> bool:
    """A failed test run or config check, or one of our kernels failing to run when timed (a competitor's
    error is recorded but is not ours)."""
    return record["status"] in FAILED and record.get("provider", "triton") == "triton"


def run_phase(name: str, device: DeviceInfo, seconds: float) -> tuple:
    """(records, summary) of one phase; an exception ends the phase and is recorded in its summary."""
    budget = Budget(seconds)
    try:
        recs, status, reason = PHASES[name](device, budget), "ok", None
    except Exception as error:  # noqa: BLE001  (recorded; the next phase still runs)
        recs, status, reason = [], "error", f"{type(error).__name__}: {error}"[:300]
    summary = {"phase": name, "status": status, "reason": reason, "budget_s": seconds,
               "duration_s": round(budget.elapsed(), 1), "records": len(recs),
               "skipped": sum(r["status"] == "skipped" for r in recs),
               "failed": sum(is_failure(r) for r in recs)}
    return recs, summary


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"cuda": torch.version.cuda}
    for package in ("flash-attn", "liger-kernel"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def document(device: DeviceInfo, config: dict, recs: List[dict], phases: List[dict]) -> dict:
    """The benchmarks' JSON document (device, versions, records) plus CUDA/optional versions and the phases."""
    doc = records.document("gpu-check", device, config, recs, [])
    doc["versions"].update(_versions())
    doc["phases"] = phases
    doc["status"] = "failed" if any(p["failed"] or p["status"] != "ok" for p in phases) else "ok"
    return doc


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _phases_section(doc: dict) -> str:
    rows = [(p["phase"], p["status"], p["duration_s"], p["budget_s"], p["records"], p["skipped"], p["failed"],
             p["reason"] or "") for p in doc["phases"]]
    return "## Phases\n\n" + _table(["phase", "status", "took s", "budget s", "records", "skipped", "failed",
                                     "note"], rows)


def _tests_section(recs: List[dict]) -> str:
    rows = [(r["command"], r["status"], ", ".join(f"{n} {k}" for k, n in r["counts"].items()) or "-",
             r["reason"] or "") for r in recs]
    return "## Test suite\n\n" + _table(["command", "status", "counts", "note"], rows)


def _overhead_section(recs: List[dict]) -> str:
    """One row per op: µs per forward+backward call on tiny inputs, then the functions that take most of it."""
    rows = [(r["op"], r.get("us_per_call", r["status"]),
             "; ".join(f"{t['function']} {t['own_us']} µs" for t in r.get("top", [])[:4]) or r.get("reason", ""))
            for r in recs]
    return "## Host overhead (tiny inputs, forward+backward)\n\n" + _table(["op", "µs per call", "largest own times"],
                                                                           rows)


def _ratio(record: dict) -> str:
    if record.get("bound") is None:
        return "-"
    return f"{record['max_error'] / record['bound']:.2f}" if record["bound"] else "inf" * (record["max_error"] > 0)


def _configs_section(recs: List[dict]) -> str:
    """Per kernel and dtype: how many configs passed, failed, errored or were skipped, and the worst error as a
    fraction of its bound; then every config that did not pass."""
    groups: Dict[tuple, List[dict]] = {}
    for r in recs:
        groups.setdefault((r["kernel"], r["dtype"]), []).append(r)
    rows = []
    for (kernel, dtype), group in groups.items():
        counts = [sum(r["status"] == s for r in group) for s in ("pass", "fail", "error", "skipped")]
        ratios = [r["max_error"] / r["bound"] for r in group if r.get("bound")]
        rows.append((kernel, dtype, len(group), *counts, f"{max(ratios):.2f}" if ratios else "-"))
    text = "## Config checks (error vs the tests' tolerance bound)\n\n" + _table(
        ["kernel", "dtype", "checks", "pass", "fail", "error", "skipped", "worst error/bound"], rows)
    bad = [r for r in recs if r["status"] in FAILED]
    if bad:
        text += "\n\nNot passing:\n\n" + _table(
            ["kernel", "config", "causal", "status", "check", "error/bound", "reason"],
            [(r["kernel"], r["label"], r.get("causal", "-"), r["status"], r.get("worst", "-"), _ratio(r),
              r["reason"]) for r in bad])
    return text


def _cell(record: dict) -> str:
    if record["status"] != "ok":
        return record["status"]
    speed = f"{record['tflops']:.0f} TFLOPS" if record.get("tflops") is not None else f"{record['gbps']:.0f} GB/s"
    return f"{record['time']['median_ms']:.3g} ms, {speed}"


def _timing_section(title: str, recs: List[dict], keys: Sequence[str]) -> str:
    """One row per point (``keys`` of its records), one column per provider: median ms and TFLOPS or GB/s."""
    providers = list(dict.fromkeys(r["provider"] for r in recs))
    rows: Dict[tuple, Dict[str, str]] = {}
    for r in recs:
        key = tuple("x".join(map(str, r[k])) if isinstance(r[k], list) else r[k] for k in keys)
        rows.setdefault(key, {})[r["provider"]] = _cell(r)
    reasons = {f"{r['provider']}: {r['reason']}" for r in recs if r["status"] not in ("ok", "skipped")}
    text = f"## {title}\n\n" + _table(list(keys) + providers,
                                       [key + tuple(cells.get(p, "-") for p in providers)
                                        for key, cells in rows.items()])
    return text + "".join(f"\n\n- {reason}" for reason in sorted(reasons))


def markdown(doc: dict) -> str:
    """The summary: device and versions, the phases, then one section per phase that ran."""
    by_phase: Dict[str, List[dict]] = {}
    for r in doc["records"]:
        by_phase.setdefault(r["phase"], []).append(r)
    v = doc["versions"]
    head = (f"# GPU check: {doc['device']['name']} ({doc['status']})\n\n"
            f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, flash-attn {v['flash-attn']}, "
            f"liger-kernel {v['liger-kernel']}; {doc['created']}. Times are triton.testing.do_bench medians "
            "measured on this GPU; attention TFLOPS count 4*B*H*N^2*D forward (x0.5 causal, x3.5 fwd+bwd).")
    sections = [head, _phases_section(doc)]
    if "tests" in by_phase:
        sections.append(_tests_section(by_phase["tests"]))
    if "configs" in by_phase:
        sections.append(_configs_section(by_phase["configs"]))
    if "attention" in by_phase:
        sections.append(_timing_section("Attention timing", by_phase["attention"],
                                        ["dtype", "causal", "mode", "shape"]))
    if "rows" in by_phase:
        sections.append(_timing_section("Softmax and norm timing", by_phase["rows"], ["op", "dtype", "mode", "shape"]))
    if "overhead" in by_phase:
        sections.append(_overhead_section(by_phase["overhead"]))
    return "\n\n".join(sections) + "\n"


def write(out_dir: str, doc: dict) -> List[str]:
    """``gpu_check.json`` and ``.csv`` (the benchmarks' writer) and ``gpu_check.md``; returns their paths."""
    written = records.write(out_dir, "gpu_check", doc)
    md_path = os.path.join(out_dir, "gpu_check.md")
    with open(md_path, "w") as f:
        f.write(markdown(doc))
    return written + [md_path]


# ---------------------------------------------------------------------------------------------- command line
def no_gpu_message(device: DeviceInfo) -> Optional[str]:
    """Why this process cannot run the check, or None when it can."""
    if not torch.cuda.is_available():
        return "gpu-check: no GPU here (torch.cuda.is_available() is False): nothing checked, nothing written."
    if device.kind != "cuda":
        return ("gpu-check: a GPU is visible but the kernels run in Triton's interpreter (TRITON_INTERPRET is set, "
                "or triton was imported before kernels): nothing checked, nothing written.")
    return None


def _budget(text: str) -> tuple:
    """'configs=300' -> ("configs", 300.0)."""
    name, _, seconds = text.partition("=")
    if name not in PHASES or not re.fullmatch(r"[0-9.]+", seconds):
        raise argparse.ArgumentTypeError(f"expected PHASE=SECONDS with PHASE one of {list(PHASES)}, got {text!r}")
    return name, float(seconds)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON, CSV and markdown (default "
                                                           f"{DEFAULT_OUT})")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES), help="only these phases")
    parser.add_argument("--budget", type=_budget, action="append", default=[], metavar="PHASE=SECONDS",
                        help="a phase's time budget (defaults: "
                             + ", ".join(f"{k}={v:.0f}" for k, v in BUDGETS.items()) + ")")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when everything that ran passed (or there is no GPU), 1 when a test or config failed or one of our
    kernels failed to run, 2 when a GPU is visible but the kernels would run interpreted."""
    args = _parser().parse_args(argv)
    device = detect()
    message = no_gpu_message(device)
    if message is not None:
        print(message)
        return 0 if not torch.cuda.is_available() else 2
    budgets = {**BUDGETS, **dict(args.budget)}
    recs, phases = [], []
    for name in args.phases:
        print(f"gpu-check: {name} (budget {budgets[name]:.0f} s) on {device.name}", flush=True)
        phase_records, summary = run_phase(name, device, budgets[name])
        recs += phase_records
        phases.append(summary)
    doc = document(device, {"phases": args.phases, "budgets": budgets}, recs, phases)
    written = write(args.out, doc)
    print(markdown(doc))
    print("wrote: " + ", ".join(written))
    return 0 if doc["status"] == "ok" else 1
