"""Populations: member p of a population computes what the single run of its seed and settings does.

The reference for every member is an ordinary single run (``--config.seeds=``
one seed, the swept values set as plain config values), computed separately.
"""

import json
import os
import re

import jax
import numpy as np
import pytest

from masc_jax.data import batches
from masc_jax import config_lib
from masc_jax.reporting import tensorboard_log
from masc_jax.training import population, protocol, train, workdir as workdir_lib
from masc_jax.training.society import build_society
from masc_jax.training.step_log import NonFiniteLossError
from conftest import quick_compile, run_main

# Two seeds crossed with two values of a swept loss weight: P = 4.
POPULATION = ["ablations=False", "seeds=3,5", "sweep=loss.align_weight=0.1,0.3"]


def single_config(member: config_lib.Member):
  overrides = ["ablations=False", f"seeds={member.seed}"]
  overrides += [f"{field}={value}" for field, value in member.settings]
  return config_lib.load_config("tiny", overrides)


@pytest.fixture(scope="module")
def trained_population(tmp_path_factory):
  """The tiny population through every stage: ``(workdir, results, final state)``."""
  workdir = str(tmp_path_factory.mktemp("population"))
  config = config_lib.load_config("tiny", POPULATION)
  run = train.Run(build_society(config), workdir, log=lambda _: None)
  try:
    results = run.run()
  finally:
    run.close()
  return workdir, results, run.state


def test_members_are_the_grid_crossed_with_the_seeds():
  config = config_lib.load_config("tiny", POPULATION)
  members = config_lib.members_of(config)
  assert [(m.seed, dict(m.settings)) for m in members] == [
      (3, {"loss.align_weight": 0.1}),
      (5, {"loss.align_weight": 0.1}),
      (3, {"loss.align_weight": 0.3}),
      (5, {"loss.align_weight": 0.3}),
  ]
  single = config_lib.member_config(config, members[2])
  assert (
      single.seed,
      single.seeds,
      single.sweep,
      single.loss.align_weight,
  ) == (3, "", "", 0.3)
  # One seed and no sweep is a population of one, which by default runs its member's
  # own program (the single run's) on every backend.
  plain = population.MemberAxis(
      config_lib.members_of(single_config(members[2]))
  )
  assert plain.size == 1 and plain.members[0].seed == 3
  assert plain.strategy == "loop" and plain.mesh_members == 1


def test_each_member_draws_the_data_order_of_its_seed():
  """Stacked batches: member p's indices are those of a batch order seeded with its seed."""
  society = build_society(config_lib.load_config("tiny", POPULATION))
  per_agent_ix = batches.agent_indices(
      society.dataset.train_labels, society.class_groups
  )
  for step in (0, 7):
    got = society.pooled_batches.indices(step)  # [P, B]
    for p, member in enumerate(society.members.members):
      want = batches.OwnerBatches(
          per_agent_ix, society.config.batch_size, seed=member.seed
      )
      np.testing.assert_array_equal(got[p], want.indices(step))
    assert not np.array_equal(got[0], got[1])  # seeds 3 and 5 differ
    per_agent = society.agent_batches.indices(step)  # [P, K, B]
    assert per_agent.shape[:2] == (4, society.num_agents)
    assert not np.array_equal(per_agent[0], per_agent[1])
    np.testing.assert_array_equal(
        per_agent[0], per_agent[2]
    )  # same seed, other setting


def three_steps_per_stage(society, state, keys, num_steps=3, stages=None):
  """Every stage's (or ``stages``') first steps from ``state``; the final states and the losses."""
  names = protocol.stage_names(society.config)
  members = society.members
  losses = {}
  for stage in stages or names:
    stage_key = members.fold_in(keys, names.index(stage))
    compiled, frozen, get_batch = train.compile_stage(
        society, protocol.BY_NAME[stage], state, 0, stage_key
    )
    # The training loop's way: members in turn keep their states apart within a stage.
    model_state = compiled.unstack(state[stage])
    losses[stage] = []
    for step in range(num_steps):
      model_state, metrics = compiled.step_members(
          model_state, get_batch(step), members.fold_in(stage_key, step), frozen
      )
      losses[stage].append(
          np.asarray(population.stack_member_metrics(metrics)["total"])
      )
    state = {**state, stage: compiled.stack(model_state)}
  return state, losses


