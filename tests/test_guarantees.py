"""Each promise of docs/guarantees.md, tested where it could break.

Kills and preemptions land at *named* points of the run's hooks
(``masc_jax.training.hooks``; ``masc_jax.training.faults`` through the
``MASC_FAULT`` environment variable), so every test knows where its signal
arrived: during a checkpoint save, after a given step, during a compile, an
evaluation, between stages. Runs skip the ablation stages (``ablations=False``):
the three main stages draw the same keys either way, so their rows must equal
the uninterrupted ``tiny_run`` fixture's exactly.
"""

import functools
import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masc_jax.data import batches
from masc_jax import config_lib
from masc_jax.training import evaluation, hooks, population, protocol, train
from masc_jax.training.society import build_society
from masc_jax.method import losses, steps
from masc_jax.reporting import progress
from masc_jax.parallel import sharding
from masc_jax.training.step_log import NonFiniteLossError, StepLog
from conftest import MID_STAGE_CHECKPOINTS, REPO, run_main

MAIN_ROWS = ("before_growth", "after_growth", "cc_only")
TINY = ["--config=tiny", "--config.ablations=False"]


def run_tiny(workdir, *extra, fault=None):
  env = {"MASC_FAULT": fault} if fault else {}
  return run_main(
      TINY + [f"--workdir={workdir}", *extra], env_extra=env, timeout=600
  )


def committed_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return (
      sorted(int(n) for n in os.listdir(root) if n.isdigit())
      if os.path.isdir(root)
      else []
  )


def unfinished_saves(workdir):
  root = os.path.join(workdir, "checkpoints")
  return (
      [n for n in os.listdir(root) if ".orbax-checkpoint-tmp" in n]
      if os.path.isdir(root)
      else []
  )


def resumed_from(stdout):
  """``(global step, stage, stage step)`` of the "resumed from checkpoint" line, or None."""
  found = re.search(
      r"resumed from checkpoint (\d+): stage (\w+), step (\d+)", stdout
  )
  return (int(found[1]), found[2], int(found[3])) if found else None


def assert_main_rows_equal(workdir, reference):
  with open(os.path.join(workdir, "results.json")) as f:
    (got,) = json.load(f)["members"]
  (reference,) = json.loads(json.dumps(reference))["members"]
  for key in ("rows", "group_accuracy", "society_accuracy", "directionality"):
    for row in MAIN_ROWS:
      assert got[key][row] == reference[key][row], (key, row)
  assert (
      got["collective_accuracy"]["cc"] == reference["collective_accuracy"]["cc"]
  )


@pytest.fixture(scope="module")
def tiny_steps():
  """Steps per stage of the tiny config (experts, collective, altruism) and the
  checkpoint interval of ``MID_STAGE_CHECKPOINTS``."""
  config = config_lib.load_config("tiny", [MID_STAGE_CHECKPOINTS])
  society = build_society(config)
  per_stage = {
      spec.name: protocol.total_steps(society, spec)
      for spec in protocol.stages_for(config)
  }
  return per_stage, config.checkpoint_every_steps


# ----------------------------------------------------------------------------- kills


def test_killed_during_a_save_mid_stage_and_between_stages_resumes_exactly(
    tiny_run, tmp_path, tiny_steps
):
  """SIGKILL inside a save, right after a stage-boundary save, after a step; then finish.

  Each restart resumes from the newest checkpoint that was committed when the
  kill landed: progress lost is the steps since that checkpoint, no more.
  """
  per_stage, every = tiny_steps
  workdir = str(tmp_path / "run")
  mid_stage = f"--config.{MID_STAGE_CHECKPOINTS}"
  # 1. Inside the first save (experts step `every`): files written, not yet committed.
  first = run_tiny(workdir, mid_stage, fault="KILL:commit:experts:1")
  assert first.returncode == -9, first.stderr[-2000:]
  assert unfinished_saves(workdir) and committed_steps(workdir) == []
  # 2. Nothing committed: starts over (and cleans up the unfinished save); killed right after
  #    the collective's stage-end save was started.
  second = run_tiny(workdir, mid_stage, fault="KILL:stage_saved:collective:1")
  assert second.returncode == -9
  assert resumed_from(second.stdout) is None
  assert "[collective] done:" in second.stdout
  kept = committed_steps(workdir)
  assert (
      kept
      and max(kept) >= per_stage["experts"] + per_stage["collective"] - every
  )
  # 3. Resumes from the newest committed checkpoint; killed after altruism step 5.
  third = run_tiny(workdir, mid_stage, fault="KILL:step:altruism:5")
  assert third.returncode == -9
  assert resumed_from(third.stdout)[0] == max(kept)
  kept = committed_steps(workdir)
  # 4. Finishes from the newest committed checkpoint, to the uninterrupted results.
  final = run_tiny(workdir, mid_stage)
  assert final.returncode == 0, final.stderr[-2000:]
  assert resumed_from(final.stdout)[0] == max(kept)
  assert not unfinished_saves(workdir)
  assert_main_rows_equal(workdir, tiny_run[1])


