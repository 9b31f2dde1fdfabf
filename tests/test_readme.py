"""README's code must run as written: its Python snippets, its test command in .ci/run, and the guides' commands."""

import json
import os
import re
import subprocess
import sys

from conftest import REPO


def readme():
  with open(os.path.join(REPO, "README.md")) as f:
    return f.read()


def test_python_snippet_runs():
  snippet = re.findall(r"```python\n(.*?)```", readme(), re.S)[0]
  out = subprocess.run(
      [sys.executable, "-c", snippet],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "(4, 8, 100)" in out.stdout and "nan" not in out.stdout


def test_extend_it_snippet_registers_a_rule_and_a_loss_and_runs(tmp_path):
  """README "Extend it": a rule and a CC loss from outside the package, by name, end to end."""
  snippet = re.findall(r"```python\n(.*?)```", readme(), re.S)[1]
  assert "register_rule" in snippet and "register_cc_loss" in snippet
  out = subprocess.run(
      [sys.executable, "-c", snippet],
      capture_output=True,
      text=True,
      cwd=tmp_path,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines()[-1].startswith("top2_gap ")
  workdir = tmp_path / "runs" / "extend_demo"
  assert "Routing rule: top2_gap" in (workdir / "results.md").read_text()
  logged = [
      json.loads(line)
      for line in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  assert any("entropy" in r for r in logged if r.get("stage") == "collective")
  assert not any("entropy" in r for r in logged if r.get("stage") == "experts")


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"```bash\n(.*?)```", readme(), re.S)
  setup_and_test = commands[1].strip()
  test_command = setup_and_test.split("&&")[-1].strip()
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = [
        line.strip() for line in f if line.strip() and not line.startswith("#")
    ]
  assert ci[-1] == test_command
  assert 'pip install -q -e ".[test]"' in " ".join(ci)


def test_the_local_multi_process_command_starts_two_processes_as_written():
  """docs/devices.md: the launch_local line, with --dry-run added, plans the two processes."""
  with open(os.path.join(REPO, "docs", "devices.md")) as f:
    guide = f.read()
  line = next(
      l
      for l in guide.splitlines()
      if l.startswith("python -m masc_jax.launch_local")
  )
  args = line.split()[3:]
  out = subprocess.run(
      [sys.executable, "-m", "masc_jax.launch_local", "--dry-run", *args],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=60,
  )
  assert out.returncode == 0, out.stderr
  planned = out.stdout.strip().splitlines()
  assert len(planned) == 2
  for index, command in enumerate(planned):
    assert (
        "JAX_NUM_CPU_DEVICES=2 JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo"
        in command
    )
    assert command.endswith(
        f"--num_processes=2 --process_id={index} --heartbeat_timeout_s=30"
    )
    assert (
        "-m masc_jax.main --config=tiny --workdir=runs/tiny_2x2 --coordinator_address=127.0.0.1:"
        in command
    )
  bad = subprocess.run(
      [
          sys.executable,
          "-m",
          "masc_jax.launch_local",
          "--num_processes=0",
          "--",
          "--config=tiny",
      ],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=60,
  )
  assert (
      bad.returncode == 2
      and bad.stderr.strip() == "error: --num_processes=0 must be at least 1"
  )
