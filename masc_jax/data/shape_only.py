"""A dataset's shapes and labels without its pixels, for compiling a run without its data.

A run's programs depend on the data only through shapes: the image shape, the
number of classes, and the split sizes and labels, which fix the class groups,
the per-agent index lists and so the batch orders. The pre-flight
(``masc_jax.preflight``) compiles a run's programs from these alone.
"""

from __future__ import annotations

import numpy as np

from masc_jax.data import arrays, registry

# The train and test split sizes of the balanced datasets of the table (every
# class the same share): both CIFARs 50,000 / 10,000, Fashion-MNIST 60,000 /
# 10,000 (6,000 / 1,000 a class).
BALANCED_SPLITS: dict[str, tuple[int, int]] = {
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
    "fashion_mnist": (60_000, 10_000),
}


def shape_only_dataset(
    name: str, data_dir: str | None = None
) -> arrays.ArrayDataset:
  """``name``'s labels as the real splits have them, with all-zero images that take no memory.

  A balanced dataset (``BALANCED_SPLITS``) gets each class's share of every
  split and zero images as broadcast views; the mean / std are the table's.
  Bundled data (``digits``) and any other dataset are loaded for real (from
  ``data_dir`` where it applies): their split sizes come from the data.
  """
  info = registry.DATASETS.get(name)
  if info is None or name not in BALANCED_SPLITS:
    return registry.load_dataset(name, data_dir)
  num_train, num_test = BALANCED_SPLITS[name]
  classes = info.num_classes
  zero = np.zeros((), np.uint8)

  def labels(count: int) -> np.ndarray:
    return np.repeat(np.arange(classes, dtype=np.int32), count // classes)

  return arrays.ArrayDataset(
      name=info.name,
      train_images=np.broadcast_to(zero, (num_train,) + info.image_shape),
      train_labels=labels(num_train),
      test_images=np.broadcast_to(zero, (num_test,) + info.image_shape),
      test_labels=labels(num_test),
      num_classes=classes,
      mean=np.asarray(info.mean, np.float32),
      std=np.asarray(info.std, np.float32),
  )
