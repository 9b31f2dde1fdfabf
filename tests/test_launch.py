"""Tests of the launch/*.sh Cloud TPU scripts, without gcloud and offline.

Every script is run through bash with a controlled environment: a PATH that
holds only the few tools the scripts use (so no real gcloud), a temporary
$HOME, and, where a test wants one, a fake `gcloud` that records its argv.
--dry-run must print the commands ("+ " lines, shell-quoted) and call nothing;
without --dry-run, the fake gcloud must receive exactly the printed argv.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
RUNNABLE = [p for p in SCRIPTS if p.name != "common.sh"]
TPU_SCRIPTS = [
    "create_tpu.sh",
    "setup_tpu.sh",
    "run_tpu.sh",
    "fetch_results.sh",
    "delete_tpu.sh",
]

# Tools the scripts (and the remote scripts, when simulated here) need.
TOOLS = [
    "bash",
    "env",
    "dirname",
    "basename",
    "tr",
    "date",
    "mktemp",
    "tar",
    "gzip",
    "git",
    "rm",
    "cat",
    "mkdir",
    "tee",
    "hostname",
    "nohup",
    "sleep",
    "ls",
    "cp",
    "uname",
]

FAKE_GCLOUD = """#!{python}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
fail = os.environ.get("FAKE_GCLOUD_FAIL_MATCH")
if fail and any(fail in a for a in sys.argv[1:]):
    sys.exit(1)
"""


@pytest.fixture
def sandbox(tmp_path):
  """A bin dir without gcloud, a fake-gcloud dir, a $HOME, a call log."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in TOOLS:
    found = shutil.which(tool)
    if found:
      (bin_dir / tool).symlink_to(found)
  fake_dir = tmp_path / "fake"
  fake_dir.mkdir()
  gcloud = fake_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  home = tmp_path / "home"
  home.mkdir()

  class Sandbox:
    path = tmp_path
    log = tmp_path / "gcloud_calls.jsonl"

    def env(self, fake_gcloud=False, **extra):
      env = {
          "PATH": (f"{fake_dir}:" if fake_gcloud else "") + str(bin_dir),
          "HOME": str(home),
          "TMPDIR": str(tmp_path),
          "LC_ALL": "C",
          "FAKE_GCLOUD_LOG": str(self.log),
      }
      env.update(extra)
      return env

    def calls(self):
      if not self.log.exists():
        return []
      return [json.loads(line) for line in self.log.read_text().splitlines()]

  return Sandbox()


def run(script, *args, env):
  return subprocess.run(
      ["bash", str(LAUNCH / script), *args],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
      cwd=env.get("HOME"),
  )


def commands(stdout):
  """The printed commands ("+ " lines), each as an argv list."""
  return [
      shlex.split(line[2:])
      for line in stdout.splitlines()
      if line.startswith("+ ")
  ]


def gcloud_commands(stdout):
  return [c for c in commands(stdout) if c and c[0] == "gcloud"]


def remote_command(argv):
  """The --command value of a `gcloud ... ssh` argv."""
  return argv[argv.index("--command") + 1]


TPU = {
    "MASC_PROJECT": "my-proj",
    "MASC_ZONE": "us-central2-b",
    "MASC_TPU_NAME": "masc-v4",
}
TPU_FLAGS = ["--zone=us-central2-b", "--project=my-proj"]


# --------------------------------------------------------------------------
# Generic properties of every script
# --------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run(
      ["bash", "-n", str(script)], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_help_exits_zero(script, sandbox):
  result = run(script.name, "--help", env=sandbox.env(fake_gcloud=True))
  assert result.returncode == 0, result.stderr
  assert "Usage: launch/" + script.name in result.stdout
  assert "--dry-run" in result.stdout
  assert sandbox.calls() == []


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_scripts_are_executable_with_header(script):
  assert os.access(script, os.X_OK)
  lines = script.read_text().splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  assert lines[1].startswith(f"# launch/{script.name}")
  assert "set -euo pipefail" in lines


@pytest.mark.parametrize("script", TPU_SCRIPTS)
def test_unknown_option_is_rejected(script, sandbox):
  result = run(script, "--no-such-flag", "--dry-run", env=sandbox.env(**TPU))
  assert result.returncode == 2
  assert "unknown option '--no-such-flag'" in result.stderr


