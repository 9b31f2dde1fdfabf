"""The report of several members (masc_jax.reporting.report, plots): results.md on a
hand-worked population, results.json round trips, report.png and sweep.png."""

import copy
import json
import os
import warnings

import numpy as np
import pytest
from scipy import stats

from masc_jax.reporting import stats as ps
from masc_jax.reporting.plots import plot_report, plot_sweep
from masc_jax.reporting.report import results_markdown, write_results
from test_population_stats import make_member  # tests/ is on sys.path (pytest prepend mode)
from conftest import markdown_sections

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A hand-worked population: K = 2 agents, seeds 0, 1, 2. Per member (index = seed):
EXPERT = [[0.90, 0.80], [0.92, 0.80], [0.94, 0.80]]  # [member][agent]
GENERAL = [[0.50, 0.40], [0.60, 0.40], [0.70, 0.52]]
SOCIETY = [0.70, 0.75, 0.80]
DIRECTION = [True, True, False]
CC = [0.81, 0.83, 0.85]


def hand_member(i):
  e, g = EXPERT[i], GENERAL[i]
  out = {
      "num_agents": 2,
      "class_groups": [[0, 1, 2], [3, 4, 5]],
      "rows": {
          "after_growth": {
              "expert": e,
              "general": g,
              "average": [(x + y) / 2 for x, y in zip(e, g)],
          }
      },
      # [agent][group]: own group = Expert, the other = General (K = 2)
      "group_accuracy": {"after_growth": [[e[0], g[0]], [g[1], e[1]]]},
      "society_accuracy": {"after_growth": SOCIETY[i]},
      "directionality": {"after_growth": DIRECTION[i]},
      "collective_accuracy": {"cc": CC[i]},
  }
  if i == 2:  # only the last member has the CC-only row
    out["rows"]["cc_only"] = {
        "expert": [0.66, 0.70],
        "general": [0.30, 0.34],
        "average": [0.48, 0.52],
    }
    out["society_accuracy"]["cc_only"] = 0.5
  return out


def hand_population():
  members = [hand_member(i) for i in range(3)]
  return {
      "population": {
          "members": [{"seed": i, "settings": {}} for i in range(3)],
          "swept": [],
      },
      "members": members,
      "aggregate": ps.aggregate(members),
      "timings": {
          "experts": {
              "compile_s": 6.1,
              "train_s": 41.2,
              "steps": 900,
              "images_per_s": 2796.1,
          }
      },
      "stages": ["experts"],
      "routing": "energy",
  }


sections = markdown_sections


def cells(line):
  return [c.strip() for c in line.strip().strip("|").split("|")]


def line_starting(lines, start):
  found = [l for l in lines if l.startswith(start)]
  assert len(found) == 1, (start, found)
  return found[0]


# ----------------------------------------------------------------------------- markdown


