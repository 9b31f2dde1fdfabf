"""The device mesh: ``members`` of a population, ``agents`` for stacked agents, ``data`` for batches.

``jax.pmap`` is in maintenance mode, so the agent axis is spread over devices
with ``jit`` and ``NamedSharding``: stacked agent states (params, BatchNorm
statistics, optimiser states) are split along ``agents``; per-agent batches
``[K, B, ...]`` along ``agents`` and ``data``; the collective's state is
replicated and its pooled batch ``[B, ...]`` split over every device (plain
data parallelism). Every run's arrays carry a leading member axis (size 1 for one seed), split
along ``members`` first: members never talk to each other, so 8 seeds on 8
chips run one member per chip with no communication at all. XLA's SPMD partitioner then runs each stage's step as one
program over the mesh and inserts the gradient all-reduce of the collective.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

P = PartitionSpec

MEMBERS = "members"
AGENTS = "agents"
DATA = "data"


class MeshError(ValueError):
  """Device counts that cannot hold the agents or batches."""


def choose_agent_axis(
    num_devices: int, num_agents: int, requested: int = 0
) -> int:
  """Size of the mesh's agent axis.

  ``requested == 0`` picks the largest divisor of K that also divides the
  device count; a requested size must divide both.
  """
  if requested:
    if num_agents % requested or num_devices % requested:
      options = [
          d
          for d in range(1, num_devices + 1)
          if num_agents % d == 0 and num_devices % d == 0
      ]
      raise MeshError(
          f"agent_axis_size={requested} must divide both the number of agents ({num_agents}) "
          f"and the number of devices ({num_devices}): use one of {options}"
      )
    return requested
  return max(
      d
      for d in range(1, num_devices + 1)
      if num_agents % d == 0 and num_devices % d == 0
  )


def make_mesh(
    num_agents: int,
    num_devices: int = 0,
    agent_axis_size: int = 0,
    devices: list[Any] | None = None,
    num_members: int = 1,
) -> Mesh:
  """A 3-D mesh ``(members, agents, data)`` over the first ``num_devices`` devices (0: all).

  The member axis takes the largest divisor of the population size that divides
  the device count (1 for a single seed); the agent axis then divides what is left.
  """
  devices = list(devices if devices is not None else jax.devices())
  if num_devices:
    if num_devices > len(devices):
      raise MeshError(
          f"num_devices={num_devices} but only {len(devices)} devices are visible"
      )
    devices = devices[:num_devices]
  member_axis = max(
      d
      for d in range(1, len(devices) + 1)
      if num_members % d == 0 and len(devices) % d == 0
  )
  per_member = len(devices) // member_axis
  agent_axis = choose_agent_axis(per_member, num_agents, agent_axis_size)
  grid = np.array(devices, dtype=object).reshape(
      member_axis, agent_axis, per_member // agent_axis
  )
  return Mesh(grid, (MEMBERS, AGENTS, DATA))


def with_members(spec: PartitionSpec, members: bool) -> PartitionSpec:
  """``spec`` behind a leading member axis, for a population's arrays."""
  return P(MEMBERS, *spec) if members else spec


def batch_layout(mesh: Mesh, batch_size: int) -> dict[str, PartitionSpec]:
  """How per-agent ``[K, B, ...]`` and pooled ``[B, ...]`` batches are split over ``mesh``.

  The widest split whose shares are whole: per-agent batches along ``agents``
  and, when B divides, along ``data``; the pooled batch over every device,
  else over the axis it divides, else whole on every device. So any device
  count runs (say K=5 and a batch of 32 on 5 devices: agents one per device,
  the collective's batch whole on each); a batch that does not split only
  repeats work, it never changes what is computed.
  """
  data, agents = mesh.shape[DATA], mesh.shape[AGENTS]
  per_agent = P(AGENTS, DATA) if batch_size % data == 0 else P(AGENTS)
  if batch_size % (agents * data) == 0:
    pooled = P((AGENTS, DATA))
  elif data > 1 and batch_size % data == 0:
    pooled = P(DATA)
  elif agents > 1 and batch_size % agents == 0:
    pooled = P(AGENTS)
  else:
    pooled = P()
  return {"per_agent": per_agent, "pooled": pooled}


