"""The terminal table: one line per point, the numbers a person compares, and the fitted exponents.

Columns: median time (``(interp)``: Triton's interpreter on CPU), TFLOPS or GB/s (GPU only), peak memory beyond
the inputs and its part beyond the outputs ("extra"), peak memory over the baseline's, counted bytes moved, their
ratio to the minimum and to the baseline's, and the roofline model time on each modelled GPU.
"""
from typing import List, Optional

from benchmarks.analysis import counted_bytes, model_ms, peak_bytes, time_ms
from benchmarks.roofline import MODELLED

MB = 1e6


def _num(value: Optional[float], fmt: str = "{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def _time(record: dict) -> str:
    ms = time_ms(record)
    if ms is None:
        return "-"
    tag = " (interp)" if record["time"]["method"].startswith("interpreter") else ""
    return f"{ms:.3g}{tag}"


def _throughput(record: dict) -> str:
    if record.get("tflops") is not None:
        return f"{record['tflops']:.1f} TFLOPS"
    if record.get("gbps") is not None:
        return f"{record['gbps']:.0f} GB/s"
    return "-"


def _row(r: dict) -> List[str]:
    ratios = r.get("vs_baseline") or {}
    peak = peak_bytes(r)
    counted = counted_bytes(r)
    extra = r["memory"]["extra_bytes"] if peak is not None else None
    cells = [r["op"], r["mode"], str(r["length"]), r["provider"], _time(r), _throughput(r),
             _num(peak and peak / MB), _num(extra and extra / MB), _num(ratios.get("peak_memory"), "{:.2f}"),
             _num(counted and counted / MB), _num(r["counted"] and r["counted"]["vs_min"], "{:.1f}"),
             _num(ratios.get("counted_bytes"), "{:.2f}")]
    cells += [_num(model_ms(r, gpu), "{:.3g}") for gpu in MODELLED]
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"[:70]
    return cells + [status]


def format_table(records: List[dict]) -> str:
    header = ["op", "mode", "N", "provider", "time ms", "throughput", "peak MB", "extra MB", "mem/base", "moved MB",
              "/min", "moved/base"] + [f"{gpu.split('-')[0]} model ms" for gpu in MODELLED] + ["status"]
    rows = [header] + [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_fits(fits: List[dict]) -> str:
    """One line per provider: the fitted exponent p of metric ~ N^p."""
    lines = ["fitted log-log slope (metric ~ N^p, largest 4 lengths):"]
    for fit in fits:
        s = fit["slopes"]
        if all(v is None for v in s.values()):
            continue
        lines.append(f"  {fit['op']:<10} {fit['mode']:<7} {fit['provider']:<16} time p={_num(s['time'], '{:.2f}')}"
                     f"  peak memory p={_num(s['peak_memory'], '{:.2f}')}"
                     f"  bytes moved p={_num(s['counted_bytes'], '{:.2f}')}"
                     f"  FLOPs p={_num(s.get('counted_flops'), '{:.2f}')}")
    if len(lines) == 1:
        lines.append("  none: a slope needs two or more lengths of a provider that ran")
    return "\n".join(lines)
