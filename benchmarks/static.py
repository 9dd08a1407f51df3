"""``python -m benchmarks static``: compile every registered kernel build for real GPUs, on a machine without one.

Each (build, target) of ``kernels.registry.all_builds()`` is compiled ahead of time with ``triton.compile`` for
sm_80 (A100), sm_90 (H100), sm_100 (B200) and, with ``--arch``, gfx90a (MI200) / gfx942 (MI300), and reported:
registers per thread, spill stores/loads, stack, shared memory against the per-block limit, an occupancy
estimate, tensor-core MMA and other notable SASS instruction counts (``v_mfma`` and the amdgcn register metadata
on AMD), and the compile time. It says nothing about speed: no kernel runs. :func:`problems` is the bar a
default is held to on its family's target: it compiles, spills nothing (bytes on NVIDIA; VGPRs or SGPRs on AMD),
fits the per-block shared memory (LDS), for an fp16/bf16 kernel calling ``tl.dot``, uses the target's own
MMA (``Arch.mma``: HGMMA on sm_90, UTC*MMA on sm_100, v_mfma on AMD), and, built with its ``TMA`` constexpr on
(tensor descriptors), loads through TMA (UTMALDG in the SASS) on NVIDIA.

The compiles happen in child processes started with ``TRITON_INTERPRET=0`` (``@triton.jit`` must build real
``JITFunction``s, which a process running the interpreter cannot), each with its own throw-away Triton cache. So
the report also works from inside an interpreted test run, and leaves the user's cache alone.

Default configurations: in each (kernel, family, dtype, head dim) group, the family being one of :data:`FAMILIES`
(so a norm kernel with an RMS switch has defaults for each), the builds marked ``Build.default`` (the config a GPU
runs first; a kernel without autotuning may mark several, one per row-width config). A group that marks none
(a build list written without the flag, such as the tests' own) falls back to its first registered build, so
every group has a default held to the no-spill bar. A default that names its ``Build.families`` is held to it only
on those families' architectures (:func:`on_family`). ``--quick`` keeps the default fp16 builds at head dim 64
and 128 (and at no head dim, for the norms/softmax); ``--defaults`` keeps every default (each dtype, head dim and
specialisation): the set the no-spill bar is about. Both compile each build only for the architectures of its
families (an sm_90 TMA build is not compiled for sm_80, nor an AMD wave64 one for NVIDIA); without either, every
selected build is compiled for every ``--arch``.
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.records import out_dir
from benchmarks.gpu_build import ARCHS
from benchmarks.progress import progress_bar

DEFAULT_ARCHS = ("sm_80", "sm_90", "sm_100")
PROVIDER = "kernels.registry:all_builds"
REPO = Path(__file__).resolve().parent.parent
QUICK_HEAD_DIMS = (None, 64, 128)
# The kernel families the report holds to its bar, matched against "kernel variant" (``Build.kernel`` and
# ``Build.variant``) in this order: one jit function may serve several (e.g. a norm kernel with an RMS switch), so
# the variant decides too. A build matching none belongs to the family "other" (the tests' toy kernels; the
# package's own builds must all have a family).
FAMILIES = {
    "attention decode": r"(attn|attention).*decode",
    "attention forward": r"(attn|attention).*(fwd|forward|dropout_mask)",
    "attention backward": r"(attn|attention).*(bwd|backward|dq|dk|dv|delta|preprocess)",
    "softmax": r"softmax",
    "layer norm": r"layer_?norm|\blayer\b",
    "rms norm": r"\brms|rms_?norm",
}
OTHER = "other"
# Family-table defaults allowed another MMA than their target's own, (arch, kernel, head dim): why. wgmma and
# tcgen05 need 64 rows in a dot's output tile; these defaults have 32 (16x32 dK/dV, 32x32 dQ on sm_90) and every
# larger tile tried spills (sm_100 dK/dV: 16x64 112 B, 32x64 328 B). (sm_90's dropout forward at d256, 32x32 on
# pointers, runs 64x32 on wgmma first since it loads through TMA: configs._TMA_FIRST.) The decode kernel's tiles hold
# a step's packed query rows, 16 or 32 (64 only at d64): HMMA, which costs a kernel bound by reading the cache nothing.
OWN_MMA_EXCEPTIONS = {
    ("sm_90", "attention_dkdv", 256): "16x32",
    ("sm_90", "attention_dq", 256): "32x32",
    ("sm_100", "attention_dkdv", 256): "16x32",
    **{(arch, "attention_decode", d): "16-32 rows" for arch in ("sm_90", "sm_100") for d in (64, 128, 256)},
}


def load_builds(provider: str) -> list:
    """The builds of ``"module:function"`` (default: every build registered in ``kernels.registry``)."""
    module, _, name = provider.partition(":")
    return getattr(importlib.import_module(module), name)()


def describe(build) -> Dict[str, object]:
    """Kernel, family, label, dtype, head dim (None if none), launch options, specialisation and whether it is
    built on tensor descriptors (a ``TMA`` constexpr on), from ``build``'s fields."""
    text = f"{build.kernel} {build.variant}"
    family = next((f for f, pattern in FAMILIES.items() if re.search(pattern, text, re.IGNORECASE)), OTHER)
    return {"kernel": build.kernel, "family": family, "label": build.label, "dtype": build.dtype,
            "head_dim": build.head_dim, "num_warps": build.num_warps, "num_stages": build.num_stages,
            "families": list(build.families), "variant": build.variant, "tma": bool(build.constexprs.get("TMA"))}