def test_markdown_hand_worked_numbers():
  md = results_markdown(hand_population())
  assert md.startswith("# MASC results\n\nP = 3 members, seeds 0-2.\n")
  assert "95% Student-t confidence interval over seeds" in md.split("## ")[0]
  parts = sections(md)
  # t_{0.975, 2} = 4.3027, sqrt(3) = 1.7321:
  #   Expert agent 0: 0.90 0.92 0.94 -> mean 92.0, sd 2 -> 4.3027 * 2 / 1.7321 = 4.97
  #   General agent 0: 0.5 0.6 0.7 -> 60.0, sd 10 -> 24.84
  #   Average agent 0: 0.70 0.76 0.82 -> 76.0, sd 6 -> 14.90
  #   agent 1: Expert 80 (no spread); General 0.40 0.40 0.52 -> 44.0, sd 6.93 -> 17.21;
  #            Average 0.60 0.60 0.66 -> 62.0, sd 3.46 -> 8.61
  #   member means: Expert 0.85 0.86 0.87 -> 86.0, sd 1 -> 2.48; General 0.45 0.50 0.61
  #            -> 52.0, sd 8.19 -> 20.33; Average 0.65 0.68 0.74 -> 69.0, sd 4.58 -> 11.38
  table = parts["after growth (CC+RA)"]
  assert (
      "| Agent 0 | 92.0 ± 5.0 (3) | 60.0 ± 24.8 (3) | 76.0 ± 14.9 (3) |"
      in table
  )
  assert (
      "| Agent 1 | 80.0 ± 0.0 (3) | 44.0 ± 17.2 (3) | 62.0 ± 8.6 (3) |" in table
  )
  assert (
      "| mean | 86.0 ± 2.5 (3) | 52.0 ± 20.3 (3) | 69.0 ± 11.4 (3) |" in table
  )
  # One member only: the value and (1), no interval.
  assert "| Agent 0 | 66.0 (1) | 30.0 (1) | 48.0 (1) |" in parts["CC only"]
  # Society 0.70 0.75 0.80 -> 75.0, sd 5 -> 12.42; directionality holds in 2 of 3.
  summary = parts["Summary"]
  assert cells(line_starting(summary, "| after growth (CC+RA) |")) == [
      "after growth (CC+RA)",
      "86.0 ± 2.5 (3)",
      "52.0 ± 20.3 (3)",
      "69.0 ± 11.4 (3)",
      "75.0 ± 12.4 (3)",
      "holds in 2 of 3",
  ]
  assert cells(line_starting(summary, "| CC only |")) == [
      "CC only",
      "68.0 (1)",
      "32.0 (1)",
      "50.0 (1)",
      "50.0 (1)",
      "-",
  ]
  assert "Routing rule: energy" in summary
  # Group accuracy: the owner cells in bold.
  assert (
      "| Agent 0 | **92.0 ± 5.0 (3)** | 60.0 ± 24.8 (3) |"
      in parts["Accuracy per class group"]
  )
  # Collective 0.81 0.83 0.85 -> 83.0, sd 2 -> 4.97.
  assert any(
      l.endswith("CC terms, all classes (%): 83.0 ± 5.0 (3)")
      for l in parts["Collective network"]
  )
  assert "| experts | 900 | 6.1s | 41.2s | 2796.1 |" in parts["Timings"]
  assert "Routing diagnostics" not in parts and "Sweep" not in parts


def test_markdown_members_table():
  lines = sections(results_markdown(hand_population()))["Members"]
  header = cells(line_starting(lines, "| member |"))
  assert header == [
      "member",
      "seed",
      "after growth (CC+RA): mean General",
      "after growth (CC+RA): society",
      "CC only: mean General",
      "CC only: society",
  ]
  # member 1: mean General (0.6 + 0.4) / 2 = 50.00, society 75.00, no CC-only row
  assert cells(line_starting(lines, "| 1 |")) == [
      "1",
      "1",
      "50.00",
      "75.00",
      "-",
      "-",
  ]
  assert cells(line_starting(lines, "| 2 |")) == [
      "2",
      "2",
      "61.00",
      "80.00",
      "32.00",
      "50.00",
  ]


def test_markdown_computes_missing_statistics_and_rejects_no_members():
  results = hand_population()
  without = {k: v for k, v in results.items() if k != "aggregate"}
  assert results_markdown(without) == results_markdown(results)
  with pytest.raises(ValueError):
    results_markdown({**results, "members": []})


def expected_cell(values, percent=True):
  """'mean ± hw (n)' computed with numpy and scipy."""
  v = np.asarray(values, dtype=float)
  n = v.size
  hw = stats.t.ppf(0.975, n - 1) * np.std(v, ddof=1) / np.sqrt(n)
  scale, digits = (100.0, 1) if percent else (1.0, 2)
  return f"{scale * np.mean(v):.{digits}f} ± {scale * hw:.{digits}f} ({n})"


