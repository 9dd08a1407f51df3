"""``python -m benchmarks scaling --context-parallel P``: causal ring attention (``kernels.distributed``) over P ranks.

P processes are spawned on 127.0.0.1 (gloo on CPU, NCCL with one GPU each), and for each context length and layout
every rank runs one forward and backward of ``ring_attention`` on its shard and reports:

- measured: its peak memory (CPU: peak-RSS growth, as ``benchmarks/memory.py``; GPU: max_memory_allocated);
- counted: the FLOPs and bytes of its attention kernels (``benchmarks/counting.py``, interpreted kernels only),
  per ring step, and the bytes it sends (the tensors handed to ``batch_isend_irecv``), per layer;
- a MODEL, not a measurement: each ring step's kernels at the roofline speed of an A100 / H100
  (``benchmarks/roofline.py``) against the time that step's transfers take on a link, NVLink (A100 600 GB/s,
  H100 900 GB/s, both quoted for the two directions together, so half per direction) or 400 Gb/s InfiniBand
  (50 GB/s per direction). A transfer posted before a step overlaps that step's compute; communication is hidden
  when no step's transfer outlasts its compute. Latency, contention and kernel efficiency are not modelled.
"""
import json
import os
import socket
import tempfile
import time
from datetime import timedelta
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import distributed
from benchmarks import memory, plots, records, roofline, scaling
from benchmarks.counting import counting

LAYOUTS = ("zigzag", "contiguous")
LINKS = {  # name -> (GPU spec the link is paired with, bytes/s one way)
    "A100 + NVLink 600 GB/s": ("A100-SXM4-80GB", 300e9),
    "H100 + NVLink 900 GB/s": ("H100-SXM5", 450e9),
    "H100 + InfiniBand 400 Gb/s": ("H100-SXM5", 50e9),
}
TIMEOUT_S = 1800
CONVENTIONS = {
    "layout": "zigzag or contiguous: how the sequence is split over the ranks; length: N, the whole sequence; world: "
              "P ranks; batch, heads, head_dim, dtype: the attention inputs (B, H, N, D).",
    "peak_bytes_per_rank": "measured, one entry per rank: peak memory of one forward and backward of its shard "
                           "(CPU peak-RSS growth, GPU max_memory_allocated).",
    "sent_bytes_per_rank_per_layer": "counted: bytes a rank hands to batch_isend_irecv in one layer's forward and "
                                     "backward, the largest over the ranks.",
    "counted_flops_per_rank": "counted (interpreted kernels only; absent on a GPU): each rank's attention FLOPs over "
                              "the forward and backward; flops_max_over_mean: the balance, 1.0 even.",
    "model": "a MODEL, not a measurement, per link: compute_ms (the ring steps' kernels at the roofline), ring_ms "
             "(steps overlapped with their transfers) and communication_hidden (no transfer outlasts its step).",
}
"""What ``scaling_context_parallel.json``'s record fields mean (the module docstring has the method)."""


class _Log:
    """What the ring does while ``on``: each kernel call's counted FLOPs and bytes, and each send's bytes by tag."""

    def __init__(self):
        self.on, self.calls, self.sends = False, [], []
        self._wrap_ops()
        real = dist.batch_isend_irecv

        def sending(ops):
            if self.on:
                sent = [op for op in ops if op.op is dist.isend]
                self.sends.append({"tag": min(op.tag for op in sent),
                                   "bytes": sum(op.tensor.numel() * op.tensor.element_size() for op in sent)})
            return real(ops)
        dist.batch_isend_irecv = sending

    def _wrap_ops(self):
        def wrap(op, phase):
            def counted(*args):
                if not self.on:
                    return op(*args)
                with counting() as counts:
                    result = op(*args)
                self.calls.append({"phase": phase, "flops": counts.flops,
                                   "bytes": counts.bytes_read + counts.bytes_written})
                return result
            return counted
        distributed.attention_forward = wrap(distributed.attention_forward, "forward")
        distributed.attention_backward = wrap(distributed.attention_backward, "backward")

    def record(self, step) -> None:
        self.calls.clear()
        self.sends.clear()
        self.on = True
        try:
            step()
        finally:
            self.on = False


