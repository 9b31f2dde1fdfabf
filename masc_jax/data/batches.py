"""Class groups and batch order: which agent owns which classes, and which
train / test indices each step sees.

This module owns the protocol's split of the data among agents (spec,
"Protocols"): the C classes are cut into K disjoint groups of M = C / K
classes, and agent k trains on the samples of its group only
(`make_class_groups`, `agent_indices`). It also owns the order in which
samples are visited: `AgentBatches` (stacked [K, B] per-agent batches),
`PooledBatches` (the collective network's batches over the pooled data),
`OwnerBatches` (pooled batches of fixed owner composition) and `eval_batches` (fixed-shape, padded evaluation batches).

Everything here is NumPy and hands out *indices* into the train / test arrays
of a `masc_jax.data.arrays.ArrayDataset`; the training loop keeps the images on the
device and gathers batches there. Batch order is a pure function of
(seed, step): each epoch's permutation is drawn from its own seeded
`np.random.default_rng`, so a resumed run sees exactly the batches of an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ClassGroups:
  """The split of the C classes among K agents.

  Attributes:
    groups: [K, M] int32; groups[k] = the class ids agent k owns (sorted).
    class_owner: [C] int32; class_owner[c] = the agent that owns class c.
  """

  groups: np.ndarray
  class_owner: np.ndarray

  def __post_init__(self) -> None:
    self.groups.setflags(write=False)
    self.class_owner.setflags(write=False)

  @property
  def num_agents(self) -> int:
    """K."""
    return int(self.groups.shape[0])

  @property
  def classes_per_agent(self) -> int:
    """M = C / K."""
    return int(self.groups.shape[1])

  @property
  def num_classes(self) -> int:
    """C."""
    return int(self.class_owner.shape[0])


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def make_class_groups(
    num_classes: int, num_agents: int, permutation_seed: int | None = None
) -> ClassGroups:
  """Splits classes 0..C-1 into K disjoint groups of M = C / K classes.

  Args:
    num_classes: C >= 1.
    num_agents: K >= 1, must divide C.
    permutation_seed: None: label order (agent k owns classes M*k .. M*k+M-1).
      An int: a permutation of the classes drawn from
      np.random.default_rng(permutation_seed) is cut into K consecutive
      groups (each group then sorted).

  Raises:
    ValueError: C < 1, K < 1, or K does not divide C.
  """
  num_classes = operator.index(num_classes)
  num_agents = operator.index(num_agents)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
  if num_agents < 1:
    raise ValueError(f"num_agents must be >= 1; got {num_agents}.")
  if num_classes % num_agents:
    raise ValueError(
        f"num_classes={num_classes} is not divisible by num_agents={num_agents}: "
        f"every agent must own the same number of classes. Choose num_agents "
        f"among the divisors of {num_classes}: "
        f"{', '.join(map(str, _divisors(num_classes)))}."
    )
  if permutation_seed is None:
    order = np.arange(num_classes)
  else:
    order = np.random.default_rng(permutation_seed).permutation(num_classes)
  groups = np.sort(order.reshape(num_agents, -1), axis=1).astype(np.int32)
  class_owner = np.empty(num_classes, dtype=np.int32)
  for k, group in enumerate(groups):
    class_owner[group] = k
  return ClassGroups(groups=groups, class_owner=class_owner)


def agent_indices(
    labels: np.ndarray, class_groups: ClassGroups
) -> list[np.ndarray]:
  """Per agent, the indices of the samples whose label that agent owns.

  Args:
    labels: [N] integer labels in [0, C).
    class_groups: the class split.

  Returns:
    K arrays; element k is sorted int64 indices into `labels` of agent k's samples.

  Raises:
    ValueError: labels not 1-D integers, or a label outside [0, C).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"labels must be a 1-D integer array; got dtype {labels.dtype} with "
        f"shape {labels.shape}."
    )
  num_classes = class_groups.num_classes
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    position = int(np.flatnonzero(bad)[0])
    raise ValueError(
        f"label {int(labels[position])} (at index {position}) is outside "
        f"[0, {num_classes}): the class groups cover {num_classes} classes; "
        f"build them with the dataset's num_classes."
    )
  owner = class_groups.class_owner[labels]
  return [
      np.flatnonzero(owner == k).astype(np.int64)
      for k in range(class_groups.num_agents)
  ]


# ----------------------------------------------------------------------------
# batch indices


def _check_batch_args(batch_size: int, seed: int) -> tuple[int, int]:
  batch_size = operator.index(batch_size)
  seed = operator.index(seed)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  if seed < 0:
    # np.random.SeedSequence only takes non-negative entropy.
    raise ValueError(f"seed must be a non-negative integer; got {seed}.")
  return batch_size, seed


def _as_index_array(indices: np.ndarray, what: str) -> np.ndarray:
  indices = np.asarray(indices)
  if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(
        f"{what} must be a 1-D integer array; got dtype {indices.dtype} with "
        f"shape {indices.shape}."
    )
  if indices.size and (
      indices.min() < 0 or indices.max() > np.iinfo(np.int32).max
  ):
    raise ValueError(
        f"{what} must lie in [0, 2**31); got [{indices.min()}, {indices.max()}]."
    )
  return indices.astype(np.int32)


