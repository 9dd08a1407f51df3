"""``python -m benchmarks decode``: one decode step (1 new token per row) of ``kernels.attention_with_kvcache`` at
B in {1, 8}, H=32, Hkv=8, D=128, fp16, against the training kernel (``kernels.attention`` with q (B, H, 1, D))
and the quadratic baseline (``kernels.reference.attention``).

Two kinds of numbers, each record labelled with its kind:

- ``model`` (caches 1k..32k, any machine): bytes each path moves by construction (the decode kernel reads the cache
  once per kv head, plus its split partials; the training kernel reads each kv head once per query head), the
  minimum (cache once, q, out), programs launched against the SM counts of an A100 (108) and an H100 (132), and
  the roofline time of those bytes and FLOPs (``benchmarks/roofline.py``). No GPU number is measured here.
- ``counted`` (small caches, interpreted on CPU): bytes and FLOPs counted by ``benchmarks.counting`` while the
  three paths actually run, the decode kernel with the tile a GPU launches (BLOCK_N 64), to check the model.

Writes ``decode.json`` and ``decode.png`` under ``--out``.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

import torch

import kernels
from benchmarks import roofline
from benchmarks.counting import counting
from kernels import reference
from kernels.attention import decode
from kernels.registry import use_config

HEADS, KV_HEADS, HEAD_DIM, ITEMSIZE = 32, 8, 128, 2
BATCHES = (1, 8)
MODEL_CACHES = tuple(1024 * 2**i for i in range(6))  # 1k .. 32k
COUNTED_CACHES = (256, 1024)
SMS = {"A100-SXM4-80GB": 108, "H100-SXM5": 132}
GPU_BLOCK_N = 64  # the fp16 d128 key block a GPU launches (decode._TILES)


def _modelled(batch: int, cache: int) -> dict:
    """Bytes, FLOPs, programs and roofline times of one decode step at a cache of ``cache`` keys, by construction."""
    group = HEADS // KV_HEADS
    cache_bytes = 2 * batch * KV_HEADS * cache * HEAD_DIM * ITEMSIZE
    io_bytes = 2 * batch * HEADS * HEAD_DIM * ITEMSIZE  # q read, out written
    flops = 4 * batch * HEADS * cache * HEAD_DIM  # q.k and p.v
    rec = {"kind": "model", "batch": batch, "cache": cache, "minimum_bytes": cache_bytes + io_bytes, "flops": flops}
    paths = {}
    for gpu, sms in SMS.items():
        splits = decode.choose_splits(batch * KV_HEADS, group, cache, HEAD_DIM, ITEMSIZE, GPU_BLOCK_N, sms)
        partials = 0 if splits == 1 else 2 * splits * batch * HEADS * (HEAD_DIM + 1) * 4
        paths[f"decode@{gpu}"] = dict(bytes=cache_bytes + io_bytes + partials, programs=batch * KV_HEADS * splits,
                                      splits=splits, sms=sms, gpu=gpu)
        # The training kernel: one program per (batch, query head), each reading its kv head's whole cache.
        paths[f"training@{gpu}"] = dict(bytes=group * cache_bytes + io_bytes, programs=batch * HEADS, splits=1,
                                        sms=sms, gpu=gpu)
    for path in paths.values():
        path["bytes_vs_minimum"] = path["bytes"] / rec["minimum_bytes"]
        path["waves"] = path["programs"] / path["sms"]
        path["roofline"] = roofline.model_time(roofline.spec_by_name(path["gpu"]), flops, path["bytes"], "float16")
    rec["paths"] = paths
    return rec


def _counted(batch: int, cache: int) -> dict:
    """Counted bytes/FLOPs of the three paths run interpreted: a cache of ``cache`` - 1 keys plus the new one."""
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(batch, cache, KV_HEADS, HEAD_DIM, dtype=torch.float16) for _ in range(2))
    k_new, v_new = (torch.randn(batch, 1, KV_HEADS, HEAD_DIM, dtype=torch.float16) for _ in range(2))
    minimum = 2 * batch * KV_HEADS * cache * HEAD_DIM * ITEMSIZE + 2 * batch * HEADS * HEAD_DIM * ITEMSIZE
    rec = {"kind": "counted", "batch": batch, "cache": cache, "minimum_bytes": minimum, "paths": {}}
    qh, kh, vh = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    runs = {"decode": lambda: kernels.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                                             cache_seqlens=cache - 1, causal=True),
            "training": lambda: kernels.attention(qh, kh, vh, causal=True),
            "baseline": lambda: reference.attention(qh, kh, vh, causal=True)}
    for name, run in runs.items():
        with use_config("attention_decode", BLOCK_N=GPU_BLOCK_N), counting() as counts:
            run()
        rec["paths"][name] = {**counts.as_record(), "bytes_vs_minimum": counts.bytes / minimum}
    return rec


def _plot(recs: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bytes, ax_waves) = plt.subplots(1, 2, figsize=(11, 4))
    for batch in BATCHES:
        model = [r for r in recs if r["kind"] == "model" and r["batch"] == batch]
        caches = [r["cache"] for r in model]
        for name in ("decode@H100-SXM5", "training@H100-SXM5"):
            ax_bytes.plot(caches, [r["paths"][name]["bytes_vs_minimum"] for r in model], marker="o",
                          label=f"{name.split('@')[0]} B={batch} (model)")
            ax_waves.plot(caches, [r["paths"][name]["waves"] for r in model], marker="o",
                          label=f"{name.split('@')[0]} B={batch} (model, 132 SMs)")
        counted = [r for r in recs if r["kind"] == "counted" and r["batch"] == batch]
        if counted:
            ax_bytes.plot([r["cache"] for r in counted], [r["paths"]["decode"]["bytes_vs_minimum"] for r in counted],
                          "x", markersize=10, label=f"decode B={batch} (counted, interpreted)")
    ax_waves.axhline(2, color="grey", linestyle=":", label="2 waves")
    for ax, title in ((ax_bytes, "bytes moved / minimum"), (ax_waves, "programs / SMs")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached keys")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"decode step, H={HEADS}, Hkv={KV_HEADS}, D={HEAD_DIM}, fp16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="folder for decode.json and decode.png")
    parser.add_argument("--no-count", action="store_true", help="model only: skip the interpreted counted runs")
    args = parser.parse_args(argv)
    recs = [_modelled(b, n) for b in BATCHES for n in MODEL_CACHES]
    if not args.no_count and kernels.INTERPRETED:
        recs += [_counted(b, n) for b in BATCHES for n in COUNTED_CACHES]
    print(f"{'kind':8}{'B':>3}{'cache':>7}  {'path':24}{'bytes/min':>10}{'programs':>10}{'waves':>7}{'model us':>10}")
    for r in recs:
        for name, p in r["paths"].items():
            model_us = f"{1e3 * p['roofline']['time_ms']:.1f}" if "roofline" in p else "-"
            waves = f"{p['waves']:.2f}" if "waves" in p else "-"
            print(f"{r['kind']:8}{r['batch']:>3}{r['cache']:>7}  {name:24}{p['bytes_vs_minimum']:>10.3f}"
                  f"{p.get('programs', '-'):>10}{waves:>7}{model_us:>10}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump({"command": "decode", "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                   "dtype": "float16", "records": recs}, f, indent=1)
    _plot(recs, os.path.join(args.out, "decode.png"))
    print(f"wrote: {os.path.join(args.out, 'decode.json')}, {os.path.join(args.out, 'decode.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
