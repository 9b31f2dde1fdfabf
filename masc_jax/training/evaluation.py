"""Evaluation: predictions over the test set, then the paper's table rows.

``predict_all`` runs a jit-compiled prediction (``protocol.predict_rows``) over
fixed-shape test batches (the last one padded); ``results_from_predictions``
turns the predictions into the results schema that ``reporting`` renders (see
``reporting.results_markdown``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from masc_jax.data import batches
from masc_jax.method import metrics
from masc_jax.reporting import routing_diagnostics, schema

PyTree = Any


def predict_all(
    predict: Callable[[PyTree, jax.Array], dict[str, jax.Array]],
    variables: PyTree,
    images: jax.Array,
    num_examples: int,
    batch_size: int,
) -> dict[str, np.ndarray]:
  """Run ``predict(variables, images[idx])`` over the whole test set.

  Args:
    predict: jitted ``(variables, images [B, H, W, Ch]) -> {name: int [..., B]}``.
    variables: the models to evaluate.
    images: ``[N, H, W, Ch]`` test images (on device).
    num_examples: N.
    batch_size: fixed eval batch size.

  Returns:
    ``{name: int array [..., N]}`` with the padding removed.
  """
  chunks: dict[str, list[np.ndarray]] = {}
  for idx, valid in batches.eval_batches(num_examples, batch_size):
    out = jax.device_get(predict(variables, images[idx]))
    for name, value in out.items():
      chunks.setdefault(name, []).append(np.asarray(value)[..., :valid])
  return {
      name: np.concatenate(parts, axis=-1) for name, parts in chunks.items()
  }


def results_from_predictions(
    predictions: dict[str, np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    rows: Sequence[str],
    collectives: Sequence[str] = (),
) -> dict[str, Any]:
  """The table rows, group accuracies, society accuracy and directionality.

  Args:
    predictions: output of ``predict_all``: ``[K, N]`` per row, ``[N]`` for
      ``society_<row>`` and for each collective.
    labels: ``[N]`` test labels.
    groups: ``[K, M]`` class ids per agent.
    rows: the per-agent rows to tabulate (``protocol.StageSpec.rows``).
    collectives: the collectives whose accuracy over all classes to report.

  A reference row (``schema.REFERENCE_ROWS``: one network answering for every
  agent) gets its Expert / General / Average per agent group and its accuracy
  over all classes (``society_accuracy``), the same code path as every row,
  but no group-accuracy matrix (K identical lines: its Expert column) and no
  directionality (every agent ties with every other).
  """
  k = groups.shape[0]
  results: dict[str, Any] = {
      "num_agents": k,
      "class_groups": groups.tolist(),
      "rows": {},
      "group_accuracy": {},
      "directionality": {},
      "society_accuracy": {},
      "collective_accuracy": {},
  }
  for row in rows:
    r = metrics.row(predictions[row], labels, groups)
    results["rows"][row] = {
        key: r[key] for key in ("expert", "general", "average")
    }
    if row not in schema.REFERENCE_ROWS:
      results["group_accuracy"][row] = r["group_accuracy"]
      results["directionality"][row] = r["directionality"]
    results["society_accuracy"][row] = metrics.accuracy(
        predictions[f"society_{row}"], labels
    )
  for name in collectives:
    results["collective_accuracy"][name] = metrics.accuracy(
        predictions[name], labels
    )
  diagnosed = {
      row: {
          key.rsplit("/", 1)[1]: value
          for key, value in predictions.items()
          if key.startswith(f"routing/{row}/")
      }
      for row in rows
  }
  diagnosed = {row: outputs for row, outputs in diagnosed.items() if outputs}
  if diagnosed:
    # Why a grown row's General is what it is: who answered, and how confident each was.
    results["routing_diagnostics"] = {
        row: routing_diagnostics.diagnose(
            labels=labels, groups=groups, **outputs
        )
        for row, outputs in diagnosed.items()
    }
  return results


def merge_results(per_stage: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One run's results from several stages' ``results_from_predictions`` (their rows are disjoint)."""
  merged: dict[str, Any] = {}
  for results in per_stage:
    for key, value in results.items():
      if isinstance(value, dict):
        merged.setdefault(key, {}).update(value)
      else:
        merged[key] = value
  return merged


def summary(
    results: dict[str, Any], rows: Sequence[str], collective: str | None
) -> dict[str, float]:
  """A stage's few headline numbers from one member's results of its evaluation.

  The collective's accuracy for a stage that trains one; otherwise the mean
  Expert and General over the agents of its (first) row and the society's
  accuracy on that row.
  """
  if collective:
    return {"collective_acc": float(results["collective_accuracy"][collective])}
  row = results["rows"][rows[0]]
  return {
      "expert": float(np.mean(row["expert"])),
      "general": float(np.mean(row["general"])),
      "society": float(results["society_accuracy"].get(rows[0], float("nan"))),
  }


def epoch_evaluation_steps(
    steps_per_epoch: int, epochs: int, every_epochs: int
) -> dict[int, int]:
  """``{stage step: epoch}`` after which a stage is evaluated before its end.

  Every ``every_epochs`` epochs (0: none); the last epoch is left to the
  stage's own evaluation at its end.
  """
  if every_epochs <= 0:
    return {}
  return {
      epoch * steps_per_epoch: epoch
      for epoch in range(every_epochs, epochs, every_epochs)
  }
