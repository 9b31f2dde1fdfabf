"""Tests for masc_jax.reporting.stats: the Student-t intervals against hand-worked
quantiles and scipy, the aggregate against loops over the members, the sweep summary
on hand-made cases."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from masc_jax.reporting import stats as ps
from masc_jax.training.evaluation import results_from_predictions
from masc_jax.reporting.progress import to_jsonable

K, M, PER_CLASS = 3, 4, 15
NUM_CLASSES = K * M
ROWS = ("before_growth", "after_growth", "cc_only")
SHARES = (
    "head_answers_foreign",
    "collective_answers_own",
    "head_accuracy_own",
    "head_accuracy_foreign",
    "collective_accuracy_own",
    "collective_accuracy_foreign",
)
ENERGIES = ("head_own", "head_foreign", "collective_own", "collective_foreign")


def test_reporting_imports_no_jax():
  code = (
      "import sys, masc_jax.reporting.stats, masc_jax.reporting.report, "
      "masc_jax.reporting.plots; print('jax' in sys.modules)"
  )
  out = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- intervals


@pytest.mark.parametrize(
    "values, t_975",
    [
        # dof 1 is the Cauchy distribution: t = tan(pi (p - 1/2)).
        ([0.90, 0.94], math.tan(math.pi * 0.475)),
        # dof 2 has an algebraic quantile: (2p - 1) / sqrt(2 p (1 - p)).
        ([0.90, 0.92, 0.94], 0.95 / math.sqrt(2 * 0.975 * 0.025)),
        # dof 5, from a printed t table: 2.571.
        ([0.81, 0.84, 0.80, 0.86, 0.83, 0.82], 2.571),
    ],
)
def test_intervals_by_hand_with_the_t_table(values, t_975):
  """Half-widths from quantiles that do not come from the library's route."""
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  want = t_975 * std / math.sqrt(n)
  got = ps.summarize(values)
  # The table value has 4 digits; the closed forms are exact.
  assert got["half_width"] == pytest.approx(want, rel=2e-4 if n == 6 else 1e-12)
  assert got["ci95"] == pytest.approx([mean - want, mean + want], rel=1e-3)
  # [0.90, 0.92, 0.94]: sd 0.02, 4.3027 * 0.02 / sqrt(3) = 0.04968...
  if n == 3:
    assert round(got["half_width"], 5) == 0.04968


# ----------------------------------------------------------------------------- summarize


def expected_summary(values):
  """mean, std, n, ci95, half_width by numpy + scipy.stats.t.interval."""
  v = np.array(
      [x for x in values if x is not None and np.isfinite(x)], dtype=float
  )
  n = v.size
  if n == 0:
    return {
        "mean": np.nan,
        "std": np.nan,
        "n": 0,
        "ci95": [np.nan, np.nan],
        "half_width": np.nan,
    }
  mean = float(np.mean(v))
  if n == 1:
    return {
        "mean": mean,
        "std": np.nan,
        "n": 1,
        "ci95": [np.nan, np.nan],
        "half_width": np.nan,
    }
  std = float(np.std(v, ddof=1))
  lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=std / np.sqrt(n))
  if std == 0:
    lo = hi = mean
  return {
      "mean": mean,
      "std": std,
      "n": n,
      "ci95": [lo, hi],
      "half_width": (hi - lo) / 2,
  }


def assert_summary(got, values, what=""):
  want = expected_summary(values)
  assert set(got) == {"mean", "std", "n", "ci95", "half_width"}, what
  assert got["n"] == want["n"], what
  np.testing.assert_allclose(
      [got["mean"], got["std"], got["half_width"], *got["ci95"]],
      [want["mean"], want["std"], want["half_width"], *want["ci95"]],
      rtol=1e-9,
      atol=1e-12,
      equal_nan=True,
      err_msg=what,
  )


@pytest.mark.parametrize("n", [2, 3, 5, 10, 50])
def test_summarize_matches_scipy(n):
  x = np.random.default_rng(n).normal(0.7, 0.1, n)
  got = ps.summarize(x.tolist())
  lo, hi = stats.t.interval(0.95, n - 1, loc=np.mean(x), scale=stats.sem(x))
  assert got["n"] == n
  assert got["mean"] == pytest.approx(np.mean(x), rel=1e-12)
  assert got["std"] == pytest.approx(np.std(x, ddof=1), rel=1e-12)
  np.testing.assert_allclose(got["ci95"], [lo, hi], rtol=1e-10)
  assert got["half_width"] == pytest.approx((hi - lo) / 2, rel=1e-9)
  assert got["ci95"][0] == pytest.approx(
      got["mean"] - got["half_width"], rel=1e-12
  )