def _check_step(step: int) -> int:
  step = operator.index(step)
  if step < 0:
    raise ValueError(f"step must be >= 0; got {step}.")
  return step


# Distinct first words of the seed sequences, so AgentBatches and PooledBatches
# built with the same seed still draw independent streams.
_AGENT_STREAM = 0
_POOLED_STREAM = 1
_OWNER_STREAM = 2

# How the collective's batches are drawn (config.collective_batches).
SHUFFLED, BY_OWNER = "shuffled", "by_owner"
COLLECTIVE_BATCHES = (SHUFFLED, BY_OWNER)


class AgentBatches:
  """Stacked per-agent training batches: each step, agent k gets B indices into
  the train set, from its own data only.

  Every agent has the same number of steps per epoch (the smallest agent's
  n_k // B, remainders dropped) so the K batches stack into one [K, B] array
  for the vmapped step. Each epoch, agent k draws a fresh permutation of its
  own indices from np.random.default_rng((seed, 0, epoch, k)); `indices(step)`
  is therefore a pure function of (seed, step), and a run resumed at any step
  sees exactly the batches of an uninterrupted run.
  """

  def __init__(
      self, per_agent_indices: Sequence[np.ndarray], batch_size: int, seed: int
  ) -> None:
    """Args:
    per_agent_indices: K arrays of indices into the train set (see agent_indices).
    batch_size: B, per agent.
    seed: non-negative int.

    Raises:
      ValueError: no agents, bad batch_size / seed, or an agent with fewer than B samples.
    """
    self.batch_size, self.seed = _check_batch_args(batch_size, seed)
    if len(per_agent_indices) == 0:
      raise ValueError("per_agent_indices is empty: need at least one agent.")
    self._indices = [
        _as_index_array(ix, f"per_agent_indices[{k}]")
        for k, ix in enumerate(per_agent_indices)
    ]
    for k, ix in enumerate(self._indices):
      if ix.shape[0] < self.batch_size:
        raise ValueError(
            f"agent {k} has {ix.shape[0]} training samples, fewer than "
            f"batch_size={self.batch_size}: it cannot fill one batch. Lower "
            f"the batch size to at most {ix.shape[0]}."
        )
    self.num_agents = len(self._indices)
    self.steps_per_epoch = min(
        ix.shape[0] // self.batch_size for ix in self._indices
    )
    self._cached_epoch: int | None = None
    self._cached_perms: np.ndarray | None = None  # [K, steps_per_epoch * B]

  def _epoch_perms(self, epoch: int) -> np.ndarray:
    """[K, steps_per_epoch * B]: each agent's shuffled indices for `epoch`."""
    if epoch != self._cached_epoch:
      used = self.steps_per_epoch * self.batch_size
      perms = np.empty((self.num_agents, used), dtype=np.int32)
      for k, ix in enumerate(self._indices):
        rng = np.random.default_rng((self.seed, _AGENT_STREAM, epoch, k))
        perms[k] = ix[rng.permutation(ix.shape[0])[:used]]
      self._cached_epoch, self._cached_perms = epoch, perms
    assert self._cached_perms is not None
    return self._cached_perms

  def indices(self, step: int) -> np.ndarray:
    """[K, B] int32 train-set indices for global step `step` (epoch = step // steps_per_epoch)."""
    step = _check_step(step)
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size
    return self._epoch_perms(epoch)[:, start : start + self.batch_size].copy()


class PooledBatches:
  """Batches over the pooled data of the society (all agents' indices), for
  the collective network.

  n // B steps per epoch (remainder dropped); epoch e uses the permutation
  drawn from np.random.default_rng((seed, 1, e)), so `indices(step)` is a pure
  function of (seed, step) and resuming reproduces the same batches.
  """

  def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
    """Args:
    indices: [n] indices into the train set (e.g. the union of agent_indices).
    batch_size: B.
    seed: non-negative int.

    Raises:
      ValueError: bad batch_size / seed, or fewer than B indices.
    """
    self.batch_size, self.seed = _check_batch_args(batch_size, seed)
    self._indices = _as_index_array(indices, "indices")
    n = self._indices.shape[0]
    if n < self.batch_size:
      raise ValueError(
          f"the pool has {n} samples, fewer than batch_size={self.batch_size}: "
          f"it cannot fill one batch. Lower the batch size to at most {n}."
      )
    self.steps_per_epoch = n // self.batch_size
    self._cached_epoch: int | None = None
    self._cached_perm: np.ndarray | None = None

  def indices(self, step: int) -> np.ndarray:
    """[B] int32 train-set indices for global step `step`."""
    step = _check_step(step)
    epoch, position = divmod(step, self.steps_per_epoch)
    if epoch != self._cached_epoch:
      rng = np.random.default_rng((self.seed, _POOLED_STREAM, epoch))
      self._cached_epoch = epoch
      self._cached_perm = self._indices[rng.permutation(self._indices.shape[0])]
    assert self._cached_perm is not None
    start = position * self.batch_size
    return self._cached_perm[start : start + self.batch_size].copy()


