"""The socialized-learning run: experts -> collective collaboration -> reciprocal altruism.

``train_and_evaluate(config, workdir)`` is the whole job. Stages, in order:

  experts        all K experts at once (stacked, agent-mapped), CE on own data
  collective     S on the pooled data with L_CC (KD from the frozen experts)
  altruism       K new heads on S's frozen backbone, L_RA on own data
  collective_ce  (ablations) S trained with CE alone
  altruism_ce    (ablations) RA heads on the CE-only S

then the evaluation, which writes results.json / results.md / report.png.

Everything a resume needs is in the checkpoint: every model's state and the
run position (stage, step). Data order and step keys are pure functions of
(seed, stage, step), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from masc_jax import (agents, augment, checkpointing, config_lib, data, evaluation, models,
                      reporting, sharding, stages)

PyTree = Any

EXPERTS, COLLECTIVE, ALTRUISM = "experts", "collective", "altruism"
COLLECTIVE_CE, ALTRUISM_CE = "collective_ce", "altruism_ce"
DONE = "done"

# Fields that do not change what a run computes: a resumed run may change them.
# Device count and agent strategy change values only within float rounding, so a
# run saved on 4 devices may resume on 1.
RESULT_NEUTRAL_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                         "data_dir", "debug_nan_step", "num_devices", "agent_axis_size",
                         "agent_map")


class NonFiniteLossError(RuntimeError):
  """A loss term or the parameters became NaN/Inf."""


class WorkdirError(RuntimeError):
  """The workdir belongs to another config or another live run."""


class Preempted(SystemExit):
  """SIGTERM arrived; a checkpoint was saved."""


def stage_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  base = (EXPERTS, COLLECTIVE, ALTRUISM)
  return base + ((COLLECTIVE_CE, ALTRUISM_CE) if config.ablations else ())


@dataclasses.dataclass
class Society:
  """Everything fixed for a run: data on device, class groups, networks, mesh."""
  config: ml_collections.ConfigDict
  dataset: data.ArrayDataset
  class_groups: data.ClassGroups
  mesh: jax.sharding.Mesh
  expert_network: models.Network
  collective_network: models.Network
  backbone: models.Backbone
  head: models.Head
  agent_batches: data.AgentBatches
  pooled_batches: data.PooledBatches
  train_images: jax.Array        # [N, H, W, Ch] uint8, replicated on the mesh
  train_labels: jax.Array        # [N] int32
  test_images: jax.Array
  strategy: str

  @property
  def num_agents(self) -> int:
    return self.class_groups.num_agents

  def total_steps(self, stage: str) -> int:
    epochs = self.config.epochs
    if stage == EXPERTS:
      return self.agent_batches.steps_per_epoch * epochs.experts
    if stage in (COLLECTIVE, COLLECTIVE_CE):
      return self.pooled_batches.steps_per_epoch * epochs.collective
    return self.agent_batches.steps_per_epoch * epochs.altruism

  def images_per_step(self, stage: str) -> int:
    per_agent = stage in (EXPERTS, ALTRUISM, ALTRUISM_CE)
    return self.config.batch_size * (self.num_agents if per_agent else 1)


def build_society(config: ml_collections.ConfigDict) -> Society:
  """Validate the config against the data and devices, load the data. Writes nothing."""
  config_lib.validate(config)
  data_dir = config.data_dir or None
  data.check_dataset_available(config.dataset, data_dir)
  dataset = data.load_dataset(config.dataset, data_dir)
  seed = config.class_order_seed
  groups = data.make_class_groups(dataset.num_classes, config.num_agents,
                                  None if seed < 0 else seed)
  per_agent = data.agent_indices(dataset.train_labels, groups)
  pooled = np.sort(np.concatenate(per_agent))
  config_lib.check_against_data(config, [len(ix) for ix in per_agent], len(pooled))
  mesh = sharding.make_mesh(config.num_agents, config.num_devices, config.agent_axis_size)
  sharding.check_batch_fits(mesh, config.batch_size)

  expert = models.make_network(config.model, dataset.num_classes, config.model.expert_widths)
  collective = models.make_network(config.model, dataset.num_classes,
                                   config.model.collective_widths)
  rep = sharding.replicated(mesh)
  return Society(
      config=config, dataset=dataset, class_groups=groups, mesh=mesh,
      expert_network=expert, collective_network=collective,
      backbone=models.backbone_of(collective), head=models.head_of(collective),
      # Distinct data streams per stage kind, all from the run seed.
      agent_batches=data.AgentBatches(per_agent, config.batch_size, seed=config.seed),
      pooled_batches=data.PooledBatches(pooled, config.batch_size, seed=config.seed),
      train_images=jax.device_put(dataset.train_images, rep),
      train_labels=jax.device_put(dataset.train_labels.astype(np.int32), rep),
      test_images=jax.device_put(dataset.test_images, rep),
      strategy=agents.resolve_strategy(config.agent_map))


# ----------------------------------------------------------------------------- state


def init_run_state(society: Society, rng: jax.Array) -> dict[str, stages.ModelState]:
  """Every model the run trains, freshly initialised.

  Keys by purpose: one per expert, one for S (shared by the CE-only S of the
  ablation, so the two collectives differ only in their loss), one per head.
  """
  config = society.config
  k = society.num_agents
  tx = stages.make_optimizer(config.optim)
  image = jnp.zeros((1,) + society.dataset.image_shape, jnp.float32)
  expert_key, collective_key, head_key = jax.random.split(rng, 3)
  experts = agents.init_stacked(
      lambda key: stages.init_model_state(society.expert_network, key, image, tx),
      jax.random.split(expert_key, k))
  collective = stages.init_model_state(society.collective_network, collective_key, image, tx)
  features = jax.eval_shape(lambda v: society.backbone.apply(v, image, train=False),
                            {"params": collective.params["backbone"],
                             "batch_stats": collective.batch_stats["backbone"]})
  feature_input = jnp.zeros(features.shape, jnp.float32)
  heads = agents.init_stacked(
      lambda key: stages.init_model_state(society.head, key, feature_input, tx),
      jax.random.split(head_key, k))
  state = {EXPERTS: experts, COLLECTIVE: collective, ALTRUISM: heads}
  if config.ablations:
    state[COLLECTIVE_CE] = collective
    state[ALTRUISM_CE] = heads
  return state


def state_shardings(society: Society, abstract_state: PyTree) -> PyTree:
  """Stacked models along the agent axis; the collectives replicated."""
  mesh = society.mesh
  return {name: sharding.tree_sharding(
              tree, sharding.stacked(mesh) if name in (EXPERTS, ALTRUISM, ALTRUISM_CE)
              else sharding.replicated(mesh))
          for name, tree in abstract_state.items()}


# ----------------------------------------------------------------------------- steps


def _augment_fn(society: Society) -> Callable[[jax.Array, jax.Array], jax.Array]:
  ds, cfg = society.dataset, society.config.augment
  return functools.partial(augment.augment_and_normalize, mean=ds.mean, std=ds.std,
                           crop_padding=cfg.crop_padding, flip=cfg.flip)


def stage_step(society: Society, stage: str) -> Callable[..., Any]:
  """The stage's pure step ``(state, batch, rng, frozen) -> (state, metrics)``."""
  config = society.config
  common = dict(tx=stages.make_optimizer(config.optim), augment=_augment_fn(society),
                strategy=society.strategy)
  if stage == EXPERTS:
    step = functools.partial(stages.expert_step, network=society.expert_network, **common)
    return lambda state, batch, rng, frozen: step(state, batch, rng)
  if stage in (COLLECTIVE, COLLECTIVE_CE):
    loss_config = config.loss
    if stage == COLLECTIVE_CE:
      # The ablation's S: cross-entropy alone (no KD, no energy alignment).
      loss_config = ml_collections.ConfigDict({**config.loss.to_dict(), "kd_weight": 0.0,
                                               "align_weight": 0.0})
    return functools.partial(
        stages.collective_step, network=society.collective_network,
        teacher_network=society.expert_network,
        class_owner=jnp.asarray(society.class_groups.class_owner), loss_config=loss_config,
        **common)
  ra_teacher = config.loss.ra_teacher
  return functools.partial(
      stages.altruism_step, backbone=society.backbone, head=society.head,
      teacher_network=(society.expert_network if ra_teacher == "self"
                       else society.collective_network),
      teacher_is_stacked=ra_teacher == "self", loss_config=config.loss, **common)


