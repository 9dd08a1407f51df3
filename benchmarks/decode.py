"""``python -m benchmarks decode``: one decode step (1 new token per row) of ``kernels.attention_with_kvcache`` at
B in {1, 8}, H=32, Hkv=8, D=128, fp16, against the training kernel (``kernels.attention`` with q (B, H, 1, D))
and the quadratic baseline (``kernels.reference.attention``).

Two kinds of numbers, each record labelled with its kind:

- ``model`` (caches 1k..32k, any machine): bytes each path moves by construction (the decode kernel reads the cache
  once per kv head, plus its split partials; the training kernel reads each kv head once per query head; the
  baseline reads the cache, writes its GQA-repeated copy and reads that back in its two matmuls, its (B, H, N)
  score passes left out), the minimum (cache once, q, out), the kernels' programs against the SM counts of an
  A100 (108) and an H100 (132), and the roofline time of those bytes and FLOPs (``benchmarks/roofline.py``). No
  GPU number is measured here.
- ``counted`` (small caches, interpreted on CPU): bytes and FLOPs counted by ``benchmarks.counting`` while the
  three paths actually run, the decode kernel with the tile a GPU launches (BLOCK_N 64), to check the model.
  ``--quick`` counts the 256-key cache only (about a minute of CPU; both caches take about three).

Writes ``decode.json``, ``decode.md`` (the README's tables) and ``decode.png`` under ``--out``.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

import torch

import kernels
from benchmarks import plots, records, roofline
from benchmarks.device import detect
from benchmarks.counting import counting
from kernels import reference
from kernels.attention import decode
from kernels.registry import use_config

HEADS, KV_HEADS, HEAD_DIM, ITEMSIZE = 32, 8, 128, 2
BATCHES = (1, 8)
MODEL_CACHES = tuple(1024 * 2**i for i in range(6))  # 1k .. 32k
COUNTED_CACHES = (256, 1024)
TABLE_CACHES = (1024, 4096, 32768)
SMS = {"A100-SXM4-80GB": 108, "H100-SXM5": 132}
PATHS = ("decode", "training", "baseline")
GPU_BLOCK_N = 64  # the fp16 d128 key block a GPU launches (decode._TILES)
CONVENTIONS = {
    "kind": "model (bytes and programs by construction, roofline times: computed, not measured) or counted (bytes "
            "and FLOPs counted by benchmarks.counting while the three paths run interpreted on CPU); batch: B rows "
            "of one new token each; cache: the keys each row attends to (H=32, Hkv=8, D=128, fp16).",
    "minimum_bytes": "the cache read once plus q read and out written; flops (model): 4 B H cache D, q.k and p.v.",
    "paths": "model: per path@GPU, bytes (bytes_vs_minimum over minimum_bytes), programs of its grid, splits (the "
             "decode kernel's split-KV), sms, waves (programs / sms) and roofline (time_ms, bound, label 'model'); "
             "counted: per path (decode, training, baseline), the counts (bytes_read, bytes_written, bytes, flops, "
             "...) and bytes_vs_minimum.",
}
"""What ``decode.json``'s record fields mean (the module docstring, also there, has the method)."""


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
        # The baseline: repeat_interleave reads the cache and writes it group times, the two matmuls read that.
        paths[f"baseline@{gpu}"] = dict(bytes=(1 + 2 * group) * cache_bytes + io_bytes, sms=sms, gpu=gpu)
    for path in paths.values():
        path["bytes_vs_minimum"] = path["bytes"] / rec["minimum_bytes"]
        if "programs" in path:  # the baseline is a series of aten launches, not one grid
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


