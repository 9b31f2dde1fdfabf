"""A run's programs on abstract inputs: what ``train`` compiles, without data or devices.

The society is the run's own (``society.build_society``) on the slice's
devices, with the images left off the devices (``place_data=False``) and a
shape-only dataset (``data.shape_only``); the state is the run's initial state
as shapes with the run's shardings. Each stage's train step and evaluation
program are the jitted functions the training loop compiles
(``members.step_program`` of ``train.stage_step_functions``,
``train.predict_program``), with
``jax.ShapeDtypeStruct`` inputs of the shapes and shardings the loop feeds
them. On a CPU mesh these programs are the run's own, text for text
(tests/test_preflight.py).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from masc_jax import config_lib
from masc_jax.data import shape_only
from masc_jax.method import agents
from masc_jax.nn import network
from masc_jax.parallel import sharding
from masc_jax.training import population, protocol, train
from masc_jax.training.protocol import StageSpec
from masc_jax.training.society import Society, build_society

PyTree = Any


def resolve_for_backend(
    config: ml_collections.ConfigDict, backend: str
) -> ml_collections.ConfigDict:
  """``config`` with its ``auto`` strategies resolved as a run on ``backend`` resolves them.

  This host's own backend (the CPU) would resolve ``agent_map=auto`` to
  ``unroll`` and ``member_map=auto`` to ``threads`` or ``loop``: other programs
  than the TPU run's. ``model.conv_impl=tuned`` is refused: it times
  convolutions on this host's device while tracing.
  """
  if config.model.conv_impl == "tuned":
    raise config_lib.ConfigError(
        "model.conv_impl=tuned picks each convolution's implementation by timing "
        f"it on this host's device, not the {backend.upper()} the program is "
        "compiled for: use model.conv_impl=auto, xla or im2col"
    )
  resolved = copy.deepcopy(config)
  resolved.agent_map = agents.resolve_strategy(config.agent_map, backend)
  resolved.member_map = population.resolve_member_map(
      config.member_map, backend=backend, threads_ok=False
  )
  return resolved


def abstract_society(
    config: ml_collections.ConfigDict, devices: list[Any]
) -> Society:
  """The run's society on ``devices``, its images as shapes (no data loaded for CIFAR)."""
  dataset = shape_only.shape_only_dataset(
      config.dataset, config.data_dir or None
  )
  return build_society(config, dataset, devices=devices, place_data=False)


def with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree,
      shardings,
  )


def abstract_state(society: Society) -> dict[str, Any]:
  """Every model's initial state as ``ShapeDtypeStruct``s with the run's shardings."""
  members = society.members
  keys = members.keys(lambda seed: jax.random.split(jax.random.key(seed)))
  shapes = jax.eval_shape(
      lambda: train.init_population_state(society, keys[..., 0])
  )
  return with_shardings(shapes, train.state_shardings(society, shapes))


@dataclasses.dataclass
class Program:
  """One program of the run, ready to lower.

  Attributes:
    stage: the stage's name.
    kind: ``train`` (one step) or ``eval`` (one evaluation batch).
    jitted: the jitted function the training loop compiles.
    args: its inputs as ``ShapeDtypeStruct``s (shapes and shardings the loop gives).
    runs_per_step: how many times one step (or batch) runs it: the number of
      members when each member runs its own program in turn, else 1.
    model_flops: model FLOPs of one run of the program (``network.forward_flops``).
  """

  stage: str
  kind: str
  jitted: Callable
  args: tuple
  runs_per_step: int
  model_flops: float

  def lower(self):
    return self.jitted.lower(*self.args)


def _abstract_batch(
    society: Society, spec: StageSpec
) -> dict[str, jax.ShapeDtypeStruct]:
  """A step's batch as ``train.batch_source`` gives it: shapes and sharding."""
  place = (
      sharding.agent_batch
      if spec.batches == protocol.PER_AGENT
      else sharding.pooled_batch
  )
  batch_sharding = place(society.mesh, society.config.batch_size, True)
  indices = np.asarray(protocol.batches_of(society, spec).indices(0))
  image = jax.ShapeDtypeStruct(
      indices.shape + society.dataset.image_shape,
      jnp.uint8,
      sharding=batch_sharding,
  )
  label_shape = jax.ShapeDtypeStruct(indices.shape, jnp.int32)
  label = jax.ShapeDtypeStruct(
      indices.shape,
      jnp.int32,
      sharding=sharding.tree_sharding(label_shape, batch_sharding),
  )
  return {"image": image, "label": label}