def initial_state(society):
  run = train.Run(society, "/nonexistent-unused", log=lambda _: None)
  try:
    return (
        jax.jit(lambda: train.init_population_state(society, run.init_key))(),
        run.train_key,
    )
  finally:
    run.close()


@pytest.fixture(scope="module")
def single_runs_three_steps():
  """Members 0 and 3 of the population as single runs: three steps of every stage.

  Compiled with most optimisation off, as are the populations compared with them
  (``quickly_compiled``): three steps of many programs, mostly compiling.
  """
  members = config_lib.members_of(config_lib.load_config("tiny", POPULATION))
  out = {}
  with quick_compile():
    for p in (0, 3):
      society = build_society(single_config(members[p]))
      out[p] = three_steps_per_stage(society, *initial_state(society))
  return out


@pytest.mark.parametrize("strategy", ["loop", "threads", "unroll", "vmap"])
def test_members_match_their_single_runs_step_by_step(
    single_runs_three_steps, strategy, quickly_compiled
):
  """Each member's losses and parameters after three steps of every stage match its
  single run's: identical where the computation is the same (``loop`` and ``threads`` run each
  member through the single run's program; unrolled, the experts, which read no
  swept setting), else within float tolerance (a batched program rounds differently).
  """
  config = config_lib.load_config(
      "tiny", POPULATION + [f"member_map={strategy}"]
  )
  society = build_society(config)
  assert society.members.strategy == strategy and society.members.size == 4
  # Unrolled: the experts only (their exactness is the point; the suite's time is short).
  stages = ("experts",) if strategy == "unroll" else None
  final, losses = three_steps_per_stage(
      society, *initial_state(society), stages=stages
  )
  for p, (single_final, single_losses) in single_runs_three_steps.items():
    for stage, values in single_losses.items():
      if stage not in losses:
        continue
      got = [
          np.asarray(leaf)
          for leaf in jax.tree.leaves(
              jax.tree.map(lambda x: x[p], final[stage].params)
          )
      ]
      # The single run is a population of one: its member 0.
      want = [
          np.asarray(leaf)[0]
          for leaf in jax.tree.leaves(single_final[stage].params)
      ]
      values = [np.asarray(v)[0] for v in values]
      if strategy in config_lib.IN_TURN or (
          strategy == "unroll" and stage == "experts"
      ):
        np.testing.assert_array_equal(
            np.stack(losses[stage])[:, p], np.stack(values)
        )
        for a, b in zip(got, want):
          np.testing.assert_array_equal(a, b)
        continue
      np.testing.assert_allclose(
          np.stack(losses[stage])[:, p],
          np.stack(values),
          rtol=2e-4,
          atol=1e-5,
          err_msg=stage,
      )
      for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5, err_msg=stage)


