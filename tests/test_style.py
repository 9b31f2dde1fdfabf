"""The tree is formatted by the one formatter configured in pyproject.toml (pyink, Google style)."""

import subprocess
import sys

from conftest import REPO


def test_the_tree_is_formatted_with_pyink():
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "pyink",
          "--check",
          "masc_jax",
          "tests",
          "benchmarks",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  would_change = [
      line
      for line in out.stderr.splitlines()
      if line.startswith("would reformat")
  ]
  assert (
      out.returncode == 0
  ), "run `pyink masc_jax tests benchmarks`:\n" + "\n".join(would_change)
