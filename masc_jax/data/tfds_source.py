"""CIFAR through TFDS: a prepared array_record directory read with random access.

`tfds.data_source` opens the splits without TensorFlow; `read_split` reads
every record in chunks into uint8 arrays checked against the dataset table
(`masc_jax.data.registry.DATASETS`). `masc_jax.data.registry.load_dataset` calls `load` for
datasets whose source is "tfds". A missing or damaged copy is one
`DatasetNotPreparedError` saying how to prepare it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from masc_jax.data.arrays import ArrayDataset, DatasetInfo, DatasetNotPreparedError, check_split

# Records per `__getitems__` call when reading a TFDS split: large enough that
# per-call overhead vanishes, small enough that the decoded dicts stay small.
_READ_CHUNK = 4096


def _not_prepared_message(name: str, data_dir: str, detail: str) -> str:
  """Builds the user-facing explanation of a missing / unreadable TFDS dataset."""
  return (
      f"Dataset {name!r} is not prepared (as TFDS array_record files) in the TFDS "
      f"data directory {data_dir!r}.\n"
      f"  The directory comes from the data_dir argument, else the TFDS_DATA_DIR "
      f"environment variable, else ~/tensorflow_datasets.\n"
      f"  To fix: prepare it once on a machine with network access with\n"
      f"      bash launch/prepare_data.sh {name}\n"
      f"  and point TFDS_DATA_DIR (or data_dir) at the directory it wrote.\n"
      f"  For an offline run, use the bundled dataset instead: --config=digits\n"
      f"  (details: {detail})"
  )


def open_splits(name: str, data_dir: str) -> tuple[Any, Any]:
  """Opens the train and test data sources of a prepared TFDS dataset.

  Opening reads only the array_record indices, not the records.
  """
  import tensorflow_datasets as tfds  # local: only the CIFAR path needs it

  try:
    train, test = tfds.data_source(
        name, split=["train", "test"], data_dir=data_dir, download=False
    )
    sizes = (len(train), len(test))
    # The record files are opened lazily (sizes come from the metadata):
    # read the first and last record of each split to prove they exist.
    for source, size in ((train, sizes[0]), (test, sizes[1])):
      if size:
        _ = (source[0], source[size - 1])
  except Exception as err:  # noqa: BLE001
    # TFDS signals "not prepared here" with many exception types
    # (NotImplementedError for a missing/TFRecord-only directory,
    # ValueError / KeyError for missing splits, FileNotFoundError, ...).
    # The name is known to be valid, so any failure here is about the data
    # on disk: translate it into one actionable error, without a deep TFDS
    # traceback.
    tfds_words = f"{type(err).__name__}: {str(err).strip()}"
    try:
      prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # noqa: BLE001 - diagnosis only; the error below stands
      prepared = True  # unknown: show TFDS's own words
    if prepared:
      # A copy exists but cannot be opened for random access, e.g. it
      # was prepared as TFRecord: TFDS's words say which.
      detail = f"a copy exists but cannot be opened: {tfds_words}"
    else:
      # TFDS's words for an empty directory talk about TFRecord files
      # that are not there; say plainly what is missing.
      detail = f"no prepared copy under {os.path.join(data_dir, name)}"
    raise DatasetNotPreparedError(
        _not_prepared_message(name, data_dir, detail)
    ) from None
  if min(sizes) == 0:
    raise DatasetNotPreparedError(
        _not_prepared_message(
            name,
            data_dir,
            f"empty split (train={sizes[0]}, test={sizes[1]} records)",
        )
    )
  return train, test


def read_split(
    source: Sequence[dict[str, Any]], info: DatasetInfo, split: str
) -> tuple[np.ndarray, np.ndarray]:
  """Reads every record of a TFDS data source into ([N, H, W, C] uint8, [N] int32).

  Records are fetched in chunks with the batched `__getitems__` (one
  array_record read per chunk instead of one per record) and written into
  preallocated arrays. The result is checked against the dataset table
  (image shape, label range).
  """
  name = info.name
  fix = (
      "The prepared files look corrupt or belong to another dataset. Re-run "
      f"`bash launch/prepare_data.sh {name}`."
  )
  n = len(source)
  first = np.asarray(source[0]["image"])
  # Check the shape before reading everything (a wrong dataset fails fast).
  check_split(
      info,
      split,
      first[None],
      np.zeros(0, np.int32),
      DatasetNotPreparedError,
      fix,
  )
  images = np.empty((n, *first.shape), dtype=np.uint8)
  labels = np.empty((n,), dtype=np.int32)
  try:
    for start in range(0, n, _READ_CHUNK):
      keys = list(range(start, min(n, start + _READ_CHUNK)))
      for offset, record in enumerate(source.__getitems__(keys)):
        images[start + offset] = record["image"]
        labels[start + offset] = record["label"]
  except (OSError, RuntimeError, ValueError) as err:
    # array_record reports missing / truncated shards as RuntimeError.
    raise DatasetNotPreparedError(
        f"Reading the {name} {split} split failed ({type(err).__name__}: {err}); "
        f"the prepared files look incomplete or corrupt. Re-run "
        f"`bash launch/prepare_data.sh {name}` (or use --config=digits offline)."
    ) from err
  check_split(info, split, images, labels, DatasetNotPreparedError, fix)
  return images, labels


def load(info: DatasetInfo, data_dir: str) -> ArrayDataset:
  """Loads cifar10 / cifar100 from a TFDS array_record directory."""
  train_source, test_source = open_splits(info.name, data_dir)
  train_images, train_labels = read_split(train_source, info, "train")
  test_images, test_labels = read_split(test_source, info, "test")
  assert info.mean is not None and info.std is not None, info
  return ArrayDataset(
      name=info.name,
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      num_classes=info.num_classes,
      mean=np.asarray(info.mean, dtype=np.float32),
      std=np.asarray(info.std, dtype=np.float32),
  )
