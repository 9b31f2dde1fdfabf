"""report.png and sweep.png: the pictures of a run's results.

:func:`plot_report` draws, from the results dict of ``masc_jax.reporting.report``
(one seed or a population): (a) agents x class-groups accuracy heatmaps
(before / after growth, the mean over members), (b) per-agent Expert and
General bars (with the joint-training reference row when the run has it) and
(c) every row's mean General and society accuracy, the bars with their 95%
intervals over members as error bars (none for one member).
:func:`plot_sweep` draws a sweep's headline numbers against the swept values.
The images are ``REPORT_FIGSIZE`` (``SWEEP_FIGSIZE``) * ``REPORT_DPI`` pixels.

matplotlib is imported lazily inside the plotting functions.
"""

from __future__ import annotations

import io
import numbers
import sys
import textwrap
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from masc_jax import paths
from masc_jax.reporting import report, schema, stats

__all__ = [
    "REPORT_FIGSIZE",
    "REPORT_WITH_CURVES_FIGSIZE",
    "REPORT_DPI",
    "SWEEP_FIGSIZE",
    "plot_report",
    "plot_sweep",
]

# report.png is REPORT_FIGSIZE * REPORT_DPI pixels (no tight bbox cropping);
# with evaluations during training (``curves``), REPORT_WITH_CURVES_FIGSIZE.
REPORT_FIGSIZE = (12.0, 13.0)
REPORT_WITH_CURVES_FIGSIZE = (12.0, 16.5)
REPORT_DPI = 100
SWEEP_FIGSIZE = (15.0, 5.0)
_PALETTE = {
    "expert": ("#9ecae1", "#2171b5"),
    "general": ("#fdae6b", "#d94801"),
}
# A reference row's bars (schema.REFERENCE_ROWS: one network trained on all the
# data) in greys, dotted: beside the society's rows, not one of them.
_REFERENCE_PALETTE = {"expert": "#737373", "general": "#d9d9d9"}


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


