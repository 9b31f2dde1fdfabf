"""Reporting: the results tables a user reads at the end of a run.

Takes the run's results (a plain, JSON-able dict produced by the training loop)
and turns them into

* ``results.md``  -- Markdown tables (per row of the paper's table, per agent),
  a summary table, per-group accuracy matrices, collective accuracy, timings
  (:func:`results_markdown`);
* ``results.json`` -- the same dict, numpy values converted, sorted keys
  (:func:`write_results` writes both files).

This module owns the results schema below, its validation and the row titles /
order. report.png is drawn by ``masc_jax.reporting.plots`` (from the same schema); what is
printed and logged while training (progress lines, ``metrics.jsonl``) lives in
``masc_jax.reporting.progress``, which also owns the duration format and the JSON value
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
      "routing_diagnostics": {row: {...}},  # optional: masc_jax.reporting.routing_diagnostics.diagnose
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
from typing import Mapping

from masc_jax import paths
from masc_jax.reporting import routing_diagnostics, schema
from masc_jax.reporting.progress import format_duration, to_jsonable

__all__ = ["results_markdown", "write_results"]

# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------


def results_markdown(results: dict) -> str:
  """The Markdown report: per-row agent tables, summary, per-group accuracy,
  collective accuracy, timings and routing diagnostics (the last three only
  when present)."""
  k, rows, groups = schema.validate(results)
  if results.get("routing_diagnostics") is not None:
    routing_diagnostics.validate(results["routing_diagnostics"], num_agents=k)
  order = schema.ordered_rows(rows)
  society = results.get("society_accuracy") or {}
  direction = results.get("directionality") or {}
  out: list[str] = ["# MASC results", ""]

  out += schema.class_groups_lines(k, results.get("class_groups"))

  for name in order:
    r = rows[name]
    out.append(f"## {schema.row_title(name)}")
    out.append("")
    out.append("| Agent | Expert | General | Average |")
    out.append("|---|---:|---:|---:|")
    for a in range(k):
      out.append(
          f"| Agent {a} | {schema.pct(r['expert'][a])} | {schema.pct(r['general'][a])} | "
          f"{schema.pct(r['average'][a])} |"
      )
    out.append(
        f"| mean | {schema.pct(schema.mean(r['expert']))} | {schema.pct(schema.mean(r['general']))} | "
        f"{schema.pct(schema.mean(r['average']))} |"
    )
    out.append("")

  out.append("## Summary")
  out.append("")
  out.append(
      "| row | mean Expert | mean General | mean Average | society accuracy | directionality |"
  )
  out.append("|---|---:|---:|---:|---:|:---:|")
  for name in order:
    r = rows[name]
    soc = schema.pct(society[name]) if name in society else "-"
    out.append(
        f"| {schema.row_title(name)} | {schema.pct(schema.mean(r['expert']))} | {schema.pct(schema.mean(r['general']))} | "
        f"{schema.pct(schema.mean(r['average']))} | {soc} | {schema.yes_no(direction.get(name))} |"
    )
  out.append("")
  routing = results.get("routing")
  chooser = (
      "the agent of lowest energy"
      if routing is None or routing == "energy"
      else "the agent the routing rule picks"
  )
  out.append(
      f"Society accuracy: over all classes, each image answered by {chooser}. "
      "Directionality: for every class group, its owner agent is the most accurate."
  )
  out.append("")
  if routing is not None:
    out.append(
        f"Routing rule: {schema.routing_rule_text(routing, results.get('routing_margin'))}"
    )
    out.append("")

  if groups:
    out.append("## Accuracy per class group")
    out.append("")
    out.append(
        "Rows: agents; columns: class groups (group g belongs to agent g, shown in bold)."
    )
    out.append("")
    for name in schema.ordered_rows(groups):
      mat = groups[name]
      out.append(f"### {schema.row_title(name)}")
      out.append("")
      out.append(
          "| agent | " + " | ".join(f"group {g}" for g in range(k)) + " |"
      )
      out.append("|---|" + "---:|" * k)
      for a in range(k):
        cells = [
            f"**{schema.pct(mat[a, g])}**" if a == g else schema.pct(mat[a, g])
            for g in range(k)
        ]
        out.append(f"| Agent {a} | " + " | ".join(cells) + " |")
      out.append("")

  collective = results.get("collective_accuracy")
  if collective:
    out.append("## Collective network")
    out.append("")
    for key, v in collective.items():
      title = schema.COLLECTIVE_TITLES.get(key, f"collective network ({key})")
      out.append(f"- {title}, all classes: {schema.pct(v)}%")
    out.append("")

  timings = results.get("timings")
  if timings:
    out.append("## Timings")
    out.append("")
    out.append("| stage | steps | compile | train | images/s |")
    out.append("|---|---:|---:|---:|---:|")
    for stage, t in schema.ordered_timings(timings, results.get("stages")):
      t = t if isinstance(t, Mapping) else {}
      steps = t.get("steps")
      ips = t.get("images_per_s")
      ips_s = (
          "-"
          if ips is None or not math.isfinite(schema.as_float(ips))
          else f"{schema.as_float(ips):.1f}"
      )
      out.append(
          f"| {stage} | {'-' if steps is None else int(steps)} | "
          f"{format_duration(t['compile_s']) if t.get('compile_s') is not None else '-'} | "
          f"{format_duration(t['train_s']) if t.get('train_s') is not None else '-'} | {ips_s} |"
      )
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
  markdown = results_markdown(
      results
  )  # validates first: nothing is written on bad input
  payload = json.dumps(
      to_jsonable(results), indent=2, sort_keys=True, allow_nan=False
  )
  paths.write_atomic(paths.join(workdir, "results.json"), payload + "\n")
  paths.write_atomic(paths.join(workdir, "results.md"), markdown)
