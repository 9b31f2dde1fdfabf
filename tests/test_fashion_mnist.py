"""--config=fashion_mnist: where the data comes from, padding, corrupt files, one run end to end.

The data is a small synthetic slice written here as IDX files (CI does not
install the Debian package), and a TFDS ``fashion_mnist`` prepared by a tiny
builder (tests/tfds_fixture.py).
"""

import gzip
import json
import os
import struct

import numpy as np
import pytest

from conftest import TINY_RUN_OVERRIDES, run_main, main_in_process as run_in_process
from masc_jax import config_lib
from masc_jax.data import arrays, fashion_mnist, registry
from masc_jax.reporting import schema

NUM_TRAIN, NUM_TEST = 100, 50  # 10 and 5 per class: 20 train images per agent


def idx_bytes(array: np.ndarray) -> bytes:
  """uint8 array -> IDX bytes (type code 0x08), written by hand."""
  header = struct.pack(">HBB", 0, 0x08, array.ndim)
  return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion(folder, gz=True, seed=0, num_train=NUM_TRAIN):
  """The four Fashion-MNIST IDX files with random 28x28 images; returns the arrays."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays_written = {}
  for split, n in (("train", num_train), ("test", NUM_TEST)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for what, array in (("images", images), ("labels", labels)):
      data = idx_bytes(array)
      name = fashion_mnist.FILES[(split, what)] + (".gz" if gz else "")
      with open(os.path.join(folder, name), "wb") as f:
        f.write(gzip.compress(data) if gz else data)
    arrays_written[split] = images, labels
  return arrays_written


def padded(images: np.ndarray) -> np.ndarray:
  """[N, 28, 28] -> [N, 32, 32, 1], built by slicing into zeros."""
  out = np.zeros((images.shape[0], 32, 32, 1), np.uint8)
  out[:, 2:30, 2:30, 0] = images
  return out


@pytest.fixture
def no_default_sources(tmp_path, monkeypatch):
  """No TFDS copy in the default TFDS dir, no Debian folder: only what a test adds."""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "default_tfds"))
  monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "debian"))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_as_data_dir_padded_to_32(tmp_path, no_default_sources, gz):
  written = write_fashion(tmp_path / "idx", gz=gz)
  ds = registry.load_dataset("fashion_mnist", str(tmp_path / "idx"))
  for split, images, labels in (
      ("train", ds.train_images, ds.train_labels),
      ("test", ds.test_images, ds.test_labels),
  ):
    np.testing.assert_array_equal(images, padded(written[split][0]))
    np.testing.assert_array_equal(labels, written[split][1])
  assert ds.image_shape == registry.DATASETS["fashion_mnist"].image_shape
  # The table's statistics, not those of the loaded (random) images.
  np.testing.assert_array_equal(ds.mean, np.float32([0.2860]))
  np.testing.assert_array_equal(ds.std, np.float32([0.3530]))


def test_table_statistics_are_the_unpadded_train_split_of_the_real_files():
  """The table's mean / std are those of the Debian files' train split, before padding."""
  if not os.path.isdir(fashion_mnist.DEBIAN_DIR):
    pytest.skip("needs apt-get install dataset-fashion-mnist")
  with gzip.open(
      os.path.join(fashion_mnist.DEBIAN_DIR, "train-images-idx3-ubyte.gz")
  ) as f:
    counts = np.bincount(np.frombuffer(f.read()[16:], np.uint8), minlength=256)
  assert counts.sum() == 60000 * 28 * 28
  values = np.arange(256) / 255.0
  mean = (counts * values).sum() / counts.sum()
  std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
  info = registry.DATASETS["fashion_mnist"]
  np.testing.assert_allclose(info.mean, [mean], atol=5e-5)
  np.testing.assert_allclose(info.std, [std], atol=5e-5)


def test_search_order(tmp_path, no_default_sources, monkeypatch):
  """data_dir, else a TFDS copy in the default TFDS dir, else the Debian folder."""
  import tfds_fixture

  debian = write_fashion(tmp_path / "debian", seed=1)
  located = fashion_mnist.locate(None)
  assert (located.kind, located.folder) == ("idx", str(tmp_path / "debian"))
  ds = registry.load_dataset("fashion_mnist")
  np.testing.assert_array_equal(ds.test_images, padded(debian["test"][0]))

  # A prepared TFDS copy in the default TFDS dir comes first.
  fixture = tfds_fixture.make_fixture(
      str(tmp_path / "default_tfds"),
      "fashion_mnist",
      version="3.0.1",
      num_classes=10,
      image_shape=(28, 28, 1),
      splits={"train": 30, "test": 20},
  )
  assert fashion_mnist.locate(None).kind == "tfds"
  ds = registry.load_dataset("fashion_mnist")
  np.testing.assert_array_equal(
      ds.train_images, padded(fixture["train"][0][..., 0])
  )
  np.testing.assert_array_equal(ds.train_labels, fixture["train"][1])

  # data_dir comes before both: a folder of IDX files, or a TFDS data dir.
  given = write_fashion(tmp_path / "given", seed=2)
  ds = registry.load_dataset("fashion_mnist", str(tmp_path / "given"))
  np.testing.assert_array_equal(ds.train_images, padded(given["train"][0]))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "elsewhere"))
  located = fashion_mnist.locate(str(tmp_path / "default_tfds"))
  assert (located.kind, located.folder) == (
      "tfds",
      str(tmp_path / "default_tfds"),
  )


def test_nothing_found_says_how_to_get_it(tmp_path, no_default_sources):
  with pytest.raises(arrays.DatasetNotPreparedError) as err:
    registry.check_dataset_available("fashion_mnist")
  message = str(err.value)
  assert "\n" not in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert "bash launch/prepare_data.sh fashion_mnist" in message
  # A data_dir that holds neither is not silently replaced by another source.
  write_fashion(tmp_path / "debian")
  (tmp_path / "empty").mkdir()
  with pytest.raises(arrays.DatasetNotPreparedError) as err:
    registry.check_dataset_available("fashion_mnist", str(tmp_path / "empty"))
  assert f"data_dir={tmp_path / 'empty'} holds neither" in str(err.value)


def corrupt(folder, case: str) -> str:
  """Damages one file of a written folder; returns the damaged file's name."""
  name = {
      "truncated gzip": "train-images-idx3-ubyte.gz",
      "bad CRC": "t10k-labels-idx1-ubyte.gz",
      "label out of range": "train-labels-idx1-ubyte.gz",
      "missing file": "t10k-images-idx3-ubyte.gz",
  }[case]
  path = os.path.join(folder, name)
  data = open(path, "rb").read()
  if case == "truncated gzip":
    data = data[: len(data) // 2]
  elif case == "bad CRC":
    data = data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]
  elif case == "label out of range":
    labels = np.arange(NUM_TRAIN, dtype=np.uint8) % 10
    labels[7] = 10
    data = gzip.compress(idx_bytes(labels))
  if case == "missing file":
    os.remove(path)
  else:
    with open(path, "wb") as f:
      f.write(data)
  return name


