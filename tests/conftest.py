"""Shared fixtures: one tiny end-to-end run reused by every test that reads its outputs."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The tiny config through every stage, in-process: ``(workdir, results, log_lines)``."""
  from masc_jax import config_lib, train

  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  lines: list[str] = []
  config = config_lib.load_config("tiny")
  results = train.train_and_evaluate(config, workdir, log=lines.append)
  return workdir, results, lines


def run_main(args, env_extra=None, timeout=600, **kwargs):
  """``python -m masc_jax.main ARGS`` in a subprocess; returns the CompletedProcess."""
  env = {**os.environ, **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", "masc_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, **kwargs)
