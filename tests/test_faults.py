"""Runs that survive: kills, preemption, damaged checkpoints, NaNs, workdir guards, determinism.

Every run here is the tiny config in a subprocess (``python -m masc_jax.main``),
compared with the uninterrupted in-process run of the ``tiny_run`` fixture:
same seed, same device count (one CPU device), so results must be identical.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from masc_jax.data import batches
from masc_jax.training import checkpointing, train
from masc_jax.training.society import build_society
from masc_jax import config_lib
from masc_jax.training import workdir as workdir_lib
from conftest import COMPARED, MID_STAGE_CHECKPOINTS, REPO, run_main


def popen_main(workdir, *extra):
  return subprocess.Popen(
      [
          sys.executable,
          "-m",
          "masc_jax.main",
          "--config=tiny",
          f"--workdir={workdir}",
          *extra,
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )


def interrupt_when(workdir, marker, sig):
  """Start a run, send ``sig`` when a line starting with ``marker`` appears; return its output."""
  proc = popen_main(workdir)
  lines = []
  for line in proc.stdout:
    lines.append(line.rstrip("\n"))
    if line.startswith(marker):
      proc.send_signal(sig)
      break
  rest, _ = proc.communicate(timeout=300)
  lines += rest.splitlines()
  return proc.returncode, lines


def results_of(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def assert_same_results(workdir, reference):
  (got,) = results_of(workdir)["members"]
  (reference,) = json.loads(json.dumps(reference))["members"]
  for key in COMPARED:
    assert got[key] == reference[key], key


def latest_meta(workdir):
  cp = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = cp.all_steps()[-1]
  with open(
      os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
  ) as f:
    meta = json.load(f)
  cp.close()
  return step, meta


@pytest.fixture(scope="module")
def preempted_workdir(tmp_path_factory):
  """A run stopped by SIGTERM in the collective stage.

  Its two checkpoints: the experts' stage end (global step 16) and the SIGTERM
  save (collective step 35 or later).
  """
  workdir = str(tmp_path_factory.mktemp("preempted"))
  code, lines = interrupt_when(
      workdir, "[collective] step    35", signal.SIGTERM
  )
  return workdir, code, lines


def test_sigterm_saves_a_checkpoint_where_it_stopped(preempted_workdir):
  workdir, code, lines = preempted_workdir
  assert code == 143, lines[-5:]
  saved = [l for l in lines if l.startswith("SIGTERM: saved a checkpoint")]
  assert saved, lines[-5:]
  step, meta = latest_meta(workdir)
  assert meta["stage"] == "collective"
  assert saved[0].endswith(f"step {meta['stage_step']}; exiting")
  # Lost at most the step in flight: the SIGTERM checkpoint is at or after step 35.
  assert meta["stage_step"] >= 35


def _copy(workdir, tmp_path):
  target = str(tmp_path / "copy")
  shutil.copytree(workdir, target)
  return target


def _checkpoint_dirs(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted((int(n) for n in os.listdir(root) if n.isdigit()))


# Stops a resumed run once it has restored (SIGTERM while its first stage
# compiles): enough to see which checkpoint it chose, without training on.
STOP_AFTER_RESTORE = {"MASC_FAULT": "TERM:compiled:collective:1"}


@pytest.mark.parametrize("damage", ["truncate", "delete_item", "delete_file"])
def test_a_damaged_latest_checkpoint_is_skipped(
    tiny_run, preempted_workdir, tmp_path, damage
):
  """The resumed run sets the damaged checkpoint aside and goes on from the one
  before; with one kind of damage it runs to the end, to the uninterrupted
  run's results (the others stop once restored: the same path from there)."""
  workdir = _copy(preempted_workdir[0], tmp_path)
  steps = _checkpoint_dirs(workdir)
  assert len(steps) >= 2
  newest = os.path.join(workdir, "checkpoints", str(steps[-1]))
  if damage == "truncate":
    for root, _, files in os.walk(os.path.join(newest, "state")):
      for name in files:
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  elif damage == "delete_item":
    shutil.rmtree(os.path.join(newest, "meta"))
  else:
    data_dir = os.path.join(newest, "state", "ocdbt.process_0", "d")
    for name in os.listdir(data_dir):
      os.remove(os.path.join(data_dir, name))
  to_the_end = damage == "truncate"
  result = run_main(
      ["--config=tiny", f"--workdir={workdir}"],
      env_extra=None if to_the_end else STOP_AFTER_RESTORE,
  )
  assert result.returncode == (0 if to_the_end else 143), result.stderr[-2000:]
  assert f"checkpoint at step {steps[-1]} is unusable" in result.stdout
  assert f"resumed from checkpoint {steps[-2]}" in result.stdout
  assert os.path.isdir(
      os.path.join(workdir, "checkpoints", "bad", str(steps[-1]))
  )
  if to_the_end:
    assert_same_results(workdir, tiny_run[1])


def test_an_unfinished_save_is_ignored(preempted_workdir, tmp_path):
  """A kill during a save leaves only Orbax's temporary folder: it is not a
  checkpoint. (Finishing after such a kill, to the same results:
  test_guarantees.py's kill inside a save.)"""
  workdir = _copy(preempted_workdir[0], tmp_path)
  steps = _checkpoint_dirs(workdir)
  root = os.path.join(workdir, "checkpoints")
  # A step this run never saves again, so only the start-up clean-up can remove it.
  partial = os.path.join(
      root, f"{steps[-1] + 10_000}.orbax-checkpoint-tmp-1234"
  )
  shutil.copytree(os.path.join(root, str(steps[-1])), partial)
  os.remove(os.path.join(partial, "commit_success.txt"))
  result = run_main(
      ["--config=tiny", f"--workdir={workdir}"], env_extra=STOP_AFTER_RESTORE
  )
  assert result.returncode == 143, result.stderr[-2000:]
  assert f"resumed from checkpoint {steps[-1]}" in result.stdout
  assert not os.path.exists(partial)  # cleaned up, not left to look like a step


