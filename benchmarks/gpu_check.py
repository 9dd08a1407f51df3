"""``python -m benchmarks gpu-check``: the one command for a lent GPU, measuring what issues #19-#22 need in one
ten-minute window.

Six phases in order of what a second of GPU time tells us, each with a time budget (``--budget PHASE=SECONDS``),
all together capped at :data:`TOTAL_S` so a 600 s command limit is never hit; an item that would start after its
phase's budget is spent is recorded as "skipped" with the reason:

1. ``attention``: fwd and fwd+bwd at FlashAttention's benchmark grid (16k tokens per batch, model width 2048;
   head dim 64/128, then 256), fp16 and bf16, ours against torch SDPA's flash and cuDNN backends and flash-attn,
   in ms and TFLOPS; the key shapes in both dtypes come first;
2. ``rows``: softmax, layer norm and RMS norm, fwd and fwd+bwd, 4096 rows of real models' hidden sizes and long
   rows (fp16 and bf16, then fp32 at two widths), against torch eager, torch.compile and Liger-Kernel, in GB/s
   and % of the GPU's HBM peak (layer norm's fwd+bwd also with its backward on one program per SM,
   :data:`ONE_PER_SM`);
3. ``overhead``: issue #19's GPU goals as pass/fail lines, host µs per call with real launches on tiny inputs for
   every op of ``benchmarks.overhead.cases``, where our calls' host time goes (cProfile), and one attention
   launch's host time layer by layer: autotuner, its memo, the direct launch (``benchmarks.launch_path``);
4. ``model``: ``benchmarks.model.run`` (training, prefill, decoding), ours against torch, until its deadline;
5. ``configs``: every registered build (``kernels.registry.all_builds``) run against the float64 reference by the
   tests' tolerance rule (``tests/tolerance.py``);
6. ``tests``: the project's test suite in a subprocess, killed at its budget (the least informative per second).

After every phase it writes ``gpu_check_<gpu>.json`` (every record, the device, versions, each phase's
duration), ``.csv`` and ``.md`` (the tables a README quotes, also printed at the end) into ``--out`` (default
``benchmarks/example``, where they are committed; on a lent machine pass ``--out $OUT`` and copy the three files
there), so a run killed early keeps the phases it finished. Without a CUDA GPU it prints one line saying so,
writes nothing and exits 0.
"""
import argparse
import contextlib
import gc
import importlib.util
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from kernels._rows import lanes_of
from kernels.attention import configs as attention_configs, mods
from kernels.registry import FORCEABLE, TRITON_DTYPES, Build, all_builds, use_config
from benchmarks import overhead, records, runner
from benchmarks.device import DeviceInfo, detect
from benchmarks.measure import make_step
from benchmarks.providers import (MODES, Case, Provider, Unavailable, compiled_per_shape, make_inputs,
                                  provider)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "example")
BUDGETS = {"attention": 200.0, "rows": 120.0, "overhead": 60.0, "model": 90.0, "configs": 45.0, "tests": 45.0}
"""Seconds per phase, in the order they run; ``--budget PHASE=SECONDS`` changes one."""
TOTAL_S = 570.0
"""All phases together stop this many seconds after the process started (:func:`startup_s`): a phase gets what is
left when it starts if that is less than its budget (the tests phase, last, absorbs an earlier phase's overrun),
leaving ~30 s of a 600 s limit for a last item's overrun, the files and the exit."""
STARTUP_TRUSTED_S = 120.0
"""The phases' total counts from the process's start (importing torch, triton and the kernels takes seconds of the
command's limit too); a start-up reading above this is taken for a misreading of /proc and ignored."""
MIN_PHASE_S = 5.0
"""A phase with less time left than this is recorded as skipped."""
PARTIAL_SAVE_S = 20.0
"""Inside a phase, the files are rewritten with its records so far at most this often."""
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
    """A phase's time allowance; an item may start while the time left covers the longest item seen so far.
    ``on_record`` (if any) is given the phase's records so far (``done``) as :meth:`keep` adds to them."""

    seconds: float
    start: float = field(default_factory=time.monotonic)
    longest: float = 0.0
    on_record: Optional[Callable[[List[dict]], None]] = None
    done: List[dict] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows_another(self) -> bool:
        return self.elapsed() + self.longest <= self.seconds

    def keep(self, recs: List[dict]) -> None:
        """Add ``recs`` to the phase's records so far and pass them all to ``on_record``."""
        self.done += recs
        if self.on_record is not None:
            self.on_record(self.done)


def within(budget: Budget, items: Iterable, run_one: Callable[[object], object],
           describe: Callable[[object], dict]) -> List[dict]:
    """``run_one(item)`` (a record, or a list of records) for each item while the budget allows; the rest become
    ``describe(item)`` records with status "skipped" and the reason."""
    out = []
    for item in items:
        if not budget.allows_another():
            out.append({**describe(item), "status": "skipped",
                        "reason": f"phase budget of {budget.seconds:.0f} s spent"})
            continue
        start = time.monotonic()
        result = run_one(item)
        result = result if isinstance(result, list) else [result]
        out += result
        budget.longest = max(budget.longest, time.monotonic() - start)
        budget.keep(result)
    return out


# ---------------------------------------------------------------------------------------------- phases 1 and 2: timing
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
TOKENS, MODEL_DIM = 16384, 2048
"""FlashAttention's benchmark shapes: batch = 16384 // seqlen, heads = 2048 // head dim."""
HEAD_DIMS = (128, 64, 256)
KEY_ATTENTION = {128: (512, 2048, 16384), 64: (512, 16384)}
"""Head dim -> the lengths timed first (causal and not, both dtypes) before the rest of the grid; head dim 256
comes last, where the budget still allows."""
TIMED_DTYPES = ("float16", "bfloat16")
ROW_OPS = ("softmax", "layer_norm", "rms_norm")
ROW_COUNT = 4096
ROW_WIDTHS = (1024, 4096, 8192, 2048, 768, 5120, 16384, 32768, 65536, 262144)
"""Real models' hidden sizes (BERT/GPT-2 768 to Llama-70B 8192), then long rows (a vocabulary's softmax), in
priority order."""
FP32_ROW_WIDTHS = (4096, 262144)
"""fp32 rows, timed after the 16-bit ones: a hidden size and the 262k-wide softmax of Quack's anchor (issue #21)."""
KEY_ROW_WIDTHS = (1024, 4096)
"""Widths torch.compile is timed at beside the eager providers; at the other widths it comes after every eager
point (a compile takes seconds, an eager point a fraction of one)."""
COMPILE_BACKEND = "inductor"


