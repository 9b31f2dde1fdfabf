"""The training loop's seam for observers: named points of a run, and each stage's step.

``train.Run`` calls its ``RunHooks`` at fixed points; the default does nothing.
An observer subclasses it: ``masc_jax.training.faults`` injects faults there
(kills, preemptions, NaNs) for the tests of the run guarantees, so the loop
itself holds no test code. The points, in the order a stage reaches them:

  ``compiled``     the stage's step is compiled, before its first step runs
  ``step``         a step has run (its output not yet logged or checkpointed)
  ``evaluated``    the stage's evaluation has its predictions, before its results
  ``stage_saved``  the checkpoint at the stage's end was started
  ``finished``     the last checkpoint is on disk, the reports not yet written

``wrap_step`` sees each stage's compiled step once, right after ``compiled``,
and may return another with the same interface (``step_members``, ``stack``,
``unstack``, ``ready``; ``population.MembersInTurn``), e.g. one that changes a
step's output state.
"""

from __future__ import annotations

from typing import Any

POINTS = ("compiled", "step", "evaluated", "stage_saved", "finished")


class RunHooks:
  """Observes a run; every method does nothing."""

  def reached(self, point: str, stage: str) -> None:
    """The run reached ``point`` (one of ``POINTS``) in stage ``stage``."""
    del point, stage

  def wrap_step(self, stage: str, step: Any) -> Any:
    """Stage ``stage``'s compiled step, or one that wraps it (the loop runs what this returns)."""
    del stage
    return step
