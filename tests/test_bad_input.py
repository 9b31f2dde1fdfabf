"""Bad command lines, tried as a new user would: one line on stderr, exit 2, nothing written.

Each case runs ``masc_jax.main``'s flag parser and ``main`` in this process
(absl's flags reset between cases), which is what ``python -m masc_jax.main``
runs, without paying an interpreter start per case.
"""

import contextlib
import os
import subprocess

import pytest

from conftest import MID_STAGE_CHECKPOINTS, run_main, main_in_process as run

FILE = "{tmp}/a_file"


@pytest.mark.parametrize(
    "argv, message",
    [
        # the three lines the multi-host issue found
        (
            ["--config=tiny", f"--workdir={FILE}"],
            f"--workdir={FILE} exists and is not a directory",
        ),
        (
            ["--config=digits:foo"],
            "config 'digits:foo' did not load: digits config takes no argument, got 'foo'",
        ),
        (
            ["--config=tiny", "--config.batch_sizee=3"],
            "bad config override: no such field 'batch_sizee' Did you mean \"batch_size\"",
        ),
        # the workdir
        (
            ["--config=tiny", f"--workdir={FILE}/run"],
            f"{FILE} is a file, not a directory",
        ),
        (["--config=tiny", "--workdir="], "--workdir is empty"),
        (["--config=tiny", "--workdir=  "], "--workdir is empty"),
        (
            ["--config=tiny", "--workdir=ftp://host/run"],
            "the scheme ftp:// is not supported",
        ),
        # the config and its fields: wrong types, empty values, unknown names
        (["--config="], "--config is required"),
        ([], "--config is required"),
        (["--config=nope"], "unknown config 'nope'"),
        (["--config={tmp}/missing.py"], "unknown config"),
        (
            ["--config=tiny", "--config.batch_size=abc"],
            "bad config override: flag --config.batch_size=abc",
        ),
        (
            ["--config=tiny", "--config.batch_size="],
            "bad config override: flag --config.batch_size=",
        ),
        (
            ["--config=tiny", "--config.seed=1.5"],
            "bad config override: flag --config.seed=1.5",
        ),
        (
            ["--config=tiny", "--config.model.expert_widths=abc"],
            "model.expert_widths must be",
        ),
        (
            ["--config=tiny", "--config.optim.learning_rate=-1"],
            "optim.learning_rate must be a number",
        ),
        (
            ["--config=tiny", "--config.epochs.experts=0"],
            "epochs.experts must be an integer >= 1",
        ),
        (
            ["--config=tiny", "--config.num_agents=3"],
            "num_agents=3 does not divide",
        ),
        (
            ["--config=tiny", "--config.routing=nope"],
            "routing must be one of energy, msp, energy_margin",
        ),
        (["--config=tiny", "--config.loss.cc="], "loss.cc must be one of"),
        (
            ["--config=tiny", "--config.loss.ra_teacher=nope"],
            "loss.ra_teacher must be one of",
        ),
        (["--config=tiny", "--config.dataset=mnist"], "dataset must be one of"),
        (
            ["--config=tiny", "--config.agent_map=pmap"],
            "agent_map must be one of",
        ),
        (
            ["--config=tiny", f"--config.data_dir={FILE}"],
            f"data_dir={FILE} is not a directory",
        ),
        (
            ["--config=tiny", "--config.batch_size=1000"],
            "fewer than batch_size=1000",
        ),
        (
            ["--config=tiny", "--config.num_devices=2"],
            "num_devices=2 but only 1 devices are visible",
        ),
        # populations: seed lists and sweeps
        (
            ["--config=tiny", "--config.sweep=model.dropout_rate=0.1,0.2"],
            "cannot sweep model.dropout_rate: it changes array shapes or step counts",
        ),
        (
            ["--config=tiny", "--config.sweep=batch_size=16,32"],
            "cannot sweep batch_size: it changes",
        ),
        (
            ["--config=tiny", "--config.sweep=loss.cc=1,2"],
            "cannot sweep loss.cc; sweepable settings:",
        ),
        (
            ["--config=tiny", "--config.sweep=optim.learning_rate"],
            "sweep entries are FIELD=V1,V2",
        ),
        (
            ["--config=tiny", "--config.sweep=optim.learning_rate=0.1,x"],
            "sweep values of optim.learning_rate must be numbers",
        ),
        (
            ["--config=tiny", "--config.sweep=optim.learning_rate=0.1,-1"],
            "sweep: optim.learning_rate must be a number in (0.0, inf), got -1.0",
        ),
        (
            ["--config=tiny", "--config.seeds=0,x"],
            "seeds must be comma-separated integers >= 0",
        ),
        (["--config=tiny", "--config.seeds=1,1"], "seeds lists seed 1 twice"),
        (
            ["--config=digits", "--config.seed=4"],
            "seed=4 is for a single run but this config trains seeds 0,1,2 (config.seeds): "
            "pass --config.seeds=4 for one seed",
        ),
        (
            ["--config=tiny", "--config.member_map=pmap"],
            "member_map must be one of",
        ),
        # watching a run
        (
            ["--config=tiny", "--config.eval_every_epochs=-1"],
            "invalid config: eval_every_epochs must be an integer >= 0, got -1",
        ),
        (
            ["--config=tiny", "--config.eval_every_epochs=2.5"],
            "bad config override: flag --config.eval_every_epochs=2.5",
        ),
        (
            ["--config=tiny", "--config.profile_steps=10"],
            "invalid config: profile_steps must be START:COUNT (the first step to "
            "trace, from 0, and how many steps), e.g. 10:5, or empty (off); got '10'",
        ),
        (
            ["--config=tiny", "--config.profile_steps=-1:5"],
            "profile_steps must be START:COUNT",
        ),
        (
            ["--config=tiny", "--config.profile_steps=10:0"],
            "invalid config: profile_steps=10:0: COUNT must be at least 1",
        ),
        (
            ["--config=tiny", "--config.tensorboard=maybe"],
            "bad config override: flag --config.tensorboard=maybe",
        ),
        # other flags
        (
            ["--config=tiny", "--nosuchflag"],
            "Unknown command line flag 'nosuchflag'",
        ),
        (["--config=tiny", "stray"], "unexpected arguments: stray"),
        (
            ["--config=tiny", "--num_processes=2"],
            "--coordinator_address, --process_id missing",
        ),
        (
            [
                "--config=tiny",
                "--coordinator_address=localhost:1234",
                "--num_processes=2",
                "--process_id=2",
            ],
            "--process_id=2 must be between 0 and num_processes - 1 = 1",
        ),
        (
            [
                "--config=tiny",
                "--coordinator_address=localhost",
                "--num_processes=2",
                "--process_id=0",
            ],
            "--coordinator_address='localhost' must be HOST:PORT",
        ),
        (
            ["--config=tiny", "--coordinator_address=localhost:1234"],
            "needs --num_processes and --process_id, or --multihost",
        ),
        (["--config=tiny", "--num_processes=x"], "--num_processes"),
        # the pre-flight (--compile_for): refused before libtpu is needed
        (
            ["--config=tiny", "--compile_for=v9x-8"],
            "unknown TPU slice 'v9x-8': use a Cloud TPU type such as v5e-8",
        ),
        (
            ["--config=tiny", "--compile_for=v5e-6"],
            "unknown TPU slice 'v5e-6': use one of v5e-1, v5e-4, v5e-8, v5e-16",
        ),
        (["--config=tiny", "--compile_for="], "--compile_for is empty"),
        (
            ["--config=tiny", "--preflight_top=3"],
            "--preflight_top and --preflight_stages go with --compile_for=SLICE",
        ),
        (
            ["--config=tiny", "--compile_for=v5e-8", "--preflight_top=-1"],
            "--preflight_top must be >= 0, got -1",
        ),
    ],
)
def test_bad_command_lines_give_one_line_and_exit_2_writing_nothing(
    tmp_path, capsys, argv, message
):
  with open(tmp_path / "a_file", "w") as f:
    f.write("not a folder")
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  message = message.replace("{tmp}", str(tmp_path))
  if not any(a.startswith("--workdir") for a in argv):
    argv.append(f"--workdir={tmp_path}/run")
  before = sorted(os.listdir(tmp_path))
  assert run(argv) == 2
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert lines[0].startswith("error: ") and message in lines[0], err
  # One line, or a list of problems under one heading line.
  assert all(l.startswith("  ") for l in lines[1:]), err
  assert "Traceback" not in err
  assert sorted(os.listdir(tmp_path)) == before
  assert not os.path.exists(os.path.join(os.getcwd(), "ftp:"))


