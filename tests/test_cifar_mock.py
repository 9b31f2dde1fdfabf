"""The cifar100 protocol (K=4 x 25, 32x32x3, 13 blocks with 5 pools) under tfds.testing.mock_data.

Random images and labels: this checks that the CIFAR code path runs through
every stage and writes its results, not what it learns.
"""

import contextlib
import os
from unittest import mock

from masc_jax import config_lib
from masc_jax.training import train

# The paper's block/pool layout with very narrow widths, so it compiles quickly;
# one vmapped program for the 4 agents (CPU's default unrolls them: 4 copies of
# 13 blocks to compile). vmap and unroll are equal step for step
# (tests/test_agents.py); this test is about the CIFAR path through the stages.
NARROW = [
    "agent_map=vmap",
    "model.expert_widths=(4,4,4,4,4,4,4,4,4,4,4,4,4)",
    "model.collective_widths=(4,4,4,4,4,4,4,4,4,4,4,4,8)",
    "model.head_hidden=(16,)",
    "batch_size=8",
    "eval_batch_size=100",
    "epochs.experts=1",
    "epochs.collective=1",
    "epochs.altruism=1",
    "ablations=False",
    "log_every_steps=10",
    "checkpoint_every_steps=20",
]


@contextlib.contextmanager
def mock_cifar(num_examples):
  """``tfds.testing.mock_data`` with its batched read fixed (see tests/test_data.py)."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  def getitems(*args, generator, serialized=False):
    del serialized
    return [generator[key] for key in args[-1]]

  with (
      mock.patch.object(mocking, "_getitems", getitems),
      tfds.testing.mock_data(num_examples=num_examples),
  ):
    yield


# Most of the test is compiling 13-block networks for a few steps each: it runs
# with most of XLA's optimisation off (conftest.quick_compile).
def test_cifar100_protocol_runs_every_stage_on_mock_data(
    tmp_path, quickly_compiled
):
  config = config_lib.load_config("cifar100", NARROW)
  assert config.num_agents == 4 and config.model.pool_after == (1, 3, 6, 9, 12)
  lines = []
  with mock_cifar(num_examples=480):
    results = train.train_and_evaluate(config, str(tmp_path), log=lines.append)
  (member,) = results["members"]
  assert [len(g) for g in member["class_groups"]] == [25] * 4
  assert set(member["rows"]) == {"before_growth", "after_growth", "cc_only"}
  assert any(l.startswith("[altruism] done:") for l in lines)
  assert os.path.getsize(tmp_path / "report.png") > 0
