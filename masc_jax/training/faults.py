"""Fault injection at named points of a run, for the tests of the run guarantees.

``from_environment()`` reads ``MASC_FAULT`` and returns a ``FaultInjector``
(``hooks.RunHooks``) that the entry point (``masc_jax.main``) hands to the run,
or None when the variable is unset: a normal run has no fault code in its
loop. ``MASC_FAULT=ACTION:POINT:STAGE[:N]`` acts the N-th time (default 1)
``POINT`` is reached in stage ``STAGE`` (``*``: any):

  ``KILL``, ``TERM``, ``INT``  send ``SIGKILL``, ``SIGTERM`` or ``SIGINT`` (what
                      Ctrl-C sends) to this process at POINT, one of
                      ``hooks.POINTS`` or ``commit``;
  ``NAN``             (POINT ``step`` only) replace the output of the stage's
                      N-th step by parameters that are all NaN, as a diverged
                      step would leave them: the next step's loss is NaN.

``commit`` is reached inside a checkpoint save: every file written, the final
rename not yet done (Orbax's background thread), so a KILL there lands
*during* the save, deterministically. N counts from 1 in each process; for
``step``, the steps of that stage this process ran.

Signals go through ``os.kill``, as a preemption or the OOM killer would send
them, so the code under test handles them exactly as in production.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import jax.numpy as jnp

from masc_jax.training import hooks

_SIGNALS = {
    "KILL": signal.SIGKILL,
    "TERM": signal.SIGTERM,
    "INT": signal.SIGINT,
}
NAN = "NAN"
ACTIONS = (*_SIGNALS, NAN)
POINTS = (*hooks.POINTS, "commit")


def parse(spec: str) -> tuple[str, str, str, int]:
  """``ACTION:POINT:STAGE[:N]`` -> (action, point, stage, N); ValueError when malformed."""
  parts = spec.split(":")
  ok = (
      len(parts) in (3, 4)
      and parts[0] in ACTIONS
      and parts[1] in POINTS
      and (parts[0] != NAN or parts[1] == "step")
      and (len(parts) == 3 or (parts[3].isdigit() and int(parts[3]) >= 1))
  )
  if not ok:
    raise ValueError(
        f"MASC_FAULT={spec!r}: expected ACTION:POINT:STAGE[:N] with ACTION in "
        f"{ACTIONS}, POINT in {POINTS} (NAN: step only) and N >= 1"
    )
  return parts[0], parts[1], parts[2], int(parts[3]) if len(parts) == 4 else 1


class FaultInjector(hooks.RunHooks):
  """Acts once, at the point ``spec`` (``MASC_FAULT``'s syntax) names."""

  def __init__(self, spec: str):
    self.action, self.point, self.stage, self.nth = parse(spec)
    self._seen: dict[tuple[str, str], int] = {}
    self._current_stage = "*"  # for points reached outside the loop (commit)
    if self.point == "commit":
      _install_commit_hook(self)

  def _matches(self, point: str, stage: str) -> bool:
    """Whether this reach of ``point`` is the N-th of the one named (counts it)."""
    if point != self.point or self.stage not in ("*", stage):
      return False
    count = self._seen.get((point, stage), 0) + 1
    self._seen[(point, stage)] = count
    return count == self.nth

  def reached(self, point: str, stage: str | None = None) -> None:
    stage = stage or self._current_stage
    if point == "compiled":
      self._current_stage = stage
    if self.action in _SIGNALS and self._matches(point, stage):
      os.kill(os.getpid(), _SIGNALS[self.action])

  def wrap_step(self, stage: str, step: Any) -> Any:
    if self.action != NAN or self.stage not in ("*", stage):
      return step
    return _PoisonedAfter(step, lambda: self._matches("step", stage))


class _PoisonedAfter:
  """A stage step whose output parameters become NaN at the step ``due()`` says."""

  def __init__(self, step: Any, due):
    self._step, self._due = step, due

  def step_members(self, member_states, batch, rng, frozen):
    member_states, metrics = self._step.step_members(
        member_states, batch, rng, frozen
    )
    if self._due():
      whole = self._step.stack(member_states)
      poisoned = whole.replace(
          params=jax.tree.map(lambda p: p * jnp.nan, whole.params)
      )
      member_states = self._step.unstack(poisoned)
    return member_states, metrics

  def __getattr__(self, name):  # stack, unstack, ready: the step's own
    return getattr(self._step, name)


def from_environment() -> FaultInjector | None:
  """The injector ``MASC_FAULT`` asks for, or None; ValueError for a malformed value."""
  spec = os.environ.get("MASC_FAULT")
  return FaultInjector(spec) if spec else None


_commit_observer: list[FaultInjector] = []


def _install_commit_hook(injector: FaultInjector) -> None:
  """Make Orbax's final rename of a checkpoint reach ``injector``'s ``commit`` point first."""
  _commit_observer[:] = [injector]
  from orbax.checkpoint._src.path import atomicity  # private: only for this test hook

  original = atomicity.AtomicRenameTemporaryPath.finalize
  if getattr(original, "_masc_fault", False):
    return

  async def finalize(self, *args, **kwargs):
    for observer in _commit_observer:
      observer.reached("commit")
    return await original(self, *args, **kwargs)

  finalize._masc_fault = True
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
