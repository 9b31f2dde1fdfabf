"""TFDS datasets: prepared array_record directories read with random access, no TensorFlow.

Two ways in:

* Registered datasets (cifar10, cifar100): `open_splits` opens them by name
  through `tfds.data_source`, and `load` reads them against the dataset table
  (`masc_jax.data.registry.DATASETS`), with the table's fixed mean / std.
* Any prepared image-classification dataset by name (``--config=tfds:NAME``):
  `describe` restores the builder from the prepared files alone
  (``dataset_info.json``, ``features.json``), never from TFDS's code, so what
  is on disk is what is read, whichever TFDS version wrote it. Image shape,
  class count and splits come from there; `load_prepared` reads the train and
  test splits and takes mean / std from `train_statistics` (computed once
  from the train split and cached, see there).

`read_split` reads every record in chunks into uint8 arrays checked against
the dataset table. A missing, damaged or unusable copy is one
`DatasetNotPreparedError` saying what is wrong and how to prepare it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from masc_jax import paths
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
    source: Sequence[dict[str, Any]],
    info: DatasetInfo,
    split: str,
    image_key: str = "image",
    label_key: str = "label",
    prepare_name: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Reads every record of a TFDS data source into ([N, H, W, C] uint8, [N] int32).

  Records are fetched in chunks with the batched `__getitems__` (one
  array_record read per chunk instead of one per record) and written into
  preallocated arrays. The result is checked against ``info`` (image shape,
  label range). ``prepare_name``: the TFDS name the fix in error messages
  names (default ``info.name``).
  """
  name = prepare_name or info.name
  fix = (
      "The prepared files look corrupt or belong to another dataset. Re-run "
      f"`bash launch/prepare_data.sh {name}`."
  )
  n = len(source)
  if n == 0:
    raise DatasetNotPreparedError(
        f"{name} {split}: the prepared split holds no records. {fix}"
    )
  try:
    first = np.asarray(source[0][image_key])
  except Exception as err:  # noqa: BLE001 - any read failure: damaged files
    raise DatasetNotPreparedError(
        f"Reading the {name} {split} split failed ({type(err).__name__}: "
        f"{_first_line(err)}). {fix}"
    ) from None
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
        images[start + offset] = record[image_key]
        labels[start + offset] = record[label_key]
  except (OSError, RuntimeError, ValueError) as err:
    # array_record reports missing / truncated shards as RuntimeError.
    raise DatasetNotPreparedError(
        f"Reading the {name} {split} split failed ({type(err).__name__}: "
        f"{_first_line(err)}); the prepared files look incomplete or corrupt. "
        f"Re-run `bash launch/prepare_data.sh {name}` (or use --config=digits "
        "offline)."
    ) from None
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


def _first_line(err: BaseException) -> str:
  """The first non-empty line of an exception's message (TFDS's run to many)."""
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  return lines[0] if lines else type(err).__name__


# ----------------------------------------------------------------------------
# Any prepared image-classification dataset, described from its files.


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """A prepared TFDS image-classification dataset, as its files describe it.

  Attributes:
    name: the TFDS name as given: ``svhn_cropped``, ``emnist/letters``,
      ``my_data:1.0.0`` (newest prepared version unless one is named).
    version: the prepared version read.
    dataset_dir: ``data_dir/name[/config]/version``.
    image_key: the image feature (the supervised keys' first, else the only
      Image feature).
    label_key: the label feature (the supervised keys' second, else the only
      ClassLabel feature).
    image_shape: (H, W, C) of every image.
    num_classes: the label feature's class count.
    split_sizes: records per split.
    info_sha256: sha256 of ``dataset_info.json``, which records the splits'
      shard lengths and byte counts: it identifies this prepared copy.
  """

  name: str
  version: str
  dataset_dir: str
  image_key: str
  label_key: str
  image_shape: tuple[int, int, int]
  num_classes: int
  split_sizes: dict[str, int]
  info_sha256: str


def _prepare_hint(name: str) -> str:
  """How to prepare ``name`` (TFDS's NAME[/CONFIG][:VERSION]) for ``--config=tfds:NAME``."""
  return (
      f"prepare it with `bash launch/prepare_data.sh tfds:{name.split(':')[0]}`"
      " and pass its folder as --config.data_dir (or $TFDS_DATA_DIR)"
  )


