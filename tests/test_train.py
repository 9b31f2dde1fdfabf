"""The run end to end on the tiny config: stages, outputs, re-running a finished run."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from masc_jax import config_lib
from masc_jax.data import registry
from masc_jax.method import metrics
from masc_jax.training import checkpointing, protocol, train
from masc_jax.training.society import build_society
from masc_jax.reporting import report
from conftest import MID_STAGE_CHECKPOINTS

ROWS = ("before_growth", "after_growth", "cc_only", "ra_only")


def test_every_stage_runs_and_writes_its_outputs(tiny_run):
  workdir, results, lines = tiny_run
  for name in protocol.stage_names(config_lib.load_config("tiny")):
    assert any(line.startswith(f"[{name}] done:") for line in lines), name
  # One seed: a population of one member, its statistics over n = 1.
  assert results["population"] == {
      "members": [{"seed": 0, "settings": {}}],
      "swept": [],
  }
  (member,) = results["members"]
  assert set(member["rows"]) == set(ROWS) | {"joint"}
  general = results["aggregate"]["rows"]["after_growth"]["general"]["mean"]
  assert general["n"] == 1 and general["mean"] == np.mean(
      member["rows"]["after_growth"]["general"]
  )
  assert np.isnan(general["half_width"]) and "sweep" not in results
  for name in (
      "results.json",
      "results.md",
      "report.png",
      "metrics.jsonl",
      "config.json",
  ):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "results.md")) as f:
    assert f.read() == report.results_markdown(
        json.load(open(os.path.join(workdir, "results.json")))
    )


def test_metrics_log_has_a_record_per_logged_step_and_evaluation(tiny_run):
  workdir, _, lines = tiny_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r for r in records if "step" in r]
  evals = [r for r in records if "eval" in r]
  progress = [l for l in lines if "| ETA" in l]
  assert len(steps) == len(progress)
  assert [r["stage"] for r in evals] == list(
      protocol.stage_names(config_lib.load_config("tiny"))
  )
  assert all(
      {"ce", "total", "images_per_s", "global_step"} <= set(r) for r in steps
  )


def test_results_rows_agree_with_the_group_accuracy_matrices(tiny_run):
  """Expert_k is the diagonal of the group matrix; General_k the size-weighted rest."""
  (results,) = tiny_run[1]["members"]
  groups = np.asarray(results["class_groups"])
  test_labels = registry.load_dataset("digits").test_labels
  sizes = np.bincount(
      metrics.label_group(test_labels, groups), minlength=len(groups)
  )
  for row in ROWS:
    acc = np.asarray(results["group_accuracy"][row])
    k = len(acc)
    np.testing.assert_allclose(results["rows"][row]["expert"], np.diag(acc))
    for a in range(k):
      others = [g for g in range(k) if g != a]
      expected = np.sum(acc[a, others] * sizes[others]) / np.sum(sizes[others])
      np.testing.assert_allclose(results["rows"][row]["general"][a], expected)
    assert results["directionality"][row] == bool(
        np.all(np.diag(acc) >= acc.max(axis=0))
    )


def test_joint_training_row_is_the_ce_only_collective_per_agent_group(tiny_run):
  """Its Expert / General per group recombine, weighted by the groups' test
  images, into its accuracy over all classes: the CE-only collective's."""
  workdir, results, _ = tiny_run
  (member,) = results["members"]
  joint = member["rows"]["joint"]
  groups = np.asarray(member["class_groups"])
  test_labels = registry.load_dataset("digits").test_labels
  sizes = np.bincount(
      metrics.label_group(test_labels, groups), minlength=len(groups)
  )
  overall = member["collective_accuracy"]["ce"]
  assert member["society_accuracy"]["joint"] == overall
  np.testing.assert_allclose(
      np.sum(np.asarray(joint["expert"]) * sizes) / sizes.sum(), overall
  )
  for a in range(len(groups)):
    right_elsewhere = overall * sizes.sum() - joint["expert"][a] * sizes[a]
    np.testing.assert_allclose(
        joint["general"][a], right_elsewhere / (sizes.sum() - sizes[a])
    )
  assert "joint" not in member["directionality"]
  assert "joint" not in member["group_accuracy"]
  with open(os.path.join(workdir, "results.json")) as f:
    written = json.load(f)
  assert written["members"][0]["rows"]["joint"] == joint
  assert written["aggregate"]["society_accuracy"]["joint"]["mean"] == overall
  with open(os.path.join(workdir, "results.md")) as f:
    assert "## Joint training (CE-only collective)\n" in f.read()


