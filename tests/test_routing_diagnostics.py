"""Tests for masc_jax.reporting.routing_diagnostics (numpy + matplotlib only; fast).

A hand-worked case fixes every number; a random case is checked against a
per-image Python loop; histograms against np.histogram's own uniform-range
route; the report's section on a hand-worked case and against the report without
the key.
"""

import copy
import json
import math
import os

import numpy as np
import pytest

from masc_jax import paths
from masc_jax.reporting import routing_diagnostics
from masc_jax.reporting import schema
from masc_jax.reporting.report import results_markdown, write_results
from masc_jax.reporting.routing_diagnostics import (
    ENERGY_KEYS,
    SHARE_KEYS,
    diagnose,
    plot_energy_histograms,
)
from conftest import markdown_sections

NAN = float("nan")

# ----------------------------------------------------------------------------- hand-worked case
#
# K = 2 agents, groups: agent 0 owns classes {0, 1}, agent 1 owns {2, 3}. N = 6 images:
#
#   image              0    1    2    3    4    5
#   label              0    1    2    3    0    2
#   own for agent      0    0    1    1    0    1
#   S energy          -5   -4   -3  -10   -6   -8
#   head 0 energy     -8   -2   -6   -4  -10   -1
#   head 1 energy     -1   -3   -9   -7   -2   -5
#   uses_head[0]       T    F    T    F    T    F   (head 0 energy < S energy)
#   uses_head[1]       F    F    T    F    F    F   (head 1 energy < S energy)
#   head 0 pred        0    0    2    1    0    1
#   head 1 pred        2    3    2    3    3    2
#   S pred             0    1    3    3    1    3
#
# Agent 0: own images {0, 1, 4}, foreign {2, 3, 5}.  Agent 1: own {2, 3, 5}, foreign {0, 1, 4}.
#
# head_answers_foreign:   agent 0: uses on 2,3,5 = T,F,F -> 1/3;  agent 1: on 0,1,4 = F,F,F -> 0
# collective_answers_own: agent 0: not-uses on 0,1,4 = F,T,F -> 1/3;  agent 1: on 2,3,5 = F,T,T -> 2/3
# head_accuracy_own:      agent 0: preds 0,0,0 vs labels 0,1,0 -> 2/3;  agent 1: 2,3,2 vs 2,3,2 -> 1
# head_accuracy_foreign:  agent 0: preds 2,1,1 vs 2,3,2 -> 1/3;  agent 1: 2,3,3 vs 0,1,0 -> 0
# S correct per image:    T T F T F F
# collective_accuracy_own:     agent 0: images 0,1,4 -> T,T,F = 2/3;  agent 1: images 2,3,5 -> F,T,F = 1/3
# collective_accuracy_foreign: agent 0: images 2,3,5 -> 1/3;          agent 1: images 0,1,4 -> 2/3
# energy means:
#   head_own:           agent 0: (-8 - 2 - 10)/3 = -20/3;  agent 1: (-9 - 7 - 5)/3 = -7
#   head_foreign:       agent 0: (-6 - 4 - 1)/3 = -11/3;   agent 1: (-1 - 3 - 2)/3 = -2
#   collective_own:     agent 0: (-5 - 4 - 6)/3 = -5;      agent 1: (-3 - 10 - 8)/3 = -7
#   collective_foreign: agent 0: -7;                        agent 1: -5
# Histogram with num_bins = 3: finite energies span [-10, -1] -> edges -10, -7, -4, -1;
# bins [-10, -7), [-7, -4), [-4, -1] (the last one closed, as np.histogram):
#   head_own:       agent 0: -8, -2, -10 -> [2/3, 0, 1/3];   agent 1: -9, -7, -5 -> [1/3, 2/3, 0]
#   head_foreign:   agent 0: -6, -4, -1  -> [0, 1/3, 2/3];   agent 1: -1, -3, -2 -> [0, 0, 1]
#   collective_own: agent 0: -5, -4, -6  -> [0, 2/3, 1/3];   agent 1: -3, -10, -8 -> [2/3, 0, 1/3]
#   collective_foreign: agent 0 = agent 1's own = [2/3, 0, 1/3]; agent 1 = agent 0's own = [0, 2/3, 1/3]