def test_summarize_drops_non_finite_values():
  got = ps.summarize(
      [0.5, math.nan, None, math.inf, 0.7, -math.inf, np.float32(0.625)]
  )
  assert_summary(got, [0.5, 0.7, 0.625])
  assert got["n"] == 3


def test_summarize_small_and_constant_samples():
  one = ps.summarize([0.25])
  assert one["mean"] == 0.25 and one["n"] == 1
  assert all(
      math.isnan(v) for v in (one["std"], one["half_width"], *one["ci95"])
  )
  for empty in ([], [math.nan, None]):
    zero = ps.summarize(empty)
    assert zero["n"] == 0
    assert all(
        math.isnan(v)
        for v in (zero["mean"], zero["std"], zero["half_width"], *zero["ci95"])
    )
  same = ps.summarize(
      [0.25, 0.25, 0.25]
  )  # exact in binary: the spread is exactly 0
  assert (
      same["std"] == 0.0
      and same["half_width"] == 0.0
      and same["ci95"] == [0.25, 0.25]
  )


def test_summarize_returns_plain_python_values():
  got = ps.summarize(np.array([1, 2, 4], dtype=np.int64))
  assert (
      type(got["mean"]) is float
      and type(got["n"]) is int
      and type(got["ci95"]) is list
  )
  assert json.loads(json.dumps(got)) == got


# ----------------------------------------------------------------------------- members


def make_member(
    seed, rows=ROWS, collectives=("cc", "ce"), diagnostics=True, direction=None
):
  """A member's results from random predictions through the real results code.

  direction: None (random), True (every agent perfect on its own group, so the
  after-growth row's directionality holds) or False (agent 0 always wrong on its
  group, agent 1 always right there: it fails).
  """
  rng = np.random.default_rng(seed)
  groups = rng.permutation(NUM_CLASSES).reshape(K, M)
  labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
  n = labels.size
  owner = np.empty(NUM_CLASSES, dtype=np.int64)
  for a in range(K):
    owner[groups[a]] = a
  own = owner[labels][None, :] == np.arange(K)[:, None]  # [K, N]

  def noisy(shape, acc):
    return np.where(
        rng.random(shape) < acc, labels, rng.integers(0, NUM_CLASSES, shape)
    )

  preds = {}
  for row in rows:
    pred = noisy((K, n), rng.uniform(0.3, 0.9, (K, 1)))
    if row == "after_growth" and direction is True:
      pred = np.where(own, labels, pred)
    elif row == "after_growth" and direction is False:
      pred[0, own[0]] = (labels[own[0]] + 1) % NUM_CLASSES
      pred[1, own[0]] = labels[own[0]]
    preds[row] = pred
    preds[f"society_{row}"] = noisy(n, rng.uniform(0.4, 0.9))
    if diagnostics and row != "before_growth":
      preds[f"routing/{row}/uses_head"] = rng.random((K, n)) < rng.uniform(
          0.2, 0.8
      )
      preds[f"routing/{row}/head_pred"] = noisy((K, n), 0.5)
      preds[f"routing/{row}/collective_pred"] = noisy(n, 0.6)
      preds[f"routing/{row}/head_energy"] = rng.normal(-3.0, 1.0, (K, n))
      preds[f"routing/{row}/collective_energy"] = rng.normal(-4.0, 1.0, n)
  for name in collectives:
    preds[name] = noisy(n, rng.uniform(0.5, 0.9))
  return results_from_predictions(preds, labels, groups, rows, collectives)