def test_markdown_routing_diagnostics_table():
  members = [make_member(40 + i) for i in range(4)]
  results = {
      "population": {
          "members": [{"seed": i, "settings": {}} for i in range(4)],
          "swept": [],
      },
      "members": members,
  }
  parts = sections(results_markdown(results))
  lines = parts["Routing diagnostics"]
  start = lines.index("### after growth (CC+RA)")
  table = lines[start : lines.index("### CC only")]

  def values(field, a, energy=False):
    diag = [m["routing_diagnostics"]["after_growth"] for m in members]
    return [(d["energy_mean"] if energy else d)[field][a] for d in diag]

  share = cells(line_starting(table, "| head answers foreign % |"))
  assert share[1:4] == [
      expected_cell(values("head_answers_foreign", a)) for a in range(3)
  ]
  # The last column: the mean over agents of the agents' means over members.
  mean_share = np.mean(
      [np.mean(values("head_answers_foreign", a)) for a in range(3)]
  )
  assert share[4] == f"{100 * mean_share:.1f}"
  energy = cells(line_starting(table, "| E S own |"))
  assert energy[1:4] == [
      expected_cell(values("collective_own", a, energy=True), percent=False)
      for a in range(3)
  ]
  mean_energy = np.mean(
      [np.mean(values("collective_own", a, energy=True)) for a in range(3)]
  )
  assert energy[4] == f"{mean_energy:.2f}"
  assert "### before growth" not in lines


def sweep_population():
  """Settings w in (0.1, 1.0) x seeds 0-2; w = 1.0 better after growth."""
  after = {0.1: [0.80, 0.82, 0.84], 1.0: [0.85, 0.86, 0.90]}
  specs, members = [], []
  for seed in range(3):
    for w in (0.1, 1.0):
      x = after[w][seed]
      specs.append({"seed": seed, "settings": {"loss.align_weight": w}})
      members.append(
          {
              "num_agents": 2,
              "rows": {
                  "before_growth": {
                      "expert": [0.9, 0.9],
                      "general": [0.0, 0.0],
                  },
                  "after_growth": {"expert": [x, x], "general": [x, x]},
              },
              "society_accuracy": {"after_growth": x},
          }
      )
  population = {"members": specs, "swept": ["loss.align_weight"]}
  return after, {
      "population": population,
      "members": members,
      "aggregate": ps.aggregate(members),
      "sweep": ps.sweep_summary(population, members),
  }


def test_markdown_sweep_table_and_best_line():
  after, results = sweep_population()
  md = results_markdown(results)
  assert "P = 6 members: seeds 0-2, 2 settings of `loss.align_weight`." in md
  lines = sections(md)["Sweep"]
  table = lines[lines.index("### after growth (CC+RA)") :]
  for w, text in ((0.1, "0.1"), (1.0, "1")):
    want = expected_cell(after[w])
    assert cells(line_starting(table, f"| {text} |")) == [
        text,
        "0-2",
        want,
        want,
        want,
        want,
    ]
  v = np.asarray(after[1.0])
  lo, hi = stats.t.interval(0.95, 2, loc=v.mean(), scale=stats.sem(v))
  best = line_starting(lines, "Best setting")
  assert (
      f"loss.align_weight = 1: {expected_cell(v)}, 95% CI [{100 * lo:.1f}, {100 * hi:.1f}]."
      in best
  )
  assert "after growth (CC+RA)" in best
  assert "| 3 | 1 | 1 |" in "\n".join(
      sections(md)["Members"]
  )  # member 3: seed 1, w = 1


# ----------------------------------------------------------------------------- files