T, F = True, False
HAND = dict(
    uses_head=np.array([[T, F, T, F, T, F], [F, F, T, F, F, F]]),
    head_pred=np.array([[0, 0, 2, 1, 0, 1], [2, 3, 2, 3, 3, 2]]),
    collective_pred=np.array([0, 1, 3, 3, 1, 3]),
    head_energy=np.array(
        [
            [-8.0, -2.0, -6.0, -4.0, -10.0, -1.0],
            [-1.0, -3.0, -9.0, -7.0, -2.0, -5.0],
        ]
    ),
    collective_energy=np.array([-5.0, -4.0, -3.0, -10.0, -6.0, -8.0]),
    labels=np.array([0, 1, 2, 3, 0, 2]),
    groups=[[0, 1], [2, 3]],
)
HAND_EXPECTED = {
    "head_answers_foreign": [1 / 3, 0.0],
    "collective_answers_own": [1 / 3, 2 / 3],
    "head_accuracy_own": [2 / 3, 1.0],
    "head_accuracy_foreign": [1 / 3, 0.0],
    "collective_accuracy_own": [2 / 3, 1 / 3],
    "collective_accuracy_foreign": [1 / 3, 2 / 3],
    "energy_mean": {
        "head_own": [-20 / 3, -7.0],
        "head_foreign": [-11 / 3, -2.0],
        "collective_own": [-5.0, -7.0],
        "collective_foreign": [-7.0, -5.0],
    },
    "energy_histogram": {
        "edges": [-10.0, -7.0, -4.0, -1.0],
        "head_own": [[2 / 3, 0, 1 / 3], [1 / 3, 2 / 3, 0]],
        "head_foreign": [[0, 1 / 3, 2 / 3], [0, 0, 1]],
        "collective_own": [[0, 2 / 3, 1 / 3], [2 / 3, 0, 1 / 3]],
        "collective_foreign": [[2 / 3, 0, 1 / 3], [0, 2 / 3, 1 / 3]],
    },
}


def _hand(num_bins=3):
  return diagnose(**HAND, num_bins=num_bins)


def _assert_nested_close(got, want):
  if isinstance(want, dict):
    assert set(got) == set(want)
    for key in want:
      _assert_nested_close(got[key], want[key])
  else:
    np.testing.assert_allclose(
        np.array(got, dtype=float),
        np.array(want, dtype=float),
        rtol=0,
        atol=1e-12,
        equal_nan=True,
    )


def _only_python_floats(obj):
  if isinstance(obj, dict):
    return all(_only_python_floats(v) for v in obj.values())
  if isinstance(obj, list):
    return all(_only_python_floats(v) for v in obj)
  return type(obj) is float


def test_hand_worked_case():
  got = _hand()
  _assert_nested_close(got, HAND_EXPECTED)
  assert _only_python_floats(got)  # JSON-able, no numpy scalars
  json.dumps(got, allow_nan=True)


def test_routing_consistent_with_energies_in_hand_case():
  # The hand case's uses_head is what the energy rule picks (lower energy; ties to S).
  assert (
      HAND["uses_head"]
      == (HAND["head_energy"] < HAND["collective_energy"][None])
  ).all()


def test_integer_uses_head_and_jax_like_inputs_accepted():
  args = dict(
      HAND,
      uses_head=HAND["uses_head"].astype(np.int32),
      groups=np.array(HAND["groups"]),
  )
  _assert_nested_close(diagnose(**args, num_bins=3), HAND_EXPECTED)


# ----------------------------------------------------------------------------- random vs loop


