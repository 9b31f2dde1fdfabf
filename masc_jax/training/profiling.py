"""A ``jax.profiler`` trace of a few training steps, on request (``config.profile_steps``).

``StepProfiler((start, count), workdir)`` traces ``count`` steps beginning with
the ``start``-th step (from 0) the run trains, all within the first stage it
trains (a resumed run: the stage it resumes), and writes the trace to
``<workdir>/profile/plugins/profile/<time>/``, where TensorBoard's profile
plugin finds it (``tensorboard --logdir <workdir>``; the plugin is the
``tensorboard-plugin-profile`` package). The ``*.trace.json.gz`` file also
opens in Perfetto.

The profiler writes to a local temporary folder and the files are then copied
through ``masc_jax.paths`` like every other file of the run: the profiler's own
export to ``gs://`` goes through jaxlib's GCS client, not epath, and a failed
export leaves the profiler unable to start again in the process. A profile
that fails is reported in one line and never stops the run. Only process 0
profiles (its own devices).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from masc_jax import paths


class StepProfiler:
  """Starts and stops one trace around steps of the first stage a run trains.

  Call ``before_step(stage, global_step)`` and ``after_step(wait)`` around each
  step (``wait()`` blocks until the step's outputs are computed) and
  ``stage_end()`` when a stage ends; ``close()`` when the run ends (a trace
  still open is then stopped and written).
  """

  def __init__(
      self,
      window: tuple[int, int] | None,
      workdir: str,
      log: Callable[[str], None] = print,
      enabled: bool = True,
  ):
    self.window = window if enabled else None
    self.target = paths.join(workdir, "profile")
    self.log = log
    self._stage: str | None = None  # the first stage this run trains
    self._steps_seen = 0
    self._tmp: str | None = None
    self._annotation: Any = None
    self._traced = 0
    self._done = self.window is None

  @property
  def tracing(self) -> bool:
    return self._tmp is not None

  def before_step(self, stage: str, global_step: int) -> None:
    if self._done:
      return
    if self._stage is None:
      self._stage = stage
    start, _ = self.window
    if not self.tracing and self._steps_seen == start:
      self._start()
    if self.tracing:
      self._annotation = jax.profiler.StepTraceAnnotation(
          "train", step_num=global_step
      )
      self._annotation.__enter__()

  def after_step(self, wait: Callable[[], Any]) -> None:
    if self._done:
      return
    self._steps_seen += 1
    if not self.tracing:
      return
    self._annotation.__exit__(None, None, None)
    self._annotation = None
    self._traced += 1
    if self._traced == self.window[1]:
      wait()  # the traced steps run asynchronously: let them finish first
      self._stop()

  def stage_end(self, wait: Callable[[], Any] = lambda: None) -> None:
    """The first stage ended: stop a trace still open; no trace starts later."""
    if self._done or self._stage is None:
      return
    if self.tracing:
      wait()
      self._stop()
    else:
      self.log(
          f"profile_steps={self.window[0]}:{self.window[1]}: the {self._stage} "
          f"stage ended after {self._steps_seen} steps of this run; no profile"
      )
    self._done = True

  def close(self) -> None:
    if self.tracing:
      self._stop()
    self._done = True

  def _start(self) -> None:
    self._tmp = tempfile.mkdtemp(prefix="masc_profile_")
    try:
      jax.profiler.start_trace(self._tmp)
    except Exception as e:  # noqa: BLE001 - a profile never stops the run
      self._fail(e)

  def _stop(self) -> None:
    tmp, self._tmp = self._tmp, None
    self._done = True
    try:
      jax.profiler.stop_trace()
      copied = _copy_tree(tmp, self.target)
    except Exception as e:  # noqa: BLE001 - a profile never stops the run
      self._fail(e)
    else:
      self.log(
          f"profile of {self._traced} {self._stage} steps: "
          f"{len(copied)} files in {self.target} "
          f"(tensorboard --logdir {self.target}, Profile tab)"
      )
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  def _fail(self, error: Exception) -> None:
    if self._tmp is not None:
      shutil.rmtree(self._tmp, ignore_errors=True)
    self._tmp, self._done = None, True
    message = " ".join(str(error).split())[:300]
    self.log(f"no profile: {type(error).__name__}: {message}")


def _copy_tree(source: str, target: str) -> list[str]:
  """Every file under ``source``, copied to the same place under ``target``."""
  copied = []
  for folder, _, names in os.walk(source):
    relative = os.path.relpath(folder, source)
    for name in names:
      with open(os.path.join(folder, name), "rb") as f:
        data = f.read()
      destination = paths.join(
          target, *([] if relative == "." else relative.split(os.sep)), name
      )
      paths.write_atomic(destination, data)
      copied.append(destination)
  return copied
