"""The pre-flight's parts that need no TPU compiler: slice names, HLO reading, the
correction of the cost model's figure, projections, the shape-only dataset, and the
command's bad inputs that are refused before libtpu is touched.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, quick_compile_env
from masc_jax import config_lib
from masc_jax.data import registry, shape_only
from masc_jax.preflight import chips, costs, hlo, report, topology

# A hand-written optimised-HLO text: a fusion of 250 cycles, a while loop of 7
# trips over a body of 100 cycles, two ConcatBitcasts, an AllocateBuffer, an
# all-reduce, and a scalar add without an estimate in the loop body. A metadata
# string that names ConcatBitcast is not a custom call.
SYNTHETIC_HLO = """HloModule jit_f, is_scheduled=true

%fused_computation (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  ROOT %multiply.1 = f32[8]{0} multiply(%param_0, %param_0)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %add = s32[] add(%gte.0, %one)
  %gte.1 = f32[8]{0} get-tuple-element(%p), index=1
  %fusion.1 = f32[8]{0} fusion(%gte.1), kind=kLoop, calls=%fused_computation, backend_config={"window_config":{"estimated_cycles":"100"}}, metadata={op_name="jit(f)/while/body/mul"}
  ROOT %tuple = (s32[], f32[8]{0}) tuple(%add, %fusion.1)
}