def _stage_key(society: Society) -> jax.ShapeDtypeStruct:
  """The step key as the loop passes it: made on the host's default device, uncommitted.

  Left without a sharding: XLA places it as it does the run's uncommitted key.
  """
  members = society.members
  keys = members.keys(lambda seed: jax.random.split(jax.random.key(seed)))
  key = members.fold_in(keys[..., 1], 0)
  return jax.ShapeDtypeStruct(key.shape, key.dtype)


def stage_program(society: Society, spec: StageSpec, state: dict) -> Program:
  """Stage ``spec``'s train step as ``train.compile_stage`` compiles it, on abstract inputs.

  The same path: ``members.step_program`` of the stage's step functions, lowered
  with ``members.program_inputs`` (member 0's inputs when members run in turn).
  """
  members = society.members
  replicated = sharding.replicated(society.mesh)
  example = (
      state[spec.name],
      _abstract_batch(society, spec),
      _stage_key(society),
  )
  frozen = train.frozen_inputs(society, spec, state)
  hparams = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated),
      members.hparams(),
  )
  jitted = members.step_program(
      *train.stage_step_functions(society, spec, state)
  )
  args = members.program_inputs(example, frozen, hparams)
  flops = train_step_flops(society, spec, frozen)
  return Program(
      spec.name,
      "train",
      jitted,
      args,
      members.size if members.in_turn else 1,
      flops * (1 if members.in_turn else members.size),
  )


def eval_program(society: Society, spec: StageSpec, state: dict) -> Program:
  """Stage ``spec``'s evaluation program, one batch of one member (``Run.evaluate_stage``)."""
  config, members = society.config, society.members
  # The loop evaluates member by member: ``x[index]`` of each stacked
  # ``[P, ...]`` array, which comes back replicated over the mesh.
  replicated = sharding.replicated(society.mesh)
  variables = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=replicated),
      train.stage_variables(spec, state),
  )
  images = jax.ShapeDtypeStruct(
      (config.eval_batch_size,) + society.dataset.image_shape,
      jnp.uint8,
      sharding=sharding.replicated(society.mesh),
  )
  settings = dict(members.members[0].settings)
  return Program(
      spec.name,
      "eval",
      train.predict_program(society, spec),
      (variables, settings, images),
      members.size,
      eval_batch_flops(society, spec),
  )


# ----------------------------------------------------------------------------- model FLOPs


def _forward(society: Society, widths, batch: int, with_head: bool = True):
  m, ds = society.config.model, society.dataset
  return network.forward_flops(
      widths,
      m.pool_after,
      m.head_hidden,
      ds.num_classes,
      ds.image_shape[2],
      ds.image_shape[:2],
      batch,
      with_head=with_head,
  )


def train_step_flops(
    society: Society, spec: StageSpec, frozen: PyTree
) -> float:
  """Model FLOPs of one member's train step of ``spec``: 3 x forward for trained
  networks (forward and backward), 1 x for the frozen ones the step reads.
  """
  config = society.config
  m = config.model
  k, b = society.num_agents, config.batch_size
  if spec.model == "experts":
    return 3 * k * _forward(society, m.expert_widths, b)
  if spec.model == "collective":
    flops = 3 * _forward(society, m.collective_widths, b)
    if frozen is not None:  # the experts teach (KD)
      per_owner = (
          society.owner_batch_sizes is not None
          and config.loss.kd_teachers == "owner"
      )
      teacher_batch = max(society.owner_batch_sizes) if per_owner else b
      flops += k * _forward(society, m.expert_widths, teacher_batch)
    return flops
  # Heads on the collective's frozen backbone, each agent's batch through it.
  widths = m.collective_widths
  head = _forward(society, widths, b) - _forward(society, widths, b, False)
  flops = _forward(society, widths, k * b, False) + 3 * k * head
  if isinstance(frozen, dict) and "teacher" in frozen:
    flops += (
        k * _forward(society, m.expert_widths, b)
        if config.loss.ra_teacher == "self"
        else _forward(society, widths, k * b)
    )
  return flops


def eval_batch_flops(society: Society, spec: StageSpec) -> float:
  """Model FLOPs of one evaluation batch of ``spec`` (one member)."""
  m = society.config.model
  k, b = society.num_agents, society.config.eval_batch_size
  if spec.model == "experts":
    return k * _forward(society, m.expert_widths, b)
  widths = m.collective_widths
  if spec.model == "collective":
    return _forward(society, widths, b)
  head = _forward(society, widths, b) - _forward(society, widths, b, False)
  return (
      _forward(society, widths, b) + k * head
  )  # backbone once; S's and K heads
