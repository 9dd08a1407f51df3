"""PNG plots (matplotlib, Agg): for one (op, mode), up to eight panels vs length N, one line per provider.

time (log-log, fitted slope in the legend, "?" where :func:`~benchmarks.analysis.slope_note` says it is not a
scaling law), peak memory (log-log, slope; titled with how it was measured), counted bytes moved (log-log, with the
minimum), counted FLOPs (log-log, slope), speedup over the baseline, memory ratio to the baseline, throughput on a
GPU (TFLOPS / GB/s) or, without one, the roofline model time on an H100 (labelled "model"), and for attention the
counted FLOPs over the fused causal kernel's (where the sliding-window and document providers show their
savings). A panel with nothing to show is left out.
"""
import glob
import os
import sys
from typing import List

from benchmarks.analysis import (CAUSAL, METRICS, counted_bytes, counted_flops, loglog_slope, model_ms, peak_bytes,
                                 shape_with_n, slope_note, time_ms)
from benchmarks.device import DeviceInfo
from benchmarks.providers import MODES

try:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
except ImportError:  # optional (the "bench" extra): the records are written all the same, without plots
    plt = None


def have_pyplot() -> bool:
    """Whether matplotlib is installed; if not, says on stderr that no PNG will be written."""
    if plt is None:
        print("matplotlib is not installed: no plots written (pip install matplotlib)", file=sys.stderr, flush=True)
    return plt is not None


