"""The results schema: row names and order, validation, and how values print.

A run's results are a plain, JSON-able dict (documented in
``masc_jax.reporting.report``). This module holds what every reader of that
dict shares: the rows' titles and order, ``validate`` (the schema check that
returns the per-agent rows as arrays), and the small formatters of the
Markdown tables. ``routing_diagnostics.validate`` checks the optional
``routing_diagnostics`` entry. NumPy only.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

ROW_TITLES = {
    "before_growth": "before growth",
    "after_growth": "after growth (CC+RA)",
    "cc_only": "CC only",
    "ra_only": "RA only",
    "joint": "Joint training (CE-only collective)",
}
ROW_ORDER = ("before_growth", "after_growth", "cc_only", "ra_only", "joint")
# Rows of one network answering for every agent, as a reference for the
# society rather than a state of it: the CE-only collective, trained on every
# agent's data at once (the upper bound of class-incremental learning). Per
# agent group: Expert is its accuracy on that agent's classes, General on the
# other agents' classes; its "society accuracy" is its own accuracy over all
# classes. Every agent would be the same network, so such a row has no
# directionality and no per-group matrix (its Expert column is that), and a
# population is never judged on it (``stats.headline_row``).
REFERENCE_ROWS = ("joint",)
# What a reference row's table means, printed under its title in results.md.
ROW_NOTES = {
    "joint": (
        "One network trained with cross-entropy alone on all agents' data at "
        "once (the ablations' CE-only collective): the usual upper bound of "
        "class-incremental learning, not an agent of the society. Agent a's "
        "line: its accuracy on agent a's classes (Expert) and on the other "
        "agents' classes (General)."
    ),
}

COLLECTIVE_TITLES = {
    "cc": "collective network trained with the CC terms",
    "ce": "collective network trained with CE only",
}

# The timings table's order for results written before they recorded
# "stages" (results.json sorts its keys, so the run's order is lost there):
# the stage order of masc_jax.training.train at that time.
LEGACY_STAGE_ORDER = (
    "experts",
    "collective",
    "altruism",
    "collective_ce",
    "altruism_ce",
)


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------


def as_float(v: Any) -> float:
  """A number (or None) as a float; None -> nan."""
  if v is None:
    return float("nan")
  try:
    return float(v)
  except (TypeError, ValueError):
    raise ValueError(f"reporting: expected a number, got {v!r}") from None


def num_agents(results: Mapping) -> int:
  if "num_agents" in results:
    k = results["num_agents"]
  elif "class_groups" in results:
    k = len(results["class_groups"])
  else:
    first = next(iter(results["rows"].values()))
    if not isinstance(first, Mapping) or "expert" not in first:
      raise ValueError(
          "results has no 'num_agents' and its first row has no 'expert' list"
      )
    k = len(first["expert"])
  try:
    k_int = int(k)
  except (TypeError, ValueError):
    raise ValueError(
        f"results['num_agents'] must be an integer, got {k!r}"
    ) from None
  if k_int <= 0 or k_int != k:
    raise ValueError(
        f"results['num_agents'] must be a positive integer, got {k!r}"
    )
  return k_int


def ordered_rows(names: Iterable[str]) -> list[str]:
  names = list(names)
  known = [r for r in ROW_ORDER if r in names]
  return known + sorted(r for r in names if r not in ROW_ORDER)


def row_title(name: str) -> str:
  return ROW_TITLES.get(name, name.replace("_", " "))


def validate(
    results: Any,
) -> tuple[int, dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """Checks the schema; returns (K, rows as float arrays, group accuracy matrices)."""
  if not isinstance(results, Mapping):
    raise ValueError(f"results must be a dict, got {type(results).__name__}")
  if "rows" not in results or results["rows"] is None:
    raise ValueError("results has no 'rows' entry: nothing to report")
  rows_in = results["rows"]
  if not isinstance(rows_in, Mapping):
    raise ValueError(
        f"results['rows'] must be a dict of rows, got {type(rows_in).__name__}"
    )
  if not rows_in:
    raise ValueError("results['rows'] is empty: nothing to report")
  k = num_agents(results)
  if "class_groups" in results and results["class_groups"] is not None:
    if len(results["class_groups"]) != k:
      raise ValueError(
          f"results['class_groups'] has {len(results['class_groups'])} groups, expected K={k}"
      )

  rows: dict[str, dict[str, np.ndarray]] = {}
  for name, row in rows_in.items():
    if not isinstance(row, Mapping):
      raise ValueError(
          f"row {name!r} must be a dict with 'expert'/'general'/'average'"
      )
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
        raise ValueError(
            f"row {name!r}: {col!r} must be a list of {k} numbers"
        ) from None
      if n != k:
        raise ValueError(
            f"row {name!r}: {col!r} has {n} entries, expected K={k} (one per agent)"
        )
      out[col] = np.array([as_float(v) for v in vals], dtype=np.float64)
    rows[str(name)] = out

  groups: dict[str, np.ndarray] = {}
  for name, mat in (results.get("group_accuracy") or {}).items():
    try:
      arr = np.array(
          [[as_float(v) for v in line] for line in mat], dtype=np.float64
      )
    except TypeError:
      raise ValueError(
          f"group_accuracy[{name!r}] must be a {k} x {k} nested list"
      ) from None
    if arr.shape != (k, k):
      raise ValueError(
          f"group_accuracy[{name!r}] has shape {arr.shape}, expected ({k}, {k}) [agent][class group]"
      )
    groups[str(name)] = arr

  return k, rows, groups


# ----------------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------------


def pct(v: Any) -> str:
  f = as_float(v)
  return "-" if not math.isfinite(f) else f"{100.0 * f:.2f}"


def mean(a: np.ndarray) -> float:
  finite = a[np.isfinite(a)]
  if finite.size == a.size:
    return float(np.mean(a))
  return float(np.mean(finite)) if finite.size else float("nan")


def yes_no(v: Any) -> str:
  if v is None:
    return "-"
  return "yes" if bool(v) else "no"


def id_ranges(ids: Iterable[Any]) -> str:
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


def routing_rule_text(rule: Any, margin: Any) -> str:
  """'energy', or 'margin_energy (margin 0.5)' when a non-zero margin is given."""
  text = str(rule)
  if margin is not None:
    m = as_float(margin)
    if m != 0.0:
      text += f" (margin {m:g})"
  return text


def ordered_timings(timings: Mapping, stages: Any) -> list[tuple[str, Any]]:
  """Timings in the run's stage order (``results["stages"]``), else the legacy
  order; stages missing from that order come last, by name.

  Stage order, not dict order: results.json sorts its keys.
  """
  known = LEGACY_STAGE_ORDER if stages is None else [str(s) for s in stages]
  order: dict[str, int] = {}
  for name in known:
    order.setdefault(name, len(order))
  return sorted(
      timings.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])
  )


def class_groups_lines(k: int, class_groups: Any) -> list[str]:
  """The report's header: K, each agent's classes (when known), what the accuracies mean."""
  if class_groups is not None and len(class_groups) > 0:
    sizes = sorted({len(g) for g in class_groups})
    out = [f"K = {k} agents, {'/'.join(map(str, sizes))} classes each.", ""]
    out.extend(
        f"- Agent {a}: classes {id_ranges(g)}"
        for a, g in enumerate(class_groups)
    )
  else:
    out = [f"K = {k} agents."]
  return out + [
      "",
      "Accuracies in %. Expert: on the agent's own classes; General: on all other "
      "agents' classes; Average = (Expert + General) / 2.",
      "",
  ]