def test_aggregate_matches_loops_over_members():
  members = [make_member(s) for s in range(5)]
  members[0]["rows"]["after_growth"]["general"][
      1
  ] = math.nan  # one missing cell
  agg = ps.aggregate(members)
  assert agg["n"] == 5 and agg["num_agents"] == K
  assert list(agg["rows"]) == list(ROWS)
  for row in ROWS:
    for metric in ("expert", "general", "average"):
      cell = agg["rows"][row][metric]
      assert len(cell["per_agent"]) == K
      for a in range(K):
        assert_summary(
            cell["per_agent"][a],
            [m["rows"][row][metric][a] for m in members],
            f"{row} {metric} agent {a}",
        )
      # Each member's mean over its agents (the missing cell left out, as in results.md).
      assert_summary(
          cell["mean"],
          [np.nanmean(m["rows"][row][metric]) for m in members],
          f"{row} {metric} mean",
      )
    for a in range(K):
      for g in range(K):
        assert_summary(
            agg["group_accuracy"][row][a][g],
            [m["group_accuracy"][row][a][g] for m in members],
            f"{row} [{a}][{g}]",
        )
    assert_summary(
        agg["society_accuracy"][row],
        [m["society_accuracy"][row] for m in members],
    )
  assert agg["rows"]["after_growth"]["general"]["per_agent"][1]["n"] == 4
  for name in ("cc", "ce"):
    assert_summary(
        agg["collective_accuracy"][name],
        [m["collective_accuracy"][name] for m in members],
    )

  diag = agg["routing_diagnostics"]
  assert set(diag) == {"after_growth", "cc_only"}
  for row in diag:
    assert set(diag[row]) == set(SHARES) | {
        "energy_mean"
    }  # no energy_histogram
    assert set(diag[row]["energy_mean"]) == set(ENERGIES)
    for a in range(K):
      for field in SHARES:
        assert_summary(
            diag[row][field][a],
            [m["routing_diagnostics"][row][field][a] for m in members],
            field,
        )
      for field in ENERGIES:
        assert_summary(
            diag[row]["energy_mean"][field][a],
            [
                m["routing_diagnostics"][row]["energy_mean"][field][a]
                for m in members
            ],
            field,
        )
  # JSON-able as is (NaN aside), and strictly once converted.
  json.dumps(to_jsonable(agg), allow_nan=False)


def test_aggregate_counts_directionality():
  pattern = [True, False, True, True, False, True]
  members = [make_member(10 + i, direction=d) for i, d in enumerate(pattern)]
  # The construction does what it says (else the count below would prove nothing).
  assert [m["directionality"]["after_growth"] for m in members] == pattern
  agg = ps.aggregate(members)
  assert agg["directionality"]["after_growth"] == {"holds": 4, "of": 6}
  for row in ("before_growth", "cc_only"):
    assert agg["directionality"][row] == {
        "holds": sum(m["directionality"][row] for m in members),
        "of": 6,
    }


def test_aggregate_over_the_members_that_have_a_row():
  partial = [
      make_member(
          20 + i,
          rows=("before_growth", "after_growth"),
          collectives=("cc",),
          diagnostics=False,
      )
      for i in range(2)
  ]
  full = [make_member(30 + i) for i in range(4)]
  members = (
      partial + full
  )  # the first members lack cc_only, ce and the diagnostics
  agg = ps.aggregate(members)
  assert list(agg["rows"]) == list(ROWS)
  for a in range(K):
    assert_summary(
        agg["rows"]["cc_only"]["expert"]["per_agent"][a],
        [m["rows"]["cc_only"]["expert"][a] for m in full],
    )
    assert_summary(
        agg["rows"]["after_growth"]["expert"]["per_agent"][a],
        [m["rows"]["after_growth"]["expert"][a] for m in members],
    )
    assert_summary(
        agg["routing_diagnostics"]["after_growth"]["head_accuracy_own"][a],
        [
            m["routing_diagnostics"]["after_growth"]["head_accuracy_own"][a]
            for m in full
        ],
    )
  assert agg["rows"]["cc_only"]["general"]["mean"]["n"] == 4
  assert agg["society_accuracy"]["cc_only"]["n"] == 4
  assert agg["directionality"]["cc_only"]["of"] == 4
  assert agg["directionality"]["after_growth"]["of"] == 6
  assert (
      agg["collective_accuracy"]["cc"]["n"] == 6
      and agg["collective_accuracy"]["ce"]["n"] == 4
  )
  assert "routing_diagnostics" not in ps.aggregate(partial)


def test_aggregate_rejects_mixed_agent_counts_and_no_members():
  other = make_member(0)
  other["num_agents"] = 2
  other["class_groups"] = other["class_groups"][:2]
  for row in other["rows"].values():
    for col in row:
      row[col] = row[col][:2]
  other["group_accuracy"] = {
      r: [line[:2] for line in mat[:2]]
      for r, mat in other["group_accuracy"].items()
  }
  del other["routing_diagnostics"]
  with pytest.raises(ValueError, match="different numbers of agents"):
    ps.aggregate([make_member(1), other])
  with pytest.raises(ValueError):
    ps.aggregate([])


# ----------------------------------------------------------------------------- sweep


def hand_result(averages):
  """K = 2 results with the rows of ``averages``: every agent has Average averages[row]
  (Expert +0.05, General -0.05) and society accuracy averages[row] + 0.01."""
  out = {"num_agents": 2, "rows": {}, "society_accuracy": {}}
  for row in averages:
    x = averages[row]
    out["rows"][row] = {
        "expert": [x + 0.05] * 2,
        "general": [x - 0.05] * 2,
        "average": [x] * 2,
    }
    out["society_accuracy"][row] = x + 0.01
  return out


