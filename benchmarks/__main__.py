"""``python -m benchmarks [COMMAND] [options]``: measure, print a table, write JSON/CSV and PNGs.

``suite`` (the default) runs every op and provider; ``scaling`` profiles causal attention over doubling lengths;
``static`` is the GPU-target build report (``benchmarks/static.py``), ``gpu-check`` the one-command check of a
GPU machine (``benchmarks/gpu_check.py``), ``decode`` the decode step, ``varlen`` packed vs padded attention over
a batch of unequal lengths, ``hf-masks`` the bytes of a Hugging Face model's masks and ``overhead`` the host time
per call of every public op (``benchmarks/overhead.py``), ``launch-path`` the host time of one attention launch on
the GPU path by layer (``benchmarks/launch_path.py``) and ``model`` whole models' training, prefill and decoding
(``benchmarks/model.py``), each imported only when asked for.
"""
import argparse
import importlib
import math
import re
import sys
from typing import List, Optional

from benchmarks import analysis, plots, records, runner, scaling, suite
from benchmarks.device import detect
from benchmarks.progress import progress_bar
from benchmarks.providers import OPS, PROVIDERS
from benchmarks.suite import at_least
from benchmarks.table import format_fits, format_table

STANDALONE = {"static": "benchmarks.static", "gpu-check": "benchmarks.gpu_check", "decode": "benchmarks.decode",
              "varlen": "benchmarks.varlen", "hf-masks": "benchmarks.hf_masks", "overhead": "benchmarks.overhead",
              "model": "benchmarks.model", "launch-path": "benchmarks.launch_path"}
"""Commands with their own module and ``main(argv)``."""
COMMANDS = ("suite", "scaling", *STANDALONE)
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'500MB', '2GiB', '1e9' -> bytes (at least one)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    try:
        size = float(match.group(1)) * _UNITS[match.group(2).upper()] if match else math.nan
    except (KeyError, ValueError):  # an unknown unit, or digits that are no number ('1.5.5')
        size = math.nan
    if not math.isfinite(size):  # '1e400' too: no int for it
        raise argparse.ArgumentTypeError(f"expected a size like 500MB or 2GiB, got {text!r}")
    if size < 1:  # a limit of nothing measures nothing
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 B, got {text!r}")
    return int(size)


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {command}", description=__doc__)
    parser.add_argument("--out", type=records.out_dir, default="results",
                        help="folder for the JSON/CSV records and PNG plots")
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--max-len", type=at_least(1), default=None,
                        help="largest N (scaling default: 1024 on CPU, 16384 on a GPU; suite: no cap)")
    parser.add_argument("--batch", type=at_least(1), help="attention batch (default 1 on CPU, 4 on a GPU)")
    parser.add_argument("--heads", type=at_least(1), help="attention heads (default 2 on CPU, 16 on a GPU)")
    parser.add_argument("--head-dim", type=at_least(1), help="attention head dim (default 64)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="default float16, on CPU too")
    parser.add_argument("--mem-limit", type=parse_size, default=None,
                        help="memory a point may take, inputs included (e.g. 2GB): beyond it the point is recorded "
                             "'oom' (CPU: the worker's measured peak plus inputs, its address space capped 256 MiB "
                             "above as a guard; GPU: the allocator's fraction)")
    parser.add_argument("--threads", type=at_least(1), default=1,
                        help="CPU only: torch threads (default 1: the interpreter is single-threaded, and a shared "
                             "machine makes multi-threaded timings of small ops erratic)")
    parser.add_argument("--providers", nargs="+", choices=sorted({p.name for p in PROVIDERS}), metavar="NAME",
                        help="only these provider names (e.g. baseline triton; one of %(choices)s)")
    if command == "scaling":
        parser.add_argument("--context-parallel", type=int, metavar="P", default=None,
                            help="ring attention over P spawned ranks instead (benchmarks/context_parallel.py)")
    if command == "suite":
        parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="only these ops")
    return parser


