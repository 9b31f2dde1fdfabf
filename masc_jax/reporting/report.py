"""Reporting: results.md and results.json of a run (one seed or a population of them).

Every run's results are one plain, JSON-able dict, written by the training loop
(a single seed is a population of one member)::

    {
      "population": {"members": [{"seed": int, "settings": {field: value}}] * P,
                     "swept": [field, ...]},           # [] (and settings {}) without a sweep
      "members": [member_0, ..., member_{P-1}],        # each member's tables (below)
      "aggregate": stats.aggregate(members),           # every cell over the members
      "sweep": stats.sweep_summary(population, members),   # only with a sweep
      "stages": ["experts", "collective", ...],  # optional: the run's stage order
      "timings": {stage: {"compile_s", "train_s", "steps", "images_per_s"}},  # optional
      "routing": "energy",                     # optional: the society's routing rule
      "routing_margin": float,                 # optional: that rule's margin
      "config": {...},                         # optional
    }

One member's tables (rows may be missing: "ra_only" and the joint-training
reference "joint" come from the ablation stages)::

    {
      "num_agents": K,
      "class_groups": [[...], ...],            # [K][M] class ids per agent
      "rows": {row: {"expert": [K], "general": [K], "average": [K]}},
      "group_accuracy": {row: [[K] * K]},      # [agent][class group]; none for "joint"
      "society_accuracy": {row: float},        # "joint": its accuracy over all classes
      "directionality": {row: bool},           # none for "joint"
      "collective_accuracy": {"cc": float, "ce": float},                  # optional
      "routing_diagnostics": {row: {...}},  # optional: masc_jax.reporting.routing_diagnostics.diagnose
                                            # output per row (schema in that module)
    }

"joint" is a reference, not a state of the society (``schema.REFERENCE_ROWS``):
one network, the CE-only collective, trained on all the agents' data; agent
a's line holds its accuracy on agent a's classes (Expert) and on the others'
(General).

"aggregate" and "sweep" are recomputed from "members" when absent. Accuracies
are fractions in [0, 1]; the Markdown shows them as percentages. Non-finite
numbers (e.g. the accuracy on an empty split, the spread of one value) are
written to JSON as ``null`` and shown as ``-``.

Every cell of results.md is that cell over the members. With several members:
``mean ± half-width (n)`` in percent, one decimal (the mean over the members
that have the value, the half-width of its 95% Student-t interval, and how
many members that is; ``95.2 (1)`` for a single one). With one member (one
seed): its value, two decimals, no interval.

:func:`results_markdown` renders, :func:`write_results` writes both files;
``masc_jax.reporting.plots`` draws report.png and sweep.png from the same dict
(:func:`read` is the parsing both share). numpy only: no jax import.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from masc_jax import paths
from masc_jax.reporting import routing_diagnostics, schema, stats
from masc_jax.reporting.progress import format_duration, to_jsonable

__all__ = [
    "CI_EXPLANATION",
    "Results",
    "read",
    "results_markdown",
    "write_results",
]

CI_EXPLANATION = "95% Student-t confidence interval over seeds"
# Column titles of the headline numbers (stats.HEADLINE_KEYS).
HEADLINE_TITLES = {
    "mean_expert": "mean Expert",
    "mean_general": "mean General",
    "mean_average": "mean Average",
    "society_accuracy": "society accuracy",
}
# The routing diagnostics' fields (dotted paths) in the order shown (unknown ones
# follow), with routing_diagnostics' (column header, meaning) of each.
_DIAGNOSTIC_COLUMNS = {
    **{
        key: routing_diagnostics.DIAGNOSTIC_COLUMNS[key]
        for key in routing_diagnostics.SHARE_KEYS
    },
    **{
        f"energy_mean.{key}": routing_diagnostics.DIAGNOSTIC_COLUMNS[key]
        for key in routing_diagnostics.ENERGY_KEYS
    },
}


# ----------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------


class Results(NamedTuple):
  """A results dict, checked, with its statistics (stored, else computed)."""

  members: list[dict]
  specs: list[dict]  # each member's {"seed", "settings"}
  swept: list[str]
  aggregate: dict
  sweep: dict | None
  num_agents: int


def read(results: Any) -> Results:
  """Check ``results`` (every member's tables and diagnostics) and read it.

  Uses the stored "aggregate" / "sweep" when present (results.json read back
  gives the same report), else computes them from "members".

  Raises:
    ValueError: naming what is malformed.
  """
  if not isinstance(results, Mapping):
    raise ValueError(f"results must be a dict, got {type(results).__name__}")
  members = results.get("members")
  if (
      not isinstance(members, Sequence)
      or isinstance(members, str)
      or not members
  ):
    raise ValueError("results have no 'members' list: nothing to report")
  ks = set()
  for member in members:
    k, _, _ = schema.validate(member)
    if member.get("routing_diagnostics") is not None:
      routing_diagnostics.validate(member["routing_diagnostics"], num_agents=k)
    ks.add(k)
  if len(ks) != 1:
    raise ValueError(f"members have different numbers of agents: {sorted(ks)}")
  population = results.get("population") or {}
  specs = list(population.get("members") or [{} for _ in members])
  if len(specs) != len(members):
    raise ValueError(
        f"population lists {len(specs)} members, results have {len(members)}"
    )
  swept = [str(f) for f in population.get("swept") or []]
  agg = results.get("aggregate") or stats.aggregate(members)
  sweep = results.get("sweep")
  if sweep is None and swept:
    sweep = stats.sweep_summary({**population, "members": specs}, members)
  return Results(list(members), specs, swept, agg, sweep, ks.pop())


def unique(values: Iterable[Any]) -> list[Any]:
  """``values`` without repeats, in order of first appearance."""
  seen: list[Any] = []
  for v in values:
    if v not in seen:
      seen.append(v)
  return seen


# ----------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------


def stat(summary: Mapping | None, key: str) -> float:
  """``summary[key]`` as a float (NaN without a summary or a value)."""
  return schema.as_float(summary.get(key)) if summary else float("nan")


def setting_value(v: Any) -> str:
  if isinstance(v, numbers.Real) and not isinstance(v, bool):
    return f"{float(v):g}"
  return str(v)


def members_text(p: int) -> str:
  return f"{p} member" if p == 1 else f"{p} members"


class _Cells:
  """How one report writes a cell: one member's value, or statistics over several."""

  def __init__(self, num_members: int):
    self.single = num_members == 1

  def value(self, v: float, percent: bool = True) -> str:
    """A plain number: a fraction in percent (``percent``), else as it is."""
    if not math.isfinite(v):
      return "-"
    scale = 100.0 if percent else 1.0
    # One member: two decimals, a test-set image's worth of accuracy on CIFAR.
    return f"{scale * v:.{2 if self.single or not percent else 1}f}"

  def __call__(self, summary: Mapping | None, percent: bool = True) -> str:
    """``'95.2 ± 1.3 (5)'``; ``'95.2 (1)'`` without a spread; ``'95.20'`` in a
    one-member report; ``'-'`` without a value."""
    mean = stat(summary, "mean")
    if self.single or not math.isfinite(mean):
      return self.value(mean, percent)
    n = int(summary.get("n") or 0)
    half = stat(summary, "half_width")
    if n < 2 or not math.isfinite(half):
      return f"{self.value(mean, percent)} ({n})"
    return f"{self.value(mean, percent)} ± {self.value(half, percent)} ({n})"

  def directionality(self, entry: Mapping | None) -> str:
    if not entry or not entry.get("of"):
      return "-"
    if self.single:
      return schema.yes_no(entry["holds"])
    return f"holds in {int(entry['holds'])} of {int(entry['of'])}"


def _seeds_text(seeds: Sequence[Any]) -> str:
  """'0-4' for integer seeds (runs collapsed), else the seeds listed."""
  if all(isinstance(s, numbers.Integral) for s in seeds):
    return schema.id_ranges(seeds)
  return ", ".join(map(str, seeds))


def _settings_text(settings: Mapping, fields: Sequence[str]) -> str:
  return ", ".join(f"{f} = {setting_value(settings.get(f))}" for f in fields)


def _table(
    header: Sequence[str], align: Sequence[str], lines: Iterable[Sequence[str]]
) -> list[str]:
  """A Markdown table (align: 'l', 'r' or 'c' per column) followed by a blank line."""
  marks = {"l": "---", "r": "---:", "c": ":---:"}
  out = [
      "| " + " | ".join(header) + " |",
      "|" + "|".join(marks[a] for a in align) + "|",
  ]
  out.extend("| " + " | ".join(cells) + " |" for cells in lines)
  return out + [""]


def _is_summary(value: Any) -> bool:
  return isinstance(value, Mapping) and {"mean", "n", "half_width"} <= set(
      value
  )


def _diagnostic_leaves(tree: Mapping) -> list[tuple[str, Any]]:
  """(dotted field path, [K] summaries or one summary) of every leaf of one row's
  aggregated diagnostics, in display order (``_DIAGNOSTIC_COLUMNS``, then by path).
  """

  def flatten(node: Mapping, prefix: str):
    for key, value in node.items():
      if isinstance(value, Mapping) and not _is_summary(value):
        yield from flatten(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value

  order = {path: i for i, path in enumerate(_DIAGNOSTIC_COLUMNS)}
  return sorted(
      flatten(tree, ""),
      key=lambda leaf: (order.get(leaf[0], len(order)), leaf[0]),
  )


def _diagnostic_title(path: str) -> tuple[str, str | None]:
  """(column header, meaning) of a diagnostics field; the path itself for an unknown one."""
  return _DIAGNOSTIC_COLUMNS.get(path, (f"`{path}`", None))


def _is_fraction(path: str) -> bool:
  # Shares and accuracies are fractions (shown in %); energies are not.
  return not path.startswith("energy")


# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------


def _header_lines(r: Results) -> list[str]:
  p = len(r.members)
  seeds = unique(s["seed"] for s in r.specs if s.get("seed") is not None)
  seed_text = (
      f"seed{'s' if len(seeds) > 1 else ''} {_seeds_text(seeds)}"
      if seeds
      else "seeds not recorded"
  )
  out = ["# MASC results", ""]
  if r.swept:
    settings = unique(
        tuple((s.get("settings") or {}).get(f) for f in r.swept)
        for s in r.specs
    )
    out.append(
        f"P = {members_text(p)}: {seed_text}, {len(settings)} "
        f"setting{'s' if len(settings) > 1 else ''} of "
        + ", ".join(f"`{f}`" for f in r.swept)
        + "."
    )
  else:
    out.append(f"P = {members_text(p)}, {seed_text}.")
  out.append("")
  if p == 1:
    out.append(
        "One seed: each number is its value, with no interval (an interval "
        "needs several seeds: --config.seeds)."
    )
  else:
    out.append(
        f"Each number: mean ± half-width of the {CI_EXPLANATION}, and (n) the "
        "number of members it is over; a single member's value is shown with (1)."
    )
  if r.swept and p > 1:
    out.append(
        "The tables up to the Sweep section pool the members of all settings; "
        "the Sweep section has them per setting."
    )
  out.append("")
  k = r.num_agents
  class_groups = [
      None if g is None else [[int(c) for c in group] for group in g]
      for g in (m.get("class_groups") for m in r.members)
  ]
  if any(g is not None for g in class_groups) and any(
      g != class_groups[0] for g in class_groups
  ):
    header = schema.class_groups_lines(k, None)
    header[0] = (
        f"K = {k} agents (class groups differ between members: see results.json)."
    )
    return out + header
  return out + schema.class_groups_lines(k, class_groups[0])


def _row_lines(agg: Mapping, cell: _Cells) -> list[str]:
  out = []
  for name in schema.ordered_rows(
      agg["rows"]
  ):  # results.json sorts keys: restore the table order
    row = agg["rows"][name]
    out += [f"## {schema.row_title(name)}", ""]
    if name in schema.ROW_NOTES:
      out += [schema.ROW_NOTES[name], ""]
    k = len(row["expert"]["per_agent"])
    lines = [
        [f"Agent {a}"] + [cell(row[m]["per_agent"][a]) for m in stats.METRICS]
        for a in range(k)
    ]
    lines.append(["mean"] + [cell(row[m]["mean"]) for m in stats.METRICS])
    out += _table(["Agent", "Expert", "General", "Average"], "lrrr", lines)
  return out


def _summary_lines(
    agg: Mapping, cell: _Cells, routing: Any, margin: Any
) -> list[str]:
  society, direction = (
      agg.get("society_accuracy") or {},
      agg.get("directionality") or {},
  )
  lines = [
      [schema.row_title(name)]
      + [cell(agg["rows"][name][m]["mean"]) for m in stats.METRICS]
      + [cell(society.get(name)), cell.directionality(direction.get(name))]
      for name in schema.ordered_rows(agg["rows"])
  ]
  out = ["## Summary", ""]
  out += _table(
      [
          "row",
          "mean Expert",
          "mean General",
          "mean Average",
          "society accuracy",
          "directionality",
      ],
      "lrrrrc",
      lines,
  )
  chooser = (
      "the agent of lowest energy"
      if routing is None or routing == "energy"
      else "the agent the routing rule picks"
  )
  counted = (
      ""
      if cell.single
      else "; 'holds in x of P' counts the members where it does"
  )
  out += [
      f"Society accuracy: over all classes, each image answered by {chooser}. "
      f"Directionality: for every class group, its owner agent is the most accurate{counted}.",
      "",
  ]
  references = [name for name in agg["rows"] if name in schema.REFERENCE_ROWS]
  if references:
    out += [
        ", ".join(schema.row_title(name) for name in references)
        + ": one network, not the society; its society accuracy is its own "
        "accuracy over all classes, and it has no directionality (every agent "
        "would be the same network).",
        "",
    ]
  if routing is not None:
    out += [f"Routing rule: {schema.routing_rule_text(routing, margin)}", ""]
  return out


def _group_lines(agg: Mapping, cell: _Cells) -> list[str]:
  groups = agg.get("group_accuracy") or {}
  if not groups:
    return []
  out = [
      "## Accuracy per class group",
      "",
      "Rows: agents; columns: class groups (group g belongs to agent g, shown in bold).",
      "",
  ]
  for name in schema.ordered_rows(groups):
    mat = groups[name]
    k = len(mat)
    lines = [
        [f"Agent {a}"]
        + [
            f"**{cell(mat[a][g])}**" if a == g else cell(mat[a][g])
            for g in range(k)
        ]
        for a in range(k)
    ]
    out += [f"### {schema.row_title(name)}", ""]
    out += _table(
        ["agent"] + [f"group {g}" for g in range(k)], "l" + "r" * k, lines
    )
  return out


def _diagnostics_lines(agg: Mapping, cell: _Cells) -> list[str]:
  diagnostics = agg.get("routing_diagnostics")
  if not diagnostics:
    return []
  rows = {
      name: _diagnostic_leaves(diagnostics[name])
      for name in schema.ordered_rows(diagnostics)
  }
  out = [
      "## Routing diagnostics",
      "",
      "How each grown agent splits its answers between its own head and S's head "
      "(the routing rule picks one per image; the default `energy` rule, the one of "
      "lower free energy). Own: images of the agent's own classes; foreign: images "
      "of the other agents' classes. Shares and accuracies in %; energies are mean "
      "free energies F = -T logsumexp(z / T), lower = more confident. The last "
      "column is the mean over agents"
      + ("." if cell.single else " of the agents' means over members."),
      "",
  ]
  meanings = {}
  for leaves in rows.values():
    meanings.update((_diagnostic_title(path) for path, _ in leaves))
  out += [
      f"- {header}: {meaning}."
      for header, meaning in meanings.items()
      if meaning
  ] + [""]
  for name, leaves in rows.items():
    per_agent = [(path, v) for path, v in leaves if isinstance(v, list)]
    scalars = [(path, v) for path, v in leaves if not isinstance(v, list)]
    out += [f"### {schema.row_title(name)}", ""]
    if per_agent:
      k = max(len(v) for _, v in per_agent)
      lines = []
      for path, v in per_agent:
        over_agents = schema.mean(np.array([stat(s, "mean") for s in v]))
        lines.append(
            [_diagnostic_title(path)[0]]
            + [
                cell(v[a], _is_fraction(path)) if a < len(v) else "-"
                for a in range(k)
            ]
            + [cell.value(over_agents, _is_fraction(path))]
        )
      out += _table(
          ["quantity"] + [f"Agent {a}" for a in range(k)] + ["mean"],
          "l" + "r" * (k + 1),
          lines,
      )
    out += [
        f"- {_diagnostic_title(path)[0]}: {cell(v, _is_fraction(path))}"
        for path, v in scalars
    ]
  return out + ([""] if out[-1] else [])


def _collective_lines(agg: Mapping, cell: _Cells) -> list[str]:
  collective = agg.get("collective_accuracy") or {}
  if not collective:
    return []
  order = {name: i for i, name in enumerate(schema.COLLECTIVE_TITLES)}
  out = ["## Collective network", ""]
  for key in sorted(collective, key=lambda c: (order.get(c, len(order)), c)):
    title = schema.COLLECTIVE_TITLES.get(key, f"collective network ({key})")
    out.append(f"- {title}, all classes (%): {cell(collective[key])}")
  return out + [""]


def _sweep_lines(sweep: Mapping, cell: _Cells) -> list[str]:
  swept, groups = list(sweep.get("swept") or []), sweep.get("groups") or []
  out = [
      "## Sweep",
      "",
      "Swept: "
      + ", ".join(f"`{f}`" for f in swept)
      + ". One line per setting; each number "
      f"over that setting's seeds ({CI_EXPLANATION}).",
      "",
  ]
  for name in schema.ordered_rows(stats.union(g["rows"] for g in groups)):
    lines = []
    for g in groups:
      head = g["rows"].get(name, {})
      lines.append(
          [setting_value(g["settings"].get(f)) for f in swept]
          + [_seeds_text(g.get("seeds") or [])]
          + [cell(head.get(key)) for key in stats.HEADLINE_KEYS]
      )
    out += [f"### {schema.row_title(name)}", ""]
    out += _table(
        [f"`{f}`" for f in swept]
        + ["seeds"]
        + [HEADLINE_TITLES[key] for key in stats.HEADLINE_KEYS],
        "r" * len(swept) + "l" + "r" * len(stats.HEADLINE_KEYS),
        lines,
    )
  best = sweep.get("best")
  if best:
    s = best["summary"]
    text = (
        f"Best setting (highest {HEADLINE_TITLES[best['metric']]} in %, "
        f"{schema.row_title(best['row'])}): {_settings_text(best['settings'], swept)}: {cell(s)}"
    )
    if math.isfinite(stat(s, "half_width")):
      lo, hi = s["ci95"]
      text += f", 95% CI [{cell.value(lo)}, {cell.value(hi)}]"
    out += [text + ".", ""]
  return out


def _members_lines(r: Results) -> list[str]:
  headlines = [stats.member_headline(m) for m in r.members]
  rows = schema.ordered_rows(stats.union(headlines))
  header = ["member", "seed"] + [f"`{f}`" for f in r.swept]
  for name in rows:
    header += [
        f"{schema.row_title(name)}: mean General",
        f"{schema.row_title(name)}: society",
    ]
  lines = []
  for i, (spec, head) in enumerate(zip(r.specs, headlines)):
    cells = [str(i), str(spec.get("seed", "-"))]
    cells += [
        setting_value((spec.get("settings") or {}).get(f)) for f in r.swept
    ]
    for name in rows:
      h = head.get(name, {})
      cells += [
          schema.pct(h.get("mean_general")),
          schema.pct(h.get("society_accuracy")),
      ]
    lines.append(cells)
  out = [
      "## Members",
      "",
      "Each member's own numbers (%), means over agents.",
      "",
  ]
  return out + _table(header, "rr" + "r" * (len(header) - 2), lines)


def _timings_lines(timings: Mapping | None, stages: Any) -> list[str]:
  if not timings:
    return []
  lines = []
  for stage, t in schema.ordered_timings(timings, stages):
    t = t if isinstance(t, Mapping) else {}
    ips = schema.as_float(t.get("images_per_s"))
    lines.append(
        [
            str(stage),
            "-" if t.get("steps") is None else str(int(t["steps"])),
            format_duration(t["compile_s"])
            if t.get("compile_s") is not None
            else "-",
            format_duration(t["train_s"])
            if t.get("train_s") is not None
            else "-",
            f"{ips:.1f}" if math.isfinite(ips) else "-",
        ]
    )
  return ["## Timings", ""] + _table(
      ["stage", "steps", "compile", "train", "images/s"], "lrrrr", lines
  )


def results_markdown(results: Mapping) -> str:
  """The Markdown report: per-row agent tables, summary (and routing rule),
  per-group accuracy, routing diagnostics, collective accuracy, sweep, members,
  timings (sections without data are left out).

  Raises:
    ValueError: for malformed results (see ``read``).
  """
  r = read(results)
  cell = _Cells(len(r.members))
  out = _header_lines(r)
  out += _row_lines(r.aggregate, cell)
  out += _summary_lines(
      r.aggregate, cell, results.get("routing"), results.get("routing_margin")
  )
  out += _group_lines(r.aggregate, cell)
  out += _diagnostics_lines(r.aggregate, cell)
  out += _collective_lines(r.aggregate, cell)
  if r.sweep:
    out += _sweep_lines(r.sweep, cell)
  out += _members_lines(r)
  out += _timings_lines(results.get("timings"), results.get("stages"))
  return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def write_results(workdir: str, results: Mapping) -> None:
  """Writes workdir/results.json (indent 2, sorted keys, NaN as null) and
  workdir/results.md, atomically; nothing on bad input."""
  markdown = results_markdown(
      results
  )  # validates first: nothing is written on bad input
  payload = json.dumps(
      to_jsonable(results), indent=2, sort_keys=True, allow_nan=False
  )
  paths.write_atomic(paths.join(workdir, "results.json"), payload + "\n")
  paths.write_atomic(paths.join(workdir, "results.md"), markdown)
