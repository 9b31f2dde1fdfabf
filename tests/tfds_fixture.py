"""A small prepared TFDS image-classification dataset (array_record), made without TensorFlow.

How (tensorflow-datasets 4.9, TensorFlow not installed):
  * a `tfds.core.GeneratorBasedBuilder` subclass with `skip_registration=True`:
    no clash with TFDS's registered names, and readers in this process take
    the same path as in a fresh one (the builder restored from the files);
  * `_info` builds `tfds.core.DatasetInfo(builder=self, ...)` directly
    (`dataset_info_from_configs` looks for metadata beside the builder's
    module);
  * images are given as PNG bytes (Pillow): given an array, `Image` encodes
    with TensorFlow;
  * `disable_shuffling=True`: records are stored in the order written, so the
    arrays returned here are what `tfds.data_source` reads back.
"""

from __future__ import annotations

import io
import tempfile

import numpy as np


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 [H, W, C] (C = 1 or 3) -> PNG bytes."""
  import PIL.Image

  pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buffer = io.BytesIO()
  pil.save(buffer, format="PNG")
  return buffer.getvalue()


def make_fixture(
    data_dir: str,
    name: str,
    *,
    version: str = "1.0.0",
    num_classes: int = 4,
    image_shape: tuple[int, int, int] = (8, 8, 3),
    splits: dict[str, int] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    extra_label: tuple[str, int] | None = None,
    supervised_keys: bool = True,
    image_feature: bool = True,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Prepares ``name/version`` in ``data_dir``; returns ``{split: (images, labels)}``.

  Images are random uint8; labels cycle 0, 1, ..., C-1 (every class in every
  split). ``extra_label=("coarse_label", 2)`` adds a second ClassLabel, as
  cifar100 has; ``image_feature=False`` stores the pixels as a plain tensor
  instead of an Image (not an image-classification dataset).
  """
  import tensorflow_datasets as tfds

  splits = dict(splits or {"train": 40, "test": 20})
  rng = np.random.default_rng(seed)
  data = {}
  for split, n in splits.items():
    images = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
    data[split] = images, (np.arange(n) % num_classes).astype(np.int64)

  features = {
      image_key: (
          tfds.features.Image(shape=image_shape)
          if image_feature
          else tfds.features.Tensor(shape=image_shape, dtype=np.uint8)
      ),
      label_key: tfds.features.ClassLabel(num_classes=num_classes),
  }
  if extra_label is not None:
    features[extra_label[0]] = tfds.features.ClassLabel(
        num_classes=extra_label[1]
    )

  class Fixture(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(version)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="masc_jax test fixture",
          features=tfds.features.FeaturesDict(features),
          supervised_keys=(image_key, label_key) if supervised_keys else None,
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
      images, labels = data[split]
      for i, (image, label) in enumerate(zip(images, labels)):
        record = {
            image_key: png_bytes(image) if image_feature else image,
            label_key: int(label),
        }
        if extra_label is not None:
          record[extra_label[0]] = int(label) % extra_label[1]
        yield i, record

  Fixture.name = name  # the folder's name, and the name readers are given
  builder = Fixture(data_dir=data_dir)
  with tempfile.TemporaryDirectory() as downloads:  # else data_dir/downloads/
    builder.download_and_prepare(
        download_dir=downloads,
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  return data
