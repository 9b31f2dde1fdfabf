"""One stage's per-step metrics: when to log them, the NaN check, the progress line."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

from masc_jax.training import population
from masc_jax.reporting import progress


class NonFiniteLossError(RuntimeError):
  """A loss term or the parameters became NaN/Inf."""


class StepLog:
  """One stage's per-step metrics: when to log them, the NaN check, the progress line.

  Metrics stay on device until a log or checkpoint point, so the host does not
  wait for every step.
  """

  def __init__(
      self,
      stage: str,
      total: int,
      images_per_step: int,
      every: int,
      global_offset: int,
      log: Callable[[str], None],
      metrics_log: progress.MetricsLogger,
      members: population.MemberAxis,
      on_logged: Callable[[int, dict, float], None] | None = None,
  ):
    """``on_logged(global_step, terms, images_per_s)``: each logged step's
    terms, ``[P]`` each (every member's mean over its agents)."""
    self.stage, self.total, self.every, self.members = (
        stage,
        total,
        every,
        members,
    )
    self.images_per_step, self.global_offset = images_per_step, global_offset
    self.log, self.metrics_log = log, metrics_log
    self.on_logged = on_logged
    self.pending: list[tuple[int, dict]] = []
    self.t_log, self.steps_since_log = time.perf_counter(), 0

  def add(
      self,
      step: int,
      metrics: dict[str, jax.Array] | list[dict[str, jax.Array]],
  ) -> None:
    """A step's metrics: a dict of ``[P]`` values, or P members' dicts (members in turn)."""
    self.pending.append((step, metrics))
    self.steps_since_log += 1

  def is_due(self, done: int) -> bool:
    return done % self.every == 0 or done == self.total

  def flush(self, done: int) -> None:
    """Fetch the pending metrics, stop on a non-finite term, log the newest."""
    if not self.pending:
      return
    # One dict of [P] arrays per step (members in turn give P dicts, or steps still
    # running on the members' threads).
    stacked = [(s, population.stack_member_metrics(m)) for s, m in self.pending]
    fetched, self.pending = jax.device_get(stacked), []
    stage = self.stage
    for s, m in fetched:
      for term, value in m.items():
        if not np.all(np.isfinite(value)):
          # Name the member(s) by seed and swept settings: the others are fine.
          bad = self.members.nonfinite_members(np.isfinite(value))
          whose = f" of member {'; '.join(m.describe() for m in bad)}"
          raise NonFiniteLossError(
              f"non-finite loss term '{term}'{whose} in stage {stage} at step {s} "
              f"(global step {self.global_offset + s}); stopping. The last good checkpoint is "
              "kept; lower the learning rate or set --config.optim.grad_clip_norm"
          )
    # The mean over members (a single run's one value).
    terms = {t: float(np.mean(v)) for t, v in fetched[-1][1].items()}
    now = time.perf_counter()
    elapsed = max(now - self.t_log, 1e-9)
    rate = self.steps_since_log * self.images_per_step / elapsed
    remaining = (self.total - done) * elapsed / max(self.steps_since_log, 1)
    self.t_log, self.steps_since_log = now, 0
    self.log(
        progress.progress_line(stage, done, self.total, rate, remaining, terms)
    )
    self.metrics_log.write(
        {
            "stage": stage,
            "step": done,
            "global_step": self.global_offset + done,
            "images_per_s": rate,
            **terms,
        }
    )
    if self.on_logged is not None:
      member_terms = {
          # A term's mean over its agents, for each member ([P, ...] -> [P]).
          t: np.asarray(v, np.float64).reshape(len(v), -1).mean(axis=1)
          for t, v in fetched[-1][1].items()
      }
      self.on_logged(self.global_offset + done, member_terms, rate)