def attention_priority(head_dim: int, length: int) -> int:
    """0: a key shape, 1: the rest of head dims 64 and 128, 2: head dim 256."""
    if length in KEY_ATTENTION.get(head_dim, ()):
        return 0
    return 2 if head_dim == 256 else 1


def attention_cases(dtypes: Sequence[str] = TIMED_DTYPES) -> List[Case]:
    """FlashAttention's grid, fwd and fwd+bwd, in priority order, each shape in every dtype before the next, so a
    spent budget drops the least important shapes and never a whole dtype."""
    grid = sorted(((d, causal, n) for d in HEAD_DIMS for causal in (True, False) for n in SEQLENS),
                  key=lambda point: attention_priority(point[0], point[2]))
    return [Case("attention", mode, n, dtype=dtype, causal=causal, batch=TOKENS // n, heads=MODEL_DIM // d,
                 head_dim=d)
            for d, causal, n in grid for dtype in dtypes for mode in MODES]


def all_row_cases() -> List[Case]:
    """The rows phase's cases: 4096 rows of every width in fp16 and bf16, then fp32 at :data:`FP32_ROW_WIDTHS`."""
    return row_cases() + row_cases(("float32",), FP32_ROW_WIDTHS)


def row_cases(dtypes: Sequence[str] = TIMED_DTYPES, widths: Sequence[int] = ROW_WIDTHS,
              rows: int = ROW_COUNT) -> List[Case]:
    """Every row op, fwd and fwd+bwd, at ``rows`` x each width, widths in priority order."""
    return [Case(op, mode, width, dtype=dtype, rows=rows)
            for width in widths for dtype in dtypes for op in ROW_OPS for mode in MODES]


def _sdpa(backend: str) -> Callable[[], Callable]:
    """torch's SDPA held to one ``SDPBackend`` (FLASH_ATTENTION, CUDNN_ATTENTION): unavailable (AttributeError)
    where this torch lacks the backend; an error when it refuses the inputs."""
    def load():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = getattr(SDPBackend, backend)

        def sdpa(q, k, v, causal):
            with sdpa_kernel(chosen):  # the backward follows the backend the forward chose
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa

    return load


def _compiled(op: str) -> Callable[[], Callable]:
    """torch's own op under ``torch.compile``, compiled afresh for each new input shape
    (:func:`benchmarks.providers.compiled_per_shape`)."""
    return lambda: compiled_per_shape(provider(op, "torch").resolve(), COMPILE_BACKEND)


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


ONE_PER_SM = "triton-one-per-sm"
"""Our layer norm with its backward on one program per SM whatever its dweight/dbias partial rows cost: ours at
4096 fp16 rows runs 76 backward programs on 132 SMs to keep those rows within 5% of its bytes (issue #21,
``kernels.layernorm.PARTIAL_SHARE``); timed beside it (fwd+bwd), a GPU shows whether the fewer programs cost
bandwidth."""


@contextlib.contextmanager
def _one_program_per_sm():
    """``kernels.layernorm.PARTIAL_SHARE`` off inside the block."""
    module = importlib.import_module("kernels.layernorm")
    share, module.PARTIAL_SHARE = module.PARTIAL_SHARE, None
    try:
        yield
    finally:
        module.PARTIAL_SHARE = share


PROVIDER_CONTEXTS = {ONE_PER_SM: _one_program_per_sm}
"""Provider name -> the context its points are timed in."""


def timed_providers(op: str) -> List[Provider]:
    """Ours first, then the competition: SDPA's flash and cuDNN backends and flash-attn, or torch eager,
    torch.compile and Liger-Kernel (for layer norm, ours on :data:`ONE_PER_SM` too)."""
    if op == "attention":
        return [provider(op, "triton"), Provider("torch-sdpa-flash", op, _sdpa("FLASH_ATTENTION")),
                Provider("torch-sdpa-cudnn", op, _sdpa("CUDNN_ATTENTION")), provider(op, "flash-attn")]
    ours = provider(op, "triton")
    one_per_sm = [Provider(ONE_PER_SM, op, ours.load, triton=True)] if op == "layer_norm" else []
    return [ours, *one_per_sm, provider(op, "torch"), Provider("torch-compile", op, _compiled(op), compiles=True),
            Provider("liger", op, _liger(op), triton=True)]


def _point(phase: str, case: Case, prov: Provider) -> dict:
    return {"phase": phase, "op": case.op, "mode": case.mode, "provider": prov.name, "length": case.length,
            "shape": list(case.shape), "dtype": case.dtype, "causal": case.causal if case.op == "attention" else None}


def time_points(device: DeviceInfo, budget: Budget, phase: str, items: Sequence[tuple]) -> List[dict]:
    """``benchmarks.runner.measure_point`` (do_bench time, TFLOPS or GB/s and % of peak, memory) for each
    (case, provider) in order; each provider is loaded once per op."""
    loaded = {}

    def load(op: str, prov: Provider):
        if (op, prov.name) not in loaded:
            try:
                loaded[(op, prov.name)] = prov.resolve()
            except Exception as error:  # noqa: BLE001  (a package that fails to import, not only a missing one)
                loaded[(op, prov.name)] = error
        return loaded[(op, prov.name)]

    def run_one(item):
        case, prov = item
        fn = load(case.op, prov)
        if isinstance(fn, Exception):  # every point of the provider says why; the others are still timed
            unavailable = isinstance(fn, Unavailable)
            return {**_point(phase, case, prov), "status": "unavailable" if unavailable else "error",
                    "reason": str(fn) if unavailable else f"{type(fn).__name__}: {fn}"[:300]}
        with PROVIDER_CONTEXTS.get(prov.name, contextlib.nullcontext)():
            return {**runner.measure_point(case, prov, fn, device, None, 0.0), "phase": phase}

    return within(budget, items, run_one, lambda item: _point(phase, *item))


