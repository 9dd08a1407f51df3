"""Derived numbers: ratios to the baseline provider (and, for attention, to the fused causal kernel) at the same
point, and fitted log-log growth exponents."""
from typing import Dict, List, Optional, Sequence

import numpy as np

from benchmarks import memory
from benchmarks.providers import DOCUMENTS, WINDOW


FIT_POINTS = 4
"""A slope is fitted over at most this many of the largest lengths (the asymptotic regime; small lengths are
dominated by fixed overheads)."""
SETTLED = 0.25
"""Largest spread of the point-to-point slopes inside a fit for it to read as one power law: beyond it the
metric is still bending (fixed overheads, tile quantisation, a measurement's resolution) and the fit says so."""


def _fit_points(lengths: Sequence[float], values: Sequence[Optional[float]], last: int) -> list:
    return sorted((x, y) for x, y in zip(lengths, values) if y is not None and y > 0)[-last:]


def loglog_slope(lengths: Sequence[float], values: Sequence[Optional[float]], last: int = FIT_POINTS
                 ) -> Optional[float]:
    """Exponent p of ``value ~ length^p``: least squares on log-log over the ``last`` largest lengths with a
    positive value. None if < 2 points."""
    points = _fit_points(lengths, values, last)
    if len(points) < 2:
        return None
    xs, ys = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(xs, ys, 1)[0])


def fit_note(lengths: Sequence[float], values: Sequence[Optional[float]], last: int = FIT_POINTS
             ) -> Optional[str]:
    """Why the :func:`loglog_slope` of the same points is not a scaling law, or None when it reads as one (three
    or more lengths whose point-to-point slopes agree within :data:`SETTLED`)."""
    points = _fit_points(lengths, values, last)
    if len(points) < 2:
        return None
    if len(points) == 2:
        return f"2 lengths only ({points[0][0]:g}, {points[1][0]:g}): a line through two points, not a fit"
    local = [float(np.log(y1 / y0) / np.log(x1 / x0)) for (x0, y0), (x1, y1) in zip(points, points[1:])]
    if max(local) - min(local) > SETTLED:
        steps = ", ".join(f"{p:.2f}" for p in local)
        return f"not settled: point-to-point slopes {steps} (still bending: fixed costs, tiles or resolution)"
    return None


def shape_with_n(record: dict) -> str:
    """The record's input shape with its varying length written N: "(1, 2, N, 64)" for attention's (B, H, N, D),
    "(64, N)" for the (rows, N) of softmax and the norms."""
    shape = [str(size) for size in record["shape"]]
    shape[2 if record["op"] == "attention" else -1] = "N"
    return f"({', '.join(shape)})"


def time_ms(record: dict) -> Optional[float]:
    return record["time"]["median_ms"] if record.get("time") else None


def peak_bytes(record: dict) -> Optional[float]:
    """The measured peak, or None where there is none to compare or fit: not measured, or no growth seen, or a CPU
    reading up to :data:`memory.CPU_RESOLUTION` (RSS is page- and counter-granular: such a reading, 0 included, is
    not a size, and fits and ratios of it would be of the granularity). Any RSS method is: the worker's
    (:data:`memory.CPU_METHOD`) and ``varlen``'s in-process one alike; the CUDA allocator's counter is exact."""
    mem = record.get("memory")
    if not (mem and mem.get("status") == "ok" and record["status"] == "ok"):
        return None
    floor = memory.CPU_RESOLUTION if "RSS" in (mem.get("method") or "") else 0
    return mem["peak_bytes"] if mem["peak_bytes"] > floor else None


def counted_bytes(record: dict) -> Optional[float]:
    return record["counted"]["bytes"] if record.get("counted") else None


def counted_flops(record: dict) -> Optional[float]:
    return record["counted"].get("flops") if record.get("counted") else None


def model_ms(record: dict, gpu: str) -> Optional[float]:
    return record["model"][gpu]["time_ms"] if record.get("model") else None


METRICS = {"time": time_ms, "peak_memory": peak_bytes, "counted_bytes": counted_bytes, "counted_flops": counted_flops}
CAUSAL = "triton"
"""The attention provider the sparser masks (sliding window, documents: see ``providers``) are compared with."""
WINDOWED = f"triton-window{WINDOW}"
DOCUMENTED = f"triton-{DOCUMENTS}docs"
QUERY_TILE = 128
"""Query rows of the forward's largest tile in the GPU tables (sm_90's default, which the counts are taken with):
a document shorter than a couple of these reads its keys and values about once."""


