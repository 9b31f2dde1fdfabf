"""Tests for masc_jax.reporting.report, masc_jax.reporting.plots and masc_jax.reporting.progress
(numpy + matplotlib only; fast): the report of a single seed, a population of one member.
tests/test_population_report.py has the report of several members."""

import copy
import json
import os
import re

import numpy as np
import pytest

from masc_jax.reporting import plots
from masc_jax.reporting.plots import plot_report
from masc_jax.reporting.progress import MetricsLogger, format_duration, progress_line, stage_summary_line
from masc_jax.reporting import schema
from masc_jax.reporting.report import results_markdown, write_results
from conftest import markdown_sections

K, M, PER_CLASS = 3, 4, 10


def _accuracy(pred, labels, mask):
  return float(np.mean(pred[mask] == labels[mask]))


def make_results(
    seed=0,
    rows=("before_growth", "after_growth", "cc_only", "ra_only"),
    extras=True,
):
  """Synthetic results computed from random predictions (K agents, M classes each)."""
  rng = np.random.default_rng(seed)
  num_classes = K * M
  perm = rng.permutation(num_classes)
  class_groups = [
      sorted(int(c) for c in perm[a * M : (a + 1) * M]) for a in range(K)
  ]
  owner = np.empty(num_classes, dtype=np.int64)
  for a, g in enumerate(class_groups):
    owner[g] = a
  labels = np.repeat(np.arange(num_classes), PER_CLASS)
  group_of_image = owner[labels]

  out_rows, group_acc, society, direction = {}, {}, {}, {}
  for r_i, name in enumerate(rows):
    p_own = 0.95 - 0.05 * r_i
    p_other = 0.0 if name == "before_growth" else 0.4 + 0.1 * r_i
    preds = []
    for a in range(K):
      own = group_of_image == a
      correct = rng.random(labels.size) < np.where(own, p_own, p_other)
      if (
          name == "before_growth"
      ):  # an isolated agent only predicts its own classes
        own_classes = np.asarray(class_groups[a])
        idx = rng.integers(0, M, labels.size)
        wrong = own_classes[idx]
        wrong = np.where(wrong == labels, own_classes[(idx + 1) % M], wrong)
      else:
        wrong = (
            labels + rng.integers(1, num_classes, labels.size)
        ) % num_classes
      preds.append(np.where(correct, labels, wrong))
    expert = [
        _accuracy(preds[a], labels, group_of_image == a) for a in range(K)
    ]
    general = [
        _accuracy(preds[a], labels, group_of_image != a) for a in range(K)
    ]
    average = [(e + g) / 2 for e, g in zip(expert, general)]
    out_rows[name] = {"expert": expert, "general": general, "average": average}
    mat = [
        [_accuracy(preds[a], labels, group_of_image == g) for g in range(K)]
        for a in range(K)
    ]
    group_acc[name] = mat
    if name != "before_growth":
      chooser = rng.integers(0, K, labels.size)  # "energy routing" stand-in
      society[name] = float(
          np.mean(np.stack(preds)[chooser, np.arange(labels.size)] == labels)
      )
    direction[name] = bool(
        all(int(np.argmax(np.array(mat)[:, g])) == g for g in range(K))
    )

  member = {
      "num_agents": K,
      "class_groups": class_groups,
      "rows": out_rows,
      "group_accuracy": group_acc,
      "society_accuracy": society,
      "directionality": direction,
  }
  # One seed: the run's results hold its one member's tables.
  results = {
      "population": {"members": [{"seed": seed, "settings": {}}], "swept": []},
      "members": [member],
  }
  if extras:
    member["collective_accuracy"] = {
        "cc": float(rng.random()),
        "ce": float(rng.random()),
    }
    results["timings"] = {
        "experts": {
            "compile_s": 6.1,
            "train_s": 41.2,
            "steps": 900,
            "images_per_s": 2796.1,
        },
        "collective": {
            "compile_s": 8.0,
            "train_s": 250.0,
            "steps": 4000,
            "images_per_s": 812.3,
        },
    }
    results["config"] = {"model.width": 32, "train.lr": 1e-3, "seed": seed}
  return results


def _sections(md):
  """'## title' -> body text (level-2 sections only)."""
  return {k: "\n".join(v) for k, v in markdown_sections(md).items()}


def _member(res):
  (member,) = res["members"]
  return member


# ----------------------------------------------------------------------------- markdown


