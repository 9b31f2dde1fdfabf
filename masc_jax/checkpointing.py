"""Orbax checkpoints of the whole run, and falling back past bad ones.

A checkpoint holds two items:
  ``state``: the pytree of every model's ``ModelState`` (stacked agents included);
  ``meta``:  JSON with the run's position (stage, step within it), the finished
             stages' results and timings.
The data order and every step key are pure functions of (seed, stage, step),
so the position is all the iterator and RNG state a resume needs.

Orbax writes each checkpoint into a temporary folder and renames it when
complete, so a process killed mid-save leaves no checkpoint that looks
finished. A finished checkpoint can still be damaged later (a truncated or
deleted file): ``restore_latest_good`` then reports it, moves it aside to
``checkpoints/bad/`` and tries the previous one.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class NoGoodCheckpointError(RuntimeError):
  """Checkpoints exist but none can be restored."""


def _shapes_match(restored: PyTree, abstract: PyTree) -> str | None:
  """None if ``restored`` has ``abstract``'s structure, shapes and dtypes; else why not."""
  if jax.tree.structure(restored) != jax.tree.structure(abstract):
    return "its tree structure differs from this config's models"
  for path, got, want in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                             jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
      return (f"{jax.tree_util.keystr(path[0])} has shape {tuple(got.shape)} {got.dtype}, "
              f"this config needs {tuple(want.shape)} {want.dtype}")
  return None


class Checkpointer:
  """Saves and restores ``(state, meta)`` in ``directory`` through Orbax."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True),
        item_names=("state", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict) -> None:
    """Start saving (asynchronously); the previous save is finished first."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    """Block until the last save is on disk."""
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: PyTree,
              shardings: PyTree | None = None) -> tuple[PyTree, dict]:
    """Restore one step into ``abstract_state``'s structure (and shardings)."""
    if shardings is not None:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, shardings)
    else:
      target = abstract_state
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state, meta = restored["state"], restored["meta"]
    mismatch = _shapes_match(state, abstract_state)
    if mismatch is not None:
      raise ValueError(f"checkpoint {step} does not fit this config: {mismatch}")
    if not isinstance(meta, dict) or "stage" not in meta:
      raise ValueError(f"checkpoint {step} has no run position in its metadata")
    return state, meta

  def restore_latest_good(self, abstract_state: PyTree, shardings: PyTree | None = None,
                          log=logging.warning) -> tuple[int, PyTree, dict] | None:
    """The newest checkpoint that restores cleanly, or None if there are none.

    Bad checkpoints (unreadable, truncated, wrong shapes) are reported through
    ``log`` and moved to ``<directory>/bad/`` so later saves do not collide
    with them.

    Raises:
      NoGoodCheckpointError: checkpoints exist but none restores.
    """
    steps = self.all_steps()
    if not steps:
      return None
    problems = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state, shardings)
        return step, state, meta
      except Exception as e:  # noqa: BLE001 - any failure means: do not trust it
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        problems.append(f"step {step}: {reason}")
        log(f"checkpoint at step {step} is unusable ({reason}); trying the previous one")
        self._set_aside(step)
    raise NoGoodCheckpointError(
        f"no usable checkpoint in {self.directory} (moved to {self.directory}/bad/):\n  "
        + "\n  ".join(problems)
        + "\nRefusing to start over on top of them: remove the workdir or pass a new --workdir.")

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      source = os.path.join(self.directory, str(step))
      bad_dir = os.path.join(self.directory, "bad")
      os.makedirs(bad_dir, exist_ok=True)
      target = os.path.join(bad_dir, str(step))
      if os.path.exists(target):
        shutil.rmtree(target)
      if os.path.exists(source):
        shutil.move(source, target)
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: PyTree) -> PyTree:
  """``ShapeDtypeStruct`` leaves for a pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
