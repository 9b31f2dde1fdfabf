"""Host-side data for MASC: datasets, class groups, and per-agent batch indices.

Everything here is NumPy. The training loop keeps the uint8 images on the
device and gathers batches there, so this module only hands out *indices*
into the train / test arrays (see `AgentBatches`, `PooledBatches`,
`eval_batches`).

Datasets:
  * `digits`   scikit-learn's bundled 8x8 digits (offline stand-in, 10 classes).
  * `cifar10`, `cifar100`  read from a TFDS data directory prepared as
    array_record, via `tfds.data_source` (random access, no TensorFlow).

The protocol (spec, "Protocols"): the C classes are split into K disjoint
groups of M = C / K classes; agent k owns group k and trains on the samples of
those classes only (`make_class_groups`, `agent_indices`).
"""

from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

DATASET_NAMES: tuple[str, ...] = ("cifar100", "cifar10", "digits")

# Number of classes of each TFDS dataset we read (cifar100: the 100 fine labels
# of the `label` feature, not `coarse_label`).
_TFDS_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

# The standard per-channel statistics of the CIFAR train sets (pixel / 255).
# Fixed constants rather than recomputed, so normalisation is identical to the
# usual CIFAR recipes and does not depend on how much of the data is loaded.
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# digits: 500 test images out of 1,797 (1,297 train), drawn once with this seed.
_DIGITS_NUM_TEST = 500
_DIGITS_SPLIT_SEED = 0

# Records per `__getitems__` call when reading a TFDS split: large enough that
# per-call overhead vanishes, small enough that the decoded dicts stay small.
_READ_CHUNK = 4096


class DatasetNotPreparedError(RuntimeError):
    """A TFDS dataset is not available (as array_record) in the data directory."""


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


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> str:
    """The TFDS data directory to read: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.

    Resolved here (at call time) rather than left to TFDS, because TFDS reads
    TFDS_DATA_DIR once at import; resolving ourselves also lets error messages
    name the directory that was actually searched.
    """
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(
            f"Unknown dataset {name!r}; valid names are {', '.join(DATASET_NAMES)}."
        )


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A whole dataset in host memory.

    Attributes:
      name: dataset name (one of DATASET_NAMES).
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


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> ArrayDataset:
    """Loads a whole dataset into host memory.

    Args:
      name: one of DATASET_NAMES.
      data_dir: TFDS data directory (ignored for `digits`); default: the
        TFDS_DATA_DIR environment variable, else ~/tensorflow_datasets.

    Returns:
      An ArrayDataset with uint8 images and int32 labels.

    Raises:
      ValueError: unknown name.
      DatasetNotPreparedError: a CIFAR dataset is not prepared in data_dir.
    """
    _check_name(name)
    if name == "digits":
        return _load_digits()
    return _load_tfds(name, _resolve_data_dir(data_dir))


def check_dataset_available(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> None:
    """Raises DatasetNotPreparedError if `name` cannot be loaded; reads no records.

    Meant to validate a run's configuration before anything expensive starts.
    `digits` is bundled with scikit-learn, so it is always available.
    """
    _check_name(name)
    if name == "digits":
        return
    _open_tfds_splits(name, _resolve_data_dir(data_dir))


# ----------------------------------------------------------------------------
# digits


def _stratified_test_mask(labels: np.ndarray, num_test: int, seed: int) -> np.ndarray:
    """[N] bool mask choosing `num_test` samples, stratified by label.

    Each class gets a share of the test set proportional to its size (largest
    remainder rounding, ties to the smaller class id), and its test samples are
    drawn uniformly with a fixed-seed NumPy Generator, so the split is the same
    on every run and machine.
    """
    classes, counts = np.unique(labels, return_counts=True)
    exact = num_test * counts / labels.shape[0]
    quota = np.floor(exact).astype(np.int64)
    # Hand the leftover test slots to the classes with the largest remainders.
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: num_test - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for c, q in zip(classes, quota):
        members = np.flatnonzero(labels == c)
        mask[rng.choice(members, size=int(q), replace=False)] = True
    return mask


def _load_digits() -> ArrayDataset:
    """scikit-learn's 8x8 digits: [N, 8, 8, 1] uint8, 1,297 train / 500 test."""
    from sklearn.datasets import load_digits  # local: sklearn is slow to import

    bunch = load_digits()
    # Pixel values are integers 0..16; rescale to the 0..255 range of the
    # CIFAR images so the same normalisation / augmentation code applies.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    test = _stratified_test_mask(labels, _DIGITS_NUM_TEST, _DIGITS_SPLIT_SEED)
    train_images = images[~test]
    scaled = train_images.astype(np.float64) / 255.0
    return ArrayDataset(
        name="digits",
        train_images=train_images,
        train_labels=labels[~test],
        test_images=images[test],
        test_labels=labels[test],
        num_classes=10,
        mean=scaled.mean(axis=(0, 1, 2)).astype(np.float32),
        std=scaled.std(axis=(0, 1, 2)).astype(np.float32),
    )


# ----------------------------------------------------------------------------
# CIFAR via TFDS (array_record, random access, no TensorFlow)


def _open_tfds_splits(name: str, data_dir: str) -> tuple[Any, Any]:
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
                name, data_dir, f"empty split (train={sizes[0]}, test={sizes[1]} records)"
            )
        )
    return train, test