def test_markdown_agent_lines_and_means():
  res = make_results()
  md = results_markdown(res)
  sections = _sections(md)
  for name, row in _member(res)["rows"].items():
    body = sections[schema.ROW_TITLES[name]]
    agent_lines = [l for l in body.splitlines() if re.match(r"\| Agent \d", l)]
    assert len(agent_lines) == K
    for a in range(K):
      e, g, av = (100 * row[c][a] for c in ("expert", "general", "average"))
      assert agent_lines[a] == f"| Agent {a} | {e:.2f} | {g:.2f} | {av:.2f} |"
    means = [
        100 * float(np.mean(row[c])) for c in ("expert", "general", "average")
    ]
    assert (
        f"| mean | {means[0]:.2f} | {means[1]:.2f} | {means[2]:.2f} |"
        in body.splitlines()
    )
  # before growth: an isolated agent never answers other agents' classes
  assert all(v == 0.0 for v in _member(res)["rows"]["before_growth"]["general"])


def test_markdown_of_one_seed_says_so_and_has_no_intervals():
  md = results_markdown(make_results(seed=3))
  assert md.startswith("# MASC results\n\nP = 1 member, seed 3.\n\nOne seed:")
  assert "±" not in md and "(1)" not in md
  assert "confidence interval" not in md
  # Its members table: the one member's headline numbers.
  members = _sections(md)["Members"].splitlines()
  assert any(l.startswith("| 0 | 3 | ") for l in members)


def test_markdown_row_order_and_summary():
  res = make_results()
  md = results_markdown(res)
  positions = [
      md.index(f"## {schema.ROW_TITLES[r]}\n")
      for r in ("before_growth", "after_growth", "cc_only", "ra_only")
  ]
  assert positions == sorted(positions)
  summary = _sections(md)["Summary"].splitlines()
  member = _member(res)
  for name, row in member["rows"].items():
    line = next(
        l for l in summary if l.startswith(f"| {schema.ROW_TITLES[name]} |")
    )
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == [
        f"{100 * float(np.mean(row[c])):.2f}"
        for c in ("expert", "general", "average")
    ]
    soc = member["society_accuracy"].get(name)
    assert cells[4] == ("-" if soc is None else f"{100 * soc:.2f}")
    assert cells[5] == ("yes" if member["directionality"][name] else "no")
  # collective accuracy and timings
  collective = _sections(md)["Collective network"]
  for key, title in schema.COLLECTIVE_TITLES.items():
    v = member["collective_accuracy"][key]
    assert f"- {title}, all classes (%): {100 * v:.2f}" in collective
  assert "| experts | 900 | 6.1s | 41.2s | 2796.1 |" in md
  assert "| collective | 4000 | 8.0s | 4m10s | 812.3 |" in md


def test_markdown_directionality_absent_and_both_values():
  res = make_results(extras=False)
  _member(res)["directionality"] = {"after_growth": True, "ra_only": False}
  md = results_markdown(res)
  summary = _sections(md)["Summary"].splitlines()

  def last_cell(name):
    line = next(
        l for l in summary if l.startswith(f"| {schema.ROW_TITLES[name]} |")
    )
    return line.strip("|").split("|")[-1].strip()

  assert last_cell("after_growth") == "yes"
  assert last_cell("ra_only") == "no"
  assert last_cell("before_growth") == "-"
  assert "## Timings" not in md and "## Collective network" not in md


def test_markdown_only_some_rows():
  res = make_results(rows=("after_growth",), extras=False)
  md = results_markdown(res)
  assert "## after growth (CC+RA)" in md and "## before growth" not in md


ENERGY_EXPLANATION = (
    "Society accuracy: over all classes, each image answered by the agent of lowest "
    "energy. Directionality: for every class group, its owner agent is the most accurate."
)
RULE_EXPLANATION = (
    "Society accuracy: over all classes, each image answered by the agent the routing "
    "rule picks. Directionality: for every class group, its owner agent is the most accurate."
)


def _after_explanation(md):
  """The Summary section's lines from the explanation line to the next section."""
  lines = md.splitlines()
  start = next(
      i for i, l in enumerate(lines) if l.startswith("Society accuracy:")
  )
  stop = next(i for i in range(start, len(lines)) if lines[i].startswith("## "))
  return lines[start:stop]