%cond (p.1: (s32[], f32[8])) -> pred[] {
  %p.1 = (s32[], f32[8]{0}) parameter(0)
  %gte.2 = s32[] get-tuple-element(%p.1), index=0
  %limit = s32[] constant(7)
  ROOT %lt = pred[] compare(%gte.2, %limit), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0:T(128)} parameter(0)
  %cb.1 = f32[4]{0:T(128)S(1)} custom-call(%x), custom_call_target="ConcatBitcast", backend_config={}
  %cb.2 = f32[4]{0:T(128)S(1)} custom-call(%x), custom_call_target="ConcatBitcast"
  %alloc = f32[4]{0} custom-call(%x), custom_call_target="AllocateBuffer"
  %ar = f32[8]{0} all-reduce(%x), replica_groups={}, to_apply=%fused_computation
  %fusion.2 = f32[8]{0} fusion(%ar), kind=kLoop, calls=%fused_computation, backend_config={"estimated_cycles":"250"}, metadata={op_name="jit(f)/ConcatBitcast_lookalike"}
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %fusion.2)
  %while.1 = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(f)/while"}
  ROOT %out = f32[8]{0} get-tuple-element(%while.1), index=1
}
"""


def test_hlo_counts_custom_calls_by_target():
  assert hlo.count_custom_calls(SYNTHETIC_HLO, "ConcatBitcast") == 2
  assert hlo.count_custom_calls(SYNTHETIC_HLO, "AllocateBuffer") == 1
  assert hlo.count_custom_calls(SYNTHETIC_HLO, "Sharding") == 0


def test_cycle_breakdown_expands_loops_and_names_ops_without_estimate():
  breakdown = hlo.cycle_breakdown(SYNTHETIC_HLO)
  assert breakdown.total_cycles == 250 + 7 * 100
  assert [(op, cycles) for _, op, cycles, _ in breakdown.rows] == [
      ("while x7", 700),
      ("fusion", 250),
  ]
  assert breakdown.rows[0][3] == "jit(f)/while"
  assert breakdown.no_estimate == {
      "custom-call[ConcatBitcast]": 2,
      "custom-call[AllocateBuffer]": 1,
      "all-reduce": 1,
      "add": 1,
  }
  assert breakdown.unknown_trip_counts == 0
  # A loop whose condition is not ``i < constant``: its body is counted once.
  odd = SYNTHETIC_HLO.replace("direction=LT", "direction=NE")
  breakdown = hlo.cycle_breakdown(odd)
  assert breakdown.total_cycles == 250 + 100
  assert breakdown.unknown_trip_counts == 1


class _Compiled:
  """What ``costs.step_time`` reads of a compiled program."""

  def __init__(self, optimal_seconds):
    self.optimal_seconds = optimal_seconds

  def cost_analysis(self):
    return {"optimal_seconds": self.optimal_seconds, "flops": 1e9}


def test_concat_bitcasts_are_added_back_to_the_estimate():
  # Two ConcatBitcasts: the cost model says -2 s + 1.5 ms.
  timing = costs.step_time(_Compiled(-2 + 1.5e-3), SYNTHETIC_HLO)
  assert timing["concat_bitcasts"] == 2
  assert timing["step_seconds"] == pytest.approx(1.5e-3, abs=1e-12)
  assert timing["anomaly"] is None
  assert timing["ops_without_estimate"]["all-reduce"] == 1


@pytest.mark.parametrize("raw", [-2.5, -1.0, 0.5 - 2, 1.5 - 2, None])
def test_an_estimate_outside_0_1_seconds_is_flagged_not_reported(raw):
  timing = costs.step_time(_Compiled(raw), SYNTHETIC_HLO)
  if raw == 0.5 - 2:  # 0.5 s: inside (0, 1) s, not flagged
    assert timing["anomaly"] is None and timing["step_seconds"] == 0.5
    return
  assert timing["step_seconds"] is None
  assert timing["anomaly"]


def test_out_of_memory_message_is_parsed_in_binary_units():
  message = (
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
      "for HLO temporaries (27.20G) exceeds available HBM (15.75G)."
  )
  assert chips.out_of_memory(message) == {
      "required_bytes": round(27.20 * 2**30),
      "available_bytes": round(15.75 * 2**30),
  }
  assert chips.out_of_memory("INVALID_ARGUMENT: something else") is None


@pytest.mark.parametrize(
    "name, libtpu_name, host, hosts, chips_",
    [
        ("v5e-1", "v5e:1x1", (1, 1, 1), 1, 1),
        ("v5e-4", "v5e:2x2", (2, 2, 1), 1, 4),
        ("v5e-8", "v5e:2x4", (2, 4, 1), 1, 8),
        ("v5litepod-16", "v5e:4x4", (2, 2, 1), 4, 16),
        ("v5e:4x4", "v5e:4x4", (2, 2, 1), 4, 16),
        ("v6e-8", "v6e:2x4", (2, 4, 1), 1, 8),
        ("v6e-16", "v6e:4x4", (2, 2, 1), 4, 16),
        ("v4-8", "v4:2x2x1", (2, 2, 1), 1, 4),
        ("V4-16", "v4:2x2x2", (2, 2, 1), 2, 8),
        ("v4:2x2x2", "v4:2x2x2", (2, 2, 1), 2, 8),
        ("v5p-16", "v5p:2x2x2", (2, 2, 1), 2, 8),
    ],
)
def test_slice_names_map_to_libtpu_topologies_and_cloud_hosts(
    name, libtpu_name, host, hosts, chips_
):
  tpu_slice = topology.parse_slice(name)
  assert tpu_slice.libtpu_topology == libtpu_name
  assert tpu_slice.chips_per_host == host
  assert (tpu_slice.hosts, tpu_slice.chips) == (hosts, chips_)
  megacore = tpu_slice.libtpu_options.get("chip_config_name") == "megacore"
  assert megacore == libtpu_name.startswith("v4")


@pytest.mark.parametrize(
    "name", ["", "v5e", "v9x-8", "v5e-6", "v4-7", "v4-6", "v5e:2x2x2", "v4:2x2"]
)
def test_unknown_slice_names_are_one_line(name):
  with pytest.raises(topology.TopologyError) as e:
    topology.parse_slice(name)
  assert "\n" not in str(e.value) and "unknown TPU slice" in str(e.value)


def test_projection_is_steps_times_runs_times_the_estimate():
  programs = [
      {"stage": "a", "kind": "train", "runs_per_step": 3, "step_seconds": 2e-3},
      {"stage": "a", "kind": "eval", "runs_per_step": 3, "step_seconds": 5e-3},
      {"stage": "b", "kind": "train", "runs_per_step": 1, "step_seconds": None},
  ]
  lengths = [
      {"stage": "a", "steps": 100, "eval_batches": 20},
      {"stage": "b", "steps": 10, "eval_batches": 20},
  ]
  rows, total = report.projections(programs, lengths)
  assert rows[0]["train_seconds"] == pytest.approx(100 * 3 * 2e-3)
  assert rows[0]["eval_seconds"] == pytest.approx(20 * 3 * 5e-3)
  assert rows[0]["seconds"] == pytest.approx(0.6 + 0.3)
  assert rows[1]["seconds"] is None and total is None
  rows, total = report.projections(programs[:2], lengths[:1])
  assert total == pytest.approx(0.9)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion_mnist"])
def test_shape_only_dataset_has_the_real_splits_shapes_and_no_pixels(name):
  info = registry.DATASETS[name]
  ds = shape_only.shape_only_dataset(name)
  train, test = shape_only.BALANCED_SPLITS[name]
  assert ds.train_images.shape == (train,) + info.image_shape
  assert ds.test_images.shape == (test,) + info.image_shape
  for labels, size in ((ds.train_labels, train), (ds.test_labels, test)):
    counts = np.bincount(labels, minlength=info.num_classes)
    assert (counts == size // info.num_classes).all()
  # Broadcast views of one zero: no memory behind the images.
  assert ds.train_images.strides == (0, 0, 0, 0) and not ds.train_images.any()
  np.testing.assert_array_equal(ds.mean, np.asarray(info.mean, np.float32))


def test_conv_impl_tuned_is_refused_for_a_tpu():
  from masc_jax.preflight import programs

  config = config_lib.load_config("tiny", ["model.conv_impl=tuned"])
  with pytest.raises(config_lib.ConfigError, match="use model.conv_impl=auto"):
    programs.resolve_for_backend(config, "tpu")
  resolved = programs.resolve_for_backend(
      config_lib.load_config("tiny", ["seeds=0,1"]), "tpu"
  )
  assert (resolved.agent_map, resolved.member_map) == ("vmap", "vmap")


def test_without_libtpu_the_command_says_how_to_install_it(
    tmp_path, capsys, monkeypatch
):
  """One line with the install command, exit 2, nothing written (in-process, as main runs)."""
  from absl import flags

  from masc_jax import main as main_module

  monkeypatch.setitem(sys.modules, "libtpu", None)  # ``import libtpu`` fails
  flags.FLAGS.unparse_flags()
  argv = [
      "m",
      "--config=tiny",
      "--compile_for=v5e-8",
      f"--workdir={tmp_path}/run",
  ]
  with pytest.raises(SystemExit) as exit_:
    main_module.main(main_module.parse_flags(argv))
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.strip() == (
      "error: compiling for a TPU slice needs libtpu, the TPU compiler: "
      'pip install -e ".[tpu]" (Linux x86-64; no TPU needed)'
  )
  assert os.listdir(tmp_path) == []


def test_the_preflight_compiles_the_runs_own_programs():
  """On a 4-device CPU mesh: the pre-flight's programs (no data, shapes only) and
  the training loop's (real data, state, batch and key) compile to the same text
  with the same shardings, and the pre-flight's train step run on the loop's
  inputs gives bit for bit what the loop's compiled step gives
  (tests/preflight_worker.py). The three kinds of step, for two members (the
  member axis split over the mesh).
  """
  args = ["ablations=False", "seeds=0,1"]
  out = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "tests", "preflight_worker.py"),
          "tiny",
      ]
      + args,
      cwd=REPO,
      env=quick_compile_env({**os.environ, "JAX_NUM_CPU_DEVICES": "4"}),
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  found = json.loads(out.stdout.strip().splitlines()[-1])
  assert list(found) == ["experts", "collective", "altruism"]
  for stage, kinds in found.items():
    assert kinds["train"]["same_step_outputs"] is True, stage
    for kind, same in kinds.items():
      assert same["devices"] == 4, (stage, kind)
      assert all(v is True for k, v in same.items() if k != "devices"), (
          stage,
          kind,
          same,
      )


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_program_inputs_of_arrays_and_of_their_shapes_agree(strategy):
  """``MemberAxis.program_inputs``: the loop passes arrays, the pre-flight their
  shapes; both give the same shapes and shardings (member 0's slices, in turn).
  """
  import jax

  from masc_jax.training import population

  members = population.MemberAxis(
      [config_lib.Member(seed=s) for s in (0, 1, 2)], strategy
  )
  sharded = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  example = (
      {"w": np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)},
      np.arange(3 * 5, dtype=np.int32).reshape(3, 5),
      np.ones((3, 2), np.uint32),
  )
  frozen, hparams = {"f": np.zeros((3, 7), np.float32)}, {}
  arrays = jax.device_put((example, frozen, hparams), sharded)
  shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      arrays,
  )
  from_arrays = members.program_inputs(*arrays)
  from_shapes = members.program_inputs(*shapes)
  lead = () if members.in_turn else (3,)
  assert [x.shape for x in jax.tree.leaves(from_arrays)] == [
      lead + (4, 2),
      lead + (5,),
      lead + (2,),
      lead + (7,),
  ]
  if members.in_turn:  # member 0's slice
    np.testing.assert_array_equal(from_arrays[0]["w"], example[0]["w"][0])
  assert jax.tree.structure(from_arrays) == jax.tree.structure(from_shapes)
  for a, s in zip(jax.tree.leaves(from_arrays), jax.tree.leaves(from_shapes)):
    assert (a.shape, a.dtype) == (s.shape, s.dtype)
    assert a.sharding.is_equivalent_to(s.sharding, a.ndim)