def _run(command: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Measure ``args``' points, print the table and write the files; ``parser.error`` when there is no point."""
    device = detect()
    print(f"device: {device.name}  (timing: {device.timing})", flush=True)
    dims = {key: getattr(args, key) or default for key, default in suite.DIMS[device.kind].items()}
    if getattr(args, "context_parallel", None) is not None:
        from benchmarks import context_parallel  # spawns processes; imported only when asked for

        ignored = [flag for flag, value in (("--providers", args.providers), ("--mem-limit", args.mem_limit)) if value]
        if ignored:  # the ranks measure ring attention alone, with no memory cap: say so rather than drop them
            parser.error(f"--context-parallel runs ring attention only; it does not take {' or '.join(ignored)}")
        max_len = args.max_len or scaling.DEFAULT_MAX_LEN[(device.kind, args.quick)]
        try:
            points = context_parallel.points(args.context_parallel, dims, max_len)
        except ValueError as error:  # a usage error, as the other commands' "nothing to measure"
            parser.error(str(error))
        return context_parallel.run(args.context_parallel, points, device, args.out,
                                    {**vars(args), **dims, "command": command})
    if command == "suite":
        groups = suite.cases(device.kind, args.quick, args.max_len or sys.maxsize, dims, args.ops)
    else:
        max_len = args.max_len or scaling.DEFAULT_MAX_LEN[(device.kind, args.quick)]
        groups = scaling.cases(max_len, dims)
    variants = command == "scaling"  # the sliding-window and document cases profile scaling, not the suite
    total = sum(len(cases) * len(runner.providers_for(op, args.providers, variants))
                for op, cases in groups.items())
    if total == 0:  # say which option emptied the run: the lengths, or the providers
        if not any(groups.values()):
            uncapped = (suite.cases(device.kind, args.quick, sys.maxsize, dims, args.ops) if command == "suite" else
                        scaling.cases(sys.maxsize, dims))
            smallest = min(case.length for cases in uncapped.values() for case in cases)
            parser.error(f"nothing to measure: no point of {', '.join(groups)} has a length within --max-len "
                         f"{args.max_len} ({command}'s smallest is {smallest})")
        ops = [op for op, cases in groups.items() if cases]  # those with a length within --max-len
        parser.error(f"nothing to measure: no point of {', '.join(ops)} runs on --providers "
                     f"{' '.join(args.providers)} (choose from: "
                     + ", ".join(sorted({p.name for p in PROVIDERS if p.op in ops})) + ")")
    left_out = [f"{op} ({'no length within --max-len' if not cases else 'none of --providers runs it'})"
                for op, cases in groups.items() if not cases or not runner.providers_for(op, args.providers, variants)]
    if left_out:  # an --ops choice the other options exclude: said, not dropped in silence
        print("not measured: " + ", ".join(left_out), flush=True)
    with progress_bar(total, command, "point") as bar:
        recs = runner.run(groups, device, mem_limit=args.mem_limit, time_budget_s=0.3 if args.quick else 1.0,
                          threads=args.threads, providers=args.providers, variants=variants, progress=bar)
    analysis.add_ratios(recs)
    fits = analysis.fit_slopes(recs)
    print(format_table(recs))
    print(format_fits(fits))
    config = {**vars(args), **dims, "command": command}
    written = records.write(args.out, command, records.document(command, device, config, recs, fits))
    written += plots.plot_all(recs, device, args.out, command)
    print("wrote: " + ", ".join(written))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "suite"
    if command in STANDALONE:  # another module's command, imported only when asked for
        return importlib.import_module(STANDALONE[command]).main(argv)
    parser = _parser(command)
    args, unknown = parser.parse_known_args(argv)
    misplaced = [word for word in unknown if word in COMMANDS]
    if misplaced:  # `--quick scaling`: argparse alone says only "unrecognized arguments: scaling"
        parser.error(f"{misplaced[0]!r} is a command: one command, given first (python -m benchmarks "
                     f"{misplaced[0]} [options])")
    return _run(command, parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
