"""The device mesh: an ``agents`` axis for stacked agents, a ``data`` axis for batches.

``jax.pmap`` is in maintenance mode, so the agent axis is spread over devices
with ``jit`` and ``NamedSharding``: stacked agent states (params, BatchNorm
statistics, optimiser states) are split along ``agents``; per-agent batches
``[K, B, ...]`` along ``agents`` and ``data``; the collective's state is
replicated and its pooled batch ``[B, ...]`` split over every device (plain
data parallelism). XLA's SPMD partitioner then runs each stage's step as one
program over the mesh and inserts the gradient all-reduce of the collective.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AGENTS = "agents"
DATA = "data"


class MeshError(ValueError):
  """Device counts that cannot hold the agents or batches."""


def choose_agent_axis(num_devices: int, num_agents: int, requested: int = 0) -> int:
  """Size of the mesh's agent axis.

  ``requested == 0`` picks the largest divisor of K that also divides the
  device count; a requested size must divide both.
  """
  if requested:
    if num_agents % requested or num_devices % requested:
      options = [d for d in range(1, num_devices + 1) if num_agents % d == 0 and num_devices % d == 0]
      raise MeshError(
          f"agent_axis_size={requested} must divide both the number of agents ({num_agents}) "
          f"and the number of devices ({num_devices}): use one of {options}")
    return requested
  return max(d for d in range(1, num_devices + 1) if num_agents % d == 0 and num_devices % d == 0)


def make_mesh(num_agents: int, num_devices: int = 0, agent_axis_size: int = 0,
              devices: list[Any] | None = None) -> Mesh:
  """A 2-D mesh ``(agents, data)`` over the first ``num_devices`` devices (0: all)."""
  devices = list(devices if devices is not None else jax.devices())
  if num_devices:
    if num_devices > len(devices):
      raise MeshError(f"num_devices={num_devices} but only {len(devices)} devices are visible")
    devices = devices[:num_devices]
  agent_axis = choose_agent_axis(len(devices), num_agents, agent_axis_size)
  grid = np.array(devices, dtype=object).reshape(agent_axis, len(devices) // agent_axis)
  return Mesh(grid, (AGENTS, DATA))


def check_batch_fits(mesh: Mesh, batch_size: int) -> None:
  """Batches are split over devices: the per-device share must be whole."""
  data = mesh.shape[DATA]
  total = mesh.size
  if batch_size % data:
    raise MeshError(f"batch_size={batch_size} must be divisible by the mesh's data axis ({data})")
  if batch_size % total:
    raise MeshError(f"batch_size={batch_size} must be divisible by the number of devices ({total}) "
                    "for the collective's data-parallel batch")


def stacked(mesh: Mesh) -> NamedSharding:
  """Leaves ``[K, ...]`` split along the agent axis."""
  return NamedSharding(mesh, P(AGENTS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def agent_batch(mesh: Mesh) -> NamedSharding:
  """Per-agent batches ``[K, B, ...]``: agents along ``agents``, examples along ``data``."""
  return NamedSharding(mesh, P(AGENTS, DATA))


def pooled_batch(mesh: Mesh) -> NamedSharding:
  """Pooled batches ``[B, ...]``: examples split over every device."""
  return NamedSharding(mesh, P((AGENTS, DATA)))


def tree_sharding(tree: Any, sharding: NamedSharding) -> Any:
  """The same sharding for every leaf; scalars (rank 0) are replicated."""
  rep = replicated(sharding.mesh)
  return jax.tree.map(lambda x: sharding if np.ndim(x) else rep, tree)


def put(tree: Any, sharding: NamedSharding) -> Any:
  """``device_put`` every leaf with ``sharding`` (scalars replicated)."""
  return jax.device_put(tree, tree_sharding(tree, sharding))
