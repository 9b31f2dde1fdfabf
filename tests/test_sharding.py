"""Agents across devices: 8 forced CPU devices in subprocesses (JAX fixes its device count at import)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, quick_compile_env

WORKER = os.path.join(REPO, "tests", "sharding_worker.py")


def run_worker(*args):
  env = quick_compile_env({**os.environ, "JAX_NUM_CPU_DEVICES": "8"})
  out = subprocess.run(
      [sys.executable, WORKER, *map(str, args)],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stage_steps():
  """Every stage's first steps on 1, 4 and 3 of 8 forced CPU devices (one worker)."""
  return run_worker("steps", "-")


def test_every_stage_step_sharded_over_4_devices_matches_one_device(
    stage_steps,
):
  out = stage_steps
  one, four = out["one"], out["four"]
  assert one["mesh"] == {"members": 1, "agents": 1, "data": 1}
  assert four["mesh"] == {"members": 1, "agents": 2, "data": 2}
  for stage, losses in one["losses"].items():
    # A single run: one member.
    assert four["sharded"][stage]["members"] == 1, stage
    np.testing.assert_allclose(
        four["losses"][stage], losses, rtol=1e-5, atol=1e-5, err_msg=stage
    )
    for a, b in zip(one["params"][stage], four["params"][stage]):
      np.testing.assert_allclose(
          np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5, err_msg=stage
      )
    placed = four["sharded"][stage]
    assert placed["devices"] == 4, stage
    if stage.startswith(("experts", "altruism")):
      # Stacked agents: each device holds one agent's slice (K=2 over an agent axis of 2).
      assert placed["shard_rows"] == placed["rows"] // 2, stage
    else:
      # The collective is replicated: every device holds the whole array.
      assert placed["shard_rows"] == placed["rows"], stage


def test_device_counts_that_split_nothing_evenly_match_one_device(stage_steps):
  """3 devices, K=2, batch 16: no axis divides, the batches stay whole on every device."""
  out = stage_steps
  one, three = out["one"], out["three"]
  assert three["mesh"] == {"members": 1, "agents": 1, "data": 3}
  for stage, losses in one["losses"].items():
    np.testing.assert_allclose(
        three["losses"][stage], losses, rtol=1e-5, atol=1e-5, err_msg=stage
    )
    for a, b in zip(one["params"][stage], three["params"][stage]):
      np.testing.assert_allclose(
          np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5, err_msg=stage
      )


def test_population_members_spread_over_devices_match_one_device(tmp_path):
  """Two members over 4 devices (one member per pair of devices), over 6 (3 per
  member, a batch that does not split), and in turn over 3: each member's steps
  match one device's."""
  out = run_worker("population", tmp_path)
  one = out["one"]
  assert out["finite_replicated"]
  assert out["four"]["mesh"] == {"members": 2, "agents": 2, "data": 1}
  assert out["six"]["mesh"] == {"members": 2, "agents": 1, "data": 3}
  assert out["loop_three"]["mesh"] == {"members": 1, "agents": 1, "data": 3}
  for name in ("four", "six", "loop_three"):
    for stage, losses in one["losses"].items():
      np.testing.assert_allclose(
          out[name]["losses"][stage],
          losses,
          rtol=1e-5,
          atol=1e-5,
          err_msg=f"{name} {stage}",
      )
      for a, b in zip(one["params"][stage], out[name]["params"][stage]):
        np.testing.assert_allclose(
            np.asarray(b),
            np.asarray(a),
            rtol=1e-4,
            atol=1e-5,
            err_msg=f"{name} {stage}",
        )
      placed = out[name]["sharded"][stage]
      # Batched, the member axis is split: each device holds one member's slice. In
      # turn, every device holds both members (the mesh has no member axis).
      assert placed["members"] == 2, (name, stage)
      assert placed["member_shard"] == (2 if name == "loop_three" else 1), (
          name,
          stage,
      )


def _close(a, b):
  (a,), (b,) = a["members"], b["members"]
  for row in a["rows"]:
    for col in ("expert", "general"):
      np.testing.assert_allclose(
          b["rows"][row][col],
          a["rows"][row][col],
          atol=0.02,
          err_msg=f"{row} {col}",
      )
  for name, value in a["collective_accuracy"].items():
    assert abs(b["collective_accuracy"][name] - value) <= 0.02, name


@pytest.fixture(scope="module")
def one_device_results(tmp_path_factory):
  return run_worker("e2e", tmp_path_factory.mktemp("one"), 1)


def test_end_to_end_on_4_devices_matches_1_device(one_device_results, tmp_path):
  _close(one_device_results, run_worker("e2e", tmp_path, 4))


def test_checkpoint_written_on_4_devices_resumes_on_1(
    one_device_results, tmp_path
):
  """Saved on a 2x2 mesh after the experts stage; resumed on 1 device with another agent strategy."""
  saved = run_worker("partial", tmp_path)
  assert saved["mesh"] == {"members": 1, "agents": 2, "data": 2}
  resumed = run_worker("e2e", tmp_path, 1, "agent_map=unroll")
  assert (
      f"resumed from checkpoint {saved['global_step']}: stage collective, step 0"
      in resumed["log"]
  )
  assert not any(line.startswith("[experts]") for line in resumed["log"])
  # The experts are the ones trained on 4 devices, bit for bit: restored, not retrained.
  assert resumed["experts_checksum"] == saved["experts_checksum"]
  _close(one_device_results, resumed)