@pytest.mark.parametrize(
    "script,args,missing",
    [
        ("create_tpu.sh", [], ["--project", "--zone", "--tpu-name"]),
        ("setup_tpu.sh", [], ["--project", "--zone", "--tpu-name"]),
        (
            "run_tpu.sh",
            ["--workdir=runs/x", "--data-dir=gs://b/t"],
            ["--project", "--zone", "--tpu-name"],
        ),
        (
            "fetch_results.sh",
            ["--workdir=runs/x"],
            ["--project", "--zone", "--tpu-name"],
        ),
        ("delete_tpu.sh", [], ["--project", "--zone", "--tpu-name"]),
    ],
)
def test_missing_settings_are_named(script, args, missing, sandbox):
  result = run(script, *args, "--dry-run", env=sandbox.env(fake_gcloud=True))
  assert result.returncode == 2
  envs = {
      "--project": "$MASC_PROJECT",
      "--zone": "$MASC_ZONE",
      "--tpu-name": "$MASC_TPU_NAME",
  }
  for flag in missing:
    assert f"missing required setting {flag} (or {envs[flag]})" in result.stderr
  assert "+ gcloud" not in result.stdout
  assert sandbox.calls() == []


@pytest.mark.parametrize("script", TPU_SCRIPTS)
def test_only_one_setting_missing(script, sandbox):
  env = sandbox.env(fake_gcloud=True, MASC_PROJECT="p", MASC_TPU_NAME="t")
  extra = (
      ["--workdir=runs/x", "--data-dir=gs://b/t"]
      if script == "run_tpu.sh"
      else []
  )
  extra = ["--workdir=runs/x"] if script == "fetch_results.sh" else extra
  result = run(script, *extra, "--dry-run", env=env)
  assert result.returncode == 2
  assert "--zone (or $MASC_ZONE)" in result.stderr
  assert "--project" not in result.stderr and "--tpu-name" not in result.stderr
  assert "+ " not in result.stdout
  assert sandbox.calls() == []


def test_missing_gcloud_fails_early_without_dry_run(sandbox):
  result = run("create_tpu.sh", env=sandbox.env(**TPU))
  assert result.returncode == 2
  assert "gcloud not found" in result.stderr
  assert "+ gcloud" not in result.stdout


def test_bad_tpu_name_is_rejected(sandbox):
  result = run(
      "delete_tpu.sh",
      "--tpu-name=Bad_Name",
      "--dry-run",
      env=sandbox.env(**TPU),
  )
  assert result.returncode == 2
  assert "invalid TPU name 'Bad_Name'" in result.stderr


# --------------------------------------------------------------------------
# create_tpu.sh / delete_tpu.sh
# --------------------------------------------------------------------------
def test_create_dry_run(sandbox):
  env = sandbox.env(
      fake_gcloud=True, MASC_PROJECT="my-proj", MASC_ACCELERATOR_TYPE="v4-32"
  )
  result = run(
      "create_tpu.sh",
      "--zone",
      "us-central2-b",
      "--tpu-name=masc-v4",
      "--spot",
      "--dry-run",
      env=env,
  )
  assert result.returncode == 0, result.stderr
  assert gcloud_commands(result.stdout) == [
      [
          "gcloud",
          "compute",
          "tpus",
          "tpu-vm",
          "create",
          "masc-v4",
          *TPU_FLAGS,
          "--accelerator-type=v4-32",
          "--version=tpu-ubuntu2204-base",
          "--spot",
      ]
  ]
  assert sandbox.calls() == []


