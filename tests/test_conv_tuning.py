"""conv_impl="tuned": every per-pass plan is exact, and the tuner measures once and caches.

References: autodiff of ``lax.conv_general_dilated`` (value, dx, dw) for the
plans; fake timings (a dict) for the tuner, so its choices are deterministic.
"""

from __future__ import annotations

import itertools
import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masc_jax.parallel import compile_cache
from masc_jax.nn import conv_tuning, conv, kernels, network

PLANS = list(
    itertools.product(
        *(tuple(kernels.CONV_PASSES[p]) for p in ("fwd", "dx", "dw"))
    )
)
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(shape_x, cout, seed=0):
  rng = np.random.default_rng(seed)
  *lead, h, w, cin = shape_x
  x = rng.standard_normal(shape_x).astype(np.float32)
  kernel = rng.standard_normal(tuple(lead[:-1]) + (3, 3, cin, cout)).astype(
      np.float32
  )
  cot = rng.standard_normal(tuple(lead) + (h, w, cout)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(cot)


def _plain(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _value_and_grads(conv_fn, x, kernel, cot):
  value, vjp = jax.vjp(conv_fn, x, kernel)
  return (value, *vjp(cot))


@jax.jit
def _all_plans(x, kernel, cot):
  """(value, dx, dw) of autodiff of lax.conv and of every plan; one program."""
  out = {"plain": _value_and_grads(_plain, x, kernel, cot)}
  for plan in PLANS:
    out["/".join(plan)] = _value_and_grads(
        lambda a, b, plan=plan: conv.planned_conv3x3(a, b, plan), x, kernel, cot
    )
  return out


@jax.jit
def _all_plans_vmapped(x, kernel, cot):
  """The same with per-agent inputs and kernels under ``jax.vmap`` (the agent axis)."""
  out = {"plain": _value_and_grads(jax.vmap(_plain), x, kernel, cot)}
  for plan in PLANS:
    mapped = jax.vmap(lambda a, b, plan=plan: conv.planned_conv3x3(a, b, plan))
    out["/".join(plan)] = _value_and_grads(mapped, x, kernel, cot)
  return out


@pytest.mark.parametrize("vmapped", [False, True])
def test_every_plan_equals_autodiff_of_lax_conv(vmapped) -> None:
  shape = (
      (2, 2, 5, 4, 3) if vmapped else (2, 5, 4, 3)
  )  # non-square map, Cin != Cout
  x, kernel, cot = _inputs(shape, 4, seed=int(vmapped))
  results = (_all_plans_vmapped if vmapped else _all_plans)(x, kernel, cot)
  want = results.pop("plain")
  assert len(results) == 18
  for plan, got in results.items():
    for name, g, w in zip(("value", "dx", "dw"), got, want):
      np.testing.assert_allclose(
          np.asarray(g), np.asarray(w), **TOL, err_msg=f"{plan} {name}"
      )


def test_a_bad_plan_is_refused() -> None:
  x, kernel, _ = _inputs((1, 2, 2, 1), 1)
  with pytest.raises(ValueError, match="a conv plan is"):
    conv.planned_conv3x3(
        x, kernel, ("im2col_vjp", "xla", "xla")
    )  # im2col_vjp is a dx method
  with pytest.raises(ValueError, match="a conv plan is"):
    conv.planned_conv3x3(x, kernel, ("xla", "xla"))


# Fake timings, ms: the winners are im2col (fwd), im2col_vjp (dx), lax_vjp (dw).
FAKE_MS = {
    "fwd": {"xla": 2.0, "im2col": 1.0},
    "dx": {"xla": 3.0, "im2col": 2.5, "im2col_vjp": 1.5},
    "dw": {"xla": 2.0, "lax_vjp": 0.5, "im2col": 9.0},
}
FAKE_WINNERS = {"fwd": "im2col", "dx": "im2col_vjp", "dw": "lax_vjp"}
KEY = conv_tuning.layer_key((64, 32, 32, 64), 64, jnp.float32)


class FakeTimer:
  """``measure`` with fixed times; counts its calls."""

  def __init__(self, times=FAKE_MS):
    self.times, self.calls = times, []

  def __call__(self, pass_name, key, candidates):
    self.calls.append((pass_name, key))
    return {c: self.times[pass_name][c] for c in candidates}


def _never(*_):
  raise AssertionError("measured although the plan was cached")


def test_layer_key_buckets_the_batch_and_ignores_leading_dims() -> None:
  assert [conv_tuning.batch_bucket(n) for n in (1, 2, 3, 32, 33, 500)] == [
      1,
      2,
      4,
      32,
      64,
      512,
  ]
  assert conv_tuning.layer_key(
      (4, 8, 8, 8, 3), 16, jnp.bfloat16
  ) == conv_tuning.LayerKey(32, 8, 8, 3, 16, "bfloat16")
  assert KEY.name("dw") == "dw b64 32x32 64->64 float32"


def test_auto_s_choice_is_kept_unless_another_is_over_10_percent_faster() -> (
    None
):
  assert [KEY.auto_choice(p) for p in FAKE_MS] == ["xla", "xla", "xla"]
  small = conv_tuning.layer_key((64, 4, 4, 8), 8, jnp.float32)
  assert [small.auto_choice(p) for p in FAKE_MS] == [
      "im2col",
      "im2col_vjp",
      "im2col",
  ]
  assert conv_tuning.pick({"xla": 1.09, "im2col": 1.0}, "xla") == "xla"
  assert conv_tuning.pick({"xla": 1.11, "im2col": 1.0}, "xla") == "im2col"
  assert conv_tuning.pick({}, "xla") == "xla"  # every candidate failed


def test_the_tuner_picks_the_fastest_and_a_second_tuner_reads_the_file(
    tmp_path,
) -> None:
  path = str(tmp_path / "conv_plans.json")
  timer = FakeTimer()
  tuner = conv_tuning.Tuner(path, measure=timer, machine="cpu-A")
  assert {p: tuner.choose(p, KEY) for p in FAKE_MS} == FAKE_WINNERS
  assert {
      p: tuner.choose(p, KEY) for p in FAKE_MS
  } == FAKE_WINNERS  # memory: no new measurement
  assert timer.calls == [(p, KEY) for p in FAKE_MS]
  with open(path) as f:
    stored = json.load(f)["machines"]["cpu-A"]
  assert stored["dw b64 32x32 64->64 float32"] == {
      "impl": "lax_vjp",
      "ms": FAKE_MS["dw"],
  }
  again = conv_tuning.Tuner(path, measure=_never, machine="cpu-A")
  assert {p: again.choose(p, KEY) for p in FAKE_MS} == FAKE_WINNERS
  # Another machine's plans are not this one's: it measures for itself.
  other = FakeTimer({**FAKE_MS, "fwd": {"xla": 1.0, "im2col": 2.0}})
  assert (
      conv_tuning.Tuner(path, measure=other, machine="cpu-B").choose("fwd", KEY)
      == "xla"
  )
  assert len(other.calls) == 1
  with open(path) as f:
    assert set(json.load(f)["machines"]) == {"cpu-A", "cpu-B"}


def test_the_file_is_keyed_by_the_cpu_tag(tmp_path) -> None:
  machine = conv_tuning.machine_key()
  assert machine.startswith(compile_cache.cpu_tag() + " cpu:")
  path = str(tmp_path / "conv_plans.json")
  conv_tuning.Tuner(path, measure=FakeTimer()).choose("fwd", KEY)
  with open(path) as f:
    assert list(json.load(f)["machines"]) == [machine]


def test_max_isa_emulation_gets_its_own_plans(monkeypatch) -> None:
  monkeypatch.setenv(
      "XLA_FLAGS",
      "--xla_cpu_max_isa=AVX2 --xla_force_host_platform_device_count=1",
  )
  assert conv_tuning.machine_key().endswith(" max_isa=AVX2")


@pytest.mark.parametrize("content", ["{not json", '{"machines": [1, 2]}', "[]"])
def test_a_corrupted_file_is_ignored_with_a_warning(tmp_path, content) -> None:
  path = tmp_path / "conv_plans.json"
  path.write_text(content)
  tuner = conv_tuning.Tuner(str(path), measure=FakeTimer(), machine="m")
  with pytest.warns(UserWarning, match="ignoring the conv plans file"):
    assert tuner.choose("dx", KEY) == "im2col_vjp"
  assert (
      json.loads(path.read_text())["machines"]["m"][
          "dx b64 32x32 64->64 float32"
      ]["impl"]
      == "im2col_vjp"
  )


def test_an_unwritable_folder_keeps_the_plan_in_memory(tmp_path) -> None:
  blocker = tmp_path / "file"
  blocker.write_text("")
  tuner = conv_tuning.Tuner(
      str(blocker / "conv_plans.json"), measure=FakeTimer(), machine="m"
  )
  with pytest.warns(UserWarning, match="cannot write the conv plans file"):
    assert tuner.choose("fwd", KEY) == "im2col"


def test_concurrent_writers_keep_every_entry(tmp_path) -> None:
  path = str(tmp_path / "conv_plans.json")
  keys = [conv_tuning.LayerKey(16, h, h, 8, 8, "float32") for h in range(1, 25)]
  barrier = threading.Barrier(4)

  def writer(part):
    tuner = conv_tuning.Tuner(path, measure=FakeTimer(), machine="m")
    barrier.wait()
    for key in keys[part::4]:
      tuner.choose("dw", key)

  threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  with open(path) as f:
    entries = json.load(f)["machines"]["m"]
  assert set(entries) == {k.name("dw") for k in keys}
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_plan_already_in_the_file_wins_over_a_later_measurement(
    tmp_path,
) -> None:
  """Two runs that measured the same layer at once end up with the first one's choice."""
  path = str(tmp_path / "conv_plans.json")
  first = conv_tuning.Tuner(path, measure=FakeTimer(), machine="m")
  late = conv_tuning.Tuner(path, measure=FakeTimer(), machine="m")
  late._stored = lambda *_: None  # it looked before `first` wrote
  late._measure = FakeTimer({**FAKE_MS, "fwd": {"xla": 1.0, "im2col": 2.0}})
  assert first.choose("fwd", KEY) == "im2col"
  assert late.choose("fwd", KEY) == "im2col"


def test_several_processes_take_process_0s_choice(monkeypatch) -> None:
  sent = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(
      conv_tuning.multihost,
      "broadcast_from_primary",
      lambda value: sent.append(value) or 0,
  )  # process 0 chose candidate 0
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert (
      conv_tuning.Tuner(None, measure=_never, machine="m").choose("dx", KEY)
      == "xla"
  )
  assert sent == [-1]  # a non-primary process neither measures nor sends
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(
      conv_tuning.multihost,
      "broadcast_from_primary",
      lambda value: sent.append(value) or value,
  )
  assert (
      conv_tuning.Tuner(None, measure=FakeTimer(), machine="m").choose(
          "dx", KEY
      )
      == "im2col_vjp"
  )
  assert sent == [-1, 2]  # process 0 measured and sent its choice


def test_plans_file_sits_beside_the_compilation_cache(tmp_path) -> None:
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    assert conv_tuning.plans_path() == str(tmp_path / "conv_plans.json")
    assert conv_tuning.default_tuner().path == str(tmp_path / "conv_plans.json")
    jax.config.update("jax_compilation_cache_dir", None)  # cache off: in memory
    assert conv_tuning.plans_path() is None
    assert conv_tuning.default_tuner().path is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.fixture
def fake_default_tuner(monkeypatch, tmp_path):
  tuner = conv_tuning.Tuner(
      str(tmp_path / "conv_plans.json"), measure=FakeTimer(), machine="m"
  )
  monkeypatch.setattr(conv_tuning, "default_tuner", lambda: tuner)
  return tuner


def test_tuned_under_jit_and_vmap_uses_the_plan_and_measures_forward_only_when_asked(
    fake_default_tuner,
) -> None:
  x, kernel, cot = _inputs((2, 3, 4, 4, 2), 5, seed=3)  # 2 agents
  mapped = jax.vmap(lambda a, b: conv.conv3x3(a, b, "tuned"))
  jax.jit(mapped).lower(x, kernel)  # forward only: fwd measured
  assert set(fake_default_tuner.plans()) == {"fwd b4 4x4 2->5 float32"}
  jaxpr = str(jax.make_jaxpr(mapped)(x, kernel))
  assert "conv_general_dilated" not in jaxpr  # im2col forward, as timed
  got = jax.jit(lambda *a: _value_and_grads(mapped, *a))(x, kernel, cot)
  want = _value_and_grads(jax.vmap(_plain), x, kernel, cot)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)
  assert {r["impl"] for r in fake_default_tuner.plans().values()} == set(
      FAKE_WINNERS.values()
  )


def test_real_measurement_inside_a_trace(tmp_path, monkeypatch) -> None:
  """The default ``measure`` times real candidates while ``jax.jit`` traces a vmapped grad."""
  tuner = conv_tuning.Tuner(str(tmp_path / "conv_plans.json"), machine="m")
  monkeypatch.setattr(conv_tuning, "default_tuner", lambda: tuner)
  x, kernel, cot = _inputs((2, 1, 3, 3, 2), 2, seed=4)
  loss = lambda a, b: jnp.sum(
      jax.vmap(lambda a, b: conv.conv3x3(a, b, "tuned"))(a, b) * cot
  )
  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
  want = jax.grad(
      lambda a, b: jnp.sum(jax.vmap(_plain)(a, b) * cot), argnums=(0, 1)
  )(x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)
  records = tuner.plans()
  assert sorted(records) == [
      f"{p} b1 3x3 2->2 float32" for p in ("dw", "dx", "fwd")
  ]
  key = conv_tuning.layer_key((1, 3, 3, 2), 2, jnp.float32)
  for name, record in records.items():
    pass_name = name.split()[0]
    assert set(record["ms"]) == set(kernels.CONV_PASSES[pass_name])
    assert record["impl"] == conv_tuning.pick(
        record["ms"], key.auto_choice(pass_name)
    )


def test_tuned_network_equals_auto(fake_default_tuner) -> None:
  net = network.Network(
      widths=(4, 6),
      pool_after=(0,),
      head_hidden=(8,),
      num_classes=3,
      dropout_rate=0.0,
  )
  x = jnp.asarray(
      np.random.default_rng(5).standard_normal((2, 8, 8, 3)), jnp.float32
  )
  variables = net.init(jax.random.key(0), x, train=False)

  def loss_and_grads(impl):
    def loss(params):
      logits, _ = net.clone(conv_impl=impl).apply(
          {"params": params, "batch_stats": variables["batch_stats"]},
          x,
          train=True,
          mutable=["batch_stats"],
      )
      return jnp.sum(logits**2)

    return jax.value_and_grad(loss)(variables["params"])

  got, want = jax.jit(
      lambda: (loss_and_grads("tuned"), loss_and_grads("auto"))
  )()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(
        np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5
    )
  assert len(fake_default_tuner.plans()) == 6  # two layers x three passes
