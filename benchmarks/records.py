"""The files a run leaves behind: one JSON document (device, conventions, records, fits) and a flat CSV."""
import csv
import datetime
import json
import os
import platform
from typing import List

import torch
import triton

from benchmarks.device import DeviceInfo

SCHEMA = "transformer-kernels/benchmarks/1"
CONVENTIONS = {
    "time": "GPU: triton.testing.do_bench median and 20/80 percentiles. CPU: wall-clock; Triton providers run "
            "in Triton's interpreter ('interpreter'), which says nothing about GPU speed.",
    "tflops": "attention only, GPU only: 4*B*H*N^2*D forward, x0.5 causal, x3.5 forward+backward (FlashAttention).",
    "gbps": "softmax/norms, GPU only: minimum bytes (inputs read once, outputs written once) / median time.",
    "memory": "peak_bytes: growth above the inputs during one step; extra_bytes: peak minus the outputs.",
    "counted": "bytes read/written by every executed Triton load/store (masked lanes excluded) and aten op; "
               "flops: tl.dot 2*M*N*K and torch.utils.flop_counter formulas. vs_min: over min_bytes. Triton "
               "counts are for the tiles the kernels run with (re-reads of K/V grow as N^2 / BLOCK_M, so smaller "
               "tiles count more traffic): attention kernels are counted with an sm_90 GPU's default tiles, each "
               "kernel's first autotune config (counted.tiles says which; interpreted time and memory use the "
               "interpreter's 32x32), other kernels with their own launch configs. A fused aten op (CPU "
               "SDPA) is opaque: its inputs and outputs only, and torch's formula counts its FLOPs as non-causal.",
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
    return {prefix[:-1]: "x".join(map(str, value)) if isinstance(value, list) else value}


def write(out_dir: str, name: str, doc: dict) -> List[str]:
    """Write ``<name>.json`` and ``<name>.csv`` (one row per record) into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.csv")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1, default=str)  # a value JSON has no type for (a dtype, a path) as its text
    rows = [_flatten(r) for r in doc["records"]]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def report(out_dir: str, name: str, device: DeviceInfo, config: dict, records: List[dict], table: str,
           plot) -> List[str]:
    """A standalone command's ending: print ``table``, write ``<name>.json``/``.csv`` and ``plot(records, device,
    out_dir)``'s PNGs into ``out_dir``, print and return their paths."""
    print(table)
    written = write(out_dir, name, document(name, device, config, records, []))
    written += plot(records, device, out_dir)
    print("wrote: " + ", ".join(written))
    return written
