"""TensorBoard event files of a run: its curves, one TensorBoard run per member.

:class:`TensorBoardLog` writes scalars to ``<directory>/<run>/events.out.tfevents.*``
through tensorboardX, one run (folder) per member of a population (named by
:func:`run_name`), so TensorBoard overlays the members' curves in one chart.

* Every file goes through ``masc_jax.paths``' library, etils.epath: local
  folders directly, ``gs://`` and ``s3://`` through tensorboardX's writer-factory
  hook, which this module points at epath (objects cannot be appended: the whole
  file is kept in memory and uploaded again at most every ``upload_every_s``
  seconds, and at every :meth:`~TensorBoardLog.flush`).
* :meth:`~TensorBoardLog.flush` is a barrier: everything written before it is on
  disk (or uploaded) when it returns. The run calls it before each checkpoint,
  so a run killed after a checkpoint has every point up to that checkpoint.
  (tensorboardX's ``SummaryWriter`` queues events to a background thread whose
  ``flush`` does not wait for the queue: measured, 8 of 2,000 points written
  before a ``flush`` were missing after an exit. This class writes through
  tensorboardX's synchronous ``EventsWriter``, the file writer that thread
  calls, instead.)
* A resumed run passes ``purge_from``, the first step it writes again: each new
  file starts with a ``SessionLog START`` event at that step, which tells
  TensorBoard to drop the earlier files' points at that step and after (the
  points the killed run wrote after its last checkpoint). File names carry the
  creation time in nanoseconds and the pid, so two writers started in the same
  second never clash (tensorboardX names files by the second and host, and opens
  them ``"wb"``: a second writer would truncate the first's file), and readers
  see the files in the order they were written, which the purge needs.

numpy and paths only: no jax, no training code.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from masc_jax import paths

__all__ = ["TensorBoardLog", "run_name"]


def run_name(seed: int, settings: Mapping[str, float] | None = None) -> str:
  """A member's TensorBoard run: ``seed_0``, ``seed_0_optim.learning_rate=0.01``."""
  name = f"seed_{int(seed)}" + "".join(
      f"_{field}={float(value):g}" for field, value in (settings or {}).items()
  )
  # One path component, in characters every filesystem and object store keeps.
  return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)


class _ObjectFile:
  """tensorboardX's file interface over one object (``gs://``, ``s3://``) through epath.

  Objects cannot be appended: the bytes are kept and the whole object is
  written again on ``flush`` (only if something was written since).
  """

  def __init__(self, path: str):
    self._path, self._data, self._dirty = path, io.BytesIO(), False

  def write(self, data: bytes) -> None:
    self._data.write(data)
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      paths.write_atomic(self._path, self._data.getvalue())
      self._dirty = False

  def close(self) -> None:
    self.flush()


class _ObjectFiles:
  """The writer factory tensorboardX's ``record_writer`` asks for a URL's files."""

  def open(self, path: str) -> _ObjectFile:
    return _ObjectFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no folders to create


def _route_object_stores_through_epath() -> None:
  from tensorboardX import record_writer

  for scheme in paths.REMOTE_SCHEMES:
    if not isinstance(
        record_writer.REGISTERED_FACTORIES.get(scheme), _ObjectFiles
    ):
      record_writer.register_writer_factory(scheme, _ObjectFiles())


class TensorBoardLog:
  """Scalars of ``runs`` (one TensorBoard run each) in ``directory``.

  ``enabled=False`` (processes other than 0 of a multi-process run): nothing is
  imported, opened or written. Usable as a context manager.

  Args:
    directory: the folder holding the runs (``<workdir>/tensorboard``); local or a URL.
    runs: the runs' names (``run_name``), in member order.
    enabled: write at all.
    purge_from: a resumed run's first step: points of earlier files at this
      step and later are dropped by TensorBoard.
    upload_every_s: object stores: upload at most this often (and on ``flush``).
  """

  def __init__(
      self,
      directory: str,
      runs: Sequence[str],
      enabled: bool = True,
      purge_from: int | None = None,
      upload_every_s: float = 30.0,
  ):
    self.directory, self.runs = directory, tuple(runs)
    self.enabled = bool(enabled)
    self._remote = not paths.is_local(directory)
    self._upload_every_s, self._flushed_at = upload_every_s, time.monotonic()
    self._writers: list[Any] = []
    self._closed = False
    if not self.enabled:
      return
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2

    self._event_pb2 = event_pb2
    _route_object_stores_through_epath()
    suffix = f".{time.time_ns()}.{os.getpid()}"
    for run in self.runs:
      folder = paths.join(directory, run)
      paths.makedirs(folder)
      writer = EventsWriter(paths.join(folder, "events"), suffix)
      if purge_from is not None:
        writer.write_event(
            event_pb2.Event(
                wall_time=time.time(),
                step=int(purge_from),
                session_log=event_pb2.SessionLog(
                    status=event_pb2.SessionLog.START
                ),
            )
        )
      self._writers.append(writer)
    self.flush()

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    """Scalars at ``step``: ``tag -> value`` (every run) or ``[P]`` values (one per run).

    Non-finite values are written as they are (TensorBoard shows them as such).
    """
    if not self.enabled:
      return
    if self._closed:
      raise ValueError(f"TensorBoardLog({self.directory!r}) is closed")
    from tensorboardX import summary

    per_run = [[] for _ in self.runs]
    for tag, value in values.items():
      array = np.asarray(value, np.float64).reshape(-1)
      if array.size not in (1, len(self.runs)):
        raise ValueError(
            f"{tag}: {array.size} values for {len(self.runs)} TensorBoard runs"
        )
      for index in range(len(self.runs)):
        per_run[index].append(
            summary.scalar(tag, float(array[index if array.size > 1 else 0]))
        )
    now = time.time()
    for writer, summaries in zip(self._writers, per_run):
      for one in summaries:
        writer.write_event(
            self._event_pb2.Event(wall_time=now, step=int(step), summary=one)
        )
    # Local files: visible to TensorBoard at once. Objects: uploaded now and then.
    if (
        not self._remote
        or time.monotonic() - self._flushed_at >= self._upload_every_s
    ):
      self.flush()

  def flush(self) -> None:
    """Everything written so far on disk (or uploaded) when this returns."""
    for writer in self._writers:
      writer.flush()
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    if self._closed:
      return
    for writer in self._writers:
      writer.close()
    self._writers, self._closed = [], True

  def __enter__(self) -> "TensorBoardLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
