"""Stacked agents: K parameter pytrees as one pytree with a leading agent axis.

Every leaf of a stacked pytree has shape ``[K, ...]``. ``agent_map`` runs a
per-agent function over that axis, either as one batched program (``vmap``) or
as K copies of the plain program inside the same trace (``unroll``); both give
the same values. Which is faster depends on the backend: a vmapped convolution
with per-agent kernels becomes a grouped convolution, which XLA:CPU runs
slowly, while on TPU/GPU one batched program is usually best. ``auto`` picks by
backend (see ``resolve_strategy`` and BUILD_NOTES.md for the measurements).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

AGENT_MAP_STRATEGIES = ("auto", "vmap", "unroll")

PyTree = Any


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
  """``auto`` -> ``vmap`` or ``unroll`` for the given (default: current) backend."""
  if strategy not in AGENT_MAP_STRATEGIES:
    raise ValueError(
        f"agent_map must be one of {AGENT_MAP_STRATEGIES}, got {strategy!r}"
    )
  if strategy != "auto":
    return strategy
  backend = backend or jax.default_backend()
  # Measured with benchmarks/agent_step.py (BUILD_NOTES.md "Performance"): on
  # XLA:CPU a vmapped convolution with per-agent kernels becomes a grouped
  # convolution, 4x slower than K plain ones at K=4 (39 vs 157 agent-img/s).
  # On TPU/GPU one batched program keeps the device full.
  return "unroll" if backend == "cpu" else "vmap"


def num_agents(stacked: PyTree) -> int:
  """K, the size of the leading axis shared by every leaf."""
  sizes = {x.shape[0] for x in jax.tree.leaves(stacked)}
  if len(sizes) != 1:
    raise ValueError(
        f"leaves of a stacked pytree disagree on the agent axis: sizes {sorted(sizes)}"
    )
  return sizes.pop()


def agent_slice(stacked: PyTree, k: int) -> PyTree:
  """Agent ``k``'s pytree out of a stacked one."""
  return jax.tree.map(lambda x: x[k], stacked)


def stack_agents(trees: Sequence[PyTree]) -> PyTree:
  """``[tree_0, ..., tree_{K-1}]`` -> one pytree with leaves ``[K, ...]``."""
  if not trees:
    raise ValueError("stack_agents needs at least one pytree")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_agents(stacked: PyTree) -> list[PyTree]:
  """Inverse of ``stack_agents``."""
  return [agent_slice(stacked, k) for k in range(num_agents(stacked))]


def agent_map(
    fn: Callable[..., Any],
    in_axes: int | None | Sequence[int | None] = 0,
    strategy: str = "auto",
) -> Callable[..., Any]:
  """Map ``fn`` over the leading agent axis of its arguments.

  Same contract as ``jax.vmap(fn, in_axes)`` with ``out_axes=0``, where each
  entry of ``in_axes`` is ``0`` (argument stacked over agents) or ``None``
  (shared by all agents).

  Args:
    fn: the per-agent function.
    in_axes: an int/None for all arguments, or one per positional argument.
    strategy: ``vmap``, ``unroll`` or ``auto`` (see ``resolve_strategy``).
  """
  strategy = resolve_strategy(strategy)
  if strategy == "vmap":
    return jax.vmap(fn, in_axes=in_axes)

  def unrolled(*args):
    axes = (
        in_axes
        if isinstance(in_axes, (list, tuple))
        else (in_axes,) * len(args)
    )
    if len(axes) != len(args):
      raise ValueError(
          f"in_axes has {len(axes)} entries for {len(args)} arguments"
      )
    for ax in axes:
      if ax not in (0, None):
        raise ValueError(f"agent_map supports in_axes of 0 or None, got {ax!r}")
    stacked_args = [a for a, ax in zip(args, axes) if ax == 0]
    if not stacked_args:
      raise ValueError(
          "agent_map needs at least one argument stacked over agents"
      )
    k_total = num_agents(stacked_args)
    outs = [
        fn(*[agent_slice(a, k) if ax == 0 else a for a, ax in zip(args, axes)])
        for k in range(k_total)
    ]
    return stack_agents(outs)

  return unrolled


def init_stacked(
    init_fn: Callable[[jax.Array], PyTree], keys: jax.Array
) -> PyTree:
  """Initialise K agents from K keys into one stacked pytree.

  Args:
    init_fn: ``key -> pytree`` for one agent (e.g. ``lambda k: model.init(...)``).
    keys: ``[K]`` PRNG keys, one per agent.
  """
  return jax.vmap(init_fn)(keys)