def test_no_good_checkpoint_exits_instead_of_starting_over(
    preempted_workdir, tmp_path
):
  workdir = _copy(preempted_workdir[0], tmp_path)
  for step in _checkpoint_dirs(workdir):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "meta"))
  result = run_main(["--config=tiny", f"--workdir={workdir}"])
  assert result.returncode == 2
  assert (
      "no usable checkpoint" in result.stderr
      and "Traceback" not in result.stderr
  )
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_checkpoint_of_another_shape_is_not_trusted(
    preempted_workdir, tmp_path
):
  workdir = _copy(preempted_workdir[0], tmp_path)
  result = run_main(
      [
          "--config=tiny",
          f"--workdir={workdir}",
          "--config.model.head_hidden=(8,)",
          "--allow_config_change",
      ]
  )
  assert result.returncode == 2
  assert "does not fit this config" in result.stdout + result.stderr
  assert "no usable checkpoint" in result.stderr


def test_resuming_with_a_different_config_is_refused(
    preempted_workdir, tmp_path
):
  workdir = _copy(preempted_workdir[0], tmp_path)
  before = sorted(os.listdir(workdir))
  result = run_main(
      [
          "--config=tiny",
          f"--workdir={workdir}",
          "--config.seed=1",
          "--config.optim.learning_rate=0.1",
          "--config.log_every_steps=7",
      ]
  )
  assert result.returncode == 2
  assert "seed: saved 0, now 1" in result.stderr
  assert "optim.learning_rate: saved 0.05, now 0.1" in result.stderr
  assert "log_every_steps" not in result.stderr  # does not change results
  assert "--allow_config_change" in result.stderr
  assert sorted(os.listdir(workdir)) == before


def test_a_second_run_on_the_same_workdir_is_refused(
    preempted_workdir, tmp_path
):
  workdir = _copy(preempted_workdir[0], tmp_path)
  # Held the way a live run holds it (the library's own lock), so a lock that two runs
  # could share would let the second one through.
  with workdir_lib.workdir_lock(workdir):
    result = run_main(["--config=tiny", f"--workdir={workdir}"])
  assert result.returncode == 2
  assert "another run is writing" in result.stderr
  assert "Traceback" not in result.stderr


def test_a_nan_stops_the_run_naming_stage_step_and_term(tmp_path):
  workdir = str(tmp_path / "nan")
  # The collective's 24th step leaves NaN parameters (fault injection through the run's
  # hooks), so its step 24 (global step 40: the experts stage has 16 steps) has NaN losses.
  result = run_main(
      [
          "--config=tiny",
          f"--workdir={workdir}",
          f"--config.{MID_STAGE_CHECKPOINTS}",
      ],
      env_extra={"MASC_FAULT": "NAN:step:collective:24"},
  )
  assert result.returncode == 2
  # One line naming the term: with NaN parameters every term is NaN, so any of the
  # collective's logged terms may be the one named, but one of them must be.
  named = re.fullmatch(
      r"error: non-finite loss term '(\w+)' of member seed 0 in stage collective "
      r"at step 24 \(global step 40\); stopping\..*",
      result.stderr.strip(),
  )
  assert named and named[1] in ("ce", "kd", "align", "total"), result.stderr
  # The last good checkpoint (stage step 20) is kept and holds finite parameters.
  step, meta = latest_meta(workdir)
  assert (meta["stage"], meta["stage_step"]) == ("collective", 20)
  config = config_lib.load_config("tiny", [MID_STAGE_CHECKPOINTS])
  society = build_society(config)
  run = train.Run(society, workdir, log=lambda _: None)
  state, _ = run.restore_or_init()
  run.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_a_saved_config_with_the_removed_nan_step_field_still_resumes(
    tmp_path,
):
  """``debug_nan_step`` (fault injection, result-neutral) left the config: a workdir
  whose saved config.json holds it is the same run; a result field still counts.
  """
  saved = json.loads(config_lib.load_config("tiny").to_json())
  for value in (-1, 40):
    saved["debug_nan_step"] = value
    (tmp_path / "config.json").write_text(json.dumps(saved))
    workdir_lib.check_workdir(config_lib.load_config("tiny"), str(tmp_path))
  saved["seed"] = 1
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(workdir_lib.WorkdirError, match="seed: saved 1, now 0"):
    workdir_lib.check_workdir(config_lib.load_config("tiny"), str(tmp_path))


def test_same_seed_same_everything_other_seed_differs():
  config = config_lib.load_config("tiny")
  society = build_society(config)
  init = lambda seed: train.init_run_state(
      society, jax.random.split(jax.random.key(seed))[0]
  )
  a, b, c = init(0), init(0), init(1)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # Every randomly initialised weight differs (biases, BN and momentum start at constants).
  kernels = lambda s: [
      leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(
          {name: m.params for name, m in s.items()}
      )[0]
      if "kernel" in jax.tree_util.keystr(path)
  ]
  assert kernels(a) and all(
      not np.array_equal(x, z) for x, z in zip(kernels(a), kernels(c))
  )
  per_agent = batches.agent_indices(
      society.dataset.train_labels, society.class_groups
  )
  order = lambda seed: batches.AgentBatches(per_agent, 16, seed).indices(0)
  np.testing.assert_array_equal(order(0), order(0))
  assert not np.array_equal(order(0), order(1))
