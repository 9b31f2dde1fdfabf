"""The paper's metrics, from predictions and the class groups (NumPy, host side).

- Expert_k: accuracy of agent k on the test images of its own classes.
- General_k: accuracy of agent k on the test images of all other agents' classes.
- Average_k = (Expert_k + General_k) / 2.
- group accuracy ``[K agents, K groups]``: agent a's accuracy on group g's images.
- directionality: for every group g, the owner agent g is (one of) the most
  accurate agents on g.
- society accuracy: accuracy over all classes of one society-wide prediction.
"""

from __future__ import annotations

import numpy as np


def _check(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  groups = np.asarray(groups)
  if groups.ndim != 2:
    raise ValueError(f"groups must be [K, M], got shape {groups.shape}")
  if predictions.ndim != 2 or predictions.shape[0] != groups.shape[0]:
    raise ValueError(
        f"predictions must be [K={groups.shape[0]}, N], got shape {predictions.shape}"
    )
  if labels.shape != predictions.shape[1:]:
    raise ValueError(
        f"labels must be [N={predictions.shape[1]}], got shape {labels.shape}"
    )
  num_classes = groups.size
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"labels must lie in [0, {num_classes}), got range "
        f"[{labels.min()}, {labels.max()}]"
    )
  return predictions, labels, groups


def label_group(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
  """``[N]`` index of the group (owner agent) of each label."""
  owner = np.empty(np.asarray(groups).size, np.int64)
  for k, group in enumerate(np.asarray(groups)):
    owner[group] = k
  return owner[np.asarray(labels)]


def group_accuracy(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> np.ndarray:
  """``[K agents, K groups]`` accuracy of each agent on each group's test images.

  Args:
    predictions: ``[K, N]`` predicted class of each agent for each test image.
    labels: ``[N]`` true classes.
    groups: ``[K, M]`` class ids of each agent.
  """
  predictions, labels, groups = _check(predictions, labels, groups)
  owner = label_group(labels, groups)
  correct = predictions == labels[None, :]
  k = groups.shape[0]
  out = np.full((k, k), np.nan)
  for g in range(k):
    mask = owner == g
    if mask.any():
      out[:, g] = correct[:, mask].mean(axis=1)
  return out


def expert_general(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> dict[str, list[float]]:
  """Per-agent Expert / General / Average accuracy.

  Returns:
    ``{"expert": [K], "general": [K], "average": [K]}`` as Python floats.
  """
  predictions, labels, groups = _check(predictions, labels, groups)
  owner = label_group(labels, groups)
  correct = predictions == labels[None, :]
  expert, general = [], []
  for k in range(groups.shape[0]):
    own = owner == k
    expert.append(float(correct[k, own].mean()) if own.any() else float("nan"))
    general.append(
        float(correct[k, ~own].mean()) if (~own).any() else float("nan")
    )
  average = [(e + g) / 2 for e, g in zip(expert, general)]
  return {"expert": expert, "general": general, "average": average}


def directionality(group_acc: np.ndarray) -> bool:
  """True if for every group g, agent g's accuracy on g is the highest (ties allowed).

  Groups without test images (NaN columns) say nothing and are skipped.
  """
  group_acc = np.asarray(group_acc, dtype=float)
  if group_acc.ndim != 2 or group_acc.shape[0] != group_acc.shape[1]:
    raise ValueError(
        f"group accuracy must be [K, K], got shape {group_acc.shape}"
    )
  present = ~np.all(np.isnan(group_acc), axis=0)
  acc = group_acc[:, present]
  return bool(np.all(np.diag(group_acc)[present] >= acc.max(axis=0)))


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Plain accuracy of ``[N]`` predictions."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(
        f"predictions {predictions.shape} and labels {labels.shape} differ in shape"
    )
  return float(np.mean(predictions == labels))


def row(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> dict:
  """One table row: per-agent E/G/A, the group-accuracy matrix and directionality."""
  table = expert_general(predictions, labels, groups)
  acc = group_accuracy(predictions, labels, groups)
  return {
      **table,
      "group_accuracy": acc.tolist(),
      "directionality": directionality(acc),
  }