def test_write_results_round_trips(tmp_path):
  results = hand_population()
  results["members"][1]["rows"]["after_growth"]["general"][0] = np.float32(
      "nan"
  )
  results["members"][0]["society_accuracy"]["after_growth"] = np.float64(0.70)
  results["population"]["members"][0]["seed"] = np.int64(0)
  results["aggregate"] = ps.aggregate(results["members"])
  write_results(str(tmp_path), results)

  text = (tmp_path / "results.json").read_text()

  def no_nan(name):
    raise AssertionError(f"results.json holds {name}")

  loaded = json.loads(text, parse_constant=no_nan)
  assert text == json.dumps(loaded, indent=2, sort_keys=True) + "\n"
  # NaN -> null: the member's missing cell, and the spread of a one-member row.
  assert loaded["members"][1]["rows"]["after_growth"]["general"][0] is None
  cc_only = loaded["aggregate"]["rows"]["cc_only"]["expert"]["per_agent"][0]
  assert (
      cc_only["std"] is None
      and cc_only["ci95"] == [None, None]
      and cc_only["n"] == 1
  )
  # Finite numbers come back exactly.
  got = loaded["aggregate"]["rows"]["after_growth"]["expert"]["per_agent"][0]
  want = results["aggregate"]["rows"]["after_growth"]["expert"]["per_agent"][0]
  assert got == want
  assert (
      loaded["aggregate"]["rows"]["after_growth"]["general"]["per_agent"][0][
          "n"
      ]
      == 2
  )
  # The report from the file (keys sorted, NaN as null) is the report written.
  md = (tmp_path / "results.md").read_text()
  assert md == results_markdown(results) == results_markdown(loaded)


def test_report_from_results_json_keeps_the_row_order(tmp_path):
  # results.json sorts keys (after_growth < before_growth): the report must not follow.
  _, results = sweep_population()
  write_results(str(tmp_path), results)
  with open(tmp_path / "results.json") as f:
    loaded = json.load(f)
  md = results_markdown(loaded)
  assert (
      md == results_markdown(results) == (tmp_path / "results.md").read_text()
  )
  assert md.index("## before growth\n") < md.index("## after growth (CC+RA)\n")


def test_write_results_writes_nothing_on_bad_input(tmp_path):
  with pytest.raises(ValueError):
    write_results(str(tmp_path), {"members": []})
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- figures


def assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data.startswith(PNG_SIGNATURE)
  assert len(data) > 20_000  # a drawn figure, not an empty canvas


def test_plot_report(tmp_path):
  members = [make_member(50 + i) for i in range(3)]
  results = {
      "population": {
          "members": [{"seed": i, "settings": {}} for i in range(3)],
          "swept": [],
      },
      "members": members,
      "aggregate": ps.aggregate(members),
  }
  path = str(tmp_path / "out" / "report.png")
  plot_report(results, path)
  assert_png(path)


def test_plot_report_one_member_and_missing_rows(tmp_path):
  # n = 1: no error bars anywhere.
  single = hand_population()
  single["members"] = single["members"][:1]
  single["population"]["members"] = single["population"]["members"][:1]
  del single["aggregate"]
  plot_report(single, str(tmp_path / "one.png"))
  assert_png(str(tmp_path / "one.png"))
  # No before_growth in any member, cc_only in one of three.
  plot_report(hand_population(), str(tmp_path / "partial.png"))
  assert_png(str(tmp_path / "partial.png"))


def test_plot_sweep_one_and_two_fields(tmp_path):
  _, results = sweep_population()
  plot_sweep(results, str(tmp_path / "sweep1.png"))
  assert_png(str(tmp_path / "sweep1.png"))

  two = copy.deepcopy(results)
  for i, spec in enumerate(two["population"]["members"]):
    spec["settings"]["optim.learning_rate"] = 0.01 if i % 4 < 2 else 0.05
  two["population"]["swept"].append("optim.learning_rate")
  two["sweep"] = ps.sweep_summary(two["population"], two["members"])
  assert len(two["sweep"]["groups"]) == 4
  plot_sweep(two, str(tmp_path / "sweep2.png"))
  assert_png(str(tmp_path / "sweep2.png"))

  # One seed per setting (n = 1) and a setting without after growth.
  thin = copy.deepcopy(results)
  keep = [0, 1]
  thin["members"] = [thin["members"][i] for i in keep]
  thin["population"]["members"] = [
      thin["population"]["members"][i] for i in keep
  ]
  del thin["members"][1]["rows"]["after_growth"]
  thin["sweep"] = ps.sweep_summary(thin["population"], thin["members"])
  del thin["aggregate"]
  plot_sweep(thin, str(tmp_path / "sweep3.png"))
  assert_png(str(tmp_path / "sweep3.png"))


