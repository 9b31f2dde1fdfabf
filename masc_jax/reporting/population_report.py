"""The population report: results.md, results.json, report.png and sweep.png of
P societies trained together.

The population results dict (written by the training loop)::

    {
      "population": {"members": [{"seed": int, "settings": {field: value}}] * P,
                     "swept": [field, ...]},           # [] (and settings {}) without a sweep
      "members": [results_0, ..., results_{P-1}],      # single-run results (reporting schema),
                                                       # each maybe with "routing_diagnostics"
      "aggregate": stats.aggregate(members),
      "sweep": stats.sweep_summary(population, members),   # only with a sweep
      "timings", "stages", "routing", "routing_margin", "config",     # optional, as in a run
    }

"aggregate" and "sweep" are recomputed from "members" when absent. Every number
of the Markdown is ``mean ± half-width (n)`` in percent: the mean over the members
that have the value, the half-width of its 95% Student-t confidence interval, and
how many members that is (``95.2 (1)`` for a single one). The figures draw the
same half-widths as error bars.

numpy only (matplotlib imported lazily in the plotting functions): no jax import.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from masc_jax import paths
from masc_jax.reporting import stats, routing_diagnostics
from masc_jax.reporting.plots import REPORT_DPI, REPORT_FIGSIZE
from masc_jax.reporting.progress import format_duration, to_jsonable
from masc_jax.reporting import schema

__all__ = [
    "population_markdown",
    "write_population_results",
    "plot_population_report",
    "plot_sweep",
]

CI_EXPLANATION = "95% Student-t confidence interval over seeds"
SWEEP_FIGSIZE = (15.0, 5.0)
# Column titles of the headline numbers (stats.HEADLINE_KEYS).
_HEADLINE_TITLES = {
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


def _parse(
    results: Any,
) -> tuple[list[dict], list[dict], list[str], dict, dict | None]:
  """(members, member specs, swept fields, aggregate, sweep summary or None).

  Uses the stored "aggregate" / "sweep" when present (results.json read back
  gives the same report), else computes them from "members".
  """
  if not isinstance(results, Mapping):
    raise ValueError(
        f"population results must be a dict, got {type(results).__name__}"
    )
  members = results.get("members")
  if (
      not isinstance(members, Sequence)
      or isinstance(members, str)
      or not members
  ):
    raise ValueError(
        "population results have no 'members' list: nothing to report"
    )
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
  return list(members), specs, swept, agg, sweep


def _unique(values: Iterable[Any]) -> list[Any]:
  seen: list[Any] = []
  for v in values:
    if v not in seen:
      seen.append(v)
  return seen


# ----------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------


def _stat(summary: Mapping | None, key: str) -> float:
  return schema.as_float(summary.get(key)) if summary else float("nan")


def _num(v: float, percent: bool = True) -> str:
  """A fraction as a percentage with one decimal (``percent``), else two decimals."""
  return f"{100.0 * v:.1f}" if percent else f"{v:.2f}"


def _ci(summary: Mapping | None, percent: bool = True) -> str:
  """``'95.2 ± 1.3 (5)'`` from a summary (see ``_num`` for ``percent``);
  ``'95.2 (1)'`` without a spread; ``'-'`` without a value."""
  mean = _stat(summary, "mean")
  if not math.isfinite(mean):
    return "-"
  n = int(summary.get("n") or 0)
  half = _stat(summary, "half_width")
  if n < 2 or not math.isfinite(half):
    return f"{_num(mean, percent)} ({n})"
  return f"{_num(mean, percent)} ± {_num(half, percent)} ({n})"


def _seeds_text(seeds: Sequence[Any]) -> str:
  """'0-4' for integer seeds (runs collapsed), else the seeds listed."""
  if all(isinstance(s, numbers.Integral) for s in seeds):
    return schema.id_ranges(seeds)
  return ", ".join(map(str, seeds))


def _members_text(p: int) -> str:
  return f"{p} member" if p == 1 else f"{p} members"


def _setting_value(v: Any) -> str:
  if isinstance(v, numbers.Real) and not isinstance(v, bool):
    return f"{float(v):g}"
  return str(v)


def _settings_text(settings: Mapping, fields: Sequence[str]) -> str:
  return ", ".join(f"{f} = {_setting_value(settings.get(f))}" for f in fields)


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


def _directionality(entry: Mapping | None) -> str:
  if not entry or not entry.get("of"):
    return "-"
  return f"holds in {int(entry['holds'])} of {int(entry['of'])}"


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


def _diagnostic_cell(path: str, summary: Mapping) -> str:
  # Shares and accuracies are fractions (shown in %); energies are not.
  return _ci(summary, percent=not path.startswith("energy"))


# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------


def _header_lines(
    members: list[dict], specs: list[dict], swept: list[str], k: int
) -> list[str]:
  p = len(members)
  seeds = _unique(s["seed"] for s in specs if s.get("seed") is not None)
  seed_text = f"seeds {_seeds_text(seeds)}" if seeds else "seeds not recorded"
  out = ["# MASC population results", ""]
  if swept:
    settings = _unique(
        tuple((s.get("settings") or {}).get(f) for f in swept) for s in specs
    )
    out.append(
        f"P = {_members_text(p)}: {seed_text}, {len(settings)} settings of "
        + ", ".join(f"`{f}`" for f in swept)
        + "."
    )
  else:
    out.append(f"P = {_members_text(p)}, {seed_text}.")
  out.append("")
  out.append(
      f"Each number: mean ± half-width of the {CI_EXPLANATION}, and (n) the number of "
      "members it is over; a single member's value is shown with (1)."
  )
  if swept:
    out.append(
        "The tables up to the Sweep section pool the members of all settings; "
        "the Sweep section has them per setting."
    )
  out.append("")

  class_groups = [m.get("class_groups") for m in members]
  if any(g is not None for g in class_groups) and any(
      g != class_groups[0] for g in class_groups
  ):
    header = schema.class_groups_lines(k, None)
    header[0] = (
        f"K = {k} agents (class groups differ between members: see results.json)."
    )
    return out + header
  return out + schema.class_groups_lines(k, class_groups[0])


def _row_lines(agg: Mapping) -> list[str]:
  out = []
  for name in schema.ordered_rows(
      agg["rows"]
  ):  # results.json sorts keys: restore the table order
    row = agg["rows"][name]
    out += [f"## {schema.row_title(name)}", ""]
    k = len(row["expert"]["per_agent"])
    lines = [
        [f"Agent {a}"] + [_ci(row[m]["per_agent"][a]) for m in stats.METRICS]
        for a in range(k)
    ]
    lines.append(["mean"] + [_ci(row[m]["mean"]) for m in stats.METRICS])
    out += _table(["Agent", "Expert", "General", "Average"], "lrrr", lines)
  return out


def _summary_lines(agg: Mapping, routing: Any, margin: Any) -> list[str]:
  society, direction = (
      agg.get("society_accuracy") or {},
      agg.get("directionality") or {},
  )
  lines = [
      [schema.row_title(name)]
      + [_ci(agg["rows"][name][m]["mean"]) for m in stats.METRICS]
      + [_ci(society.get(name)), _directionality(direction.get(name))]
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
  out += [
      f"Society accuracy: over all classes, each image answered by {chooser}. "
      "Directionality: for every class group, its owner agent is the most accurate; "
      "'holds in x of P' counts the members where it does.",
      "",
  ]
  if routing is not None:
    out += [f"Routing rule: {schema.routing_rule_text(routing, margin)}", ""]
  return out


def _group_lines(agg: Mapping) -> list[str]:
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
            f"**{_ci(mat[a][g])}**" if a == g else _ci(mat[a][g])
            for g in range(k)
        ]
        for a in range(k)
    ]
    out += [f"### {schema.row_title(name)}", ""]
    out += _table(
        ["agent"] + [f"group {g}" for g in range(k)], "l" + "r" * k, lines
    )
  return out


def _diagnostics_lines(agg: Mapping) -> list[str]:
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
      "How each grown agent splits its answers between its own head and S's head, per agent "
      "(own: images of the agent's own classes; foreign: the other agents'). Shares and "
      "accuracies in %; energies are mean free energies (lower = more confident).",
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
      lines = [
          [_diagnostic_title(path)[0]]
          + [
              _diagnostic_cell(path, v[a]) if a < len(v) else "-"
              for a in range(k)
          ]
          for path, v in per_agent
      ]
      out += _table(
          ["quantity"] + [f"Agent {a}" for a in range(k)], "l" + "r" * k, lines
      )
    out += [
        f"- {_diagnostic_title(path)[0]}: {_diagnostic_cell(path, v)}"
        for path, v in scalars
    ]
  return out + ([""] if out[-1] else [])


def _collective_lines(agg: Mapping) -> list[str]:
  collective = agg.get("collective_accuracy") or {}
  if not collective:
    return []
  order = {name: i for i, name in enumerate(schema.COLLECTIVE_TITLES)}
  out = ["## Collective network", ""]
  for key in sorted(collective, key=lambda c: (order.get(c, len(order)), c)):
    title = schema.COLLECTIVE_TITLES.get(key, f"collective network ({key})")
    out.append(f"- {title}, all classes (%): {_ci(collective[key])}")
  return out + [""]


def _sweep_lines(sweep: Mapping) -> list[str]:
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
          [_setting_value(g["settings"].get(f)) for f in swept]
          + [_seeds_text(g.get("seeds") or [])]
          + [_ci(head.get(key)) for key in stats.HEADLINE_KEYS]
      )
    out += [f"### {schema.row_title(name)}", ""]
    out += _table(
        [f"`{f}`" for f in swept]
        + ["seeds"]
        + [_HEADLINE_TITLES[key] for key in stats.HEADLINE_KEYS],
        "r" * len(swept) + "l" + "r" * len(stats.HEADLINE_KEYS),
        lines,
    )
  best = sweep.get("best")
  if best:
    s = best["summary"]
    text = (
        f"Best setting (highest {_HEADLINE_TITLES[best['metric']]} in %, "
        f"{schema.row_title(best['row'])}): {_settings_text(best['settings'], swept)}: {_ci(s)}"
    )
    if math.isfinite(_stat(s, "half_width")):
      lo, hi = s["ci95"]
      text += f", 95% CI [{_num(lo)}, {_num(hi)}]"
    out += [text + ".", ""]
  return out


def _members_lines(
    members: list[dict], specs: list[dict], swept: list[str]
) -> list[str]:
  headlines = [stats.member_headline(m) for m in members]
  rows = schema.ordered_rows(stats.union(headlines))
  header = ["member", "seed"] + [f"`{f}`" for f in swept]
  for name in rows:
    header += [
        f"{schema.row_title(name)}: mean General",
        f"{schema.row_title(name)}: society",
    ]
  lines = []
  for i, (spec, head) in enumerate(zip(specs, headlines)):
    cells = [str(i), str(spec.get("seed", "-"))]
    cells += [
        _setting_value((spec.get("settings") or {}).get(f)) for f in swept
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
  """The timings table of reporting.results_markdown (same columns and formats)."""
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


def population_markdown(results: Mapping) -> str:
  """The population's Markdown report: per-row agent tables, summary, per-group
  accuracy, routing diagnostics, collective accuracy, sweep, members, timings
  (sections without data are left out)."""
  members, specs, swept, agg, sweep = _parse(results)
  out = _header_lines(members, specs, swept, int(agg["num_agents"]))
  out += _row_lines(agg)
  out += _summary_lines(
      agg, results.get("routing"), results.get("routing_margin")
  )
  out += _group_lines(agg)
  out += _diagnostics_lines(agg)
  out += _collective_lines(agg)
  if sweep:
    out += _sweep_lines(sweep)
  out += _members_lines(members, specs, swept)
  out += _timings_lines(results.get("timings"), results.get("stages"))
  return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def write_population_results(workdir: str, results: dict) -> None:
  """Writes workdir/results.json (indent 2, sorted keys, NaN as null) and
  workdir/results.md, atomically, like ``reporting.write_results``."""
  markdown = population_markdown(
      results
  )  # validates first: nothing is written on bad input
  payload = json.dumps(
      to_jsonable(results), indent=2, sort_keys=True, allow_nan=False
  )
  paths.write_atomic(paths.join(workdir, "results.json"), payload + "\n")
  paths.write_atomic(paths.join(workdir, "results.md"), markdown)


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------


def _render_png(
    figsize: tuple[float, float], draw: Callable[[Any], None]
) -> bytes:
  """PNG bytes of a ``matplotlib.figure.Figure`` that ``draw(fig)`` fills (Agg, no pyplot)."""
  import matplotlib

  if "matplotlib.pyplot" not in sys.modules:
    # Don't switch an already-chosen pyplot backend (that would close the user's
    # figures); the Figure below renders with Agg either way.
    matplotlib.use("Agg")
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  fig = Figure(figsize=figsize, dpi=REPORT_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  try:
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=REPORT_DPI)
  finally:
    fig.clear()
  return buf.getvalue()


def _mean_and_error(
    summaries: Sequence[Mapping | None],
) -> tuple[np.ndarray, np.ndarray | None]:
  """[n] means (NaN without a value) and CI half-widths (0 without a spread; None
  when no value has one, so that no zero-length bars are drawn)."""
  means = np.array([_stat(s, "mean") for s in summaries])
  halves = np.array([_stat(s, "half_width") for s in summaries])
  return means, (np.nan_to_num(halves) if np.isfinite(halves).any() else None)


def _error_bars(
    ax,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence, str, str | None]],
) -> None:
  """Grouped bars with CI error bars: one group per label, one bar per series
  ``(legend, [len(labels)] summaries, colour, hatch)``; y from 0 to past the top error bar.
  """
  width = 0.8 / max(len(series), 1)
  x = np.arange(len(labels))
  top = 1.05
  for j, (legend, summaries, color, hatch) in enumerate(series):
    means, halves = _mean_and_error(summaries)
    means = np.nan_to_num(means)  # a missing value: no bar
    ax.bar(
        x - 0.4 + width * (j + 0.5),
        means,
        width,
        yerr=halves,
        capsize=3,
        label=legend,
        color=color,
        hatch=hatch,
        edgecolor="black",
        linewidth=0.5,
        error_kw={"elinewidth": 1.0},
    )
    reach = means if halves is None else means + halves
    top = max(top, float(np.max(reach, initial=0.0)) + 0.02)
  ax.set_xticks(x)
  ax.set_xticklabels(labels)
  ax.set_ylim(0.0, top)
  ax.set_ylabel("accuracy")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(
      loc="upper center",
      bbox_to_anchor=(0.5, -0.12),
      ncol=max(1, len(series)),
      fontsize=9,
      frameon=False,
  )


def plot_population_report(results: Mapping, path: str) -> None:
  """Writes report.png: (a) per-agent Expert and General (before and after growth,
  else the first two rows present) and (b) every row's mean General and society
  accuracy, each bar with its 95% CI over the members as an error bar."""
  members, _, _, agg, _ = _parse(results)
  rows = {name: agg["rows"][name] for name in schema.ordered_rows(agg["rows"])}
  bar_rows = [
      r for r in ("before_growth", "after_growth") if r in rows
  ] or list(rows)[:2]
  k = int(agg["num_agents"])
  society, direction = (
      agg.get("society_accuracy") or {},
      agg.get("directionality") or {},
  )
  palette = {
      "expert": ("#9ecae1", "#2171b5"),
      "general": ("#fdae6b", "#d94801"),
  }

  def draw(fig):
    fig.suptitle(f"{_members_text(len(members))}; error bars: {CI_EXPLANATION}")
    ax_agents, ax_rows = fig.subplots(2, 1)
    series = []
    for i, name in enumerate(bar_rows):
      strong = (
          i == len(bar_rows) - 1
      )  # the last (after growth) in solid colours
      for m in ("expert", "general"):
        series.append(
            (
                f"{m.capitalize()} - {schema.row_title(name)}",
                rows[name][m]["per_agent"],
                palette[m][1 if strong else 0],
                None if strong else "//",
            )
        )
    _error_bars(ax_agents, [f"agent {a}" for a in range(k)], series)
    ax_agents.set_title(
        "(a) per-agent Expert (own classes) and General (other agents' classes)"
    )

    labels = [
        schema.row_title(r)
        + (
            f"\ndirectionality {direction[r]['holds']}/{direction[r]['of']}"
            if r in direction
            else ""
        )
        for r in rows
    ]
    _error_bars(
        ax_rows,
        labels,
        [
            (
                "mean General",
                [rows[r]["general"]["mean"] for r in rows],
                "#d94801",
                None,
            ),
            (
                "society accuracy",
                [society.get(r) for r in rows],
                "#41ab5d",
                None,
            ),
        ],
    )
    ax_rows.set_title(
        "(b) per row: mean General over agents and society accuracy"
    )

  paths.write_atomic(path, _render_png(REPORT_FIGSIZE, draw))


def _x_positions(
    values: Sequence[Any],
) -> tuple[list[float], list[str] | None, bool]:
  """Where swept values go on the x axis: (positions, tick labels for non-numeric
  values or None, log scale?). Positive numbers spanning two decades get a log axis
  (weights like 0.01, 0.1, 1)."""
  if all(
      isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values
  ):
    xs = [float(v) for v in values]
    positive = all(x > 0 for x in xs)
    return xs, None, positive and max(xs) / min(xs) >= 100.0
  labels = [str(v) for v in _unique(values)]
  return [float(labels.index(str(v))) for v in values], labels, False


def plot_sweep(results: Mapping, path: str) -> None:
  """Writes sweep.png: the headline row's (after growth, see
  ``stats.headline_row``) mean General, mean Average and society accuracy
  of every setting against the first swept field, with 95% CI error bars; with
  more fields, one line per combination of the others. Raises ValueError without
  a sweep."""
  _, _, _, _, sweep = _parse(results)
  if not sweep or not sweep.get("swept") or not sweep.get("groups"):
    raise ValueError("plot_sweep: the population results have no sweep")
  fields, groups = list(sweep["swept"]), sweep["groups"]
  x_field, others = fields[0], fields[1:]
  row = stats.headline_row(stats.union(g["rows"] for g in groups))
  lines: dict[tuple, list[dict]] = {}
  for g in groups:
    lines.setdefault(
        tuple(_setting_value(g["settings"].get(f)) for f in others), []
    ).append(g)
  positions, ticks, log_x = _x_positions(
      [g["settings"].get(x_field) for g in groups]
  )
  where = {id(g): x for g, x in zip(groups, positions)}
  metrics = ("mean_general", "mean_average", "society_accuracy")

  def draw(fig):
    fig.suptitle(
        f"Sweep, {schema.row_title(row)}; error bars: {CI_EXPLANATION}"
    )
    for ax, metric in zip(fig.subplots(1, len(metrics)), metrics):
      for combo, members in lines.items():
        members = sorted(members, key=lambda g: where[id(g)])
        means, halves = _mean_and_error(
            [g["rows"].get(row, {}).get(metric) for g in members]
        )
        label = ", ".join(f"{f} = {v}" for f, v in zip(others, combo)) or None
        ax.errorbar(
            [where[id(g)] for g in members],
            means,
            yerr=halves,
            marker="o",
            capsize=3,
            label=label,
        )
      if ticks is not None:
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks)
      if log_x:
        ax.set_xscale("log")
      ax.set_xlabel(x_field)
      ax.set_ylabel("accuracy")
      ax.set_title(_HEADLINE_TITLES[metric])
      ax.grid(alpha=0.3)
      if others:
        ax.legend(fontsize=8)

  paths.write_atomic(path, _render_png(SWEEP_FIGSIZE, draw))
