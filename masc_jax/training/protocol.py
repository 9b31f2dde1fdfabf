"""The MASC protocol as a table of stages.

Each stage is one declarative ``StageSpec``: what it trains (which kind of
model, stacked over agents or one replicated network), on which batches (each
agent its own ``[K, B]``, or the pooled ``[B]``), for how many epochs, with
which step and loss, which frozen models it reads, the variables key its model
is known by, and which result rows it feeds. The training loop (``train``) and
the evaluation read these entries and hold no per-stage logic, so a new stage (a
second altruism round, another ablation) is one entry plus its step: here, or
from research code with ``register_stage``.

    stage          model       batches    variables key   feeds
    experts        experts     per agent  experts         row before_growth
    collective     collective  pooled     collective      row cc_only, collective "cc"
    altruism       heads       per agent  heads           row after_growth
    collective_ce  collective  pooled     collective_ce   row joint, collective "ce" (ablation)
    altruism_ce    heads       per agent  heads_ce        row ra_only          (ablation)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from masc_jax.data import augment
from masc_jax.method import losses, routing, steps

from masc_jax.training.society import Society

PyTree = Any
StepFn = Callable[
    ..., tuple[steps.ModelState, dict[str, jax.Array]]
]  # (state, batch, rng, frozen)

# Models a stage can train. Each starts from its own key (named by purpose): two
# stages of one kind (the CC and the CE-only collective) start identically, so
# they differ only in how they are trained.
MODEL_KINDS = ("experts", "collective", "heads")
PER_AGENT, POOLED = "per_agent", "pooled"  # batch kinds
STACKED, REPLICATED = "stacked", "replicated"  # shardings
ROUTING_PREFIX = "routing/"  # predict outputs that are not logits


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of the protocol.

  Attributes:
    name: the stage's name (logs, checkpoints, timings).
    model: which kind of model it trains (``MODEL_KINDS``).
    batches: ``per_agent`` (``[K, B]``, each agent from its own data) or ``pooled`` (``[B]``).
    sharding: ``stacked`` (split along the mesh's agent axis) or ``replicated``.
    epochs: the ``config.epochs`` field giving its length.
    make_step: ``(society, spec) -> step(state, batch, rng, frozen) -> (state, metrics)``.
    frozen: ``(society, spec, state by stage name) -> frozen models the step reads``.
    predict: ``(society, spec, variables by key, x) -> {output: logits}`` in inference mode;
      outputs named ``routing/<row>/...`` are passed on as they are (diagnostics).
    variables_key: the name of its trained model in ``variables`` (prediction).
    rows: the per-agent result rows it feeds (their logits are ``[K, B, C]``).
    collective: the collective accuracy it feeds, if any (its logits are ``[B, C]``).
    base: for heads, the stage whose collective's backbone they grow on.
    loss: ``config -> name`` of its registered loss (``losses.CC_LOSSES``/``RA_LOSSES``).
    ablation: trained only with ``config.ablations``.
  """

  name: str
  model: str
  batches: str
  sharding: str
  epochs: str
  make_step: Callable[[Society, StageSpec], StepFn]
  frozen: Callable[[Society, StageSpec, Mapping[str, steps.ModelState]], PyTree]
  predict: Callable[
      [Society, StageSpec, Mapping[str, PyTree], jax.Array],
      dict[str, jax.Array],
  ]
  variables_key: str
  rows: tuple[str, ...] = ()
  collective: str | None = None
  base: str | None = None
  loss: Callable[[ml_collections.ConfigDict], str] | None = None
  ablation: bool = False


# ----------------------------------------------------------------------------- step builders


def _augment(society: Society) -> Callable[[jax.Array, jax.Array], jax.Array]:
  ds, cfg = society.dataset, society.config.augment
  return functools.partial(
      augment.augment_and_normalize,
      mean=ds.mean,
      std=ds.std,
      crop_padding=cfg.crop_padding,
      flip=cfg.flip,
  )


def _common(society: Society) -> dict[str, Any]:
  return dict(
      tx=steps.make_optimizer(society.config.optim),
      augment=_augment(society),
      strategy=society.strategy,
  )


def _settings(society: Society) -> losses.LossSettings:
  return losses.LossSettings.from_config(society.config.loss)


def _expert_step(society: Society, spec: StageSpec) -> StepFn:
  step = functools.partial(
      steps.expert_step, network=society.expert_network, **_common(society)
  )
  return lambda state, batch, rng, frozen: step(state, batch, rng)