def _read_split(
    source: Sequence[dict[str, Any]], name: str, split: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads every record of a TFDS data source into ([N, H, W, C] uint8, [N] int32).

    Records are fetched in chunks with the batched `__getitems__` (one
    array_record read per chunk instead of one per record) and written into
    preallocated arrays.
    """
    n = len(source)
    first = np.asarray(source[0]["image"])
    images = np.empty((n, *first.shape), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int32)
    try:
        for start in range(0, n, _READ_CHUNK):
            keys = list(range(start, min(n, start + _READ_CHUNK)))
            for offset, record in enumerate(source.__getitems__(keys)):
                images[start + offset] = record["image"]
                labels[start + offset] = record["label"]
    except (OSError, RuntimeError, ValueError) as err:
        # array_record reports missing / truncated shards as RuntimeError.
        raise DatasetNotPreparedError(
            f"Reading the {name} {split} split failed ({type(err).__name__}: {err}); "
            f"the prepared files look incomplete or corrupt. Re-run "
            f"`bash launch/prepare_data.sh {name}` (or use --config=digits offline)."
        ) from err
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DatasetNotPreparedError(
            f"{name} {split} labels span [{labels.min()}, {labels.max()}], outside "
            f"[0, {num_classes}); the prepared files look corrupt or belong to another "
            f"dataset. Re-run `bash launch/prepare_data.sh {name}`."
        )
    return images, labels


def _load_tfds(name: str, data_dir: str) -> ArrayDataset:
    """Loads cifar10 / cifar100 from a TFDS array_record directory."""
    train_source, test_source = _open_tfds_splits(name, data_dir)
    num_classes = _TFDS_NUM_CLASSES[name]
    train_images, train_labels = _read_split(train_source, name, "train", num_classes)
    test_images, test_labels = _read_split(test_source, name, "test", num_classes)
    mean, std = _CIFAR_STATS[name]
    return ArrayDataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        mean=np.asarray(mean, dtype=np.float32),
        std=np.asarray(std, dtype=np.float32),
    )


# ----------------------------------------------------------------------------
# class groups


@dataclasses.dataclass(frozen=True, eq=False)
class ClassGroups:
    """The split of the C classes among K agents.

    Attributes:
      groups: [K, M] int32; groups[k] = the class ids agent k owns (sorted).
      class_owner: [C] int32; class_owner[c] = the agent that owns class c.
    """

    groups: np.ndarray
    class_owner: np.ndarray

    def __post_init__(self) -> None:
        self.groups.setflags(write=False)
        self.class_owner.setflags(write=False)

    @property
    def num_agents(self) -> int:
        """K."""
        return int(self.groups.shape[0])

    @property
    def classes_per_agent(self) -> int:
        """M = C / K."""
        return int(self.groups.shape[1])

    @property
    def num_classes(self) -> int:
        """C."""
        return int(self.class_owner.shape[0])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_class_groups(
    num_classes: int, num_agents: int, permutation_seed: int | None = None
) -> ClassGroups:
    """Splits classes 0..C-1 into K disjoint groups of M = C / K classes.

    Args:
      num_classes: C >= 1.
      num_agents: K >= 1, must divide C.
      permutation_seed: None: label order (agent k owns classes M*k .. M*k+M-1).
        An int: a permutation of the classes drawn from
        np.random.default_rng(permutation_seed) is cut into K consecutive
        groups (each group then sorted).

    Raises:
      ValueError: C < 1, K < 1, or K does not divide C.
    """
    num_classes = operator.index(num_classes)
    num_agents = operator.index(num_agents)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
    if num_agents < 1:
        raise ValueError(f"num_agents must be >= 1; got {num_agents}.")
    if num_classes % num_agents:
        raise ValueError(
            f"num_classes={num_classes} is not divisible by num_agents={num_agents}: "
            f"every agent must own the same number of classes. Choose num_agents "
            f"among the divisors of {num_classes}: "
            f"{', '.join(map(str, _divisors(num_classes)))}."
        )
    if permutation_seed is None:
        order = np.arange(num_classes)
    else:
        order = np.random.default_rng(permutation_seed).permutation(num_classes)
    groups = np.sort(order.reshape(num_agents, -1), axis=1).astype(np.int32)
    class_owner = np.empty(num_classes, dtype=np.int32)
    for k, group in enumerate(groups):
        class_owner[group] = k
    return ClassGroups(groups=groups, class_owner=class_owner)


def agent_indices(labels: np.ndarray, class_groups: ClassGroups) -> list[np.ndarray]:
    """Per agent, the indices of the samples whose label that agent owns.

    Args:
      labels: [N] integer labels in [0, C).
      class_groups: the class split.

    Returns:
      K arrays; element k is sorted int64 indices into `labels` of agent k's samples.

    Raises:
      ValueError: labels not 1-D integers, or a label outside [0, C).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array; got dtype {labels.dtype} with "
            f"shape {labels.shape}."
        )
    num_classes = class_groups.num_classes
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"label {int(labels[position])} (at index {position}) is outside "
            f"[0, {num_classes}): the class groups cover {num_classes} classes; "
            f"build them with the dataset's num_classes."
        )
    owner = class_groups.class_owner[labels]
    return [
        np.flatnonzero(owner == k).astype(np.int64)
        for k in range(class_groups.num_agents)
    ]


