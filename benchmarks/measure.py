"""Running one point: the step that is timed (forward, or forward + backward) and the timers.

GPU: ``triton.testing.do_bench`` (median and 20/80 percentiles, L2 flushed between runs, grads reset).
CPU: wall-clock repeats; for Triton providers this times Triton's *interpreter* and is labelled so.
"""
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, List

import numpy as np
import torch

from benchmarks.providers import Inputs


def make_step(fn: Callable, inputs: Inputs) -> Callable[[], List[torch.Tensor]]:
    """A zero-argument call of ``fn`` on ``inputs`` (plus the backward when the inputs carry ``grad_out``)
    returning the outputs: the result and, after a backward, the gradients of the leaves."""
    leaves = [t for t in inputs.tensors if t.requires_grad]

    def step():
        for leaf in leaves:
            leaf.grad = None
        out = fn(*inputs.args)
        if inputs.grad_out is None:
            return [out]
        out.backward(inputs.grad_out)
        return [out] + [leaf.grad for leaf in leaves]

    return step


def is_oom(error: BaseException) -> bool:
    """Out of memory, on GPU (torch.OutOfMemoryError) or CPU (MemoryError, or torch's CPU allocator failing)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    method: str

    def as_record(self) -> dict:
        return asdict(self)


def time_gpu(step: Callable, leaves: List[torch.Tensor]) -> Timing:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves)
    return Timing(median, p20, p80, 0, "do_bench")  # do_bench picks its repeat count from a time budget


def time_cpu(step: Callable, interpreted: bool, budget_s: float, max_repeats: int = 20) -> Timing:
    """Wall-clock of ``step`` repeated until ``budget_s`` is spent (once for a call slower than that, at most
    ``max_repeats`` times). The caller runs it once before (to warm caches and lazy initialisation)."""
    times = []
    while not times or (len(times) < max_repeats and sum(times) < budget_s):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    ms = [1e3 * t for t in times]
    p20, p80 = np.percentile(ms, [20, 80])
    method = "interpreter (CPU wall-clock)" if interpreted else "CPU wall-clock"
    return Timing(statistics.median(ms), float(p20), float(p80), len(ms), method)