def _plot(recs: List[dict], png: str) -> List[str]:
    """[png] written, or [] without matplotlib."""
    if not plots.have_pyplot():
        return []
    plt = plots.plt
    fig, (ax_bytes, ax_waves, ax_time) = plt.subplots(1, 3, figsize=(13, 4))
    for batch in BATCHES:
        model = [r for r in recs if r["kind"] == "model" and r["batch"] == batch]
        caches = [r["cache"] for r in model]
        counted = [r for r in recs if r["kind"] == "counted" and r["batch"] == batch]
        for color, path in zip(("C0", "C1", "C2"), PATHS):
            paths = [r["paths"][f"{path}@H100-SXM5"] for r in model]
            style = dict(color=color, marker="o", linestyle="-" if batch == 1 else "--", label=f"{path} B={batch}")
            ax_bytes.plot(caches, [p["bytes_vs_minimum"] for p in paths], **style)
            ax_time.plot(caches, [1e3 * p["roofline"]["time_ms"] for p in paths], **style)
            if path != "baseline":
                ax_waves.plot(caches, [p["waves"] for p in paths], **style)
            if counted:
                ax_bytes.plot([r["cache"] for r in counted], [r["paths"][path]["bytes_vs_minimum"] for r in counted],
                              "x", color=color, markersize=9,  # both batches: one legend entry
                              label=f"{path} counted (CPU interpreter)" if batch == BATCHES[0] else None)
    ax_waves.axhline(2, color="grey", linestyle=":", label="2 waves")
    for ax, title in ((ax_bytes, "bytes moved / minimum (model; x: counted)"),
                      (ax_waves, "programs / 132 SMs (model)"), (ax_time, "roofline time, us (model)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached keys")
        ax.set_title(title)
        ax.legend(fontsize=6)
    fig.suptitle(f"decode step, H={HEADS}, Hkv={KV_HEADS}, D={HEAD_DIM}, fp16: models of an H100 SXM (not measured) "
                 "and bytes counted on CPU in the Triton interpreter", fontsize=9)
    return plots.save(fig, png, dpi=80)


def _markdown(recs: List[dict]) -> str:
    """The README's tables: the model at B x TABLE_CACHES on an H100 SXM, and the counted bytes."""
    lines = ["Model of an H100 SXM (132 SMs; roofline of 3.35 TB/s and 989 TFLOP/s): computed, not measured.", "",
             "| B | cache | bytes/min decode | training | baseline | programs/SMs decode | training "
             "| roofline us decode | training | baseline |", "|---" * 10 + "|"]
    for r in recs:
        if r["kind"] == "model" and r["cache"] in TABLE_CACHES:
            p = [r["paths"][f"{path}@H100-SXM5"] for path in PATHS]
            cells = ([r["batch"], r["cache"]] + [f"{x['bytes_vs_minimum']:.2f}x" for x in p]
                     + [f"{x['waves']:.2f}" for x in p[:2]] + [f"{1e3 * x['roofline']['time_ms']:.1f}" for x in p])
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    counted = [r for r in recs if r["kind"] == "counted"]
    if counted:
        lines += ["", "Counted on CPU in the Triton interpreter (decode includes the append):", "",
                  "| B | cache | bytes/min decode | training | baseline |", "|---" * 5 + "|"]
        lines += [f"| {r['batch']} | {r['cache']} | "
                  + " | ".join(f"{r['paths'][path]['bytes_vs_minimum']:.2f}x" for path in PATHS) + " |"
                  for r in counted]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=records.out_dir, default="results",
                        help="folder for decode.json, decode.md and decode.png")
    parser.add_argument("--no-count", action="store_true", help="model only: skip the interpreted counted runs")
    parser.add_argument("--quick", action="store_true", help="count the smallest cache only")
    args = parser.parse_args(argv)
    device = detect()
    count = not args.no_count and kernels.INTERPRETED  # counting needs the interpreter's loads and stores
    counted = (f"bytes counted on {device.name}" if count else
               "skipped (--no-count)" if args.no_count else "not run (counting needs Triton's interpreter: no GPU)")
    # Said first, as every command does, and before the counted runs' minutes.
    print(f"device: {device.name}  (nothing timed: model rows are a roofline model of {' and '.join(SMS)}, "
          f"computed, not measured; counted rows: {counted})", flush=True)
    recs = [_modelled(b, n) for b in BATCHES for n in MODEL_CACHES]
    if count:
        recs += [_counted(b, n) for b in BATCHES for n in (COUNTED_CACHES[:1] if args.quick else COUNTED_CACHES)]
    print(f"{'kind':8}{'B':>3}{'cache':>7}  {'path':24}{'bytes/min':>10}{'programs':>10}{'waves':>7}{'model us':>10}")
    for r in recs:
        for name, p in r["paths"].items():
            model_us = f"{1e3 * p['roofline']['time_ms']:.1f}" if "roofline" in p else "-"
            waves = f"{p['waves']:.2f}" if "waves" in p else "-"  # counted runs and the baseline: no grid
            print(f"{r['kind']:8}{r['batch']:>3}{r['cache']:>7}  {name:24}{p['bytes_vs_minimum']:>10.3f}"
                  f"{p.get('programs', '-'):>10}{waves:>7}{model_us:>10}")
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = (os.path.join(args.out, name) for name in ("decode.json", "decode.md"))
    config = {**vars(args), "command": "decode", "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "dtype": "float16"}
    doc = records.document("decode", device, config, recs, [])
    doc["conventions"] = {**CONVENTIONS, "decode": __doc__}  # not the suite's: nothing is timed
    with records.replaced(json_path) as f:  # atomic and UTF-8, as every command's records
        json.dump(doc, f, indent=1, default=str)
    with records.replaced(md_path) as f:
        f.write(_markdown(recs))
    written = [json_path, md_path] + _plot(recs, os.path.join(args.out, "decode.png"))
    print("wrote: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
