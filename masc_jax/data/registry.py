"""Datasets for MASC: the dataset table and loading whole datasets into host memory.

This module owns what a dataset *is*: `DATASETS`, one `DatasetInfo` per
dataset name (number of classes, image shape, normalisation statistics,
source), and `load_dataset` / `check_dataset_available`, which return an
`ArrayDataset` of uint8 images and int32 labels checked against that table.
How the classes are split among agents and in which order samples are visited
lives in `masc_jax.data.batches`.

Datasets:
  * `digits`   scikit-learn's bundled 8x8 digits (offline stand-in, 10 classes).
  * `cifar10`, `cifar100`  read from a TFDS data directory prepared as
    array_record, via `tfds.data_source` (random access, no TensorFlow):
    `masc_jax.data.tfds_source`.
  * `fashion_mnist`  IDX files (a folder, or the Debian package's) or a
    prepared TFDS copy, padded to 32x32: `masc_jax.data.fashion_mnist`.
  * `tfds:NAME`  any prepared TFDS image-classification dataset. Its entry is
    made from the prepared files' own description the first time
    `dataset_info` is asked for it (`tfds_source.describe`); mean / std are
    computed from its train split on load and cached beside the data.

Importing this module imports only NumPy: scikit-learn and
tensorflow_datasets are imported when a dataset is loaded, so configuration
code can read `DATASETS` cheaply.
"""

from __future__ import annotations

import os
import numpy as np

from masc_jax.data.arrays import ArrayDataset, DatasetInfo, check_split

# The one table of datasets. cifar100: the 100 fine labels of the `label`
# feature, not `coarse_label`. The CIFAR mean / std are the standard
# per-channel statistics of the train sets (pixel / 255): fixed constants
# rather than recomputed, so normalisation is identical to the usual CIFAR
# recipes and does not depend on how much of the data is loaded.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="cifar100",
            num_classes=100,
            image_shape=(32, 32, 3),
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            source="tfds",
        ),
        DatasetInfo(
            name="cifar10",
            num_classes=10,
            image_shape=(32, 32, 3),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            source="tfds",
        ),
        # Fashion-MNIST's 28x28 images are zero-padded to 32x32 on load, so
        # the networks' five 2x2 pools apply unchanged. mean / std: the
        # standard statistics of the unpadded train split (pixel / 255).
        DatasetInfo(
            name="fashion_mnist",
            num_classes=10,
            image_shape=(32, 32, 1),
            mean=(0.2860,),
            std=(0.3530,),
            source="idx",
        ),
        DatasetInfo(
            name="digits",
            num_classes=10,
            image_shape=(8, 8, 1),
            mean=None,
            std=None,
            source="sklearn",
        ),
    )
}

# digits: 500 test images out of 1,797 (1,297 train), drawn once with this seed.
_DIGITS_NUM_TEST = 500
_DIGITS_SPLIT_SEED = 0


def _given(data_dir: str | os.PathLike[str] | None) -> str | None:
  """``data_dir`` as a string, None if not given (or empty)."""
  return os.fspath(data_dir) if data_dir else None


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> str:
  """The TFDS data directory to read: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.

  Resolved here (at call time) rather than left to TFDS, because TFDS reads
  TFDS_DATA_DIR once at import; resolving ourselves also lets error messages
  name the directory that was actually searched.
  """
  if data_dir:
    return os.fspath(data_dir)
  return os.environ.get(
      "TFDS_DATA_DIR",
      os.path.join(os.path.expanduser("~"), "tensorflow_datasets"),
  )


# Names of datasets read by name from a TFDS data directory: "tfds:NAME".
TFDS_PREFIX = "tfds:"


def is_tfds_name(name: object) -> bool:
  """``tfds:NAME``: any prepared TFDS image-classification dataset."""
  return (
      isinstance(name, str)
      and name.startswith(TFDS_PREFIX)
      and len(name) > len(TFDS_PREFIX)
  )