@pytest.mark.parametrize(
    "accelerator,version",
    [
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_default_runtime_follows_accelerator(
    accelerator, version, sandbox
):
  result = run(
      "create_tpu.sh",
      f"--accelerator-type={accelerator}",
      "--dry-run",
      env=sandbox.env(**TPU),
  )
  assert result.returncode == 0, result.stderr
  (cmd,) = gcloud_commands(result.stdout)
  assert (
      f"--version={version}" in cmd
      and f"--accelerator-type={accelerator}" in cmd
  )
  assert "--spot" not in cmd and "--preemptible" not in cmd


def test_create_flags_override_env(sandbox):
  env = sandbox.env(
      **TPU,
      MASC_ACCELERATOR_TYPE="v4-8",
      MASC_RUNTIME_VERSION="env-version",
      MASC_SPOT="1",
  )
  result = run(
      "create_tpu.sh",
      "--zone=europe-west4-a",
      "--tpu-name=flag-name",
      "--accelerator-type=v5p-16",
      "--runtime-version=flag-version",
      "--no-spot",
      "--preemptible",
      "--dry-run",
      env=env,
  )
  assert result.returncode == 0, result.stderr
  assert gcloud_commands(result.stdout) == [
      [
          "gcloud",
          "compute",
          "tpus",
          "tpu-vm",
          "create",
          "flag-name",
          "--zone=europe-west4-a",
          "--project=my-proj",
          "--accelerator-type=v5p-16",
          "--version=flag-version",
          "--preemptible",
      ]
  ]


def test_create_spot_and_preemptible_conflict(sandbox):
  result = run(
      "create_tpu.sh",
      "--spot",
      "--preemptible",
      "--dry-run",
      env=sandbox.env(**TPU),
  )
  assert result.returncode == 2
  assert "--spot" in result.stderr and "--preemptible" in result.stderr


def test_bool_env_must_be_boolean(sandbox):
  result = run(
      "create_tpu.sh", "--dry-run", env=sandbox.env(**TPU, MASC_SPOT="maybe")
  )
  assert result.returncode == 2
  assert "$MASC_SPOT" in result.stderr


def test_delete_dry_run(sandbox):
  env = sandbox.env(
      fake_gcloud=True, MASC_ZONE="us-central2-b", MASC_TPU_NAME="env-name"
  )
  result = run(
      "delete_tpu.sh",
      "--project=my-proj",
      "--tpu-name",
      "masc-v4",
      "--dry-run",
      env=env,
  )
  assert result.returncode == 0, result.stderr
  assert gcloud_commands(result.stdout) == [
      [
          "gcloud",
          "compute",
          "tpus",
          "tpu-vm",
          "delete",
          "masc-v4",
          *TPU_FLAGS,
          "--quiet",
      ]
  ]
  assert sandbox.calls() == []


def test_env_var_dry_run(sandbox):
  result = run(
      "delete_tpu.sh",
      env=sandbox.env(fake_gcloud=True, MASC_DRY_RUN="1", **TPU),
  )
  assert result.returncode == 0, result.stderr
  assert len(gcloud_commands(result.stdout)) == 1
  assert sandbox.calls() == []


@pytest.mark.parametrize("script", ["create_tpu.sh", "delete_tpu.sh"])
def test_real_run_calls_gcloud_with_printed_argv(script, sandbox):
  result = run(script, env=sandbox.env(fake_gcloud=True, **TPU))
  assert result.returncode == 0, result.stderr
  assert [["gcloud", *c] for c in sandbox.calls()] == gcloud_commands(
      result.stdout
  )
  assert len(sandbox.calls()) == 1


# --------------------------------------------------------------------------
# setup_tpu.sh
# --------------------------------------------------------------------------
def test_setup_dry_run_copies_local_checkout(sandbox):
  result = run(
      "setup_tpu.sh", "--dry-run", env=sandbox.env(fake_gcloud=True, **TPU)
  )
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  assert len(cmds) == 3
  pack, scp, ssh = cmds
  assert pack[0] == str(LAUNCH / "pack_source.sh") and pack[1] == str(REPO)
  tarball = pack[2]
  assert scp == [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      tarball,
      "masc-v4:masc_jax-src.tar.gz",
      *TPU_FLAGS,
      "--worker=all",
  ]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "masc-v4"]
  assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
  script = remote_command(ssh)
  assert 'tar -xzf "$HOME"/masc_jax-src.tar.gz -C "$R"' in script
  assert 'R="$HOME"/masc-jax' in script and 'V="$HOME"/masc_venv' in script
  assert '-m venv "$V"' in script
  assert 'pip install -e ".[tpu]"' in script
  assert "import jax; print(jax.device_count())" in script
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
  assert sandbox.calls() == []
  assert not Path(tarball).exists()


def test_setup_dry_run_git_clone(sandbox):
  env = sandbox.env(**TPU, MASC_REPO_URL="https://example.com/env/masc.git")
  result = run(
      "setup_tpu.sh",
      "--repo-url=https://example.com/you/masc_jax.git",
      "--repo-ref",
      "v1.0",
      "--remote-dir=/opt/masc",
      "--venv=~/venvs/masc",
      "--python=python3.12",
      "--no-check",
      "--dry-run",
      env=env,
  )
  assert result.returncode == 0, result.stderr
  (ssh,) = commands(result.stdout)
  assert (
      ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "masc-v4"]
      and "--worker=all" in ssh
  )
  script = remote_command(ssh)
  assert (
      "git clone --no-checkout https://example.com/you/masc_jax.git" in script
  )
  assert "example.com/env" not in script
  assert 'git -C "$R" fetch origin v1.0' in script
  assert "R=/opt/masc" in script and 'V="$HOME"/venvs/masc' in script
  assert "PY=python3.12" in script
  assert "jax.device_count" not in script
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0