def _feature_key(
    features: Any,
    supervised: tuple[Any, ...] | None,
    index: int,
    feature_type: type,
    kind: str,
    name: str,
) -> str:
  """The one feature of ``feature_type``: the supervised key if it is one, else the only one."""
  if supervised is not None:
    key = supervised[index]
    if (
        isinstance(key, str)
        and key in features.keys()
        and isinstance(features[key], feature_type)
    ):
      return key
  keys = [k for k, f in features.items() if isinstance(f, feature_type)]
  if len(keys) == 1:
    return keys[0]
  found = (
      f"several {feature_type.__name__} features {keys} and no supervised_keys "
      "naming one"
      if keys
      else f"no {feature_type.__name__} feature among {sorted(features.keys())}"
  )
  raise DatasetNotPreparedError(
      f"tfds:{name} is not an image-classification dataset: {found} (the "
      f"{kind})"
  )


@functools.lru_cache(maxsize=None)
def describe(name: str, data_dir: str) -> PreparedDataset:
  """Describes the prepared TFDS dataset ``name`` in ``data_dir`` from its files alone.

  Raises:
    DatasetNotPreparedError: (one line) no prepared copy, not array_record, no
      train or test split, or not a classification dataset of fixed-shape
      uint8 images.
  """
  import tensorflow_datasets as tfds  # local: only TFDS datasets need it
  from tensorflow_datasets.core import read_only_builder

  try:
    builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
  except Exception as err:  # noqa: BLE001 - DatasetNotFoundError, bad info files, ...
    detail = (
        "no prepared copy"
        if type(err).__name__ == "DatasetNotFoundError"
        else f"its files cannot be read ({type(err).__name__}: {_first_line(err)})"
    )
    raise DatasetNotPreparedError(
        f"tfds:{name}: {detail} in the TFDS data directory {data_dir}; "
        + _prepare_hint(name)
    ) from None
  info = builder.info
  file_format = getattr(info.file_format, "value", info.file_format)
  if file_format != "array_record":
    raise DatasetNotPreparedError(
        f"tfds:{name} in {data_dir} is prepared as {file_format}, which has no "
        "random access; rebuild it as array_record: " + _prepare_hint(name)
    )
  features = info.features
  supervised = (
      info.supervised_keys
      if isinstance(info.supervised_keys, tuple)
      and len(info.supervised_keys) == 2
      else None
  )
  image_key = _feature_key(
      features, supervised, 0, tfds.features.Image, "image", name
  )
  label_key = _feature_key(
      features, supervised, 1, tfds.features.ClassLabel, "label", name
  )
  image = features[image_key]
  shape = tuple(image.shape)
  if (
      len(shape) != 3
      or any(d is None for d in shape)
      or np.dtype(image.np_dtype) != np.uint8
  ):
    raise DatasetNotPreparedError(
        f"tfds:{name}: feature {image_key!r} holds "
        f"{np.dtype(image.np_dtype).name} images of shape {shape}; only uint8 "
        "images of one fixed (H, W, C) shape can be trained on"
    )
  sizes = {k: int(s.num_examples) for k, s in info.splits.items()}
  missing = [s for s in ("train", "test") if s not in sizes]
  if missing:
    raise DatasetNotPreparedError(
        f"tfds:{name} has the splits {sorted(sizes)}, but training needs a "
        f"'train' and a 'test' split (missing: {', '.join(missing)})"
    )
  empty = [s for s in ("train", "test") if sizes[s] == 0]
  if empty:
    raise DatasetNotPreparedError(
        f"tfds:{name}: the {' and '.join(empty)} split holds no records; "
        + _prepare_hint(name)
    )
  info_bytes = (epath.Path(builder.data_dir) / "dataset_info.json").read_bytes()
  return PreparedDataset(
      name=name,
      version=str(builder.version),
      dataset_dir=os.fspath(builder.data_dir),
      image_key=image_key,
      label_key=label_key,
      image_shape=shape,  # type: ignore[arg-type]
      num_classes=int(features[label_key].num_classes),
      split_sizes=sizes,
      info_sha256=hashlib.sha256(info_bytes).hexdigest(),
  )


