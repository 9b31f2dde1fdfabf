"""Shared fixtures: one tiny end-to-end run reused by every test that reads its outputs."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

# One persistent compilation cache for the whole session, set before JAX is imported so
# that in-process runs and every subprocess (which inherits the environment) share it:
# the many tiny runs of the suite then compile each program once. Runs' results do not
# depend on it (a cached executable is the one that was compiled). The size limit
# makes every process lock the folder around its reads and writes, as a run's
# own setting does (masc_jax.parallel.compile_cache): the suite's two worker
# processes and their subprocesses compile at the same time.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="masc_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  from masc_jax.parallel import compile_cache  # no JAX import: safe here

  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(compile_cache.MAX_BYTES)


# The suite runs on the CPU. With libtpu installed (the test extra installs it for
# the pre-flight's tests), JAX would otherwise look for a TPU at start-up and print
# libtpu's "no TPU here" lines on stderr, in this process and in every subprocess,
# which inherit this environment.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _pin_xdist_worker():
  """Gives each pytest-xdist worker its own share of the CPUs (Linux).

  The suite runs in two worker processes (pyproject's addopts). Unpinned, each
  worker's XLA sizes its thread pool to every CPU, and two pools on two cores
  spend their time waiting for each other; pinned, XLA sees only the worker's
  CPUs (and so do the subprocesses it starts, which inherit the affinity).
  With more workers than CPUs nothing is pinned.
  """
  worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
  count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
  if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
    return
  cpus = sorted(os.sched_getaffinity(0))
  if count < 2 or count > len(cpus):
    return
  os.sched_setaffinity(0, cpus[int(worker[2:]) :: count])


_pin_xdist_worker()


# Modules whose tests share an expensive fixture (a module fixture, or the
# session's tiny_run) and so run on one worker, with the name of their unit of
# work. Every other test is a unit of its own.
SHARED_FIXTURE_UNITS = {
    "tests/test_faults.py": "tiny_run",  # and its preempted run
    "tests/test_train.py": "tiny_run",
    "tests/test_multiprocess.py": "multiprocess",  # the one-process reference
    "tests/test_population.py": "population",  # the trained population
    "tests/test_preflight.py": "preflight",  # tiny compiled for a v5e-4
    "tests/test_sharding.py": "sharding",  # the 8-device workers' steps
    "tests/test_tfds_by_name.py": "tfds_by_name",  # the prepared dataset
    "tests/test_watch.py": "watch",  # the reference and interrupted runs
}


def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist's load scheduling, with ``SHARED_FIXTURE_UNITS`` kept whole.

  xdist's scope scheduling hands out units of work, those with the most tests
  first; a unit here is a module of ``SHARED_FIXTURE_UNITS`` (so its fixture
  is built on one worker only) or a single test. Only for the default distribution
  (``-n N`` alone); ``--dist`` chooses xdist's own.
  """
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class SharedFixtureScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      return SHARED_FIXTURE_UNITS.get(nodeid.split("::", 1)[0], nodeid)

  return SharedFixtureScheduling(config, log)


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


# Runs that mostly compile (a few steps of dozens of programs that no other test
# shares) turn most of XLA's optimisation off: jax's
# ``jax_disable_most_optimizations`` (LLVM at -O0 on the CPU), which compiles
# 2-3x faster here, the losses within 1e-6 of the default's. Every pair of runs
# a test compares is compiled at the same setting, so exact comparisons stay
# exact; tests that compare with a run at the default setting don't use it.
def quick_compile_env(env):
  """``env`` for a subprocess whose programs compile with most optimisation off."""
  return {**env, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@contextlib.contextmanager
def quick_compile():
  """Programs compiled inside the block have most optimisation off (this process)."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def quickly_compiled():
  """The test's programs compile with most optimisation off (``quick_compile``)."""
  with quick_compile():
    yield


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