def points_of(cases: Sequence[Case]) -> List[tuple]:
    """(case, provider) for each case and each of its op's :func:`timed_providers`, in the cases' order
    (:data:`ONE_PER_SM` only with a backward: its forward is ours)."""
    return [(case, prov) for case in cases for prov in timed_providers(case.op)
            if not (prov.name == ONE_PER_SM and case.mode == "fwd")]


def row_items(cases: Sequence[Case]) -> List[tuple]:
    """(case, provider): every eager point and torch.compile at :data:`KEY_ROW_WIDTHS` first, in the cases'
    order, then torch.compile at the other widths."""
    def deferred(item) -> bool:
        case, prov = item
        return prov.name == "torch-compile" and case.length not in KEY_ROW_WIDTHS

    return sorted(points_of(cases), key=deferred)


def time_attention(device: DeviceInfo, budget: Budget, cases: Optional[Sequence[Case]] = None) -> List[dict]:
    """Phase 1: attention fwd and fwd+bwd at FlashAttention's benchmark grid."""
    return time_points(device, budget, "attention", points_of(attention_cases() if cases is None else cases))


def time_rows(device: DeviceInfo, budget: Budget, cases: Optional[Sequence[Case]] = None) -> List[dict]:
    """Phase 2: softmax and layer/RMS norm, fwd and fwd+bwd (:func:`all_row_cases` unless ``cases``)."""
    return time_points(device, budget, "rows", row_items(all_row_cases() if cases is None else cases))


# ---------------------------------------------------------------------------------------------- phase 3: host overhead
OVERHEAD_REPEATS, OVERHEAD_CALLS = 7, 50
"""``benchmarks.overhead.measure``'s rounds and calls per round (the minimum round is kept)."""
OVERHEAD_TOP = 8
GOAL_ROWS = (4096, 1024)
GOAL_FACTORS = {"fwd": 1.5, "fwd+bwd": 1.0}
"""Issue #19's GPU goals: softmax and the norms at GOAL_ROWS in fp16 take at most this times torch's time."""
GOAL_ATTENTION = (1, 8, 128, 64)
GOAL_ATTENTION_SLACK_US = 10.0
"""Issue #19's GPU goal: attention's forward at GOAL_ATTENTION (fp16, causal) within torch SDPA flash + 10 µs."""


def _host_us(call: Callable[[], object], device: torch.device) -> float:
    """Wall µs per call, the best of :data:`OVERHEAD_REPEATS` rounds of :data:`OVERHEAD_CALLS` back-to-back calls
    synchronised at the end (what a training loop sees: max(host time, GPU time)), after a warm-up call."""
    call()
    return min(overhead.time_call(call, device, OVERHEAD_CALLS) for _ in range(OVERHEAD_REPEATS))


def goal(device: DeviceInfo, text: str, case: Case, theirs: Provider, limit: Callable[[float], float],
         theirs_context=contextlib.nullcontext()) -> dict:
    """A goal line: our ``case`` (fwd, or fwd+bwd) against ``theirs`` (timed inside ``theirs_context``) by
    :func:`_host_us`; met when ours <= ``limit(theirs)``, "unmeasured" with the reason when either fails."""
    dev = device.torch_device
    inputs = make_inputs(case, dev)
    try:
        ours_us = _host_us(make_step(provider(case.op, "triton").resolve(), inputs), dev)
        with theirs_context:
            theirs_us = _host_us(make_step(theirs.resolve(), inputs), dev)
    except Exception as error:  # noqa: BLE001  (recorded; the other goals still run)
        return {"phase": "overhead", "kind": "goal", "goal": text, "status": "unmeasured",
                "reason": f"{type(error).__name__}: {error}"[:300]}
    limit_us = limit(theirs_us)
    return {"phase": "overhead", "kind": "goal", "goal": text, "ours_us": round(ours_us, 2),
            "torch_us": round(theirs_us, 2), "limit_us": round(limit_us, 2),
            "status": "met" if ours_us <= limit_us else "missed", "reason": None}


def goals(device: DeviceInfo) -> List[tuple]:
    """(text, zero-argument call returning the goal's record) for each of issue #19's GPU goals."""
    rows, width = GOAL_ROWS
    out = [(f"{op} {mode} {rows}x{width} fp16 <= {GOAL_FACTORS[mode]:g}x torch",
            Case(op, mode, width, dtype="float16", rows=rows), provider(op, "torch"),
            lambda us, factor=GOAL_FACTORS[mode]: factor * us, contextlib.nullcontext())
           for op in ROW_OPS for mode in MODES]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, length, head_dim = GOAL_ATTENTION
    out.append((f"attention fwd {batch}x{heads}x{length}x{head_dim} fp16 causal <= torch SDPA flash + "
                f"{GOAL_ATTENTION_SLACK_US:g} µs",
                Case("attention", "fwd", length, dtype="float16", causal=True, batch=batch, heads=heads,
                     head_dim=head_dim),
                provider("attention", "torch-sdpa"), lambda us: us + GOAL_ATTENTION_SLACK_US,
                sdpa_kernel(SDPBackend.FLASH_ATTENTION)))  # held around the timing: not entered per call
    return [(spec[0], lambda spec=spec: goal(device, *spec)) for spec in out]


def profile_call(name: str, call: Callable[[], object], device: torch.device) -> dict:
    """Wall time per call (synchronised at the end of :data:`OVERHEAD_CALLS` calls) and the :data:`OVERHEAD_TOP`
    functions of largest own time over those calls (cProfile), in µs per call."""
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
    return {"phase": "overhead", "kind": "profile", "op": name, "status": "ok", "us_per_call": round(wall, 1),
            "top": [{"function": f"{os.path.basename(file)}:{line}({function})", "calls": n // OVERHEAD_CALLS,
                     "own_us": round(own / OVERHEAD_CALLS * 1e6, 1)}
                    for (file, line, function), (n, _, own, _, _) in top]}


def host_times(device: DeviceInfo, name: str) -> List[dict]:
    """``benchmarks.overhead.measure`` of one op: ours, torch's and the minimal op's µs per call, forward,
    forward+backward and inference (real launches on a GPU, stubbed on CPU)."""
    return [{**r, "phase": "overhead", "kind": "host", "status": "ok"}
            for r in overhead.measure(device, [name], OVERHEAD_REPEATS, OVERHEAD_CALLS)]


