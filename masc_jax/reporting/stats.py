"""Statistics over a population of runs: Student-t intervals, the aggregate of the
members' results tables and the summary of a settings sweep.

A population is P societies trained together (seeds crossed with an optional grid
of numeric settings). Each member gives one ordinary results dict (the schema of
``masc_jax.reporting.report``), possibly with a ``"routing_diagnostics"`` entry. This module
turns the P dicts into summaries; ``masc_jax.reporting.report`` renders them.

A *summary* (:func:`summarize`) of the values one cell takes over the members::

    {"mean": float, "std": float (ddof=1), "n": int,
     "ci95": [lo, hi], "half_width": float}

with ``ci95 = mean -/+ half_width``, ``half_width = t_{0.975, n-1} * std / sqrt(n)``:
the two-sided 95% Student-t confidence interval of the mean. Non-finite values
(and None, which is how results.json stores NaN) are left out and ``n`` counts the
rest; with n == 1 the spread is unknown (std, ci95 and half_width are NaN), with
n == 0 everything is NaN.

NumPy and SciPy (the Student-t quantile, ``scipy.stats.t.ppf``): no jax import.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import scipy.stats

from masc_jax.reporting import schema

__all__ = [
    "METRICS",
    "HEADLINE_KEYS",
    "summarize",
    "member_headline",
    "headline_row",
    "union",
    "aggregate",
    "sweep_summary",
]

# The per-agent columns of a results row.
METRICS = ("expert", "general", "average")
# One member's headline numbers for one row (see member_headline).
HEADLINE_KEYS = (
    "mean_expert",
    "mean_general",
    "mean_average",
    "society_accuracy",
)
# routing_diagnostics entries that are not per-agent numbers to average.
_SKIPPED_DIAGNOSTICS = frozenset({"energy_histogram"})


@functools.lru_cache(maxsize=256)
def _t975(dof: int) -> float:
  """The 0.975 quantile of Student's t with ``dof`` degrees of freedom.

  Cached: ``aggregate`` asks for the same few dofs (members - 1) for thousands
  of cells.
  """
  return float(scipy.stats.t.ppf(0.975, dof))


# ----------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------


def _as_array(values: Any) -> np.ndarray:
  """Numbers (possibly nested lists, None for NaN) as a float64 array."""
  if isinstance(values, np.ndarray):
    return values.astype(np.float64)
  if values is None or isinstance(values, numbers.Number):
    return np.array(schema.as_float(values))
  return np.array([_as_array(v) for v in values], dtype=np.float64)


def summarize(values: Iterable[Any]) -> dict[str, Any]:
  """Mean, sample std and 95% Student-t interval of the finite values.

  Args:
    values: numbers (None and non-finite ones are dropped), e.g. one cell's value
      in each member.

  Returns:
    ``{"mean", "std", "n", "ci95": [lo, hi], "half_width"}`` of plain floats (``n``
    an int): see the module docstring for the n < 2 cases.
  """
  arr = _as_array(list(values)).ravel()
  arr = arr[np.isfinite(arr)]
  n = int(arr.size)
  nan = float("nan")
  mean = float(np.mean(arr)) if n else nan
  if n >= 2:
    std = float(np.std(arr, ddof=1))
    half_width = _t975(n - 1) * std / math.sqrt(n)
  else:
    std = half_width = nan
  return {
      "mean": mean,
      "std": std,
      "n": n,
      "ci95": [mean - half_width, mean + half_width],
      "half_width": half_width,
  }


def _per_cell(stack: np.ndarray) -> Any:
  """``[P, *shape]`` values over members -> nested lists ``shape`` of summaries
  (a bare summary when shape is ())."""
  if stack.ndim == 1:
    return summarize(stack)
  return [_per_cell(stack[:, i]) for i in range(stack.shape[1])]


def _stack(leaves: Sequence[Any], what: str) -> np.ndarray:
  arrays = [_as_array(v) for v in leaves]
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1:
    raise ValueError(f"{what}: members disagree on the shape: {sorted(shapes)}")
  return np.stack(arrays)


def union(keysets: Iterable[Iterable[str]]) -> list[str]:
  """The keys of several dicts, in order of first appearance."""
  seen: dict[str, None] = {}
  for keys in keysets:
    for key in keys:
      seen.setdefault(key, None)
  return list(seen)


def _scalars(dicts: Sequence[Mapping], names: Iterable[str]) -> dict[str, dict]:
  """{name: summary of d[name] over the dicts that have it}."""
  return {
      name: summarize([d[name] for d in dicts if name in d]) for name in names
  }


def _tree(trees: Sequence[Any], what: str) -> Any:
  """Several members' copies of one nested structure (dicts down to numbers or
  lists of numbers) -> the structure with every leaf replaced by summaries over
  members: a number by one summary, a [K] list by [K] summaries.

  A key missing in some members is summarized over those that have it; keys in
  ``_SKIPPED_DIAGNOSTICS`` are left out.
  """
  trees = [t for t in trees if t is not None]
  if trees and all(isinstance(t, Mapping) for t in trees):
    keys = union(trees)
    return {
        key: _tree([t[key] for t in trees if key in t], f"{what}[{key!r}]")
        for key in keys
        if key not in _SKIPPED_DIAGNOSTICS
    }
  if any(isinstance(t, Mapping) for t in trees):
    raise ValueError(f"{what}: some members have a dict here and some numbers")
  return _per_cell(_stack(trees, what))


# ----------------------------------------------------------------------------
# One member's headline numbers
# ----------------------------------------------------------------------------


def _headline(
    rows: Mapping[str, Mapping[str, np.ndarray]], society: Mapping
) -> dict[str, dict[str, float]]:
  return {
      name: {
          **{f"mean_{m}": schema.mean(row[m]) for m in METRICS},
          "society_accuracy": schema.as_float(society.get(name)),
      }
      for name, row in rows.items()
  }


def member_headline(result: Mapping) -> dict[str, dict[str, float]]:
  """One run's headline numbers: ``{row: {"mean_expert", "mean_general",
  "mean_average", "society_accuracy"}}``.

  The means are over agents (non-finite agents left out, as in results.md); the
  society accuracy is NaN when the run has none for the row.
  """
  _, rows, _ = schema.validate(result)
  return _headline(rows, result.get("society_accuracy") or {})


def headline_row(row_names: Iterable[str]) -> str | None:
  """The row a population is judged on: after growth when present, else the
  last row of ``reporting.ROW_ORDER`` present, else the last other row by name.

  Never a reference row (``schema.REFERENCE_ROWS``: one network, not the society).
  """
  names = [r for r in row_names if r not in schema.REFERENCE_ROWS]
  if "after_growth" in names:
    return "after_growth"
  known = [r for r in schema.ROW_ORDER if r in names]
  if known:
    return known[-1]
  return sorted(names)[-1] if names else None


# ----------------------------------------------------------------------------
# The population aggregate
# ----------------------------------------------------------------------------


def aggregate(member_results: Sequence[Mapping]) -> dict[str, Any]:
  """Every cell of every results table, summarized over the members.

  Args:
    member_results: P single-run results dicts (``reporting`` schema, optionally
      with ``"routing_diagnostics"``), all with the same number of agents K.

  Returns::

      {
        "n": P,
        "num_agents": K,
        "rows": {row: {metric: {"per_agent": [K summaries],
                                "mean": summary of each member's mean over agents}}},
                                            # metric in "expert", "general", "average"
        "group_accuracy": {row: [K][K] summaries},        # [agent][class group]
        "society_accuracy": {row: summary},
        "collective_accuracy": {name: summary},
        "directionality": {row: {"holds": int, "of": int}},
        "routing_diagnostics": {row: {field: [K summaries], ...,
                                      "energy_mean": {field: [K summaries]}}},
                                            # only when some member has it; no energy_histogram
      }

  A row, collective or diagnostic that only some members have is summarized over
  those (its summaries' ``n`` says how many); ``"of"`` counts the members that
  report the row's directionality.
  """
  members = list(member_results)
  if not members:
    raise ValueError("aggregate: no member results")
  parsed = [schema.validate(m) for m in members]
  ks = sorted({k for k, _, _ in parsed})
  if len(ks) != 1:
    raise ValueError(
        f"aggregate: members have different numbers of agents: {ks}"
    )
  all_rows = [rows for _, rows, _ in parsed]
  all_groups = [groups for _, _, groups in parsed]
  headlines = [
      _headline(rows, m.get("society_accuracy") or {})
      for rows, m in zip(all_rows, members)
  ]
  societies = [m.get("society_accuracy") or {} for m in members]
  collectives = [m.get("collective_accuracy") or {} for m in members]
  directions = [
      {
          r: v
          for r, v in (m.get("directionality") or {}).items()
          if v is not None
      }
      for m in members
  ]

  row_names = schema.ordered_rows(union(all_rows))
  out: dict[str, Any] = {"n": len(members), "num_agents": ks[0], "rows": {}}
  for name in row_names:
    have = [
        (rows[name], head[name])
        for rows, head in zip(all_rows, headlines)
        if name in rows
    ]
    out["rows"][name] = {
        m: {
            "per_agent": _per_cell(
                _stack([row[m] for row, _ in have], f"rows[{name!r}][{m!r}]")
            ),
            "mean": summarize([head[f"mean_{m}"] for _, head in have]),
        }
        for m in METRICS
    }
  out["group_accuracy"] = {
      name: _per_cell(
          _stack(
              [g[name] for g in all_groups if name in g],
              f"group_accuracy[{name!r}]",
          )
      )
      for name in schema.ordered_rows(union(all_groups))
  }
  out["society_accuracy"] = _scalars(
      societies, schema.ordered_rows(union(societies))
  )
  out["collective_accuracy"] = _scalars(collectives, union(collectives))
  out["directionality"] = {
      name: {
          "holds": sum(bool(d[name]) for d in directions if name in d),
          "of": sum(name in d for d in directions),
      }
      for name in schema.ordered_rows(union(directions))
  }
  diagnostics = [
      m["routing_diagnostics"] for m in members if m.get("routing_diagnostics")
  ]
  if diagnostics:
    out["routing_diagnostics"] = _tree(diagnostics, "routing_diagnostics")
  return out


# ----------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------


def _settings_key(settings: Mapping) -> tuple:
  """Hashable identity of a settings dict; 1 and 1.0 are the same setting."""

  def norm(v):
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
      return repr(float(v))
    return repr(v)

  return tuple(sorted((str(k), norm(v)) for k, v in settings.items()))


def _summarize_headlines(
    headlines: Sequence[Mapping],
) -> dict[str, dict[str, dict]]:
  """{row: {headline key: summary over the members that have the row}}."""
  return {
      name: {
          key: summarize([h[name][key] for h in headlines if name in h])
          for key in HEADLINE_KEYS
      }
      for name in schema.ordered_rows(union(headlines))
  }


def sweep_summary(
    population: Mapping, member_results: Sequence[Mapping]
) -> dict[str, Any]:
  """The members grouped by setting, with the headline numbers of each group.

  Args:
    population: ``{"members": [{"seed": int, "settings": {field: value}}] * P,
      "swept": [field, ...]}``, in the order of ``member_results``.
    member_results: the P members' results dicts.

  Returns::

      {
        "swept": [field, ...],
        "groups": [                       # one per distinct settings, in order of first appearance
          {"settings": {field: value}, "seeds": [seed, ...], "members": [member index, ...],
           "n": number of members,
           "rows": {row: {"mean_expert": summary, "mean_general": summary,
                          "mean_average": summary, "society_accuracy": summary}}},
          ...
        ],
        "best": {"group": index into groups, "settings", "seeds", "n",
                 "row": the row compared, "metric": "mean_average",
                 "summary": that group's summary of it}     # None when no group has a value
      }

  Each headline summary is over the group's members' means over agents (see
  :func:`member_headline`). "best" is the group with the highest mean of the mean
  Average on the row :func:`headline_row` picks (after growth when any group has
  it); the first such group wins a tie.
  """
  specs = list(population.get("members") or [])
  members = list(member_results)
  if len(specs) != len(members):
    raise ValueError(
        f"sweep_summary: population lists {len(specs)} members, "
        f"but {len(members)} results were given"
    )
  grouped: dict[tuple, dict[str, Any]] = {}
  for index, (spec, result) in enumerate(zip(specs, members)):
    settings = dict(spec.get("settings") or {})
    group = grouped.setdefault(
        _settings_key(settings),
        {"settings": settings, "seeds": [], "members": [], "headlines": []},
    )
    group["seeds"].append(spec.get("seed"))
    group["members"].append(index)
    group["headlines"].append(member_headline(result))
  groups = [
      {
          "settings": g["settings"],
          "seeds": g["seeds"],
          "members": g["members"],
          "n": len(g["members"]),
          "rows": _summarize_headlines(g["headlines"]),
      }
      for g in grouped.values()
  ]

  row = headline_row(union(g["rows"] for g in groups))
  best = None
  for index, g in enumerate(groups):
    summary = g["rows"].get(row, {}).get("mean_average")
    if summary is None or not math.isfinite(summary["mean"]):
      continue
    if best is None or summary["mean"] > best["summary"]["mean"]:
      best = {
          "group": index,
          "settings": g["settings"],
          "seeds": g["seeds"],
          "n": g["n"],
          "row": row,
          "metric": "mean_average",
          "summary": summary,
      }
  return {
      "swept": list(population.get("swept") or []),
      "groups": groups,
      "best": best,
  }