def _heatmap(ax, mat: np.ndarray, title: str, cmap, fontsize: float):
  import matplotlib.patches as mpatches

  k = mat.shape[0]
  im = ax.imshow(
      np.ma.masked_invalid(mat), vmin=0.0, vmax=1.0, cmap=cmap, aspect="equal"
  )
  for a in range(k):
    for g in range(k):
      v = mat[a, g]
      txt = "-" if not np.isfinite(v) else f"{100 * v:.1f}"
      color = "white" if (np.isfinite(v) and v < 0.6) else "black"
      ax.text(
          g, a, txt, ha="center", va="center", fontsize=fontsize, color=color
      )
    # owner cell outline: group a belongs to agent a
    ax.add_patch(
        mpatches.Rectangle(
            (a - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5
        )
    )
  ax.set_xticks(range(k))
  ax.set_yticks(range(k))
  ax.set_xlabel("class group")
  ax.set_ylabel("agent")
  ax.set_title(title)
  return im


def _mean_and_error(
    summaries: Sequence[Mapping | None],
) -> tuple[np.ndarray, np.ndarray | None]:
  """[n] means (NaN without a value) and CI half-widths (0 without a spread; None
  when no value has one, so that no zero-length bars are drawn)."""
  means = np.array([report.stat(s, "mean") for s in summaries])
  halves = np.array([report.stat(s, "half_width") for s in summaries])
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
      # One line of up to four entries, else two lines (six with the joint row).
      ncol=len(series) if len(series) <= 4 else -(-len(series) // 2),
      fontsize=9,
      frameon=False,
  )


def _directionality_text(entry: Mapping, single: bool) -> str:
  if single:
    return f"directionality {schema.yes_no(entry['holds'])}"
  return f"directionality {entry['holds']}/{entry['of']}"


def _has_curves(curves: Mapping | None) -> bool:
  """Whether some stage was evaluated during training (more than its end)."""
  return bool(curves) and any(len(points) > 1 for points in curves.values())


def _draw_curves(
    fig, grid_row, curves: Mapping[str, Sequence[Mapping]]
) -> None:
  """(d): one panel per stage, each summary number against the epoch (members' mean, range)."""
  from matplotlib.ticker import MaxNLocator

  stages = [name for name, points in curves.items() if points]
  cells = grid_row.subgridspec(1, len(stages))
  first = None
  for i, stage in enumerate(stages):
    ax = fig.add_subplot(cells[0, i], sharey=first)
    first = first or ax
    points = sorted(curves[stage], key=lambda p: p["epoch"])
    epochs = [p["epoch"] for p in points]
    for figure in points[0]["members"][0]:
      values = np.array(
          [[m[figure] for m in p["members"]] for p in points], np.float64
      )  # [points, P]
      (line,) = ax.plot(
          epochs,
          values.mean(axis=1),
          marker="o",
          markersize=3,
          label=figure.replace("_", " "),
      )
      if values.shape[1] > 1:
        ax.fill_between(
            epochs,
            values.min(axis=1),
            values.max(axis=1),
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    ax.set_title(f"(d) {stage}" if i == 0 else stage, fontsize=10)
    ax.set_xlim(0, max(epochs) + 0.5)
    ax.xaxis.set_major_locator(
        MaxNLocator(nbins=4, integer=True, steps=[1, 2, 5, 10])
    )
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if i:
      ax.tick_params(labelleft=False)
  first.set_ylim(0.0, 1.02)
  first.set_ylabel("test accuracy")


def plot_report(
    results: Mapping, path: str, curves: Mapping | None = None
) -> None:
  """Writes report.png.

  (a) agents x class-groups accuracy heatmaps (before / after growth, else the
  first two rows that have them; the mean over members; shared 0..1 colour
  scale, owner cells outlined in red); (b) per-agent Expert and General (the
  same rows; after growth in solid colours; and the joint-training reference,
  ``schema.REFERENCE_ROWS``, in dotted greys); (c) every row's mean General and
  society accuracy (a reference row's: its accuracy over all classes). Bars
  carry their 95% interval over the members as error bars (none for one
  member). With ``curves`` (stage -> evaluations during
  and at the end of training, ``[{"epoch", "members": [{figure: value}]}]``,
  as ``config.eval_every_epochs`` records them) of more than the stages' ends:
  (d) each stage's summary numbers against the epoch, the members' mean (and
  their range, shaded).

  Raises:
    ValueError: for malformed results (``report.read``); nothing is written.
  """
  parsed = report.read(results)
  agg, k = parsed.aggregate, parsed.num_agents
  single = len(parsed.members) == 1
  rows = {name: agg["rows"][name] for name in schema.ordered_rows(agg["rows"])}
  groups = agg.get("group_accuracy") or {}
  society = agg.get("society_accuracy") or {}
  direction = agg.get("directionality") or {}
  heat_rows = [r for r in ("before_growth", "after_growth") if r in groups]
  heat_rows = heat_rows or schema.ordered_rows(groups)[:2]
  bar_rows = [r for r in ("before_growth", "after_growth") if r in rows]
  bar_rows = bar_rows or [r for r in rows if r not in schema.REFERENCE_ROWS][:2]
  reference_rows = [r for r in rows if r in schema.REFERENCE_ROWS]

  def draw(fig):
    import matplotlib

    who = (
        "one seed"
        if single
        else f"{report.members_text(len(parsed.members))}; "
        f"error bars: {report.CI_EXPLANATION}"
    )
    fig.suptitle(who)
    with_curves = _has_curves(curves)
    grid = fig.add_gridspec(
        4 if with_curves else 3,
        2,
        height_ratios=[1.15, 1.0, 0.9] + ([0.9] if with_curves else []),
    )
    cmap = matplotlib.colormaps["viridis"]
    fontsize = max(4.0, min(10.0, 64.0 / k))

    # (a) heatmaps
    if heat_rows:
      axes = [fig.add_subplot(grid[0, i]) for i in range(len(heat_rows))]
      im = None
      for ax, name in zip(axes, heat_rows):
        title = f"(a) {schema.row_title(name)}: accuracy"
        extra = []
        if direction.get(name, {}).get("of"):
          extra.append(_directionality_text(direction[name], single))
        if name in society:
          extra.append(f"society {schema.pct(society[name]['mean'])}%")
        if extra:
          title += "\n" + ", ".join(extra)
        mat = np.array(
            [
                [report.stat(cell, "mean") for cell in line]
                for line in groups[name]
            ]
        )
        im = _heatmap(ax, mat, title, cmap, fontsize)
      fig.colorbar(im, ax=axes, shrink=0.9, label="accuracy")
    else:
      ax = fig.add_subplot(grid[0, :])
      ax.axis("off")
      ax.text(
          0.5, 0.5, "no per-group accuracy in results", ha="center", va="center"
      )

    # (b) per-agent bars
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
                _PALETTE[m][1 if strong else 0],
                None if strong else "//",
            )
        )
    for name in reference_rows:
      for m in ("expert", "general"):
        series.append(
            (
                f"{m.capitalize()} - {schema.row_title(name)}",
                rows[name][m]["per_agent"],
                _REFERENCE_PALETTE[m],
                "..",
            )
        )
    ax_agents = fig.add_subplot(grid[1, :])
    _error_bars(ax_agents, [f"agent {a}" for a in range(k)], series)
    ax_agents.set_title(
        "(b) per-agent Expert (own classes) and General (other agents' classes)"
    )

    # (c) per-row bars
    labels = [
        # Wrapped: five rows' titles side by side would overlap.
        textwrap.fill(schema.row_title(r), 24)
        + (
            "\n" + _directionality_text(direction[r], single)
            if direction.get(r, {}).get("of")
            else ""
        )
        for r in rows
    ]
    ax_rows = fig.add_subplot(grid[2, :])
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
                "society accuracy"
                + (
                    f" ({', '.join(map(schema.row_title, reference_rows))}:"
                    " its accuracy over all classes)"
                    if reference_rows
                    else ""
                ),
                [society.get(r) for r in rows],
                "#41ab5d",
                None,
            ),
        ],
    )
    ax_rows.set_title(
        "(c) per row: mean General over agents and society accuracy"
    )
    if with_curves:
      _draw_curves(fig, grid[3, :], curves)

  figsize = (
      REPORT_WITH_CURVES_FIGSIZE if _has_curves(curves) else REPORT_FIGSIZE
  )
  paths.write_atomic(path, _render_png(figsize, draw))


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
  labels = [str(v) for v in report.unique(values)]
  return [float(labels.index(str(v))) for v in values], labels, False


