"""Routing diagnostics: how each grown agent splits its answers between its own head and S.

A grown agent G_k answers every test image with one of two heads: its own head
h_k (trained on agent k's classes only) or the collective network S's head
(trained on all classes), whichever has the lower free energy
(``masc_jax.method.routing``). Its General accuracy (on the other agents' classes)
therefore depends on two things: how often the routing hands foreign images to
S, and how good each head is on the images it is handed. A small shift of
energies (float rounding on another machine, say) can move many images across
the routing boundary; these diagnostics make such a move visible.

:func:`diagnose` computes, per agent k, over the images of its *own* classes
(``groups[k]``) and of *foreign* classes (all other labels):

* the routing shares: how often k's own head answers a foreign image (it
  should rarely: the head never saw those classes), how often S answers an
  own image;
* each head's accuracy on own / foreign images (whoever the routing picked);
* each head's mean free energy on own / foreign images, and the histograms of
  those energies on one set of bin edges per row.

``masc_jax.reporting.report`` renders them (over a run's members) as the
"Routing diagnostics" section of results.md; :func:`plot_energy_histograms`
draws routing.png.

Schema of one row (the output of :func:`diagnose`; JSON-able, ``nan`` where a
subset is empty, written as ``null`` in results.json)::

    {"head_answers_foreign": [K], "collective_answers_own": [K],
     "head_accuracy_own": [K], "head_accuracy_foreign": [K],
     "collective_accuracy_own": [K], "collective_accuracy_foreign": [K],
     "energy_mean": {"head_own": [K], "head_foreign": [K],
                     "collective_own": [K], "collective_foreign": [K]},
     "energy_histogram": {"edges": [B + 1],
                          "head_own": [K][B], "head_foreign": [K][B],
                          "collective_own": [K][B], "collective_foreign": [K][B]}}

numpy only: no jax import (matplotlib is imported lazily by the plot).
"""

from __future__ import annotations

import io
import sys
from typing import Any, Mapping

import numpy as np

from masc_jax import paths
from masc_jax.reporting import schema

__all__ = [
    "SHARE_KEYS",
    "ENERGY_KEYS",
    "diagnose",
    "DIAGNOSTIC_COLUMNS",
    "validate",
    "plot_energy_histograms",
]

# The six per-agent fractions, in table order.
SHARE_KEYS = (
    "head_answers_foreign",
    "collective_answers_own",
    "head_accuracy_own",
    "head_accuracy_foreign",
    "collective_accuracy_own",
    "collective_accuracy_foreign",
)
# The four (head, subset) energy series, in table / legend order.
ENERGY_KEYS = (
    "head_own",
    "head_foreign",
    "collective_own",
    "collective_foreign",
)

# Each quantity's column header and the one-line explanation that results.md prints.
DIAGNOSTIC_COLUMNS = {
    "head_answers_foreign": (
        "head answers foreign %",
        "share of the other agents' class images that the agent answers with "
        "its own head instead of S (should be small: the head never saw them)",
    ),
    "collective_answers_own": (
        "S answers own %",
        "share of the agent's own class images that the routing hands to S",
    ),
    "head_accuracy_own": (
        "head acc own %",
        "accuracy of the agent's own head on its own classes, over all of "
        "them (not only those the routing gave it)",
    ),
    "head_accuracy_foreign": (
        "head acc foreign %",
        "accuracy of the agent's own head on the other agents' classes",
    ),
    "collective_accuracy_own": (
        "S acc own %",
        "accuracy of S on the agent's own classes",
    ),
    "collective_accuracy_foreign": (
        "S acc foreign %",
        "accuracy of S on the other agents' classes",
    ),
    "head_own": (
        "E head own",
        "mean free energy of the agent's own head on its own classes",
    ),
    "head_foreign": (
        "E head foreign",
        "mean free energy of the agent's own head on the other agents' classes",
    ),
    "collective_own": (
        "E S own",
        "mean free energy of S on the agent's own classes",
    ),
    "collective_foreign": (
        "E S foreign",
        "mean free energy of S on the other agents' classes",
    ),
}