def _per_step(calls: List[dict], plans, phase: str) -> List[dict]:
    """Sum the calls of ``phase`` per ring step: they run in plan order, one call per block."""
    steps = [{"flops": 0, "bytes": 0} for _ in plans]
    mine = iter(c for c in calls if c["phase"] == phase)
    for t, blocks in enumerate(plans):
        for _ in blocks:
            call = next(mine)
            steps[t]["flops"] += call["flops"]
            steps[t]["bytes"] += call["bytes"]
    return steps


def _peak(step, leaves: List[torch.Tensor]) -> int:
    """Peak memory growth of ``step``, its ``leaves``' gradients dropped first (else a previous step's would be in
    the base, and this one's accumulate into them unseen)."""
    for leaf in leaves:
        leaf.grad = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    return memory._measure_one(lambda: [step()])["peak_bytes"]


def _rank(rank: int, world: int, port: int, points: List[dict], out_dir: str) -> None:
    """One rank: every point's measurement, counts and sends, written to ``out_dir/rank<r>.json``."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        log, results = _Log(), []
        device = torch.device("cuda" if cuda else "cpu")
        for p in points:
            dtype, n_local = getattr(torch, p["dtype"]), p["length"] // world
            q, k, v = (torch.randn(p["batch"], p["heads"], n_local, p["head_dim"], dtype=dtype, device=device)
                       .requires_grad_() for _ in range(3))

            def step():
                out = distributed.ring_attention(q, k, v, causal=True, layout=p["layout"])
                out.backward(torch.ones_like(out))
                return out
            step()  # warm-up: lazy imports and the interpreter's first launches
            record = {**p, "rank": rank, "world": world, "peak_bytes": _peak(step, [q, k, v])}
            log.record(step)  # on a GPU the kernels are not counted (the counter reads the interpreter): zeros
            plans = distributed.ring_plans(p["layout"], rank, world, n_local, True)
            record["steps"] = {phase: _per_step(log.calls, plans, phase) if log.calls else None
                               for phase in ("forward", "backward")}
            hops = {tag: [s["bytes"] for s in log.sends if s["tag"] == tag]
                    for tag in (distributed._KV_TAG, distributed._GRAD_TAG)}
            record["sent_bytes"] = {"forward": sum(hops[distributed._KV_TAG][:world - 1]),
                                    "backward": sum(hops[distributed._KV_TAG][world - 1:])
                                    + sum(hops[distributed._GRAD_TAG])}
            record["hop_bytes"] = {"kv": max(hops[distributed._KV_TAG], default=0),
                                   "grad": max(hops[distributed._GRAD_TAG], default=0)}
            results.append(record)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, points: List[dict]) -> List[List[dict]]:
    """Run the points on ``world`` spawned ranks; per point, the P rank records."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_rank, args=(world, port, points, out_dir), nprocs=world, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not context.join(timeout=10):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"context-parallel ranks still running after {TIMEOUT_S} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
        ranks = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    return [list(point) for point in zip(*ranks)]


def _model(ranks: List[dict], spec: roofline.GPUSpec, link_bps: float) -> dict:
    """MODEL of one layer's forward + backward: ring step t takes the longest over ranks of max(compute, transfer),
    compute at the roofline of the counted FLOPs and bytes; the last dK/dV hop cannot overlap anything."""
    world, dtype = ranks[0]["world"], ranks[0]["dtype"]
    kv_ms, grad_ms = (1e3 * ranks[0]["hop_bytes"][key] / link_bps for key in ("kv", "grad"))
    compute_ms = overlapped_ms = 0.0
    hidden = True
    for phase in ("forward", "backward"):
        for t in range(world):
            transfer = (kv_ms if t < world - 1 else 0.0) + (grad_ms if phase == "backward" and t > 0 else 0.0)
            compute = max(roofline.model_time(spec, r["steps"][phase][t]["flops"], r["steps"][phase][t]["bytes"],
                                              dtype)["time_ms"] for r in ranks)
            compute_ms += compute
            overlapped_ms += max(compute, transfer)
            hidden &= transfer <= compute
    return {"label": "model", "compute_ms": compute_ms, "ring_ms": overlapped_ms + grad_ms,
            "communication_hidden": hidden}