def _brute_force(
    uses_head,
    head_pred,
    collective_pred,
    head_energy,
    collective_energy,
    labels,
    groups,
    num_bins,
):
  """The same quantities by counting image by image, in plain Python."""
  k, n = len(uses_head), len(labels)
  finite = [
      float(v)
      for v in list(np.ravel(head_energy)) + list(collective_energy)
      if math.isfinite(v)
  ]
  lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
  if lo == hi:
    lo, hi = lo - 0.5, hi + 0.5
  edges = [lo + (hi - lo) * i / num_bins for i in range(num_bins + 1)]
  edges[-1] = hi

  def bin_of(v):
    if v == edges[-1]:
      return num_bins - 1
    for i in range(num_bins):
      if edges[i] <= v < edges[i + 1]:
        return i
    raise AssertionError(v)

  def ratio(a, b):
    return a / b if b else NAN

  out = {key: [] for key in SHARE_KEYS}
  means = {key: [] for key in ENERGY_KEYS}
  hists = {key: [] for key in ENERGY_KEYS}
  for a in range(k):
    c = {
        name: 0
        for name in (
            "own",
            "foreign",
            "head_foreign",
            "s_own",
            "h_ok_own",
            "h_ok_foreign",
            "s_ok_own",
            "s_ok_foreign",
        )
    }
    energies = {key: [] for key in ENERGY_KEYS}
    for i in range(n):
      side = (
          "own"
          if int(labels[i]) in set(int(g) for g in groups[a])
          else "foreign"
      )
      c[side] += 1
      if side == "foreign" and uses_head[a][i]:
        c["head_foreign"] += 1
      if side == "own" and not uses_head[a][i]:
        c["s_own"] += 1
      c[f"h_ok_{side}"] += int(head_pred[a][i] == labels[i])
      c[f"s_ok_{side}"] += int(collective_pred[i] == labels[i])
      energies[f"head_{side}"].append(float(head_energy[a][i]))
      energies[f"collective_{side}"].append(float(collective_energy[i]))
    out["head_answers_foreign"].append(ratio(c["head_foreign"], c["foreign"]))
    out["collective_answers_own"].append(ratio(c["s_own"], c["own"]))
    out["head_accuracy_own"].append(ratio(c["h_ok_own"], c["own"]))
    out["head_accuracy_foreign"].append(ratio(c["h_ok_foreign"], c["foreign"]))
    out["collective_accuracy_own"].append(ratio(c["s_ok_own"], c["own"]))
    out["collective_accuracy_foreign"].append(
        ratio(c["s_ok_foreign"], c["foreign"])
    )
    for key, vals in energies.items():
      vals = [v for v in vals if math.isfinite(v)]
      means[key].append(sum(vals) / len(vals) if vals else NAN)
      counts = [0] * num_bins
      for v in vals:
        counts[bin_of(v)] += 1
      hists[key].append([x / len(vals) if vals else NAN for x in counts])
  out["energy_mean"] = means
  out["energy_histogram"] = {"edges": edges, **hists}
  return out


def _random_inputs(seed, k=4, n=300, m=3, with_inf=True):
  rng = np.random.default_rng(seed)
  num_classes = k * m
  perm = rng.permutation(num_classes)
  groups = [sorted(int(c) for c in perm[a * m : (a + 1) * m]) for a in range(k)]
  labels = rng.integers(0, num_classes, n)
  head_energy = rng.normal(-8, 3, (k, n))
  collective_energy = rng.normal(-9, 2, n)
  if (
      with_inf
  ):  # a few non-finite energies: left out of the means and histograms
    head_energy[0, :3] = [np.inf, -np.inf, np.nan]
    collective_energy[5] = np.nan
  return dict(
      uses_head=head_energy < collective_energy[None],
      head_pred=np.where(
          rng.random((k, n)) < 0.6, labels, rng.integers(0, num_classes, (k, n))
      ),
      collective_pred=np.where(
          rng.random(n) < 0.7, labels, rng.integers(0, num_classes, n)
      ),
      head_energy=head_energy,
      collective_energy=collective_energy,
      labels=labels,
      groups=groups,
  )


