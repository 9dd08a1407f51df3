"""``python -m benchmarks varlen``: a right-padded batch of very different lengths, unpadded to varlen or not.

B sequence lengths are drawn from a seeded log-normal (median ``max_len / 4``, sigma 0.75) clipped to
[16, max_len] (or given with ``--lengths``), and causal attention over them, forward and forward+backward, is
computed three ways on the same right-padded (B, H, N, D) inputs, N the longest length:

- ``varlen``: unpadded (gather of the real tokens), ``kernels.attention.varlen.attention_varlen`` (one launch per
  kernel), then padded back (scatter); the gather and scatter are counted and timed with it;
- ``padded``: ``kernels.attention`` with ``key_padding_mask`` (key blocks past each row's last real key are
  skipped, but every padded query block still runs);
- ``baseline``: ``kernels.reference.attention`` with the padding as a bool mask (materialises B x H x N x N).

Each point goes through ``benchmarks.runner.measure_point``: counted bytes and FLOPs (``benchmarks.counting``,
the interpreted attention kernels forced to the sm_90 default tiles exactly as the other commands count them),
roofline model times (a model, not a measurement), time (CPU wall-clock on ``--threads`` torch threads, Triton
interpreted; ``do_bench`` on a GPU) and, on a GPU, peak memory. On CPU peak memory is the peak-RSS growth of one
step measured in this process (``benchmarks.memory``'s method, glibc set to the worker's 64 KiB mmap threshold).
Also printed: the ideal FLOPs (4 H D sum L(L+1)/2 forward, x3.5 forward+backward by FlashAttention's convention),
the forward FLOPs the kernels' tiles imply (every tile a program visits, no skipping inside a tile), and padded /
varlen ratios.

Writes ``varlen.json``, ``varlen.csv`` and one PNG per mode (x axis: the padded length N) under ``--out``.
"""
import argparse
import ctypes
import math
import sys
from typing import Dict, List, Optional

import numpy as np
import torch

import kernels
from benchmarks import analysis, memory, plots, records, runner, suite
from benchmarks.device import DeviceInfo, cpu_threads, detect
from benchmarks.measure import make_step
from benchmarks.providers import MODES, Case, Provider, make_inputs
from benchmarks.table import format_table
from kernels import reference
from kernels.attention.varlen import attention_varlen

MIN_LEN = 16
BATCH = {"cpu": 8, "cuda": 32}
MAX_LENS = {"cpu": [256], "cuda": [2048, 4096, 8192, 16384]}
SIGMA = 0.75  # log-normal spread of the drawn lengths: a long tail towards max_len
CPU_MEMORY_METHOD = "peak RSS growth (VmHWM after reset) in this process, glibc mmap threshold 64 KiB"
FWD_PROVIDERS = ("varlen", "padded")  # the fused kernels, whose forward FLOPs the tile model predicts
CONVENTIONS = {
    **records.CONVENTIONS,
    "provider": "varlen (unpadded: gather, attention_varlen, scatter, all counted and timed), padded "
                "(kernels.attention with key_padding_mask) or baseline (kernels.reference.attention with a bool "
                "mask); length and shape: the padded batch (B, H, N, D), N the longest of lengths.",
    "memory": "GPU: torch.cuda.max_memory_allocated; CPU: peak RSS growth of one step in this process (method), "
              "glibc's mmap threshold at 64 KiB as the suite's workers; page-granular, a few 0.1 MB.",
    "lengths": "the batch's sequence lengths (drawn, or --lengths); tokens: their sum; ideal_flops: causal "
               "attention over the real tokens, 4 H D sum L(L+1)/2, x3.5 forward+backward; tile_model_flops: CPU "
               "forward of the fused kernels only, the FLOPs their (BLOCK_M, BLOCK_N) tiles imply (None otherwise).",
    "tflops": "GPU only: ideal_flops / median time (the real tokens' work, not the padded batch's).",
}
"""What ``varlen.json``'s fields mean: the suite's, with varlen's own."""


def draw_lengths(batch: int, max_len: int, seed: int) -> List[int]:
    """``batch`` lengths from a seeded log-normal with median max_len / 4, clipped to [MIN_LEN, max_len]."""
    draws = np.random.default_rng(seed).lognormal(math.log(max_len / 4), SIGMA, batch)
    return [int(n) for n in np.clip(np.round(draws), MIN_LEN, max_len)]