def frozen_inputs(society: Society, stage: str, state: dict[str, stages.ModelState]) -> PyTree:
  """The frozen models a stage reads (passed to the compiled step as arguments)."""
  config = society.config
  if stage == EXPERTS:
    return None
  if stage == COLLECTIVE:
    return state[EXPERTS].variables() if config.loss.kd_weight > 0 else None
  if stage == COLLECTIVE_CE:
    return None
  collective = state[COLLECTIVE if stage == ALTRUISM else COLLECTIVE_CE].variables()
  frozen = {"backbone": {name: tree["backbone"] for name, tree in collective.items()}}
  if config.loss.ra_kd_weight > 0 and config.loss.ra_teacher == "self":
    frozen["teacher"] = state[EXPERTS].variables()
  elif config.loss.ra_kd_weight > 0 and config.loss.ra_teacher == "collective":
    frozen["teacher"] = collective
  return frozen


def batch_source(society: Society, stage: str) -> Callable[[int], dict[str, jax.Array]]:
  """``step -> batch`` on device, gathered from the resident uint8 images."""
  if stage in (COLLECTIVE, COLLECTIVE_CE):
    batches, batch_sharding = society.pooled_batches, sharding.pooled_batch(society.mesh)
  else:
    batches, batch_sharding = society.agent_batches, sharding.agent_batch(society.mesh)

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def gather(images, labels, idx):
    return {"image": images[idx], "label": labels[idx]}

  def get(step: int) -> dict[str, jax.Array]:
    return gather(society.train_images, society.train_labels, batches.indices(step))

  return get


