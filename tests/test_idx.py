"""masc_jax.data.idx against IDX files written here by another route (struct.pack + tobytes).

Every malformed or damaged file must be one ``IdxFormatError`` whose message
is one line naming the file, with no chained zlib / EOFError traceback.
"""

import gzip
import os
import struct

import numpy as np
import pytest

from masc_jax.data import idx
from masc_jax.data.idx import IdxFormatError, read_idx

CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(
    array: np.ndarray,
    code: int | None = None,
    ndim: int | None = None,
    magic: bytes = b"\x00\x00",
) -> bytes:
  """The IDX encoding of ``array``; ``code`` / ``ndim`` / ``magic`` may lie."""
  code = CODES[array.dtype.type] if code is None else code
  dims = array.ndim if ndim is None else ndim
  header = magic + struct.pack(">BB", code, dims)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data: bytes, gz: bool = False) -> str:
  path = os.fspath(path) + (".gz" if gz else "")
  with open(path, "wb") as f:
    f.write(gzip.compress(data) if gz else data)
  return path


def one_line(err: pytest.ExceptionInfo, path) -> str:
  """The error's message, checked to be one line naming ``path`` with no chained cause."""
  message = str(err.value)
  assert "\n" not in message and os.fspath(path) in message, message
  assert err.value.__cause__ is None
  assert err.value.__suppress_context__ or err.value.__context__ is None
  return message


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(CODES))
def test_round_trip(tmp_path, gz, dtype):
  rng = np.random.default_rng(0)
  array = (rng.normal(size=(5, 3, 4)) * 100).astype(dtype)
  back = read_idx(write(tmp_path / "a", idx_bytes(array), gz))
  assert back.dtype == np.dtype(dtype) and back.dtype.isnative
  np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_1d_and_empty(tmp_path, gz):
  labels = np.arange(7, dtype=np.uint8)
  path = write(tmp_path / "l", idx_bytes(labels), gz)
  np.testing.assert_array_equal(read_idx(path, ndim=1), labels)
  empty = np.zeros((0, 28, 28), np.uint8)
  assert read_idx(write(tmp_path / "e", idx_bytes(empty), gz)).shape == (
      0,
      28,
      28,
  )


def corrupt_cases():
  a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  good = idx_bytes(a)
  return {
      "bad magic": (idx_bytes(a, magic=b"\x00\x01"), "not an IDX file"),
      "unknown dtype code": (
          idx_bytes(a, code=0x07),
          "unknown IDX element type code 0x07",
      ),
      "zero ndim": (idx_bytes(a, ndim=0)[:4], "declares 0 dimensions"),
      "header truncated": (good[:9], "header truncated"),
      "too short": (good[:3], "too short"),
      "data truncated": (good[:-1], "data truncated"),
      "trailing bytes": (good + b"\x00", "trailing bytes"),
      "more dims declared than written": (
          idx_bytes(a, ndim=4),
          "data truncated",
      ),
      "empty file": (b"", "too short"),
  }


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_corrupt_file(tmp_path, gz, case):
  data, words = corrupt_cases()[case]
  path = write(tmp_path / "x", data, gz)
  with pytest.raises(IdxFormatError) as err:
    read_idx(path)
  assert words in one_line(err, path)


def test_declared_sizes_against_length(tmp_path):
  """The data-truncated message states the declared size and what is there."""
  a = np.zeros((3, 5, 7), np.uint8)
  path = write(tmp_path / "x", idx_bytes(a)[:-10])
  with pytest.raises(IdxFormatError) as err:
    read_idx(path)
  assert "shape (3, 5, 7) (105 bytes of uint8), only 95 bytes present" in (
      one_line(err, path)
  )


def test_expected_ndim(tmp_path):
  path = write(tmp_path / "x", idx_bytes(np.zeros((4, 2), np.uint8)))
  with pytest.raises(IdxFormatError) as err:
    read_idx(path, ndim=3)
  assert "declares 2 dimensions, expected 3" in one_line(err, path)