def test_checkpoints_every_interval_bound_the_progress_a_kill_loses(tmp_path):
  """Saves happen at every multiple of checkpoint_every_steps inside a stage, and at its end."""
  config = config_lib.load_config(
      "tiny", ["ablations=False", "checkpoint_every_steps=4"]
  )
  society = build_society(config)
  run = train.Run(society, str(tmp_path), log=lambda _: None)
  saved = []
  run.checkpointer.save = lambda step, state, meta: saved.append(
      (step, meta["stage"], meta["stage_step"])
  )
  state, meta = run.restore_or_init()
  spec = protocol.BY_NAME["experts"]
  run.train_stage(
      spec, state, meta, types.SimpleNamespace(raised=False, poll=lambda: False)
  )
  run.close()
  total = protocol.total_steps(society, spec)
  assert saved == [(s, "experts", s) for s in range(4, total, 4)]


class Recorder(hooks.RunHooks):
  """Every point the run reaches, and each stage's step passed through ``wrap_step``."""

  def __init__(self):
    self.points, self.wrapped = [], []

  def reached(self, point, stage):
    self.points.append((point, stage))

  def wrap_step(self, stage, step):
    self.wrapped.append(stage)
    return CountingStep(step, self)


class CountingStep:
  """A stage step that records its calls; its outputs are the step's own."""

  def __init__(self, step, recorder):
    self.step, self.recorder = step, recorder

  def step_members(self, *args):
    self.recorder.points.append(("step_members", None))
    return self.step.step_members(*args)

  def __getattr__(self, name):
    return getattr(self.step, name)


def test_the_loop_calls_its_hooks_at_the_named_points(tmp_path):
  """The seam the fault injection uses: every named point, in order, and the
  wrapped step is the one the loop runs."""
  config = config_lib.load_config("tiny", ["ablations=False"])
  society = build_society(config)
  recorder = Recorder()
  run = train.Run(society, str(tmp_path), log=lambda _: None, hooks=recorder)
  state, meta = run.restore_or_init()
  spec = protocol.BY_NAME["experts"]
  state = run.train_stage(
      spec, state, meta, types.SimpleNamespace(raised=False, poll=lambda: False)
  )
  run.evaluate_stage(state, spec)
  run.close()
  total = protocol.total_steps(society, spec)
  assert recorder.wrapped == ["experts"]
  assert recorder.points == (
      [("compiled", "experts")]
      + [("step_members", None), ("step", "experts")] * total
      + [("evaluated", "experts")]
  )
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_during_compile_and_evaluation_saves_and_exits_143(
    tiny_run, tmp_path, tiny_steps
):
  """Preempted during a compile and during an evaluation, resumed each time with
  result-neutral fields changed (checkpoint interval, log rate, checkpoints kept).
  """
  per_stage, _ = tiny_steps
  workdir = str(tmp_path / "run")
  boundary = {
      "collective": per_stage["experts"],
      "altruism": per_stage["experts"] + per_stage["collective"],
  }
  # During the collective's compile: the stage-boundary position is the checkpoint.
  a = run_tiny(workdir, fault="TERM:compiled:collective:1")
  assert a.returncode == 143, a.stderr[-2000:]
  assert (
      "SIGTERM: saved a checkpoint at stage collective, step 0; exiting"
      in a.stdout
  )
  assert (
      f"[collective] {per_stage['collective']} steps" not in a.stdout
  )  # stopped before training
  assert max(committed_steps(workdir)) == boundary["collective"]
  # During the collective's evaluation: its stage-end checkpoint, then stop.
  b = run_tiny(
      workdir,
      "--config.checkpoint_every_steps=7",
      "--config.log_every_steps=3",
      fault="TERM:evaluated:collective:1",
  )
  assert b.returncode == 143, b.stderr[-2000:]
  assert resumed_from(b.stdout) == (boundary["collective"], "collective", 0)
  assert "[collective] step     3/" in b.stdout  # the new log rate took effect
  assert (
      "SIGTERM: saved a checkpoint at stage altruism, step 0; exiting"
      in b.stdout
  )
  assert "[altruism]" not in b.stdout
  assert max(committed_steps(workdir)) == boundary["altruism"]
  c = run_tiny(workdir, "--config.keep_checkpoints=3")
  assert c.returncode == 0, c.stderr[-2000:]
  assert resumed_from(c.stdout) == (boundary["altruism"], "altruism", 0)
  assert_main_rows_equal(workdir, tiny_run[1])