@pytest.mark.parametrize(
    "seed, num_bins, with_inf", [(0, 24, True), (1, 7, False), (2, 1, True)]
)
def test_random_case_matches_per_image_loop(seed, num_bins, with_inf):
  inputs = _random_inputs(seed, with_inf=with_inf)
  got = diagnose(**inputs, num_bins=num_bins)
  want = _brute_force(**inputs, num_bins=num_bins)
  got_flat = {**got, "energy_histogram": {**got["energy_histogram"]}}
  # Means: summation order differs, so not bit-equal.
  for key in ENERGY_KEYS:
    np.testing.assert_allclose(
        got["energy_mean"][key], want["energy_mean"][key], rtol=1e-12
    )
  del got_flat["energy_mean"]
  want = {key: v for key, v in want.items() if key != "energy_mean"}
  _assert_nested_close(got_flat, want)


def test_histograms_sum_to_one_and_match_np_histogram():
  inputs = _random_inputs(3, with_inf=False)
  num_bins = 24
  got = diagnose(**inputs, num_bins=num_bins)
  hist = got["energy_histogram"]
  edges = np.array(hist["edges"])
  assert edges.shape == (num_bins + 1,)
  everything = np.concatenate(
      [inputs["head_energy"].ravel(), inputs["collective_energy"]]
  )
  assert edges[0] == everything.min() and edges[-1] == everything.max()
  for a, group in enumerate(inputs["groups"]):
    own = np.isin(inputs["labels"], group)
    subsets = {
        "head_own": inputs["head_energy"][a, own],
        "head_foreign": inputs["head_energy"][a, ~own],
        "collective_own": inputs["collective_energy"][own],
        "collective_foreign": inputs["collective_energy"][~own],
    }
    for key, values in subsets.items():
      fractions = np.array(hist[key][a])
      assert fractions.shape == (num_bins,)
      assert math.isclose(fractions.sum(), 1.0, rel_tol=1e-12)
      # another route: np.histogram's uniform (bins=int, range=...) path, density -> fractions
      density, _ = np.histogram(
          values, bins=num_bins, range=(edges[0], edges[-1]), density=True
      )
      np.testing.assert_allclose(
          fractions, density * np.diff(edges), atol=1e-12
      )
      assert round(fractions.sum() * values.size) == values.size


# ----------------------------------------------------------------------------- empty subsets


def test_empty_subsets_are_nan():
  # Agent 1 owns classes 4, 5, which no image has: its "own" subset is empty.
  inputs = dict(HAND, groups=[[0, 1, 2, 3], [4, 5]])
  got = diagnose(**inputs, num_bins=3)
  for key in (
      "collective_answers_own",
      "head_accuracy_own",
      "collective_accuracy_own",
  ):
    assert math.isnan(got[key][1]) and not math.isnan(got[key][0])
  # Agent 0 owns every label: its foreign subset is empty.
  for key in (
      "head_answers_foreign",
      "head_accuracy_foreign",
      "collective_accuracy_foreign",
  ):
    assert math.isnan(got[key][0]) and not math.isnan(got[key][1])
  for key in ("head_own", "collective_own"):
    assert math.isnan(got["energy_mean"][key][1])
    assert all(math.isnan(v) for v in got["energy_histogram"][key][1])
    assert math.isclose(sum(got["energy_histogram"][key][0]), 1.0)
  for key in ("head_foreign", "collective_foreign"):
    assert math.isnan(got["energy_mean"][key][0])
    assert all(math.isnan(v) for v in got["energy_histogram"][key][0])


