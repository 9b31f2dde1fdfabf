"""--config=tfds:NAME: any prepared TFDS image-classification dataset, described from its files.

The datasets are prepared here by tiny builders (tests/tfds_fixture.py),
without TensorFlow; the arrays they wrote are what every read is checked
against, and the statistics against NumPy over the written images.
"""

import contextlib
import json
import os
import subprocess

import numpy as np
import pytest

import tfds_fixture
from conftest import TINY_RUN_OVERRIDES, main_in_process as run_in_process
from masc_jax import config_lib
from masc_jax.data import registry, tfds_source
from masc_jax.reporting import schema


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """``(data_dir, {name: {split: (images, labels)}})`` for every fixture dataset."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  make = lambda name, **kw: tfds_fixture.make_fixture(data_dir, name, **kw)
  data = {
      "masc_gray": make(
          "masc_gray",
          num_classes=10,
          image_shape=(32, 32, 1),
          splits={"train": 100, "test": 50},
      ),
      "masc_rgb": make(
          "masc_rgb",
          image_key="img",
          label_key="y",
          extra_label=("coarse_label", 2),
      ),
      "masc_no_test": make(
          "masc_no_test", splits={"train": 8, "validation": 4}
      ),
      "masc_not_images": make("masc_not_images", image_feature=False),
      "masc_two_labels": make(
          "masc_two_labels",
          extra_label=("coarse_label", 2),
          supervised_keys=False,
      ),
  }
  return data_dir, data


def test_described_from_the_files_and_read_back(
    prepared, monkeypatch, tmp_path
):
  monkeypatch.setenv("MASC_CACHE_DIR", str(tmp_path / "cache"))
  data_dir, data = prepared
  # Two ClassLabels: the supervised keys say which is the label.
  info = registry.dataset_info("tfds:masc_rgb", data_dir)
  assert registry.DATASETS["tfds:masc_rgb"] is info
  assert (info.num_classes, info.image_shape) == (4, (8, 8, 3))
  ds = registry.load_dataset("tfds:masc_rgb", data_dir)
  for split in ("train", "test"):
    images, labels = data["masc_rgb"][split]
    np.testing.assert_array_equal(getattr(ds, f"{split}_images"), images)
    np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), labels)
  pixels = data["masc_rgb"]["train"][0].astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(ds.std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)


def test_statistics_cached_beside_the_data_then_reused(
    prepared, monkeypatch, tmp_path
):
  monkeypatch.setenv("MASC_CACHE_DIR", str(tmp_path / "cache"))
  data_dir, data = prepared
  described = tfds_source.describe("masc_gray", data_dir)
  images = data["masc_gray"]["train"][0]
  mean, std, where = tfds_source.train_statistics(described, images)
  assert where == os.path.join(
      data_dir, "masc_gray", "1.0.0", "masc_stats.json"
  )
  record = json.loads(open(where).read())
  assert record["num_examples"] == 100 and record["mean"] == [float(mean[0])]
  # Read back without looking at the images; a record of another copy is not.
  again = tfds_source.train_statistics(described, images[:0])
  assert again[2] == where and np.array_equal(again[0], mean)
  record["info_sha256"] = "0" * 64
  with open(where, "w") as f:
    json.dump(record, f)
  fresh = tfds_source.train_statistics(described, images)
  np.testing.assert_array_equal(fresh[0], mean)
  assert json.loads(open(where).read())["info_sha256"] == described.info_sha256
  assert not (tmp_path / "cache").exists()


@contextlib.contextmanager
def read_only_copy(source, target):
  """``source`` copied onto a tmpfs at ``target`` that is then remounted read-only."""
  os.makedirs(target)
  mounted = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target)],
      capture_output=True,
  )
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
  try:
    subprocess.run(["cp", "-r", f"{source}/.", str(target)], check=True)
    # Without statistics an earlier test may have cached beside the source.
    for stats in target.glob(f"*/{tfds_source.STATS_FILE}"):
      stats.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
    yield target
  finally:
    subprocess.run(["umount", str(target)], check=True)


def test_statistics_go_to_the_user_cache_when_the_data_is_read_only(
    prepared, monkeypatch, tmp_path
):
  cache = tmp_path / "cache"
  monkeypatch.setenv("MASC_CACHE_DIR", str(cache))
  data_dir, data = prepared
  source = os.path.join(data_dir, "masc_rgb")
  with read_only_copy(source, tmp_path / "ro" / "masc_rgb"):
    ro_dir = str(tmp_path / "ro")
    described = tfds_source.describe("masc_rgb", ro_dir)
    images = data["masc_rgb"]["train"][0]
    mean, _, where = tfds_source.train_statistics(described, images)
    assert where.startswith(str(cache / "tfds_stats" / "masc_rgb-1.0.0-"))
    assert not os.path.exists(
        os.path.join(described.dataset_dir, "masc_stats.json")
    )
    assert tfds_source.train_statistics(described, images[:0])[2] == where
    # The same copy elsewhere is another dataset directory: its own entry.
    other = tfds_source.describe("masc_rgb", data_dir)
    assert tfds_source.statistics_locations(other)[1] != where


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["--config=tfds:nope", "--config.num_agents=2"],
            "tfds:nope: no prepared copy in",
        ),
        (["--config=tfds:nope"], "bash launch/prepare_data.sh tfds:nope"),
        (["--config=tfds"], "the tfds config needs a dataset name"),
        (
            ["--config=tfds:masc_gray", "--config.num_agents=3"],
            "num_agents=3 does not divide the 10 classes of tfds:masc_gray: "
            "use one of [1, 2, 5, 10]",
        ),
        (
            ["--config=tfds:masc_gray"],
            "num_agents is not set: pass --config.num_agents=K",
        ),
        (
            ["--config=tfds:masc_no_test", "--config.num_agents=2"],
            "tfds:masc_no_test has the splits ['train', 'validation'], but "
            "training needs a 'train' and a 'test' split (missing: test)",
        ),
        (
            ["--config=tfds:masc_not_images", "--config.num_agents=2"],
            "tfds:masc_not_images is not an image-classification dataset: no "
            "Image feature",
        ),
        (
            ["--config=tfds:masc_two_labels", "--config.num_agents=2"],
            "several ClassLabel features",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    prepared, tmp_path, capsys, argv, words
):
  data_dir, _ = prepared
  workdir = tmp_path / "run"
  status = run_in_process(
      [*argv, f"--config.data_dir={data_dir}", f"--workdir={workdir}"]
  )
  err = capsys.readouterr().err.strip()
  assert status == 2, err
  assert err.count("\n") == 0 and err.startswith("error: "), err
  assert words in err, err
  assert not workdir.exists()


def test_unprepared_data_dir_default(monkeypatch, tmp_path):
  """Without data_dir, $TFDS_DATA_DIR is searched, and the error names it."""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  config = config_lib.load_config("tfds:masc_gray", ["num_agents=2"])
  with pytest.raises(config_lib.ConfigError, match=f"directory {tmp_path};"):
    config_lib.validate(config)


def test_workdir_name_is_one_folder():
  assert config_lib.config_name("tfds:svhn_cropped") == "tfds_svhn_cropped"
  assert (
      config_lib.config_name("tfds:emnist/letters:3.1.0")
      == "tfds_emnist_letters_3.1.0"
  )


def test_end_to_end(prepared, tmp_path, capsys):
  """``python -m masc_jax.main --config=tfds:NAME --config.data_dir=DIR``, run in this process.

  The statistics are cached beside the data first, with Fashion-MNIST's
  values: the run must take them from there, and its programs are then those
  of tests/test_fashion_mnist.py's run (same shapes, same constants), which
  the session's compilation cache already holds.
  """
  data_dir, data = prepared
  described = tfds_source.describe("masc_gray", data_dir)
  fashion = registry.DATASETS["fashion_mnist"]
  stats = os.path.join(described.dataset_dir, tfds_source.STATS_FILE)
  with open(stats, "w") as f:
    json.dump(
        {
            "format": tfds_source.STATS_FORMAT,
            "info_sha256": described.info_sha256,
            "num_examples": 100,
            "mean": list(fashion.mean),
            "std": list(fashion.std),
        },
        f,
    )
  workdir = tmp_path / "run"
  status = run_in_process(
      [
          "--config=tfds:masc_gray",
          f"--config.data_dir={data_dir}",
          "--config.num_agents=5",
          f"--workdir={workdir}",
          *[f"--config.{o}" for o in TINY_RUN_OVERRIDES],
      ]
  )
  assert status == 0, capsys.readouterr().err[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  (member,) = results["members"]  # seeds=0: a population of one
  k, rows, _ = schema.validate(member)
  assert k == 5 and results["config"]["dataset"] == "tfds:masc_gray"
  assert member["class_groups"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
  for row in rows.values():
    for values in row.values():
      assert np.all((values >= 0) & (values <= 1))
  ds = registry.load_dataset("tfds:masc_gray", data_dir)
  np.testing.assert_array_equal(ds.mean, np.float32(fashion.mean))
  np.testing.assert_array_equal(ds.train_images, data["masc_gray"]["train"][0])