def describe_layout(mesh: Mesh, batch_size: int) -> list[str]:
  """Lines for the log when a batch cannot be split over every device it could use."""
  layout, notes = batch_layout(mesh, batch_size), []
  devices = mesh.shape[AGENTS] * mesh.shape[DATA]  # one member's devices
  if mesh.shape[DATA] > 1 and layout["per_agent"] == P(AGENTS):
    notes.append(
        f"batch_size={batch_size} does not split over the mesh's data axis "
        f"({mesh.shape[DATA]}): each agent's batch is whole on its devices"
    )
  if devices > 1 and layout["pooled"] != P((AGENTS, DATA)):
    where = {
        P(DATA): f"split over the data axis ({mesh.shape[DATA]} devices) only",
        P(
            AGENTS
        ): f"split over the agent axis ({mesh.shape[AGENTS]} devices) only",
    }.get(layout["pooled"], "whole on every device")
    notes.append(
        f"batch_size={batch_size} does not split over {devices} devices: the "
        f"collective's batch is {where} (a batch_size divisible by {devices} "
        "uses every device)"
    )
  return notes


def one_program_at_a_time() -> bool:
  """Whether to wait for each step's program before dispatching the next one.

  True with several CPU devices in this process. A program's collectives then
  need every local device's part running at once, on XLA:CPU's dispatch pool of
  max(cores, devices) threads; programs queued back to back can leave one
  device's part waiting for a thread that another part, blocked in the
  collective, holds. Seen here: a 1-process x 2-device gloo population hung in
  an all-gather (one part waiting on its device's in-flight semaphore); with
  in-process collectives the same starvation ends in XLA's rendezvous timeout,
  as a 5-device run once did. Accelerators queue programs on
  streams instead, and one device per process has nothing to wait for.
  """
  return jax.local_device_count() > 1 and jax.default_backend() == "cpu"


def stacked(mesh: Mesh, members: bool = False) -> NamedSharding:
  """Leaves ``[K, ...]`` (population: ``[P, K, ...]``) split along the agent axis."""
  return NamedSharding(mesh, with_members(P(AGENTS), members))


def replicated(mesh: Mesh, members: bool = False) -> NamedSharding:
  """Whole on every device (population: ``[P, ...]`` split along the member axis only)."""
  return NamedSharding(mesh, with_members(P(), members))


def agent_batch(
    mesh: Mesh, batch_size: int, members: bool = False
) -> NamedSharding:
  """Per-agent batches ``[K, B, ...]``: agents along ``agents``, examples along ``data``."""
  return NamedSharding(
      mesh, with_members(batch_layout(mesh, batch_size)["per_agent"], members)
  )


def pooled_batch(
    mesh: Mesh, batch_size: int, members: bool = False
) -> NamedSharding:
  """Pooled batches ``[B, ...]``: examples split over every device (``batch_layout``)."""
  return NamedSharding(
      mesh, with_members(batch_layout(mesh, batch_size)["pooled"], members)
  )


def tree_sharding(tree: Any, sharding: NamedSharding) -> Any:
  """``sharding`` for every leaf, cut to the leaf's rank (scalars are replicated)."""

  def leaf(x):
    spec = tuple(sharding.spec)[: np.ndim(x)]
    return NamedSharding(sharding.mesh, P(*spec))

  return jax.tree.map(leaf, tree)


def put(tree: Any, sharding: NamedSharding) -> Any:
  """``device_put`` every leaf with ``sharding`` (scalars replicated)."""
  return jax.device_put(tree, tree_sharding(tree, sharding))