def test_plot_sweep_needs_a_sweep(tmp_path):
  with pytest.raises(ValueError, match="no sweep"):
    plot_sweep(hand_population(), str(tmp_path / "sweep.png"))
  assert not (tmp_path / "sweep.png").exists()


# ----------------------------------------------------------------------------- joint training

# The joint-training reference row (one network, the CE-only collective, trained
# on all agents' data) from fixed predictions: K = 2 agents, classes {0, 1} and
# {2, 3}, eight test images, one network's [N] answers per member.
JOINT_GROUPS = np.array([[0, 1], [2, 3]])
JOINT_LABELS = np.array([0, 1, 2, 3, 0, 2, 1, 3])
JOINT_ANSWERS = np.array(
    [
        # right: yes no yes yes no no yes yes -> group 0 (images 0 1 4 6) 2/4,
        # group 1 (images 2 3 5 7) 3/4, all 5/8.
        [0, 0, 2, 3, 1, 1, 1, 3],
        [0, 1, 2, 0, 0, 2, 1, 3],
        [1, 1, 0, 3, 0, 0, 0, 3],
    ]
)


def joint_population():
  """Three members whose only row is the joint one, as the evaluation makes it.

  The stage table answers every agent's line with the one network
  (``[K, N]``, tests/test_stages.py checks that), and the society's routing
  over K identical networks gives that network's answer.
  """
  from masc_jax.training.evaluation import results_from_predictions

  k, n = JOINT_GROUPS.shape[0], JOINT_LABELS.size
  members = [
      results_from_predictions(
          {
              "joint": np.broadcast_to(answers, (k, n)),
              "society_joint": answers,
              "ce": answers,
          },
          JOINT_LABELS,
          JOINT_GROUPS,
          rows=("joint",),
          collectives=("ce",),
      )
      for answers in JOINT_ANSWERS
  ]
  return {
      "population": {
          "members": [{"seed": i, "settings": {}} for i in range(3)],
          "swept": [],
      },
      "members": members,
      "aggregate": ps.aggregate(members),
  }


def joint_by_loops(answers):
  """Per agent group: (accuracy on its classes, on the others'), and overall."""
  own, other = [], []
  for group in JOINT_GROUPS.tolist():
    mine = [i for i, y in enumerate(JOINT_LABELS) if y in group]
    rest = [i for i, y in enumerate(JOINT_LABELS) if y not in group]
    own.append(sum(answers[i] == JOINT_LABELS[i] for i in mine) / len(mine))
    other.append(sum(answers[i] == JOINT_LABELS[i] for i in rest) / len(rest))
  overall = sum(a == y for a, y in zip(answers, JOINT_LABELS)) / len(answers)
  return own, other, overall