@pytest.mark.parametrize(
    "fault", ["NAN:compiled:collective", "KILL:nowhere:*", "TERM:step:*:0"]
)
def test_a_malformed_fault_injection_is_one_line_and_exit_2(
    tmp_path, capsys, monkeypatch, fault
):
  monkeypatch.setenv("MASC_FAULT", fault)
  assert run(["--config=tiny", f"--workdir={tmp_path}/run"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: MASC_FAULT={fault!r}: expected") and (
      len(err.strip().splitlines()) == 1
  )
  assert os.listdir(tmp_path) == []


@contextlib.contextmanager
def tmpfs(path, options):
  """A small tmpfs at ``path`` (root only: skipped where mounting is not allowed)."""
  os.makedirs(path)
  mounted = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
      capture_output=True,
  )
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=True)


def test_a_workdir_on_a_read_only_filesystem_is_refused(tmp_path, capsys):
  with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
    assert run(["--config=tiny", f"--workdir={ro}/run"]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"error: --workdir={ro}/run cannot be created: {ro} is not writable"
    )
    assert os.listdir(ro) == []


def test_a_full_filesystem_stops_the_run_with_one_line(tmp_path):
  """Room for config.json and the lock, not for a checkpoint: one accurate line.

  In a subprocess, as a user sees it: Orbax's writer threads log the failure
  with tracebacks, which must not reach the console.
  """
  with tmpfs(tmp_path / "full", "size=48k") as full:
    # Checkpoints inside the first stage, so that a save is the first write
    # that does not fit (before the logs of a whole stage have filled the disk).
    result = run_main(
        [
            "--config=tiny",
            f"--workdir={full}/run",
            "--config.ablations=False",
            f"--config.{MID_STAGE_CHECKPOINTS}",
        ]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (
        f"error: could not write a checkpoint to {full}/run/checkpoints: "
        "no space left on device; no checkpoint was written yet"
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stdout