def test_sigterm_before_the_first_checkpoint_saves_step_0(tmp_path):
  """Preempted while the first stage compiles: no checkpoint exists yet, so one is written."""
  workdir = str(tmp_path / "run")
  result = run_tiny(workdir, fault="TERM:compiled:experts:1")
  assert result.returncode == 143, result.stderr[-2000:]
  assert (
      "SIGTERM: saved a checkpoint at stage experts, step 0; exiting"
      in result.stdout
  )
  assert committed_steps(workdir) == [0]


def test_sigterm_between_stages_stops_before_the_next_one(tmp_path, tiny_steps):
  per_stage, _ = tiny_steps
  workdir = str(tmp_path / "run")
  result = run_tiny(workdir, fault="TERM:stage_saved:experts:1")
  assert result.returncode == 143
  assert (
      "SIGTERM: saved a checkpoint at stage collective, step 0; exiting"
      in result.stdout
  )
  assert "[collective]" not in result.stdout
  assert max(committed_steps(workdir)) == per_stage["experts"]


def test_a_kill_after_the_last_checkpoint_still_gets_its_results_written(
    tiny_run, tmp_path
):
  workdir = str(tmp_path / "run")
  killed = run_tiny(workdir, fault="KILL:finished:*:1")
  assert killed.returncode == -9
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  again = run_tiny(workdir)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "this run is finished" in again.stdout
  for name in ("results.json", "results.md", "report.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert_main_rows_equal(workdir, tiny_run[1])


# ----------------------------------------------------------------------------- non-finite values


def _step_log(every=1, members=(config_lib.Member(0),)):
  lines = []
  logger = progress.MetricsLogger(os.devnull, enabled=False)
  log = StepLog(
      "collective",
      total=10,
      images_per_step=8,
      every=every,
      global_offset=100,
      log=lines.append,
      metrics_log=logger,
      members=population.MemberAxis(members, "loop"),
  )
  return log, lines


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_term_stops_the_run_naming_stage_step_and_term(bad):
  log, _ = _step_log()
  log.add(3, {"ce": jnp.float32([0.5]), "kd": jnp.float32([0.1])})
  log.add(4, {"ce": jnp.float32([0.4]), "kd": jnp.float32([bad])})
  with pytest.raises(
      NonFiniteLossError,
      match=r"non-finite loss term 'kd' of member seed 0 in stage collective at step 4 "
      r"\(global step 104\)",
  ):
    log.flush(5)


def test_a_non_finite_term_names_only_the_members_it_is_in():
  members = (config_lib.Member(3), config_lib.Member(5), config_lib.Member(7))
  log, _ = _step_log(members=members)
  log.add(0, [{"ce": jnp.float32(v)} for v in (0.5, np.nan, 0.25)])
  with pytest.raises(
      NonFiniteLossError, match=r"'ce' of member seed 5 in stage collective"
  ):
    log.flush(1)


def test_finite_terms_are_logged_at_the_due_steps():
  log, lines = _step_log(every=4)
  assert [d for d in range(1, 11) if log.is_due(d)] == [4, 8, 10]
  log.add(0, {"ce": jnp.float32([0.25])})
  log.flush(1)
  assert len(lines) == 1 and "ce 0.2500" in lines[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_parameters_that_are_not_finite_are_never_checkpointed(tmp_path, bad):
  config = config_lib.load_config("tiny", ["ablations=False"])
  run = train.Run(build_society(config), str(tmp_path), log=lambda _: None)
  state, meta = run.restore_or_init()
  poisoned = {
      **state,
      "collective": state["collective"].replace(
          params=jax.tree.map(
              lambda p: p.at[(0,) * p.ndim].set(bad), state["collective"].params
          )
      ),
  }
  with pytest.raises(
      NonFiniteLossError, match="refusing to checkpoint non-finite parameters"
  ):
    run.save(poisoned, {**meta, "stage": "collective", "stage_step": 5})
  run.save(state, {**meta, "stage": "collective", "stage_step": 6})
  run.close()
  assert committed_steps(str(tmp_path)) == [run.offsets["collective"] + 6]


# ----------------------------------------------------------------------------- the seed


def test_the_run_draws_its_initialisation_and_data_order_from_config_seed(
    tmp_path,
):
  """Through train's own entry points: another config.seed, other weights and batches."""

  def society_and_state(seed):
    config = config_lib.load_config("tiny", ["ablations=False", f"seed={seed}"])
    society = build_society(config)
    run = train.Run(society, str(tmp_path / f"s{seed}"), log=lambda _: None)
    state, _ = run.restore_or_init()
    run.close()
    return society, state

  for seed in (3, 4):
    society, state = society_and_state(seed)
    expected = train.init_run_state(
        society, jax.random.split(jax.random.key(seed))[0]
    )
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
      # The run's one member.
      np.testing.assert_array_equal(np.asarray(got)[0], np.asarray(want))
    per_agent = batches.agent_indices(
        society.dataset.train_labels, society.class_groups
    )
    np.testing.assert_array_equal(
        society.agent_batches.indices(7)[0],
        batches.AgentBatches(
            per_agent, society.config.batch_size, seed
        ).indices(7),
    )
    np.testing.assert_array_equal(
        society.pooled_batches.indices(7)[0],
        batches.OwnerBatches(
            per_agent, society.config.batch_size, seed
        ).indices(7),
    )
  three, four = society_and_state(3)[0], society_and_state(4)[0]
  assert not np.array_equal(
      three.agent_batches.indices(0), four.agent_batches.indices(0)
  )


# ----------------------------------------------------------------------------- wiring


def test_ra_teacher_collective_distils_from_the_collective(tmp_path):
  """With ra_teacher=collective the altruism step reads S (not the experts) as its teacher."""
  config = config_lib.load_config(
      "tiny", ["ablations=False", "loss.ra_teacher=collective"]
  )
  society = build_society(config)
  run = train.Run(society, str(tmp_path), log=lambda _: None)
  state, _ = run.restore_or_init()
  run.close()
  spec = protocol.BY_NAME["altruism"]
  frozen = spec.frozen(society, spec, state)
  for a, b in zip(
      jax.tree.leaves(frozen["teacher"]),
      jax.tree.leaves(state["collective"].variables()),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  keys = jax.random.key(0)[None]  # [P = 1]
  compiled, frozen, get_batch = train.compile_stage(
      society, spec, state, 0, keys
  )
  # The same step of the run's one member, built by hand with S as the (unstacked)
  # teacher network.
  by_hand = jax.jit(
      functools.partial(
          steps.altruism_step,
          backbone=society.backbone,
          head=society.head,
          teacher_network=society.collective_network,
          teacher_is_stacked=False,
          tx=steps.make_optimizer(config.optim),
          augment=protocol._augment(society),
          settings=losses.LossSettings.from_config(config.loss),
          strategy=society.strategy,
      )
  )
  member = lambda tree: jax.tree.map(lambda x: x[0], tree)
  collective = member(state["collective"].variables())
  want_state, want = by_hand(
      member(state["altruism"]),
      member(get_batch(0)),
      jax.random.fold_in(keys[0], 0),
      {
          "backbone": {n: t["backbone"] for n, t in collective.items()},
          "teacher": collective,
      },
  )
  got_state, got = compiled(
      state["altruism"],
      get_batch(0),
      society.members.fold_in(keys, 0),
      frozen,
  )
  got_state, got = member(got_state), member(got)
  np.testing.assert_allclose(
      np.asarray(got["kd"]), np.asarray(want["kd"]), rtol=1e-5
  )
  np.testing.assert_allclose(
      np.asarray(got["total"]), np.asarray(want["total"]), rtol=1e-5
  )
  assert np.all(np.asarray(got["kd"]) > 0)
  for a, b in zip(
      jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)
  ):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6
    )


def test_a_padded_last_eval_batch_gives_the_unpadded_predictions():
  images = jnp.asarray(
      np.random.default_rng(0).integers(0, 256, (23, 4, 4, 1)), jnp.uint8
  )
  weights = jnp.asarray(
      np.random.default_rng(1).standard_normal((16, 5)), jnp.float32
  )

  @jax.jit
  def predict(variables, x):
    logits = x.reshape(x.shape[0], -1).astype(jnp.float32) @ variables
    return {
        "row": jnp.stack([jnp.argmax(logits, -1), jnp.argmin(logits, -1)]),
        "collective": jnp.argmax(logits, -1),
    }

  whole = jax.device_get(predict(weights, images))
  for batch_size in (
      5,
      7,
      23,
      30,
  ):  # 23 = 4x5 + 3, 3x7 + 2, exact, one padded batch
    got = evaluation.predict_all(predict, weights, images, 23, batch_size)
    assert got["row"].shape == (2, 23) and got["collective"].shape == (23,)
    np.testing.assert_array_equal(got["row"], whole["row"])
    np.testing.assert_array_equal(got["collective"], whole["collective"])


# ----------------------------------------------------------------------------- devices

THREE_DEVICES = {
    "JAX_NUM_CPU_DEVICES": "3"
}  # odd: divides neither K=5 nor batch 16


@pytest.mark.parametrize(
    "agents, data, batch, per_agent, pooled",
    [
        (
            2,
            2,
            16,
            ("agents", "data"),
            (("agents", "data"),),
        ),  # everything splits
        (
            5,
            1,
            40,
            ("agents", "data"),
            (("agents", "data"),),
        ),  # K=5 on 5 devices, batch 40
        (5, 1, 32, ("agents", "data"), ()),  # ... batch 32: pooled stays whole
        (1, 3, 16, ("agents",), ()),  # 3 devices, batch 16
        (
            2,
            4,
            12,
            ("agents", "data"),
            ("data",),
        ),  # 12 splits over data, not over 8
        (4, 3, 8, ("agents",), ("agents",)),  # 8 splits over agents only
    ],
)
def test_batches_split_over_the_widest_axes_they_divide(
    agents, data, batch, per_agent, pooled
):
  mesh = types.SimpleNamespace(
      shape={"agents": agents, "data": data}, size=agents * data
  )
  layout = sharding.batch_layout(mesh, batch)
  assert tuple(layout["per_agent"]) == per_agent
  assert tuple(layout["pooled"]) == pooled

  # Whatever the layout, every device's share is whole.
  def ways(entry):
    names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
    return int(np.prod([mesh.shape[n] for n in names] or [1]))

  per_agent_split = (
      ways(layout["per_agent"][1]) if len(layout["per_agent"]) > 1 else 1
  )
  pooled_split = ways(layout["pooled"][0]) if len(layout["pooled"]) else 1
  assert batch % per_agent_split == 0 and batch % pooled_split == 0
  # The log says so whenever a batch uses fewer devices than it could.
  notes = sharding.describe_layout(mesh, batch)
  assert bool(notes) == (pooled_split < mesh.size or per_agent_split < data)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--config.num_devices=4"],
            "num_devices=4 but only 3 devices are visible",
        ),
        (
            ["--config.agent_axis_size=2"],
            "agent_axis_size=2 must divide both the number of agents (5) and the number of devices (3): "
            "use one of [1]",
        ),
    ],
)
def test_device_settings_that_cannot_hold_the_run_exit_2_writing_nothing(
    tmp_path, overrides, message
):
  workdir = tmp_path / "run"
  result = run_main(
      ["--config=tiny", f"--workdir={workdir}", *overrides],
      env_extra=THREE_DEVICES,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [f"error: {message}"]
  assert not workdir.exists()


def test_by_default_the_mesh_spans_every_visible_device():
  """3 visible devices, no num_devices: all three are used (K=5 over 1 agent row, data over 3)."""
  script = (
      "from masc_jax import config_lib\n"
      "from masc_jax.training.society import build_society\n"
      "for extra in ([], ['num_devices=2']):\n"
      "  society = build_society(config_lib.load_config('tiny', ['batch_size=30', *extra]))\n"
      "  print(dict(society.mesh.shape), sorted(d.id for d in society.mesh.devices.flat))\n"
  )
  out = subprocess.run(
      [sys.executable, "-c", script],
      cwd=REPO,
      capture_output=True,
      text=True,
      env={**os.environ, **THREE_DEVICES},
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines() == [
      "{'members': 1, 'agents': 1, 'data': 3} [0, 1, 2]",
      "{'members': 1, 'agents': 1, 'data': 2} [0, 1]",
  ]