def on_family(build, arch: str) -> bool:
    """Whether ``arch`` runs one of ``build``'s families (``Build.families``: 80, 90, 100 or "gfx942", the tile
    table ``Arch.family`` names; every AMD target runs gfx942's); a build naming no family covers all."""
    return not build.families or ARCHS[arch].family in build.families


def select(builds: Sequence, kernel: Optional[str] = None, quick: bool = False,
           defaults_only: bool = False) -> List[Tuple[int, bool]]:
    """(index into ``builds``, is-default) for the builds to compile, in registration order."""
    infos = [describe(b) for b in builds]
    groups = {}
    for i, info in enumerate(infos):
        groups.setdefault((info["kernel"], info["family"], info["dtype"], info["head_dim"]), []).append(i)
    defaults = set()
    for members in groups.values():
        defaults.update([i for i in members if builds[i].default] or members[:1])
    chosen = [i for i, info in enumerate(infos) if (kernel is None or kernel in info["kernel"])
              and (i in defaults or not defaults_only)]
    if quick:
        quick_ones = [i for i in chosen if i in defaults
                      and infos[i]["dtype"] == "fp16" and infos[i]["head_dim"] in QUICK_HEAD_DIMS]
        covered = {(infos[i]["kernel"], infos[i]["family"]) for i in quick_ones}
        # A kernel with no fp16 build at those head dims still gets its first default build compiled.
        extra = {}
        for i in chosen:
            key = (infos[i]["kernel"], infos[i]["family"])
            if i in defaults and key not in covered:
                extra.setdefault(key, i)
        chosen = sorted(quick_ones + list(extra.values()))
    return [(i, i in defaults) for i in chosen]


def pairs(builds: Sequence, selected: Sequence[Tuple[int, bool]], archs: Sequence[str],
          own_families: bool) -> List[Tuple[int, str]]:
    """The (build index, arch) pairs to compile: each selected build for every arch, or with ``own_families``
    (--quick, --defaults) only for the archs whose tile tables hold it (:func:`on_family`): what a GPU runs."""
    return [(i, arch) for i, _ in selected for arch in archs if not own_families or on_family(builds[i], arch)]