def test_sweep_groups_by_setting_and_picks_the_best_after_growth():
  # Interleaved seeds x settings; w = 1 (given once as an int) wins after growth,
  # w = 0.1 before growth and CC only: the wrong row would pick the wrong group.
  after = {0.1: [0.80, 0.82, 0.84], 1.0: [0.85, 0.86, 0.90]}
  before = {0.1: [0.70, 0.71, 0.72], 1.0: [0.50, 0.52, 0.54]}
  specs, members = [], []
  for seed in range(3):
    for w in (0.1, 1.0):
      given = 1 if (w == 1.0 and seed == 1) else w
      specs.append({"seed": seed, "settings": {"loss.align_weight": given}})
      members.append(
          hand_result(
              {
                  "before_growth": before[w][seed],
                  "after_growth": after[w][seed],
                  "cc_only": before[w][seed],
              }
          )
      )
  out = ps.sweep_summary(
      {"members": specs, "swept": ["loss.align_weight"]}, members
  )
  assert out["swept"] == ["loss.align_weight"]
  groups = out["groups"]
  assert [g["settings"] for g in groups] == [
      {"loss.align_weight": 0.1},
      {"loss.align_weight": 1.0},
  ]
  assert [g["seeds"] for g in groups] == [[0, 1, 2], [0, 1, 2]]
  assert [g["members"] for g in groups] == [[0, 2, 4], [1, 3, 5]]
  assert [g["n"] for g in groups] == [3, 3]
  for g, w in zip(groups, (0.1, 1.0)):
    assert list(g["rows"]) == ["before_growth", "after_growth", "cc_only"]
    assert_summary(g["rows"]["after_growth"]["mean_average"], after[w])
    assert_summary(
        g["rows"]["after_growth"]["mean_expert"], [v + 0.05 for v in after[w]]
    )
    assert_summary(
        g["rows"]["after_growth"]["mean_general"], [v - 0.05 for v in after[w]]
    )
    assert_summary(
        g["rows"]["after_growth"]["society_accuracy"],
        [v + 0.01 for v in after[w]],
    )
    assert_summary(g["rows"]["before_growth"]["mean_average"], before[w])
  best = out["best"]
  assert best["group"] == 1 and best["settings"] == {"loss.align_weight": 1.0}
  assert best["row"] == "after_growth" and best["metric"] == "mean_average"
  assert best["seeds"] == [0, 1, 2] and best["n"] == 3
  assert_summary(best["summary"], after[1.0])


def test_sweep_two_fields_keeps_first_appearance_order():
  combos = [(2, 1), (1, 1), (2, 3), (1, 3)]
  specs = [
      {"seed": s, "settings": {"a": a, "b": b}}
      for s in (5, 6)
      for a, b in combos
  ]
  members = [
      hand_result({"after_growth": 0.5 + 0.01 * i}) for i in range(len(specs))
  ]
  out = ps.sweep_summary({"members": specs, "swept": ["a", "b"]}, members)
  assert [
      (g["settings"]["a"], g["settings"]["b"]) for g in out["groups"]
  ] == combos
  assert all(g["seeds"] == [5, 6] for g in out["groups"])
  # The last combination's members have the largest values.
  assert out["best"]["group"] == 3


@pytest.mark.parametrize(
    "rows, judged",
    [
        (("before_growth", "cc_only"), "cc_only"),
        (("before_growth",), "before_growth"),
        # The joint-training reference is one network, never the society's row.
        (("before_growth", "cc_only", "joint"), "cc_only"),
    ],
)
def test_sweep_best_falls_back_to_the_last_row_present(rows, judged):
  # Group 0 is better on the judged row, group 1 on every other row.
  def values(group):
    return {
        r: (0.9 if group == 0 else 0.6)
        if r == judged
        else (0.3 if group == 0 else 0.95)
        for r in rows
    }

  specs = [
      {"seed": s, "settings": {"w": w}} for w in (1.0, 2.0) for s in (0, 1)
  ]
  members = [hand_result(values(i // 2)) for i in range(4)]
  out = ps.sweep_summary({"members": specs, "swept": ["w"]}, members)
  assert out["best"]["row"] == judged
  assert out["best"]["group"] == 0 and out["best"]["settings"] == {"w": 1.0}


def test_sweep_rejects_mismatched_lengths():
  with pytest.raises(ValueError):
    ps.sweep_summary(
        {"members": [{"seed": 0, "settings": {}}], "swept": []},
        [hand_result({"after_growth": 0.5})] * 2,
    )