def read_prepared_split(
    prepared: PreparedDataset,
    info: DatasetInfo,
    split: str,
    prepare_name: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """One split of a described dataset: ([N, H, W, C] uint8, [N] int32), checked against ``info``.

  ``prepare_name``: what ``launch/prepare_data.sh`` is given in error
  messages (default ``tfds:NAME``).
  """
  if prepare_name is None:
    prepare_name = "tfds:" + prepared.name.split(":")[0]
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder_from_directory(prepared.dataset_dir)
    source = builder.as_data_source(split=split)
  except Exception as err:  # noqa: BLE001 - missing shards, unreadable files, ...
    raise DatasetNotPreparedError(
        f"tfds:{prepared.name}: the {split} split in {prepared.dataset_dir} "
        f"cannot be opened ({type(err).__name__}: {_first_line(err)}); "
        + _prepare_hint(prepared.name)
    ) from None
  return read_split(
      source,
      info,
      split,
      prepared.image_key,
      prepared.label_key,
      prepare_name=prepare_name,
  )


# Train-split statistics of a described dataset: computed once, then read back.
STATS_FILE = "masc_stats.json"
STATS_FORMAT = 1


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean and population std of pixel / 255, from 256-bin histograms.

  Args:
    images: [N, H, W, C] uint8.

  Returns:
    ([C] float32 mean, [C] float32 std). Histograms avoid a float copy of
    the images (CIFAR-100's train split in float64 is 1.2 GB).
  """
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, std = [], []
  for c in range(images.shape[-1]):
    counts = np.bincount(images[..., c].ravel(), minlength=256).astype(
        np.float64
    )
    n = counts.sum()
    m = float((counts * values).sum() / n)
    mean.append(m)
    std.append(float(np.sqrt((counts * (values - m) ** 2).sum() / n)))
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def user_cache_dir() -> str:
  """``$MASC_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/masc_jax``."""
  explicit = os.environ.get("MASC_CACHE_DIR")
  if explicit:
    return explicit
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache"
  )
  return os.path.join(base, "masc_jax")


def statistics_locations(prepared: PreparedDataset) -> list[str]:
  """Where the train statistics are looked for and written, in order.

  Beside the data (``<dataset_dir>/masc_stats.json``), then the user cache
  (``<user_cache_dir>/tfds_stats/<name>-<version>-<key>.json``, the key a
  hash of the dataset folder and its ``dataset_info.json``): a read-only
  data folder or bucket still gets its statistics computed only once.
  """
  key = hashlib.sha256(
      f"{prepared.dataset_dir}\n{prepared.info_sha256}".encode()
  ).hexdigest()[:16]
  safe = prepared.name.split(":")[0].replace("/", "_")
  return [
      paths.join(prepared.dataset_dir, STATS_FILE),
      os.path.join(
          user_cache_dir(),
          "tfds_stats",
          f"{safe}-{prepared.version}-{key}.json",
      ),
  ]


def _valid_record(record: Any, prepared: PreparedDataset) -> bool:
  """A cache file describes this very copy (same info file, train size, channels)."""
  channels = prepared.image_shape[-1]
  return (
      isinstance(record, dict)
      and record.get("format") == STATS_FORMAT
      and record.get("info_sha256") == prepared.info_sha256
      and record.get("num_examples") == prepared.split_sizes["train"]
      and len(record.get("mean", ())) == channels
      and len(record.get("std", ())) == channels
      and all(s > 0 for s in record["std"])
  )


def train_statistics(
    prepared: PreparedDataset, train_images: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str | None]:
  """Per-channel mean / std of pixel / 255 over the train split, cached.

  The first valid file of `statistics_locations` is used. Otherwise they are
  computed from ``train_images`` ([N, H, W, C] uint8, the whole train split)
  and written to the first location that accepts the write; if none does,
  the run goes on with the computed values.

  Returns:
    ([C] float32 mean, [C] float32 std, the file read or written, or None).
  """
  locations = statistics_locations(prepared)
  for path in locations:
    try:
      record = json.loads(paths.read_text(path))
      valid = _valid_record(record, prepared)
    except Exception:  # noqa: BLE001 - absent, unreadable, not ours: not a cache
      continue
    if valid:
      return (
          np.asarray(record["mean"], np.float32),
          np.asarray(record["std"], np.float32),
          path,
      )
  mean, std = channel_statistics(train_images)
  record = {
      "format": STATS_FORMAT,
      "dataset": prepared.name,
      "version": prepared.version,
      "info_sha256": prepared.info_sha256,
      "split": "train",
      "num_examples": int(train_images.shape[0]),
      "what": "per-channel mean and population std of pixel / 255 over every "
      "train image",
      "mean": [float(x) for x in mean],
      "std": [float(x) for x in std],
  }
  for path in locations:
    try:
      paths.write_atomic(path, json.dumps(record, indent=2) + "\n")
    except Exception:  # noqa: BLE001 - read-only folder or bucket: try the next
      continue
    return mean, std, path
  return mean, std, None


def load_prepared(info: DatasetInfo, data_dir: str) -> ArrayDataset:
  """Loads a ``tfds:NAME`` dataset (its table entry ``info``) from ``data_dir``."""
  prepared = describe(info.name.removeprefix("tfds:"), data_dir)
  train_images, train_labels = read_prepared_split(prepared, info, "train")
  test_images, test_labels = read_prepared_split(prepared, info, "test")
  mean, std, _ = train_statistics(prepared, train_images)
  if not np.all(std > 0):
    raise DatasetNotPreparedError(
        f"{info.name}: every train image has the same value in some channel "
        f"(std {std.tolist()}): nothing to learn from"
    )
  return ArrayDataset(
      name=info.name,
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      num_classes=info.num_classes,
      mean=mean,
      std=std,
  )