def owner_batch_sizes(
    agent_sizes: Sequence[int], batch_size: int
) -> tuple[int, ...]:
  """How many of a pooled batch's B images each agent owns, in proportion to its data.

  ``floor(B * n_k / n)`` each, then the leftover images one by one to the
  largest remainders (ties: the lower agent). The sizes sum to B, and over an
  epoch every agent is drawn in the share a shuffled pooled batch has on average.
  """
  sizes = np.asarray(agent_sizes, dtype=np.int64)
  if sizes.ndim != 1 or sizes.size == 0 or (sizes <= 0).any():
    raise ValueError(
        f"agent_sizes must be positive counts; got {list(agent_sizes)}."
    )
  batch_size, _ = _check_batch_args(batch_size, 0)
  exact = batch_size * sizes / sizes.sum()
  groups = np.floor(exact).astype(np.int64)
  leftover = batch_size - int(groups.sum())
  order = np.argsort(-(exact - groups), kind="stable")
  groups[order[:leftover]] += 1
  return tuple(int(g) for g in groups)


class OwnerBatches:
  """Pooled batches of fixed owner composition, for the collective network.

  Every batch is K contiguous groups: the first ``group_sizes[0]`` images are
  agent 0's, the next ``group_sizes[1]`` agent 1's, and so on
  (``owner_batch_sizes``). With ``kd_teachers=owner`` the collective step then
  runs each expert on its own group only: K x the largest group (about B)
  teacher forwards instead of K x B.

  Agent k's images come from its own stream: its indices reshuffled with
  np.random.default_rng((seed, 2, e, k)) each time the stream has used them all
  (pass e), read ``group_sizes[k]`` at a time. An epoch is n // B steps, as for
  `PooledBatches`, so schedules and step counts do not change.
  `indices(step)` is a pure function of (seed, step).
  """

  def __init__(
      self, per_agent_indices: Sequence[np.ndarray], batch_size: int, seed: int
  ) -> None:
    """Args:
    per_agent_indices: K arrays of indices into the train set (see agent_indices).
    batch_size: B.
    seed: non-negative int.
    """
    self.batch_size, self.seed = _check_batch_args(batch_size, seed)
    self._indices = [
        _as_index_array(ix, f"per_agent_indices[{k}]")
        for k, ix in enumerate(per_agent_indices)
    ]
    self.group_sizes = owner_batch_sizes(
        [len(ix) for ix in self._indices], self.batch_size
    )
    n = sum(len(ix) for ix in self._indices)
    if n < self.batch_size:
      raise ValueError(
          f"the pool has {n} samples, fewer than batch_size={self.batch_size}: "
          f"it cannot fill one batch. Lower the batch size to at most {n}."
      )
    self.steps_per_epoch = n // self.batch_size
    self._passes: dict[tuple[int, int], np.ndarray] = {}

  def _pass(self, k: int, e: int) -> np.ndarray:
    """Agent k's indices in the order of its stream's pass e (a few kept)."""
    if (k, e) not in self._passes:
      if len(self._passes) > 4 * len(self._indices):
        self._passes.clear()
      ix = self._indices[k]
      rng = np.random.default_rng((self.seed, _OWNER_STREAM, e, k))
      self._passes[(k, e)] = ix[rng.permutation(ix.shape[0])]
    return self._passes[(k, e)]

  def _take(self, k: int, start: int, count: int) -> np.ndarray:
    """``count`` entries of agent k's endless stream from position ``start``."""
    n_k = self._indices[k].shape[0]
    out, position = [], start
    while position < start + count:
      e, offset = divmod(position, n_k)
      chunk = self._pass(k, e)[offset : offset + start + count - position]
      out.append(chunk)
      position += chunk.shape[0]
    return np.concatenate(out) if out else np.empty(0, np.int32)

  def indices(self, step: int) -> np.ndarray:
    """[B] int32 train-set indices for global step `step`, grouped by owner."""
    step = _check_step(step)
    return np.concatenate(
        [
            self._take(k, step * size, size)
            for k, size in enumerate(self.group_sizes)
        ]
    ).astype(np.int32)


def eval_batches(
    num_examples: int, batch_size: int
) -> Iterator[tuple[np.ndarray, int]]:
  """Fixed-shape batches covering 0..num_examples-1 in order.

  Yields:
    (indices [batch_size] int32, num_valid): the first num_valid entries are
    real; the last batch is padded by repeating the last index so that a
    jit-compiled eval step always sees one shape (callers must ignore the
    padded rows). Nothing is yielded when num_examples == 0.

  Raises:
    ValueError: num_examples < 0 or batch_size < 1.
  """
  num_examples = operator.index(num_examples)
  batch_size = operator.index(batch_size)
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0; got {num_examples}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  for start in range(0, num_examples, batch_size):
    stop = min(start + batch_size, num_examples)
    batch = np.full(batch_size, stop - 1, dtype=np.int32)
    batch[: stop - start] = np.arange(start, stop, dtype=np.int32)
    yield batch, stop - start