def _collective_loss(
    society: Society, spec: StageSpec
) -> losses.RegisteredLoss:
  return losses.lookup(losses.CC_LOSSES, spec.loss(society.config))


def _collective_step(society: Society, spec: StageSpec) -> StepFn:
  return functools.partial(
      steps.collective_step,
      network=society.collective_network,
      teacher_network=society.expert_network,
      class_owner=jnp.asarray(society.class_groups.class_owner),
      settings=_settings(society),
      loss_fn=_collective_loss(society, spec).fn,
      owner_batch_sizes=society.owner_batch_sizes,
      **_common(society),
  )


def _altruism_loss(society: Society, spec: StageSpec) -> losses.RegisteredLoss:
  return losses.lookup(losses.RA_LOSSES, spec.loss(society.config))


def _altruism_step(society: Society, spec: StageSpec) -> StepFn:
  from_self = society.config.loss.ra_teacher == "self"
  return functools.partial(
      steps.altruism_step,
      backbone=society.backbone,
      head=society.head,
      teacher_network=society.expert_network
      if from_self
      else society.collective_network,
      teacher_is_stacked=from_self,
      settings=_settings(society),
      loss_fn=_altruism_loss(society, spec).fn,
      **_common(society),
  )


# ----------------------------------------------------------------------------- frozen inputs


def _no_frozen(society, spec, state) -> None:
  return None


def _collective_frozen(society: Society, spec: StageSpec, state) -> PyTree:
  """The experts' variables, if the loss distils them."""
  if _collective_loss(society, spec).uses_teachers(_settings(society)):
    return state["experts"].variables()
  return None


def _altruism_frozen(society: Society, spec: StageSpec, state) -> PyTree:
  """The base collective's backbone, and the KD teacher if the loss uses one."""
  collective = state[spec.base].variables()
  frozen = {
      "backbone": {name: tree["backbone"] for name, tree in collective.items()}
  }
  if _altruism_loss(society, spec).uses_teachers(_settings(society)):
    frozen["teacher"] = (
        state["experts"].variables()
        if society.config.loss.ra_teacher == "self"
        else collective
    )
  return frozen


# ----------------------------------------------------------------------------- predictions


def _expert_predict(
    society: Society, spec: StageSpec, variables, x
) -> dict[str, jax.Array]:
  logits = steps.expert_logits(
      variables[spec.variables_key],
      x,
      network=society.expert_network,
      strategy=society.strategy,
  )
  return {row: logits for row in spec.rows}


def _collective_predict(
    society: Society, spec: StageSpec, variables, x
) -> dict[str, jax.Array]:
  logits = steps.collective_logits(
      variables[spec.variables_key], x, network=society.collective_network
  )
  out = {spec.collective: logits}
  # A per-agent row answered by S alone (CC only): every agent answers with S.
  out.update(
      {
          row: jnp.broadcast_to(logits, (society.num_agents,) + logits.shape)
          for row in spec.rows
      }
  )
  return out


def _grown_predict(
    society: Society, spec: StageSpec, variables, x
) -> dict[str, jax.Array]:
  rule, settings = routing.settings_from_config(society.config)
  logits, routed = steps.grown_outputs(
      variables[spec.variables_key],
      variables[BY_NAME[spec.base].variables_key],
      x,
      backbone=society.backbone,
      head=society.head,
      rule=rule,
      routing_settings=settings,
      strategy=society.strategy,
  )
  out = {row: logits for row in spec.rows}
  # What the routing saw (evaluation.results_from_predictions summarises it).
  out.update(
      {
          f"{ROUTING_PREFIX}{row}/{name}": value
          for row in spec.rows
          for name, value in routed.items()
      }
  )
  return out


# ----------------------------------------------------------------------------- the table