def ideal_flops(lengths: List[int], heads: int, head_dim: int, mode: str) -> float:
    """FLOPs of causal attention over the real tokens only: 4 H D per (query, key) pair with key <= query (two
    matmuls), sum L(L+1)/2 pairs; forward+backward 3.5x (FlashAttention's convention)."""
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    return 4.0 * heads * head_dim * pairs * (3.5 if mode == "fwd+bwd" else 1.0)


def tile_flops(lengths: List[int], padded_len: Optional[int], tile, heads: int, head_dim: int) -> int:
    """Forward FLOPs the fused kernel's (BLOCK_M, BLOCK_N) tiles imply for causal rows of ``lengths``: every query
    block visits the key blocks up to its last row or the sequence's last key, two BLOCK_M x BLOCK_N x D dots
    each. ``padded_len``: query blocks run over the padded length (``kernels.attention``), else over each
    sequence only (``attention_varlen``)."""
    block_m, block_n = tile
    blocks = sum(math.ceil(min((m + 1) * block_m, n) / block_n)
                 for n in lengths for m in range(math.ceil((padded_len or n) / block_m)))
    return blocks * heads * 4 * block_m * block_n * head_dim


def _providers(lengths: List[int], padded_len: int, device: torch.device) -> Dict[Provider, object]:
    """{provider: fn(q, k, v, causal)} on right-padded (B, H, N, D) inputs of these lengths."""
    real = torch.arange(padded_len, device=device)[None] < torch.tensor(lengths, device=device)[:, None]  # (B, N)
    rows, cols = real.nonzero(as_tuple=True)  # the real tokens, as a collator's unpad indices
    offsets = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32, device=device)
    longest = max(lengths)

    def varlen(q, k, v, causal):
        packed = [t.transpose(1, 2)[rows, cols] for t in (q, k, v)]  # (total, H, D)
        out = attention_varlen(*packed, offsets, offsets, longest, longest, causal=causal)
        padded = out.new_zeros(q.shape[0], padded_len, *out.shape[1:]).index_put((rows, cols), out)
        return padded.transpose(1, 2)

    def padded(q, k, v, causal):
        return kernels.attention(q, k, v, causal=causal, key_padding_mask=real)

    def baseline(q, k, v, causal):
        return reference.attention(q, k, v, causal=causal, mask=real[:, None, None, :])

    return {Provider("baseline", "attention", lambda: baseline, baseline=True): baseline,
            Provider("padded", "attention", lambda: padded, triton=True, attention_kernels=True): padded,
            Provider("varlen", "attention", lambda: varlen, triton=True, attention_kernels=True): varlen}


def _cpu_memory(fn, case: Case) -> dict:
    """``benchmarks.memory``'s CPU measurement of one step, in this process (the providers are closures over
    the lengths, which its worker process cannot look up)."""
    return {**memory._measure_one(make_step(fn, make_inputs(case, torch.device("cpu")))), "method": CPU_MEMORY_METHOD}


