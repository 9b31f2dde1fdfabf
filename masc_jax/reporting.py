"""Reporting: what the user reads at the end of a run, and the per-step log.

Takes the run's results (a plain, JSON-able dict produced by the training loop)
and turns them into

* ``results.md``  -- Markdown tables (per row of the paper's table, per agent),
  a summary table, per-group accuracy matrices, collective accuracy, timings;
* ``results.json`` -- the same dict, numpy values converted, sorted keys;
* ``report.png``  -- agents x class-groups accuracy heatmaps (before / after
  growth) and grouped Expert / General bars per agent;
* ``metrics.jsonl`` -- one JSON object per logged step (:class:`MetricsLogger`);
* one-line console strings (:func:`progress_line`, :func:`stage_summary_line`).

Results schema (rows may be missing when a run had no ablations)::

    {
      "num_agents": K,
      "class_groups": [[...], ...],            # [K][M] class ids per agent
      "rows": {row: {"expert": [K], "general": [K], "average": [K]}},
      "group_accuracy": {row: [[K] * K]},      # [agent][class group]
      "society_accuracy": {row: float},
      "directionality": {row: bool},
      "collective_accuracy": {"cc": float, "ce": float},                  # optional
      "timings": {stage: {"compile_s", "train_s", "steps", "images_per_s"}},  # optional
      "config": {...},                                                     # optional
    }

Accuracies are fractions in [0, 1]; the Markdown shows them as percentages.
Non-finite numbers (e.g. the accuracy on an empty split) are written to JSON
as ``null`` and shown as ``-``.

numpy only: no jax import (jax scalars/arrays are handled through the
``__array__`` / ``item`` protocols). matplotlib is imported lazily inside
:func:`plot_report`.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import sys
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np

# The run's stages in training order (masc_jax.train), for the timings table.
STAGE_ORDER = ("experts", "collective", "altruism", "collective_ce", "altruism_ce")

__all__ = [
    "ROW_TITLES",
    "ROW_ORDER",
    "results_markdown",
    "write_results",
    "plot_report",
    "MetricsLogger",
    "progress_line",
    "stage_summary_line",
    "format_duration",
    "REPORT_FIGSIZE",
    "REPORT_DPI",
]

ROW_TITLES = {
    "before_growth": "before growth",
    "after_growth": "after growth (CC+RA)",
    "cc_only": "CC only",
    "ra_only": "RA only",
}
ROW_ORDER = ("before_growth", "after_growth", "cc_only", "ra_only")

# report.png is REPORT_FIGSIZE * REPORT_DPI pixels (no tight bbox cropping).
REPORT_FIGSIZE = (12.0, 9.0)
REPORT_DPI = 100

COLLECTIVE_TITLES = {
    "cc": "collective network trained with the CC terms",
    "ce": "collective network trained with CE only",
}


# ----------------------------------------------------------------------------
# Conversion and validation helpers
# ----------------------------------------------------------------------------

def _to_jsonable(obj: Any) -> Any:
    """Recursively converts numpy / jax values to plain JSON types.

    Dict keys become strings, tuples/sets become lists, numpy (and jax, via
    ``__array__``) arrays become nested lists, non-finite floats become None.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [_to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        if arr.ndim == 0:
            return _to_jsonable(arr.item())
        return [_to_jsonable(v) for v in arr.tolist()]
    if hasattr(obj, "item"):  # other scalar-likes
        return _to_jsonable(obj.item())
    raise TypeError(f"reporting: cannot convert {type(obj).__name__} to JSON")


def _as_float(v: Any) -> float:
    """A number (or None) as a float; None -> nan."""
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"reporting: expected a number, got {v!r}") from None


def _num_agents(results: Mapping) -> int:
    if "num_agents" in results:
        k = results["num_agents"]
    elif "class_groups" in results:
        k = len(results["class_groups"])
    else:
        first = next(iter(results["rows"].values()))
        if not isinstance(first, Mapping) or "expert" not in first:
            raise ValueError("results has no 'num_agents' and its first row has no 'expert' list")
        k = len(first["expert"])
    try:
        k_int = int(k)
    except (TypeError, ValueError):
        raise ValueError(f"results['num_agents'] must be an integer, got {k!r}") from None
    if k_int <= 0 or k_int != k:
        raise ValueError(f"results['num_agents'] must be a positive integer, got {k!r}")
    return k_int


