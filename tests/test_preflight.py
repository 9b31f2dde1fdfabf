"""The pre-flight against the TPU compiler: libtpu compiles for TPU slices on this host.

No TPU is needed, only the libtpu package (the test extra installs it on Linux
x86-64). The tiny config's programs are compiled once for a single-host slice
and checked against what the compiled objects say; a multi-host slice and a
program too big for HBM go through the command as a user runs it.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip(
    "libtpu",
    reason='the TPU compiler (libtpu) is not installed: pip install -e ".[test]" '
    "on Linux x86-64 installs it",
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from conftest import REPO  # noqa: E402
from masc_jax import config_lib  # noqa: E402
from masc_jax.data import augment  # noqa: E402
from masc_jax.preflight import command, costs, hlo, topology  # noqa: E402

GIB = 2**30
STAGES = (
    "experts",
    "collective",
)  # a stacked and a replicated model, both batch kinds


@pytest.fixture(scope="module")
def tiny_on_v5e_4(tmp_path_factory):
  """The tiny config's first two stages compiled for a v5e-4 (compiled programs kept)."""
  workdir = str(tmp_path_factory.mktemp("preflight_tiny"))
  check = command.Preflight(
      config_lib.load_config("tiny"),
      "tiny",
      "v5e-4",
      stages=STAGES,
      top=5,
      keep_compiled=True,
  )
  lines = []
  report = check.run(workdir, log=lines.append)
  return check, report, workdir, lines


def run_command(args, tmp_path, env_extra=None):
  out = subprocess.run(
      [sys.executable, "-m", "masc_jax.main", "--config=tiny", *args],
      cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO, **(env_extra or {})},
      capture_output=True,
      text=True,
      timeout=600,
  )
  return out.returncode, out.stdout, out.stderr