def test_before_growth_agents_know_only_their_own_classes(tiny_run):
  (results,) = tiny_run[1]["members"]
  assert max(results["rows"]["before_growth"]["general"]) < 0.1


def test_a_finished_run_reports_without_training(tiny_run):
  workdir, results, _ = tiny_run
  lines = []
  again = train.train_and_evaluate(
      config_lib.load_config("tiny", [MID_STAGE_CHECKPOINTS]),
      workdir,
      log=lines.append,
  )
  assert any("this run is finished" in l for l in lines)
  assert not any("| ETA" in l for l in lines)
  # Everything, statistics and timings included (NaN spreads compare as text).
  assert json.dumps(again, sort_keys=True) == json.dumps(
      results, sort_keys=True
  )


def test_a_checkpoint_without_the_member_axis_resumes_to_the_same_results(
    tiny_run, tmp_path
):
  """A single run checkpointed mid-stage by an older version (no member axis) resumes
  with the axis added and ends with the uninterrupted run's results."""
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)
  config = config_lib.load_config("tiny", [MID_STAGE_CHECKPOINTS])
  society = build_society(config)
  run = train.Run(society, workdir, log=lambda _: None)
  abstract = jax.eval_shape(
      functools.partial(train.init_population_state, society, run.init_key)
  )
  step = run.checkpointer.all_steps()[-2]  # mid-stage: the last stage's step 10
  state, meta = run.checkpointer.restore(step, abstract)
  run.close()
  assert (meta["stage"], meta["stage_step"]) == ("altruism_ce", 10)
  # What the older version saved: the same models and position, no member axis.
  old_state = jax.tree.map(lambda x: x[0], state)
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  for name in ("results.json", "results.md", "report.png", "routing.png"):
    os.remove(os.path.join(workdir, name))
  old = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  old.save(step, old_state, meta)
  old.close()
  saved = checkpointing.leaf_shapes(old_state)
  assert all(
      (1, *saved[name]) == shape
      for name, shape in checkpointing.leaf_shapes(state).items()
  )

  lines = []
  run = train.Run(society, workdir, log=lines.append)
  try:
    results = run.run()
  finally:
    run.close()
  assert any("restored as a run of one member" in l for l in lines), lines
  assert f"resumed from checkpoint {step}: stage altruism_ce, step 10" in lines
  assert not any(l.startswith("[collective]") for l in lines)
  for key in ("members", "aggregate"):  # (NaN spreads compare as text)
    assert json.dumps(results[key], sort_keys=True) == json.dumps(
        tiny_run[1][key], sort_keys=True
    ), key


def test_a_stage_registered_from_outside_is_trained_and_reported(
    tmp_path, monkeypatch
):
  """The loop runs whatever the stage table holds: a second round of heads, as one entry."""
  monkeypatch.setattr(protocol, "STAGES", protocol.STAGES)
  monkeypatch.setattr(protocol, "BY_NAME", dict(protocol.BY_NAME))
  again = dataclasses.replace(
      protocol.BY_NAME["altruism"],
      name="altruism_again",
      variables_key="heads_again",
      rows=("after_growth_again",),
  )
  protocol.register_stage(again, after="altruism")
  config = config_lib.load_config("tiny", ["ablations=False"])
  assert protocol.stage_names(config) == (
      "experts",
      "collective",
      "altruism",
      "altruism_again",
  )
  lines = []
  results = train.train_and_evaluate(config, str(tmp_path), log=lines.append)
  assert set(results["members"][0]["rows"]) == {
      "before_growth",
      "cc_only",
      "after_growth",
      "after_growth_again",
  }
  assert results["stages"][-1] == "altruism_again"
  society = build_society(config)
  assert results["timings"]["altruism_again"]["steps"] == (
      society.agent_batches.steps_per_epoch * config.epochs.altruism
  )
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    evals = [r["stage"] for r in map(json.loads, f) if "eval" in r]
  assert evals == ["experts", "collective", "altruism", "altruism_again"]
  with open(os.path.join(tmp_path, "results.md")) as f:
    markdown = f.read()
  assert "after growth again" in markdown
  # No ablations: no CE-only collective, so no joint-training row anywhere.
  assert "Joint training" not in markdown
  with pytest.raises(ValueError, match="already exists"):
    protocol.register_stage(again, after="altruism")
