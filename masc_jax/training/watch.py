"""Watching a run while it trains: TensorBoard curves, evaluations during a stage, a profile.

``RunWatch`` is what the training loop calls besides its console lines and
``metrics.jsonl``:

* ``training_point``: a logged step's loss terms (per member), learning rate
  and images/s, to TensorBoard (tags ``<stage>/<term>``);
* ``evaluation_steps`` and ``evaluated``: when to evaluate a stage before its
  end (``config.eval_every_epochs``), and each evaluation's summary numbers
  per member (tags ``<stage>/eval/<figure>``);
* ``profiler``: the ``jax.profiler`` trace of ``config.profile_steps``;
* ``flush``: before each checkpoint, so a killed run has every point up to its
  last checkpoint, and its resumed run (``start``) continues the curves from
  there without a point twice.

Every point is at the run's global step (stages one after another). Only
process 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from masc_jax import config_lib, paths
from masc_jax.reporting import tensorboard_log
from masc_jax.training import evaluation, profiling

TENSORBOARD_DIR = "tensorboard"


class RunWatch:
  """TensorBoard curves, the mid-stage evaluation schedule and the profiler of one run.

  Args:
    config: the run's config (``tensorboard``, ``eval_every_epochs``,
      ``profile_steps``, ``optim.learning_rate``).
    members: the run's members (``config_lib.Member``), in member order.
    workdir: the run's workdir.
    enabled: this process writes (process 0).
    log: the run's console log.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      members: Sequence[config_lib.Member],
      workdir: str,
      enabled: bool = True,
      log: Callable[[str], None] = print,
  ):
    self.config, self.workdir = config, workdir
    self.enabled = enabled and config.tensorboard
    self.runs = [
        tensorboard_log.run_name(m.seed, dict(m.settings)) for m in members
    ]
    # Constant over a stage (the optimiser has no schedule); a swept one per member.
    self.learning_rates = np.asarray(
        [
            dict(m.settings).get(
                "optim.learning_rate", config.optim.learning_rate
            )
            for m in members
        ],
        np.float64,
    )
    self.profiler = profiling.StepProfiler(
        config_lib.parse_profile_steps(config.profile_steps),
        workdir,
        log=log,
        enabled=enabled,
    )
    self.tensorboard = tensorboard_log.TensorBoardLog(
        self.directory, self.runs, enabled=False
    )

  @property
  def directory(self) -> str:
    return paths.join(self.workdir, TENSORBOARD_DIR)

  def start(self, first_step: int) -> None:
    """Open the event files; the run's next point is after global step ``first_step``.

    Points earlier files hold after ``first_step`` (written after the
    checkpoint this run resumes from) are dropped by TensorBoard.
    """
    self.tensorboard.close()
    self.tensorboard = tensorboard_log.TensorBoardLog(
        self.directory,
        self.runs,
        enabled=self.enabled,
        purge_from=first_step + 1,
    )

  def training_point(
      self,
      stage: str,
      global_step: int,
      terms: Mapping[str, Any],
      images_per_s: float,
  ) -> None:
    """A logged step: each term (a number, or ``[P]`` per member), the learning rate, images/s."""
    values = {f"{stage}/{term}": value for term, value in terms.items()}
    values[f"{stage}/learning_rate"] = self.learning_rates
    values[f"{stage}/images_per_s"] = images_per_s
    self.tensorboard.write(global_step, values)

  def evaluation_steps(
      self, steps_per_epoch: int, epochs: int
  ) -> dict[int, int]:
    """``{stage step: epoch}`` of the evaluations before a stage's end."""
    return evaluation.epoch_evaluation_steps(
        steps_per_epoch, epochs, self.config.eval_every_epochs
    )

  def evaluated(
      self,
      stage: str,
      global_step: int,
      member_summaries: Sequence[Mapping[str, float]],
  ) -> None:
    """An evaluation's summary numbers (``evaluation.summary``), one dict per member."""
    figures = member_summaries[0].keys()
    self.tensorboard.write(
        global_step,
        {
            f"{stage}/eval/{figure}": [s[figure] for s in member_summaries]
            for figure in figures
        },
    )
    self.tensorboard.flush()

  def flush(self) -> None:
    self.tensorboard.flush()

  def close(self) -> None:
    try:
      self.profiler.close()
    finally:
      self.tensorboard.close()
