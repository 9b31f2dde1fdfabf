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

Every model of a run has a leading member axis (``[1, ...]`` for a single
run). Older versions saved a single run without it: such a checkpoint (every
leaf the shape wanted without its leading 1) is restored with the axis added.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from masc_jax.parallel import multihost
from masc_jax import paths

PyTree = Any


class NoGoodCheckpointError(RuntimeError):
  """Checkpoints exist but none can be restored."""


class CheckpointMismatchError(ValueError):
  """A readable checkpoint of other models (another config): not damaged, not usable."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (full or read-only filesystem, lost bucket access)."""


def _write_error(
    directory: str, error: Exception, complete: list[int]
) -> CheckpointWriteError:
  """One line: where, why, and which checkpoint a rerun resumes from (``complete``)."""
  text = " ".join(str(error).split())
  reason = (
      "no space left on device"
      if "No space left on device" in text
      else f"{type(error).__name__}: {text[:300]}"
  )
  kept = (
      f"the last complete checkpoint (step {max(complete)}) is kept"
      if complete
      else "no checkpoint was written yet"
  )
  return CheckpointWriteError(
      f"could not write a checkpoint to {directory}: {reason}; {kept}"
  )


class _FailedSaveReports(logging.Filter):
  """Holds back what a failed save prints besides its exception, while a Checkpointer is open.

  A failed save is logged, with tracebacks, by each of Orbax's writer threads
  (through absl, whose records go to the ``absl`` Python logger) and again by
  ``wait_until_finished``, which then raises; writes still in flight finish
  into event loops Orbax has closed (unraisable ``RuntimeError: Event loop is
  closed`` from asyncio's ``call_soon_threadsafe``), and their futures log
  "exception was never retrieved" (the ``asyncio`` logger). The run reports
  the exception in one line (``CheckpointWriteError``): ``drop`` forgets the
  rest. If no exception follows, ``release`` prints what was held after all.
  """

  LOGGERS = ("absl", "asyncio")

  def __init__(self):
    super().__init__()
    self.records: list[logging.LogRecord] = []
    self.unraisable: list[Any] = []
    self._previous_hook = None

  def install(self) -> None:
    for name in self.LOGGERS:
      logging.getLogger(name).addFilter(self)
    self._previous_hook = sys.unraisablehook
    sys.unraisablehook = self._unraisable

  def uninstall(self) -> None:
    for name in self.LOGGERS:
      logging.getLogger(name).removeFilter(self)
    if sys.unraisablehook == self._unraisable:
      sys.unraisablehook = self._previous_hook

  def filter(self, record: logging.LogRecord) -> bool:
    parts = record.pathname.split(os.sep)
    if record.levelno >= logging.ERROR and (
        "orbax" in parts or record.name == "asyncio"
    ):
      self.records.append(record)
      return False
    return True

  def _unraisable(self, unraisable: Any) -> None:
    if isinstance(
        unraisable.exc_value, RuntimeError
    ) and "Event loop is closed" in str(unraisable.exc_value):
      self.unraisable.append(unraisable)
    else:
      self._previous_hook(unraisable)

  def drop(self) -> None:
    self.records, self.unraisable = [], []

  def release(self) -> None:
    records, unraisable = self.records, self.unraisable
    self.drop()
    self.uninstall()
    try:
      for record in records:
        logging.getLogger(record.name).handle(record)
      for one in unraisable:
        self._previous_hook(one)
    finally:
      self.install()


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """``{"experts.params.backbone.conv0.kernel": shape, ...}``, Orbax's leaf names."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      ".".join(_key_name(k) for k in path): tuple(leaf.shape)
      for path, leaf in flat
  }


def lacks_leading_axis(
    saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]
) -> bool:
  """Whether every wanted leaf is ``[1, *saved]``: the same models saved without that axis."""
  return saved.keys() == wanted.keys() and all(
      wanted[name][:1] == (1,) and wanted[name][1:] == shape
      for name, shape in saved.items()
  )


def _without_leading_axis(abstract: PyTree, shardings: PyTree | None):
  """``abstract`` and ``shardings`` of the leaves without their leading axis."""
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), abstract
  )
  if shardings is not None:
    shardings = jax.tree.map(
        lambda s: jax.sharding.NamedSharding(
            s.mesh, jax.sharding.PartitionSpec(*tuple(s.spec)[1:])
        ),
        shardings,
    )
  return abstract, shardings


def mismatch(
    saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]
) -> str | None:
  """None if the saved leaves are exactly the wanted ones; else the first differences."""
  problems = [f"{name} is missing" for name in sorted(set(wanted) - set(saved))]
  problems += [
      f"{name} is not part of this config"
      for name in sorted(set(saved) - set(wanted))
  ]
  problems += [
      f"{name} has shape {saved[name]}, this config needs {wanted[name]}"
      for name in sorted(set(saved) & set(wanted))
      if saved[name] != wanted[name]
  ]
  if not problems:
    return None
  more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
  return "; ".join(problems[:3]) + more


class Checkpointer:
  """Saves and restores ``(state, meta)`` in ``directory`` through Orbax."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = paths.absolute(directory)
    self._failure_reports = _FailedSaveReports()
    self._failure_reports.install()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
        ),
        item_names=("state", "meta"),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict) -> None:
    """Start saving (asynchronously); the previous save is finished first.

    Raises:
      CheckpointWriteError: this save, or the previous one, could not be written.
    """
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
          ),
          force=True,
      )
    except (OSError, ValueError, RuntimeError) as e:
      raise self._write_error(e) from e

  def wait(self) -> None:
    """Block until the last save is on disk (``CheckpointWriteError`` if it failed)."""
    try:
      self._manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      raise self._write_error(e) from e
    # Saved after all: whatever Orbax reported is news, not a failure told twice.
    if self._failure_reports.records or self._failure_reports.unraisable:
      self._failure_reports.release()

  def _write_error(self, error: Exception) -> CheckpointWriteError:
    self._failure_reports.drop()  # told in the one line instead
    return _write_error(self.directory, error, self.complete_steps())

  def complete_steps(self) -> list[int]:
    """The steps whose checkpoints are complete on disk (read from the directory).

    The manager's own list holds a step from the moment its save starts.
    """
    try:
      self._manager.reload()
      return self.all_steps()
    except Exception:  # noqa: BLE001 - only for the message of a failed save
      return []

  def restore(
      self,
      step: int,
      abstract_state: PyTree,
      shardings: PyTree | None = None,
      log=logging.warning,
  ) -> tuple[PyTree, dict]:
    """Restore one step into ``abstract_state``'s structure (and shardings).

    A checkpoint whose leaves all lack ``abstract_state``'s leading axis of
    size 1 (a single run saved before runs carried a member axis) is restored
    with that axis added (and reported through ``log``).

    Raises:
      CheckpointMismatchError: the checkpoint holds models of other shapes.
      Exception: anything else Orbax raises on a damaged checkpoint.
    """
    # Compare shapes from the metadata first: a clear message, and no read of
    # arrays that cannot fit.
    saved = leaf_shapes(self._manager.item_metadata(step)["state"])
    wanted = leaf_shapes(abstract_state)
    add_axis = lacks_leading_axis(saved, wanted)
    problem = None if add_axis else mismatch(saved, wanted)
    if problem is not None:
      raise CheckpointMismatchError(
          f"checkpoint {step} does not fit this config: {problem}"
      )
    target_shardings = shardings
    if add_axis:
      log(
          f"checkpoint {step} holds one run without a member axis (an older "
          "version's): restored as a run of one member"
      )
      abstract_state, shardings = _without_leading_axis(
          abstract_state, shardings
      )
    if shardings is not None:
      target = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract_state,
          shardings,
      )
    else:
      target = abstract_state
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    state, meta = restored["state"], restored["meta"]
    if not isinstance(meta, dict) or "stage" not in meta:
      raise ValueError(f"checkpoint {step} has no run position in its metadata")
    if add_axis:
      state = jax.jit(
          lambda tree: jax.tree.map(lambda x: x[None], tree),
          out_shardings=target_shardings,
      )(state)
    return state, meta

  def restore_latest_good(
      self,
      abstract_state: PyTree,
      shardings: PyTree | None = None,
      log=logging.warning,
  ) -> tuple[int, PyTree, dict] | None:
    """The newest checkpoint that restores cleanly, or None if there are none.

    Damaged checkpoints (unreadable, truncated, missing items) are reported
    through ``log`` and moved to ``<directory>/bad/`` so later saves do not
    collide with them. Checkpoints of other shapes (another config) are
    reported and left in place.

    Raises:
      NoGoodCheckpointError: checkpoints exist but none restores.
    """
    steps = self.all_steps()
    if not steps:
      return None
    problems = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state, shardings, log)
        return step, state, meta
      except CheckpointMismatchError as e:
        problems.append(str(e))
        log(f"{e}; trying the previous one")
      except Exception as e:  # noqa: BLE001 - any failure means: do not trust it
        reason = (
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        problems.append(
            f"checkpoint {step} is damaged ({reason}); moved to {self.directory}/bad/"
        )
        log(
            f"checkpoint at step {step} is unusable ({reason}); trying the previous one"
        )
        self._set_aside(step)
    raise NoGoodCheckpointError(
        f"no usable checkpoint in {self.directory}:\n  "
        + "\n  ".join(problems)
        + "\nRefusing to start over on top of them: remove the workdir or pass a new --workdir."
    )

  def _set_aside(self, step: int) -> None:
    if multihost.is_primary():
      source = epath.Path(self.directory) / str(step)
      target = epath.Path(self.directory) / "bad" / str(step)
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target.rmtree()
      if source.exists():
        source.rename(target)
    # Every process sees the step gone before any of them lists the steps again.
    multihost.sync(f"checkpoint_{step}_set_aside")
    self._manager.reload()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      finally:
        # The futures of a failed save report themselves when collected.
        gc.collect()
        self._failure_reports.drop()
        self._failure_reports.uninstall()


def abstract_like(tree: PyTree) -> PyTree:
  """``ShapeDtypeStruct`` leaves for a pytree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree
  )
