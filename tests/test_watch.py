"""Watching and stopping a run: TensorBoard curves, evaluations during a stage, a profile, Ctrl-C.

One uninterrupted run (in this process, with a profile) is the reference. The
same config with ``eval_every_epochs=1`` is then killed (SIGKILL) right after
an evaluation during the first stage, resumed and interrupted (SIGINT, what
Ctrl-C sends) in the second stage, and resumed to the end: its results must be
the reference's, and its event files must hold what its metrics.jsonl holds,
every step once.
"""

import collections
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from masc_jax import config_lib
from masc_jax.reporting import plots, tensorboard_log
from masc_jax.training import train, workdir as workdir_lib
from conftest import COMPARED, MID_STAGE_CHECKPOINTS, REPO, run_main

# Two epochs in the first stage, so that eval_every_epochs=1 evaluates during it.
OVERRIDES = ("ablations=False", "epochs.experts=2")


def read_events(run_dir):
  """``{tag: [(step, value), ...]}`` as TensorBoard reads the run (purges applied)."""
  accumulator = event_accumulator.EventAccumulator(
      str(run_dir), size_guidance={event_accumulator.SCALARS: 0}
  )
  accumulator.Reload()
  return {
      tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
      for tag in accumulator.Tags()["scalars"]
  }


def plt_image(path):
  import matplotlib.image

  return matplotlib.image.imread(path)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run, profiling 3 steps: ``(workdir, results, log lines)``."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = config_lib.load_config("tiny", [*OVERRIDES, "profile_steps=2:3"])
  lines = []
  results = train.train_and_evaluate(config, workdir, log=lines.append)
  return workdir, results, lines


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """The run with evaluations every epoch, killed, resumed, Ctrl-C'd, resumed.

  Returns ``(workdir, [CompletedProcess of each part])``.
  """
  workdir = str(tmp_path_factory.mktemp("interrupted"))
  argv = [
      "--config=tiny",
      f"--workdir={workdir}",
      *(f"--config.{o}" for o in OVERRIDES),
      "--config.eval_every_epochs=1",
      f"--config.{MID_STAGE_CHECKPOINTS}",
  ]
  # Experts: 16 steps an epoch, checkpoints every 10, so the kill after step 18
  # loses the evaluation at step 16 and the log point at 15, written after the
  # checkpoint at 10: the resumed run writes them again.
  parts = [run_main(argv, {"MASC_FAULT": "KILL:step:experts:18"})]
  parts.append(run_main(argv, {"MASC_FAULT": "INT:step:collective:26"}))
  parts.append(run_main(argv))
  return workdir, parts


def test_ctrl_c_saves_where_it_stopped_and_the_same_command_resumes_exactly(
    reference, interrupted
):
  workdir, (killed, stopped, resumed) = interrupted
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert stopped.returncode == 130, stopped.stderr[-2000:]
  output = stopped.stdout + stopped.stderr
  assert "Traceback" not in output, output[-3000:]
  assert (
      "SIGINT: saved a checkpoint at stage collective, step 26; exiting"
      in stopped.stdout.splitlines()
  )
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from checkpoint" in resumed.stdout
  assert "[collective] 81 steps" in resumed.stdout
  assert "resuming at step 26" in resumed.stdout
  # Evaluating during the stages changed nothing: the reference has none.
  with open(os.path.join(workdir, "results.json")) as f:
    (got,) = json.load(f)["members"]
  (expected,) = json.loads(json.dumps(reference[1]))["members"]
  for key in COMPARED:
    assert got[key] == expected[key], key


def test_evaluations_during_a_stage_are_logged_at_their_epochs(
    reference, interrupted
):
  workdir, (_, _, resumed) = interrupted
  evals = [r for r in read_metrics(workdir) if "eval" in r]
  # Killed after the experts' epoch-1 evaluation: written again on resume.
  assert [(r["stage"], r["epoch"], r["global_step"]) for r in evals] == [
      ("experts", 1, 16),
      ("experts", 1, 16),
      ("experts", 2, 32),
      ("collective", 1, 113),
      ("altruism", 1, 129),
  ]
  # The stage-end evaluations are the reference's (which evaluated only there).
  reference_evals = [r for r in read_metrics(reference[0]) if "eval" in r]
  assert [r["eval"] for r in evals[2:]] == [r["eval"] for r in reference_evals]
  # The run position kept each evaluation once, for report.png's curves.
  steps = [
      int(name)
      for name in os.listdir(os.path.join(workdir, "checkpoints"))
      if name.isdigit()
  ]
  with open(
      os.path.join(workdir, "checkpoints", str(max(steps)), "meta", "metadata")
  ) as f:
    curves = json.load(f)["epoch_evaluations"]
  assert {
      stage: [p["epoch"] for p in points] for stage, points in curves.items()
  } == {
      "experts": [1, 2],
      "collective": [1],
      "altruism": [1],
  }
  assert curves["experts"][0]["members"] == [evals[1]["eval"]]
  image = plt_image(os.path.join(workdir, "report.png"))
  assert image.shape[:2] == tuple(
      int(round(s * plots.REPORT_DPI))
      for s in reversed(plots.REPORT_WITH_CURVES_FIGSIZE)
  )