def measure(lengths: List[int], dims: dict, device: DeviceInfo, time_budget_s: float,
            modes=MODES) -> List[dict]:
    """One record per (mode, provider) for this batch of lengths."""
    padded_len = max(lengths)
    recs = []
    for mode in modes:
        case = Case("attention", mode, padded_len, causal=True, batch=len(lengths), **dims)
        ideal = ideal_flops(lengths, dims["heads"], dims["head_dim"], mode)
        _, tiles = runner._count_tiles(case)
        for prov, fn in _providers(lengths, padded_len, device.torch_device).items():
            record = runner.measure_point(case, prov, fn, device, None, time_budget_s)
            record.update(lengths=lengths, tokens=sum(lengths), ideal_flops=ideal, tile_model_flops=None)
            if mode == "fwd" and prov.name in FWD_PROVIDERS and device.interpreted:
                record["tile_model_flops"] = tile_flops(lengths, padded_len if prov.name == "padded" else None,
                                                        tiles["fwd"], dims["heads"], dims["head_dim"])
            if record["status"] == "ok" and device.kind == "cpu":
                record["memory"] = _cpu_memory(fn, case)
            if record["tflops"] is not None:  # useful TFLOPS: the ideal FLOPs of the real tokens over the time
                record["tflops"] = ideal / (record["time"]["median_ms"] * 1e-3) / 1e12
                peak = device.peak and device.peak["flops"].get(case.dtype)
                record["pct_of_peak"] = peak and 100 * record["tflops"] * 1e12 / peak
            recs.append(record)
    return recs


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def summary(recs: List[dict]) -> str:
    """Per (padded length, mode): ideal and counted FLOPs, bytes, and the padded / varlen ratios."""
    lines = []
    for n, mode in dict.fromkeys((r["length"], r["mode"]) for r in recs):
        point = {r["provider"]: r for r in recs if (r["length"], r["mode"]) == (n, mode)}
        ideal = point["varlen"]["ideal_flops"]
        lines.append(f"{mode} N={n} lengths={point['varlen']['lengths']}: ideal FLOPs {ideal:.4g} "
                     f"(4 H D sum L(L+1)/2{', x3.5' if mode == 'fwd+bwd' else ''})")
        for name, r in point.items():
            flops, moved = analysis.counted_flops(r), analysis.counted_bytes(r)
            model = r["tile_model_flops"]
            ms = analysis.time_ms(r)
            lines.append(f"  {name:<9} counted FLOPs {flops or 0:.4g} (/ideal {_ratio(flops, ideal)}"
                         f"{'' if model is None else f', tile model {model:.4g}'})  bytes {moved or 0:.4g}  "
                         f"time {'-' if ms is None else f'{ms:.3g} ms'} ({r['time']['method'] if ms else r['status']})")
        ratios = {name: _ratio(metric(point["padded"]), metric(point["varlen"]))
                  for name, metric in analysis.METRICS.items()}
        lines.append("  padded / varlen: " + "  ".join(f"{name} {value}" for name, value in ratios.items()))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks varlen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=records.out_dir, default="results",
                        help="folder for varlen.json, varlen.csv and the PNGs")
    parser.add_argument("--max-len", type=suite.at_least(1), nargs="+",
                        help="cap of the drawn lengths, one batch per value (default 256 on CPU, 2k..16k on a GPU)")
    parser.add_argument("--lengths", type=suite.at_least(1), nargs="+",
                        help="these lengths instead of drawn ones (one batch)")
    parser.add_argument("--batch", type=suite.at_least(1),
                        help="sequences drawn per batch (default 8 on CPU, 32 on a GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn lengths")
    parser.add_argument("--heads", type=suite.at_least(1), help="attention heads (default 2 on CPU, 16 on a GPU)")
    parser.add_argument("--head-dim", type=suite.at_least(1), help="attention head dim (default 64)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default float16")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="only these modes")
    parser.add_argument("--time-budget", type=suite.at_least(0.0, float), default=1.0,
                        help="seconds of repeats per timed point")
    parser.add_argument("--threads", type=suite.at_least(1), default=1,
                        help="CPU only: torch threads (default 1, as the suite: on a shared machine a small op "
                             "waiting for a busy second thread takes milliseconds instead of microseconds)")
    args = parser.parse_args(argv)
    if args.lengths:  # the drawing options would be dropped without a word
        drawn = [flag for flag, value in (("--max-len", args.max_len), ("--batch", args.batch)) if value]
        if drawn:
            parser.error(f"--lengths gives the batch itself; it does not take {' or '.join(drawn)}")
    device = detect()
    print(f"device: {device.name}  (timing: {device.timing})", flush=True)
    dims = {key: getattr(args, key) or default for key, default in suite.DIMS[device.kind].items() if key != "batch"}
    batch = args.batch or BATCH[device.kind]
    # A repeated --max-len or --modes value is measured once (twice, it doubled the records and broke the fits).
    batches = [args.lengths] if args.lengths else [draw_lengths(batch, n, args.seed)
                                                   for n in dict.fromkeys(args.max_len or MAX_LENS[device.kind])]
    modes = [mode for mode in MODES if mode in args.modes]
    if device.kind == "cpu":  # as benchmarks.memory's workers: freed blocks leave the process (M_MMAP_THRESHOLD)
        ctypes.CDLL(None).mallopt(-3, 65536)
    with cpu_threads(device, args.threads):
        recs = [r for lengths in batches for r in measure(lengths, dims, device, args.time_budget, modes)]
    analysis.add_ratios(recs)
    print(format_table(recs))
    config = {**vars(args), **dims, "batches": batches, "command": "varlen"}
    records.report(args.out, "varlen", device, config, recs, summary(recs),
                   lambda recs, device, out: plots.plot_all(recs, device, out, "varlen"), CONVENTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