def time_overhead(device: DeviceInfo, budget: Budget, names: Optional[Sequence[str]] = None) -> List[dict]:
    """Phase 3: the goals, then host µs per call of every op of ``benchmarks.overhead.cases`` (or ``names``),
    then the profile of our forward+backward call of each. On CPU the launches are stubbed (host path only)."""
    table = overhead.cases(device.torch_device)
    names = list(table) if names is None else list(names)
    def of_op(kind):
        return lambda name: {"phase": "overhead", "kind": kind, "op": name}

    stub = overhead.stubbed_launches() if device.kind == "cpu" else contextlib.nullcontext()
    with stub:
        recs = within(budget, goals(device), lambda item: item[1](),
                      lambda item: {"phase": "overhead", "kind": "goal", "goal": item[0]})
        recs += within(budget, names, lambda name: host_times(device, name), of_op("host"))
        recs += within(budget, names, lambda name: profile_call(
            name, overhead._with_backward(table[name][0]), device.torch_device), of_op("profile"))
    recs += within(budget, ["attention"], lambda _: launch_layers(device), lambda _: {"phase": "overhead",
                                                                                    "kind": "launch"})
    return recs


def launch_layers(device: DeviceInfo) -> List[dict]:
    """``benchmarks.launch_path.measure``: host µs of one attention launch per kernel through the autotuner, with
    its memo, as a direct launch of the compiled kernel, and the kernel's ``run`` alone (real launches on a GPU, a
    simulated sm_90 path on CPU); one "error" record with the reason if it fails (the phase's other records
    stand)."""
    from benchmarks import launch_path

    try:
        recs = launch_path.measure(device, OVERHEAD_REPEATS, OVERHEAD_CALLS)
    except Exception as error:  # noqa: BLE001  (recorded: a GPU run is not repeated for one table)
        return [{"phase": "overhead", "kind": "launch", "status": "error",
                 "reason": f"{type(error).__name__}: {error}"[:300]}]
    return [{**r, "phase": "overhead", "kind": "launch", "status": "ok"} for r in recs]


# ---------------------------------------------------------------------------------------------- phase 4: model
MODEL_REPEATS = 3
MODEL_RESERVE_S = 30.0
"""A model point (a torch.compile of a whole model) can take this long: none starts with less of the budget left."""


def time_model(device: DeviceInfo, budget: Budget) -> List[dict]:
    """Phase 4: ``benchmarks.model.points`` (every workload, provider and mode) until its deadline, each record
    kept as it comes; the points after the deadline are recorded as skipped."""
    from benchmarks import model  # transformers and the reference GPT: imported only for this phase

    deadline = budget.start + budget.seconds - min(MODEL_RESERVE_S, budget.seconds / 3)
    for record in model.points(device, quick=False, repeats=MODEL_REPEATS, deadline=deadline):
        budget.keep([{**record, "phase": "model"}])  # saved as they come: a model point can take a minute
    return budget.done


# ---------------------------------------------------------------------------------------------- phase 5: configs
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
    """The torch dtype a build was declared for (``Build.dtype``); None for one declared for another element type
    (the dropout keep-mask helper's u8)."""
    return DTYPES.get(build.dtype)


ATTENTION_KERNELS = ("attention_fwd", "attention_bwd_delta", "attention_dkdv", "attention_dq")
"""The builds ``kernels.attention`` launches (forward, then the backward's three passes)."""


def attention_builds(builds: Sequence[Build]) -> List[Build]:
    """The attention builds this phase can launch through ``kernels.attention`` with their config forced."""
    return [b for b in builds if b.kernel in ATTENTION_KERNELS and b.variant != "varlen"]


def other_builds(builds: Sequence[Build]) -> List[Build]:
    """The attention builds launched by another entry point (decoding, varlen, the dropout-mask helper): the test
    suite checks those (tests/test_decode.py, tests/test_varlen.py, tests/test_attention_variants.py)."""
    checked = {id(b) for b in attention_builds(builds) + row_builds(builds)}
    return [b for b in builds if id(b) not in checked]


def row_builds(builds: Sequence[Build]) -> List[Build]:
    """The softmax and layer/RMS norm builds (their block follows from the row width; nothing is autotuned)."""
    return [b for b in builds if _python_fn(b).__module__ in ("kernels.softmax", "kernels.layernorm")]


def forced_config(build: Build) -> Dict[str, int]:
    """The ``use_config`` arguments that launch ``build``'s tile (with its TMA switch), warps and stages, those its
    launcher takes (``kernels.registry.FORCEABLE``: the backward's delta pre-pass, loop-free, takes no stages)."""
    required, optional = FORCEABLE[build.kernel]
    config = dict({k: build.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "TMA") if k in build.constexprs},
                  num_warps=build.num_warps, num_stages=build.num_stages)
    return {k: v for k, v in config.items() if k in required + optional}