def plot_sweep(results: Mapping, path: str) -> None:
  """Writes sweep.png: the headline row's (after growth, see
  ``stats.headline_row``) mean General, mean Average and society accuracy
  of every setting against the first swept field, with 95% CI error bars; with
  more fields, one line per combination of the others.

  Raises:
    ValueError: without a sweep, or for malformed results.
  """
  sweep = report.read(results).sweep
  if not sweep or not sweep.get("swept") or not sweep.get("groups"):
    raise ValueError("plot_sweep: the results have no sweep")
  fields, groups = list(sweep["swept"]), sweep["groups"]
  x_field, others = fields[0], fields[1:]
  row = stats.headline_row(stats.union(g["rows"] for g in groups))
  lines: dict[tuple, list[dict]] = {}
  for g in groups:
    lines.setdefault(
        tuple(report.setting_value(g["settings"].get(f)) for f in others), []
    ).append(g)
  positions, ticks, log_x = _x_positions(
      [g["settings"].get(x_field) for g in groups]
  )
  where = {id(g): x for g, x in zip(groups, positions)}
  metrics = ("mean_general", "mean_average", "society_accuracy")

  def draw(fig):
    fig.suptitle(
        f"Sweep, {schema.row_title(row)}; error bars: {report.CI_EXPLANATION}"
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
      ax.set_title(report.HEADLINE_TITLES[metric])
      ax.grid(alpha=0.3)
      if others:
        ax.legend(fontsize=8)

  paths.write_atomic(path, _render_png(SWEEP_FIGSIZE, draw))