def run_report(archs: Sequence[str] = DEFAULT_ARCHS, provider: str = PROVIDER, kernel: Optional[str] = None,
               quick: bool = False, jobs: int = 2, progress: bool = False,
               defaults_only: bool = False) -> List[Dict[str, object]]:
    """Compile the selected builds for ``archs`` in up to ``jobs`` interpreter-free child processes.

    Returns one record per (build, arch): :func:`describe`'s fields, ``arch``, ``default``, and either the
    figures of :func:`benchmarks.gpu_build.compile_build` or ``error`` (the build did not compile, or its worker
    process died first).
    """
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ValueError(f"archs: unknown {unknown}; expected some of {list(ARCHS)}")
    builds = load_builds(provider)
    selected = select(builds, kernel, quick, defaults_only)
    work = pairs(builds, selected, archs, quick or defaults_only)
    results = {}
    with tempfile.TemporaryDirectory(prefix="static-build-") as tmp:
        chunks = [work[k::jobs] for k in range(min(jobs, len(work)))]
        workers = [_start_worker(builds, provider, chunk, tmp, k) for k, chunk in enumerate(chunks)]
        try:
            _wait(workers, len(work), progress)
        finally:
            for proc, _, _ in workers:
                if proc.poll() is None:  # only when interrupted: do not leave compilers running
                    proc.kill()
                    proc.wait()
        for (proc, out, log), chunk in zip(workers, chunks):
            with open(out) as f:
                for line in f:
                    rec = json.loads(line)
                    results[rec.pop("index"), rec.pop("arch")] = rec
            if proc.returncode != 0:
                with open(log) as f:
                    died = {"error": f"build worker exited with status {proc.returncode} before this build:\n"
                                     + f.read()[-2000:]}
                for key in chunk:
                    results.setdefault(key, died)
    is_default = dict(selected)
    return [{**describe(builds[i]), "arch": arch, "default": is_default[i] and on_family(builds[i], arch),
             **results[i, arch]} for i, arch in work]