def test_markdown_routing_absent_is_unchanged():
  md = results_markdown(make_results())
  assert _after_explanation(md) == [ENERGY_EXPLANATION, ""]
  assert "Routing rule" not in md


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            {"routing": "energy"},
            [ENERGY_EXPLANATION, "", "Routing rule: energy", ""],
        ),
        (
            {"routing": "energy", "routing_margin": 0.0},
            [ENERGY_EXPLANATION, "", "Routing rule: energy", ""],
        ),
        (
            {"routing": "energy", "routing_margin": None},
            [ENERGY_EXPLANATION, "", "Routing rule: energy", ""],
        ),
        (
            {"routing": "confidence"},
            [RULE_EXPLANATION, "", "Routing rule: confidence", ""],
        ),
        (
            {"routing": "margin_energy", "routing_margin": 0.5},
            [
                RULE_EXPLANATION,
                "",
                "Routing rule: margin_energy (margin 0.5)",
                "",
            ],
        ),
        (
            {"routing": "energy", "routing_margin": np.float32(0.25)},
            [ENERGY_EXPLANATION, "", "Routing rule: energy (margin 0.25)", ""],
        ),
    ],
)
def test_markdown_routing_rule(extra, expected):
  res = make_results()
  plain = results_markdown(res)
  res.update(extra)
  md = results_markdown(res)
  assert _after_explanation(md) == expected
  # Nothing else changes: dropping the new lines (and the explanation) gives the old report back.
  assert (
      md.replace(expected[0], ENERGY_EXPLANATION).replace(
          f"{expected[2]}\n\n", ""
      )
      == plain
  )


def _timing_stages(md):
  body = _sections(md)["Timings"].splitlines()
  return [
      l.split("|")[1].strip()
      for l in body
      if l.startswith("| ") and not l.startswith("| stage")
  ]


def _timings(*names):
  return {
      n: {"compile_s": 1.0, "train_s": 2.0, "steps": 3, "images_per_s": 4.0}
      for n in names
  }


def test_markdown_timings_follow_results_stages():
  res = make_results()
  res["timings"] = _timings("altruism", "collective", "experts", "extra")
  res["stages"] = ["experts", "altruism", "collective"]
  md = results_markdown(res)
  assert _timing_stages(md) == ["experts", "altruism", "collective", "extra"]
  assert "| altruism | 3 | 1.0s | 2.0s | 4.0 |" in md.splitlines()
  # The order comes from "stages", not from the timings dict (results.json sorts its keys).
  res["stages"] = ["collective", "experts", "altruism", "extra"]
  assert _timing_stages(results_markdown(res)) == [
      "collective",
      "experts",
      "altruism",
      "extra",
  ]


def test_markdown_timings_legacy_order_without_stages():
  """Results written before they recorded "stages" keep today's order."""
  res = make_results()
  res["timings"] = _timings(
      "altruism_ce",
      "zeta",
      "collective_ce",
      "altruism",
      "experts",
      "collective",
      "alpha",
  )
  assert _timing_stages(results_markdown(res)) == [
      "experts",
      "collective",
      "altruism",
      "collective_ce",
      "altruism_ce",
      "alpha",
      "zeta",
  ]


# ----------------------------------------------------------------------------- files


def _numpyify(run):
  """Same numbers, as numpy arrays / scalars (what a training loop might hand in)."""
  whole = copy.deepcopy(run)
  res = _member(run)
  out = _member(whole)
  out["num_agents"] = np.int64(res["num_agents"])
  out["class_groups"] = np.asarray(res["class_groups"], dtype=np.int32)
  for name, row in res["rows"].items():
    out["rows"][name] = {
        c: np.asarray(v, dtype=np.float64) for c, v in row.items()
    }
  out["group_accuracy"] = {
      k: np.asarray(v) for k, v in res["group_accuracy"].items()
  }
  out["society_accuracy"] = {
      k: np.float64(v) for k, v in res["society_accuracy"].items()
  }
  out["directionality"] = {
      k: np.bool_(v) for k, v in res["directionality"].items()
  }
  whole["timings"]["experts"]["steps"] = np.int64(900)
  return whole


def test_write_results_roundtrip(tmp_path):
  plain = make_results(seed=1)
  write_results(str(tmp_path), _numpyify(plain))
  text = (tmp_path / "results.json").read_text()
  loaded = json.loads(text)
  assert loaded == json.loads(
      json.dumps(plain)
  )  # (tuples etc. normalised the same way)
  assert text == json.dumps(loaded, indent=2, sort_keys=True) + "\n"
  assert (tmp_path / "results.md").read_text() == results_markdown(plain)
  assert (tmp_path / "results.md").read_text() == results_markdown(
      _numpyify(plain)
  )
  assert sorted(os.listdir(tmp_path)) == [
      "results.json",
      "results.md",
  ]  # no temp files left