def compile_stage(society: Society, stage: str, state: dict[str, stages.ModelState],
                  start_step: int, stage_key: jax.Array):
  """The stage's step, jit-compiled ahead of time for the mesh.

  Returns ``(compiled, frozen, get_batch)``: call ``compiled(state[stage],
  get_batch(step), jax.random.fold_in(stage_key, step), frozen)``. The trained
  state is donated, and constrained to keep its sharding (stacked along the
  agent axis, or replicated for a collective).
  """
  get_batch = batch_source(society, stage)
  step_fn = stage_step(society, stage)
  shardings = state_shardings(society, {stage: state[stage]})[stage]

  def constrained(model_state, batch, rng, frozen):
    new_state, metrics = step_fn(model_state, batch, rng, frozen)
    return jax.lax.with_sharding_constraint(new_state, shardings), metrics

  frozen = frozen_inputs(society, stage, state)
  jitted = jax.jit(constrained, donate_argnums=(0,))
  compiled = jitted.lower(state[stage], get_batch(start_step),
                          jax.random.fold_in(stage_key, start_step), frozen).compile()
  return compiled, frozen, get_batch


# ----------------------------------------------------------------------------- workdir


def _comparable(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = _flatten(json.loads(config.to_json()))
  return {k: v for k, v in flat.items() if k.split(".")[0] not in RESULT_NEUTRAL_FIELDS}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str,
                         allow_config_change: bool = False) -> None:
  """Refuse to resume a workdir whose saved config differs in a result-changing field."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _flatten(json.load(f))
  current = _comparable(config)
  saved = {k: v for k, v in saved.items() if k.split(".")[0] not in RESULT_NEUTRAL_FIELDS}
  diffs = [f"{k}: saved {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
           for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if diffs and not allow_config_change:
    raise WorkdirError(
        f"{workdir} holds a run with a different config; these fields differ:\n  "
        + "\n  ".join(diffs)
        + "\nUse another --workdir, or pass --allow_config_change to resume anyway.")


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """An exclusive lock on ``workdir/.lock``; a second concurrent run refuses.

  ``flock`` is released by the kernel when the holder dies, so a killed run
  never leaves a stale lock behind.
  """
  os.makedirs(workdir, exist_ok=True)
  handle = open(os.path.join(workdir, ".lock"), "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    raise WorkdirError(f"another run is writing {workdir} (it holds {workdir}/.lock); "
                       "wait for it to finish or use another --workdir") from None
  try:
    yield
  finally:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _atomic_write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- loop


class _SigtermFlag:
  """Turns SIGTERM (what a preemption sends) into a flag checked after each step."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Run:
  """One run in one workdir: trains the remaining stages, evaluates, reports."""

  def __init__(self, society: Society, workdir: str, log: Callable[[str], None] = print):
    self.society = society
    self.config = society.config
    self.workdir = workdir
    self.is_writer = jax.process_index() == 0
    self.log = log if self.is_writer else (lambda _: None)
    self.names = stage_names(self.config)
    self.offsets = {}
    total = 0
    for name in self.names:
      self.offsets[name] = total
      total += society.total_steps(name)
    self.offsets[DONE] = total
    self.checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                   self.config.keep_checkpoints)
    self.metrics_log = reporting.MetricsLogger(os.path.join(workdir, "metrics.jsonl"),
                                               enabled=self.is_writer)
    root = jax.random.key(self.config.seed)
    self.init_key, self.train_key = jax.random.split(root)
    self._finite = jax.jit(_all_finite)

  # -- state and checkpoints

  def restore_or_init(self) -> tuple[dict, dict]:
    abstract = jax.eval_shape(lambda: init_run_state(self.society, self.init_key))
    shardings = state_shardings(self.society, abstract)
    restored = self.checkpointer.restore_latest_good(abstract, shardings, log=self.log)
    if restored is None:
      state = jax.jit(lambda: init_run_state(self.society, self.init_key),
                      out_shardings=shardings)()
      return state, {"stage": self.names[0], "stage_step": 0, "stage_results": {}, "timings": {}}
    step, state, meta = restored
    self.log(f"resumed from checkpoint {step}: stage {meta['stage']}, step {meta['stage_step']}")
    return state, meta

  def save(self, state: dict, meta: dict) -> None:
    if not bool(self._finite(state)):
      raise NonFiniteLossError(
          f"refusing to checkpoint non-finite parameters in stage {meta['stage']} at step "
          f"{meta['stage_step']}; the last good checkpoint is kept")
    global_step = self.offsets[meta["stage"]] + meta["stage_step"]
    self.checkpointer.save(global_step, state, meta)

  # -- one stage

  def train_stage(self, stage: str, state: dict, meta: dict, sigterm: _SigtermFlag) -> dict:
    society, config = self.society, self.config
    total = society.total_steps(stage)
    start = meta["stage_step"]
    stage_key = jax.random.fold_in(self.train_key, self.names.index(stage))
    t0 = time.perf_counter()
    compiled, frozen, get_batch = compile_stage(society, stage, state, start, stage_key)
    compile_s = time.perf_counter() - t0
    self.log(f"[{stage}] {total} steps ({config.batch_size} per batch, "
             f"{society.images_per_step(stage)} images per step); compiled in {compile_s:.1f}s"
             + (f"; resuming at step {start}" if start else ""))

    model_state = state[stage]
    pending: list[tuple[int, dict]] = []
    last_terms: dict[str, float] = {}
    t_start = t_log = time.perf_counter()
    steps_since_log = 0
    global_offset = self.offsets[stage]

    def flush(step_done: int) -> None:
      nonlocal pending, t_log, steps_since_log, last_terms
      if not pending:
        return
      fetched = jax.device_get(pending)
      pending = []
      for s, m in fetched:
        for term, value in m.items():
          if not np.all(np.isfinite(value)):
            raise NonFiniteLossError(
                f"non-finite loss term '{term}' in stage {stage} at step {s} "
                f"(global step {global_offset + s}); stopping. The last good checkpoint is kept; "
                "lower the learning rate or set --config.optim.grad_clip_norm")
      s, m = fetched[-1]
      last_terms = {t: float(np.mean(v)) for t, v in m.items()}
      now = time.perf_counter()
      rate = steps_since_log * society.images_per_step(stage) / max(now - t_log, 1e-9)
      remaining = (total - step_done) * (now - t_log) / max(steps_since_log, 1)
      t_log, steps_since_log = now, 0
      self.log(reporting.progress_line(stage, step_done, total, rate, remaining, last_terms))
      self.metrics_log.write({"stage": stage, "step": step_done,
                              "global_step": global_offset + step_done,
                              "images_per_s": rate, **last_terms})

    for step in range(start, total):
      if global_offset + step == config.debug_nan_step:
        # Fault injection (tests): poison the parameters as a diverged step would.
        model_state = model_state.replace(
            params=jax.tree.map(lambda p: p * jnp.nan, model_state.params))
      rng = jax.random.fold_in(stage_key, step)
      model_state, metrics = compiled(model_state, get_batch(step), rng, frozen)
      pending.append((step, metrics))
      steps_since_log += 1
      done = step + 1
      if done % config.log_every_steps == 0 or done == total:
        flush(done)
      if sigterm.raised or (done % config.checkpoint_every_steps == 0 and done < total):
        flush(done)
        state = {**state, stage: model_state}
        self.save(state, {**meta, "stage": stage, "stage_step": done})
        if sigterm.raised:
          self.checkpointer.wait()
          self.log(f"SIGTERM: saved a checkpoint at stage {stage}, step {done}; exiting")
          raise Preempted(143)
    jax.block_until_ready(model_state)
    train_s = time.perf_counter() - t_start
    state = {**state, stage: model_state}
    steps_run = total - start
    meta["timings"][stage] = {
        "compile_s": compile_s, "train_s": train_s, "steps": steps_run,
        "images_per_s": steps_run * society.images_per_step(stage) / max(train_s, 1e-9)}
    return state

  # -- evaluation

  def evaluate(self, state: dict, upto: str) -> dict:
    """Results of every row whose models are trained (stages up to ``upto``)."""
    society = self.society
    trained = self.names[: self.names.index(upto) + 1] if upto != DONE else self.names
    names = {EXPERTS: "experts", COLLECTIVE: "collective", ALTRUISM: "heads",
             COLLECTIVE_CE: "collective_ce", ALTRUISM_CE: "heads_ce"}
    variables = {names[n]: state[n].variables() for n in trained}
    ds = society.dataset
    predict = jax.jit(functools.partial(
        stages.predict_step, expert_network=society.expert_network,
        collective_network=society.collective_network, backbone=society.backbone,
        head=society.head, energy_temperature=self.config.loss.energy_temperature,
        normalize=functools.partial(augment.normalize, mean=ds.mean, std=ds.std),
        strategy=society.strategy))
    predictions = evaluation.predict_all(predict, variables, society.test_images,
                                         len(ds.test_labels), self.config.eval_batch_size)
    return evaluation.results_from_predictions(predictions, ds.test_labels,
                                               society.class_groups.groups)

  # -- the whole run

  def run(self) -> dict:
    state, meta = self.restore_or_init()
    if meta["stage"] == DONE:
      self.log("this run is finished; its results:")
      results = meta["results"]
      self.log(reporting.results_markdown(results))
      return results
    with _SigtermFlag() as sigterm:
      for stage in self.names[self.names.index(meta["stage"]):]:
        state = self.train_stage(stage, state, meta, sigterm)
        summary = self.evaluate(state, stage)
        meta["stage_results"][stage] = _stage_summary(stage, summary)
        timing = meta["timings"][stage]
        self.log(reporting.stage_summary_line(stage, timing["steps"], timing["train_s"],
                                              timing["compile_s"], meta["stage_results"][stage]))
        self.metrics_log.write({"stage": stage, "eval": meta["stage_results"][stage]})
        next_stage = self.names[self.names.index(stage) + 1] if stage != self.names[-1] else DONE
        meta = {**meta, "stage": next_stage, "stage_step": 0}
        if next_stage == DONE:
          results = {**summary, "timings": meta["timings"],
                     "config": json.loads(self.config.to_json())}
          meta["results"] = results
        self.save(state, meta)
    self.checkpointer.wait()
    self.state = state
    if self.is_writer:
      reporting.write_results(self.workdir, results)
      reporting.plot_report(results, os.path.join(self.workdir, "report.png"))
    self.log(reporting.results_markdown(results))
    return results

  def close(self) -> None:
    self.checkpointer.close()
    self.metrics_log.close()


def _stage_summary(stage: str, results: dict) -> dict[str, float]:
  """A few numbers for the stage-end line: the means of the newest row."""
  row = {EXPERTS: "before_growth", ALTRUISM: "after_growth", ALTRUISM_CE: "ra_only"}.get(stage)
  if row is not None:
    r = results["rows"][row]
    return {"expert": float(np.mean(r["expert"])), "general": float(np.mean(r["general"])),
            "society": float(results["society_accuracy"].get(row, float("nan")))}
  name = "cc" if stage == COLLECTIVE else "ce"
  return {"collective_acc": float(results["collective_accuracy"][name])}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False,
                       log: Callable[[str], None] = print) -> dict:
  """Run (or resume, or re-report) the whole MASC protocol in ``workdir``.

  Every check (config, data, devices, the workdir's saved config) happens
  before anything is written. Returns the results dict (see ``reporting``).
  """
  society = build_society(config)
  check_workdir_config(config, workdir, allow_config_change)
  with workdir_lock(workdir):
    if jax.process_index() == 0:
      _atomic_write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
    run = Run(society, workdir, log=log)
    try:
      return run.run()
    finally:
      run.close()
