"""Guards around a run's working directory.

* ``check_workdir`` refuses a workdir that cannot be used, or whose saved
  ``config.json`` differs from this run's config in a field that changes results;
* ``workdir_lock`` keeps a second concurrent run out;
* ``atomic_write_json`` writes files that are never seen half-written;
* ``SigtermFlag`` turns SIGTERM (a preemption) into a flag the loop checks.

All checks run before anything is written.
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

# Fields that do not change what a run computes: a resumed run may change them.
# Device count and agent strategy change values only within float rounding, so a
# run saved on 4 devices may resume on 1.
RESULT_NEUTRAL_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                         "data_dir", "debug_nan_step", "num_devices", "agent_axis_size",
                         "agent_map")


class WorkdirError(RuntimeError):
  """The workdir cannot be used, or belongs to another config or another live run."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _result_fields(flat: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in flat.items() if k.split(".")[0] not in RESULT_NEUTRAL_FIELDS}


def check_workdir(config: ml_collections.ConfigDict, workdir: str,
                  allow_config_change: bool = False) -> None:
  """Refuse a workdir that is not a directory, or that holds a run of another config.

  Raises:
    WorkdirError: naming the path, or listing every result-changing field that differs.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} exists and is not a directory")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _result_fields(_flatten(json.load(f)))
  current = _result_fields(_flatten(json.loads(config.to_json())))
  diffs = [f"{k}: saved {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
           for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if diffs and not allow_config_change:
    raise WorkdirError(
        f"{workdir} holds a run with a different config; these fields differ:\n  "
        + "\n  ".join(diffs)
        + "\nUse another --workdir, or pass --allow_config_change to resume anyway.")


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """An exclusive lock on ``workdir/.lock``; a second concurrent run refuses.

  ``flock`` is released by the kernel when the holder dies, so a killed run
  never leaves a stale lock behind.
  """
  os.makedirs(workdir, exist_ok=True)
  handle = open(os.path.join(workdir, ".lock"), "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    raise WorkdirError(f"another run is writing {workdir} (it holds {workdir}/.lock); "
                       "wait for it to finish or use another --workdir") from None
  try:
    yield
  finally:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def atomic_write_json(path: str, obj: Any) -> None:
  """Write ``obj`` as JSON to a temporary file, then rename it over ``path``."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class SigtermFlag:
  """Turns SIGTERM (what a preemption sends) into a flag checked after each step."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