def test_write_results_overwrites_and_nonfinite(tmp_path):
  res = make_results(extras=False)
  write_results(str(tmp_path), res)
  _member(res)["society_accuracy"]["after_growth"] = float("nan")
  write_results(str(tmp_path), res)
  loaded = json.loads((tmp_path / "results.json").read_text())
  assert loaded["members"][0]["society_accuracy"]["after_growth"] is None
  assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]


def test_write_results_bad_input_writes_nothing(tmp_path):
  with pytest.raises(ValueError):
    write_results(str(tmp_path), {"num_agents": 3})
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- plot


def _check_png(path):
  import matplotlib.image as mpimg

  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  img = mpimg.imread(path)
  w, h = (int(round(s * plots.REPORT_DPI)) for s in plots.REPORT_FIGSIZE)
  assert img.shape[:2] == (h, w)
  assert float(img[..., :3].std()) > 0.01  # not a blank canvas


def test_plot_report_png(tmp_path):
  path = tmp_path / "report.png"
  plot_report(make_results(), str(path))
  _check_png(path)
  assert sorted(os.listdir(tmp_path)) == ["report.png"]
  import matplotlib.pyplot as plt

  assert plt.get_fignums() == []


def test_plot_report_draws_evaluations_during_training_when_there_are_some(
    tmp_path,
):
  import matplotlib.image as mpimg

  def curve(epochs, members):
    return [
        {
            "epoch": e,
            "members": [
                {"collective_acc": 0.5 + 0.01 * e + d} for d in members
            ],
        }
        for e in epochs
    ]

  size = lambda figsize: tuple(
      int(round(s * plots.REPORT_DPI)) for s in reversed(figsize)
  )
  # Only the stages' ends (eval_every_epochs=0): report.png as without curves.
  plot_report(
      make_results(), str(tmp_path / "end.png"), curves={"c": curve([3], [0])}
  )
  assert mpimg.imread(tmp_path / "end.png").shape[:2] == size(
      plots.REPORT_FIGSIZE
  )
  # Evaluations during a stage, of three members: the taller figure.
  plot_report(
      make_results(),
      str(tmp_path / "curves.png"),
      curves={"c": curve([1, 2, 3], [0, 0.1, 0.2]), "d": curve([2], [0, 0, 0])},
  )
  image = mpimg.imread(tmp_path / "curves.png")
  assert image.shape[:2] == size(plots.REPORT_WITH_CURVES_FIGSIZE)
  assert float(image[..., :3].std()) > 0.01


def test_plot_report_partial_rows(tmp_path):
  res = make_results(rows=("ra_only",), extras=False)
  path = tmp_path / "r1.png"
  plot_report(res, str(path))
  _check_png(path)
  del _member(res)["group_accuracy"]
  path2 = tmp_path / "r2.png"
  plot_report(res, str(path2))
  _check_png(path2)


def test_plot_report_bad_input(tmp_path):
  with pytest.raises(ValueError, match="members"):
    plot_report({"num_agents": 2}, str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="rows"):
    plot_report({"members": [{"num_agents": 2}]}, str(tmp_path / "x.png"))
  res = make_results(extras=False)
  _member(res)["group_accuracy"]["after_growth"] = [[0.5] * K] * (K - 1)
  with pytest.raises(ValueError, match="group_accuracy"):
    plot_report(res, str(tmp_path / "x.png"))
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop("rows"), "rows"),
        (lambda r: r.__setitem__("rows", {}), "empty"),
        (lambda r: r.__setitem__("rows", [1, 2]), "dict"),
        (
            lambda r: r["rows"]["after_growth"]["expert"].pop(),
            "expert.*expected K=3",
        ),
        (
            lambda r: r["rows"]["cc_only"]["general"].append(0.5),
            "general.*expected K=3",
        ),
        (lambda r: r["rows"]["ra_only"].pop("expert"), "expert"),
        (lambda r: r["rows"]["ra_only"].__setitem__("average", 0.5), "average"),
        (lambda r: r.__setitem__("num_agents", 0), "num_agents"),
        (lambda r: r["class_groups"].pop(), "class_groups"),
    ],
)
def test_malformed_results_raise(mutate, match):
  res = make_results(extras=False)
  mutate(_member(res))
  with pytest.raises(ValueError, match=match):
    results_markdown(res)


