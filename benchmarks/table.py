"""The terminal table: what was measured, on what, one line per point, and the fitted exponents.

Above the table, a few lines say the device, each op's shape and dtype, how times and peak memory were taken and
that the model columns are a model. Columns: median time (``(interp)``: Triton's interpreter on CPU), TFLOPS or
GB/s (GPU only), peak memory beyond the inputs and its part beyond the outputs ("extra"), peak memory over the
baseline's, counted bytes moved, their ratio to the minimum and to the baseline's, and the roofline model time on
each modelled GPU.
"""
from typing import Dict, List, Optional

from benchmarks.analysis import FIT_POINTS, counted_bytes, model_ms, shape_with_n, time_ms
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
    measured = r["status"] == "ok" and r["memory"] and r["memory"]["status"] == "ok"
    peak, extra = (r["memory"]["peak_bytes"], r["memory"]["extra_bytes"]) if measured else (None, None)
    counted = counted_bytes(r)
    floor = "*" if r["counted"] and r["counted"].get("opaque_ops") else ""  # a fused op counted from outside
    cells = [r["op"], r["mode"], str(r["length"]), r["provider"], _time(r), _throughput(r),
             _num(peak and peak / MB), _num(extra and extra / MB), _num(ratios.get("peak_memory"), "{:.2f}"),
             _num(counted and counted / MB) + floor, _num(r["counted"] and r["counted"]["vs_min"], "{:.1f}"),
             _num(ratios.get("counted_bytes"), "{:.2f}")]
    cells += [_num(model_ms(r, gpu), "{:.3g}") + floor for gpu in MODELLED]
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"[:70]
    return cells + [status]


def _shapes(records: List[dict]) -> str:
    """Each op's input shape with its varying length as N, and dtype: "attention (1, 2, N, 64) float16"."""
    shapes = {}
    for r in records:
        shapes.setdefault(r["op"], f"{r['op']} {shape_with_n(r)} {r['dtype']}")
    return "; ".join(shapes.values())


def _methods(records: List[dict], key: str) -> str:
    found = {r[key]["method"] for r in records if r.get(key) and r[key].get("method")}
    return "; ".join(sorted(found)) or "none measured"


def describe(records: List[dict]) -> List[str]:
    """What the table's numbers are: device, shapes and dtype, how time and memory were taken, what is counted
    and that the model columns are a model (one line each)."""
    devices = ", ".join(dict.fromkeys(r["device"] for r in records))
    gpus = ", ".join(MODELLED)
    return [f"device: {devices}; inputs: {_shapes(records)}",
            f"time ms: median, {_methods(records, 'time')} ((interp): Triton's interpreter on CPU, not GPU speed)",
            f"peak/extra MB: {_methods(records, 'memory')}, above the inputs, outputs included (extra: without "
            f"them); on CPU page- and counter-granular (a few 0.1 MB: readings up to 0.3 MB are not fitted or "
            f"compared)",
            "moved MB: counted bytes read + written (not measured traffic); /min: over inputs + outputs once; "
            "*: holds a fused op seen from outside (SDPA, flash-attn): a floor, and SDPA's FLOPs torch's non-causal "
            "formula",
            f"model ms: roofline MODEL on {gpus} from the counted FLOPs and bytes, not a measurement"]


def format_table(records: List[dict]) -> str:
    header = ["op", "mode", "N", "provider", "time ms", "throughput", "peak MB", "extra MB", "mem/base", "moved MB",
              "/min", "moved/base"] + [f"{gpu.split('-')[0]} model ms" for gpu in MODELLED] + ["status"]
    rows = [header] + [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(describe(records) + lines if records else lines)


def _fit_line(fit: dict, footnotes: Dict[str, int]) -> str:
    """The provider's slopes on one line, a slope with a note marked ``*k``: the note's number in ``footnotes``
    (note -> number, extended here), so a reason many slopes share is printed once."""
    names = {"time": "time", "peak_memory": "peak memory", "counted_bytes": "bytes moved", "counted_flops": "FLOPs"}
    slopes, notes = fit["slopes"], fit.get("notes") or {}
    fitted = fit.get("lengths") or {}
    used = sorted({n for lengths in fitted.values() for n in lengths})
    span = f"N={used[0]}..{used[-1]}" if used else ""
    cells = []
    for key, label in names.items():
        note = notes.get(key)
        mark = f"*{footnotes.setdefault(note, len(footnotes) + 1)}" if note else ""
        own = fitted.get(key)  # a metric fitted over fewer lengths (a reading of 0 skipped) says over which
        own_span = f" (N={own[0]}..{own[-1]})" if own and slopes.get(key) is not None and own != used else ""
        cells.append(f"{label} p={_num(slopes.get(key), '{:.2f}')}{mark}{own_span}")
    return f"  {fit['op']:<10} {fit['mode']:<7} {fit['provider']:<16} {span:<11} " + "  ".join(cells)


def format_fits(fits: List[dict]) -> str:
    """One line per provider: the fitted exponent p of metric ~ N^p and over which lengths; a slope that is not a
    scaling law is marked *k, and each distinct reason (:func:`benchmarks.analysis.slope_note`) is said once below."""
    lines = [f"fitted log-log slope (metric ~ N^p, over the largest {FIT_POINTS} lengths measured; "
             f"time as timed above, on CPU not GPU speed):"]
    footnotes: Dict[str, int] = {}
    for fit in fits:
        if all(v is None for v in fit["slopes"].values()):
            continue
        lines.append(_fit_line(fit, footnotes))
    if len(lines) == 1:
        lines.append("  none: a slope needs two or more lengths of a provider that ran")
    lines += [f"  *{k}: {note}" for note, k in footnotes.items()]
    return "\n".join(lines)