def test_no_images_and_no_finite_energies():
  got = diagnose(
      np.zeros((2, 0), bool),
      np.zeros((2, 0), int),
      np.zeros(0, int),
      np.zeros((2, 0)),
      np.zeros(0),
      np.zeros(0, int),
      [[0], [1]],
      num_bins=4,
  )
  assert all(math.isnan(v) for key in SHARE_KEYS for v in got[key])
  assert got["energy_histogram"]["edges"] == [
      0.0,
      0.25,
      0.5,
      0.75,
      1.0,
  ]  # np.histogram's default
  # One finite value: np.histogram's +-0.5 range around it; the infinite energy is left out.
  one = diagnose(
      [[True, False]],
      [[0, 1]],
      [0, 1],
      [[-3.0, np.inf]],
      [np.nan, -np.inf],
      [0, 1],
      [[0]],
      num_bins=2,
  )
  assert one["energy_histogram"]["edges"] == [-3.5, -3.0, -2.5]
  assert one["energy_mean"]["head_own"] == [-3.0]
  assert math.isnan(one["energy_mean"]["head_foreign"][0])


# ----------------------------------------------------------------------------- bad input


def _bad(**changes):
  return dict(HAND, **changes)


@pytest.mark.parametrize(
    "inputs, match",
    [
        (_bad(uses_head=HAND["uses_head"][0]), r"uses_head must be \[K, N\]"),
        (
            _bad(uses_head=HAND["uses_head"].astype(float)),
            "uses_head must be bool",
        ),
        (
            _bad(uses_head=HAND["uses_head"].astype(int) * 2),
            "uses_head must be bool",
        ),
        (
            _bad(head_pred=HAND["head_pred"][:, :5]),
            r"head_pred has shape \(2, 5\)",
        ),
        (_bad(head_pred=HAND["head_pred"].T), "head_pred has shape"),
        (
            _bad(head_pred=HAND["head_pred"].astype(float)),
            "head_pred must hold integer",
        ),
        (
            _bad(collective_pred=HAND["head_pred"]),
            r"collective_pred has shape .*\[N\]",
        ),
        (_bad(labels=HAND["labels"][:-1]), "labels has shape"),
        (
            _bad(head_energy=HAND["head_energy"][:1]),
            r"head_energy has shape \(1, 6\)",
        ),
        (
            _bad(collective_energy=HAND["head_energy"]),
            "collective_energy has shape",
        ),
        (_bad(groups=[[0, 1]]), "groups has 1 class groups, expected K=2"),
        (_bad(groups=[[0, 1], [1, 2]]), "class 1 is in groups"),
        (_bad(groups=[[0.0, 1.0], [2.0, 3.0]]), "integer class ids"),
        (_bad(groups=5), "groups must be"),
    ],
)
def test_bad_inputs_raise(inputs, match):
  with pytest.raises(ValueError, match=match):
    diagnose(**inputs)


@pytest.mark.parametrize("num_bins", [0, -1, 2.5, True])
def test_bad_num_bins_raise(num_bins):
  with pytest.raises(ValueError, match="num_bins"):
    diagnose(**HAND, num_bins=num_bins)


# ----------------------------------------------------------------------------- markdown

# One member (one seed): each quantity's line, its value per agent and the mean over
# agents (1/6, 1/2, 5/6, 1/6, 1/2, 1/2; -41/6, -17/6, -6, -6).
HAND_LINES = [
    "| head answers foreign % | 33.33 | 0.00 | 16.67 |",
    "| S answers own % | 33.33 | 66.67 | 50.00 |",
    "| head acc own % | 66.67 | 100.00 | 83.33 |",
    "| head acc foreign % | 33.33 | 0.00 | 16.67 |",
    "| S acc own % | 66.67 | 33.33 | 50.00 |",
    "| S acc foreign % | 33.33 | 66.67 | 50.00 |",
    "| E head own | -6.67 | -7.00 | -6.83 |",
    "| E head foreign | -3.67 | -2.00 | -2.83 |",
    "| E S own | -5.00 | -7.00 | -6.00 |",
    "| E S foreign | -7.00 | -5.00 | -6.00 |",
]