def test_report_fields_are_what_the_compiled_programs_say(tiny_on_v5e_4):
  check, report, _, _ = tiny_on_v5e_4
  assert report["complete"] and report["failures"] == 0
  assert [(p["stage"], p["kind"]) for p in report["programs"]] == [
      (stage, kind) for stage in STAGES for kind in ("train", "eval")
  ]
  # The compiler's own limit for a v5e: 15.75 GiB per chip.
  assert report["slice"]["usable_hbm_bytes"] == round(15.75 * GIB)
  assert report["slice"]["usable_hbm_source"] == "stated by the compiler"
  for entry in report["programs"]:
    compiled = check.compiled[(entry["stage"], entry["kind"])]
    memory = compiled.memory_analysis()
    mem = entry["memory"]
    assert mem["argument_bytes"] == memory.argument_size_in_bytes
    assert mem["output_bytes"] == memory.output_size_in_bytes
    assert mem["alias_bytes"] == memory.alias_size_in_bytes
    assert mem["temp_bytes"] == memory.temp_size_in_bytes
    assert mem["total_bytes"] == (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    assert mem["fraction_of_usable"] == pytest.approx(
        mem["total_bytes"] / (15.75 * GIB)
    )
    cost = compiled.cost_analysis()
    assert entry["xla_flops_per_device"] == cost["flops"]
    assert entry["optimal_seconds_raw"] == cost["optimal_seconds"]
    # The count read from the text another way than the report's parser does.
    count = compiled.as_text().count('custom_call_target="ConcatBitcast"')
    assert entry["concat_bitcasts"] == count
    assert entry["step_seconds"] == pytest.approx(
        cost["optimal_seconds"] + count, rel=1e-12
    )
    assert 0 < entry["step_seconds"] < 1 and entry["anomaly"] is None
    # MFU: model FLOPs over 4 chips at the estimate, against v5e's 197 TFLOP/s.
    assert entry["mfu"] == pytest.approx(
        entry["model_flops"] / (4 * entry["step_seconds"] * 197e12)
    )


def test_model_flops_are_counted_from_the_networks(tiny_on_v5e_4):
  _, report, _, _ = tiny_on_v5e_4
  flops = {
      (p["stage"], p["kind"]): p["model_flops"] for p in report["programs"]
  }
  # tiny: 8x8x1 digits, B=16, K=5, 10 classes, pools after both blocks, a
  # 16-unit hidden layer. The experts (widths 4, 8), one forward of one agent:
  # conv0 2*9*1*4*8*8*16 + conv1 2*9*4*8*4*4*16 + dense 2*32*16*16 + 2*16*10*16.
  expert = (
      2 * 9 * 4 * 64 * 16
      + 2 * 9 * 32 * 16 * 16
      + 2 * 32 * 16 * 16
      + 2 * 160 * 16
  )
  assert flops[("experts", "train")] == 3 * 5 * expert  # K agents, fwd + bwd
  assert flops[("experts", "eval")] == 5 * expert * 250 / 16  # eval batch 250
  # The collective (widths 8, 8) trains on the pooled batch; with the config's
  # by-owner batches and owner teachers each expert teaches its own share:
  # 16 images over 5 owners, at most 4 each.
  collective = (
      2 * 9 * 8 * 64 * 16
      + 2 * 9 * 64 * 16 * 16
      + 2 * 32 * 16 * 16
      + 2 * 160 * 16
  )
  assert flops[("collective", "train")] == 3 * collective + 5 * expert * 4 / 16


def test_projection_and_labels_in_the_written_report(tiny_on_v5e_4):
  _, report, workdir, lines = tiny_on_v5e_4
  with open(os.path.join(workdir, "preflight.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  with open(os.path.join(workdir, "preflight.md")) as f:
    md = f.read()
  assert "Cost-model estimates" in md and "not measured" in md
  assert "libtpu" in md and "v5e-4" in md
  assert "## What the estimate leaves out" in md and "inter-chip" in md
  assert "### experts train:" in md  # the --preflight_top section
  # tiny's experts: 1297 training images over 5 agents, batch 16, 1 epoch;
  # test set 500, eval batch 250.
  by_stage = {row["stage"]: row for row in report["stages"]}
  programs = {(p["stage"], p["kind"]): p for p in report["programs"]}
  for stage in STAGES:
    row = by_stage[stage]
    train, evaluation = programs[(stage, "train")], programs[(stage, "eval")]
    assert row["eval_batches"] == 2
    assert row["seconds"] == pytest.approx(
        row["steps"] * train["step_seconds"] + 2 * evaluation["step_seconds"]
    )
  assert report["protocol_seconds"] == pytest.approx(
      sum(by_stage[s]["seconds"] for s in STAGES)
  )
  assert report["run"]["mesh"] == {"members": 1, "agents": 1, "data": 4}
  assert any("experts train: compiled" in line for line in lines)


def test_cost_model_top_rows_add_up(tiny_on_v5e_4):
  check, report, _, _ = tiny_on_v5e_4
  entry = report["programs"][0]
  breakdown = hlo.cycle_breakdown(
      check.compiled[(entry["stage"], entry["kind"])].as_text()
  )
  assert entry["total_cycles"] == breakdown.total_cycles > 0
  shares = [row["share"] for row in entry["top"]]
  assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
  assert all(
      row["share"] == pytest.approx(row["cycles"] / entry["total_cycles"])
      for row in entry["top"]
  )


def test_slice_devices_are_in_the_order_a_multi_process_run_sees():
  devices = topology.slice_devices(topology.parse_slice("v5e-16"))
  assert len(devices) == 16 and {d.device_kind for d in devices} == {
      "TPU v5 lite"
  }
  order = [(d.process_index, d.id) for d in devices]
  assert order == sorted(order)
  # Four hosts of 2x2 chips.
  for process in range(4):
    coords = {tuple(d.coords) for d in devices if d.process_index == process}
    xs, ys = {c[0] for c in coords}, {c[1] for c in coords}
    assert len(coords) == 4 and len(xs) == 2 and len(ys) == 2
  v4 = topology.slice_devices(topology.parse_slice("v4-8"))
  # v4: one device per chip (megacore), as JAX shows a v4-8.
  assert len(v4) == 4 and {d.core_on_chip for d in v4} == {0}


def test_multi_host_slice_through_the_command(tmp_path):
  """Twice, with one persistent compilation cache: the second pre-flight finds
  nothing compiled for the TPU there (no TPU here could read it back, and JAX
  would warn that it cannot)."""
  workdir = tmp_path / "run"
  args = ["--compile_for=v5e-16", "--preflight_stages=experts"]
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
  run_command([*args, f"--workdir={tmp_path / 'first'}"], tmp_path, cache)
  status, out, err = run_command(
      [*args, f"--workdir={workdir}"], tmp_path, cache
  )
  assert status == 0, err[-3000:]
  assert "Error reading persistent compilation cache entry" not in err
  report = json.loads((workdir / "preflight.json").read_text())
  assert report["slice"]["devices"] == 16
  assert report["slice"]["processes"] == 4
  assert report["slice"]["devices_per_process"] == 4
  assert report["run"]["mesh_devices"] == 16
  assert [p["status"] for p in report["programs"]] == ["compiled", "compiled"]
  assert "# Pre-flight: tiny on v5e-16" in out
  assert (workdir / "preflight.md").read_text() in out


def test_a_program_too_big_for_hbm_is_reported_and_the_exit_is_1(tmp_path):
  # An evaluation batch of 4 million 8x8 images: its activations alone need
  # tens of GiB, more than a v5e's 15.75 GiB.
  workdir = tmp_path / "run"
  status, out, err = run_command(
      [
          "--compile_for=v5e-1",
          "--preflight_stages=experts",
          "--config.eval_batch_size=4000000",
          f"--workdir={workdir}",
      ],
      tmp_path,
  )
  assert status == 1, err[-3000:]
  report = json.loads((workdir / "preflight.json").read_text())
  train, evaluation = report["programs"]
  assert train["status"] == "compiled"
  assert evaluation["status"] == "does_not_fit"
  fit = evaluation["does_not_fit"]
  assert fit["available_bytes"] == round(15.75 * GIB)
  assert fit["required_bytes"] > fit["available_bytes"]
  assert fit["over_by_bytes"] == fit["required_bytes"] - fit["available_bytes"]
  # The numbers are the compiler's own message's.
  required = f"({fit['required_bytes'] / GIB:.2f}G)"
  assert (
      required in evaluation["error"]
      and "RESOURCE_EXHAUSTED" in evaluation["error"]
  )
  assert report["failures"] == 1 and report["complete"]
  assert "does not fit in HBM" in out and "GiB over" in out


def test_a_config_the_slice_cannot_hold_is_one_line_exit_2(tmp_path, capsys):
  from absl import flags

  from masc_jax import main as main_module

  flags.FLAGS.unparse_flags()
  argv = [
      "m",
      "--config=tiny",
      "--compile_for=v5e-4",
      "--config.num_devices=8",
      f"--workdir={tmp_path}/run",
  ]
  with pytest.raises(SystemExit) as exit_:
    main_module.main(main_module.parse_flags(argv))
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err == (
      "error: cannot lay out tiny on v5e-4: num_devices=8 but only 4 devices "
      "are visible"
  )
  assert os.listdir(tmp_path) == []


def test_the_crop_compiles_to_no_loop_on_tpu():
  """The augmentation's crop: no while loop (a serial loop over the images) in the
  TPU program, where the per-image slices compile to one (16 CIFAR-sized images:
  the smallest batch seen to give the loop, and a quick compile).
  """
  device = topology.slice_devices(topology.parse_slice("v5e-1"))[0]
  mesh = jax.sharding.Mesh([device], ("d",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  images = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.uint8, sharding=replicated)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)

  def ops_of(fn):
    text = jax.jit(fn).lower(images, key).compile().as_text()
    computations, _ = hlo.parse_computations(text)
    return {
        i.op for instructions in computations.values() for i in instructions
    }

  def by_slices(x, k):
    padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = jax.random.randint(k, (x.shape[0], 2), 0, 9)
    return augment.crop_windows_by_slices(padded, offsets, size=(32, 32))

  crop = ops_of(
      lambda x, k: augment.random_crop_flip(x, k, crop_padding=4, flip=True)
  )
  assert "while" not in crop and "fusion" in crop
  assert "while" in ops_of(by_slices)


def test_the_concat_bitcast_correction_on_a_compiled_program():
  """An SGD step of 4 stacked conv kernels (vmapped, as the stacked agents): the
  compiler prefetches the stacked kernels with ConcatBitcast custom calls and its
  cost model counts each -1 s; the report's estimate adds them back.
  """
  device = topology.slice_devices(topology.parse_slice("v5e-1"))[0]
  mesh = jax.sharding.Mesh([device], ("d",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def loss(kernels, x):  # kernels [1, 3, 3, C, C]: one block of one agent
    y = jax.lax.conv_general_dilated(
        x,
        kernels[0],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return (jax.nn.relu(y) ** 2).mean()

  def step(kernels, x):
    return kernels - 0.1 * jax.vmap(jax.grad(loss))(kernels, x)

  kernels = jax.ShapeDtypeStruct(
      (4, 1, 3, 3, 64, 64), jnp.float32, sharding=replicated
  )
  images = jax.ShapeDtypeStruct(
      (4, 32, 4, 4, 64), jnp.float32, sharding=replicated
  )
  compiled = jax.jit(step, donate_argnums=0).lower(kernels, images).compile()
  text = compiled.as_text()
  raw = compiled.cost_analysis()["optimal_seconds"]
  count = text.count('custom_call_target="ConcatBitcast"')
  # What makes the correction necessary: calls the model counts as -1 s each.
  assert count >= 1 and -count < raw < -count + 1
  timing = costs.step_time(compiled, text)
  assert timing["concat_bitcasts"] == count
  assert timing["optimal_seconds_raw"] == raw
  assert timing["step_seconds"] == pytest.approx(raw + count, rel=1e-12)
  assert 0 < timing["step_seconds"] < 1 and timing["anomaly"] is None