def row_width(build: Build, lanes: int = 32) -> int:
    """A row width whose launch config is exactly ``build``'s (BLOCK, SINGLE, num_warps), as the module's own
    ``_config`` chooses it on a GPU with warps of ``lanes`` threads (``kernels._rows.lanes_of``): an odd width inside
    the block, or past the module's one-block limit for the looped path; a multiple of 16 where the build declares
    ``n_cols`` divisible by 16 (Triton's specialisation of such widths: the norms' aligned rows). LookupError if
    neither selects it."""
    module = sys.modules[_python_fn(build).__module__]
    block, single = build.constexprs["BLOCK"], build.constexprs["SINGLE"]
    past = 16 if "n_cols" in build.divisible_by_16 else 1
    for width in (block // 2 + past, module.MAX_BLOCK + block // 2 + past):
        if row_config(build, width, lanes) == (block, single, build.num_warps):
            return width
    raise LookupError(f"no row width selects {build.kernel} {build.label}")


def row_config(build: Build, width: int, lanes: int = 32) -> tuple:
    """(BLOCK, SINGLE, num_warps) that ``build``'s module launches at ``width`` on a GPU with warps of ``lanes``
    threads (the norms' backward has a plan of its own; softmax's backward runs the forward's)."""
    module = sys.modules[_python_fn(build).__module__]
    if build.kernel == "_norm_bwd":
        return module._config(width, backward=True, lanes=lanes)
    return module._config(width, lanes=lanes)


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
CHUNKS, DOCUMENTS, SCORE_CAP = 3, 3, 2.0
"""The chunk and mask-mod checks split the length into this many chunks (``attention_chunk``) or packed documents
(``document_mask``); the score-mod check caps scores at ``SCORE_CAP`` (``softcap_score``)."""


def variant_arguments(name: str, shape: AttentionShape, dtype: torch.dtype,
                      device: torch.device) -> Tuple[dict, dict]:
    """(``kernels.attention`` keywords that launch the ``name`` specialisation at ``shape``, ``reference.attention``
    keywords of the same attention): a chunk or a document mask mod is the reference's bool mask, the softcap
    score mod its ``softcap``."""
    n = shape.length
    position = torch.arange(n, device=device)
    if name == "chunk":
        chunk = -(-n // CHUNKS)
        block = position // chunk
        return dict(attention_chunk=chunk), dict(mask=block[:, None] == block[None, :])
    if name == "mask_mod":
        doc_ids = (position * DOCUMENTS // n).to(torch.int32)
        block_mask = kernels.create_block_mask(mods.document_mask(doc_ids), None, None, n, n, device=device)
        return dict(mask_mod=block_mask), dict(mask=doc_ids[:, None] == doc_ids[None, :])
    if name == "score_mod":
        return dict(score_mod=mods.softcap_score(SCORE_CAP)), dict(softcap=SCORE_CAP)
    if name == "window":
        options = dict(window_size=(n // 3, 7))
    elif name == "softcap":
        options = dict(softcap=2.0)
    elif name == "alibi":
        options = dict(alibi_slopes=torch.linspace(0.05, 0.5, shape.heads, device=device))
    elif name == "sinks":
        options = dict(sinks=torch.linspace(-1.0, 2.0, shape.heads, device=device, dtype=dtype))
    elif name == "dropout":
        options = dict(dropout_p=DROPOUT_P)
    else:
        options = {}
    return options, dict(options)


def attention_problem(dtype: torch.dtype, head_dim: int, causal: bool, shape: AttentionShape,
                      device: torch.device, variant_name: str = "") -> Problem:
    """Forward and backward attention at ``shape`` with one specialisation's arguments; kernels.attention is
    looked up per call (tests replace it). With dropout, the kernel runs from a fixed seed and the reference takes
    the keep-mask ``kernels.attention_dropout_mask`` draws from that same generator state."""
    torch.manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, shape.length, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(shape.batch, shape.kv_heads, shape.length, head_dim, dtype=dtype, device=device)
            for _ in range(2))
    options, same_options = variant_arguments(variant_name, shape, dtype, device)
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
    flags, width, dtype = build.constexprs, row_width(build, lanes_of(device)), build_dtype(build)
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
    return Problem(_norm_kernel(rms, residual, _norm_options(module, flags)), _norm_same(rms, residual),
                   [x] + extra + params, ["y", "h"][:1 + residual], names, backward)


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


def tuned_here(build: Build, device: DeviceInfo) -> bool:
    """Whether attention ``build``'s tile is in an autotune list of this GPU's family (``configs.flavoured``): the
    configs phase also runs the other families' tiles (their numerics do not depend on the GPU), but one that
    needs more shared memory than this GPU has is no failure of ours."""
    kernel = build.kernel.removeprefix("attention_")
    if kernel not in attention_configs.KERNELS:
        return True
    tile = ((build.constexprs["BLOCK_M"], build.constexprs["BLOCK_N"], build.num_warps, build.num_stages),
            bool(build.constexprs.get("TMA")))
    family = attention_configs.device_family(device.torch_device)
    return tile in attention_configs.flavoured(kernel, family, build.head_dim, build.dtype == "fp32", build.variant,
                                               tma=True)


def check_configs(device: DeviceInfo, budget: Budget, shape: AttentionShape = AttentionShape(), rows: int = ROWS,
                  builds: Optional[Sequence[Build]] = None) -> List[dict]:
    """Phase 5: one record per (attention build, causal) and per row build, with every check's error and bound.
    Attention baselines are computed once per (dtype, head dim, causal) group."""
    builds = all_builds() if builds is None else builds
    cache: Dict[tuple, Baselines] = {}

    def attention_baselines(key):
        return lambda p: cache[key] if key in cache else cache.setdefault(key, baselines(p))

    row = {id(b) for b in row_builds(builds)}

    def run_one(item):
        build, causal = item
        if causal is None and id(build) in row:
            try:
                width = row_width(build, lanes_of(device.torch_device))
            except LookupError as error:  # a build for another GPU family (its warps differ): not launched here
                return dict(_describe(build), status="skipped", reason=f"{error} on this GPU")
            return _checked(dict(_describe(build), width=width, rows=rows),
                            lambda: row_problem(build, rows, device.torch_device), baselines, contextlib.nullcontext())
        if causal is None:
            return dict(_describe(build), status="skipped",
                        reason="not launched by kernels.attention: the tests phase checks it")
        key = (build_dtype(build), build.head_dim, causal, build.variant)
        config = forced_config(build)
        record = _checked(dict(_describe(build), causal=causal, config=config, variant=key[3] or "plain",
                               shape=[shape.batch, shape.heads, shape.kv_heads, shape.length, key[1]]),
                          lambda: attention_problem(*key[:3], shape, device.torch_device, key[3]),
                          attention_baselines(key), use_config(build.kernel, **config))
        if record["status"] == "error" and record["reason"].startswith("OutOfResources") and not tuned_here(build,
                                                                                                            device):
            record.update(status="skipped", reason="another GPU family's tile, more than this GPU holds (never "
                                                   "autotuned here): " + record["reason"])
        return record

    return within(budget, config_items(builds), run_one, lambda item: _describe(item[0]))


# ---------------------------------------------------------------------------------------------- phase 6: tests
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_counts(output: str) -> Dict[str, int]:
    """{outcome: count} from pytest's last summary line (e.g. "2 failed, 310 passed, 3 skipped in 90.1s")."""
    summary = next((line for line in reversed(output.splitlines()) if _COUNT.search(line)), "")
    return {outcome.rstrip("s") if outcome == "errors" else outcome: int(n) for n, outcome in _COUNT.findall(summary)}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module loaded without a spec
        return False


def _test_args() -> List[str]:
    """``tests -x``, spread over up to 16 workers when pytest-xdist is installed: on a GPU machine the suite's time
    goes to compiling kernels, which is CPU work (on an H200 with 16 cores, 8 workers ran 11% of it in 170 s, a
    cold Triton cache; 16 ran 490 tests in 135 s, a warm one)."""
    workers = min(16, os.cpu_count() or 1)
    return ["tests", "-x"] + (["-n", str(workers)] if installed("xdist") and workers > 1 else [])


def run_tests(device: DeviceInfo, budget: Budget, args: Optional[Sequence[str]] = None) -> List[dict]:
    """The test suite in a subprocess (``python -m pytest -q *args`` from the repository root), killed when the
    budget is spent; one record with the pass/fail counts and the end of the output ("unavailable" without
    pytest)."""
    command = [sys.executable, "-m", "pytest", "-q", *(_test_args() if args is None else args)]
    record = {"phase": "tests", "command": " ".join(command[2:])}
    if not installed("pytest"):
        return [{**record, "status": "unavailable", "reason": "pytest is not installed", "counts": {}, "tail": ""}]
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


# ---------------------------------------------------------------------------------------------- the run
PHASES = {"attention": time_attention, "rows": time_rows, "overhead": time_overhead, "model": time_model,
          "configs": check_configs, "tests": run_tests}
"""The phases in the order they run: the issues' measurements first, the test suite last."""
FAILED = {"failed", "timeout", "fail", "error"}


def is_failure(record: dict) -> bool:
    """A failed test run or config check, or one of our kernels or models failing to run when timed (a
    competitor's error is recorded but is not ours)."""
    return record["status"] in FAILED and "triton" in record.get("provider", "triton")


def phase_summary(name: str, status: str, reason: Optional[str], budget: Budget, recs: List[dict]) -> dict:
    """A phase's line in the files: its status, budget and duration, and its records counted by outcome."""
    return {"phase": name, "status": status, "reason": reason, "budget_s": round(budget.seconds, 1),
            "duration_s": round(budget.elapsed(), 1), "records": len(recs),
            "skipped": sum(r["status"] == "skipped" for r in recs), "failed": sum(is_failure(r) for r in recs)}


def run_phase(name: str, device: DeviceInfo, seconds: float,
              on_record: Optional[Callable[[List[dict], dict], None]] = None) -> tuple:
    """(records, summary) of one phase; an exception ends the phase and is recorded in its summary, with the
    records it kept. ``on_record(records so far, a "running" summary)`` as the phase keeps records."""
    budget = Budget(seconds)
    if on_record is not None:
        budget.on_record = lambda done: on_record(done, phase_summary(name, "running", None, budget, done))
    try:
        recs, status, reason = PHASES[name](device, budget), "ok", None
    except Exception as error:  # noqa: BLE001  (recorded; the next phase still runs)
        recs, status, reason = budget.done, "error", f"{type(error).__name__}: {error}"[:300]
    return recs, phase_summary(name, status, reason, budget, recs)


def _release(device: DeviceInfo) -> None:
    """Give the phase's cached GPU memory back (the test suite's subprocess and the next phase need it)."""
    gc.collect()
    if device.kind == "cuda":
        torch.cuda.empty_cache()


def run_phases(device: DeviceInfo, names: Sequence[str], budgets: Dict[str, float],
               save: Callable[[List[dict], List[dict]], object], total_s: Optional[float] = None):
    """The named phases in :data:`PHASES` order, each given min(its budget, what is left of ``total_s``,
    default :data:`TOTAL_S`), or recorded as skipped with less than :data:`MIN_PHASE_S` left; ``save(records,
    phases)`` after each and, every :data:`PARTIAL_SAVE_S` inside a phase, with that phase's records so far and its
    status "running", so a run killed later keeps what it measured. Returns the last ``save``'s result."""
    end = time.monotonic() + (TOTAL_S if total_s is None else total_s)
    recs, phases, saved = [], [], None
    last_save = [time.monotonic()]

    def save_partial(phase_records: List[dict], running: dict) -> None:
        if time.monotonic() - last_save[0] >= PARTIAL_SAVE_S:
            save(recs + phase_records, phases + [running])
            last_save[0] = time.monotonic()

    for name in (phase for phase in PHASES if phase in names):
        seconds = min(budgets[name], end - time.monotonic())
        if seconds < MIN_PHASE_S:
            phase_records = []
            summary = {"phase": name, "status": "skipped", "budget_s": 0.0, "duration_s": 0.0, "records": 0,
                       "skipped": 0, "failed": 0, "reason": f"{max(seconds, 0):.0f} s of the run's total left"}
        else:
            print(f"gpu-check: {name} (budget {seconds:.0f} s) on {device.name}", flush=True)
            phase_records, summary = run_phase(name, device, seconds, save_partial)
        print(f"gpu-check: {name} {summary['status']} in {summary['duration_s']} s: {summary['records']} records, "
              f"{summary['skipped']} skipped, {summary['failed']} failed", flush=True)
        recs += phase_records
        phases.append(summary)
        _release(device)
        saved = save(recs, phases)
        last_save[0] = time.monotonic()
    return saved


# ---------------------------------------------------------------------------------------------- the files
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
    """The benchmarks' JSON document (device, versions, records) plus CUDA/optional versions and the phases;
    "failed" when a phase errored or recorded a failure of ours, "incomplete" while a phase is still running."""
    doc = records.document("gpu-check", device, config, recs, [])
    doc["versions"].update(_versions())
    doc["phases"] = phases
    if any(p["failed"] or p["status"] == "error" for p in phases):
        doc["status"] = "failed"
    else:
        doc["status"] = "incomplete" if any(p["status"] == "running" for p in phases) else "ok"
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

def _speed(record: dict) -> Optional[float]:
    """TFLOPS (attention) or GB/s (rows) of a point that ran, else None."""
    if record["status"] != "ok":
        return None
    return record["tflops"] if record.get("tflops") is not None else record["gbps"]


def _cell(record: dict) -> str:
    """"TFLOPS (ms)" or "GB/s (% of HBM peak)"; the status of a point that did not run."""
    speed = _speed(record)
    if speed is None:
        return record["status"]
    if record.get("tflops") is not None:
        return f"{speed:.0f} ({record['time']['median_ms']:.3g} ms)"
    pct = record.get("pct_of_peak")
    return f"{speed:.0f}" + ("" if pct is None else f" ({pct:.0f}%)")


def _versus(cells: Dict[str, dict]) -> str:
    """Our speed over the best other provider's (not ours on another setting), where both ran."""
    ours = _speed(cells["triton"]) if "triton" in cells else None
    others = [_speed(r) for name, r in cells.items() if not name.startswith("triton") and _speed(r) is not None]
    return f"{ours / max(others):.2f}x" if ours and others else "-"


def _timing_section(title: str, recs: List[dict], key: Callable[[dict], tuple], header: Sequence[str]) -> str:
    """Per dtype: one row per point (``key(record)``, the ``header`` cells, sorted), one column per provider,
    then ours over the best other; the reasons of points that did not run below."""
    providers = list(dict.fromkeys(r["provider"] for r in recs))
    parts = [f"## {title}"]
    for dtype in dict.fromkeys(r["dtype"] for r in recs):
        points: Dict[tuple, Dict[str, dict]] = {}
        for r in recs:
            if r["dtype"] == dtype:
                points.setdefault(key(r), {})[r["provider"]] = r
        rows = [k + tuple(_cell(cells[p]) if p in cells else "-" for p in providers) + (_versus(cells),)
                for k, cells in sorted(points.items())]
        parts.append(f"### {dtype}\n\n" + _table(list(header) + providers + ["ours / best other"], rows))
    reasons = sorted({f"- {r['provider']}: {r['reason']}" for r in recs if r["status"] not in ("ok", "skipped")})
    return "\n\n".join(parts + ["\n".join(reasons)] * bool(reasons))


def _attention_section(recs: List[dict], doc: dict) -> str:
    return _timing_section(
        "Attention (cells: TFLOPS (median ms); FlashAttention's grid, 16k tokens per batch)", recs,
        lambda r: (r["shape"][3], r["causal"], r["mode"], r["length"], f"{r['shape'][0]}x{r['shape'][1]}"),
        ["head dim", "causal", "mode", "N", "batch x heads"])


def _rows_section(recs: List[dict], doc: dict) -> str:
    peak = doc["device"]["peak"]
    of_peak = f"% of {peak['spec']}'s {peak['bandwidth'] / 1e12:.2f} TB/s" if peak else "no known HBM peak"
    return _timing_section(
        f"Softmax and norms (cells: GB/s ({of_peak}); bytes a perfect kernel moves / median time; "
        f"{recs[0]['shape'][0]} rows)", recs, lambda r: (r["op"], r["mode"], r["length"]), ["op", "mode", "width"])


def _goal_line(r: dict) -> str:
    if r["status"] in ("met", "missed"):
        return (f"- {r['status'].upper()}: {r['goal']}: ours {r['ours_us']} µs, torch {r['torch_us']} µs, "
                f"limit {r['limit_us']} µs")
    return f"- {r['status'].upper()}: {r['goal']}: {r['reason']}"


def _host_rows(recs: List[dict]) -> List[tuple]:
    """(op, pass, ours µs, torch µs, minimal µs, ours/minimal, ours/torch) of ``overhead.measure``'s records."""
    by = {(r["op"], r["pass"], r["provider"]): r for r in recs}
    rows = []
    for op, passes in dict.fromkeys((r["op"], r["pass"]) for r in recs):
        ours, theirs, floor = (by[(op, passes, p)]["us_per_call"] for p in ("ours", "torch", "minimal"))
        rows.append((op, passes, ours, theirs, floor, f"{ours / floor:.2f}x", f"{ours / theirs:.2f}x"))
    return rows


def _overhead_section(recs: List[dict], doc: dict) -> str:
    """The goals as pass/fail lines, host µs per call of every op (real launches on a GPU), then where our
    forward+backward call's host time goes."""
    kind = {k: [r for r in recs if r["kind"] == k] for k in ("goal", "host", "profile")}
    ran = [r for r in kind["host"] if r["status"] == "ok"]
    launches = ran[0]["launches"] if ran else "real"
    parts = ["## Host overhead", "Issue #19's GPU goals:\n\n" + "\n".join(map(_goal_line, kind["goal"])),
             f"µs per call on tiny inputs ({launches} launches; min over rounds of synchronised calls):\n\n"
             + _table(["op", "pass", "ours", "torch", "minimal op", "ours / minimal", "ours / torch"],
                      _host_rows(ran))]
    not_run = [r["op"] for r in kind["host"] if r["status"] != "ok"]
    if not_run:
        parts.append("Not measured (phase budget spent): " + ", ".join(not_run))
    parts.append("Where our forward+backward call's host time goes (cProfile, own µs per call):\n\n" + _table(
        ["op", "µs per call", "largest own times"],
        [(r["op"], r.get("us_per_call", r["status"]),
          "; ".join(f"{t['function']} {t['own_us']}" for t in r.get("top", [])[:4])) for r in kind["profile"]]))
    parts += _launch_part([r for r in recs if r["kind"] == "launch"])
    return "\n\n".join(parts)


def _launch_part(recs: List[dict]) -> List[str]:
    """The attention launch layers (``benchmarks launch-path``) as one row per kernel, or why they are missing."""
    if not recs:
        return []
    if recs[0]["status"] != "ok":
        return [f"Attention launch layers: {recs[0]['status']}: {recs[0].get('reason')}"]
    by = {(r["kernel"], r["path"]): r["us_per_call"] for r in recs}
    paths = list(dict.fromkeys(r["path"] for r in recs))
    return [f"Attention launch layers (`benchmarks launch-path`, {recs[0]['how']}; host µs per launch):\n\n"
            + _table(["kernel", *paths], [(kernel, *(by[kernel, path] for path in paths))
                                          for kernel in dict.fromkeys(r["kernel"] for r in recs)])]


def _model_section(recs: List[dict], doc: dict) -> str:
    """One row per (workload, provider, mode): ms per step, tokens/s and tokens/s over the best torch provider's
    (ours: a provider whose name says triton)."""
    best: Dict[str, float] = {}
    for r in recs:
        if r["status"] == "ok" and "triton" not in r["provider"]:
            best[r["workload"]] = max(best.get(r["workload"], 0.0), r["tokens_per_s"])
    rows = [(r["workload"], r["provider"], r["mode"], r["ms_per_step"] if r["status"] == "ok" else r["status"],
             r["tokens_per_s"] or "-",
             f"{r['tokens_per_s'] / best[r['workload']]:.2f}x" if r["status"] == "ok" and best.get(r["workload"])
             else "-")
            for r in recs]
    reasons = sorted({f"- {r['provider']} {r['mode']}: {r['reason']}" for r in recs
                      if r["status"] not in ("ok", "skipped")})
    table = _table(["workload", "provider", "mode", "ms/step", "tokens/s", "vs best torch"], rows)
    return "\n\n".join(["## Model (end to end)", table] + ["\n".join(reasons)] * bool(reasons))


SECTIONS = {"attention": _attention_section, "rows": _rows_section, "overhead": _overhead_section,
            "model": _model_section, "configs": lambda recs, doc: _configs_section(recs),
            "tests": lambda recs, doc: _tests_section(recs)}


def markdown(doc: dict) -> str:
    """The summary: device and versions, the phases, then one section per phase that recorded something."""
    by_phase: Dict[str, List[dict]] = {}
    for r in doc["records"]:
        by_phase.setdefault(r["phase"], []).append(r)
    v = doc["versions"]
    head = (f"# GPU check: {doc['device']['name']} ({doc['status']})\n\n"
            f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, flash-attn {v['flash-attn']}, "
            f"liger-kernel {v['liger-kernel']}; {doc['created']}. Times are triton.testing.do_bench medians "
            "measured on this GPU; attention TFLOPS count 4*B*H*N^2*D forward (x0.5 causal, x3.5 fwd+bwd).")
    sections = [head, _phases_section(doc)]
    sections += [_rendered(name, section, by_phase[name], doc) for name, section in SECTIONS.items()
                 if name in by_phase]
    return "\n\n".join(sections) + "\n"


def _rendered(name: str, section: Callable[[List[dict], dict], str], recs: List[dict], doc: dict) -> str:
    """``section(recs, doc)``, or a line saying why it could not be rendered: the summary is rewritten after every
    phase, and a record it did not expect must not end the run (the JSON and CSV hold every record)."""
    try:
        return section(recs, doc)
    except Exception as error:  # noqa: BLE001  (reported in the summary itself)
        return f"## {name}\n\nThis section could not be rendered ({type(error).__name__}: {error}); see the JSON."


def gpu_slug(name: str) -> str:
    """The GPU's model for file names: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100";
    else the whole name in lower case, dashed."""
    model = re.search(r"\b[A-Za-z]+\d{2,}[A-Za-z]*\b", name)
    return (model.group(0) if model else "-".join(re.findall(r"[A-Za-z0-9]+", name))).lower()


def write(out_dir: str, doc: dict) -> List[str]:
    """``gpu_check_<gpu>.json`` and ``.csv`` (the benchmarks' writer) and ``.md``; returns their paths."""
    name = f"gpu_check_{gpu_slug(doc['device']['name'])}"
    written = records.write(out_dir, name, doc)
    md_path = os.path.join(out_dir, f"{name}.md")
    with records.replaced(md_path) as f:
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


def startup_s() -> float:
    """Seconds since this process started, by Linux's /proc (its start in clock ticks after boot, and the uptime);
    0 where that cannot be read or the reading is not plausible (negative, above :data:`STARTUP_TRUSTED_S`)."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = float(f.read().rpartition(")")[2].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        seconds = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    return seconds if 0.0 <= seconds <= STARTUP_TRUSTED_S else 0.0


def _budget(text: str) -> tuple:
    """'configs=300' -> ("configs", 300.0)."""
    name, _, seconds = text.partition("=")
    if name not in PHASES:
        raise argparse.ArgumentTypeError(f"expected PHASE=SECONDS with PHASE one of {list(PHASES)}, got {text!r}")
    if not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", seconds):  # a finite float() of it, never negative
        raise argparse.ArgumentTypeError(f"expected PHASE=SECONDS with SECONDS a number >= 0, got {text!r}")
    return name, float(seconds)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=records.out_dir, default=DEFAULT_OUT,
                        help=f"folder for gpu_check_<gpu>.json/.csv/.md (default {os.path.relpath(DEFAULT_OUT, ROOT)})")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES),
                        help="only these phases (they still run in the order above)")
    parser.add_argument("--budget", type=_budget, action="append", default=[], metavar="PHASE=SECONDS",
                        help="a phase's time budget (defaults: "
                             + ", ".join(f"{k}={v:.0f}" for k, v in BUDGETS.items())
                             + f"; all phases together stop at {TOTAL_S:.0f} s)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when everything that ran passed (or there is no GPU), 1 when a test or config failed, a phase
    errored or one of our kernels failed to run, 2 when a GPU is visible but the kernels would run interpreted."""
    parser = _parser()
    args = parser.parse_args(argv)
    device = detect()
    message = no_gpu_message(device)
    if message is not None:
        print(message)
        return 0 if not torch.cuda.is_available() else 2
    os.makedirs(args.out, exist_ok=True)  # judged writable by --out's type, before the first phase
    budgets = {**BUDGETS, **dict(args.budget)}
    started = startup_s()
    config = {"phases": args.phases, "budgets": budgets, "total_s": TOTAL_S, "startup_s": round(started, 1)}
    print(f"gpu-check on {device.name}: started {started:.0f} s ago; phases {', '.join(args.phases)}; all of them "
          f"stop {TOTAL_S:.0f} s after the start; files go to {args.out} after each phase", flush=True)

    def save(recs: List[dict], phases: List[dict]) -> tuple:
        doc = document(device, config, recs, phases)
        return doc, write(args.out, doc)

    doc, written = run_phases(device, args.phases, budgets, save, TOTAL_S - started)
    print(markdown(doc))
    print("wrote: " + ", ".join(written))
    return 0 if doc["status"] == "ok" else 1
