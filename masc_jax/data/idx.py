"""IDX files (the MNIST / Fashion-MNIST format), read and checked with NumPy only.

IDX layout (every multi-byte integer big-endian):

  offset 0   2 bytes  0x00 0x00            magic, always zero
  offset 2   1 byte   element type code    0x08 uint8 (table: IDX_DTYPES)
  offset 3   1 byte   number of dimensions D >= 1
  offset 4   4*D      the D sizes, each a big-endian uint32
  offset 4+4D         prod(sizes) elements, row-major (big-endian when
                      multi-byte), and nothing after them

Images: ``00 00 08 03 | N | 28 | 28 | N*784 bytes`` (idx3);
labels: ``00 00 08 01 | N | N bytes`` (idx1).

A file may be gzip-compressed; that is recognised by its first two bytes
(``1f 8b``), not by its name. Every problem (a missing file, a bad header, a
declared size the data does not match, a corrupt gzip stream, labels out of
range, image and label counts that differ) is one ``IdxFormatError`` whose
one-line message names the file: a damaged download never becomes a
traceback or a silently short dataset. Files are opened through
``etils.epath``, so a folder may also be ``gs://``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import BinaryIO

import numpy as np
from etils import epath

# IDX element type codes -> big-endian NumPy dtypes.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
  """An IDX file is missing, malformed, or does not hold what was expected."""


def _error(path: str | os.PathLike[str], problem: str) -> IdxFormatError:
  return IdxFormatError(f"{os.fspath(path)}: {problem}")


def _read_up_to(f: BinaryIO, n: int) -> bytes:
  """``n`` bytes, or fewer only where the stream ends."""
  chunks, got = [], 0
  while got < n:
    chunk = f.read(n - got)
    if not chunk:
      break
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)


def _parse(f: BinaryIO, path: str, ndim: int | None) -> np.ndarray:
  """The array of one IDX stream, every declared size checked against the data."""
  magic = _read_up_to(f, 4)
  if len(magic) < 4:
    raise _error(
        path, f"too short for an IDX header ({len(magic)} bytes, need 4)"
    )
  if magic[:2] != b"\x00\x00":
    raise _error(
        path,
        f"not an IDX file: magic starts with {magic[:2].hex()}, expected 0000",
    )
  code, dims = magic[2], magic[3]
  if code not in IDX_DTYPES:
    known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
    raise _error(
        path, f"unknown IDX element type code 0x{code:02x} (known: {known})"
    )
  if dims == 0:
    raise _error(path, "IDX header declares 0 dimensions")
  if ndim is not None and dims != ndim:
    raise _error(
        path, f"IDX header declares {dims} dimensions, expected {ndim}"
    )
  raw_shape = _read_up_to(f, 4 * dims)
  if len(raw_shape) < 4 * dims:
    raise _error(
        path,
        f"header truncated: {dims} sizes declared, only {len(raw_shape)} of "
        f"{4 * dims} size bytes present",
    )
  shape = struct.unpack(f">{dims}I", raw_shape)
  dtype = IDX_DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  data = _read_up_to(f, expected)
  if len(data) < expected:
    raise _error(
        path,
        f"data truncated: header declares shape {shape} ({expected} bytes of "
        f"{dtype.name}), only {len(data)} bytes present",
    )
  # Reading past the data finds trailing bytes, and makes gzip check its
  # CRC and length trailer.
  if _read_up_to(f, 1):
    raise _error(
        path, f"trailing bytes after the {expected} data bytes of shape {shape}"
    )
  array = np.frombuffer(data, dtype=dtype).reshape(shape)
  return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(
    path: str | os.PathLike[str], ndim: int | None = None
) -> np.ndarray:
  """A (possibly gzipped) IDX file as a native-endian array of its declared shape.

  Args:
    path: the file (local or gs://).
    ndim: if given, the number of dimensions the header must declare.

  Raises:
    IdxFormatError: one line naming the file and the problem.
  """
  path = os.fspath(path)
  try:
    with epath.Path(path).open("rb") as raw:
      gzipped = raw.read(2) == _GZIP_MAGIC
      raw.seek(0)
      if not gzipped:
        return _parse(raw, path, ndim)
      with gzip.GzipFile(fileobj=raw, mode="rb") as f:
        return _parse(f, path, ndim)
  except IdxFormatError:
    raise
  except EOFError:  # gzip: the compressed stream ends before its end marker
    raise _error(
        path, "gzip stream truncated (ends before its end-of-stream marker)"
    ) from None
  except (gzip.BadGzipFile, zlib.error) as err:  # header, CRC, length, data
    raise _error(path, f"corrupt gzip stream: {err}") from None
  except OSError as err:  # missing, unreadable, a directory, ...
    raise _error(path, f"cannot read: {err.strerror or err}") from None


def find_file(folder: str, stem: str) -> str | None:
  """``folder/stem``, else ``folder/stem.gz``; None if neither is a file."""
  for name in (stem, stem + ".gz"):
    candidate = epath.Path(folder) / name
    if candidate.is_file():
      return os.fspath(candidate)
  return None


def read_images_and_labels(
    folder: str,
    images_stem: str,
    labels_stem: str,
    num_classes: int,
    image_hw: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
  """One split: ``[N, H, W, 1]`` uint8 images and ``[N]`` int32 labels, checked.

  Each file is ``folder/stem`` or ``folder/stem.gz``. Checks that both are
  uint8, that the images are ``[N, H, W]`` with ``(H, W) == image_hw``, that
  the labels are ``[N]`` (the same N) and lie in ``[0, num_classes)``.

  Raises:
    IdxFormatError: one line naming the file and the problem.
  """
  paths = {}
  for stem in (images_stem, labels_stem):
    found = find_file(folder, stem)
    if found is None:
      missing = epath.Path(folder) / stem
      raise IdxFormatError(f"{os.fspath(missing)}[.gz]: missing")
    paths[stem] = found
  images_path, labels_path = paths[images_stem], paths[labels_stem]
  images = read_idx(images_path, ndim=3)
  labels = read_idx(labels_path, ndim=1)
  for path, array, what in (
      (images_path, images, "images"),
      (labels_path, labels, "labels"),
  ):
    if array.dtype != np.uint8:
      raise _error(
          path, f"{what} are {array.dtype}, expected uint8 (type code 0x08)"
      )
  if images.shape[1:] != tuple(image_hw):
    raise _error(
        images_path,
        f"images are {images.shape[1]}x{images.shape[2]}, expected "
        f"{image_hw[0]}x{image_hw[1]}",
    )
  if images.shape[0] != labels.shape[0]:
    raise _error(
        labels_path,
        f"{labels.shape[0]} labels but {images_path} holds "
        f"{images.shape[0]} images",
    )
  if labels.size and labels.max() >= num_classes:
    bad = int(np.argmax(labels >= num_classes))
    raise _error(
        labels_path,
        f"label {int(labels[bad])} at index {bad} is outside [0, {num_classes})",
    )
  return images[..., None], labels.astype(np.int32)
