"""A society: everything fixed for a run, built from its config before anything is written.

``build_society(config)`` validates the config against the data and the
devices, loads the dataset, splits the classes among the agents, builds the
networks and the device mesh, and puts the images on device. The stage table
(``masc_jax.training.protocol``) reads a ``Society``; the training loop
(``masc_jax.training.train``) runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from masc_jax import config_lib
from masc_jax.data import arrays, batches, registry
from masc_jax.method import agents
from masc_jax.nn import network
from masc_jax.parallel import sharding
from masc_jax.training import population


@dataclasses.dataclass
class Society:
  """Everything fixed for a run: data on device, class groups, networks, mesh."""

  config: ml_collections.ConfigDict
  dataset: arrays.ArrayDataset
  class_groups: batches.ClassGroups
  mesh: jax.sharding.Mesh
  expert_network: network.Network
  collective_network: network.Network
  backbone: network.Backbone
  head: network.Head
  agent_batches: batches.AgentBatches
  pooled_batches: batches.PooledBatches | batches.OwnerBatches
  owner_batch_sizes: (
      tuple[int, ...] | None
  )  # by_owner: each agent's share of a collective batch
  train_images: jax.Array  # [N, H, W, Ch] uint8, replicated on the mesh
  train_labels: jax.Array  # [N] int32
  test_images: jax.Array
  strategy: str
  members: population.MemberAxis  # the population (a single run: one member)

  @property
  def num_agents(self) -> int:
    return self.class_groups.num_agents

  def with_settings(self, settings: dict[str, Any]) -> Society:
    """This society with swept settings (floats, or one member's traced values) in its config."""
    if not settings:
      return self
    return dataclasses.replace(
        self, config=config_lib.with_settings(self.config, settings)
    )


def build_society(
    config: ml_collections.ConfigDict,
    dataset: arrays.ArrayDataset | None = None,
    *,
    devices: list[Any] | None = None,
    place_data: bool = True,
) -> Society:
  """Validate the config against the data and devices, load the data. Writes nothing.

  ``dataset``: use these arrays instead of loading ``config.dataset`` (benchmarks
  on synthetic data of a dataset's shapes). ``devices``: build the mesh on these
  devices, in this order (default ``jax.devices()``). ``place_data=False``: keep
  the images off the devices; the society's image and label arrays are then
  ``jax.ShapeDtypeStruct``s with the replicated sharding they would have (for
  compiling a run's programs on devices that cannot hold data, such as a TPU
  slice's compile-only devices: ``masc_jax.preflight``).
  """
  config_lib.validate(config)
  if dataset is None:
    data_dir = config.data_dir or None
    registry.check_dataset_available(config.dataset, data_dir)
    dataset = registry.load_dataset(config.dataset, data_dir)
  seed = config.class_order_seed
  groups = batches.make_class_groups(
      dataset.num_classes, config.num_agents, None if seed < 0 else seed
  )
  per_agent = batches.agent_indices(dataset.train_labels, groups)
  pooled = np.sort(np.concatenate(per_agent))
  config_lib.check_against_data(
      config, [len(ix) for ix in per_agent], len(pooled)
  )
  try:
    members = population.MemberAxis(
        config_lib.members_of(config), config.member_map
    )
  except config_lib.PopulationError as e:
    raise config_lib.ConfigError(str(e)) from None
  mesh = sharding.make_mesh(
      config.num_agents,
      config.num_devices,
      config.agent_axis_size,
      num_members=members.mesh_members,
      devices=devices,
  )

  expert = network.make_network(
      config.model, dataset.num_classes, config.model.expert_widths
  )
  collective = network.make_network(
      config.model, dataset.num_classes, config.model.collective_widths
  )
  rep = sharding.replicated(mesh)
  place = (
      (lambda x: jax.device_put(x, rep))
      if place_data
      else (lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep))
  )
  if config.collective_batches == batches.BY_OWNER:
    owner_batch_sizes = batches.owner_batch_sizes(
        [len(ix) for ix in per_agent], config.batch_size
    )
    make_pooled = lambda m: batches.OwnerBatches(
        per_agent, config.batch_size, seed=m.seed
    )
  else:
    owner_batch_sizes = None
    make_pooled = lambda m: batches.PooledBatches(
        pooled, config.batch_size, seed=m.seed
    )
  return Society(
      config=config,
      dataset=dataset,
      class_groups=groups,
      mesh=mesh,
      expert_network=expert,
      collective_network=collective,
      backbone=network.backbone_of(collective),
      head=network.head_of(collective),
      # Distinct data streams per batch kind, all from the member's seed.
      agent_batches=members.batches(
          lambda m: batches.AgentBatches(
              per_agent, config.batch_size, seed=m.seed
          )
      ),
      pooled_batches=members.batches(make_pooled),
      owner_batch_sizes=owner_batch_sizes,
      train_images=place(dataset.train_images),
      train_labels=place(dataset.train_labels.astype(np.int32)),
      test_images=place(dataset.test_images),
      strategy=agents.resolve_strategy(config.agent_map),
      members=members,
  )