# routing.png: hue = which head (blue: own, orange: S), dark solid = own
# classes, light dashed = foreign classes.
_STYLE = {
    "head_own": ("#08519c", "-", "own head, own classes"),
    "head_foreign": ("#6baed6", "--", "own head, foreign classes"),
    "collective_own": ("#a63603", "-", "S, own classes"),
    "collective_foreign": ("#fd8d3c", "--", "S, foreign classes"),
}
_PANEL_SIZE = (2.4, 2.0)  # inches per (row, agent) panel
ROUTING_DPI = 100


# ----------------------------------------------------------------------------
# Computing
# ----------------------------------------------------------------------------


def _fraction(mask: np.ndarray) -> float:
  """Mean of a bool vector; nan when it is empty."""
  return float(np.mean(mask)) if mask.size else float("nan")


def _finite(values: np.ndarray) -> np.ndarray:
  return values[np.isfinite(values)]


def _mean_finite(values: np.ndarray) -> float:
  """Mean over the finite entries; nan when there are none."""
  finite = _finite(values)
  return float(np.mean(finite)) if finite.size else float("nan")


def _histogram(values: np.ndarray, edges: np.ndarray) -> list[float]:
  """Fractions of the finite ``values`` per bin (sum 1); all nan when there are none.

  np.histogram's bins: [e_i, e_{i+1}) except the last, which includes its right edge.
  """
  finite = _finite(values)
  if finite.size == 0:
    return [float("nan")] * (edges.size - 1)
  counts, _ = np.histogram(finite, bins=edges)
  return [float(c) for c in counts / finite.size]


def _shared_edges(
    head_energy: np.ndarray, collective_energy: np.ndarray, num_bins: int
) -> np.ndarray:
  """``num_bins + 1`` equal-width edges spanning every finite energy of the row.

  One set of edges for all agents and both heads, so that every histogram of a
  row can be overlaid and compared bin by bin. Degenerate ranges follow
  np.histogram: no finite energy -> [0, 1]; one value v -> [v - 0.5, v + 0.5].
  """
  finite = np.concatenate(
      [_finite(head_energy.ravel()), _finite(collective_energy)]
  )
  if finite.size == 0:
    lo, hi = 0.0, 1.0
  else:
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:
      lo, hi = lo - 0.5, hi + 0.5
  return np.linspace(lo, hi, num_bins + 1)


def _as_groups(groups: Any, k: int) -> list[np.ndarray]:
  """``groups`` as K integer vectors (rows may differ in length), checked disjoint."""
  try:
    n_groups = len(groups)
  except TypeError:
    raise ValueError(
        f"groups must be a [K, M] list of class ids, got {type(groups).__name__}"
    ) from None
  if n_groups != k:
    raise ValueError(
        f"groups has {n_groups} class groups, expected K={k} (one per agent, "
        "the first axis of uses_head)"
    )
  out, seen = [], {}
  for a, g in enumerate(groups):
    arr = np.asarray(g)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
      raise ValueError(
          f"groups[{a}] must be a 1-D list of integer class ids, got shape "
          f"{arr.shape} dtype {arr.dtype}"
      )
    for c in arr.tolist():
      if c in seen and seen[c] != a:
        raise ValueError(
            f"class {c} is in groups[{seen[c]}] and groups[{a}]: "
            "agents own disjoint class groups"
        )
      seen[c] = a
    out.append(arr.astype(np.int64))
  return out


def _check_int(
    name: str, arr: np.ndarray, shape: tuple[int, ...], shape_text: str
) -> None:
  if arr.shape != shape:
    raise ValueError(
        f"{name} has shape {arr.shape}, expected {shape_text} = {shape}"
    )
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"{name} must hold integer class ids (an argmax), got dtype {arr.dtype}"
    )