def save(fig, path: str, dpi: int = 110) -> List[str]:
    """Lay ``fig`` out, write it to ``path`` (a PNG) and close it: [path]."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return [path]


def drop_stale(out_dir: str, pattern: str, written: List[str]) -> None:
    """Remove the PNGs in ``out_dir`` matching ``pattern`` (a glob of one command's figure names) that this run did
    not write: a rerun into the same folder with fewer ops or workloads left the last run's figures beside a JSON
    that no longer has their records."""
    keep = {os.path.abspath(path) for path in written}
    for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
        if os.path.abspath(path) not in keep:
            os.remove(path)


def _series(rows: List[dict], metric):
    """(length, value) where there is a value a log axis can show: every panel is log-scaled, so a zero (no FLOPs
    counted for a norm, no memory growth measured) is left out rather than drawn, and a panel of zeros hidden."""
    points = [(r["length"], metric(r)) for r in rows]
    return [p for p in points if p[1] is not None and p[1] > 0]


def _line(ax, rows, metric, label, slope=False, **style):
    points = _series(rows, metric)
    if not points:
        return
    if slope:
        lengths, values = [x for x, _ in points], [y for _, y in points]
        p = loglog_slope(lengths, values)
        name = next((key for key, fn in METRICS.items() if fn is metric), None)
        unsure = "?" if slope_note(rows[0]["provider"], name, lengths, values) else ""
        label = label if p is None else f"{label} (N^{p:.2f}{unsure})"
    ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label, **style)


def _ratio(metric, base_by_length):
    def ratio(r):
        base = base_by_length.get(r["length"])
        value, ref = metric(r), base and metric(base)
        return ref / value if value and ref else None
    return ratio


OPAQUE_MARK = "*"
OPAQUE_NOTE = "* holds opaque fused ops, counted from outside: a floor"
"""As the table's "*": a provider whose counts hold an opaque op (``Counts.opaque_ops``) is marked in the legend of
every panel drawn from counts."""


def _opaque(record: dict) -> bool:
    return bool(record.get("counted") and record["counted"].get("opaque_ops"))


def _flops_vs_causal(record: dict):
    return (record.get("vs_causal") or {}).get("counted_flops")


def plot_op(records: List[dict], op: str, mode: str, device: DeviceInfo, path: str) -> str:
    """Write the figure for ``op``/``mode`` to ``path``; return the path."""
    rows = sorted((r for r in records if r["op"] == op and r["mode"] == mode and r["status"] == "ok"),
                  key=lambda r: r["length"])
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by_provider = {p: [r for r in rows if r["provider"] == p] for p in providers}
    base = {r["length"]: r for r in rows if r["baseline"]}
    fig, axes = plt.subplots(2, 4, figsize=(22, 9.5))
    (t_ax, m_ax, b_ax, f_ax), (s_ax, r_ax, x_ax, c_ax) = axes
    method = "interpreter / CPU wall-clock: not GPU speed" if device.interpreted else "do_bench median"
    speedup = "speedup vs baseline (x; solid: measured here" + ("; dotted: H100 model)" if device.interpreted else ")")
    memory_methods = sorted({r["memory"]["method"] for r in rows if r["memory"] and r["memory"].get("method")})
    titles = [(t_ax, f"time (ms, {method})"),
              (m_ax, "\n".join(["peak memory beyond inputs (bytes)"] + memory_methods)),
              (b_ax, "bytes moved, counted"), (f_ax, "FLOPs, counted"), (s_ax, speedup),
              (r_ax, "baseline memory / provider memory (x)"),
              (c_ax, f"counted FLOPs / {CAUSAL} (causal) counted FLOPs (x)")]
    opaque = {name for name, prov_rows in by_provider.items() if any(_opaque(r) for r in prov_rows)}
    for index, (name, prov_rows) in enumerate(by_provider.items()):
        color = f"C{index}"  # one colour per provider in every panel
        counted = f"{name}{OPAQUE_MARK}" if name in opaque else name  # in the panels drawn from counts
        _line(t_ax, prov_rows, time_ms, name, slope=True, color=color)
        _line(m_ax, prov_rows, peak_bytes, name, slope=True, color=color)
        _line(b_ax, prov_rows, counted_bytes, counted, slope=True, color=color)
        _line(f_ax, prov_rows, counted_flops, counted, slope=True, color=color)
        _line(c_ax, prov_rows, _flops_vs_causal, counted, color=color)
        _line(s_ax, prov_rows, _ratio(time_ms, base), f"{name} (measured)", color=color)
        if device.interpreted:
            _line(s_ax, prov_rows, _ratio(lambda r: model_ms(r, "H100-SXM5"), base), f"{counted} (H100 model)",
                  linestyle=":", color=color)
        _line(r_ax, prov_rows, _ratio(peak_bytes, base), name, color=color)
        if device.kind == "cuda":
            _line(x_ax, prov_rows, lambda r: r["tflops"] if op == "attention" else r["gbps"], name, color=color)
        else:
            _line(x_ax, prov_rows, lambda r: model_ms(r, "H100-SXM5"), counted, slope=True, color=color)
    minimum = sorted({r["length"]: r["min_bytes"] for r in rows if r["min_bytes"]}.items())
    if minimum:  # the same inputs and outputs for every provider at one length
        b_ax.plot(*zip(*minimum), "k--", label="minimum (inputs + outputs once)")
    if device.kind == "cuda":
        titles.append((x_ax, "TFLOPS" if op == "attention" else "effective GB/s"))
    else:
        titles.append((x_ax, "roofline MODEL time on H100-SXM5 (ms), from counted FLOPs/bytes"))
    if opaque:  # the mark explained on the counts' own panels
        titles = [(ax, f"{title}\n{OPAQUE_NOTE}" if ax in (b_ax, f_ax) else title) for ax, title in titles]
    for ax, title in titles:
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (sequence length)" if op == "attention" else "N (row length)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_yscale("log")  # the ratio panels too: a 2x speed-up and a 2x slow-down lie as far from 1
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in (s_ax, r_ax, c_ax):
        if ax.lines:
            ax.axhline(1.0, color="grey", linewidth=0.8)
    shown = [ax for ax in axes.flat if ax.lines]
    for ax in axes.flat:  # e.g. no FLOPs counted for a norm, no ratio to a causal kernel: removed, not a hole
        if not ax.lines:
            fig.delaxes(ax)
    if shown:  # the panels left, in order, on a grid just big enough for them
        cols = min(4, len(shown))
        rows_needed = -(-len(shown) // cols)
        grid = fig.add_gridspec(rows_needed, cols)
        for index, ax in enumerate(shown):
            ax.set_subplotspec(grid[index])
        fig.set_size_inches(5.5 * cols, 4.75 * rows_needed)
    else:  # every point failed or was unavailable: say so rather than write a blank page
        statuses = sorted({r["status"] for r in records if r["op"] == op and r["mode"] == mode})
        fig.text(0.5, 0.5, f"no point measured (status: {', '.join(statuses)}; reasons in the records)",
                 ha="center", va="center")
        fig.set_size_inches(9, 2.5)
    shape = f"shape {shape_with_n(rows[0])}  {rows[0]['dtype']}" if rows else ""
    fig.suptitle(f"{op} {mode}  {shape}  on {device.name}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_all(records: List[dict], device: DeviceInfo, out_dir: str, prefix: str) -> List[str]:
    """One figure per (op, mode) present in ``records``: ``<prefix>_<op>_<mode>.png``; none without matplotlib."""
    keys = list(dict.fromkeys((r["op"], r["mode"]) for r in records))
    if not have_pyplot():
        return []
    written = [plot_op(records, op, mode, device,
                       os.path.join(out_dir, f"{prefix}_{op}_{mode.replace('+', '_')}.png")) for op, mode in keys]
    for mode in MODES:  # the modes' file endings, so another command's "<prefix>_*.png" is left alone
        drop_stale(out_dir, f"{glob.escape(prefix)}_*_{mode.replace('+', '_')}.png", written)
    return written
