"""Several processes, one run: JAX's multi-controller runtime with gloo collectives, on this machine.

Two local processes with two CPU devices each are what two hosts of a slice
run (``masc_jax.launch_local``); one process with four devices is the same mesh
in one process. It joins the same collectives (gloo, a one-process
``jax.distributed`` run), so the two compute bit for bit the same: which process
holds a device does not change the order of any sum. (XLA's in-process
collectives add in another order, a difference of rounding, like another device
count; and a process with more devices than the machine has cores splits large
loops into more tasks, which can round differently, though not at tiny's
sizes: BUILD_NOTES "Design: several processes".) Every run is the tiny config
without the ablations, through ``python -m masc_jax.main``; all runs share one
persistent compilation cache, so each program compiles once for the module.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import COMPARED, REPO, quick_compile_env
from masc_jax import launch_local

MAIN_ARGS = [
    "--config=tiny",
    "--config.ablations=False",
    "--config.batch_size=32",
]


def test_process_flags_come_from_the_flags_then_the_environment():
  from masc_jax.parallel import multihost

  assert not multihost.process_spec(environ={}).enabled
  assert multihost.process_spec(auto=True, environ={}).enabled
  env = {
      "JAX_COORDINATOR_ADDRESS": "host0:1234",
      "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3",
  }
  spec = multihost.process_spec(environ=env)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id) == (
      "host0:1234",
      4,
      3,
  )
  assert multihost.process_spec(process_id=1, environ=env).process_id == 1
  with pytest.raises(
      multihost.ProcessSpecError,
      match=r"JAX_NUM_PROCESSES='four' must be a whole number",
  ):
    multihost.process_spec(environ={**env, "JAX_NUM_PROCESSES": "four"})
  with pytest.raises(
      multihost.ProcessSpecError,
      match=r"--heartbeat_timeout_s=0 must be at least 1",
  ):
    multihost.process_spec(heartbeat_timeout_s=0, environ=env)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  return quick_compile_env(
      {
          **os.environ,
          "JAX_COMPILATION_CACHE_DIR": cache,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PLATFORMS": "cpu",
      }
  )


def two_processes(env, workdir, *extra, fault=None):
  """``launch_local`` with 2 processes x 2 devices; the finished Popen, its ``output`` read."""
  cmd = [
      sys.executable,
      "-m",
      "masc_jax.launch_local",
      "--num_processes=2",
      "--devices_per_process=2",
      "--heartbeat_timeout_s=10",
      "--grace_s=30",
      "--",
      *MAIN_ARGS,
      f"--workdir={workdir}",
      *extra,
  ]
  proc = subprocess.Popen(
      cmd,
      cwd=REPO,
      env={**env, **({"MASC_FAULT": fault} if fault else {})},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  proc.output = proc.communicate(timeout=600)[0]
  return proc


def slurm_step(env, workdir, *extra):
  """Two processes started as a 2-task SLURM step on localhost, joined by ``--multihost``."""
  job_id = str(
      os.getpid() * 7919 % 1_000_000
  )  # JAX derives the coordinator port from it
  procs = []
  for rank in (0, 1):
    slurm = {
        "SLURM_JOB_ID": job_id,
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "JAX_NUM_CPU_DEVICES": "2",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    }
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "masc_jax.main",
                *MAIN_ARGS,
                f"--workdir={workdir}",
                "--multihost",
                "--heartbeat_timeout_s=10",
                *extra,
            ],
            cwd=REPO,
            env={**env, **slurm},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  return [(p, *p.communicate(timeout=600)) for p in procs]


def one_process(env, workdir, *extra, fault=None):
  """``python -m masc_jax.main`` in one process with 4 CPU devices and gloo collectives."""
  ((extra_env, cmd),) = launch_local.commands(
      [*MAIN_ARGS, f"--workdir={workdir}", *extra],
      1,
      4,
      launch_local.free_port(),
      heartbeat_timeout_s=10,
  )
  return subprocess.run(
      cmd,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env={**env, **extra_env, **({"MASC_FAULT": fault} if fault else {})},
  )


def results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def assert_same_results(a, b):
  (a,), (b,) = a["members"], b["members"]
  for key in COMPARED:
    assert a[key] == b[key], key


def process_lines(output, index):
  """Lines of process ``index`` in launch_local's output (process 0's are unprefixed)."""
  prefix = f"[process {index}] "
  if index:
    return [
        l[len(prefix) :] for l in output.splitlines() if l.startswith(prefix)
    ]
  return [l for l in output.splitlines() if not l.startswith("[process ")]


def steps_of(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def start_two(env, workdir, kill_process_1_at=None):
  """Both processes of a 2 x 2 run, started by hand (so one of them can be killed alone)."""
  plan = launch_local.commands(
      [*MAIN_ARGS, f"--workdir={workdir}"],
      2,
      2,
      launch_local.free_port(),
      heartbeat_timeout_s=10,
  )
  procs = []
  for index, (extra, cmd) in enumerate(plan):
    fault = (
        {"MASC_FAULT": kill_process_1_at}
        if index == 1 and kill_process_1_at
        else {}
    )
    procs.append(
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, **extra, **fault},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  return procs


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """The run never stopped, in one process with 4 devices: ``(workdir, stdout)``."""
  workdir = str(tmp_path_factory.mktemp("one"))
  single = one_process(env, workdir)
  assert single.returncode == 0, single.stderr[-3000:]
  return workdir, single.stdout


def test_a_run_moves_between_process_counts_and_survives_preemption_and_a_lost_process(
    env, reference, tmp_path
):
  """One run, stage by stage: 2 processes, then 1, then 2 again, then 2 after a lost process.

  Every stop resumes from the last committed checkpoint, and the run ends with
  the tables of the uninterrupted one-process run: what 2 processes x 2
  devices compute is what 1 process x 4 devices computes.
  """
  workdir = str(tmp_path / "run")
  # 1. Two processes; SIGTERM reaches both after the experts' stage-end save: both save one
  #    checkpoint at the step they agree on and exit 143.
  a = two_processes(env, workdir, fault="TERM:stage_saved:experts:1")
  assert a.returncode == 143, a.output[-3000:]
  assert (
      "SIGTERM: saved a checkpoint at stage collective, step 0; exiting"
      in a.output
  )
  experts_end = max(steps_of(workdir))
  # 2. One process resumes the two processes' checkpoint; stopped after the collective.
  b = one_process(env, workdir, fault="TERM:stage_saved:collective:1")
  assert b.returncode == 143, b.stderr[-3000:]
  assert (
      f"resumed from checkpoint {experts_end}: stage collective, step 0"
      in b.stdout
  )
  assert "[experts]" not in b.stdout
  collective_end = max(steps_of(workdir))
  # 3. Two processes resume the one process's checkpoint; process 1 is killed mid-stage.
  procs = start_two(env, workdir, kill_process_1_at="KILL:step:altruism:3")
  _, err1 = procs[1].communicate(timeout=600)
  killed_at = time.monotonic()
  assert procs[1].returncode == -signal.SIGKILL, err1[-3000:]
  out0, err0 = procs[0].communicate(timeout=120)
  waited = time.monotonic() - killed_at
  assert (
      f"resumed from checkpoint {collective_end}: stage altruism, step 0"
      in out0
  )
  # Process 0 stops, bounded: at once when a collective finds the connection closed
  # (masc_jax's line), else when the coordination service misses process 1's heartbeats
  # for 10 s (JAX's message, naming the task).
  assert procs[0].returncode != 0 and waited < 10 + 20, (
      procs[0].returncode,
      waited,
  )
  ours = "error: process 0 of 2 lost process 1 of this run" in err0
  jax_heartbeat = (
      "stopped sending heartbeats):\n1\n" in err0
      or "Task 1 heartbeat timeout" in err0
  )
  assert ours or jax_heartbeat, err0[-3000:]
  # 4. Both restarted: the run finishes from the last committed checkpoint.
  d = two_processes(env, workdir)
  assert d.returncode == 0, d.output[-3000:]
  assert any(
      l.startswith("resumed from checkpoint")
      for l in process_lines(d.output, 0)
  )
  assert any(
      l.startswith("[altruism] done:") for l in process_lines(d.output, 0)
  )
  assert_same_results(results(workdir), results(reference[0]))
  # Process 1 trains silently: no progress line, no table, no error.
  assert not [
      l
      for l in process_lines(d.output, 1)
      if l.startswith(("[experts]", "[collective]", "[altruism]", "|", "error"))
  ]
  # One writer: over the four runs every record of metrics.jsonl was written once, as in
  # the run never stopped, with the same values to the last bit (all but the speeds).
  with (
      open(os.path.join(workdir, "metrics.jsonl")) as f,
      open(os.path.join(reference[0], "metrics.jsonl")) as g,
  ):
    key = lambda r: (r["stage"], r.get("step", -1), "eval" in r)
    values = lambda r: {
        k: v for k, v in r.items() if k not in ("images_per_s", "seconds")
    }
    ours, theirs = (
        [values(r) for r in sorted(map(json.loads, lines), key=key)]
        for lines in (f, g)
    )
    assert [key(r) for r in ours] == [key(r) for r in theirs]
    assert ours == theirs
  assert sorted(os.listdir(workdir)) == sorted(os.listdir(reference[0]))


def test_a_second_run_is_refused_by_every_one_of_its_processes(env, tmp_path):
  """The workdir is locked by a live run (held here through the library's own lock); a
  two-process run started as a SLURM step, which JAX joins through ``--multihost``, stops
  in both processes with masc_jax's one line. (A run is never refused by its own lock:
  every two-process run above holds it.)"""
  from masc_jax.training import workdir as workdir_lib

  workdir = str(tmp_path / "run")
  with workdir_lib.workdir_lock(workdir):
    refused = slurm_step(env, workdir)
  for proc, _, err in refused:
    assert proc.returncode == 2, err[-3000:]
    assert [
        l
        for l in err.splitlines()
        if l.startswith("error: another run is writing")
    ], err
  assert sorted(os.listdir(workdir)) == [".lock"]  # nothing written