def diagnose(
    uses_head: Any,
    head_pred: Any,
    collective_pred: Any,
    head_energy: Any,
    collective_energy: Any,
    labels: Any,
    groups: Any,
    num_bins: int = 24,
) -> dict:
  """Per-agent routing shares, accuracies and energy statistics of one results row.

  Args:
    uses_head: ``[K, N]`` bool; True where grown agent k answered image n with
      its own head rather than S's.
    head_pred: ``[K, N]`` int; the argmax of agent k's own head on image n.
    collective_pred: ``[N]`` int; the argmax of S on image n.
    head_energy: ``[K, N]`` float; the free energy of agent k's head on image n.
    collective_energy: ``[N]`` float; the free energy of S on image n.
    labels: ``[N]`` int; the true class ids.
    groups: ``[K, M]`` class ids owned by agent k (rows may differ in length).
      An image is *own* for agent k when its label is in ``groups[k]``,
      *foreign* otherwise.
    num_bins: bins of the energy histograms.

  Returns:
    The dict of the module docstring: lists of Python floats (``nan`` where a
    subset is empty). Accuracies and shares are fractions in [0, 1].
    Non-finite energies are left out of the means and the histograms, so each
    histogram's fractions sum to 1 over the subset's finite energies.

  Raises:
    ValueError: on shapes or dtypes that do not match the above.
  """
  if (
      isinstance(num_bins, bool)
      or not isinstance(num_bins, (int, np.integer))
      or num_bins < 1
  ):
    raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
  uses_head = np.asarray(uses_head)
  if uses_head.ndim != 2:
    raise ValueError(
        f"uses_head must be [K, N] (agents x images), got shape {uses_head.shape}"
    )
  k, n = uses_head.shape
  if uses_head.dtype != np.bool_:
    # 0/1 integers are accepted; anything else is most likely the wrong array.
    if (
        not np.issubdtype(uses_head.dtype, np.integer)
        or not np.isin(uses_head, (0, 1)).all()
    ):
      raise ValueError(
          f"uses_head must be bool (True: the agent's own head answered), "
          f"got dtype {uses_head.dtype}"
      )
    uses_head = uses_head.astype(bool)

  head_pred = np.asarray(head_pred)
  collective_pred = np.asarray(collective_pred)
  labels = np.asarray(labels)
  _check_int("head_pred", head_pred, (k, n), "[K, N]")
  _check_int("collective_pred", collective_pred, (n,), "[N]")
  _check_int("labels", labels, (n,), "[N]")
  head_energy = np.asarray(head_energy, dtype=np.float64)
  collective_energy = np.asarray(collective_energy, dtype=np.float64)
  if head_energy.shape != (k, n):
    raise ValueError(
        f"head_energy has shape {head_energy.shape}, expected [K, N] = {(k, n)}"
    )
  if collective_energy.shape != (n,):
    raise ValueError(
        f"collective_energy has shape {collective_energy.shape}, expected [N] = {(n,)}"
    )
  group_ids = _as_groups(groups, k)

  edges = _shared_edges(head_energy, collective_energy, int(num_bins))
  head_correct = head_pred == labels[None, :]  # [K, N]
  collective_correct = collective_pred == labels  # [N]

  out: dict[str, Any] = {key: [] for key in SHARE_KEYS}
  means: dict[str, list] = {key: [] for key in ENERGY_KEYS}
  hists: dict[str, list] = {key: [] for key in ENERGY_KEYS}
  for a in range(k):
    own = np.isin(labels, group_ids[a])  # [N]
    foreign = ~own
    out["head_answers_foreign"].append(_fraction(uses_head[a, foreign]))
    out["collective_answers_own"].append(_fraction(~uses_head[a, own]))
    out["head_accuracy_own"].append(_fraction(head_correct[a, own]))
    out["head_accuracy_foreign"].append(_fraction(head_correct[a, foreign]))
    out["collective_accuracy_own"].append(_fraction(collective_correct[own]))
    out["collective_accuracy_foreign"].append(
        _fraction(collective_correct[foreign])
    )
    subsets = {
        "head_own": head_energy[a, own],
        "head_foreign": head_energy[a, foreign],
        "collective_own": collective_energy[own],
        "collective_foreign": collective_energy[foreign],
    }
    for key, values in subsets.items():
      means[key].append(_mean_finite(values))
      hists[key].append(_histogram(values, edges))

  out["energy_mean"] = means
  out["energy_histogram"] = {"edges": [float(e) for e in edges], **hists}
  return out


