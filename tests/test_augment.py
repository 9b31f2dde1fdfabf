"""Tests for masc_jax.data.augment, against NumPy brute force."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masc_jax.data import augment


def _images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  # Random pixels in 1..255: every window of the padded image is then
  # distinguishable (padding is the only source of zeros), so the brute-force
  # search below finds a unique match.
  return np.random.default_rng(seed).integers(1, 256, shape, dtype=np.uint8)


def _matches(
    out: np.ndarray, image: np.ndarray, p: int
) -> list[tuple[int, int, bool]]:
  """All (dy, dx, mirrored) such that `out` is that window of the zero-padded image."""
  h, w, _ = image.shape
  padded = np.pad(image, ((p, p), (p, p), (0, 0)))
  found = []
  for dy in range(2 * p + 1):
    for dx in range(2 * p + 1):
      window = padded[dy : dy + h, dx : dx + w]
      if np.array_equal(out, window):
        found.append((dy, dx, False))
      if np.array_equal(out, window[:, ::-1]):
        found.append((dy, dx, True))
  return found


def test_normalize_matches_numpy() -> None:
  images = _images((4, 5, 6, 3))
  mean = np.array([0.3, 0.5, 0.7], np.float32)
  std = np.array([0.2, 0.25, 0.3], np.float32)
  got = augment.normalize(
      jnp.asarray(images), jnp.asarray(mean), jnp.asarray(std)
  )
  assert got.dtype == jnp.float32 and got.shape == images.shape
  expected = (images.astype(np.float64) / 255.0 - mean) / std
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_is_a_window_of_the_padded_image(flip: bool) -> None:
  p = 2
  images = _images((64, 6, 7, 3))
  out = np.asarray(
      augment.random_crop_flip(
          jnp.asarray(images), jax.random.key(0), crop_padding=p, flip=flip
      )
  )
  assert out.shape == images.shape and out.dtype == np.uint8
  offsets, mirrored = set(), set()
  for o, image in zip(out, images):
    found = _matches(o, image, p)
    assert len(found) == 1, found
    dy, dx, m = found[0]
    assert flip or not m
    offsets.add((dy, dx))
    mirrored.add(m)
  # The crop really moves: many distinct offsets occur, not only the centre.
  assert len(offsets) > 5
  assert mirrored == ({False, True} if flip else {False})


def test_crop_covers_every_offset() -> None:
  # p = 1: 9 offsets; with 300 images, missing one has probability ~1e-14.
  images = _images((300, 4, 4, 1), seed=1)
  out = np.asarray(
      augment.random_crop_flip(
          jnp.asarray(images), jax.random.key(3), crop_padding=1, flip=False
      )
  )
  offsets = {_matches(o, image, 1)[0][:2] for o, image in zip(out, images)}
  assert offsets == {(dy, dx) for dy in range(3) for dx in range(3)}


def test_flip_only() -> None:
  images = _images((100, 5, 5, 3))
  out = np.asarray(
      augment.random_crop_flip(
          jnp.asarray(images), jax.random.key(1), crop_padding=0, flip=True
      )
  )
  flipped = 0
  for o, image in zip(out, images):
    same, mirror = np.array_equal(o, image), np.array_equal(o, image[:, ::-1])
    assert same != mirror  # exactly one (random images are not symmetric)
    flipped += mirror
  assert 0 < flipped < 100


def test_identity_when_disabled() -> None:
  images = _images((3, 4, 5, 2))
  out = augment.random_crop_flip(
      jnp.asarray(images), jax.random.key(0), crop_padding=0, flip=False
  )
  np.testing.assert_array_equal(np.asarray(out), images)


def test_leading_dims_jit_and_determinism() -> None:
  p = 1
  images = _images((3, 5, 4, 4, 2))  # [K, B, H, W, C]
  fn = jax.jit(
      functools.partial(augment.random_crop_flip, crop_padding=p, flip=True)
  )
  a = np.asarray(fn(jnp.asarray(images), jax.random.key(7)))
  b = np.asarray(fn(jnp.asarray(images), jax.random.key(7)))
  c = np.asarray(fn(jnp.asarray(images), jax.random.key(8)))
  assert a.shape == images.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for k in range(3):
    for i in range(5):
      assert len(_matches(a[k, i], images[k, i], p)) == 1
  # A single image without batch dims works too.
  single = np.asarray(fn(jnp.asarray(images[0, 0]), jax.random.key(7)))
  assert len(_matches(single, images[0, 0], p)) == 1


def test_augment_and_normalize() -> None:
  images = _images((8, 6, 6, 3))
  mean = jnp.array([0.4, 0.5, 0.6])
  std = jnp.array([0.2, 0.3, 0.4])
  key = jax.random.key(5)
  got = augment.augment_and_normalize(
      jnp.asarray(images), key, mean=mean, std=std, crop_padding=2, flip=True
  )
  assert got.dtype == jnp.float32
  # Same as augmenting the raw pixels (zero padding) and then normalising.
  raw = augment.random_crop_flip(
      jnp.asarray(images), key, crop_padding=2, flip=True
  )
  expected = (
      np.asarray(raw, np.float64) / 255.0 - np.asarray(mean)
  ) / np.asarray(std)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments() -> None:
  with pytest.raises(ValueError, match="crop_padding must be >= 0; got -1"):
    augment.random_crop_flip(
        jnp.zeros((2, 4, 4, 1), jnp.uint8),
        jax.random.key(0),
        crop_padding=-1,
        flip=False,
    )
  with pytest.raises(ValueError, match=r"\[\.\.\., H, W, C\]"):
    augment.random_crop_flip(
        jnp.zeros((4, 4), jnp.uint8),
        jax.random.key(0),
        crop_padding=1,
        flip=False,
    )


@pytest.mark.parametrize(
    "n, h, w, c, p, dtype",
    [
        (64, 6, 7, 3, 2, np.uint8),
        (160, 8, 8, 1, 1, np.uint8),  # digits' crop, K x B images
        (16, 4, 4, 2, 4, np.float32),  # padding as large as the image
        (8, 32, 32, 3, 4, np.uint8),  # CIFAR's crop
    ],
)
def test_both_ways_of_cutting_windows_give_the_numpy_windows(
    n, h, w, c, p, dtype
) -> None:
  """The per-image slices (CPU, GPU) and the selection among shifted copies (TPU):
  bit for bit the windows NumPy slices out of each padded image.
  """
  rng = np.random.default_rng(p)
  padded = rng.integers(0, 256, (n, h + 2 * p, w + 2 * p, c)).astype(dtype)
  offsets = rng.integers(0, 2 * p + 1, (n, 2)).astype(np.int32)
  offsets[:2] = [[0, 0], [2 * p, 2 * p]]  # both extremes occur
  expected = np.stack(
      [image[y : y + h, x : x + w] for image, (y, x) in zip(padded, offsets)]
  )
  for cut in (
      augment.crop_windows_by_slices,
      augment.crop_windows_by_selection,
  ):
    got = jax.jit(functools.partial(cut, size=(h, w)))(
        jnp.asarray(padded), jnp.asarray(offsets)
    )
    assert got.dtype == expected.dtype, cut.__name__
    np.testing.assert_array_equal(np.asarray(got), expected, cut.__name__)
