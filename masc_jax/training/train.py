"""The socialized-learning run: every stage of ``protocol.STAGES`` in order, then the table.

``train_and_evaluate(config, workdir)`` is the whole job. The stages, their
models, batches, steps and result rows come from the stage table
(``protocol``); this module only runs them: it builds the society (data on
device, class groups, networks, mesh), initialises or restores every model,
compiles each stage's step for the mesh, runs it with checkpoints, logs and
NaN checks, evaluates after each stage, and writes results.json / results.md /
report.png. Observers (fault injection in the tests) attach through
``hooks.RunHooks``: the loop calls them at named points.

Everything a resume needs is in the checkpoint: every model's state and the
run position (stage, step). Data order and step keys are pure functions of
(seed, stage, step), so a resumed run repeats the uninterrupted one exactly.

Every run is a population (``config.seeds``, ``config.sweep``;
``masc_jax.training.population``), a single seed one of one member: every model,
batch and key carries a leading member axis ``[P, ...]``, each stage's step runs
over it (``society.members.compile_step``) with the swept settings as
per-member arrays, and the results are each member's plus their statistics
(``masc_jax.reporting.report`` has the format).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from masc_jax.method import agents, routing, steps
from masc_jax.data import augment
from masc_jax.training import checkpointing, evaluation, hooks as hooks_lib, protocol, watch, workdir as workdir_lib
from masc_jax import paths
from masc_jax.reporting import plots, stats, progress, report, routing_diagnostics
from masc_jax.parallel import sharding
from masc_jax.training.step_log import NonFiniteLossError, StepLog
from masc_jax.training.protocol import StageSpec
from masc_jax.training.society import Society, build_society

PyTree = Any
DONE = "done"  # the run position after the last stage


class Preempted(SystemExit):
  """SIGTERM or SIGINT arrived; a checkpoint was saved."""


# ----------------------------------------------------------------------------- state


def init_run_state(
    society: Society, rng: jax.Array
) -> dict[str, steps.ModelState]:
  """Every model the run trains, freshly initialised, keyed by stage name.

  One key per kind of model (``protocol.MODEL_KINDS``), split per agent for
  stacked models; stages of one kind start from the same state.
  """
  config = society.config
  k = society.num_agents
  tx = steps.make_optimizer(config.optim)
  image = jnp.zeros((1,) + society.dataset.image_shape, jnp.float32)
  keys = dict(
      zip(
          protocol.MODEL_KINDS, jax.random.split(rng, len(protocol.MODEL_KINDS))
      )
  )

  def heads(key):
    features = jax.eval_shape(
        lambda v: society.backbone.apply(v, image, train=False),
        {
            "params": init["collective"].params["backbone"],
            "batch_stats": init["collective"].batch_stats["backbone"],
        },
    )
    feature_input = jnp.zeros(features.shape, jnp.float32)
    return agents.init_stacked(
        lambda key: steps.init_model_state(
            society.head, key, feature_input, tx
        ),
        jax.random.split(key, k),
    )

  makers = {
      "experts": lambda key: agents.init_stacked(
          lambda key: steps.init_model_state(
              society.expert_network, key, image, tx
          ),
          jax.random.split(key, k),
      ),
      "collective": lambda key: steps.init_model_state(
          society.collective_network, key, image, tx
      ),
      "heads": heads,
  }
  init = {}
  for (
      kind
  ) in (
      protocol.MODEL_KINDS
  ):  # in this order: heads read the collective's feature shape
    init[kind] = makers[kind](keys[kind])
  return {spec.name: init[spec.model] for spec in protocol.stages_for(config)}


def init_population_state(
    society: Society, init_keys: jax.Array
) -> dict[str, steps.ModelState]:
  """``init_run_state`` of every member (``init_keys [P]``), stacked ``[P, ...]``.

  Each member starts from its own key with its own settings (a swept momentum
  keeps a momentum trace in every member's optimiser state).
  """
  members = society.members
  return members.map(
      lambda key, settings: init_run_state(society.with_settings(settings), key)
  )(init_keys, members.hparams())


def state_shardings(
    society: Society, abstract_state: PyTree, member_axis: bool = True
) -> PyTree:
  """Stacked models along the agent axis; the collectives replicated (members split).

  ``member_axis=False``: the shardings of one member's state (a member's own
  program, ``population.MembersInTurn``).
  """
  mesh = society.mesh
  placement = {
      protocol.STACKED: sharding.stacked(mesh, member_axis),
      protocol.REPLICATED: sharding.replicated(mesh, member_axis),
  }
  return {
      name: sharding.tree_sharding(
          tree, placement[protocol.BY_NAME[name].sharding]
      )
      for name, tree in abstract_state.items()
  }


# ----------------------------------------------------------------------------- steps


def batch_source(
    society: Society, spec: StageSpec
) -> Callable[[int], dict[str, jax.Array]]:
  """``step -> batch`` on device, gathered from the resident uint8 images."""
  place = (
      sharding.agent_batch
      if spec.batches == protocol.PER_AGENT
      else sharding.pooled_batch
  )
  batch_sharding = place(society.mesh, society.config.batch_size, True)
  indices = protocol.batches_of(society, spec).indices

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def gather(images, labels, idx):
    return {"image": images[idx], "label": labels[idx]}

  return lambda step: gather(
      society.train_images, society.train_labels, indices(step)
  )


def compile_stage(
    society: Society,
    spec: StageSpec,
    state: dict[str, steps.ModelState],
    start_step: int,
    stage_key: jax.Array,
):
  """The stage's step over every member, jit-compiled ahead of time for the mesh.

  Returns ``(compiled, frozen, get_batch)``: call
  ``compiled.step_members(compiled.unstack(state[spec.name]), get_batch(step),
  members.fold_in(stage_key, step), frozen)``, and ``compiled.stack`` the
  states for a checkpoint and at the stage's end (the training loop's way:
  members that run in turn keep their states apart within a stage);
  ``compiled(state, batch, rng, frozen)`` steps the stacked state. How the
  members are mapped (one program, or each member's own program in turn) is
  ``society.members.compile_step``'s choice. The trained state is donated,
  and constrained to keep its sharding (stacked along the agent axis, or
  replicated for a collective); the swept settings are per-member arrays.
  """
  members = society.members
  get_batch = batch_source(society, spec)
  replicated = sharding.replicated(society.mesh)
  member_step, constrain = stage_step_functions(society, spec, state)
  frozen = frozen_inputs(society, spec, state)
  hparams = jax.device_put(members.hparams(), replicated)
  example = (
      state[spec.name],
      get_batch(start_step),
      members.fold_in(stage_key, start_step),
  )
  step = members.compile_step(member_step, constrain, example, frozen, hparams)
  return step, frozen, get_batch


def stage_step_functions(
    society: Society, spec: StageSpec, state: dict[str, steps.ModelState]
) -> tuple[Callable, Callable]:
  """``compile_stage``'s ``(member_step, constrain)`` for ``members.compile_step``.

  ``members.step_program(*stage_step_functions(...))`` is the stage's jitted
  step, which ``masc_jax.preflight`` lowers with abstract inputs
  (``members.program_inputs``).
  """
  replicated = sharding.replicated(society.mesh)

  def member_step(model_state, batch, rng, frozen, settings):
    # Built inside the trace: a swept setting is a traced value of this member.
    return spec.make_step(society.with_settings(settings), spec)(
        model_state, batch, rng, frozen
    )

  def constrain(step_fn, member_axis):
    shardings = state_shardings(
        society, {spec.name: state[spec.name]}, member_axis
    )[spec.name]

    def constrained(model_state, batch, rng, frozen, hparams):
      new_state, metrics = step_fn(model_state, batch, rng, frozen, hparams)
      # Metrics replicated: a few numbers, and every process of a multi-process run
      # must be able to read them for the log and the NaN check.
      return (
          jax.lax.with_sharding_constraint(new_state, shardings),
          jax.lax.with_sharding_constraint(metrics, replicated),
      )

    return constrained

  return member_step, constrain


def stage_variables(
    spec: StageSpec, state: dict[str, steps.ModelState]
) -> dict[str, PyTree]:
  """The variables stage ``spec``'s predictions read: its model's, and its base's."""
  read = (spec,) + ((protocol.BY_NAME[spec.base],) if spec.base else ())
  return {s.variables_key: state[s.name].variables() for s in read}


def predict_program(society: Society, spec: StageSpec) -> Callable:
  """``Run.evaluate_stage``'s jitted prediction of one batch: ``(variables, settings, images)``.

  Its outputs are replicated: every process reads them.
  """
  ds = society.dataset
  normalize = functools.partial(augment.normalize, mean=ds.mean, std=ds.std)
  return jax.jit(
      lambda variables, settings, images: protocol.predict_rows(
          society.with_settings(settings),
          (spec,),
          variables,
          images,
          normalize,
      ),
      out_shardings=sharding.replicated(society.mesh),
  )


def frozen_inputs(
    society: Society, spec: StageSpec, state: dict[str, steps.ModelState]
) -> PyTree:
  """The frozen models ``spec``'s step reads, for every member.

  Whether a loss reads its teachers can depend on a swept weight (a KD weight
  of 0): take the teachers if any member's settings use them (a weight of 0
  then multiplies them away).
  """
  candidates = [
      spec.frozen(society.with_settings(settings), spec, state)
      for settings in society.members.distinct_settings()
  ]
  return max(candidates, key=lambda frozen: len(jax.tree.leaves(frozen)))


# ----------------------------------------------------------------------------- the loop


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Run:
  """One run in one workdir: trains the remaining stages, evaluates, reports."""

  def __init__(
      self,
      society: Society,
      workdir: str,
      log: Callable[[str], None] = print,
      hooks: hooks_lib.RunHooks | None = None,
  ):
    self.society = society
    self.hooks = hooks or hooks_lib.RunHooks()
    self.config = society.config
    self.workdir = workdir
    self.is_writer = jax.process_index() == 0
    self.log = log if self.is_writer else (lambda _: None)
    self.specs = protocol.stages_for(self.config)
    self.names = tuple(spec.name for spec in self.specs)
    starts = np.cumsum(
        [0] + [protocol.total_steps(society, spec) for spec in self.specs]
    )
    # The global step at which each stage starts.
    self.offsets = dict(zip(self.names + (DONE,), map(int, starts)))
    self.checkpointer = checkpointing.Checkpointer(
        paths.join(workdir, "checkpoints"), self.config.keep_checkpoints
    )
    self.metrics_log = progress.MetricsLogger(
        paths.join(workdir, "metrics.jsonl"), enabled=self.is_writer
    )
    self.members = society.members
    # Stage name -> its jitted prediction (evaluate_stage).
    self._predictors = {}
    self.watch = watch.RunWatch(
        self.config,
        self.members.members,
        workdir,
        enabled=self.is_writer,
        log=self.log,
    )
    keys = self.members.keys(
        lambda seed: jax.random.split(jax.random.key(seed))
    )  # [P, 2]
    self.init_key, self.train_key = keys[..., 0], keys[..., 1]
    # [P]; replicated, so every process can read it.
    self._finite = jax.jit(
        self.members.map(_all_finite),
        out_shardings=sharding.replicated(society.mesh),
    )

  # -- state and checkpoints

  def restore_or_init(self) -> tuple[dict, dict]:
    init = functools.partial(init_population_state, self.society, self.init_key)
    abstract = jax.eval_shape(init)
    shardings = state_shardings(self.society, abstract)
    restored = self.checkpointer.restore_latest_good(
        abstract, shardings, log=self.log
    )
    if restored is None:
      state = self.fresh_state(shardings)
      return state, {
          "stage": self.names[0],
          "stage_step": 0,
          "stage_results": {},
          "timings": {},
      }
    step, state, meta = restored
    self.log(
        f"resumed from checkpoint {step}: stage {meta['stage']}, step {meta['stage_step']}"
    )
    return state, meta

  def fresh_state(self, shardings: PyTree) -> PyTree:
    """Every member's models freshly initialised ``[P, ...]``, placed with ``shardings``."""
    return self.members.init(
        lambda key, settings: init_run_state(
            self.society.with_settings(settings), key
        ),
        self.init_key,
        shardings,
    )

  def save(self, state: dict, meta: dict) -> None:
    bad = self.members.nonfinite_members(jax.device_get(self._finite(state)))
    if bad:
      whose = "; ".join(m.describe() for m in bad)
      raise NonFiniteLossError(
          f"refusing to checkpoint non-finite parameters of {whose} in stage {meta['stage']} at step "
          f"{meta['stage_step']}; the last good checkpoint is kept"
      )
    # Every curve point up to this checkpoint on disk before it is.
    self.watch.flush()
    self.checkpointer.save(
        self.offsets[meta["stage"]] + meta["stage_step"], state, meta
    )

  def stop_if_preempted(
      self, stop: workdir_lib.StopSignals, state: dict, meta: dict
  ) -> None:
    """After SIGTERM or SIGINT: make sure a checkpoint holds this position, then exit 143 or 130."""
    if not stop.raised:
      return
    self.checkpointer.wait()
    if (
        self.offsets[meta["stage"]] + meta["stage_step"]
        not in self.checkpointer.all_steps()
    ):
      self.save(state, meta)
      self.checkpointer.wait()
    self.log(
        f"{stop.name}: saved a checkpoint at stage {meta['stage']}, step {meta['stage_step']}; "
        "exiting"
    )
    raise Preempted(stop.exit_status)

  # -- one stage

  def train_stage(
      self,
      spec: StageSpec,
      state: dict,
      meta: dict,
      stop: workdir_lib.StopSignals,
  ) -> dict:
    society, config, name = self.society, self.config, spec.name
    total, start = protocol.total_steps(society, spec), meta["stage_step"]
    stage_key = self.members.fold_in(self.train_key, self.names.index(name))
    t0 = time.perf_counter()
    compiled, frozen, get_batch = compile_stage(
        society, spec, state, start, stage_key
    )
    compile_s = time.perf_counter() - t0
    self.hooks.reached("compiled", name)
    compiled = self.hooks.wrap_step(name, compiled)
    # A SIGTERM during the compile: stop before training (this position is saved).
    stop.poll()
    self.stop_if_preempted(
        stop, state, {**meta, "stage": name, "stage_step": start}
    )
    self.log(
        f"[{name}] {total} steps ({config.batch_size} per batch, "
        f"{protocol.images_per_step(society, spec)} images per step); compiled in {compile_s:.1f}s"
        + (f"; resuming at step {start}" if start else "")
    )
    step_log = StepLog(
        name,
        total,
        protocol.images_per_step(society, spec),
        config.log_every_steps,
        self.offsets[name],
        self.log,
        self.metrics_log,
        self.members,
        on_logged=functools.partial(self.watch.training_point, name),
    )
    evaluate_after = self.watch.evaluation_steps(
        protocol.batches_of(society, spec).steps_per_epoch,
        config.epochs[spec.epochs],
    )
    # Members in turn: their states stay apart until a checkpoint or the stage's end.
    model_state = compiled.unstack(state[name])
    t_start = time.perf_counter()
    for step in range(start, total):
      self.watch.profiler.before_step(name, self.offsets[name] + step)
      model_state, metrics = compiled.step_members(
          model_state,
          get_batch(step),
          self.members.fold_in(stage_key, step),
          frozen,
      )
      self.watch.profiler.after_step(lambda: compiled.ready(model_state))
      step_log.add(step, metrics)
      done = step + 1
      self.hooks.reached("step", name)
      if step_log.is_due(done):
        step_log.flush(done)
      if done in evaluate_after:
        # Before a checkpoint at this step: a run resumed from it goes on after it.
        self.record_evaluation(
            spec,
            self.evaluate_stage(
                {**state, name: compiled.stack(model_state)}, spec
            ),
            meta,
            done,
            epoch=evaluate_after[done],
        )
      if stop.poll() or (
          done % config.checkpoint_every_steps == 0 and done < total
      ):
        step_log.flush(done)
        state = {**state, name: compiled.stack(model_state)}
        position = {**meta, "stage": name, "stage_step": done}
        self.save(state, position)
        self.stop_if_preempted(stop, state, position)
    self.watch.profiler.stage_end(lambda: compiled.ready(model_state))
    model_state = jax.block_until_ready(compiled.stack(model_state))
    train_s = time.perf_counter() - t_start
    meta["timings"][name] = {
        "compile_s": compile_s,
        "train_s": train_s,
        "steps": total - start,
        "images_per_s": (total - start)
        * protocol.images_per_step(society, spec)
        / max(train_s, 1e-9),
    }
    return {**state, name: model_state}

  # -- evaluation

  def evaluate(self, state: dict, upto: str) -> list[dict]:
    """Each member's results of every row whose models are trained (stages up to ``upto``)."""
    trained = (
        self.specs if upto == DONE else self.specs[: self.names.index(upto) + 1]
    )
    per_stage = [self.evaluate_stage(state, spec) for spec in trained]
    return [
        evaluation.merge_results(stages_of_member)
        for stages_of_member in zip(*per_stage)
    ]

  def evaluate_stage(self, state: dict, spec: StageSpec) -> list[dict]:
    """Each member's results of the rows and collective that stage ``spec`` feeds."""
    society, ds, members = self.society, self.society.dataset, self.members
    variables = stage_variables(spec, state)
    # One member at a time, with the single run's program: a member's routing
    # decisions sit on a knife's edge, and an eval program that fuses P members
    # rounds the free energies differently. Evaluation is a small part of a run.
    # One jitted function per stage: evaluations during a stage reuse its trace.
    predict = self._predictors.setdefault(
        spec.name, predict_program(society, spec)
    )  # read on every process
    results = []
    for index, member in enumerate(members.members):
      member_variables = jax.tree.map(lambda x: x[index], variables)
      settings = dict(member.settings)
      predictions = evaluation.predict_all(
          lambda v, images: predict(v, settings, images),
          member_variables,
          society.test_images,
          len(ds.test_labels),
          self.config.eval_batch_size,
      )
      results.append(
          evaluation.results_from_predictions(
              predictions,
              ds.test_labels,
              society.class_groups.groups,
              rows=spec.rows,
              collectives=[spec.collective] if spec.collective else [],
          )
      )
    self.hooks.reached("evaluated", spec.name)
    return results

  def finish_stage(self, spec: StageSpec, state: dict, meta: dict) -> dict:
    """Evaluate the stage's rows, log its summary, move the position on.

    Each stage's evaluation is kept in the run position (``meta``), so the
    final results merge them and no stage is evaluated twice.
    """
    member_results = self.evaluate_stage(state, spec)
    evaluations = {**meta.get("evaluations", {}), spec.name: member_results}
    meta["stage_results"][spec.name] = stage_summary(spec, member_results)
    total = protocol.total_steps(self.society, spec)
    timing = meta["timings"][spec.name]
    self.log(
        progress.stage_summary_line(
            spec.name,
            timing["steps"],
            timing["train_s"],
            timing["compile_s"],
            meta["stage_results"][spec.name],
        )
    )
    self.record_evaluation(
        spec,
        member_results,
        meta,
        total,
        epoch=self.config.epochs[spec.epochs],
    )
    position = self.names.index(spec.name) + 1
    meta = {
        **meta,
        "stage": self.names[position] if position < len(self.names) else DONE,
        "stage_step": 0,
        "evaluations": evaluations,
    }
    return meta

  def record_evaluation(
      self,
      spec: StageSpec,
      member_results: list[dict],
      meta: dict,
      stage_step: int,
      epoch: int,
  ) -> None:
    """An evaluation of stage ``spec`` after ``stage_step`` steps (``epoch`` epochs).

    Its summary numbers go to metrics.jsonl (the members' mean; and each
    member's, for a population) and TensorBoard (each member's), and into the
    run position (``meta["epoch_evaluations"]``, kept in checkpoints) for the
    report's curves.
    """
    summaries = [
        evaluation.summary(results, spec.rows, spec.collective)
        for results in member_results
    ]
    mean = {
        key: float(np.mean([s[key] for s in summaries])) for key in summaries[0]
    }
    global_step = self.offsets[spec.name] + stage_step
    record = {
        "stage": spec.name,
        "epoch": epoch,
        "global_step": global_step,
        "eval": mean,
    }
    if len(summaries) > 1:
      record["members"] = summaries
    epochs = self.config.epochs[spec.epochs]
    if epoch < epochs:  # the stage's end has its own line
      self.log(progress.evaluation_line(spec.name, epoch, epochs, mean))
    self.metrics_log.write(record)
    self.watch.evaluated(spec.name, global_step, summaries)
    # New containers, not appends: a checkpoint being written holds the old ones.
    curves = meta.get("epoch_evaluations", {})
    meta["epoch_evaluations"] = {
        **curves,
        spec.name: curves.get(spec.name, [])
        + [{"epoch": epoch, "global_step": global_step, "members": summaries}],
    }

  def final_results(self, state: dict, meta: dict) -> dict:
    """The run's results: every member's, their statistics, timings and config.

    From the stages' evaluations kept in ``meta``; a stage whose evaluation is
    missing (a checkpoint of an older version) is evaluated from ``state``.
    """
    evaluations = meta.get("evaluations", {})
    per_stage = [
        evaluations.get(s.name) or self.evaluate_stage(state, s)
        for s in self.specs
    ]
    member_results = [
        evaluation.merge_results(member) for member in zip(*per_stage)
    ]
    rule, _ = routing.settings_from_config(self.config)
    described = {
        "members": [m.as_dict() for m in self.members.members],
        "swept": list(self.members.swept),
    }
    results = {
        "population": described,
        "members": member_results,
        "aggregate": stats.aggregate(member_results),
        "timings": meta["timings"],
        "stages": list(self.names),
        "routing": rule,
        "routing_margin": self.config.routing_margin,
        "config": json.loads(self.config.to_json()),
    }
    if self.members.swept:
      results["sweep"] = stats.sweep_summary(described, member_results)
    return results

  # -- the whole run

  def run(self) -> dict:
    for note in sharding.describe_layout(
        self.society.mesh, self.config.batch_size
    ):
      self.log(note)
    state, meta = self.restore_or_init()
    if meta["stage"] == DONE:
      # Finished before; a kill after the last checkpoint may have cut the reports short.
      self.log("this run is finished; its results:")
      results = self.final_results(state, meta)
      self.report(
          results, only_missing=True, curves=meta.get("epoch_evaluations")
      )
      return results
    self.watch.start(self.offsets[meta["stage"]] + meta["stage_step"])
    with workdir_lib.StopSignals() as stop:
      for spec in self.specs[self.names.index(meta["stage"]) :]:
        state = self.train_stage(spec, state, meta, stop)
        meta = self.finish_stage(spec, state, meta)
        self.save(state, meta)
        self.hooks.reached("stage_saved", spec.name)
        stop.poll()
        self.stop_if_preempted(stop, state, meta)
    self.checkpointer.wait()
    self.hooks.reached("finished", self.names[-1])
    self.state = state
    results = self.final_results(state, meta)
    self.report(results, curves=meta.get("epoch_evaluations"))
    return results

  def report(
      self,
      results: dict,
      only_missing: bool = False,
      curves: dict | None = None,
  ) -> None:
    """results.json, results.md and the figures (process 0), and the table on the console.

    Figures: report.png (with the evaluations during training, ``curves``:
    ``meta["epoch_evaluations"]``); routing.png (free energies of each grown
    agent's head and S, of the first member); sweep.png for a sweep.
    """
    first = results["members"][0]
    figures = {
        "report.png": (
            functools.partial(plots.plot_report, curves=curves),
            results,
        )
    }
    if first.get("routing_diagnostics"):
      figures["routing.png"] = (
          functools.partial(
              routing_diagnostics.plot_energy_histograms,
              title=f"routing of member {self.members.members[0].describe()}",
          ),
          first["routing_diagnostics"],
      )
    if "sweep" in results:
      figures["sweep.png"] = (plots.plot_sweep, results)
    if self.is_writer:
      files = [
          paths.join(self.workdir, name)
          for name in ("results.json", "results.md", *figures)
      ]
      if not (only_missing and all(map(paths.exists, files))):
        report.write_results(self.workdir, results)
        for name, (plot, figure_data) in figures.items():
          plot(figure_data, paths.join(self.workdir, name))
    self.log(report.results_markdown(results))

  def close(self) -> None:
    try:
      self.checkpointer.close()
    finally:
      self.watch.close()
      self.metrics_log.close()


def stage_summary(
    spec: StageSpec, member_results: list[dict]
) -> dict[str, float]:
  """A few numbers for the stage-end line: its collective's accuracy, or its row's means.

  The mean over members.
  """

  summaries = [
      evaluation.summary(results, spec.rows, spec.collective)
      for results in member_results
  ]
  return {
      key: float(np.mean([s[key] for s in summaries])) for key in summaries[0]
  }


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
    log: Callable[[str], None] = print,
    hooks: hooks_lib.RunHooks | None = None,
) -> dict:
  """Run (or resume, or re-report) the whole MASC protocol in ``workdir``.

  Every check (config, data, devices, the workdir and its saved config) happens
  before anything is written. Returns the results dict (the format of
  ``masc_jax.reporting.report``: ``members`` holds each member's tables,
  ``aggregate`` their statistics). ``hooks``: an observer of the run's named
  points (``hooks.RunHooks``; ``faults.from_environment()`` in the tests).
  """
  society = build_society(config)
  workdir_lib.check_workdir(config, workdir, allow_config_change)
  with workdir_lib.workdir_lock(workdir):
    if jax.process_index() == 0:
      workdir_lib.atomic_write_json(
          paths.join(workdir, "config.json"), json.loads(config.to_json())
      )
    run = Run(society, workdir, log=log, hooks=hooks)
    try:
      return run.run()
    finally:
      run.close()
