"""Evaluation: predictions over the test set, then the paper's table rows.

``evaluate`` runs a jit-compiled ``stages.predict_step`` over fixed-shape test
batches (the last one padded) and turns the predictions into the results
schema that ``reporting`` renders (see ``reporting.results_markdown``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from masc_jax import data, metrics

PyTree = Any

# Rows whose predictions are per agent [K, N], and the society prediction of each.
AGENT_ROWS = ("before_growth", "after_growth", "ra_only")


def predict_all(predict: Callable[[PyTree, jax.Array], dict[str, jax.Array]],
                variables: PyTree, images: jax.Array, num_examples: int,
                batch_size: int) -> dict[str, np.ndarray]:
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
  for idx, valid in data.eval_batches(num_examples, batch_size):
    out = jax.device_get(predict(variables, images[idx]))
    for name, value in out.items():
      chunks.setdefault(name, []).append(np.asarray(value)[..., :valid])
  return {name: np.concatenate(parts, axis=-1) for name, parts in chunks.items()}


def results_from_predictions(predictions: dict[str, np.ndarray], labels: np.ndarray,
                             groups: np.ndarray) -> dict[str, Any]:
  """The table rows, group accuracies, society accuracy and directionality.

  Args:
    predictions: output of ``predict_all``.
    labels: ``[N]`` test labels.
    groups: ``[K, M]`` class ids per agent.
  """
  k = groups.shape[0]
  results: dict[str, Any] = {"num_agents": k, "class_groups": groups.tolist(), "rows": {},
                             "group_accuracy": {}, "directionality": {},
                             "society_accuracy": {}, "collective_accuracy": {}}
  per_agent = {row: predictions[row] for row in AGENT_ROWS if row in predictions}
  if "cc" in predictions:
    # CC only: every agent answers with the collective S (trained with the CC terms).
    per_agent["cc_only"] = np.broadcast_to(predictions["cc"], (k,) + predictions["cc"].shape)
  for row, preds in per_agent.items():
    r = metrics.row(preds, labels, groups)
    results["rows"][row] = {key: r[key] for key in ("expert", "general", "average")}
    results["group_accuracy"][row] = r["group_accuracy"]
    results["directionality"][row] = r["directionality"]
  for row in AGENT_ROWS:
    if f"society_{row}" in predictions:
      results["society_accuracy"][row] = metrics.accuracy(predictions[f"society_{row}"], labels)
  if "cc" in predictions:
    results["society_accuracy"]["cc_only"] = metrics.accuracy(predictions["cc"], labels)
  for name in ("cc", "ce"):
    if name in predictions:
      results["collective_accuracy"][name] = metrics.accuracy(predictions[name], labels)
  return results