@pytest.mark.parametrize(
    "case, words",
    [
        ("truncated gzip", "gzip stream truncated"),
        ("bad CRC", "corrupt gzip stream: CRC check failed"),
        ("label out of range", "label 10 at index 7 is outside [0, 10)"),
        ("missing file", "missing"),
    ],
)
def test_a_corrupt_file_is_one_line_and_exit_2(
    tmp_path, capsys, no_default_sources, case, words
):
  write_fashion(tmp_path / "idx")
  name = corrupt(tmp_path / "idx", case)
  workdir = tmp_path / "run"
  status = run_in_process(
      [
          "--config=fashion_mnist",
          f"--config.data_dir={tmp_path / 'idx'}",
          f"--workdir={workdir}",
          *[f"--config.{o}" for o in TINY_RUN_OVERRIDES],
      ]
  )
  err = capsys.readouterr().err.strip()
  assert status == 2
  assert err.count("\n") == 0 and err.startswith("error: "), err
  assert words in err and name.split(".")[0] in err, err
  assert not workdir.exists()


def test_no_data_is_one_line_and_exit_2(tmp_path, capsys, no_default_sources):
  workdir = tmp_path / "run"
  status = run_in_process(["--config=fashion_mnist", f"--workdir={workdir}"])
  err = capsys.readouterr().err.strip()
  assert status == 2 and err.count("\n") == 0, err
  assert "apt-get install dataset-fashion-mnist" in err
  assert not workdir.exists()


def test_configs():
  small = config_lib.load_config("fashion_mnist")
  spec = config_lib.load_config("fashion_mnist:spec")
  for config in (small, spec):
    config_lib.validate(config)
    assert (config.dataset, config.num_agents) == ("fashion_mnist", 5)
    assert len(config.model.pool_after) == 5  # 32 -> 1
  assert small.seeds == "0,1,2"
  assert tuple(spec.model.expert_widths) == (
      64,
      64,
      64,
      64,
      128,
      128,
      128,
      256,
      256,
      256,
      256,
      256,
      256,
  )
  assert tuple(spec.model.head_hidden) == (1024, 1024)
  assert (
      spec.epochs.experts,
      spec.epochs.collective,
      spec.epochs.altruism,
  ) == (
      100,
      100,
      100,
  )
  with pytest.raises(config_lib.ConfigError, match="fashion_mnist"):
    config_lib.load_config("fashion_mnist:nope")


def test_end_to_end(tmp_path):
  """``python -m masc_jax.main --config=fashion_mnist`` on IDX files in data_dir."""
  write_fashion(tmp_path / "idx", gz=False)
  workdir = tmp_path / "run"
  env = {"TFDS_DATA_DIR": str(tmp_path / "no_tfds")}
  result = run_main(
      [
          "--config=fashion_mnist",
          f"--config.data_dir={tmp_path / 'idx'}",
          f"--workdir={workdir}",
          *[f"--config.{o}" for o in TINY_RUN_OVERRIDES],
      ],
      env_extra=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  (member,) = results["members"]  # seeds=0: a population of one
  k, rows, _ = schema.validate(member)
  assert k == 5
  assert member["class_groups"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
  # No ablation stages: no RA-only row (CC only is the collective alone).
  assert set(member["rows"]) == {"before_growth", "after_growth", "cc_only"}
  for row in rows.values():
    for values in row.values():
      assert np.all((values >= 0) & (values <= 1))
  assert results["config"]["dataset"] == "fashion_mnist"
  # Each agent's 20 train images in batches of 8: 2 steps per epoch.
  assert results["timings"]["experts"]["steps"] == 2
  assert results["timings"]["collective"]["steps"] == NUM_TRAIN // 8