def test_joint_training_row_against_accuracies_by_hand(tmp_path):
  results = joint_population()
  first = results["members"][0]
  # Member 0, worked by hand above.
  assert first["rows"]["joint"]["expert"] == [0.5, 0.75]
  assert first["rows"]["joint"]["general"] == [0.75, 0.5]
  assert first["society_accuracy"]["joint"] == 0.625
  by_loops = [joint_by_loops(answers) for answers in JOINT_ANSWERS]
  for member, (own, other, overall) in zip(results["members"], by_loops):
    np.testing.assert_allclose(member["rows"]["joint"]["expert"], own)
    np.testing.assert_allclose(member["rows"]["joint"]["general"], other)
    np.testing.assert_allclose(
        member["rows"]["joint"]["average"],
        (np.array(own) + np.array(other)) / 2,
    )
    assert member["society_accuracy"]["joint"] == overall
    assert member["collective_accuracy"]["ce"] == overall
    # One network: no per-group matrix, no directionality.
    assert "joint" not in member["group_accuracy"]
    assert "joint" not in member["directionality"]

  write_results(str(tmp_path), results)
  with open(tmp_path / "results.json") as f:
    loaded = json.load(f)
  assert (
      loaded["members"][2]["rows"]["joint"]
      == results["members"][2]["rows"]["joint"]
  )
  parts = sections((tmp_path / "results.md").read_text())
  table = parts["Joint training (CE-only collective)"]
  assert any("upper bound" in line for line in table)
  for a in range(2):
    assert cells(line_starting(table, f"| Agent {a} |")) == [
        f"Agent {a}",
        expected_cell([own[a] for own, _, _ in by_loops]),
        expected_cell([other[a] for _, other, _ in by_loops]),
        expected_cell([(own[a] + other[a]) / 2 for own, other, _ in by_loops]),
    ]
  assert cells(line_starting(parts["Summary"], "| Joint training")) == [
      "Joint training (CE-only collective)",
      expected_cell([np.mean(own) for own, _, _ in by_loops]),
      expected_cell([np.mean(other) for _, other, _ in by_loops]),
      expected_cell(
          [(np.mean(own) + np.mean(other)) / 2 for own, other, _ in by_loops]
      ),
      expected_cell([overall for _, _, overall in by_loops]),
      "-",
  ]
  assert "its own accuracy over all classes" in "\n".join(parts["Summary"])
  assert "Accuracy per class group" not in parts
  # The statistics in results.json: the joint row over the three members.
  overall = loaded["aggregate"]["society_accuracy"]["joint"]
  want = (
      stats.t.ppf(0.975, 2)
      * np.std([o for _, _, o in by_loops], ddof=1)
      / np.sqrt(3)
  )
  assert overall["n"] == 3
  np.testing.assert_allclose(overall["half_width"], want)


def test_report_png_draws_the_joint_training_row(tmp_path, monkeypatch):
  from matplotlib.axes import Axes

  bars = {}  # legend -> the heights drawn
  real = Axes.bar

  def record(self, x, height, *args, label=None, **kwargs):
    bars[label] = np.asarray(height, dtype=float)
    return real(self, x, height, *args, label=label, **kwargs)

  monkeypatch.setattr(Axes, "bar", record)
  plot_report(joint_population(), str(tmp_path / "report.png"))
  assert_png(str(tmp_path / "report.png"))
  by_loops = [joint_by_loops(answers) for answers in JOINT_ANSWERS]
  # (b) per agent group: the members' mean Expert and General.
  np.testing.assert_allclose(
      bars["Expert - Joint training (CE-only collective)"],
      np.mean([own for own, _, _ in by_loops], axis=0),
  )
  np.testing.assert_allclose(
      bars["General - Joint training (CE-only collective)"],
      np.mean([other for _, other, _ in by_loops], axis=0),
  )
  # (c) the row's mean General and its accuracy over all classes.
  (overall_legend,) = [l for l in bars if l.startswith("society accuracy")]
  assert "its accuracy over all classes" in overall_legend
  np.testing.assert_allclose(
      bars[overall_legend], [np.mean([o for _, _, o in by_loops])]
  )


def test_report_png_with_every_row_lays_out(tmp_path):
  # Six bars per agent and five rows' labels: the legends and labels still fit
  # (matplotlib warns when constrained layout gives up).
  members = [
      make_member(60 + i, rows=("before_growth", "after_growth", "joint"))
      for i in range(2)
  ]
  results = {
      "population": {
          "members": [{"seed": i, "settings": {}} for i in range(2)],
          "swept": [],
      },
      "members": members,
  }
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    plot_report(results, str(tmp_path / "report.png"))
  assert_png(str(tmp_path / "report.png"))