def dataset_info(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> DatasetInfo:
  """The table entry of ``name``; for ``tfds:NAME``, made from the prepared files and added to the table.

  Args:
    name: a key of DATASETS, or ``tfds:NAME``.
    data_dir: where a ``tfds:NAME`` dataset is prepared (default:
      $TFDS_DATA_DIR, else ~/tensorflow_datasets); unused for other names.

  Raises:
    ValueError: an unknown name.
    DatasetNotPreparedError: (one line) ``tfds:NAME`` is not prepared there,
      or is not an image-classification dataset with train and test splits.
  """
  if is_tfds_name(name):
    from masc_jax.data import tfds_source  # local: imports TFDS

    prepared = tfds_source.describe(
        name[len(TFDS_PREFIX) :], _resolve_data_dir(data_dir)
    )
    info = DatasetInfo(
        name=name,
        num_classes=prepared.num_classes,
        image_shape=prepared.image_shape,
        mean=None,
        std=None,
        source="tfds_files",
    )
    DATASETS[name] = info
    return info
  try:
    return DATASETS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"Unknown dataset {name!r}; valid names are "
        f"{', '.join(n for n in DATASETS if not is_tfds_name(n))}, or "
        f"{TFDS_PREFIX}NAME for a prepared TFDS dataset."
    ) from None


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> ArrayDataset:
  """Loads a whole dataset into host memory.

  Args:
    name: a key of DATASETS, or ``tfds:NAME``.
    data_dir: TFDS data directory (ignored for `digits`); default: the
      TFDS_DATA_DIR environment variable, else ~/tensorflow_datasets. For
      `fashion_mnist`, a folder of IDX files or a TFDS data directory; default:
      the TFDS data directory, else the Debian package's folder.

  Returns:
    An ArrayDataset with uint8 images and int32 labels.

  Raises:
    ValueError: unknown name.
    DatasetNotPreparedError: the dataset is not where it was looked for, or
      its files are damaged.
  """
  info = dataset_info(name, data_dir)
  if info.source == "sklearn":
    return _load_digits(info)
  if info.source == "idx":
    from masc_jax.data import fashion_mnist  # local: the IDX path only

    return fashion_mnist.load(info, _given(data_dir))
  from masc_jax.data import tfds_source  # local: only the TFDS paths need it

  if info.source == "tfds_files":
    return tfds_source.load_prepared(info, _resolve_data_dir(data_dir))
  return tfds_source.load(info, _resolve_data_dir(data_dir))


def check_dataset_available(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> None:
  """Raises DatasetNotPreparedError if `name` cannot be loaded; reads no records.

  Meant to validate a run's configuration before anything expensive starts.
  `digits` (source "sklearn") is bundled with scikit-learn, so it is always
  available; a ``tfds:NAME`` dataset is available once `dataset_info` can
  describe it.
  """
  info = dataset_info(name, data_dir)
  if info.source in ("sklearn", "tfds_files"):
    return
  if info.source == "idx":
    from masc_jax.data import fashion_mnist

    fashion_mnist.locate(_given(data_dir))
    return
  from masc_jax.data import tfds_source

  tfds_source.open_splits(name, _resolve_data_dir(data_dir))


# ----------------------------------------------------------------------------
# digits


def _stratified_test_mask(
    labels: np.ndarray, num_test: int, seed: int
) -> np.ndarray:
  """[N] bool mask choosing `num_test` samples, stratified by label.

  Each class gets a share of the test set proportional to its size (largest
  remainder rounding, ties to the smaller class id), and its test samples are
  drawn uniformly with a fixed-seed NumPy Generator, so the split is the same
  on every run and machine.
  """
  classes, counts = np.unique(labels, return_counts=True)
  exact = num_test * counts / labels.shape[0]
  quota = np.floor(exact).astype(np.int64)
  # Hand the leftover test slots to the classes with the largest remainders.
  order = np.argsort(-(exact - quota), kind="stable")
  quota[order[: num_test - int(quota.sum())]] += 1
  rng = np.random.default_rng(seed)
  mask = np.zeros(labels.shape[0], dtype=bool)
  for c, q in zip(classes, quota):
    members = np.flatnonzero(labels == c)
    mask[rng.choice(members, size=int(q), replace=False)] = True
  return mask


def _load_digits(info: DatasetInfo) -> ArrayDataset:
  """scikit-learn's 8x8 digits: [N, 8, 8, 1] uint8, 1,297 train / 500 test.

  mean / std are computed from the train split (the table has None).
  """
  from sklearn.datasets import load_digits  # local: sklearn is slow to import

  bunch = load_digits()
  # Pixel values are integers 0..16; rescale to the 0..255 range of the
  # CIFAR images so the same normalisation / augmentation code applies.
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  check_split(
      info,
      "all",
      images,
      labels,
      RuntimeError,
      "The installed scikit-learn's digits differ from what MASC expects.",
  )
  test = _stratified_test_mask(labels, _DIGITS_NUM_TEST, _DIGITS_SPLIT_SEED)
  train_images = images[~test]
  scaled = train_images.astype(np.float64) / 255.0
  return ArrayDataset(
      name=info.name,
      train_images=train_images,
      train_labels=labels[~test],
      test_images=images[test],
      test_labels=labels[test],
      num_classes=info.num_classes,
      mean=scaled.mean(axis=(0, 1, 2)).astype(np.float32),
      std=scaled.std(axis=(0, 1, 2)).astype(np.float32),
  )
