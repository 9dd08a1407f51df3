"""Measure every (case, provider) point: counted IO/FLOPs, peak memory, time; failures become records.

A provider that cannot load is "unavailable"; a point that runs out of memory (for real, or beyond --mem-limit)
is "oom"; any other exception is "error" with its message. None of them stops the run.

Counted bytes of interpreted attention kernels are taken with the tiles a GPU would start from (see
:data:`COUNT_TILE_FAMILY`), not the interpreter's small default, which would over-count K/V re-reads; the timed
runs and the memory worker keep the interpreter's default 32x32 tile (their numbers say nothing about a GPU).
"""
import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks import memory
from benchmarks.counting import counting, touched_bytes
from benchmarks.device import DeviceInfo, cpu_threads
from benchmarks.measure import is_oom, make_step, time_cpu, time_gpu
from benchmarks.providers import Case, Provider, Unavailable, make_inputs, providers_for
from benchmarks.roofline import MODELLED, model_time, spec_by_name


COUNT_TILE_FAMILY = 90
"""GPU family whose default configs (each attention kernel's first autotune config for the input's head dim and
dtype: ``kernels.attention.configs.default_configs``) the interpreted attention kernels run with while counted;
``_count_tiles`` takes any other of ``configs.FAMILIES`` (80, 90, 100, "gfx942") to count with its tiles."""


def _count_tiles(case: Case, family=COUNT_TILE_FAMILY) -> Tuple[contextlib.ExitStack, Dict[str, Tuple[int, int]]]:
    """(a context forcing ``family``'s default configs on the attention kernels through
    ``kernels.registry.use_config``, {kernel: (BLOCK_M, BLOCK_N)} it forces); nothing for other ops."""
    stack = contextlib.ExitStack()
    if case.op != "attention":
        return stack, {}
    from kernels.attention.configs import default_configs
    from kernels.registry import use_config

    forced = default_configs(family, getattr(torch, case.dtype), case.head_dim)
    if case.mode == "fwd":
        forced = {"attention_fwd": forced["attention_fwd"]}
    for kernel, config in forced.items():
        stack.enter_context(use_config(kernel, **config))
    return stack, {kernel.removeprefix("attention_"): (c["BLOCK_M"], c["BLOCK_N"]) for kernel, c in forced.items()}


def tiles_note(tiles: dict, family=COUNT_TILE_FAMILY) -> str:
    """What the counts were taken with, e.g. "counted with sm_90 default tiles (BLOCK_M x BLOCK_N per kernel):
    fwd 128x64, dkdv 32x128, dq 64x64" (a "gfx942" family is named as it is)."""
    per_kernel = ", ".join(f"{kernel} {bm}x{bn}" for kernel, (bm, bn) in tiles.items())
    target = family if isinstance(family, str) else f"sm_{family}"
    return f"counted with {target} default tiles (BLOCK_M x BLOCK_N per kernel): {per_kernel}"


def _base_record(case: Case, prov: Provider, device: DeviceInfo) -> dict:
    return {"op": case.op, "mode": case.mode, "provider": prov.name, "baseline": prov.baseline,
            "length": case.length, "shape": list(case.shape), "dtype": case.dtype,
            "causal": case.causal if case.op == "attention" else None, "device": device.name,
            "status": "ok", "reason": None, "time": None, "tflops": None, "gbps": None, "pct_of_peak": None,
            "memory": None, "counted": None, "min_bytes": None, "model": None}


def _throughput(record: dict, case: Case, prov: Provider, device: DeviceInfo) -> None:
    """TFLOPS (attention, by the conventional FLOP count, over the pairs a sparser mask keeps) or effective GB/s
    (minimum bytes / time), GPU only."""
    seconds = record["time"]["median_ms"] * 1e-3
    flops = case.conventional_flops()
    if flops is not None and prov.visible_pairs is not None:  # a sliding window or documents: their own work
        flops *= prov.visible_pairs(case.length) / (case.length * (case.length + 1) / 2)
    if flops is not None:
        record["tflops"] = flops / seconds / 1e12
        peak = device.peak and device.peak["flops"].get(case.dtype)
        record["pct_of_peak"] = peak and 100 * flops / seconds / peak
    else:
        record["gbps"] = record["min_bytes"] / seconds / 1e9
        record["pct_of_peak"] = device.peak and 100 * record["min_bytes"] / seconds / device.peak["bandwidth"]


