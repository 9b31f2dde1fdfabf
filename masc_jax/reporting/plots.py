"""report.png: the picture of a run's results.

:func:`plot_report` draws (a) agents x class-groups accuracy heatmaps (before /
after growth) and (b) grouped Expert / General bars per agent, from the results
dict whose schema ``masc_jax.reporting.report`` owns (and validates: this module reuses
its helpers). The image is ``REPORT_FIGSIZE`` * ``REPORT_DPI`` pixels.

matplotlib is imported lazily inside :func:`plot_report`.
"""

from __future__ import annotations

import io
import sys

import numpy as np

from masc_jax import paths
from masc_jax.reporting import schema

__all__ = ["REPORT_FIGSIZE", "REPORT_DPI", "plot_report"]

# report.png is REPORT_FIGSIZE * REPORT_DPI pixels (no tight bbox cropping).
REPORT_FIGSIZE = (12.0, 9.0)
REPORT_DPI = 100


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


def plot_report(results: dict, path: str) -> None:
  """Writes report.png: (a) agents x class-groups accuracy heatmaps (before / after
  growth, shared 0..1 colour scale, owner cells outlined in red); (b) grouped bars of
  per-agent Expert and General (after growth, and before growth if present).

  Rows that are absent are skipped: when neither before nor after growth is there,
  the first available rows are shown instead.
  """
  k, rows, groups = schema.validate(results)

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
    heat_rows = schema.ordered_rows(groups)[:2]
  bar_rows = [r for r in ("before_growth", "after_growth") if r in rows]
  if not bar_rows:
    bar_rows = schema.ordered_rows(rows)[:2]

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
        title = f"(a) {schema.row_title(name)}: accuracy"
        extra = []
        if name in direction:
          extra.append(f"directionality {schema.yes_no(direction[name])}")
        if name in society:
          extra.append(f"society {schema.pct(society[name])}%")
        if extra:
          title += "\n" + ", ".join(extra)
        im = _heatmap(ax, groups[name], title, cmap, fontsize)
      fig.colorbar(im, ax=axes, shrink=0.9, label="accuracy")
    else:
      ax = fig.add_subplot(gs[0, :])
      ax.axis("off")
      ax.text(
          0.5, 0.5, "no per-group accuracy in results", ha="center", va="center"
      )

    # (b) grouped bars
    ax = fig.add_subplot(gs[1, :])
    series = []
    palette = {
        "expert": ("#9ecae1", "#2171b5"),
        "general": ("#fdae6b", "#d94801"),
    }
    for i, name in enumerate(bar_rows):
      strong = (
          i == len(bar_rows) - 1
      )  # the last (after growth) in solid colours
      for col in ("expert", "general"):
        series.append(
            (
                f"{col.capitalize()} - {schema.row_title(name)}",
                rows[name][col],
                palette[col][1 if strong else 0],
                None if strong else "//",
            )
        )
    n = len(series)
    width = 0.8 / max(n, 1)
    x = np.arange(k)
    for j, (label, vals, color, hatch) in enumerate(series):
      heights = np.where(np.isfinite(vals), vals, 0.0)
      ax.bar(
          x - 0.4 + width * (j + 0.5),
          heights,
          width,
          label=label,
          color=color,
          hatch=hatch,
          edgecolor="black",
          linewidth=0.5,
      )
    ax.set_xticks(x)
    ax.set_xticklabels([f"agent {a}" for a in range(k)])
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(
        "(b) per-agent Expert (own classes) and General (other agents' classes)"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08),
        ncol=max(1, n),
        fontsize=9,
        frameon=False,
    )

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=REPORT_DPI)
  finally:
    fig.clear()
    try:  # the Figure was never registered with pyplot; close defensively if it was
      if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    except Exception:
      pass
  paths.write_atomic(path, buf.getvalue())