# ----------------------------------------------------------------------------
# Validation (of diagnose's output, possibly read back from results.json)
# ----------------------------------------------------------------------------


def _floats(values: Any, where: str, shape: tuple[int, ...]) -> np.ndarray:
  """A nested list as a float array of ``shape``; None (JSON's null) -> nan."""

  def conv(v):
    if isinstance(v, (list, tuple, np.ndarray)):
      return [conv(x) for x in v]
    if v is None:
      return float("nan")
    try:
      return float(v)
    except (TypeError, ValueError):
      raise ValueError(
          f"routing_diagnostics: {where} holds {v!r}, expected numbers"
      ) from None

  converted = conv(values)
  try:
    arr = np.array(converted, dtype=np.float64)
  except ValueError:
    raise ValueError(
        f"routing_diagnostics: {where} is ragged, expected shape {shape}"
    ) from None
  if arr.shape != shape:
    raise ValueError(
        f"routing_diagnostics: {where} has shape {arr.shape}, expected {shape}"
    )
  return arr


def validate(
    diagnostics_by_row: Any, num_agents: int | None = None
) -> tuple[int, dict[str, dict]]:
  """Checks ``{row: diagnose(...) output}``; returns (K, the rows as float arrays).

  ``energy_histogram`` is optional here (only the plot needs it); when present
  it is checked in full. ``num_agents`` (the results' K) is enforced when given,
  otherwise K is read from the first row.

  Raises:
    ValueError: naming the row and the entry that does not fit.
  """
  if not isinstance(diagnostics_by_row, Mapping):
    raise ValueError(
        "routing_diagnostics must be a dict {row: diagnose(...) output}, got "
        f"{type(diagnostics_by_row).__name__}"
    )
  k = num_agents
  rows: dict[str, dict] = {}
  for name, row in diagnostics_by_row.items():
    if not isinstance(row, Mapping):
      raise ValueError(
          f"routing_diagnostics[{name!r}] must be a dict (the output of diagnose)"
      )
    if k is None:
      first = row.get("head_answers_foreign")
      if not isinstance(first, (list, tuple, np.ndarray)):
        raise ValueError(
            f"routing_diagnostics[{name!r}] has no 'head_answers_foreign' list"
        )
      k = len(first)
    out: dict[str, Any] = {}
    for key in SHARE_KEYS:
      if key not in row:
        raise ValueError(f"routing_diagnostics[{name!r}] has no {key!r} list")
      out[key] = _floats(row[key], f"[{name!r}][{key!r}]", (k,))
    energy_mean = row.get("energy_mean")
    if not isinstance(energy_mean, Mapping):
      raise ValueError(
          f"routing_diagnostics[{name!r}] has no 'energy_mean' dict"
      )
    out["energy_mean"] = {}
    for key in ENERGY_KEYS:
      if key not in energy_mean:
        raise ValueError(
            f"routing_diagnostics[{name!r}]['energy_mean'] has no {key!r} list"
        )
      out["energy_mean"][key] = _floats(
          energy_mean[key], f"[{name!r}]['energy_mean'][{key!r}]", (k,)
      )
    hist = row.get("energy_histogram")
    out["energy_histogram"] = None
    if hist is not None:
      if not isinstance(hist, Mapping) or "edges" not in hist:
        raise ValueError(
            f"routing_diagnostics[{name!r}]['energy_histogram'] must be a dict "
            "with 'edges'"
        )
      try:
        num_edges = len(hist["edges"])
      except TypeError:
        raise ValueError(
            f"routing_diagnostics[{name!r}]['energy_histogram']['edges'] "
            "must be a list"
        ) from None
      if num_edges < 2:
        raise ValueError(
            f"routing_diagnostics[{name!r}]['energy_histogram']['edges'] has "
            f"{num_edges} entries, expected num_bins + 1 >= 2"
        )
      checked = {
          "edges": _floats(
              hist["edges"],
              f"[{name!r}]['energy_histogram']['edges']",
              (num_edges,),
          )
      }
      for key in ENERGY_KEYS:
        if key not in hist:
          raise ValueError(
              f"routing_diagnostics[{name!r}]['energy_histogram'] has no {key!r}"
          )
        checked[key] = _floats(
            hist[key],
            f"[{name!r}]['energy_histogram'][{key!r}]",
            (k, num_edges - 1),
        )
      out["energy_histogram"] = checked
    rows[str(name)] = out
  return (0 if k is None else int(k)), rows