def test_event_files_hold_what_metrics_jsonl_holds_each_step_once(
    reference, interrupted
):
  workdir, _ = interrupted
  runs = os.listdir(os.path.join(workdir, "tensorboard"))
  assert runs == [tensorboard_log.run_name(0)]
  events = read_events(os.path.join(workdir, "tensorboard", runs[0]))
  # The latest record of each step (the resumed run wrote some twice).
  expected = collections.defaultdict(dict)
  for record in read_metrics(workdir):
    stage, step = record["stage"], record["global_step"]
    if "eval" in record:
      for figure, value in record["eval"].items():
        expected[f"{stage}/eval/{figure}"][step] = value
      continue
    for term, value in record.items():
      if term not in ("stage", "step", "global_step"):
        expected[f"{stage}/{term}"][step] = value
    expected[f"{stage}/learning_rate"][step] = 0.05
  assert sorted(events) == sorted(expected)
  for tag, points in events.items():
    steps = [step for step, _ in points]
    assert steps == sorted(set(steps)), f"{tag}: a step twice or out of order"
    assert steps == sorted(expected[tag]), tag
    np.testing.assert_allclose(
        [value for _, value in points],
        [expected[tag][step] for step in steps],
        rtol=1e-6,
        err_msg=tag,
    )
  # None missing: every step the uninterrupted run logged is there.
  logged = {r["global_step"] for r in read_metrics(reference[0])}
  assert logged <= {
      step for tag, points in events.items() for step, _ in points
  }


def test_a_profile_of_the_requested_steps_is_written(reference):
  workdir, _, lines = reference
  profiles = os.path.join(workdir, "profile", "plugins", "profile")
  (capture,) = os.listdir(profiles)
  files = os.listdir(os.path.join(profiles, capture))
  assert any(name.endswith(".xplane.pb") for name in files), files
  assert any(line.startswith("profile of 3 experts steps") for line in lines)


def test_a_second_ctrl_c_quits_at_once():
  """The first Ctrl-C asks for a stop; the second kills, even while the loop waits."""
  script = (
      "import os, signal, time\n"
      "from masc_jax.training import workdir\n"
      "with workdir.StopSignals() as stop:\n"
      "  os.kill(os.getpid(), signal.SIGINT)\n"
      "  print(stop.poll(), stop.name, stop.exit_status, flush=True)\n"
      "  os.kill(os.getpid(), signal.SIGINT)\n"
      "  time.sleep(60)\n"
  )
  child = subprocess.run(
      [sys.executable, "-c", script],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert child.stdout.split() == ["True", "SIGINT", "130"]
  assert child.returncode == -signal.SIGINT
  assert "Ctrl-C again quits at once" in child.stderr


def test_stop_signals_put_back_the_handlers_they_replaced():
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with workdir_lib.StopSignals() as stop:
    assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.poll() and (stop.name, stop.exit_status) == ("SIGTERM", 143)
  assert {s: signal.getsignal(s) for s in before} == before


def test_event_files_of_two_writers_started_at_once_both_survive(tmp_path):
  """tensorboardX names files by the second: two writers in one second must not clash."""
  first = tensorboard_log.TensorBoardLog(str(tmp_path), ["a"])
  second = tensorboard_log.TensorBoardLog(str(tmp_path), ["a"], purge_from=3)
  first.write(1, {"x": 1.0})
  first.write(2, {"x": 2.0})
  first.write(3, {"x": 3.0})
  first.close()
  second.write(3, {"x": 30.0})
  second.close()
  assert len(os.listdir(tmp_path / "a")) == 2
  # The second file starts with a purge at 3: the first file's point at 3 goes.
  assert read_events(tmp_path / "a")["x"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_member_values_go_to_their_own_runs(tmp_path):
  names = [
      tensorboard_log.run_name(0, {"optim.learning_rate": 0.01}),
      tensorboard_log.run_name(1, {"optim.learning_rate": 0.01}),
  ]
  assert names == [
      "seed_0_optim.learning_rate=0.01",
      "seed_1_optim.learning_rate=0.01",
  ]
  with tensorboard_log.TensorBoardLog(str(tmp_path), names) as log:
    log.write(5, {"loss": np.array([0.5, 0.25]), "images_per_s": 100.0})
    with pytest.raises(ValueError, match="3 values for 2 TensorBoard runs"):
      log.write(6, {"loss": [1.0, 2.0, 3.0]})
  assert read_events(tmp_path / names[0]) == {
      "loss": [(5, 0.5)],
      "images_per_s": [(5, 100.0)],
  }
  assert read_events(tmp_path / names[1])["loss"] == [(5, 0.25)]


def test_a_disabled_log_writes_nothing(tmp_path):
  log = tensorboard_log.TensorBoardLog(
      str(tmp_path / "tb"), ["a"], enabled=False
  )
  log.write(1, {"x": 1.0})
  log.close()
  assert not os.path.exists(tmp_path / "tb")
