"""Peak memory of a provider at each point, beyond what its inputs already hold.

GPU: ``torch.cuda.max_memory_allocated`` around one step, in process.
CPU: a worker process per provider (``python -m benchmarks.memory``) that, for each point, allocates the inputs,
resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs one step and reads the peak (``VmHWM``) back:
a real measurement of everything the step touched (torch tensors, the interpreter's numpy tiles, the allocator's
slack), in a process where nothing else runs. glibc is told to serve every block >= 64 KiB with its own mmap so
freed memory leaves the process and a later point cannot hide in it. ``extra`` subtracts the outputs (result and
gradients) from the peak. Its resolution is :data:`CPU_RESOLUTION` (page granularity, the kernel's batched RSS
counters: two live 64 KiB tensors read 68 KiB, two 1 MiB ones 1.8 MiB), so a small point can read 0 and ``extra``
below 0; ``analysis.peak_bytes`` neither fits nor compares a reading up to it. With a memory limit a point whose
inputs plus peak pass the limit is recorded "oom" (its numbers kept). The worker also caps its address space
(``RLIMIT_AS``) to what it held after warm-up plus the limit plus :data:`GUARD_HEADROOM`, so a point far beyond
the limit fails (recorded "oom") instead of taking the machine's memory: address space also counts what is
reserved but never touched (thread stacks, malloc arenas), so a cap at the limit itself would fail points that
stay under it, or crash the worker.
"""
import gc
import json
import os
import re
import resource
import subprocess
import sys
from typing import List, Optional, Tuple

import torch

from benchmarks.counting import touched_bytes
from benchmarks.measure import is_oom, make_step
from benchmarks.providers import Case, Unavailable, make_inputs, provider

CPU_METHOD = "peak RSS growth (VmHWM after reset) in a worker process"
GPU_METHOD = "torch.cuda.max_memory_allocated"
CPU_RESOLUTION = 300_000
"""Bytes: "a few 0.1 MB", what a CPU_METHOD reading is good to; a smaller one is not a measured size."""
GUARD_HEADROOM = 256 * 2 ** 20
"""Address space the worker may reserve beyond a memory limit (a new thread's malloc arena alone reserves 64 MiB)."""


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _measure_one(step) -> dict:
    gc.collect()
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    outputs = step()
    peak = _status_bytes("VmHWM") - base
    output_bytes = sum(touched_bytes(t) for t in outputs)
    return {"status": "ok", "peak_bytes": peak, "extra_bytes": peak - output_bytes, "method": CPU_METHOD}


def _measure_case(fn, case: Case) -> Tuple[dict, int]:
    """(:func:`_measure_one` of ``case``'s step, bytes its inputs hold); the inputs are freed on return."""
    inputs = make_inputs(case, torch.device("cpu"))
    tensors = [t for t in inputs.tensors + [inputs.grad_out] if t is not None]
    return _measure_one(make_step(fn, inputs)), sum(touched_bytes(t) for t in tensors)


def _worker(op: str, name: str, cases: List[dict], mem_limit: Optional[int], threads: int):
    """Yield one result per case (run in the worker process)."""
    torch.set_num_threads(threads)
    prov = provider(op, name)
    fn = prov.resolve()
    cpu = torch.device("cpu")
    for case in {Case(**{**c, "length": 16}) for c in cases}:  # warm-up: lazy initialisation, code caches
        make_step(fn, make_inputs(case, cpu))()
    if mem_limit is not None:
        limit = _status_bytes("VmSize") + mem_limit + GUARD_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for case in cases:
        try:
            if prov.compiles:  # compiling at this shape is not the step's memory
                make_step(fn, make_inputs(Case(**case), cpu))()
            result, input_bytes = _measure_case(fn, Case(**case))
            held = input_bytes + result["peak_bytes"]  # what --mem-limit bounds: the point's memory, inputs included
            if mem_limit is not None and held > mem_limit:
                result.update(status="oom", reason=f"beyond --mem-limit {mem_limit} B: inputs + peak {held} B")
            yield result
        except Exception as error:  # noqa: BLE001  (recorded, and the next point still runs)
            oom = is_oom(error)
            beyond = f"beyond --mem-limit {mem_limit} B: " if oom and mem_limit is not None else ""
            yield {"status": "oom" if oom else "error", "reason": f"{beyond}{type(error).__name__}: {str(error)[:200]}"}
        gc.collect()


def measure_cpu(op: str, name: str, cases: List[Case], mem_limit: Optional[int] = None,
                threads: int = 1) -> List[dict]:
    """Peak memory of provider ``(op, name)`` at each case, measured in a fresh worker process."""
    if not cases:
        return []
    if not os.path.exists("/proc/self/clear_refs"):
        return [{"status": "unavailable", "reason": "CPU memory needs Linux /proc"} for _ in cases]
    request = {"op": op, "name": name, "cases": [c.as_record() for c in cases], "mem_limit": mem_limit,
               "threads": threads}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so the worker imports this package
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory"], input=json.dumps(request),
                          capture_output=True, text=True, env=env)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(results) == len(cases):
        return results
    if proc.returncode == -9:  # the kernel's OOM killer: that point is "oom"; a new worker does the rest
        results.append({"status": "oom", "reason": "worker killed (SIGKILL: out of memory)"})
        return results + measure_cpu(op, name, cases[len(results):], mem_limit, threads)
    if proc.returncode < 0 and mem_limit is not None:  # code that cannot take a failed mmap dies by a signal
        results.append({"status": "oom", "reason": f"beyond --mem-limit {mem_limit} B: worker died by signal "
                                                   f"{-proc.returncode} under the address-space cap"})
        return results + measure_cpu(op, name, cases[len(results):], mem_limit, threads)
    reason = f"worker exited with {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return results + [{"status": "error", "reason": reason}] * (len(cases) - len(results))


def measure_gpu(step, inputs: List[torch.Tensor]) -> dict:
    """Peak CUDA memory allocated during one step, beyond what was allocated before it. ``inputs``' gradients are
    dropped first: a previous step's, still held, would be in the base and the step's own would not count."""
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outputs = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {"status": "ok", "peak_bytes": peak, "extra_bytes": peak - sum(touched_bytes(t) for t in outputs),
            "method": GPU_METHOD}


def _main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        for result in _worker(request["op"], request["name"], request["cases"], request["mem_limit"],
                              request["threads"]):
            print(json.dumps(result), flush=True)
    except Unavailable as error:
        print(f"unavailable: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
