"""Workdirs in an object store: every file the run writes goes through epath, none lands locally.

No bucket is reachable here, so ``gs://`` is served by fsspec's in-memory
filesystem registered under the ``gs`` protocol: the same epath code path a
real bucket takes (epath's fsspec backend), minus the network. Orbax writes
the checkpoint arrays through TensorStore's own GCS driver, which no fake
reaches; the run's checkpointer is replaced by an in-memory one that records
the directory it was given.
"""

import json
import os

import fsspec
import jax
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from masc_jax.training import checkpointing, train, workdir as workdir_lib
from masc_jax import config_lib, paths


class FakeBucket(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store: dict = {}  # its own store, apart from memory://
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix) :]
    return super()._strip_protocol(path)


@pytest.fixture
def bucket(monkeypatch):
  FakeBucket.store.clear()
  FakeBucket.pseudo_dirs[:] = [""]
  FakeBucket.clear_instance_cache()
  previous = {name: fsspec.registry.get(name) for name in FakeBucket.protocol}
  for name in FakeBucket.protocol:  # epath asks fsspec for "gcs"
    fsspec.register_implementation(name, FakeBucket, clobber=True)
  yield fsspec.filesystem("gs")
  for name, implementation in previous.items():
    if implementation is not None:
      fsspec.register_implementation(name, implementation, clobber=True)


class MemoryCheckpointer:
  """``checkpointing.Checkpointer``'s interface, in memory."""

  directories: list = []

  def __init__(self, directory, max_to_keep=2):
    self.directory, self.saved = directory, {}
    MemoryCheckpointer.directories.append(directory)

  def all_steps(self):
    return sorted(self.saved)

  def save(self, step, state, meta):
    self.saved[step] = (jax.device_get(state), json.loads(json.dumps(meta)))

  def wait(self):
    pass

  def restore_latest_good(self, abstract_state, shardings=None, log=None):
    return None

  def close(self):
    pass


def local_tree(root):
  return sorted(
      os.path.relpath(os.path.join(d, f), root)
      for d, _, fs in os.walk(root)
      for f in fs
  )


def test_paths_know_local_and_object_store_paths():
  assert paths.scheme("gs://b/run") == "gs" and paths.is_local("runs/x")
  assert paths.absolute("gs://b/run") == "gs://b/run"
  assert paths.absolute("runs/x") == os.path.abspath("runs/x")
  assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
  paths.check_supported("gs://b/run")
  paths.check_supported("/tmp/run")
  with pytest.raises(
      paths.UnsupportedPathError, match=r"the scheme hdfs:// is not supported"
  ):
    paths.check_supported("hdfs://namenode/run")


def test_a_gs_workdir_gets_every_file_and_the_local_disk_none(
    bucket, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)  # a path mistaken for local would land here
  monkeypatch.setattr(checkpointing, "Checkpointer", MemoryCheckpointer)
  MemoryCheckpointer.directories.clear()
  config = config_lib.load_config(
      "tiny", ["ablations=False", "epochs.collective=1"]
  )
  results = train.train_and_evaluate(
      config, "gs://bucket/runs/tiny", log=lambda _: None
  )
  assert local_tree(tmp_path) == []
  assert MemoryCheckpointer.directories == ["gs://bucket/runs/tiny/checkpoints"]
  written = {
      p.split("/bucket/runs/tiny/", 1)[1]
      for p in bucket.find("/bucket/runs/tiny")
  }
  assert {
      "config.json",
      "metrics.jsonl",
      "results.json",
      "results.md",
      "report.png",
  } <= written
  saved = json.loads(bucket.cat("/bucket/runs/tiny/results.json"))
  assert saved["members"][0]["rows"] == json.loads(
      json.dumps(results["members"][0]["rows"])
  )
  records = [
      json.loads(l)
      for l in bucket.cat("/bucket/runs/tiny/metrics.jsonl").splitlines()
  ]
  assert {r["stage"] for r in records} == {"experts", "collective", "altruism"}
  assert bucket.cat("/bucket/runs/tiny/report.png")[:4] == b"\x89PNG"
  # TensorBoard's event files too, through the same path library, readable.
  (events,) = [p for p in written if p.startswith("tensorboard/seed_0/events.")]
  copy = tmp_path.parent / f"{tmp_path.name}_events"
  copy.mkdir()
  (copy / os.path.basename(events)).write_bytes(
      bucket.cat(f"/bucket/runs/tiny/{events}")
  )
  from tensorboard.backend.event_processing import event_accumulator

  accumulator = event_accumulator.EventAccumulator(str(copy))
  accumulator.Reload()
  assert {"experts/ce", "altruism/eval/expert"} <= set(
      accumulator.Tags()["scalars"]
  )
  # The saved-config guard reads the bucket: another result field is refused.
  other = config_lib.load_config("tiny", ["ablations=False", "seed=1"])
  with pytest.raises(workdir_lib.WorkdirError, match=r"seed: saved 0, now 1"):
    workdir_lib.check_workdir(other, "gs://bucket/runs/tiny")


def test_metrics_appended_in_a_bucket_keep_the_earlier_lines(bucket):
  from masc_jax.reporting import progress

  with progress.MetricsLogger(
      "gs://bucket/m/metrics.jsonl", upload_every_s=0
  ) as log:
    log.write({"stage": "experts", "step": 1})
  with progress.MetricsLogger(
      "gs://bucket/m/metrics.jsonl", upload_every_s=3600
  ) as log:
    log.write({"stage": "experts", "step": 2})  # held back, uploaded on close
  lines = bucket.cat("/bucket/m/metrics.jsonl").decode().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2]