def test_members_side_by_side_on_threads_equal_members_in_turn(
    quickly_compiled,
):
  """``threads`` through the training loop's path (states kept apart, ``step_members``,
  stacked at the end) gives the same bits as ``loop`` through the stacked step, in a stage
  with frozen models and a swept setting (each member must get its own of both).
  """
  stage = "altruism"
  out = {}
  for strategy in ("loop", "threads"):
    config = config_lib.load_config(
        "tiny", POPULATION + [f"member_map={strategy}"]
    )
    society = build_society(config)
    assert society.members.strategy == strategy
    state, keys = initial_state(society)
    stage_key = society.members.fold_in(
        keys, protocol.stage_names(config).index(stage)
    )
    compiled, frozen, get_batch = train.compile_stage(
        society, protocol.BY_NAME[stage], state, 0, stage_key
    )
    if strategy == "loop":
      model_state, losses = state[stage], []
      for step in range(2):
        model_state, metrics = compiled(
            model_state,
            get_batch(step),
            society.members.fold_in(stage_key, step),
            frozen,
        )
        losses.append(np.asarray(metrics["total"]))
    else:
      member_states, losses = compiled.unstack(state[stage]), []
      for step in range(2):
        member_states, metrics = compiled.step_members(
            member_states,
            get_batch(step),
            society.members.fold_in(stage_key, step),
            frozen,
        )
        assert len(metrics) == society.members.size
        losses.append(
            np.asarray(population.stack_member_metrics(metrics)["total"])
        )
      model_state = compiled.stack(member_states)
    out[strategy] = (np.stack(losses), jax.tree.leaves(model_state))
  last = out["loop"][0][-1]  # [P, ...]
  assert not np.array_equal(last[0], last[1]) and not np.array_equal(
      last[0], last[2]
  )
  np.testing.assert_array_equal(out["threads"][0], out["loop"][0])
  for a, b in zip(out["threads"][1], out["loop"][1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_member_map_auto_and_threads_where_threads_cannot_run(monkeypatch):
  """``auto``: threads on one CPU device, loop with several devices or processes, vmap on
  accelerators; ``threads`` asked for where it cannot run is one clear config error.
  """
  assert (
      population.resolve_member_map("auto", "cpu", threads_ok=True) == "threads"
  )
  # One member (a single seed): its own program, on every backend.
  for backend in ("cpu", "gpu", "tpu"):
    assert (
        population.resolve_member_map(
            "auto", backend, threads_ok=True, num_members=1
        )
        == "loop"
    )
  assert population.resolve_member_map("vmap", "cpu", num_members=1) == "vmap"
  assert (
      population.resolve_member_map("auto", "cpu", threads_ok=False) == "loop"
  )
  assert population.resolve_member_map("auto", "gpu", threads_ok=True) == "vmap"
  assert population.resolve_member_map("loop", "cpu", threads_ok=True) == "loop"
  monkeypatch.setattr(population, "threads_possible", lambda: False)
  config = config_lib.load_config("tiny", ["seeds=0,1", "member_map=threads"])
  with pytest.raises(
      config_lib.ConfigError, match="member_map=threads .* use member_map=loop"
  ):
    build_society(config)


@pytest.mark.parametrize("member_index", [1, 2])
def test_a_members_evaluation_is_its_single_runs(
    trained_population, member_index
):
  """Given the same trained models, the population reports for member p exactly what a
  single run of p's seed and settings reports (routing, diagnostics and all)."""
  _, results, state = trained_population
  member = config_lib.members_of(config_lib.load_config("tiny", POPULATION))[
      member_index
  ]
  single = train.Run(
      build_society(single_config(member)),
      "/nonexistent-unused",
      log=lambda _: None,
  )
  try:
    # The single run's state: member p's models, as a population of one.
    member_state = jax.tree.map(
        lambda x: x[member_index : member_index + 1], state
    )
    want = single.evaluate(member_state, train.DONE)[0]
  finally:
    single.close()
  got = json.loads(json.dumps(results["members"][member_index]))
  assert got == json.loads(json.dumps(want))
  assert results["population"]["members"][member_index] == member.as_dict()


def test_population_results_hold_every_member_and_their_statistics(
    trained_population,
):
  workdir, results, _ = trained_population
  assert len(results["members"]) == 4
  general = [
      np.mean(m["rows"]["after_growth"]["general"]) for m in results["members"]
  ]
  summary = results["aggregate"]["rows"]["after_growth"]["general"]["mean"]
  assert summary["n"] == 4
  np.testing.assert_allclose(summary["mean"], np.mean(general), rtol=1e-9)
  assert results["sweep"]["groups"][0]["settings"] == {"loss.align_weight": 0.1}
  for name in (
      "results.json",
      "results.md",
      "report.png",
      "routing.png",
      "sweep.png",
  ):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name


def test_each_member_has_its_own_tensorboard_run(trained_population):
  from tensorboard.backend.event_processing import event_accumulator

  workdir, results, _ = trained_population
  members = results["population"]["members"]
  names = [tensorboard_log.run_name(m["seed"], m["settings"]) for m in members]
  assert sorted(os.listdir(os.path.join(workdir, "tensorboard"))) == sorted(
      names
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  last_ce = [r for r in records if r["stage"] == "collective" and "ce" in r][-1]
  (altruism_end,) = [
      r for r in records if r["stage"] == "altruism" and "eval" in r
  ]
  curves = []
  for name in names:
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard", name)
    )
    accumulator.Reload()
    curves.append(
        {
            tag: {e.step: e.value for e in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]
        }
    )
  # A loss term: each member's own value; the log line shows their mean.
  ce = [c["collective/ce"][last_ce["global_step"]] for c in curves]
  assert len(set(ce)) == len(ce)
  np.testing.assert_allclose(np.mean(ce), last_ce["ce"], rtol=1e-6)
  # The swept learning rate is not swept here: the config's, for every member.
  rates = [
      c["collective/learning_rate"][last_ce["global_step"]] for c in curves
  ]
  assert rates == pytest.approx([0.05] * len(names), rel=1e-7)
  # Each member's evaluation at the end of a stage: its own results.
  for index, curve in enumerate(curves):
    row = results["members"][index]["rows"]["after_growth"]
    assert curve["altruism/eval/expert"][
        altruism_end["global_step"]
    ] == pytest.approx(np.mean(row["expert"]), rel=1e-6)
    assert altruism_end["members"][index]["expert"] == pytest.approx(
        np.mean(row["expert"]), rel=1e-12
    )


def test_a_killed_population_resumes_to_identical_results(
    trained_population, tmp_path
):
  workdir = str(tmp_path / "run")
  args = ["--config=tiny", f"--workdir={workdir}"]
  args += [f"--config.{o}" for o in POPULATION]
  killed = run_main(args, env_extra={"MASC_FAULT": "KILL:step:collective:4"})
  assert killed.returncode == -9, killed.stderr[-2000:]
  finished = run_main(args)
  assert finished.returncode == 0, finished.stderr[-2000:]
  assert "resumed from checkpoint" in finished.stdout
  with open(os.path.join(workdir, "results.json")) as f:
    got = json.load(f)
  want = json.loads(json.dumps(trained_population[1], allow_nan=True))
  assert got["members"] == want["members"]
  assert got["aggregate"] == want["aggregate"]


def test_a_diverging_member_is_named_with_its_seed_and_settings(tmp_path):
  config = config_lib.load_config(
      "tiny",
      ["ablations=False", "seeds=0,1", "sweep=optim.learning_rate=0.05,1e30"],
  )
  with pytest.raises(NonFiniteLossError) as raised:
    train.train_and_evaluate(config, str(tmp_path), log=lambda _: None)
  message = str(raised.value)
  assert "optim.learning_rate=1e+30" in message and "stage experts" in message
  assert "optim.learning_rate=0.05" not in message


def test_a_field_added_after_a_run_started_is_what_the_run_did(tmp_path):
  """A workdir saved before a config field existed resumes when the field says what
  that run did (the behaviour before the field), and is refused when it does not.
  """
  saved = json.loads(config_lib.load_config("tiny").to_json())
  del saved["collective_batches"], saved["model"]["compute_dtype"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdir_lib.check_workdir(
      config_lib.load_config("tiny", ["collective_batches=shuffled"]),
      str(tmp_path),
  )
  with pytest.raises(
      workdir_lib.WorkdirError,
      match=re.escape("collective_batches: saved 'shuffled', now 'by_owner'"),
  ):
    workdir_lib.check_workdir(config_lib.load_config("tiny"), str(tmp_path))


def test_a_changed_seed_list_or_sweep_is_a_config_change(tmp_path):
  """The saved-config guard: another seed list or sweep is another run."""
  saved = config_lib.load_config("tiny", ["seeds=0,1"])
  with open(tmp_path / "config.json", "w") as f:
    f.write(saved.to_json())
  workdir_lib.check_workdir(
      config_lib.load_config("tiny", ["seeds=0,1", "member_map=unroll"]),
      str(tmp_path),
  )  # how members are mapped: same run
  for overrides, diff in (
      (["seeds=0,2"], "seeds: saved '0,1', now '0,2'"),
      (
          ["seeds=0,1", "sweep=loss.kd_weight=1,2"],
          "sweep: saved '', now 'loss.kd_weight=1,2'",
      ),
  ):
    with pytest.raises(workdir_lib.WorkdirError, match=re.escape(diff)):
      workdir_lib.check_workdir(
          config_lib.load_config("tiny", overrides), str(tmp_path)
      )