_EXPERTS = dict(
    model="experts",
    batches=PER_AGENT,
    sharding=STACKED,
    epochs="experts",
    make_step=_expert_step,
    frozen=_no_frozen,
    predict=_expert_predict,
)
_COLLECTIVE = dict(
    model="collective",
    batches=POOLED,
    sharding=REPLICATED,
    epochs="collective",
    make_step=_collective_step,
    frozen=_collective_frozen,
    predict=_collective_predict,
)
_HEADS = dict(
    model="heads",
    batches=PER_AGENT,
    sharding=STACKED,
    epochs="altruism",
    make_step=_altruism_step,
    frozen=_altruism_frozen,
    predict=_grown_predict,
)

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "experts", variables_key="experts", rows=("before_growth",), **_EXPERTS
    ),
    StageSpec(
        "collective",
        variables_key="collective",
        rows=("cc_only",),
        collective="cc",
        loss=lambda config: config.loss.cc,
        **_COLLECTIVE,
    ),
    StageSpec(
        "altruism",
        variables_key="heads",
        rows=("after_growth",),
        base="collective",
        loss=lambda config: config.loss.ra,
        **_HEADS,
    ),
    # The ablations: S trained with CE alone, then RA on it (the paper's "RA only").
    # S trained with CE alone is also one network trained on all the society's
    # data: its row "joint" is that reference, per agent group
    # (reporting.schema.REFERENCE_ROWS).
    StageSpec(
        "collective_ce",
        variables_key="collective_ce",
        rows=("joint",),
        collective="ce",
        loss=lambda config: "ce",
        ablation=True,
        **_COLLECTIVE,
    ),
    StageSpec(
        "altruism_ce",
        variables_key="heads_ce",
        rows=("ra_only",),
        base="collective_ce",
        loss=lambda config: config.loss.ra,
        ablation=True,
        **_HEADS,
    ),
)
BY_NAME: dict[str, StageSpec] = {spec.name: spec for spec in STAGES}


def register_stage(spec: StageSpec, *, after: str) -> None:
  """Add a stage to the protocol, trained right after stage ``after``.

  Its model kind must be one of ``MODEL_KINDS`` (it starts from that kind's
  initial state); its name and variables key must be new. Later stages keep
  their order but get new step keys (a stage's keys follow its position).
  """
  global STAGES
  if spec.name in BY_NAME or spec.variables_key in {
      s.variables_key for s in STAGES
  }:
    raise ValueError(
        f"a stage named {spec.name!r} or with variables key {spec.variables_key!r} "
        "already exists"
    )
  if spec.model not in MODEL_KINDS:
    raise ValueError(
        f"stage {spec.name!r}: model must be one of {MODEL_KINDS}, got {spec.model!r}"
    )
  if after not in BY_NAME:
    raise ValueError(f"no stage named {after!r}; stages: {', '.join(BY_NAME)}")
  position = [s.name for s in STAGES].index(after) + 1
  STAGES = STAGES[:position] + (spec,) + STAGES[position:]
  BY_NAME[spec.name] = spec


def stages_for(config: ml_collections.ConfigDict) -> tuple[StageSpec, ...]:
  """The stages a run with ``config`` trains, in order."""
  return tuple(spec for spec in STAGES if config.ablations or not spec.ablation)


def stage_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(spec.name for spec in stages_for(config))


def batches_of(society: Society, spec: StageSpec) -> Any:
  """The batch order ``spec`` trains on: the per-agent or the pooled one."""
  return (
      society.agent_batches
      if spec.batches == PER_AGENT
      else society.pooled_batches
  )


def total_steps(society: Society, spec: StageSpec) -> int:
  """Steps of stage ``spec``: its epochs times the steps of one epoch of its batches."""
  return (
      batches_of(society, spec).steps_per_epoch
      * society.config.epochs[spec.epochs]
  )


def images_per_step(society: Society, spec: StageSpec) -> int:
  """Images one step of ``spec`` consumes, over every agent and member."""
  per_agent = spec.batches == PER_AGENT
  return (
      society.config.batch_size
      * (society.num_agents if per_agent else 1)
      * society.members.size
  )


def predict_rows(
    society: Society,
    specs: tuple[StageSpec, ...],
    variables: Mapping[str, PyTree],
    images: jax.Array,
    normalize: Callable[[jax.Array], jax.Array],
) -> dict[str, jax.Array]:
  """Predictions of every output of the trained ``specs`` on ``images [B, H, W, Ch]`` uint8.

  Returns int predictions: ``[K, B]`` for each per-agent row and ``[B]`` for
  ``society_<row>`` (the routing rule across the row's agents) and for each
  collective; and each grown row's routing outputs (``routing/<row>/<name>``,
  ``steps.grown_outputs``).
  """
  x = normalize(images)
  rule, settings = routing.settings_from_config(society.config)
  out = {}
  for spec in specs:
    for name, logits in spec.predict(society, spec, variables, x).items():
      if name.startswith(ROUTING_PREFIX):
        out[name] = logits
        continue
      out[name] = jnp.argmax(logits, -1)
      if name in spec.rows:
        out[f"society_{name}"] = jnp.argmax(
            routing.route(logits, rule, settings)[0], -1
        )
  return out