def test_setup_real_run_packs_and_calls_gcloud(sandbox):
  result = run("setup_tpu.sh", env=sandbox.env(fake_gcloud=True, **TPU))
  assert result.returncode == 0, result.stderr
  printed = gcloud_commands(result.stdout)
  assert [["gcloud", *c] for c in sandbox.calls()] == printed
  tarball = Path(printed[0][5])
  assert not tarball.exists(), "the local tarball is removed afterwards"


def test_setup_remote_script_runs(sandbox, tmp_path):
  """Run the worker script here, against a fake python, in a fake $HOME."""
  result = run("setup_tpu.sh", "--dry-run", env=sandbox.env(**TPU))
  script = remote_command(commands(result.stdout)[-1])
  home = tmp_path / "worker"
  (home / "src").mkdir(parents=True)
  (home / "src" / "pyproject.toml").write_text("")
  with tarfile.open(home / "masc_jax-src.tar.gz", "w:gz") as tar:
    tar.add(home / "src" / "pyproject.toml", arcname="pyproject.toml")
  calls = tmp_path / "python_calls"
  fake_bin = tmp_path / "workerbin"
  fake_bin.mkdir()
  # A fake python3 >= 3.11 whose `-m venv DIR` makes DIR/bin/python (itself).
  fake_python = fake_bin / "python3"
  fake_python.write_text(
      "#!/bin/bash\n"
      f'echo "$0 $*" >> {calls}\n'
      'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi\n'
      'case "$*" in *device_count*) echo 4 ;; esac\n'
      "exit 0\n"
  )
  fake_python.chmod(0o755)
  env = sandbox.env(HOME=str(home))
  env["PATH"] = f"{fake_bin}:{env['PATH']}"
  out = subprocess.run(
      ["bash", "-c", script],
      env=env,
      cwd=home,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert out.returncode == 0, out.stderr
  assert (home / "masc-jax" / "pyproject.toml").exists()
  assert not (home / "masc_jax-src.tar.gz").exists()
  log = calls.read_text()
  assert f"-m venv {home}/masc_venv" in log
  assert "-m pip install -e .[tpu]" in log
  assert "jax.device_count() = 4" in out.stdout


# --------------------------------------------------------------------------
# run_tpu.sh
# --------------------------------------------------------------------------
TRICKY = '--config.note=it\'s a "test" $HOME `x`'


def test_run_dry_run(sandbox):
  env = sandbox.env(
      fake_gcloud=True,
      MASC_PROJECT="my-proj",
      MASC_ZONE="us-central2-b",
      TFDS_DATA_DIR="gs://my-bucket/tfds",
  )
  result = run(
      "run_tpu.sh",
      "--tpu-name=masc-v4",
      "--config",
      "cifar100",
      "--workdir=runs/c100",
      "--multihost",
      "--log-file=logs/run.log",
      "--dry-run",
      "--",
      "--config.seed=1",
      TRICKY,
      env=env,
  )
  assert result.returncode == 0, result.stderr
  (ssh,) = commands(result.stdout)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "masc-v4"]
  assert (
      "--worker=all" in ssh
      and "--zone=us-central2-b" in ssh
      and "--project=my-proj" in ssh
  )
  script = remote_command(ssh)
  assert (
      "python -m masc_jax.main --config=cifar100 --workdir=runs/c100 --multihost --config.seed=1 "
      in script
  )
  assert "gcloud storage rsync --recursive gs://my-bucket/tfds" in script
  assert 'export TFDS_DATA_DIR="$HOME"/tensorflow_datasets' in script
  assert "tee -a logs/run.log" in script
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
  assert sandbox.calls() == []


def _simulate_worker(sandbox, tmp_path, script):
  """Run a run_tpu.sh worker script with a fake venv python and gcloud."""
  home = tmp_path / "worker"
  (home / "masc-jax").mkdir(parents=True)
  venv_bin = home / "masc_venv" / "bin"
  venv_bin.mkdir(parents=True)
  record = tmp_path / "main_argv.json"
  python = venv_bin / "python"
  python.write_text(
      f"#!{sys.executable}\n"
      "import json, os, sys\n"
      f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(),"
      f" 'TFDS_DATA_DIR': os.environ.get('TFDS_DATA_DIR')}}, open({str(record)!r}, 'w'))\n"
      "print('training...')\n"
  )
  python.chmod(0o755)
  env = sandbox.env(fake_gcloud=True, HOME=str(home))
  out = subprocess.run(
      ["bash", "-c", script],
      env=env,
      cwd=home,
      capture_output=True,
      text=True,
      timeout=60,
  )
  return home, record, out