def test_results_without_members_raise():
  res = make_results(extras=False)
  for members in (None, [], "x"):
    with pytest.raises(ValueError, match="no 'members' list"):
      results_markdown({**res, "members": members})
  with pytest.raises(ValueError, match="population lists 2 members"):
    results_markdown({**res, "population": {"members": [{}, {}], "swept": []}})


def test_not_a_dict_raises():
  with pytest.raises(ValueError):
    results_markdown([1, 2, 3])


# ----------------------------------------------------------------------------- metrics log


def test_metrics_logger(tmp_path):
  path = tmp_path / "sub" / "metrics.jsonl"
  records = [
      {
          "stage": "experts",
          "step": np.int64(10),
          "loss": np.float32(0.25),
          "acc": 0.5,
      },
      {
          "stage": "experts",
          "step": 20,
          "loss": np.float64(0.125),
          "nan": float("nan"),
          "vec": np.arange(3, dtype=np.float32),
          "flag": np.bool_(True),
      },
      {
          "stage": "collective",
          "step": np.array(30),
          "terms": {"ce": np.float32(1.5)},
      },
  ]
  with MetricsLogger(str(path)) as log:
    for r in records:
      log.write(r)
    # flushed per line: readable before close
    assert len(path.read_text().splitlines()) == len(records)
  lines = path.read_text().splitlines()
  parsed = [json.loads(l) for l in lines]
  assert parsed[0] == {"stage": "experts", "step": 10, "loss": 0.25, "acc": 0.5}
  assert isinstance(parsed[0]["step"], int)
  assert (
      parsed[1]["nan"] is None
      and parsed[1]["vec"] == [0.0, 1.0, 2.0]
      and parsed[1]["flag"] is True
  )
  assert parsed[2] == {"stage": "collective", "step": 30, "terms": {"ce": 1.5}}
  assert all("NaN" not in l for l in lines)
  # appends
  log2 = MetricsLogger(str(path))
  log2.write({"step": 40})
  log2.close()
  log2.close()  # idempotent
  assert len(path.read_text().splitlines()) == 4
  with pytest.raises(ValueError):
    log2.write({"step": 50})


def test_metrics_logger_disabled(tmp_path):
  path = tmp_path / "metrics.jsonl"
  log = MetricsLogger(str(path), enabled=False)
  log.write({"step": 1, "loss": np.float32(1.0)})
  log.close()
  assert not path.exists()
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- console lines


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0.0s"),
        (45.2, "45.2s"),
        (59.94, "59.9s"),
        (59.96, "1m00s"),
        (65, "1m05s"),
        (205, "3m25s"),
        (3599.4, "59m59s"),
        (3600, "1h00m"),
        (3720, "1h02m"),
        (7 * 3600 + 5 * 60 + 29, "7h05m"),
        (86399, "1d00h"),
        (2 * 86400 + 3 * 3600, "2d03h"),
        (float("nan"), "--"),
        (float("inf"), "--"),
        (-1, "--"),
    ],
)
def test_format_duration(seconds, text):
  assert format_duration(seconds) == text


def test_progress_line():
  line = progress_line(
      "collective",
      1200,
      4000,
      812.3,
      205.0,
      {"ce": 0.4512, "kd": 0.10201, "align": 0.0031, "total": 0.55631},
  )
  assert line == (
      "[collective] step  1200/ 4000 ( 30.0%) |  812.3 img/s | ETA 3m25s | "
      "ce 0.4512 kd 0.1020 align 0.0031 total 0.5563"
  )
  line = progress_line(
      "experts", 7, 123456, 12345.67, float("nan"), {"loss": np.float32(2e-6)}
  )
  assert (
      line
      == "[experts] step      7/123456 (  0.0%) | 12345.7 img/s | ETA -- | loss 2.000e-06"
  )
  assert (
      progress_line("x", 0, 0, 0.0, 0.0, {})
      == "[x] step     0/    0 (  0.0%) |    0.0 img/s | ETA 0.0s"
  )


def test_stage_summary_line():
  line = stage_summary_line(
      "experts",
      900,
      41.23,
      6.08,
      {"expert_acc": 0.991, "loss": np.float32(0.03125), "steps_skipped": 0},
  )
  assert (
      line
      == "[experts] done: 900 steps in 41.2s (compile 6.1s) | expert acc 0.991 loss 0.03125 steps skipped 0"
  )
  assert (
      stage_summary_line("ra", 10, 250, 8, {})
      == "[ra] done: 10 steps in 4m10s (compile 8.0s)"
  )