# ----------------------------------------------------------------------------
# batch indices


def _check_batch_args(batch_size: int, seed: int) -> tuple[int, int]:
    batch_size = operator.index(batch_size)
    seed = operator.index(seed)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if seed < 0:
        # np.random.SeedSequence only takes non-negative entropy.
        raise ValueError(f"seed must be a non-negative integer; got {seed}.")
    return batch_size, seed


def _as_index_array(indices: np.ndarray, what: str) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"{what} must be a 1-D integer array; got dtype {indices.dtype} with "
            f"shape {indices.shape}."
        )
    if indices.size and (indices.min() < 0 or indices.max() > np.iinfo(np.int32).max):
        raise ValueError(
            f"{what} must lie in [0, 2**31); got [{indices.min()}, {indices.max()}]."
        )
    return indices.astype(np.int32)


def _check_step(step: int) -> int:
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}.")
    return step


# Distinct first words of the seed sequences, so AgentBatches and PooledBatches
# built with the same seed still draw independent streams.
_AGENT_STREAM = 0
_POOLED_STREAM = 1


class AgentBatches:
    """Stacked per-agent training batches: each step, agent k gets B indices into
    the train set, from its own data only.

    Every agent has the same number of steps per epoch (the smallest agent's
    n_k // B, remainders dropped) so the K batches stack into one [K, B] array
    for the vmapped step. Each epoch, agent k draws a fresh permutation of its
    own indices from np.random.default_rng((seed, 0, epoch, k)); `indices(step)`
    is therefore a pure function of (seed, step), and a run resumed at any step
    sees exactly the batches of an uninterrupted run.
    """

    def __init__(
        self, per_agent_indices: Sequence[np.ndarray], batch_size: int, seed: int
    ) -> None:
        """Args:
        per_agent_indices: K arrays of indices into the train set (see agent_indices).
        batch_size: B, per agent.
        seed: non-negative int.

        Raises:
          ValueError: no agents, bad batch_size / seed, or an agent with fewer than B samples.
        """
        self.batch_size, self.seed = _check_batch_args(batch_size, seed)
        if len(per_agent_indices) == 0:
            raise ValueError("per_agent_indices is empty: need at least one agent.")
        self._indices = [
            _as_index_array(ix, f"per_agent_indices[{k}]")
            for k, ix in enumerate(per_agent_indices)
        ]
        for k, ix in enumerate(self._indices):
            if ix.shape[0] < self.batch_size:
                raise ValueError(
                    f"agent {k} has {ix.shape[0]} training samples, fewer than "
                    f"batch_size={self.batch_size}: it cannot fill one batch. Lower "
                    f"the batch size to at most {ix.shape[0]}."
                )
        self.num_agents = len(self._indices)
        self.steps_per_epoch = min(ix.shape[0] // self.batch_size for ix in self._indices)
        self._cached_epoch: int | None = None
        self._cached_perms: np.ndarray | None = None  # [K, steps_per_epoch * B]

    def _epoch_perms(self, epoch: int) -> np.ndarray:
        """[K, steps_per_epoch * B]: each agent's shuffled indices for `epoch`."""
        if epoch != self._cached_epoch:
            used = self.steps_per_epoch * self.batch_size
            perms = np.empty((self.num_agents, used), dtype=np.int32)
            for k, ix in enumerate(self._indices):
                rng = np.random.default_rng((self.seed, _AGENT_STREAM, epoch, k))
                perms[k] = ix[rng.permutation(ix.shape[0])[:used]]
            self._cached_epoch, self._cached_perms = epoch, perms
        assert self._cached_perms is not None
        return self._cached_perms

    def indices(self, step: int) -> np.ndarray:
        """[K, B] int32 train-set indices for global step `step` (epoch = step // steps_per_epoch)."""
        step = _check_step(step)
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size
        return self._epoch_perms(epoch)[:, start : start + self.batch_size].copy()


class PooledBatches:
    """Batches over the pooled data of the society (all agents' indices), for
    the collective network.

    n // B steps per epoch (remainder dropped); epoch e uses the permutation
    drawn from np.random.default_rng((seed, 1, e)), so `indices(step)` is a pure
    function of (seed, step) and resuming reproduces the same batches.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
        """Args:
        indices: [n] indices into the train set (e.g. the union of agent_indices).
        batch_size: B.
        seed: non-negative int.

        Raises:
          ValueError: bad batch_size / seed, or fewer than B indices.
        """
        self.batch_size, self.seed = _check_batch_args(batch_size, seed)
        self._indices = _as_index_array(indices, "indices")
        n = self._indices.shape[0]
        if n < self.batch_size:
            raise ValueError(
                f"the pool has {n} samples, fewer than batch_size={self.batch_size}: "
                f"it cannot fill one batch. Lower the batch size to at most {n}."
            )
        self.steps_per_epoch = n // self.batch_size
        self._cached_epoch: int | None = None
        self._cached_perm: np.ndarray | None = None

    def indices(self, step: int) -> np.ndarray:
        """[B] int32 train-set indices for global step `step`."""
        step = _check_step(step)
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._cached_epoch:
            rng = np.random.default_rng((self.seed, _POOLED_STREAM, epoch))
            self._cached_epoch = epoch
            self._cached_perm = self._indices[rng.permutation(self._indices.shape[0])]
        assert self._cached_perm is not None
        start = position * self.batch_size
        return self._cached_perm[start : start + self.batch_size].copy()


def eval_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Fixed-shape batches covering 0..num_examples-1 in order.

    Yields:
      (indices [batch_size] int32, num_valid): the first num_valid entries are
      real; the last batch is padded by repeating the last index so that a
      jit-compiled eval step always sees one shape (callers must ignore the
      padded rows). Nothing is yielded when num_examples == 0.

    Raises:
      ValueError: num_examples < 0 or batch_size < 1.
    """
    num_examples = operator.index(num_examples)
    batch_size = operator.index(batch_size)
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0; got {num_examples}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    for start in range(0, num_examples, batch_size):
        stop = min(start + batch_size, num_examples)
        batch = np.full(batch_size, stop - 1, dtype=np.int32)
        batch[: stop - start] = np.arange(start, stop, dtype=np.int32)
        yield batch, stop - start