def _one_member(diagnostics):
  """A single seed's results (K = 2) holding ``diagnostics``."""
  row = {"expert": [0.9, 0.8], "general": [0.5, 0.4]}
  member = {
      "num_agents": 2,
      "rows": {"after_growth": row, "ra_only": row},
      "routing_diagnostics": diagnostics,
  }
  return {
      "population": {"members": [{"seed": 0, "settings": {}}], "swept": []},
      "members": [member],
  }


def _diagnostics_section(md):
  return markdown_sections(md)["Routing diagnostics"]


def test_markdown_hand_worked_percentages():
  md = results_markdown(
      _one_member({"ra_only": _hand(), "after_growth": _hand()})
  )
  lines = _diagnostics_section(md)
  # rows in the report's order, with the report's titles
  titles = [l for l in lines if l.startswith("### ")]
  assert titles == [
      f"### {schema.ROW_TITLES['after_growth']}",
      f"### {schema.ROW_TITLES['ra_only']}",
  ]
  for line in HAND_LINES:
    assert lines.count(line) == 2
  assert lines.count("| quantity | Agent 0 | Agent 1 | mean |") == 2
  # one explanation line per quantity
  quantities = [l.split("|")[1].strip() for l in HAND_LINES]
  for quantity in quantities:
    assert sum(l.startswith(f"- {quantity}: ") for l in lines) == 1


def test_markdown_nan_cells_and_json_nulls():
  diag = diagnose(**dict(HAND, groups=[[0, 1, 2, 3], [4, 5]]), num_bins=3)
  results = _one_member({"after_growth": diag})
  md = results_markdown(results)
  lines = _diagnostics_section(md)
  # Agent 1 owns no test image: S answers own and head acc own have no value.
  for quantity in ("S answers own %", "head acc own %"):
    line = next(l for l in lines if l.startswith(f"| {quantity} |"))
    assert [c.strip() for c in line.strip("|").split("|")][2] == "-"
  # the same report from results.json's nulls
  loaded = json.loads(json.dumps(_to_json(results)))
  assert results_markdown(loaded) == md


def _to_json(obj):
  from masc_jax.reporting.progress import to_jsonable

  return to_jsonable(obj)


# ----------------------------------------------------------------------------- report integration


def _results(with_diagnostics):
  from test_reporting import make_results  # K = 3 synthetic results, one seed

  res = make_results(extras=True)
  if with_diagnostics:
    inputs = _random_inputs(4, k=3)
    res["members"][0]["routing_diagnostics"] = {
        "after_growth": diagnose(**inputs),
        "before_growth": diagnose(**_random_inputs(5, k=3)),
    }
  return res


def test_results_markdown_without_key_unchanged_and_with_key_added():
  without = results_markdown(_results(False))
  assert "Routing diagnostics" not in without
  res = _results(True)
  with_key = results_markdown(res)
  assert with_key.count("## Routing diagnostics") == 1
  # Dropping the section gives the report without the key back.
  start = with_key.index("## Routing diagnostics")
  end = with_key.index("\n## ", start) + 1
  assert with_key[:start] + with_key[end:] == without