@pytest.mark.parametrize("background", [False, True])
def test_run_remote_script_passes_args_exactly(background, sandbox, tmp_path):
  args = [
      "--tpu-name=masc-v4",
      "--workdir=runs/c 100",
      "--data-dir=gs://b/tfds",
      "--log-file=logs/x.log",
  ]
  if background:
    args.append("--background")
  result = run(
      "run_tpu.sh",
      *args,
      "--dry-run",
      "--",
      "--config.seed=1",
      TRICKY,
      env=sandbox.env(**TPU),
  )
  assert result.returncode == 0, result.stderr
  script = remote_command(commands(result.stdout)[0])
  home, record, out = _simulate_worker(sandbox, tmp_path, script)
  assert out.returncode == 0, out.stderr
  if background:
    assert "started masc_jax.main" in out.stdout
    for _ in range(100):
      if record.exists() and record.stat().st_size:
        break
      subprocess.run(["sleep", "0.05"])
  else:
    assert "training..." in out.stdout
  seen = json.loads(record.read_text())
  assert seen["argv"] == [
      "-m",
      "masc_jax.main",
      "--config=cifar100",
      "--workdir=runs/c 100",
      "--config.seed=1",
      TRICKY,
  ]
  assert seen["cwd"] == str(home / "masc-jax")
  assert seen["TFDS_DATA_DIR"] == str(home / "tensorflow_datasets")
  # The gs:// data dir was staged with (the fake) gcloud on the worker.
  assert sandbox.calls() == [
      [
          "storage",
          "rsync",
          "--recursive",
          "gs://b/tfds",
          str(home / "tensorflow_datasets"),
      ]
  ]
  for _ in range(100):
    if "training..." in (home / "masc-jax" / "logs" / "x.log").read_text():
      break
    subprocess.run(["sleep", "0.05"])
  assert "training..." in (home / "masc-jax" / "logs" / "x.log").read_text()


def test_run_no_stage_data_exports_gcs_path(sandbox):
  result = run(
      "run_tpu.sh",
      "--workdir=gs://b/runs/x",
      "--data-dir=gs://b/tfds",
      "--no-stage-data",
      "--dry-run",
      env=sandbox.env(**TPU),
  )
  assert result.returncode == 0, result.stderr
  script = remote_command(commands(result.stdout)[0])
  assert "export TFDS_DATA_DIR=gs://b/tfds" in script
  assert "rsync" not in script
  assert "--workdir=gs://b/runs/x" in script
  assert "--multihost" not in script


def test_run_flags_override_env(sandbox):
  env = sandbox.env(
      **TPU,
      TFDS_DATA_DIR="gs://env-bucket/tfds",
      MASC_WORKDIR="runs/env",
      MASC_CONFIG="cifar10",
      MASC_MULTIHOST="1",
  )
  result = run(
      "run_tpu.sh",
      "--tpu-name=flag-tpu",
      "--data-dir=/data/tfds",
      "--workdir=runs/flag",
      "--config=cifar100",
      "--no-multihost",
      "--dry-run",
      env=env,
  )
  assert result.returncode == 0, result.stderr
  (ssh,) = commands(result.stdout)
  assert ssh[5] == "flag-tpu"
  script = remote_command(ssh)
  assert "export TFDS_DATA_DIR=/data/tfds" in script
  assert "--config=cifar100 --workdir=runs/flag" in script
  assert (
      "env-bucket" not in script
      and "runs/env" not in script
      and "--multihost" not in script
  )


def test_run_env_settings(sandbox):
  env = sandbox.env(
      **TPU,
      TFDS_DATA_DIR="gs://env-bucket/tfds",
      MASC_WORKDIR="runs/env",
      MASC_CONFIG="cifar10",
      MASC_MULTIHOST="true",
  )
  result = run("run_tpu.sh", "--dry-run", env=env)
  assert result.returncode == 0, result.stderr
  script = remote_command(commands(result.stdout)[0])
  assert "gs://env-bucket/tfds" in script
  assert (
      "python -m masc_jax.main --config=cifar10 --workdir=runs/env --multihost"
      in script
  )


def test_run_needs_data_dir_for_cifar(sandbox):
  result = run(
      "run_tpu.sh",
      "--workdir=runs/x",
      "--dry-run",
      env=sandbox.env(fake_gcloud=True, **TPU),
  )
  assert result.returncode == 2
  assert "--data-dir (or $TFDS_DATA_DIR)" in result.stderr
  assert "+ gcloud" not in result.stdout
  assert sandbox.calls() == []


