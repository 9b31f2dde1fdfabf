"""Fashion-MNIST: found in one of three places, read and checked, padded to 32x32.

Where the data comes from, first match wins:

1. ``data_dir`` if given: a folder holding the four IDX files (gzipped or
   not), or a TFDS data directory holding a prepared ``fashion_mnist``. Only
   that folder: a run that names its data never silently reads other data.
2. A prepared TFDS ``fashion_mnist`` (array_record) in the default TFDS data
   directory (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).
3. The Debian package's folder ``/usr/share/datasets/fashion-mnist``
   (``apt-get install dataset-fashion-mnist``).

If none holds it, `locate` raises one `DatasetNotPreparedError` line saying
how to get it. The IDX files are checked by `masc_jax.data.idx`; a corrupt
file is that same error, naming the file.

The 28x28 images are zero-padded by 2 pixels on every side to 32x32, so the
networks' five 2x2 pools apply unchanged (32 -> 1). Zero is the images'
background, so the padding only widens the background.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from etils import epath

from masc_jax.data import idx
from masc_jax.data.arrays import ArrayDataset, DatasetInfo, DatasetNotPreparedError, check_split

# (split, what) -> file name without ".gz", as published and as Debian installs them.
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
TFDS_NAME = "fashion_mnist"
IMAGE_HW = (28, 28)
PAD = 2  # pixels of zeros on every side: 28 + 2 * 2 = 32
HOW_TO_GET = (
    "get it with `apt-get install dataset-fashion-mnist` (the IDX files in "
    f"{DEBIAN_DIR}), or `bash launch/prepare_data.sh {TFDS_NAME}` (TFDS), or "
    "pass a folder holding the four IDX files as --config.data_dir"
)


@dataclasses.dataclass(frozen=True)
class Location:
  """Where the data was found: ``kind`` "idx" (a folder of IDX files) or "tfds" (a TFDS data dir)."""

  kind: str
  folder: str


def _holds_idx(folder: str) -> bool:
  """Any of the four IDX files (plain or .gz) in ``folder``: then it is meant to hold them."""
  return any(idx.find_file(folder, stem) for stem in FILES.values())


def _tfds_copy(data_dir: str) -> str | None:
  """Why this TFDS data dir holds no usable ``fashion_mnist`` ("" if it has none at all); None if it does."""
  if not (epath.Path(data_dir) / TFDS_NAME).is_dir():
    return ""
  from masc_jax.data import tfds_source  # local: imports TFDS

  try:
    tfds_source.describe(TFDS_NAME, data_dir)
  except DatasetNotPreparedError as err:
    return str(err)
  return None


def default_tfds_dir() -> str:
  """``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  return os.environ.get(
      "TFDS_DATA_DIR",
      os.path.join(os.path.expanduser("~"), "tensorflow_datasets"),
  )


def locate(data_dir: str | None) -> Location:
  """Where to read Fashion-MNIST from (module doc); reads no records.

  Raises:
    DatasetNotPreparedError: one line: where it looked and how to get the data.
  """
  if data_dir:
    if _holds_idx(data_dir):
      return Location("idx", data_dir)
    why = _tfds_copy(data_dir)
    if why is None:
      return Location("tfds", data_dir)
    raise DatasetNotPreparedError(
        f"fashion_mnist: --config.data_dir={data_dir} holds neither the four "
        f"IDX files ({FILES[('train', 'images')]}[.gz], ...) nor a prepared "
        f"TFDS {TFDS_NAME}{f' ({why})' if why else ''}; {HOW_TO_GET}"
    )
  tfds_dir = default_tfds_dir()
  why = _tfds_copy(tfds_dir)
  if why is None:
    return Location("tfds", tfds_dir)
  if _holds_idx(DEBIAN_DIR):
    return Location("idx", DEBIAN_DIR)
  raise DatasetNotPreparedError(
      f"fashion_mnist was not found: no IDX files in {DEBIAN_DIR} and no "
      f"prepared TFDS {TFDS_NAME} in {tfds_dir}{f' ({why})' if why else ''}; "
      f"{HOW_TO_GET}"
  )


def pad(images: np.ndarray) -> np.ndarray:
  """[N, 28, 28, 1] -> [N, 32, 32, 1] uint8: ``PAD`` zero pixels on every side."""
  return np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))


def _read_idx_split(folder: str, split: str, num_classes: int):
  try:
    return idx.read_images_and_labels(
        folder,
        FILES[(split, "images")],
        FILES[(split, "labels")],
        num_classes,
        IMAGE_HW,
    )
  except idx.IdxFormatError as err:
    raise DatasetNotPreparedError(f"fashion_mnist {split}: {err}") from None


def _read_tfds_split(data_dir: str, split: str, info: DatasetInfo):
  from masc_jax.data import tfds_source

  prepared = tfds_source.describe(TFDS_NAME, data_dir)
  stored = (*IMAGE_HW, 1)
  if (prepared.image_shape, prepared.num_classes) != (stored, info.num_classes):
    raise DatasetNotPreparedError(
        f"fashion_mnist in {prepared.dataset_dir} holds {prepared.image_shape} "
        f"images in {prepared.num_classes} classes, expected {stored} in "
        f"{info.num_classes}; re-run `bash launch/prepare_data.sh {TFDS_NAME}`"
    )
  unpadded = dataclasses.replace(info, image_shape=stored)
  return tfds_source.read_prepared_split(
      prepared, unpadded, split, prepare_name=TFDS_NAME
  )


def load(info: DatasetInfo, data_dir: str | None) -> ArrayDataset:
  """Fashion-MNIST from where `locate` finds it, padded to ``info.image_shape``.

  Raises:
    DatasetNotPreparedError: (one line) not found, or a file is corrupt.
  """
  where = locate(data_dir)
  splits = {}
  for split in ("train", "test"):
    if where.kind == "idx":
      images, labels = _read_idx_split(where.folder, split, info.num_classes)
    else:
      images, labels = _read_tfds_split(where.folder, split, info)
    images = pad(images)
    check_split(
        info,
        split,
        images,
        labels,
        DatasetNotPreparedError,
        f"Check the files in {where.folder}.",
    )
    splits[split] = images, labels
  assert info.mean is not None and info.std is not None, info
  return ArrayDataset(
      name=info.name,
      train_images=splits["train"][0],
      train_labels=splits["train"][1],
      test_images=splits["test"][0],
      test_labels=splits["test"][1],
      num_classes=info.num_classes,
      mean=np.asarray(info.mean, dtype=np.float32),
      std=np.asarray(info.std, dtype=np.float32),
  )