def test_write_results_round_trip_with_diagnostics(tmp_path):
  res = _results(True)
  # an agent with no images of its own: NaN -> null in results.json -> "-" in both .md's
  inputs = _random_inputs(6, k=3)
  inputs["groups"][2] = [99]
  res["members"][0]["routing_diagnostics"]["cc_only"] = diagnose(**inputs)
  write_results(str(tmp_path), res)
  saved = json.loads((tmp_path / "results.json").read_text())
  diagnostics = saved["members"][0]["routing_diagnostics"]
  assert set(diagnostics) == {"after_growth", "before_growth", "cc_only"}
  assert diagnostics["cc_only"]["head_accuracy_own"][2] is None
  assert results_markdown(saved) == (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda d: d["after_growth"]["head_answers_foreign"].pop(),
            r"head_answers_foreign.*expected \(3,\)",
        ),
        (
            lambda d: d["after_growth"].pop("collective_accuracy_own"),
            "collective_accuracy_own",
        ),
        (
            lambda d: d["after_growth"]["energy_mean"].pop("head_own"),
            "energy_mean.*head_own",
        ),
        (
            lambda d: d["after_growth"]["energy_histogram"][
                "head_foreign"
            ].pop(),
            "head_foreign",
        ),
        (
            lambda d: d["after_growth"]["energy_histogram"]["edges"].append(
                0.0
            ),
            "collective_own|head_own",
        ),
        (
            lambda d: d["after_growth"].__setitem__(
                "head_accuracy_own", ["x", 1, 2]
            ),
            "expected numbers",
        ),
        (lambda d: d.__setitem__("after_growth", [1]), "must be a dict"),
    ],
)
def test_results_markdown_rejects_bad_diagnostics(mutate, match):
  res = _results(True)
  mutate(res["members"][0]["routing_diagnostics"])
  with pytest.raises(ValueError, match=match):
    results_markdown(res)


def test_results_markdown_rejects_diagnostics_of_another_k():
  res = _results(False)
  res["members"][0]["routing_diagnostics"] = {
      "after_growth": _hand()
  }  # K = 2, results have K = 3
  with pytest.raises(ValueError, match=r"expected \(3,\)"):
    results_markdown(res)


# ----------------------------------------------------------------------------- plot


def _check_png(path, rows, k):
  import matplotlib.image as mpimg

  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(data) > 20_000
  img = mpimg.imread(path)
  w, h = routing_diagnostics._PANEL_SIZE
  dpi = routing_diagnostics.ROUTING_DPI
  assert img.shape[:2] == (
      round((0.9 + h * rows) * dpi),
      round(max(6.0, 0.8 + w * k) * dpi),
  )
  assert float(img[..., :3].std()) > 0.01


@pytest.mark.parametrize("k, rows", [(2, 1), (10, 4)])
def test_plot_writes_png(tmp_path, k, rows):
  names = ("before_growth", "after_growth", "cc_only", "ra_only")[:rows]
  diag = {
      name: (_hand() if k == 2 else diagnose(**_random_inputs(i, k=k)))
      for i, name in enumerate(names)
  }
  path = tmp_path / "routing.png"
  plot_energy_histograms(diag, str(path), title="digits, seed 0")
  _check_png(path, rows, k)
  assert sorted(os.listdir(tmp_path)) == ["routing.png"]
  import matplotlib.pyplot as plt

  assert plt.get_fignums() == []


def test_plot_empty_subsets_and_json_nulls(tmp_path):
  diag = diagnose(**dict(HAND, groups=[[0, 1, 2, 3], [4, 5]]), num_bins=3)
  loaded = json.loads(json.dumps(_to_json({"after_growth": diag})))
  plot_energy_histograms(loaded, str(tmp_path / "routing.png"))
  _check_png(tmp_path / "routing.png", 1, 2)


def test_plot_goes_through_paths(tmp_path, monkeypatch):
  written = {}
  monkeypatch.setattr(
      paths, "write_atomic", lambda p, data: written.__setitem__(p, data)
  )
  plot_energy_histograms(
      {"after_growth": _hand()}, "gs://bucket/run/routing.png"
  )
  assert list(written) == ["gs://bucket/run/routing.png"]
  assert written["gs://bucket/run/routing.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_bad_input(tmp_path):
  with pytest.raises(ValueError, match="nothing to plot"):
    plot_energy_histograms({}, str(tmp_path / "x.png"))
  no_hist = copy.deepcopy(_hand())
  del no_hist["energy_histogram"]
  with pytest.raises(ValueError, match="energy_histogram"):
    plot_energy_histograms({"after_growth": no_hist}, str(tmp_path / "x.png"))
  assert os.listdir(tmp_path) == []