def _ordered_rows(names: Iterable[str]) -> list[str]:
    names = list(names)
    known = [r for r in ROW_ORDER if r in names]
    return known + sorted(r for r in names if r not in ROW_ORDER)


def _row_title(name: str) -> str:
    return ROW_TITLES.get(name, name.replace("_", " "))


def _validate(results: Any) -> tuple[int, dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Checks the schema; returns (K, rows as float arrays, group accuracy matrices)."""
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    if "rows" not in results or results["rows"] is None:
        raise ValueError("results has no 'rows' entry: nothing to report")
    rows_in = results["rows"]
    if not isinstance(rows_in, Mapping):
        raise ValueError(f"results['rows'] must be a dict of rows, got {type(rows_in).__name__}")
    if not rows_in:
        raise ValueError("results['rows'] is empty: nothing to report")
    k = _num_agents(results)
    if "class_groups" in results and results["class_groups"] is not None:
        if len(results["class_groups"]) != k:
            raise ValueError(
                f"results['class_groups'] has {len(results['class_groups'])} groups, expected K={k}")

    rows: dict[str, dict[str, np.ndarray]] = {}
    for name, row in rows_in.items():
        if not isinstance(row, Mapping):
            raise ValueError(f"row {name!r} must be a dict with 'expert'/'general'/'average'")
        out = {}
        for col in ("expert", "general", "average"):
            if col not in row:
                if col == "average" and "expert" in out and "general" in out:
                    out[col] = (out["expert"] + out["general"]) / 2.0
                    continue
                raise ValueError(f"row {name!r} has no {col!r} list")
            vals = row[col]
            try:
                n = len(vals)
            except TypeError:
                raise ValueError(f"row {name!r}: {col!r} must be a list of {k} numbers") from None
            if n != k:
                raise ValueError(f"row {name!r}: {col!r} has {n} entries, expected K={k} (one per agent)")
            out[col] = np.array([_as_float(v) for v in vals], dtype=np.float64)
        rows[str(name)] = out

    groups: dict[str, np.ndarray] = {}
    for name, mat in (results.get("group_accuracy") or {}).items():
        try:
            arr = np.array([[_as_float(v) for v in line] for line in mat], dtype=np.float64)
        except TypeError:
            raise ValueError(f"group_accuracy[{name!r}] must be a {k} x {k} nested list") from None
        if arr.shape != (k, k):
            raise ValueError(
                f"group_accuracy[{name!r}] has shape {arr.shape}, expected ({k}, {k}) [agent][class group]")
        groups[str(name)] = arr
    return k, rows, groups


# ----------------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------------

def _pct(v: Any) -> str:
    f = _as_float(v)
    return "-" if not math.isfinite(f) else f"{100.0 * f:.2f}"


def _mean(a: np.ndarray) -> float:
    finite = a[np.isfinite(a)]
    if finite.size == a.size:
        return float(np.mean(a))
    return float(np.mean(finite)) if finite.size else float("nan")


def _yes_no(v: Any) -> str:
    if v is None:
        return "-"
    return "yes" if bool(v) else "no"


def _id_ranges(ids: Iterable[Any]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (order kept, runs of +1 collapsed)."""
    vals = [int(i) for i in ids]
    if not vals:
        return "(none)"
    parts, start, prev = [], vals[0], vals[0]
    for v in vals[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def _compact(v: Any) -> str:
    """Compact number for one-line summaries: ints as ints, floats with 4 significant digits."""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return str(f)
    return f"{f:.4g}"


def _term(v: Any) -> str:
    """A loss term for progress lines: 4 decimals, scientific when tiny or huge."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return str(f)
    a = abs(f)
    if a >= 1e5 or (0.0 < a < 1e-4):
        return f"{f:.3e}"
    return f"{f:.4f}"


def format_duration(seconds: float) -> str:
    """Human duration: '45.2s' under a minute, '3m25s' under an hour, '1h02m', '2d03h'."""
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "--"
    if not math.isfinite(s) or s < 0:
        return "--"
    if s < 59.95:
        return f"{s:.1f}s"
    total = int(round(s))
    if total < 3600:
        m, sec = divmod(total, 60)
        return f"{m}m{sec:02d}s"
    minutes = int(round(s / 60.0))
    if minutes < 24 * 60:
        h, m = divmod(minutes, 60)
        return f"{h}h{m:02d}m"
    hours = int(round(s / 3600.0))
    d, h = divmod(hours, 24)
    return f"{d}d{h:02d}h"


def progress_line(stage: str, step: int, total_steps: int, images_per_s: float,
                  eta_s: float, terms: Mapping[str, float]) -> str:
    """One console line during a stage, e.g.

    ``[collective] step  1200/ 4000 ( 30.0%) |  812.3 img/s | ETA 3m25s | ce 0.4512 kd 0.1020``
    """
    step, total_steps = int(step), int(total_steps)
    width = max(5, len(str(total_steps)))
    pct = 100.0 * step / total_steps if total_steps > 0 else 0.0
    try:
        ips = float(images_per_s)
    except (TypeError, ValueError):
        ips = float("nan")
    line = (f"[{stage}] step {step:>{width}d}/{total_steps:>{width}d} ({pct:5.1f}%) | "
            f"{ips:6.1f} img/s | ETA {format_duration(eta_s)}")
    if terms:
        line += " | " + " ".join(f"{k} {_term(v)}" for k, v in terms.items())
    return line


def stage_summary_line(stage: str, steps: int, seconds: float, compile_seconds: float,
                       metrics: Mapping[str, float]) -> str:
    """One line at a stage end, e.g.

    ``[experts] done: 900 steps in 41.2s (compile 6.1s) | expert acc 0.991 loss 0.0312``
    """
    line = (f"[{stage}] done: {int(steps)} steps in {format_duration(seconds)} "
            f"(compile {format_duration(compile_seconds)})")
    if metrics:
        line += " | " + " ".join(f"{str(k).replace('_', ' ')} {_compact(v)}" for k, v in metrics.items())
    return line


# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------

def results_markdown(results: dict) -> str:
    """The Markdown report: per-row agent tables, summary, per-group accuracy,
    collective accuracy and timings (the last two only when present)."""
    k, rows, groups = _validate(results)
    order = _ordered_rows(rows)
    society = results.get("society_accuracy") or {}
    direction = results.get("directionality") or {}
    out: list[str] = ["# MASC results", ""]

    class_groups = results.get("class_groups")
    if class_groups is not None and len(class_groups) > 0:
        sizes = sorted({len(g) for g in class_groups})
        m = str(sizes[0]) if len(sizes) == 1 else "/".join(map(str, sizes))
        out.append(f"K = {k} agents, {m} classes each.")
        out.append("")
        out.extend(f"- Agent {a}: classes {_id_ranges(g)}" for a, g in enumerate(class_groups))
    else:
        out.append(f"K = {k} agents.")
    out.append("")
    out.append("Accuracies in %. Expert: on the agent's own classes; General: on all other "
               "agents' classes; Average = (Expert + General) / 2.")
    out.append("")

    for name in order:
        r = rows[name]
        out.append(f"## {_row_title(name)}")
        out.append("")
        out.append("| Agent | Expert | General | Average |")
        out.append("|---|---:|---:|---:|")
        for a in range(k):
            out.append(f"| Agent {a} | {_pct(r['expert'][a])} | {_pct(r['general'][a])} | "
                       f"{_pct(r['average'][a])} |")
        out.append(f"| mean | {_pct(_mean(r['expert']))} | {_pct(_mean(r['general']))} | "
                   f"{_pct(_mean(r['average']))} |")
        out.append("")

    out.append("## Summary")
    out.append("")
    out.append("| row | mean Expert | mean General | mean Average | society accuracy | directionality |")
    out.append("|---|---:|---:|---:|---:|:---:|")
    for name in order:
        r = rows[name]
        soc = _pct(society[name]) if name in society else "-"
        out.append(f"| {_row_title(name)} | {_pct(_mean(r['expert']))} | {_pct(_mean(r['general']))} | "
                   f"{_pct(_mean(r['average']))} | {soc} | {_yes_no(direction.get(name))} |")
    out.append("")
    out.append("Society accuracy: over all classes, each image answered by the agent of lowest "
               "energy. Directionality: for every class group, its owner agent is the most accurate.")
    out.append("")

    if groups:
        out.append("## Accuracy per class group")
        out.append("")
        out.append("Rows: agents; columns: class groups (group g belongs to agent g, shown in bold).")
        out.append("")
        for name in _ordered_rows(groups):
            mat = groups[name]
            out.append(f"### {_row_title(name)}")
            out.append("")
            out.append("| agent | " + " | ".join(f"group {g}" for g in range(k)) + " |")
            out.append("|---|" + "---:|" * k)
            for a in range(k):
                cells = [f"**{_pct(mat[a, g])}**" if a == g else _pct(mat[a, g]) for g in range(k)]
                out.append(f"| Agent {a} | " + " | ".join(cells) + " |")
            out.append("")

    collective = results.get("collective_accuracy")
    if collective:
        out.append("## Collective network")
        out.append("")
        for key, v in collective.items():
            title = COLLECTIVE_TITLES.get(key, f"collective network ({key})")
            out.append(f"- {title}, all classes: {_pct(v)}%")
        out.append("")

    timings = results.get("timings")
    if timings:
        out.append("## Timings")
        out.append("")
        out.append("| stage | steps | compile | train | images/s |")
        out.append("|---|---:|---:|---:|---:|")
        # Stage order, not dict order: results.json sorts its keys.
        order = {name: i for i, name in enumerate(STAGE_ORDER)}
        for stage, t in sorted(timings.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
            t = t if isinstance(t, Mapping) else {}
            steps = t.get("steps")
            ips = t.get("images_per_s")
            ips_s = "-" if ips is None or not math.isfinite(_as_float(ips)) else f"{_as_float(ips):.1f}"
            out.append(
                f"| {stage} | {'-' if steps is None else int(steps)} | "
                f"{format_duration(t['compile_s']) if t.get('compile_s') is not None else '-'} | "
                f"{format_duration(t['train_s']) if t.get('train_s') is not None else '-'} | {ips_s} |")
        out.append("")

    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------

def _atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to a temp file in the target's directory, then os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_write_text(path: str, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def write_results(workdir: str, results: dict) -> None:
    """Writes workdir/results.json (indent 2, sorted keys) and workdir/results.md, atomically."""
    markdown = results_markdown(results)  # validates first: nothing is written on bad input
    payload = json.dumps(_to_jsonable(results), indent=2, sort_keys=True, allow_nan=False)
    _atomic_write_text(os.path.join(workdir, "results.json"), payload + "\n")
    _atomic_write_text(os.path.join(workdir, "results.md"), markdown)


# ----------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------

def _heatmap(ax, mat: np.ndarray, title: str, cmap, fontsize: float):
    import matplotlib.patches as mpatches

    k = mat.shape[0]
    im = ax.imshow(np.ma.masked_invalid(mat), vmin=0.0, vmax=1.0, cmap=cmap, aspect="equal")
    for a in range(k):
        for g in range(k):
            v = mat[a, g]
            txt = "-" if not np.isfinite(v) else f"{100 * v:.1f}"
            color = "white" if (np.isfinite(v) and v < 0.6) else "black"
            ax.text(g, a, txt, ha="center", va="center", fontsize=fontsize, color=color)
        # owner cell outline: group a belongs to agent a
        ax.add_patch(mpatches.Rectangle((a - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("class group")
    ax.set_ylabel("agent")
    ax.set_title(title)
    return im


def plot_report(results: dict, path: str) -> None:
    """Writes report.png: (a) agents x class-groups accuracy heatmaps (before / after
    growth, shared 0..1 colour scale, owner cells outlined in red); (b) grouped bars of
    per-agent Expert and General (after growth, and before growth if present).

    Rows that are absent are skipped: when neither before nor after growth is there,
    the first available rows are shown instead.
    """
    k, rows, groups = _validate(results)

    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        # Don't switch an already-chosen pyplot backend (that would close the user's
        # figures); the Figure below renders with Agg either way.
        matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    direction = results.get("directionality") or {}
    society = results.get("society_accuracy") or {}

    heat_rows = [r for r in ("before_growth", "after_growth") if r in groups]
    if not heat_rows:
        heat_rows = _ordered_rows(groups)[:2]
    bar_rows = [r for r in ("before_growth", "after_growth") if r in rows]
    if not bar_rows:
        bar_rows = _ordered_rows(rows)[:2]

    fig = Figure(figsize=REPORT_FIGSIZE, dpi=REPORT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    try:
        gs = fig.add_gridspec(2, 2, height_ratios=[1.15, 1.0])
        cmap = matplotlib.colormaps["viridis"]
        fontsize = max(4.0, min(10.0, 64.0 / k))

        # (a) heatmaps
        if heat_rows:
            axes = [fig.add_subplot(gs[0, i]) for i in range(len(heat_rows))]
            im = None
            for ax, name in zip(axes, heat_rows):
                title = f"(a) {_row_title(name)}: accuracy"
                extra = []
                if name in direction:
                    extra.append(f"directionality {_yes_no(direction[name])}")
                if name in society:
                    extra.append(f"society {_pct(society[name])}%")
                if extra:
                    title += "\n" + ", ".join(extra)
                im = _heatmap(ax, groups[name], title, cmap, fontsize)
            fig.colorbar(im, ax=axes, shrink=0.9, label="accuracy")
        else:
            ax = fig.add_subplot(gs[0, :])
            ax.axis("off")
            ax.text(0.5, 0.5, "no per-group accuracy in results", ha="center", va="center")

        # (b) grouped bars
        ax = fig.add_subplot(gs[1, :])
        series = []
        palette = {"expert": ("#9ecae1", "#2171b5"), "general": ("#fdae6b", "#d94801")}
        for i, name in enumerate(bar_rows):
            strong = (i == len(bar_rows) - 1)  # the last (after growth) in solid colours
            for col in ("expert", "general"):
                series.append((f"{col.capitalize()} - {_row_title(name)}", rows[name][col],
                               palette[col][1 if strong else 0], None if strong else "//"))
        n = len(series)
        width = 0.8 / max(n, 1)
        x = np.arange(k)
        for j, (label, vals, color, hatch) in enumerate(series):
            heights = np.where(np.isfinite(vals), vals, 0.0)
            ax.bar(x - 0.4 + width * (j + 0.5), heights, width, label=label, color=color,
                   hatch=hatch, edgecolor="black", linewidth=0.5)
        ax.set_xticks(x)
        ax.set_xticklabels([f"agent {a}" for a in range(k)])
        ax.set_ylim(0.0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title("(b) per-agent Expert (own classes) and General (other agents' classes)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=max(1, n), fontsize=9, frameon=False)

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=REPORT_DPI)
    finally:
        fig.clear()
        try:  # the Figure was never registered with pyplot; close defensively if it was
            if "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close(fig)
        except Exception:
            pass
    _atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------
# Per-step log
# ----------------------------------------------------------------------------

class MetricsLogger:
    """Appends one JSON object per line to ``path`` (workdir/metrics.jsonl).

    ``enabled=False`` (multi-host processes other than 0): nothing is opened or written.
    numpy / jax scalars are converted (integers stay integers, others via float());
    non-finite values are written as null so every line is strict JSON. Each line is
    flushed as written. Usable as a context manager.
    """

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = bool(enabled)
        self._f = None
        self._closed = False
        if self.enabled:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._closed:
            raise ValueError(f"MetricsLogger({self.path!r}) is closed")
        line = json.dumps({str(k): _to_jsonable(v) for k, v in record.items()}, allow_nan=False)
        self._f.write(line + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._closed = True

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