def gz_cases():
  payload = idx_bytes(np.arange(4000, dtype=np.uint8).reshape(40, 100) % 251)
  z = bytearray(gzip.compress(payload))
  bad_crc = bytearray(z)
  bad_crc[-8] ^= 0xFF  # the trailer's CRC32
  bad_length = bytearray(z)
  bad_length[-4] ^= 0xFF  # the trailer's ISIZE
  bad_deflate = bytearray(z)
  bad_deflate[12:20] = b"\xff" * 8
  bad_block = bytearray(z)
  bad_block[10] = 0x07  # first deflate block: BFINAL=1, BTYPE=11 (reserved)
  return {
      "truncated mid stream": (
          bytes(z[: len(z) // 2]),
          "gzip stream truncated",
      ),
      "trailer cut": (bytes(z[:-3]), "gzip"),
      "bad CRC": (bytes(bad_crc), "corrupt gzip stream: CRC check failed"),
      "bad length": (bytes(bad_length), "corrupt gzip stream"),
      "bad deflate data": (bytes(bad_deflate), "gzip"),
      "reserved block type (zlib.error)": (
          bytes(bad_block),
          "corrupt gzip stream: Error -3",
      ),
      "garbage after the gzip member": (
          bytes(z) + b"garbage!",
          "corrupt gzip stream",
      ),
      "only the gzip magic": (b"\x1f\x8b", "gzip"),
  }


@pytest.mark.parametrize("case", list(gz_cases()))
def test_corrupt_gzip(tmp_path, case):
  data, words = gz_cases()[case]
  path = write(tmp_path / "x.gz", data)
  with pytest.raises(IdxFormatError) as err:
    read_idx(path)
  assert words in one_line(err, path)


def test_second_gzip_member_is_trailing_data(tmp_path):
  a = np.zeros((2, 2), np.uint8)
  path = write(
      tmp_path / "x.gz", gzip.compress(idx_bytes(a)) + gzip.compress(b"\x01")
  )
  with pytest.raises(IdxFormatError, match="trailing bytes"):
    read_idx(path)


def test_gzip_is_recognised_by_content_not_name(tmp_path):
  a = np.arange(6, dtype=np.uint8).reshape(2, 3)
  gzipped_without_suffix = write(
      tmp_path / "plain_name", idx_bytes(a), gz=False
  )
  with open(gzipped_without_suffix, "wb") as f:
    f.write(gzip.compress(idx_bytes(a)))
  np.testing.assert_array_equal(read_idx(gzipped_without_suffix), a)
  plain_with_suffix = write(tmp_path / "x.gz", idx_bytes(a))
  np.testing.assert_array_equal(read_idx(plain_with_suffix), a)


def test_missing_file_and_directory(tmp_path):
  for path in (tmp_path / "nope", tmp_path):
    with pytest.raises(IdxFormatError) as err:
      read_idx(path)
    assert "cannot read" in one_line(err, path)


# ----------------------------------------------------------------------------
# read_images_and_labels: one split's pair of files


def write_split(
    folder, n=12, gz=True, images=None, labels=None, skip=(), hw=(28, 28)
):
  """Writes ``im`` / ``lb`` IDX files; returns the arrays written."""
  rng = np.random.default_rng(1)
  arrays = {
      "im": (
          rng.integers(0, 256, (n, *hw), dtype=np.uint8)
          if images is None
          else images
      ),
      "lb": (np.arange(n) % 10).astype(np.uint8) if labels is None else labels,
  }
  for stem, array in arrays.items():
    if stem not in skip:
      write(os.path.join(folder, stem), idx_bytes(array), gz)
  return arrays


def read_split(folder):
  return idx.read_images_and_labels(os.fspath(folder), "im", "lb", 10, (28, 28))


@pytest.mark.parametrize("gz", [False, True])
def test_read_images_and_labels(tmp_path, gz):
  arrays = write_split(tmp_path, gz=gz)
  images, labels = read_split(tmp_path)
  assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(images[..., 0], arrays["im"])
  np.testing.assert_array_equal(labels, arrays["lb"])


def test_labels_out_of_range(tmp_path):
  write_split(tmp_path, n=5, labels=np.array([0, 1, 10, 2, 3], np.uint8))
  with pytest.raises(IdxFormatError) as err:
    read_split(tmp_path)
  assert "label 10 at index 2 is outside [0, 10)" in one_line(
      err, tmp_path / "lb.gz"
  )


def test_count_mismatch(tmp_path):
  write_split(tmp_path, labels=np.zeros(11, np.uint8))
  with pytest.raises(IdxFormatError) as err:
    read_split(tmp_path)
  assert "11 labels but" in one_line(err, tmp_path / "lb.gz")
  assert "holds 12 images" in str(err.value)


def test_wrong_image_shape(tmp_path):
  write_split(tmp_path, hw=(32, 32))
  with pytest.raises(IdxFormatError) as err:
    read_split(tmp_path)
  assert "images are 32x32, expected 28x28" in one_line(err, tmp_path / "im.gz")


def test_labels_wrong_ndim_and_dtype(tmp_path):
  write_split(tmp_path, labels=np.zeros((12, 1), np.uint8))
  with pytest.raises(IdxFormatError, match="declares 2 dimensions, expected 1"):
    read_split(tmp_path)
  write_split(tmp_path, labels=np.zeros(12, np.int32))
  with pytest.raises(IdxFormatError, match="labels are int32, expected uint8"):
    read_split(tmp_path)


def test_missing_file(tmp_path):
  write_split(tmp_path, skip=("im",))
  with pytest.raises(IdxFormatError) as err:
    read_split(tmp_path)
  assert "im[.gz]: missing" in one_line(err, tmp_path / "im")
