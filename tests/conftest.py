"""Shared fixtures: one tiny end-to-end run reused by every test that reads its outputs."""

import os
import shutil
import subprocess
import sys
import tempfile

# One persistent compilation cache for the whole session, set before JAX is imported so
# that in-process runs and every subprocess (which inherits the environment) share it:
# the many tiny runs of the suite then compile each program once. Runs' results do not
# depend on it (a cached executable is the one that was compiled).
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="masc_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


# The suite runs on the CPU. With libtpu installed (the test extra installs it for
# the pre-flight's tests), JAX would otherwise look for a TPU at start-up and print
# libtpu's "no TPU here" lines on stderr, in this process and in every subprocess,
# which inherit this environment.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_sessionfinish(session, exitstatus):
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The tiny config saves at stage ends only (its stages are shorter than its
# checkpoint interval); runs that need checkpoints inside a stage add this
# override. The interval does not change results: a run with it and one
# without end with the same tables.
MID_STAGE_CHECKPOINTS = "checkpoint_every_steps=10"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The tiny config through every stage, in-process: ``(workdir, results, log_lines)``.

  Checkpointed every 10 steps (``MID_STAGE_CHECKPOINTS``), so that its workdir
  holds checkpoints inside a stage.
  """
  from masc_jax import config_lib
  from masc_jax.training import train

  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  lines: list[str] = []
  config = config_lib.load_config("tiny", [MID_STAGE_CHECKPOINTS])
  results = train.train_and_evaluate(config, workdir, log=lines.append)
  return workdir, results, lines


# Overrides for a fast end-to-end run of a 10-class 32x32 dataset (K=5): very
# narrow networks with two pools, one vmapped program for the agents (the
# quickest to compile), 1 epoch per stage, no ablation stages. The
# Fashion-MNIST and tfds:NAME tests share them, so the compiled programs are
# the same and the session's compilation cache builds them once.
TINY_RUN_OVERRIDES = [
    "model.expert_widths=(4,8)",
    "model.collective_widths=(8,8)",
    "model.pool_after=(0,1)",
    "model.head_hidden=(16,)",
    "agent_map=vmap",
    "batch_size=8",
    "eval_batch_size=50",
    "epochs.experts=1",
    "epochs.collective=1",
    "epochs.altruism=1",
    "ablations=False",
    "seeds=0",
    "log_every_steps=5",
    "checkpoint_every_steps=100",
]


# The results.json fields that say what a run computed (timings and settings aside):
# two runs that must agree are compared on these.
COMPARED = (
    "rows",
    "group_accuracy",
    "society_accuracy",
    "collective_accuracy",
    "directionality",
)


def main_in_process(argv):
  """``python -m masc_jax.main ARGV``'s exit status, run in this process."""
  from absl import flags

  from masc_jax import main as main_module

  flags.FLAGS.unparse_flags()
  try:
    main_module.main(main_module.parse_flags(["masc_jax.main", *argv]))
  except SystemExit as e:
    return e.code
  return 0


def run_main(args, env_extra=None, timeout=600, **kwargs):
  """``python -m masc_jax.main ARGS`` in a subprocess; returns the CompletedProcess."""
  env = {**os.environ, **(env_extra or {})}
  return subprocess.run(
      [sys.executable, "-m", "masc_jax.main", *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      **kwargs,
  )


def random_variables(module, sample, seed):
  """The module's variables with random values (shapes from ``init`` traced, not compiled).

  Kernels ~ U(+-1/sqrt(fan_in)), and non-trivial BatchNorm scales, biases and
  running statistics, so that eval mode differs from a fresh initialisation.
  """
  shapes = jax.eval_shape(
      lambda: module.init({"params": jax.random.key(0)}, sample, train=False)
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      value = rng.uniform(-bound, bound, leaf.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      value = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def markdown_sections(md):
  """``'## title'`` -> the lines under it (level-2 sections of a Markdown report)."""
  out, title = {}, None
  for line in md.splitlines():
    if line.startswith("## "):
      title = line[3:].strip()
      out[title] = []
    elif title is not None:
      out[title].append(line)
  return out