def _window_note(provider: str, metric: Optional[str], used: List[float]) -> Optional[str]:
    """The sliding window's work grows as N * WINDOW only once N >> WINDOW: below 2 windows most of each row's
    keys are inside it, and the slope is still largely causal's 2."""
    if provider != WINDOWED or metric == "peak_memory" or not used or used[0] >= 2 * WINDOW:
        return None
    return (f"fitted from N={used[0]:g} < 2 x the {WINDOW}-key window: partly causal's N^2, "
            f"p -> 1 only for N >> {WINDOW}")


def _documents_note(provider: str, metric: Optional[str], used: List[float]) -> Optional[str]:
    """A document of N / DOCUMENTS tokens within a couple of query tiles costs whole tiles and reads its K/V about
    once, so the counted bytes and FLOPs grow ~N or slower; only once documents span many tiles do they grow as
    causal's (toward N^2, 1 / DOCUMENTS of it)."""
    if (provider != DOCUMENTED or metric not in ("counted_bytes", "counted_flops") or not used
            or used[-1] / DOCUMENTS > 2 * QUERY_TILE):
        return None
    return (f"fitted up to N={used[-1]:g}: each of the {DOCUMENTS} documents (<= {used[-1] / DOCUMENTS:g} tokens) "
            f"spans at most 2 query tiles of {QUERY_TILE} rows, computed whole, its K/V read about once: p tends "
            f"to causal's only for N / {DOCUMENTS} >> {QUERY_TILE}")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _add_ratios_to(records: List[dict], key: str, is_reference) -> None:
    references = {(r["op"], r["mode"], r["length"]): r for r in records if is_reference(r)}
    for record in records:
        reference = references.get((record["op"], record["mode"], record["length"]))
        record[key] = None if reference is None else {
            name: _ratio(metric(record), metric(reference)) for name, metric in METRICS.items()}


def add_ratios(records: List[dict]) -> None:
    """Give each record ``vs_baseline``: its time, peak memory, counted bytes and counted FLOPs over the baseline
    provider's at the same (op, mode, length) (a speedup is ``1 / vs_baseline["time"]``), and ``vs_causal``: the
    same over the fused causal kernel's (:data:`CAUSAL`; None for the ops without one)."""
    _add_ratios_to(records, "vs_baseline", lambda r: r["baseline"])
    _add_ratios_to(records, "vs_causal", lambda r: r["op"] == "attention" and r["provider"] == CAUSAL)


def slope_note(provider: str, metric: Optional[str], lengths: Sequence[float],
               values: Sequence[Optional[float]]) -> Optional[str]:
    """Why ``provider``'s fitted slope of ``metric`` (a :data:`METRICS` name) is not a scaling law, or None:
    :func:`fit_note`, for the sliding window a fit from lengths where the window barely binds, and for the
    documents one from lengths where each document is a tile or two."""
    used = [x for x, _ in _fit_points(lengths, values, FIT_POINTS)]
    notes = [fit_note(lengths, values), _window_note(provider, metric, used), _documents_note(provider, metric, used)]
    return "; ".join(filter(None, notes)) or None


def fit_slopes(records: List[dict]) -> List[Dict]:
    """Growth exponents per (op, mode, provider) of time, peak memory, counted bytes and FLOPs against length:
    ``slopes`` (None without two lengths), ``lengths`` (those each slope was fitted over) and ``notes`` (where a
    slope is not a scaling law, :func:`slope_note`)."""
    fits = []
    keys = sorted({(r["op"], r["mode"], r["provider"]) for r in records}, key=str)
    for op, mode, prov in keys:
        rows = [r for r in records if (r["op"], r["mode"], r["provider"]) == (op, mode, prov)]
        lengths = [r["length"] for r in rows]
        values = {name: [metric(r) for r in rows] for name, metric in METRICS.items()}
        fits.append({"op": op, "mode": mode, "provider": prov,
                     "slopes": {name: loglog_slope(lengths, v) for name, v in values.items()},
                     "lengths": {name: [x for x, _ in _fit_points(lengths, v, FIT_POINTS)]
                                 for name, v in values.items()},
                     "notes": {name: slope_note(prov, name, lengths, v) for name, v in values.items()}})
    return fits