def _record(ranks: List[dict]) -> dict:
    first = ranks[0]
    record = {key: first[key] for key in ("layout", "length", "world", "batch", "heads", "head_dim", "dtype")}
    record["peak_bytes_per_rank"] = [r["peak_bytes"] for r in ranks]
    record["sent_bytes_per_rank_per_layer"] = {phase: max(r["sent_bytes"][phase] for r in ranks)
                                               for phase in ("forward", "backward")}
    if first["steps"]["forward"] is not None:
        flops = [sum(s["flops"] for phase in ("forward", "backward") for s in r["steps"][phase]) for r in ranks]
        record["counted_flops_per_rank"] = flops
        record["flops_max_over_mean"] = max(flops) / (sum(flops) / len(flops))
        record["model"] = {name: _model(ranks, roofline.spec_by_name(gpu), bps) for name, (gpu, bps) in LINKS.items()}
    return record


def _table(recs: List[dict]) -> str:
    lines = [f"{'layout':<11}{'N':>7}{'peak MB/rank':>14}{'GFLOP/rank max':>16}{'max/mean':>10}"
             f"{'MB sent/rank/layer':>20}  MODEL: communication hidden? (ring time / compute time)"]
    for r in recs:
        model = "  ".join(f"{name}: {'yes' if m['communication_hidden'] else 'no'} "
                          f"({m['ring_ms'] / m['compute_ms']:.2f}x)" for name, m in r.get("model", {}).items())
        flops = r.get("counted_flops_per_rank")
        lines.append(f"{r['layout']:<11}{r['length']:>7}{max(r['peak_bytes_per_rank']) / 1e6:>14.1f}"
                     f"{(max(flops) / 1e9 if flops else float('nan')):>16.3f}"
                     f"{r.get('flops_max_over_mean', float('nan')):>10.3f}"
                     f"{sum(r['sent_bytes_per_rank_per_layer'].values()) / 1e6:>20.2f}  {model}")
    return "\n".join(lines)


def _plot(recs: List[dict], path: str) -> List[str]:
    """[path] written, or [] without matplotlib."""
    if not plots.have_pyplot():
        return []
    plt = plots.plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for layout in LAYOUTS:
        rows = [r for r in recs if r["layout"] == layout]
        lengths = [r["length"] for r in rows]
        if rows and "model" in rows[0]:
            axes[0].plot(lengths, [r["flops_max_over_mean"] for r in rows], "o-", label=layout)
            for name in LINKS:
                axes[2].plot(lengths, [r["model"][name]["ring_ms"] / r["model"][name]["compute_ms"] for r in rows],
                             "o-" if layout == "zigzag" else "x--", label=f"{layout}, {name}")
        axes[1].plot(lengths, [sum(r["sent_bytes_per_rank_per_layer"].values()) / 1e6 for r in rows], "o-",
                     label=layout)
    titles = ("counted FLOPs per rank: max / mean", "MB sent per rank per layer (fwd + bwd)",
              "MODEL: ring time / compute time (1 = hidden)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length N")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    world = recs[0]["world"]
    fig.suptitle(f"causal ring attention over {world} ranks (counted on CPU; the right panel is a roofline MODEL)")
    return plots.save(fig, path)


def points(world: int, dims: Dict, max_len: int) -> List[Dict]:
    """The points of P = ``world`` ranks: every length of ``scaling.lengths(max_len)`` that splits into 2P chunks,
    both layouts. ValueError (the command's usage error) when there is none, before any rank is spawned."""
    if world < 1:
        raise ValueError(f"--context-parallel must be a positive number of ranks, got {world}")
    lengths = scaling.lengths(max_len)
    found = [{"layout": layout, "length": n, **dims} for n in lengths if n % (2 * world) == 0 for layout in LAYOUTS]
    if not found:
        raise ValueError(f"--context-parallel {world} needs a length that splits into {2 * world} chunks; scaling's "
                         f"lengths (powers of two from 128 to --max-len {max_len}) are {lengths}")
    return found


def run(world: int, points: List[Dict], device, out_dir: str, config: dict) -> int:
    """The command: ``points`` (:func:`points`) measured over ``world`` spawned ranks."""
    recs = [_record(ranks) for ranks in _spawn(world, points)]
    print(_table(recs))
    doc = records.document("scaling_context_parallel", device, config, recs, [])
    doc["conventions"] = {**CONVENTIONS, "context_parallel": __doc__}
    written = records.write(out_dir, "scaling_context_parallel", doc)
    written += _plot(recs, os.path.join(out_dir, "scaling_context_parallel.png"))
    print("wrote: " + ", ".join(written))
    return 0
