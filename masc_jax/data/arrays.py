"""What a dataset is: its table entry (``DatasetInfo``) and a loaded copy (``ArrayDataset``).

The dataset table itself and the loaders are in ``masc_jax.data.registry``.
NumPy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a dataset is, independent of any loaded copy.

  Attributes:
    name: the dataset's name (its key in DATASETS).
    num_classes: C; labels lie in [0, C).
    image_shape: (H, W, C) of one image.
    mean: per-channel mean of pixel / 255 used for normalisation, or None:
      computed from the loaded train split.
    std: per-channel std of pixel / 255, or None: computed from the train split.
    source: where the data comes from: "tfds" (a registered TFDS dataset
      prepared as array_record), "tfds_files" (any prepared TFDS dataset,
      described from its files: ``tfds:NAME``), "idx" (IDX files or a TFDS
      copy: ``masc_jax.data.fashion_mnist``) or "sklearn" (bundled with
      scikit-learn, always available).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  source: str


class DatasetNotPreparedError(RuntimeError):
  """A dataset is not where it was looked for, or its files are damaged or unusable.

  The message says what is wrong and how to get the data; the entry point
  prints it as one line and exits with status 2.
  """


def check_split(
    info: DatasetInfo,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    error: type[Exception],
    fix: str,
) -> None:
  """Raises `error` if a loaded split disagrees with the dataset table.

  Checks the image shape (H, W, C) and that every label lies in
  [0, num_classes); `fix` ends the message with what the user should do.
  """
  problems = []
  if tuple(images.shape[1:]) != info.image_shape:
    problems.append(
        f"images have shape {tuple(images.shape[1:])} (H, W, C), expected "
        f"{info.image_shape}"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
    problems.append(
        f"labels span [{labels.min()}, {labels.max()}], outside "
        f"[0, {info.num_classes})"
    )
  if problems:
    raise error(
        f"{info.name} {split}: the loaded data does not match the dataset table "
        f"(masc_jax.data.registry.DATASETS): {'; '.join(problems)}. {fix}"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """A whole dataset in host memory.

  Attributes:
    name: dataset name (a key of DATASETS).
    train_images: [N, H, W, C] uint8.
    train_labels: [N] int32 in [0, num_classes).
    test_images: [M, H, W, C] uint8.
    test_labels: [M] int32 in [0, num_classes).
    num_classes: number of classes C.
    mean: [C] float32, per-channel mean of pixel / 255 (for normalisation).
    std: [C] float32, per-channel std of pixel / 255.

  The arrays are made read-only: the dataset is shared by every stage and
  cached on device, so an accidental in-place edit would be a silent bug.
  (eq=False: element-wise array comparison has no single truth value.)
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray

  def __post_init__(self) -> None:
    for split, images, labels in (
        ("train", self.train_images, self.train_labels),
        ("test", self.test_images, self.test_labels),
    ):
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{self.name} {split}_images must be uint8 [N, H, W, C]; got "
            f"{images.dtype} with shape {images.shape}."
        )
      if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{self.name} {split}_labels must have shape ({images.shape[0]},) "
            f"to match {split}_images; got {labels.shape}."
        )
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise ValueError(
          f"{self.name}: train and test images differ in shape: "
          f"{self.train_images.shape[1:]} vs {self.test_images.shape[1:]}."
      )
    channels = self.train_images.shape[-1]
    if self.mean.shape != (channels,) or self.std.shape != (channels,):
      raise ValueError(
          f"{self.name}: mean and std must have shape ({channels},); got "
          f"{self.mean.shape} and {self.std.shape}."
      )
    for arr in (
        self.train_images,
        self.train_labels,
        self.test_images,
        self.test_labels,
        self.mean,
        self.std,
    ):
      arr.setflags(write=False)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    h, w, c = self.train_images.shape[1:]
    return (int(h), int(w), int(c))