@pytest.mark.parametrize(
    "config,workdir",
    [
        ("cifar100", "runs/cifar100"),
        ("cifar10:small", "runs/cifar10_small"),
        ("masc_jax/configs/tiny.py", "runs/tiny"),
    ],
)
def test_run_and_fetch_default_workdir_is_mains(config, workdir, sandbox):
  """Without --workdir both use masc_jax.main's default, runs/<config name>."""
  env = sandbox.env(**TPU, MASC_CONFIG=config)
  result = run("run_tpu.sh", "--data-dir=gs://b/t", "--dry-run", env=env)
  assert result.returncode == 0, result.stderr
  assert f"--workdir={workdir}" in remote_command(commands(result.stdout)[0])
  result = run("fetch_results.sh", "--dry-run", env=env)
  assert result.returncode == 0, result.stderr
  assert (
      gcloud_commands(result.stdout)[0][5]
      == f"masc-v4:masc-jax/{workdir}/results.md"
  )


def test_run_tiny_needs_no_data_dir(sandbox):
  result = run(
      "run_tpu.sh", "--config=tiny", "--dry-run", env=sandbox.env(**TPU)
  )
  assert result.returncode == 0, result.stderr
  assert "TFDS_DATA_DIR" not in remote_command(commands(result.stdout)[0])


def test_run_digits_needs_no_data_dir(sandbox):
  result = run(
      "run_tpu.sh",
      "--config=digits",
      "--workdir=runs/d",
      "--dry-run",
      env=sandbox.env(**TPU),
  )
  assert result.returncode == 0, result.stderr
  script = remote_command(commands(result.stdout)[0])
  assert "TFDS_DATA_DIR" not in script
  assert "python -m masc_jax.main --config=digits --workdir=runs/d" in script


def test_run_real_calls_gcloud_with_printed_argv(sandbox):
  result = run(
      "run_tpu.sh",
      "--workdir=runs/x",
      "--data-dir=gs://b/t",
      "--",
      TRICKY,
      env=sandbox.env(fake_gcloud=True, **TPU),
  )
  assert result.returncode == 0, result.stderr
  assert [["gcloud", *c] for c in sandbox.calls()] == gcloud_commands(
      result.stdout
  )


# --------------------------------------------------------------------------
# fetch_results.sh
# --------------------------------------------------------------------------
RESULT_FILES = ["results.md", "results.json", "report.png", "metrics.jsonl"]


def test_fetch_dry_run_from_worker0(sandbox, tmp_path):
  dest = tmp_path / "out"
  result = run(
      "fetch_results.sh",
      "--workdir=runs/c100",
      f"--dest={dest}",
      "--dry-run",
      env=sandbox.env(fake_gcloud=True, **TPU),
  )
  assert result.returncode == 0, result.stderr
  assert commands(result.stdout) == [["mkdir", "-p", str(dest)]] + [
      [
          "gcloud",
          "compute",
          "tpus",
          "tpu-vm",
          "scp",
          f"masc-v4:masc-jax/runs/c100/{f}",
          f"{dest}/",
          *TPU_FLAGS,
          "--worker=0",
      ]
      for f in RESULT_FILES
  ]
  assert not dest.exists()
  assert sandbox.calls() == []


@pytest.mark.parametrize(
    "workdir,remote",
    [
        ("/abs/run", "/abs/run"),
        ("~/runs/a", "runs/a"),
        ("runs/b/", "masc-jax/runs/b"),
    ],
)
def test_fetch_remote_paths(workdir, remote, sandbox):
  result = run(
      "fetch_results.sh",
      f"--workdir={workdir}",
      "--dry-run",
      env=sandbox.env(**TPU),
  )
  assert result.returncode == 0, result.stderr
  scp = gcloud_commands(result.stdout)[0]
  assert scp[5] == f"masc-v4:{remote}/results.md"
  assert scp[6] == f"{REPO}/runs/from_tpu/{Path(remote).name}/"


def test_fetch_from_gcs_needs_no_tpu(sandbox, tmp_path):
  result = run(
      "fetch_results.sh",
      "--workdir=gs://b/runs/c100",
      f"--dest={tmp_path}/o",
      "--dry-run",
      env=sandbox.env(),
  )
  assert result.returncode == 0, result.stderr
  assert gcloud_commands(result.stdout) == [
      ["gcloud", "storage", "cp", f"gs://b/runs/c100/{f}", f"{tmp_path}/o/"]
      for f in RESULT_FILES
  ]


