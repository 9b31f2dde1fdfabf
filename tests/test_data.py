"""Tests for masc_jax.data.registry (datasets, the dataset table) and masc_jax.data.batches (class groups, batch indices)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import sys
from unittest import mock

import numpy as np
import pytest

from masc_jax.data import batches, arrays, registry

# ----------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> arrays.ArrayDataset:
  return registry.load_dataset("digits")


def test_digits_shapes_dtypes_split(digits: arrays.ArrayDataset) -> None:
  from sklearn.datasets import load_digits

  raw = load_digits()
  assert digits.name == "digits"
  assert digits.num_classes == 10
  assert digits.train_images.shape == (1297, 8, 8, 1)
  assert digits.test_images.shape == (500, 8, 8, 1)
  assert digits.image_shape == (8, 8, 1)
  assert digits.train_images.dtype == np.uint8
  assert digits.test_images.dtype == np.uint8
  assert digits.train_labels.dtype == np.int32
  assert digits.test_labels.dtype == np.int32
  assert set(np.unique(digits.train_labels)) == set(range(10))
  assert set(np.unique(digits.test_labels)) == set(range(10))
  # The split is a partition of sklearn's images: the multiset of (image,
  # label) pairs of train + test equals the original one.
  expected = np.round(raw.images * 255.0 / 16.0).astype(np.uint8)
  key = lambda imgs, labs: sorted(  # noqa: E731
      (int(l), img.tobytes()) for img, l in zip(imgs, labs)
  )
  got = key(digits.train_images[..., 0], digits.train_labels) + key(
      digits.test_images[..., 0], digits.test_labels
  )
  assert sorted(got) == key(expected, raw.target)
  # Stratified: each class's test share is within one image of proportional.
  for c in range(10):
    n_c = int((raw.target == c).sum())
    assert abs(int((digits.test_labels == c).sum()) - 500 * n_c / 1797) < 1
  # mean / std: per channel, of train pixels / 255.
  scaled = digits.train_images.astype(np.float64) / 255.0
  np.testing.assert_allclose(digits.mean, [scaled.mean()], rtol=1e-6)
  np.testing.assert_allclose(digits.std, [scaled.std()], rtol=1e-6)
  assert digits.mean.dtype == np.float32 and digits.std.dtype == np.float32


def test_digits_deterministic(digits: arrays.ArrayDataset) -> None:
  again = registry.load_dataset("digits")
  for field in (
      "train_images",
      "train_labels",
      "test_images",
      "test_labels",
      "mean",
      "std",
  ):
    np.testing.assert_array_equal(getattr(digits, field), getattr(again, field))


def test_dataset_arrays_read_only(digits: arrays.ArrayDataset) -> None:
  with pytest.raises(ValueError):
    digits.train_labels[0] = 1


def test_digits_always_available() -> None:
  registry.check_dataset_available("digits", data_dir="/nonexistent")


def test_unknown_dataset_name() -> None:
  with pytest.raises(
      ValueError,
      match=r"'imagenet'.*cifar100, cifar10, fashion_mnist, digits, or tfds:NAME",
  ):
    registry.load_dataset("imagenet")
  with pytest.raises(ValueError, match="imagenet"):
    registry.check_dataset_available("imagenet")


def test_dataset_table() -> None:
  assert [n for n in registry.DATASETS if not registry.is_tfds_name(n)] == [
      "cifar100",
      "cifar10",
      "fashion_mnist",
      "digits",
  ]
  for name, info in registry.DATASETS.items():
    assert info.name == name
    assert len(info.image_shape) == 3
    if info.mean is not None:
      assert (
          info.std is not None
          and len(info.mean) == len(info.std) == info.image_shape[2]
      )
  assert (
      registry.DATASETS["cifar100"].num_classes,
      registry.DATASETS["cifar100"].image_shape,
  ) == (100, (32, 32, 3))
  assert (
      registry.DATASETS["cifar10"].num_classes,
      registry.DATASETS["cifar10"].image_shape,
  ) == (10, (32, 32, 3))
  digits_info = registry.DATASETS["digits"]
  assert (digits_info.num_classes, digits_info.image_shape) == (10, (8, 8, 1))
  assert (
      digits_info.mean is None
      and digits_info.std is None
      and digits_info.source == "sklearn"
  )
  assert {registry.DATASETS[n].source for n in ("cifar100", "cifar10")} == {
      "tfds"
  }
  fashion = registry.DATASETS["fashion_mnist"]
  assert (fashion.num_classes, fashion.image_shape, fashion.source) == (
      10,
      (32, 32, 1),
      "idx",
  )


def test_digits_matches_table(digits: arrays.ArrayDataset) -> None:
  info = registry.DATASETS["digits"]
  assert digits.image_shape == info.image_shape
  assert digits.num_classes == info.num_classes


def test_table_mismatch_is_an_error(monkeypatch) -> None:
  wrong = dataclasses.replace(
      registry.DATASETS["digits"], image_shape=(8, 8, 3)
  )
  monkeypatch.setitem(registry.DATASETS, "digits", wrong)
  with pytest.raises(
      RuntimeError,
      match=r"digits.*does not match the dataset table.*\(8, 8, 1\).*\(8, 8, 3\)",
  ):
    registry.load_dataset("digits")
  fewer = dataclasses.replace(
      registry.DATASETS["digits"], image_shape=(8, 8, 1), num_classes=5
  )
  monkeypatch.setitem(registry.DATASETS, "digits", fewer)
  with pytest.raises(
      RuntimeError, match=r"labels span \[0, 9\], outside \[0, 5\)"
  ):
    registry.load_dataset("digits")


def test_data_import_is_light() -> None:
  """Config validation reads DATASETS: importing data must not pull in jax / TFDS."""
  import subprocess

  code = (
      "import sys, masc_jax.data.registry, masc_jax.data.batches; "
      "heavy = {'jax', 'tensorflow_datasets', 'sklearn'} & set(sys.modules); "
      "assert not heavy, heavy"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------
# class groups


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize(
    "num_classes,num_agents", [(100, 4), (10, 5), (10, 1), (6, 6)]
)
def test_make_class_groups_partition(
    num_classes: int, num_agents: int, seed: int | None
) -> None:
  g = batches.make_class_groups(num_classes, num_agents, permutation_seed=seed)
  m = num_classes // num_agents
  assert g.groups.shape == (num_agents, m) and g.groups.dtype == np.int32
  assert (
      g.class_owner.shape == (num_classes,) and g.class_owner.dtype == np.int32
  )
  assert (g.num_agents, g.classes_per_agent, g.num_classes) == (
      num_agents,
      m,
      num_classes,
  )
  # Disjoint and covering: the concatenation is a permutation of 0..C-1.
  assert sorted(g.groups.ravel().tolist()) == list(range(num_classes))
  # class_owner, recomputed independently by searching the groups.
  for c in range(num_classes):
    owners = [k for k in range(num_agents) if c in set(g.groups[k].tolist())]
    assert owners == [int(g.class_owner[c])]


def test_make_class_groups_label_order() -> None:
  g = batches.make_class_groups(100, 4)
  for k in range(4):
    assert g.groups[k].tolist() == list(range(25 * k, 25 * k + 25))


def test_make_class_groups_permutation() -> None:
  default = batches.make_class_groups(100, 4)
  a = batches.make_class_groups(100, 4, permutation_seed=1)
  b = batches.make_class_groups(100, 4, permutation_seed=1)
  c = batches.make_class_groups(100, 4, permutation_seed=2)
  np.testing.assert_array_equal(a.groups, b.groups)
  assert not np.array_equal(a.groups, default.groups)
  assert not np.array_equal(a.groups, c.groups)


@pytest.mark.parametrize(
    "num_classes,num_agents,pattern",
    [
        (
            100,
            3,
            r"num_classes=100 is not divisible by num_agents=3.*1, 2, 4, 5, 10, 20, 25, 50, 100",
        ),
        (10, 0, r"num_agents must be >= 1; got 0"),
        (0, 1, r"num_classes must be >= 1; got 0"),
        (10, 20, r"num_classes=10 is not divisible by num_agents=20"),
    ],
)
def test_make_class_groups_bad(
    num_classes: int, num_agents: int, pattern: str
) -> None:
  with pytest.raises(ValueError, match=pattern):
    batches.make_class_groups(num_classes, num_agents)


def test_agent_indices_digits(digits: arrays.ArrayDataset) -> None:
  groups = batches.make_class_groups(10, 5)
  per_agent = batches.agent_indices(digits.train_labels, groups)
  assert len(per_agent) == 5
  for k, ix in enumerate(per_agent):
    assert ix.dtype == np.int64
    assert np.all(np.diff(ix) > 0)  # sorted, no duplicates
    # Independent recomputation: samples whose label is in group k.
    expected = [
        i
        for i, y in enumerate(digits.train_labels)
        if y in set(groups.groups[k].tolist())
    ]
    assert ix.tolist() == expected
  union = np.concatenate(per_agent)
  assert sorted(union.tolist()) == list(range(digits.train_labels.shape[0]))


def test_agent_indices_bad_labels() -> None:
  groups = batches.make_class_groups(10, 5)
  with pytest.raises(
      ValueError, match=r"label 12 \(at index 2\) is outside \[0, 10\)"
  ):
    batches.agent_indices(np.array([0, 3, 12, 1]), groups)
  with pytest.raises(ValueError, match=r"label -1"):
    batches.agent_indices(np.array([-1, 3]), groups)
  with pytest.raises(ValueError, match="1-D integer"):
    batches.agent_indices(np.array([0.5, 1.0]), groups)


# ----------------------------------------------------------------------------
# batches


def _toy_agents() -> list[np.ndarray]:
  # Unequal agent sizes, disjoint index sets (like agent_indices returns).
  rng = np.random.default_rng(123)
  perm = rng.permutation(300)
  return [np.sort(perm[:70]), np.sort(perm[70:170]), np.sort(perm[170:300])]


def test_agent_batches_shape_membership_no_repeats() -> None:
  agents = _toy_agents()
  agent_batches = batches.AgentBatches(agents, batch_size=8, seed=0)
  assert agent_batches.steps_per_epoch == 70 // 8
  for epoch in range(2):
    seen = [[] for _ in agents]
    for step in range(
        epoch * agent_batches.steps_per_epoch,
        (epoch + 1) * agent_batches.steps_per_epoch,
    ):
      b = agent_batches.indices(step)
      assert b.shape == (3, 8) and b.dtype == np.int32
      for k in range(3):
        assert set(b[k].tolist()) <= set(agents[k].tolist())
        seen[k].extend(b[k].tolist())
    for k in range(3):
      assert len(seen[k]) == len(set(seen[k]))  # no repeats within an epoch
    # The smallest agent's epoch covers all but its remainder.
    assert len(set(seen[0])) == agent_batches.steps_per_epoch * 8


def test_agent_batches_resume_and_seeds() -> None:
  agents = _toy_agents()
  spe = batches.AgentBatches(agents, 8, seed=5).steps_per_epoch
  total = 3 * spe + 2
  reference = batches.AgentBatches(agents, 8, seed=5)
  straight = [reference.indices(s) for s in range(total)]
  # Fresh objects resumed at arbitrary steps (mid-epoch, epoch boundary, and
  # going backwards) reproduce the uninterrupted run.
  for start in (spe + 3, 2 * spe, 1):
    resumed = batches.AgentBatches(agents, 8, seed=5)
    for s in range(start, total):
      np.testing.assert_array_equal(resumed.indices(s), straight[s])
  np.testing.assert_array_equal(reference.indices(0), straight[0])
  # Epochs reshuffle, and other seeds give other batches.
  assert not np.array_equal(straight[0], straight[spe])
  other = batches.AgentBatches(agents, 8, seed=6)
  assert not np.array_equal(
      np.stack([other.indices(s) for s in range(spe)]), np.stack(straight[:spe])
  )
  # Returned arrays are copies: mutating one does not corrupt the cache.
  straight[1][:] = -1
  assert np.all(reference.indices(1) >= 0)


def test_agent_batches_too_small_agent() -> None:
  agents = [np.arange(40), np.arange(40, 45), np.arange(45, 90)]
  with pytest.raises(
      ValueError,
      match=r"agent 1 has 5 training samples, fewer than batch_size=8",
  ):
    batches.AgentBatches(agents, batch_size=8, seed=0)


def test_batches_bad_args() -> None:
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    batches.AgentBatches([np.arange(10)], batch_size=0, seed=0)
  with pytest.raises(ValueError, match="seed must be a non-negative"):
    batches.PooledBatches(np.arange(10), batch_size=2, seed=-1)
  with pytest.raises(ValueError, match="step must be >= 0"):
    batches.PooledBatches(np.arange(10), batch_size=2, seed=0).indices(-1)


def test_pooled_batches() -> None:
  pool = np.concatenate(_toy_agents())
  pooled = batches.PooledBatches(pool, batch_size=32, seed=1)
  assert pooled.steps_per_epoch == 300 // 32
  spe = pooled.steps_per_epoch
  straight = [pooled.indices(s) for s in range(2 * spe + 3)]
  for epoch in range(2):
    epoch_ix = np.concatenate(straight[epoch * spe : (epoch + 1) * spe])
    assert (
        straight[epoch * spe].shape == (32,) and straight[0].dtype == np.int32
    )
    assert len(set(epoch_ix.tolist())) == spe * 32  # no repeats
    assert set(epoch_ix.tolist()) <= set(pool.tolist())
  resumed = batches.PooledBatches(pool, batch_size=32, seed=1)
  for s in (2 * spe + 2, spe + 1, 0):
    np.testing.assert_array_equal(resumed.indices(s), straight[s])
  assert not np.array_equal(straight[0], straight[spe])
  other = batches.PooledBatches(pool, batch_size=32, seed=2)
  assert not np.array_equal(other.indices(0), straight[0])
  with pytest.raises(
      ValueError, match=r"the pool has 10 samples, fewer than batch_size=32"
  ):
    batches.PooledBatches(np.arange(10), batch_size=32, seed=0)


@pytest.mark.parametrize(
    "sizes,bs,expected",
    [
        (
            (100, 100, 100),
            32,
            (11, 11, 10),
        ),  # 10.67 each: the two largest remainders, lower first
        ((50, 150), 8, (2, 6)),  # exact shares
        ((10, 20, 30), 4, (1, 1, 2)),  # 0.67, 1.33, 2.0
        (
            (1, 1, 1, 1),
            2,
            (1, 1, 0, 0),
        ),  # fewer images than agents: some groups are empty
    ],
)
def test_owner_batch_sizes_by_hand(sizes, bs, expected) -> None:
  assert batches.owner_batch_sizes(sizes, bs) == expected
  with pytest.raises(ValueError, match="positive counts"):
    batches.owner_batch_sizes((3, 0), 2)


def test_owner_batches() -> None:
  agents = [
      np.arange(0, 40),
      np.arange(100, 170),
      np.arange(200, 230),
  ]  # 40, 70 and 30 images
  owner = batches.OwnerBatches(agents, batch_size=10, seed=1)
  assert (
      owner.group_sizes
      == batches.owner_batch_sizes((40, 70, 30), 10)
      == (3, 5, 2)
  )
  assert owner.steps_per_epoch == 140 // 10
  steps = 30  # agent 2 wraps its stream twice
  straight = [owner.indices(s) for s in range(steps)]
  bounds = np.cumsum((0,) + owner.group_sizes)
  for k, ix in enumerate(agents):
    # Each batch's k-th group is agent k's; its stream visits every image once per pass.
    stream = np.concatenate([b[bounds[k] : bounds[k + 1]] for b in straight])
    assert set(stream.tolist()) <= set(ix.tolist())
    for start in range(0, len(stream) - len(ix) + 1, len(ix)):
      assert sorted(stream[start : start + len(ix)].tolist()) == ix.tolist()
  assert straight[0].shape == (10,) and straight[0].dtype == np.int32
  resumed = batches.OwnerBatches(agents, batch_size=10, seed=1)
  for s in (29, 7, 0, 15):
    np.testing.assert_array_equal(resumed.indices(s), straight[s])
  other = batches.OwnerBatches(agents, batch_size=10, seed=2)
  assert not np.array_equal(other.indices(0), straight[0])
  with pytest.raises(
      ValueError, match=r"the pool has 3 samples, fewer than batch_size=4"
  ):
    batches.OwnerBatches([np.arange(2), np.arange(2, 3)], batch_size=4, seed=0)


def test_batch_order_pinned() -> None:
  """The RNG streams are part of the contract: these values were produced
  before the class-group / batch code moved to masc_jax.data.batches."""
  ab = batches.AgentBatches([np.arange(10), np.arange(10, 30)], 4, seed=3)
  assert ab.indices(0).tolist() == [[9, 6, 0, 2], [21, 11, 13, 18]]
  assert ab.indices(ab.steps_per_epoch + 1).tolist() == [
      [4, 6, 1, 2],
      [27, 12, 21, 16],
  ]
  pb = batches.PooledBatches(np.arange(50), 5, seed=3)
  assert pb.indices(0).tolist() == [49, 24, 32, 25, 27]
  assert pb.indices(pb.steps_per_epoch).tolist() == [4, 30, 3, 22, 34]
  assert batches.make_class_groups(
      6, 3, permutation_seed=4
  ).groups.tolist() == [[1, 2], [0, 5], [3, 4]]


@pytest.mark.parametrize("n,bs", [(10, 4), (12, 4), (3, 8), (1, 1), (0, 5)])
def test_eval_batches(n: int, bs: int) -> None:
  out = list(batches.eval_batches(n, bs))
  assert len(out) == -(-n // bs)
  covered = []
  for i, (ix, valid) in enumerate(out):
    assert ix.shape == (bs,) and ix.dtype == np.int32
    expected_valid = min(bs, n - i * bs)
    assert valid == expected_valid
    assert np.all((ix >= 0) & (ix < n))
    covered.extend(ix[:valid].tolist())
  assert covered == list(range(n))


# ----------------------------------------------------------------------------
# CIFAR through TFDS


def test_cifar100_via_tfds_mock_data() -> None:
  """The CIFAR read path under `tfds.testing.mock_data` (random records).

  mock_data replaces `ArrayRecordDataSource` with a MagicMock whose batched
  `__getitems__` is assigned as a plain attribute (MagicMock only binds the
  magic methods it knows, and `__getitems__` is not one), so in TFDS 4.9.10
  it is called without its `self` argument and raises TypeError. We patch the
  module-level `_getitems` helper that mock_data wraps with a version that
  accepts either calling convention; everything else (tfds.data_source,
  TFDS's own ArrayRecordDataSource wrapper, our chunked reader) runs as is.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  def getitems(*args, generator, serialized=False):
    assert not serialized
    return [generator[key] for key in args[-1]]

  num_examples = 37
  with (
      mock.patch.object(mocking, "_getitems", getitems),
      tfds.testing.mock_data(num_examples=num_examples),
  ):
    ds = registry.load_dataset("cifar100", data_dir="/unused/under/mock_data")
    registry.check_dataset_available(
        "cifar100", data_dir="/unused/under/mock_data"
    )
  assert ds.name == "cifar100" and ds.num_classes == 100
  for images, labels in (
      (ds.train_images, ds.train_labels),
      (ds.test_images, ds.test_labels),
  ):
    assert (
        images.shape == (num_examples, 32, 32, 3) and images.dtype == np.uint8
    )
    assert labels.shape == (num_examples,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 100
  assert ds.image_shape == (32, 32, 3)
  assert (
      ds.mean.shape == (3,)
      and ds.std.shape == (3,)
      and ds.mean.dtype == np.float32
  )
  assert "tensorflow" not in sys.modules


def test_cifar_table_mismatch_under_mock_data(monkeypatch) -> None:
  """Records whose images do not have the table's shape are a clear error."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  def getitems(*args, generator, serialized=False):
    return [generator[key] for key in args[-1]]

  wrong = dataclasses.replace(
      registry.DATASETS["cifar100"], image_shape=(28, 28, 3)
  )
  monkeypatch.setitem(registry.DATASETS, "cifar100", wrong)
  with (
      mock.patch.object(mocking, "_getitems", getitems),
      tfds.testing.mock_data(num_examples=5),
  ):
    with pytest.raises(
        arrays.DatasetNotPreparedError,
        match=r"cifar100 train.*\(32, 32, 3\).*\(28, 28, 3\)",
    ):
      registry.load_dataset("cifar100", data_dir="/unused/under/mock_data")


@pytest.fixture
def prepared_fake_cifar100(tmp_path):
  """A real (tiny, synthetic) cifar100 array_record directory written by TFDS.

  Unlike mock_data this exercises the real on-disk path: array_record files,
  tf.Example parsing and PNG decoding, all without TensorFlow. TFDS's own
  writer is fed synthetic examples by replacing the builder's download step.
  """
  import PIL.Image
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import cifar

  rng = np.random.default_rng(0)
  made = {"train": [], "test": []}

  def examples(split, n):
    for i in range(n):
      image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      label = int(rng.integers(0, 100))
      made[split].append((image, label))
      yield i, {
          "id": f"{split}_{i:05d}",
          # A PIL image: encoding a NumPy image would need TensorFlow.
          "image": PIL.Image.fromarray(image),
          "label": label,
          "coarse_label": label // 5,
      }

  def split_generators(self, dl_manager):
    return {"train": examples("train", 23), "test": examples("test", 9)}

  patches = [
      mock.patch.object(cifar.Cifar100, "_split_generators", split_generators)
  ]
  try:
    importlib.import_module("importlib_resources")
  except ImportError:
    # The venv lacks the `importlib_resources` backport that etils needs
    # when a builder locates its checksums; the stdlib module provides the
    # same `abc.Traversable` it looks up.
    patches.append(
        mock.patch.dict(
            sys.modules, {"importlib_resources": importlib.resources}
        )
    )
  for p in patches:
    p.start()
  try:
    tfds.builder(
        "cifar100", data_dir=tmp_path, file_format="array_record"
    ).download_and_prepare()
  finally:
    for p in reversed(patches):
      p.stop()
  return tmp_path, made


def test_cifar100_real_array_record_roundtrip(prepared_fake_cifar100) -> None:
  data_dir, made = prepared_fake_cifar100
  registry.check_dataset_available("cifar100", data_dir=data_dir)
  ds = registry.load_dataset("cifar100", data_dir=data_dir)
  for split, images, labels in (
      ("train", ds.train_images, ds.train_labels),
      ("test", ds.test_images, ds.test_labels),
  ):
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    # TFDS shuffles records on write: compare as multisets of (label, pixels).
    got = sorted((int(l), img.tobytes()) for img, l in zip(images, labels))
    assert got == sorted((l, img.tobytes()) for img, l in made[split])
  np.testing.assert_allclose(ds.mean, [0.5071, 0.4865, 0.4409])
  np.testing.assert_allclose(ds.std, [0.2673, 0.2564, 0.2762])
  assert "tensorflow" not in sys.modules


def test_cifar100_env_var_data_dir(prepared_fake_cifar100, monkeypatch) -> None:
  data_dir, made = prepared_fake_cifar100
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  ds = registry.load_dataset("cifar100")
  assert ds.train_images.shape[0] == len(made["train"])


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_missing_dataset(name: str, tmp_path) -> None:
  for fn in (registry.load_dataset, registry.check_dataset_available):
    with pytest.raises(arrays.DatasetNotPreparedError) as info:
      fn(name, data_dir=tmp_path)
    message = str(info.value)
    assert "TFDS_DATA_DIR" in message and "--config=digits" in message
    assert (
        f"bash launch/prepare_data.sh {name}" in message
        and str(tmp_path) in message
    )
    # No chained TFDS traceback: its words are in the message instead.
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_prepared_but_missing_shard(prepared_fake_cifar100) -> None:
  data_dir, _ = prepared_fake_cifar100
  (shard,) = data_dir.glob("cifar100/*/cifar100-train.array_record*")
  shard.unlink()
  for fn in (registry.load_dataset, registry.check_dataset_available):
    with pytest.raises(
        arrays.DatasetNotPreparedError,
        match="a copy exists but cannot be opened",
    ):
      fn("cifar100", data_dir=data_dir)
