"""Fault injection at named points of a run, for the tests of the run guarantees.

Off unless the environment variable ``MASC_FAULT`` is set, so a normal run
pays one dictionary lookup per point. ``MASC_FAULT=SIGNAL:POINT:STAGE[:N]``
sends ``SIGKILL`` (``KILL``) or ``SIGTERM`` (``TERM``) to this process the
N-th time (default 1) ``POINT`` is reached in stage ``STAGE`` (``*``: any):

  ``compiled``     a stage's step is compiled, before its first step runs
  ``step``         a step has run (N counts steps of that stage from 1)
  ``evaluated``    a stage's evaluation has its predictions, before its results
  ``stage_saved``  the checkpoint at a stage boundary was started
  ``finished``     the last checkpoint is on disk, the reports not yet written
  ``commit``       inside a checkpoint save: every file written, the final
                   rename not yet done (Orbax's background thread), so a KILL
                   here lands *during* the save, deterministically

Signals go through ``os.kill``, as a preemption or the OOM killer would send
them, so the code under test handles them exactly as in production.
"""

from __future__ import annotations

import os
import signal

_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
POINTS = ("compiled", "step", "evaluated", "stage_saved", "finished", "commit")
_seen: dict[tuple[str, str], int] = {}
_stage = [
    "*"
]  # the stage in progress, for points reached outside the loop (commit)


def _parse(spec: str) -> tuple[int, str, str, int]:
  parts = spec.split(":")
  if (
      len(parts) not in (3, 4)
      or parts[0] not in _SIGNALS
      or parts[1] not in POINTS
  ):
    raise ValueError(
        f"MASC_FAULT={spec!r}: expected SIGNAL:POINT:STAGE[:N] with SIGNAL in "
        f"{sorted(_SIGNALS)} and POINT in {POINTS}"
    )
  return (
      _SIGNALS[parts[0]],
      parts[1],
      parts[2],
      int(parts[3]) if len(parts) == 4 else 1,
  )


def reach(point: str, stage: str | None = None) -> None:
  """Mark ``point`` reached (in ``stage``, default the stage in progress); fire if it is the one."""
  spec = os.environ.get("MASC_FAULT")
  if not spec:
    return
  stage = stage or _stage[0]
  if point == "compiled":
    _stage[0] = stage
  sig, want_point, want_stage, nth = _parse(spec)
  if point != want_point or want_stage not in ("*", stage):
    return
  count = _seen.get((point, stage), 0) + 1
  _seen[(point, stage)] = count
  if count == nth:
    os.kill(os.getpid(), sig)


def install_commit_hook() -> None:
  """Make Orbax's final rename of a checkpoint reach the ``commit`` point first."""
  if not os.environ.get("MASC_FAULT", "").split(":")[1:2] == ["commit"]:
    return
  from orbax.checkpoint._src.path import atomicity  # private: only for this test hook

  original = atomicity.AtomicRenameTemporaryPath.finalize
  if getattr(original, "_masc_fault", False):
    return

  async def finalize(self, *args, **kwargs):
    reach("commit")
    return await original(self, *args, **kwargs)

  finalize._masc_fault = True
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