def test_fetch_all(sandbox, tmp_path):
  result = run(
      "fetch_results.sh",
      "--workdir=runs/c100",
      f"--dest={tmp_path}",
      "--all",
      "--dry-run",
      env=sandbox.env(**TPU),
  )
  assert result.returncode == 0, result.stderr
  assert gcloud_commands(result.stdout) == [
      [
          "gcloud",
          "compute",
          "tpus",
          "tpu-vm",
          "scp",
          "--recurse",
          "masc-v4:masc-jax/runs/c100",
          f"{tmp_path}/",
          *TPU_FLAGS,
          "--worker=0",
      ]
  ]


def test_fetch_real_tolerates_a_missing_file(sandbox, tmp_path):
  env = sandbox.env(
      fake_gcloud=True, **TPU, FAKE_GCLOUD_FAIL_MATCH="report.png"
  )
  result = run(
      "fetch_results.sh", "--workdir=runs/c100", f"--dest={tmp_path}/o", env=env
  )
  assert result.returncode == 0, result.stderr
  assert "could not fetch report.png" in result.stderr
  assert [["gcloud", *c] for c in sandbox.calls()] == gcloud_commands(
      result.stdout
  )
  assert (tmp_path / "o").is_dir()


def test_fetch_real_fails_if_nothing_fetched(sandbox, tmp_path):
  env = sandbox.env(fake_gcloud=True, **TPU, FAKE_GCLOUD_FAIL_MATCH="runs/c100")
  result = run(
      "fetch_results.sh", "--workdir=runs/c100", f"--dest={tmp_path}/o", env=env
  )
  assert result.returncode == 1
  assert "nothing fetched" in result.stderr


# --------------------------------------------------------------------------
# prepare_data.sh
# --------------------------------------------------------------------------
def test_prepare_dry_run_with_upload(sandbox, tmp_path):
  venv = tmp_path / "pvenv"
  result = run(
      "prepare_data.sh",
      "cifar100",
      "--gcs-bucket=gs://my-bucket/tfds/",
      f"--venv={venv}",
      "--data-dir=/data/tfds",
      "--dry-run",
      env=sandbox.env(fake_gcloud=True),
  )
  assert result.returncode == 0, result.stderr
  assert commands(result.stdout) == [
      ["python3", "-m", "venv", str(venv)],
      [f"{venv}/bin/python", "-m", "pip", "install", "-e", f"{REPO}[prepare]"],
      [
          f"{venv}/bin/tfds",
          "build",
          "cifar100",
          "--file_format=array_record",
          "--data_dir=/data/tfds",
      ],
      [
          "gcloud",
          "storage",
          "rsync",
          "--recursive",
          "/data/tfds/cifar100",
          "gs://my-bucket/tfds/cifar100",
      ],
  ]
  assert "export TFDS_DATA_DIR=gs://my-bucket/tfds" in result.stdout
  assert not venv.exists()
  assert sandbox.calls() == []


def test_prepare_tensorflow_override(sandbox, tmp_path):
  venv = tmp_path / "pvenv"
  venv_bin = venv / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text("")
  (venv_bin / "python").chmod(0o755)
  result = run(
      "prepare_data.sh",
      "cifar10",
      f"--venv={venv}",
      "--tensorflow=tensorflow==2.20.*",
      "--dry-run",
      env=sandbox.env(),
  )
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  assert "reusing the venv" in result.stdout
  assert cmds[0] == [
      f"{venv}/bin/python",
      "-m",
      "pip",
      "install",
      "-e",
      str(REPO),
      "tensorflow==2.20.*",
  ]


def test_prepare_gcs_data_dir_is_the_upload_target(sandbox):
  env = sandbox.env(TFDS_DATA_DIR="gs://env-bucket/tfds")
  result = run("prepare_data.sh", "cifar10", "--dry-run", env=env)
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  home = env["HOME"]
  assert [
      f"{home}/.cache/masc_jax/prepare-venv/bin/tfds",
      "build",
      "cifar10",
      "--file_format=array_record",
      f"--data_dir={home}/tensorflow_datasets",
  ] in cmds
  assert cmds[-1] == [
      "gcloud",
      "storage",
      "rsync",
      "--recursive",
      f"{home}/tensorflow_datasets/cifar10",
      "gs://env-bucket/tfds/cifar10",
  ]
  assert "export TFDS_DATA_DIR=gs://env-bucket/tfds" in result.stdout