def _start_worker(builds: Sequence, provider: str, chunk: List[Tuple[int, str]], tmp: str, k: int):
    """Start one child process (interpreter off, fresh Triton cache) on ``chunk``: (Popen, results path, log)."""
    task, out, log = (os.path.join(tmp, f"worker{k}{ext}") for ext in (".task.json", ".jsonl", ".log"))
    with open(task, "w") as f:  # kernel and label let the child check it sees the same registry order
        work = [[i, arch, builds[i].kernel, builds[i].label] for i, arch in chunk]
        json.dump({"provider": provider, "work": work}, f)
    open(out, "w").close()
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=os.path.join(tmp, f"cache{k}"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.static", "--worker", task, out], cwd=REPO,
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return proc, out, log


def _wait(workers, total: int, progress: bool) -> None:
    """Wait for the workers, showing a progress bar (on stderr) counted from their result lines."""
    with progress_bar(total, "compiling", "build", enabled=progress) as bar:
        while True:
            finished = all(proc.poll() is not None for proc, _, _ in workers)
            done = 0
            for _, out, _ in workers:
                with open(out) as f:
                    done += sum(1 for _ in f)
            if bar is not None:
                bar.update(done - bar.n)
            if finished:
                return
            time.sleep(0.5)


def _worker(task_path: str, out_path: str) -> int:
    """Child process: compile the (build index, arch) pairs of the task file, one JSON line per result."""
    from benchmarks.gpu_build import compile_build, describe_failure

    with open(task_path) as f:
        task = json.load(f)
    builds = load_builds(task["provider"])
    with open(out_path, "w") as out:
        for index, arch, kernel, label in task["work"]:
            build = builds[index]
            if (build.kernel, build.label) != (kernel, label):
                raise RuntimeError(f"the registry changed order between processes: build {index} is "
                                   f"{build.kernel} {build.label!r}, expected {kernel} {label!r}")
            try:
                figures = compile_build(build, ARCHS[arch])
            except Exception as error:  # a build that does not compile is a result to report, not a crash
                figures = {"error": describe_failure(error)}
            out.write(json.dumps({"index": index, "arch": arch, **figures}) + "\n")
            out.flush()
    return 0


COLUMNS = ("kernel", "config", "warps/stages", "arch", "regs", "spill st/ld B", "stack B", "smem KB", "CTAs/SM", "MMA",
           "LDG/STG", "LDGSTS/TMA", "LDSM", "compile s")


def row(rec: Dict[str, object]) -> List[str]:
    """One table row; AMD rows show VGPR/SGPR/AGPR counts, register spill counts and ``v_mfma`` in those columns."""
    head = [rec["kernel"], rec["label"], f"{rec['num_warps']}/{rec['num_stages']}", rec["arch"]]
    if "error" in rec:
        return head + ["FAILED"] + [""] * (len(COLUMNS) - len(head) - 1)
    smem = f"{rec['shared'] / 1024:.1f}" + ("" if rec["shared_fits"] else " (too big)")
    if ARCHS[rec["arch"]].backend == "hip":
        return head + [
            f"v{rec['vgpr_count']} s{rec['sgpr_count']} a{rec['agpr_count']}",
            f"v{rec['vgpr_spill_count']}/s{rec['sgpr_spill_count']} regs", str(rec["private_segment_fixed_size"]),
            smem, "-", f"{rec['mfma']} v_mfma", "-", "-", "-", f"{rec['compile_s']:.2f}"]
    mma = ", ".join(f"{n} {op}" for op, n in sorted(rec["mma_ops"].items())) or "0"
    return head + [
        str(rec["registers"]), f"{rec['spill_stores']}/{rec['spill_loads']}", str(rec["stack"]), smem,
        f"{rec['ctas_per_sm']} ({rec['limited_by']})", mma, f"{rec['LDG']}/{rec['STG']}",
        f"{rec['LDGSTS']}/{rec['TMA']}", str(rec["LDSM"]), f"{rec['compile_s']:.2f}"]


def text_table(records: Sequence[Dict[str, object]]) -> str:
    """A fixed-width table for the terminal."""
    rows = [list(COLUMNS)] + [row(r) for r in records]
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(records: Sequence[Dict[str, object]]) -> str:
    """The same table in markdown (for the README)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row(r)) + " |" for r in records]
    return "\n".join(lines) + "\n\n" + legend(records) + "\n"


def legend(records: Sequence[Dict[str, object]]) -> str:
    """Which GPU each target in the records stands for."""
    archs = dict.fromkeys(r["arch"] for r in records)
    return ", ".join(f"{arch} = {ARCHS[arch].gpu}" for arch in archs)


def last_line(text: str) -> str:
    """The last non-empty line of an error (Triton puts the cause after the source excerpt)."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def problems(rec: Dict[str, object], calls_dot: bool) -> List[str]:
    """How a record misses the bar (see the module doc; ``calls_dot``: the kernel calls ``tl.dot``); [] if not.
    Spills are asked of default configs only, the shared memory of every build, the target's own MMA of the
    defaults of family tables (``Build.families``) outside :data:`OWN_MMA_EXCEPTIONS`, TMA loads of the defaults
    built on tensor descriptors (a compiler that quietly fell back to pointers would lose what they are for)."""
    where = f"{rec['kernel']} [{rec['label']} w{rec['num_warps']} s{rec['num_stages']}] on {rec['arch']}"
    if "error" in rec:
        return [f"{where}: does not compile: {last_line(rec['error'])}"]
    found = []
    if rec["default"] and rec["spills"]:
        unit = "registers" if ARCHS[rec["arch"]].backend == "hip" else "B"
        found.append(f"{where}: spills {rec['spills']} {unit} (default config)")
    if not rec["shared_fits"]:
        found.append(f"{where}: {rec['shared']} B of shared memory > the {rec['shared_limit']} B per block")
    if calls_dot and rec["dtype"] in ("fp16", "bf16"):
        own = ARCHS[rec["arch"]].mma
        if rec["mma"] == 0:
            found.append(f"{where}: calls tl.dot but uses no tensor-core MMA")
        elif (rec["default"] and rec.get("families") and not any(re.fullmatch(own, op) for op in rec["mma_ops"])
              and (rec["arch"], rec["kernel"], rec["head_dim"]) not in OWN_MMA_EXCEPTIONS):
            found.append(f"{where}: uses {sorted(rec['mma_ops'])}, not {own} (default config)")
    if rec["default"] and rec.get("tma") and ARCHS[rec["arch"]].backend == "cuda" and not rec["UTMALDG"]:
        found.append(f"{where}: built on tensor descriptors but loads nothing through TMA (no UTMALDG; default "
                     "config)")
    return found


def summary(records: Sequence[Dict[str, object]]) -> str:
    """One line: how many compiled, failed, spilled, and went over the shared-memory limit."""
    ok = [r for r in records if "error" not in r]
    spilling = [r for r in ok if r["spills"]]
    too_big = [r for r in ok if not r["shared_fits"]]
    return (f"{len(ok)}/{len(records)} (build, arch) pairs compiled; {len(records) - len(ok)} failed; "
            f"{len(spilling)} spill ({sum(r['default'] for r in spilling)} of them default configs); "
            f"{len(too_big)} exceed the per-block shared memory")


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point (``python -m benchmarks static ...``). Exit status 1 if any build failed to compile."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks static",
                                     description="Compile every registered kernel build for real GPU targets and "
                                                 "report registers, spills, shared memory, occupancy and SASS.")
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), choices=list(ARCHS),
                        help="targets (default: %(default)s; AMD gfx90a/gfx942 on request)")
    parser.add_argument("--out", type=out_dir, default="results/static",
                        help="folder for builds.json, builds.md, defaults.md")
    parser.add_argument("--kernel", help="only kernels whose name contains this")
    parser.add_argument("--quick", action="store_true",
                        help="only the default config of each kernel at fp16, head dim 64/128")
    parser.add_argument("--defaults", action="store_true",
                        help="only the default configs (what a GPU tries first), every dtype, head dim and variant")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--provider", default=PROVIDER, help="module:function returning the builds")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.arch = list(dict.fromkeys(args.arch))  # a repeated target is compiled and reported once
    if args.worker:
        return _worker(*args.worker)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        builds = load_builds(args.provider)
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        parser.error(f"--provider {args.provider!r} (module:function returning the builds): {error}")
    if args.kernel and not select(builds, args.kernel, args.quick, args.defaults):
        parser.error(f"--kernel {args.kernel!r}: no registered build's kernel name contains it")
    records = run_report(args.arch, args.provider, args.kernel, args.quick, args.jobs, progress=True,
                         defaults_only=args.defaults)
    if not records:
        print("no builds registered")
        return 0
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "builds.json", "w") as f:
        json.dump({"triton": triton.__version__, "archs": args.arch, "records": records}, f, indent=1)
    (out / "builds.md").write_text(markdown_table(records))
    (out / "defaults.md").write_text(markdown_table([r for r in records if r["default"]]))
    print(text_table(records))
    print(legend(records))
    for r in records:
        if "error" in r:
            print(f"FAILED {r['kernel']} {r['label']!r} on {r['arch']}: {last_line(r['error'])}")
    print(summary(records))
    # Kernels that compiled to any MMA call tl.dot: the CLI holds those to their target's own MMA too.
    for problem in (p for r in records for p in problems(r, calls_dot=r.get("mma", 0) > 0) if "error" not in r):
        print("bar:", problem)
    print(f"wrote {out / 'builds.json'}, {out / 'builds.md'}, {out / 'defaults.md'}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
