"""Guards around a run's working directory.

* ``check_workdir`` refuses a workdir that cannot be used, or whose saved
  ``config.json`` differs from this run's config in a field that changes results;
* ``workdir_lock`` keeps a second concurrent run out (one lock per run, however
  many processes it has);
* ``atomic_write_json`` writes files that are never seen half-written;
* ``StopSignals`` turns SIGTERM (a preemption) and SIGINT (Ctrl-C) into a flag
  the loop polls, the same on every process of the run.

All checks run before anything is written. Paths may be local or ``gs://``
(``masc_jax.paths``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import threading
from typing import Any

import ml_collections

from masc_jax.parallel import multihost
from masc_jax import paths

# Fields that do not change what a run computes: a resumed run may change them.
# Device count and agent strategy change values only within float rounding, so a
# run saved on 4 devices may resume on 1.
RESULT_NEUTRAL_FIELDS = (
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "data_dir",
    "num_devices",
    "agent_axis_size",
    "agent_map",
    "member_map",
    "tensorboard",
    "eval_every_epochs",
    "profile_steps",
)


# Result-neutral fields that configs no longer have; a saved config.json may still
# hold them (debug_nan_step: fault injection, now ``MASC_FAULT=NAN:...``).
REMOVED_FIELDS = ("debug_nan_step",)


class WorkdirError(RuntimeError):
  """The workdir cannot be used, or belongs to another config or another live run."""


# Result-changing config fields added after runs were first saved, with the
# value that does what the library did before the field existed.
FIELDS_ADDED_LATER = {
    "collective_batches": "shuffled",
    "model.compute_dtype": "float32",
}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _result_fields(flat: dict[str, Any]) -> dict[str, Any]:
  return {
      k: v
      for k, v in flat.items()
      if k.split(".")[0] not in RESULT_NEUTRAL_FIELDS + REMOVED_FIELDS
  }


def check_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: bool = False,
) -> None:
  """Refuse a workdir that is not a directory, or that holds a run of another config.

  Raises:
    WorkdirError: naming the path, or listing every result-changing field that differs.
  """
  try:
    paths.check_supported(workdir)
  except paths.UnsupportedPathError as e:
    raise WorkdirError(str(e)) from None
  if paths.is_local(workdir):
    _check_local_workdir(workdir)
  path = paths.join(workdir, "config.json")
  if not paths.exists(path):
    return
  try:
    saved = _result_fields(_flatten(json.loads(paths.read_text(path))))
  except (ValueError, AttributeError) as e:
    raise WorkdirError(
        f"{path} is not a config this program wrote ({e}); "
        "use another --workdir"
    ) from None
  current = _result_fields(_flatten(json.loads(config.to_json())))
  # A run saved before a field existed ran with the behaviour the field's
  # old value names (not necessarily today's default).
  saved = {
      **{k: v for k, v in FIELDS_ADDED_LATER.items() if k not in saved},
      **saved,
  }
  diffs = [
      f"{k}: saved {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
      for k in sorted(set(saved) | set(current))
      if saved.get(k) != current.get(k)
  ]
  if diffs and not allow_config_change:
    raise WorkdirError(
        f"{workdir} holds a run with a different config; these fields differ:\n  "
        + "\n  ".join(diffs)
        + "\nUse another --workdir, or pass --allow_config_change to resume anyway."
    )


def _check_local_workdir(workdir: str) -> None:
  """A local workdir must be a folder we can create and write (checked without writing)."""
  if os.path.exists(workdir):
    if not os.path.isdir(workdir):
      raise WorkdirError(f"--workdir={workdir} exists and is not a directory")
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise WorkdirError(f"--workdir={workdir} is not writable")
    return
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(
        f"--workdir={workdir}: {parent} is a file, not a directory"
    )
  if not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(
        f"--workdir={workdir} cannot be created: {parent} is not writable"
    )


_LOCKED_OK, _LOCK_HELD, _UNWRITABLE = 0, 1, 2


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """An exclusive lock on ``workdir/.lock``: a second concurrent run refuses.

  ``flock`` is released by the kernel when the holder dies, so a killed run
  never leaves a stale lock behind. In a multi-process run process 0 takes the
  lock for the whole run and tells the others whether it got it, so a run is
  never refused by its own lock and every process of a refused run stops.
  Object stores have no lock: a ``gs://`` workdir is the user's to keep to one
  run.
  """
  handle, status, problem = None, _LOCKED_OK, ""
  if multihost.is_primary():
    try:
      if paths.is_local(workdir):
        os.makedirs(workdir, exist_ok=True)
        handle = open(os.path.join(workdir, ".lock"), "a+")
        try:
          fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          handle.close()
          handle, status = None, _LOCK_HELD
      else:
        paths.makedirs(workdir)
    except OSError as e:
      status, problem = _UNWRITABLE, e.strerror or str(e)
  # Every process learns process 0's outcome, so all of them go on or all stop.
  status = multihost.broadcast_from_primary(status)
  if status == _LOCK_HELD:
    raise WorkdirError(
        f"another run is writing {workdir} (it holds {workdir}/.lock); "
        "wait for it to finish or use another --workdir"
    )
  if status == _UNWRITABLE:
    raise WorkdirError(
        f"--workdir={workdir} cannot be written: "
        f"{problem or 'process 0 could not create it'}"
    )
  try:
    yield
  finally:
    if handle is not None:
      fcntl.flock(handle, fcntl.LOCK_UN)
      handle.close()


def atomic_write_json(path: str, obj: Any) -> None:
  """Write ``obj`` as JSON so that ``path`` never holds half a file."""
  paths.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


class StopSignals:
  """SIGTERM (a preemption) and SIGINT (Ctrl-C) as a flag that the loop polls at fixed points.

  The loop then saves a checkpoint where it is and exits: 143 after SIGTERM,
  130 after SIGINT (``exit_status``; ``name`` says which). The handler only
  sets the flag: a blocking JAX call (a step, a transfer) finishes first, and no
  exception ever comes out of the middle of one.

  A second Ctrl-C quits at once: the first one puts back the kernel's default
  action, so the second kills the process even inside a long C call. Nothing is
  corrupted: files are written to a temporary name and renamed, an unfinished
  Orbax save is a temporary folder that is never taken for a checkpoint, and
  the kernel releases the workdir lock.

  One process: Python handlers set the flag. Several processes: each may get
  the signal at a different step, but a checkpoint save is collective, so the
  processes must stop at the same point: JAX's preemption sync manager (which
  catches SIGTERM itself) agrees on it, and ``poll`` asks it. A Ctrl-C on one
  of them is passed to that manager as a SIGTERM of the process, so the run
  stops the same way (and that process exits 130). Every process calls
  ``poll`` at the same points in the same order; ``raised`` reads the answer
  of the last poll without advancing.
  """

  def __init__(self):
    self.raised = False
    self.interrupted = False  # Ctrl-C on this process
    self._previous: dict[int, Any] = {}
    self._polls = 0
    self._synced = False

  @property
  def name(self) -> str:
    return "SIGINT" if self.interrupted else "SIGTERM"

  @property
  def exit_status(self) -> int:
    """The shell's status for death by the signal: 128 + its number."""
    return 128 + (signal.SIGINT if self.interrupted else signal.SIGTERM)

  def __enter__(self):
    import jax

    self._synced = jax.process_count() > 1
    # Signal handlers can only be installed from the main thread; several processes
    # leave SIGTERM to JAX's preemption notifier.
    if threading.current_thread() is threading.main_thread():
      if not self._synced:
        self._previous[signal.SIGTERM] = signal.signal(
            signal.SIGTERM, self._handle
        )
      self._previous[signal.SIGINT] = signal.signal(
          signal.SIGINT, self._interrupt
      )
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def _interrupt(self, signum, frame):
    self.interrupted = True
    # Not print(): a handler that runs while the main thread is inside a
    # buffered write would re-enter it.
    os.write(
        2,
        b"\nCtrl-C: saving a checkpoint after this step (Ctrl-C again quits at"
        b" once, losing the steps since the last checkpoint)\n",
    )
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if self._synced:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._handle(signum, frame)

  def poll(self) -> bool:
    """True once a stop was asked for (on any process of the run: then on all at once)."""
    if self._synced and not self.raised:
      from jax.experimental import multihost_utils

      self.raised = bool(
          multihost_utils.reached_preemption_sync_point(self._polls)
      )
    self._polls += 1
    return self.raised

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