def _measure(case: Case, prov: Provider, fn: Callable, device: DeviceInfo, record: dict,
             time_budget_s: float) -> None:
    """Fill ``record`` with min bytes, counts (when countable), GPU memory and time; exceptions propagate."""
    inputs = make_inputs(case, device.torch_device)
    step = make_step(fn, inputs)
    countable = device.interpreted or not prov.triton  # compiled Triton kernels cannot be intercepted
    # only interpreted attention kernels take a GPU's tiles; compiled ones autotune as usual
    count_tiles, tiles = (_count_tiles(case) if device.interpreted and prov.attention_kernels
                          else (contextlib.nullcontext(), {}))
    with (counting() if countable else contextlib.nullcontext()) as counts, count_tiles:
        outputs = step()  # also the warm-up run
    extra_inputs = [] if inputs.grad_out is None else [inputs.grad_out]
    record["min_bytes"] = sum(touched_bytes(t) for t in inputs.tensors + extra_inputs + outputs)
    del outputs
    if prov.compiles:  # the counted run was eager: compile outside what is timed and measured
        step()
    if counts is not None:
        record["counted"] = {**counts.as_record(), "vs_min": counts.bytes / record["min_bytes"]}
        if tiles:  # interpreted attention kernels ran with a GPU's tiles
            record["counted"]["tiles"] = tiles_note(tiles)
        record["model"] = {name: model_time(spec_by_name(name), counts.flops, counts.bytes, case.dtype)
                           for name in MODELLED}
    if device.kind == "cuda":
        record["memory"] = memory.measure_gpu(step, inputs.tensors)
        record["time"] = time_gpu(step, [t for t in inputs.tensors if t.requires_grad]).as_record()
        _throughput(record, case, prov, device)
    else:
        record["time"] = time_cpu(step, prov.triton, time_budget_s).as_record()


def measure_point(case: Case, prov: Provider, fn: Callable, device: DeviceInfo, mem: Optional[dict],
                  time_budget_s: float) -> dict:
    """One record. ``mem`` is the CPU worker's memory result (None on GPU, where memory is measured here)."""
    record = _base_record(case, prov, device)
    record["memory"] = mem
    if mem is not None and mem["status"] == "oom":
        record.update(status="oom", reason=mem.get("reason"))
        return record
    try:
        _measure(case, prov, fn, device, record, time_budget_s)
    except Exception as error:  # noqa: BLE001  (recorded; the run goes on)
        record.update(status="oom" if is_oom(error) else "error", reason=f"{type(error).__name__}: {error}"[:300])
    if record["status"] != "ok" and device.kind == "cuda":
        torch.cuda.empty_cache()  # after the handler: the traceback no longer holds the failed step's tensors
    return record


def _measure_provider(prov: Provider, cases: List[Case], device: DeviceInfo, mem_limit: Optional[int],
                      time_budget_s: float, threads: int, progress) -> List[dict]:
    try:
        fn = prov.resolve()
    except Unavailable as error:
        if progress is not None:
            progress.update(len(cases))
        return [{**_base_record(case, prov, device), "status": "unavailable", "reason": str(error)}
                for case in cases]
    if device.kind == "cpu":
        mems = memory.measure_cpu(prov.op, prov.name, cases, mem_limit, threads)
    else:
        mems = [None] * len(cases)
    out = []
    for case, mem in zip(cases, mems):
        if progress is not None:
            progress.set_postfix_str(f"{case.op} {case.mode} {prov.name} N={case.length}")
        out.append(measure_point(case, prov, fn, device, mem, time_budget_s))
        if progress is not None:
            progress.update(1)
    return out


def run(groups: Dict[str, List[Case]], device: DeviceInfo, *, mem_limit: Optional[int] = None,
        time_budget_s: float = 1.0, threads: int = 1, providers: Optional[List[str]] = None,
        variants: bool = False, progress=None) -> List[dict]:
    """Measure each op's cases with each of its providers (see ``providers_for`` for ``providers`` and
    ``variants``). ``groups`` maps op -> cases (any modes/lengths).
    ``threads``: torch's CPU threads while measuring, here and in the memory workers (restored afterwards).
    ``progress`` (e.g. a tqdm bar) gets ``update`` per point."""
    if mem_limit is not None and device.kind == "cuda":  # a real CUDA OOM beyond the limit
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, mem_limit / total))
    with cpu_threads(device, threads):
        return [record for op, cases in groups.items() for prov in providers_for(op, providers, variants)
                for record in _measure_provider(prov, cases, device, mem_limit, time_budget_s, threads,
                                                progress)]