def test_prepare_local_only_flag_overrides_env(sandbox, tmp_path):
  env = sandbox.env(TFDS_DATA_DIR="gs://env-bucket/tfds")
  result = run(
      "prepare_data.sh",
      "cifar100",
      f"--data-dir={tmp_path}/tfds",
      "--no-install",
      "--dry-run",
      env=env,
  )
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  assert len(cmds) == 1 and cmds[0][1:] == [
      "build",
      "cifar100",
      "--file_format=array_record",
      f"--data_dir={tmp_path}/tfds",
  ]
  assert f"export TFDS_DATA_DIR={tmp_path}/tfds" in result.stdout
  assert "gcloud" not in " ".join(cmds[0])


@pytest.mark.parametrize("dataset", ["mnist", "CIFAR100", "imagenet2012"])
def test_prepare_rejects_unknown_dataset(dataset, sandbox):
  result = run(
      "prepare_data.sh", dataset, "--dry-run", env=sandbox.env(fake_gcloud=True)
  )
  assert result.returncode == 2
  assert (
      f"unknown dataset '{dataset}'" in result.stderr
      and "cifar100" in result.stderr
  )
  assert "+ " not in result.stdout
  assert sandbox.calls() == []


@pytest.mark.parametrize(
    "dataset, built",
    [
        ("fashion_mnist", "fashion_mnist"),
        ("tfds:svhn_cropped", "svhn_cropped"),
        ("tfds:emnist/letters", "emnist/letters"),
    ],
)
def test_prepare_fashion_mnist_and_any_tfds_name(dataset, built, sandbox):
  result = run(
      "prepare_data.sh",
      dataset,
      "--data-dir=/data/tfds",
      "--no-install",
      "--dry-run",
      env=sandbox.env(),
  )
  assert result.returncode == 0, result.stderr
  (cmd,) = commands(result.stdout)
  assert cmd[1:] == [
      "build",
      built,
      "--file_format=array_record",
      "--data_dir=/data/tfds",
  ]


@pytest.mark.parametrize(
    "dataset", ["tfds:", "tfds:SVHN", "tfds:svhn cropped", "tfds:mnist:3.0.1"]
)
def test_prepare_rejects_a_bad_tfds_name(dataset, sandbox):
  result = run("prepare_data.sh", dataset, "--dry-run", env=sandbox.env())
  assert result.returncode == 2
  assert "bad TFDS name" in result.stderr and "+ " not in result.stdout


def test_prepare_needs_a_dataset(sandbox):
  result = run("prepare_data.sh", "--dry-run", env=sandbox.env())
  assert result.returncode == 2
  assert "missing DATASET" in result.stderr


def test_prepare_digits_needs_nothing(sandbox):
  result = run("prepare_data.sh", "digits", env=sandbox.env(fake_gcloud=True))
  assert result.returncode == 0
  assert "digits needs no preparation" in result.stdout
  assert "+ " not in result.stdout


def test_prepare_rejects_bad_bucket(sandbox):
  result = run(
      "prepare_data.sh",
      "cifar10",
      "--gcs-bucket=my-bucket",
      "--dry-run",
      env=sandbox.env(),
  )
  assert result.returncode == 2
  assert "gs://BUCKET" in result.stderr


# --------------------------------------------------------------------------
# pack_source.sh
# --------------------------------------------------------------------------
def test_pack_source_packs_what_git_sees(sandbox, tmp_path):
  src = tmp_path / "src"
  (src / "pkg").mkdir(parents=True)
  (src / ".gitignore").write_text("/runs/\n.venv/\n")
  (src / "pkg" / "a.py").write_text("a")
  (src / "gone.py").write_text("deleted later")
  (src / "with space.txt").write_text("s")
  git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "-A"], check=True)
  subprocess.run([*git, "commit", "-qm", "init"], check=True)
  (src / "gone.py").unlink()
  (src / "new.py").write_text("untracked, not ignored")
  (src / "runs").mkdir()
  (src / "runs" / "big.ckpt").write_text("ignored")
  (src / ".venv").mkdir()
  (src / ".venv" / "python").write_text("ignored")
  out = tmp_path / "src.tar.gz"
  result = run("pack_source.sh", str(src), str(out), env=sandbox.env())
  assert result.returncode == 0, result.stderr
  with tarfile.open(out) as tar:
    names = sorted(n.removeprefix("./") for n in tar.getnames())
  assert names == [".gitignore", "new.py", "pkg/a.py", "with space.txt"]
