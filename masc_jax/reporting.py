"""Reporting: the results tables a user reads at the end of a run.

Takes the run's results (a plain, JSON-able dict produced by the training loop)
and turns them into

* ``results.md``  -- Markdown tables (per row of the paper's table, per agent),
  a summary table, per-group accuracy matrices, collective accuracy, timings
  (:func:`results_markdown`);
* ``results.json`` -- the same dict, numpy values converted, sorted keys
  (:func:`write_results` writes both files).

This module owns the results schema below, its validation and the row titles /
order. report.png is drawn by ``masc_jax.plots`` (from the same schema); what is
printed and logged while training (progress lines, ``metrics.jsonl``) lives in
``masc_jax.progress``, which also owns the duration format and the JSON value
conversion used here.

Results schema (rows may be missing when a run had no ablations)::

    {
      "num_agents": K,
      "class_groups": [[...], ...],            # [K][M] class ids per agent
      "rows": {row: {"expert": [K], "general": [K], "average": [K]}},
      "group_accuracy": {row: [[K] * K]},      # [agent][class group]
      "society_accuracy": {row: float},
      "directionality": {row: bool},
      "routing": "energy",                     # optional: the society's routing rule
      "routing_margin": float,                 # optional: that rule's margin
      "collective_accuracy": {"cc": float, "ce": float},                  # optional
      "stages": ["experts", "collective", ...],  # optional: the run's stage order
      "timings": {stage: {"compile_s", "train_s", "steps", "images_per_s"}},  # optional
      "config": {...},                                                     # optional
      "routing_diagnostics": {row: {...}},  # optional: masc_jax.routing_diagnostics.diagnose
                                            # output per row (schema in that module)
    }

Accuracies are fractions in [0, 1]; the Markdown shows them as percentages.
Non-finite numbers (e.g. the accuracy on an empty split) are written to JSON
as ``null`` and shown as ``-``.

numpy only: no jax import.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

import numpy as np

# routing_diagnostics imports this module's helpers inside its functions only,
# so importing it here makes no cycle at import time.
from masc_jax import paths, routing_diagnostics
from masc_jax.progress import format_duration, to_jsonable

__all__ = [
    "ROW_TITLES",
    "ROW_ORDER",
    "results_markdown",
    "write_results",
]

ROW_TITLES = {
    "before_growth": "before growth",
    "after_growth": "after growth (CC+RA)",
    "cc_only": "CC only",
    "ra_only": "RA only",
}
ROW_ORDER = ("before_growth", "after_growth", "cc_only", "ra_only")

COLLECTIVE_TITLES = {
    "cc": "collective network trained with the CC terms",
    "ce": "collective network trained with CE only",
}

# The timings table's order for results written before they recorded
# "stages" (results.json sorts its keys, so the run's order is lost there):
# the stage order of masc_jax.train at that time.
_LEGACY_STAGE_ORDER = ("experts", "collective", "altruism", "collective_ce", "altruism_ce")


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------

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

    diagnostics = results.get("routing_diagnostics")
    if diagnostics is not None:
        routing_diagnostics.validate(diagnostics, num_agents=k)
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


def _routing_rule(rule: Any, margin: Any) -> str:
    """'energy', or 'margin_energy (margin 0.5)' when a non-zero margin is given."""
    text = str(rule)
    if margin is not None:
        m = _as_float(margin)
        if m != 0.0:
            text += f" (margin {m:g})"
    return text


def _ordered_timings(timings: Mapping, stages: Any) -> list[tuple[str, Any]]:
    """Timings in the run's stage order (``results["stages"]``), else the legacy
    order; stages missing from that order come last, by name.

    Stage order, not dict order: results.json sorts its keys.
    """
    known = _LEGACY_STAGE_ORDER if stages is None else [str(s) for s in stages]
    order: dict[str, int] = {}
    for name in known:
        order.setdefault(name, len(order))
    return sorted(timings.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))


# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------

def class_groups_lines(k: int, class_groups: Any) -> list[str]:
    """The report's header: K, each agent's classes (when known), what the accuracies mean."""
    if class_groups is not None and len(class_groups) > 0:
        sizes = sorted({len(g) for g in class_groups})
        out = [f"K = {k} agents, {'/'.join(map(str, sizes))} classes each.", ""]
        out.extend(f"- Agent {a}: classes {_id_ranges(g)}" for a, g in enumerate(class_groups))
    else:
        out = [f"K = {k} agents."]
    return out + ["", "Accuracies in %. Expert: on the agent's own classes; General: on all other "
                  "agents' classes; Average = (Expert + General) / 2.", ""]


def results_markdown(results: dict) -> str:
    """The Markdown report: per-row agent tables, summary, per-group accuracy,
    collective accuracy, timings and routing diagnostics (the last three only
    when present)."""
    k, rows, groups = _validate(results)
    order = _ordered_rows(rows)
    society = results.get("society_accuracy") or {}
    direction = results.get("directionality") or {}
    out: list[str] = ["# MASC results", ""]

    out += class_groups_lines(k, results.get("class_groups"))

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
    routing = results.get("routing")
    chooser = ("the agent of lowest energy" if routing is None or routing == "energy"
               else "the agent the routing rule picks")
    out.append(f"Society accuracy: over all classes, each image answered by {chooser}. "
               "Directionality: for every class group, its owner agent is the most accurate.")
    out.append("")
    if routing is not None:
        out.append(f"Routing rule: {_routing_rule(routing, results.get('routing_margin'))}")
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
        for stage, t in _ordered_timings(timings, results.get("stages")):
            t = t if isinstance(t, Mapping) else {}
            steps = t.get("steps")
            ips = t.get("images_per_s")
            ips_s = "-" if ips is None or not math.isfinite(_as_float(ips)) else f"{_as_float(ips):.1f}"
            out.append(
                f"| {stage} | {'-' if steps is None else int(steps)} | "
                f"{format_duration(t['compile_s']) if t.get('compile_s') is not None else '-'} | "
                f"{format_duration(t['train_s']) if t.get('train_s') is not None else '-'} | {ips_s} |")
        out.append("")

    diagnostics = results.get("routing_diagnostics")
    if diagnostics is not None:
        out.append(routing_diagnostics.diagnostics_markdown(diagnostics))

    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------

def write_results(workdir: str, results: dict) -> None:
    """Writes workdir/results.json (indent 2, sorted keys) and workdir/results.md, atomically."""
    markdown = results_markdown(results)  # validates first: nothing is written on bad input
    payload = json.dumps(to_jsonable(results), indent=2, sort_keys=True, allow_nan=False)
    paths.write_atomic(paths.join(workdir, "results.json"), payload + "\n")
    paths.write_atomic(paths.join(workdir, "results.md"), markdown)