# ----------------------------------------------------------------------------
# routing.png
# ----------------------------------------------------------------------------


def plot_energy_histograms(
    diagnostics_by_row: dict, path: str, title: str = ""
) -> None:
  """Writes routing.png: one panel per (row, agent), rows of the report down, agents across.

  Each panel overlays four step histograms on the row's shared energy bins:
  the agent's own head on its own / foreign classes (blue, solid / dashed)
  and S on the same two subsets (orange); the legend sits below. Its title gives the two routing
  shares. Panels of one row share both axes; the figure grows with K and the
  number of rows (``_PANEL_SIZE`` inches per panel) so K = 10 stays legible.
  Written through ``masc_jax.paths`` (local or gs://).

  Raises:
    ValueError: on malformed diagnostics, an empty dict, or a row without
      ``energy_histogram``.
  """

  def _percent(v: float) -> str:  # "12.50%", or "-" for an empty subset
    text = schema.pct(v)
    return text if text == "-" else text + "%"

  k, rows = validate(diagnostics_by_row)
  if not rows or k == 0:
    raise ValueError(
        "routing_diagnostics has no rows (or no agents): nothing to plot"
    )
  for name, row in rows.items():
    if row["energy_histogram"] is None:
      raise ValueError(
          f"routing_diagnostics[{name!r}] has no 'energy_histogram' to plot"
      )
  order = schema.ordered_rows(rows)

  import matplotlib

  if "matplotlib.pyplot" not in sys.modules:
    # As in plots.plot_report: don't switch a backend pyplot already chose.
    matplotlib.use("Agg")
  from matplotlib.figure import Figure
  from matplotlib.lines import Line2D
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  n_rows = len(order)
  figsize = (max(6.0, 0.8 + _PANEL_SIZE[0] * k), 0.9 + _PANEL_SIZE[1] * n_rows)
  fig = Figure(figsize=figsize, dpi=ROUTING_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  try:
    axes = fig.subplots(n_rows, k, squeeze=False)
    for r, name in enumerate(order):
      hist = rows[name]["energy_histogram"]
      edges = hist["edges"]
      for a in range(k):
        ax = axes[r, a]
        if a > 0:  # one scale per row: the row's edges are shared by its agents
          ax.sharex(axes[r, 0])
          ax.sharey(axes[r, 0])
        for key in ENERGY_KEYS:
          fractions = hist[key][a]
          if not np.isfinite(fractions).any():
            continue  # an empty subset: nothing to draw
          color, style, label = _STYLE[key]
          ax.stairs(
              np.nan_to_num(fractions),
              edges,
              color=color,
              linestyle=style,
              linewidth=1.3,
              label=label,
          )
        share_head = _percent(rows[name]["head_answers_foreign"][a])
        share_s = _percent(rows[name]["collective_answers_own"][a])
        ax.set_title(
            f"agent {a}\nhead on foreign {share_head}, S on own {share_s}",
            fontsize=7,
        )
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if a == 0:
          ax.set_ylabel(
              f"{schema.row_title(name)}\nfraction of images", fontsize=8
          )
        else:
          ax.tick_params(labelleft=False)
        if r == n_rows - 1:
          ax.set_xlabel("free energy (lower = more confident)", fontsize=7)
    handles = [
        Line2D([], [], color=c, linestyle=s, linewidth=1.3)
        for c, s, _ in _STYLE.values()
    ]
    fig.legend(
        handles,
        [label for _, _, label in _STYLE.values()],
        loc="outside lower center",
        ncol=4 if figsize[0] >= 9.0 else 2,  # one line only where it fits
        fontsize=8,
        frameon=False,
    )
    if title:
      fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=ROUTING_DPI)
  finally:
    fig.clear()
    try:  # never registered with pyplot; close defensively if it was
      if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    except Exception:
      pass
  paths.write_atomic(path, buf.getvalue())
