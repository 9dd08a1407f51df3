"""The files a run leaves behind: one JSON document (device, conventions, records, fits) and a flat CSV."""
import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
from typing import Iterator, List, Optional, TextIO

import torch
import triton

from benchmarks.device import DeviceInfo

SCHEMA = "transformer-kernels/benchmarks/1"
CONVENTIONS = {
    "time": "GPU: triton.testing.do_bench median and 20/80 percentiles. CPU: wall-clock; Triton providers run "
            "in Triton's interpreter ('interpreter'), which says nothing about GPU speed.",
    "tflops": "attention only, GPU only: 4*B*H*N^2*D forward, x0.5 causal, x3.5 forward+backward (FlashAttention); "
              "the sliding-window and document providers: that x the share of causal's query-key pairs they keep.",
    "gbps": "softmax/norms, GPU only: minimum bytes (inputs read once, outputs written once) / median time.",
    "pct_of_peak": "GPU only: tflops or gbps as a percent of the device's peak (device.peak; None for a GPU not "
                   "in benchmarks/roofline.py).",
    "memory": "peak_bytes: growth above the inputs during one step, outputs included; extra_bytes: peak minus the "
              "outputs. method says how: GPU torch.cuda.max_memory_allocated; CPU the peak RSS growth of a worker "
              "process (everything the step touched, the interpreter's numpy tiles too; page- and "
              "counter-granular, a few 0.1 MB, so small points read 0 and extra_bytes can be negative; readings up "
              "to 0.3 MB, memory.CPU_RESOLUTION, are neither fitted nor compared).",
    "min_bytes": "the inputs (and grad_out) read once plus the outputs (and gradients) written once.",
    "vs_baseline": "time, peak_memory, counted_bytes, counted_flops over the baseline provider's at the same op, mode "
                   "and length (a speedup is 1 / time); vs_causal: the same over the fused causal kernel's.",
    "fits": "per op/mode/provider: slopes, p of metric ~ N^p by least squares on log-log over the largest 4 "
            "lengths with a value; lengths, those used; notes, why a slope is not a scaling law (2 lengths only, or "
            "point-to-point slopes spread more than 0.25: fixed costs, tile quantisation or resolution; the sliding "
            "window fitted from N < 2 windows, where it barely binds; the documents' counted bytes and FLOPs where "
            "each document is at most 2 query tiles, read whole).",
    "counted": "bytes read/written by every executed Triton load/store (masked lanes excluded) and aten op; "
               "flops: tl.dot 2*M*N*K and torch.utils.flop_counter formulas. vs_min: over min_bytes. Triton "
               "counts are for the tiles the kernels run with (re-reads of K/V grow as N^2 / BLOCK_M, so smaller "
               "tiles count more traffic): attention kernels are counted with an sm_90 GPU's default tiles, each "
               "kernel's first autotune config (counted.tiles says which; interpreted time and memory use the "
               "interpreter's 32x32), other kernels with their own launch configs. A fused aten op (CPU "
               "SDPA) is opaque: its inputs and outputs only, and torch's formula counts its FLOPs as non-causal "
               "(opaque_ops counts such ops, flash-attn's custom op too: its FLOPs are not counted at all). "
               "FLOPs are the work executed, not the conventional count (tflops): whole tiles on the causal "
               "diagonal, the backward's recomputed matmuls; the baseline multiplies every score, masked or not.",
    "model": "roofline model, not a measurement: max(counted flops / peak FLOP/s, counted bytes / HBM bandwidth).",
}


def document(command: str, device: DeviceInfo, config: dict, records: List[dict], fits: List[dict]) -> dict:
    return {"schema": SCHEMA, "command": command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device.as_record(), "config": config, "conventions": CONVENTIONS,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "triton": triton.__version__, "machine": platform.machine(), "cpus": os.cpu_count()},
            "records": records, "fits": fits}


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    if isinstance(value, list):  # a shape as 2x16x64; a list holding structure as its JSON text, one cell
        nested = any(isinstance(item, (dict, list)) for item in value)
        return {prefix[:-1]: json.dumps(value, default=str) if nested else "x".join(map(str, value))}
    return {prefix[:-1]: value}


def out_dir(path: str) -> str:
    """argparse type of every command's ``--out``: ``path`` unchanged if it is, or can be made, a writable folder
    (its nearest existing ancestor is one), else argparse's usage error before anything is measured (not a
    traceback from :func:`write` once the measuring is done). Nothing is created here."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {path!r}: {probe!r} is not a writable folder")
    return path


@contextlib.contextmanager
def replaced(path: str, newline: Optional[str] = None) -> Iterator[TextIO]:
    """A UTF-8 text file (units such as µs whatever the locale) written beside ``path`` and renamed onto it when
    complete: a run killed mid-write (the GPU check's partial saves under a time limit) leaves the previous file
    whole, never a truncated one."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8", newline=newline) as f:
        yield f
    os.replace(partial, path)


def write(out_dir: str, name: str, doc: dict) -> List[str]:
    """Write ``<name>.json`` and ``<name>.csv`` (one row per record) into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.csv")
    with replaced(json_path) as f:
        json.dump(doc, f, indent=1, default=str)  # a value JSON has no type for (a dtype, a path) as its text
    rows = [_flatten(r) for r in doc["records"]]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    # A failed point's None where the others have a dict ("time" beside "time.median_ms"): no empty column for it
    columns = [c for c in columns if not (any(other.startswith(c + ".") for other in columns)
                                          and all(row.get(c) is None for row in rows))]
    with replaced(csv_path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def report(out_dir: str, name: str, device: DeviceInfo, config: dict, records: List[dict], table: str,
           plot, conventions: Optional[dict] = None) -> List[str]:
    """A standalone command's ending: print ``table``, write ``<name>.json``/``.csv`` and ``plot(records, device,
    out_dir)``'s PNGs into ``out_dir``, print and return their paths. ``conventions``: what the records' fields
    mean, where the suite's :data:`CONVENTIONS` do not describe them."""
    print(table)
    doc = document(name, device, config, records, [])
    if conventions is not None:
        doc["conventions"] = conventions
    written = write(out_dir, name, doc)
    written += plot(records, device, out_dir)
    print("wrote: " + ", ".join(written))
    return written
