"""Benchmark of the three stages' train steps (the library's own step functions).

    python -m benchmarks.agent_step                       # stage 1, K=1,2,4,8, vmap+unroll, auto+xla, + PyTorch
    python -m benchmarks.agent_step --stages experts,collective,altruism --agents 4 \
        --strategies vmap --conv-impls auto --steps 5 --warmup 2 --out benchmarks/results/all.json

For every (stage, K, strategy, conv impl) a fresh worker process builds the
step exactly as the run does (``steps.expert_step`` / ``collective_step`` /
``altruism_step`` bound with ``functools.partial``, ``jax.jit`` with the state
donated), compiles it ahead of time (``jit(...).lower(...).compile()``, timed),
runs ``--warmup`` steps, then times ``--steps`` steps (each ending in
``block_until_ready``). Reported per config:

  agent-img/s   images consumed per second, summed over agents: K*B per step for
                stages 1 and 3, B per step for stage 2 (one collective batch;
                the K teachers read the same B images), as ``train.Society.images_per_step``.
  step ms       median step time.
  vs K=1        this step's time / the fastest K=1 step of the same stage and
                conv impl (any strategy): the goal for stage 1 is <= K (K agents
                cost at most K x one).
  cpu ms        median CPU time of the worker per step (all its threads): on
                a shared machine it grows less than the wall time with the load.
  compile s     AOT compile time of the step (PyTorch rows: model setup time).
  peak MiB      the worker's peak RSS (ru_maxrss): everything, compile included.
  GFLOP xla     ``compiled.cost_analysis()['flops']`` per step (XLA's count;
                the im2col path counts the padded taps it multiplies).
  GFLOP model   analytic model FLOPs per step: 2*MACs of every conv (9 taps)
                and dense layer; x3 for trained networks (fwd + 2 bwd), x1 for
                frozen forwards (teachers, S's backbone). BN/ReLU/pool not counted.
  GFLOP/s       model FLOPs / median step time.
  % peak        GFLOP/s / the device's peak (table in common.PEAK_FLOPS); n/a on CPU.
  torch img/s,  (stage 1 only, with --torch) the PyTorch reference
  JAX/torch     (benchmarks/torch_reference.py) for the same K, B, run in the
                same sweep, and the ratio of agent-images/s (>1: JAX faster).

With ``--cores N`` every worker (JAX and PyTorch) is pinned to the first N
CPU cores (``os.sched_setaffinity`` before JAX or PyTorch starts, so XLA's and
PyTorch's thread pools are sized to N). ``--cores 1`` measures CPU work per
step without the scheduling noise of a shared 2-core machine: at K >= 2 both
cores are busy anyway, so one core's step time predicts the throughput and
A/B comparisons of a rewrite are far steadier than on 2 cores.

With ``--repeats R`` the sweep runs R times (configs interleaved) and each
config keeps its fastest median; all medians are in the JSON.

``--dtypes float32,bfloat16`` adds a sweep axis: the networks' compute dtype,
``config.model.compute_dtype`` as a run sets it (bfloat16: mixed precision,
float32 parameters, BatchNorm statistics, optimiser state and losses). Every row
and JSON record names its dtype, and "% peak" uses that dtype's peak.
``--cast-state`` is a different experiment: it also casts the parameters,
optimiser state, BatchNorm statistics and frozen models to the dtype (all bf16;
not something a run can do).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from typing import Any

import numpy as np

from benchmarks import common
from masc_jax.nn.network import forward_flops

STAGES = ("experts", "collective", "altruism")


# ----------------------------------------------------------------------------- setup


def _config(input_name: str, conv_impl: str, dtype: str = "float32"):
  """The run's config for the input: cifar (cifar100 protocol, spec widths) or digits."""
  from masc_jax import config_lib

  config = config_lib.load_config(
      "cifar100" if input_name == "cifar" else "digits"
  )
  # load_config's FIELD=VALUE overrides do not parse here (see the report); set directly.
  config.model.conv_impl = conv_impl
  config.model.compute_dtype = dtype
  return config


def _input_spec(input_name: str) -> dict[str, Any]:
  if input_name == "cifar":
    from masc_jax.data.registry import DATASETS

    info = DATASETS["cifar100"]
    return {
        "hw": info.image_shape[:2],
        "channels": info.image_shape[2],
        "num_classes": info.num_classes,
        "mean": info.mean,
        "std": info.std,
    }
  from masc_jax.data import registry

  ds = registry.load_dataset("digits")
  return {
      "hw": ds.image_shape[:2],
      "channels": ds.image_shape[2],
      "num_classes": ds.num_classes,
      "mean": tuple(map(float, ds.mean)),
      "std": tuple(map(float, ds.std)),
  }


def model_flops(
    stage: str,
    config,
    inp: dict[str, Any],
    k: int,
    b: int,
    teacher_images: int | None = None,
) -> float:
  """Analytic FLOPs of one step of ``stage``; ``teacher_images``: images the
  collective's teachers run on together (default every teacher on the whole
  batch, K x B; by-owner batches: K x the largest owner group)."""
  m = config.model
  common_args = (
      m.pool_after,
      m.head_hidden,
      inp["num_classes"],
      inp["channels"],
      inp["hw"],
  )
  expert_fwd = forward_flops(m.expert_widths, *common_args, b)
  if stage == "experts":
    return 3 * k * expert_fwd
  coll_fwd = forward_flops(m.collective_widths, *common_args, b)
  if stage == "collective":
    if teacher_images is None:
      return 3 * coll_fwd + k * expert_fwd
    return 3 * coll_fwd + forward_flops(
        m.expert_widths, *common_args, teacher_images
    )
  backbone = forward_flops(
      m.collective_widths, *common_args, k * b, with_head=False
  )
  head = coll_fwd - forward_flops(
      m.collective_widths, *common_args, b, with_head=False
  )
  return backbone + k * expert_fwd + 3 * k * head


def _cast_floats(tree, dtype):
  import jax
  import jax.numpy as jnp

  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      tree,
  )


def build_jax_step(spec: dict[str, Any]):
  """(jitted step, example args, images per step, config, input) for a worker spec."""
  import jax
  import jax.numpy as jnp
  from masc_jax.method import agents, losses, steps
  from masc_jax.data import augment
  from masc_jax.nn import network

  stage, k, b = spec["stage"], spec["agents"], spec["batch"]
  # spec["dtype"]: the networks' compute dtype (config.model.compute_dtype).
  config = _config(
      spec["input"], spec["conv_impl"], spec.get("dtype", "float32")
  )
  inp = _input_spec(spec["input"])
  num_classes, hw, ch = inp["num_classes"], inp["hw"], inp["channels"]
  expert = network.make_network(
      config.model, num_classes, config.model.expert_widths
  )
  collective = network.make_network(
      config.model, num_classes, config.model.collective_widths
  )
  tx = steps.make_optimizer(config.optim)
  dtype = jnp.dtype(config.model.compute_dtype)
  # float32 images as in a run: the networks cast them to their compute dtype.
  aug = functools.partial(
      augment.augment_and_normalize,
      mean=np.asarray(inp["mean"], np.float32),
      std=np.asarray(inp["std"], np.float32),
      crop_padding=4
      if spec["input"] == "cifar"
      else config.augment.crop_padding,
      flip=spec["input"] == "cifar" or config.augment.flip,
  )
  common_kw = dict(tx=tx, augment=aug, strategy=spec["strategy"])

  rng = np.random.default_rng(0)
  image = jnp.zeros((1,) + tuple(hw) + (ch,), jnp.float32)
  key_e, key_c, key_h = jax.random.split(jax.random.key(spec.get("seed", 0)), 3)
  experts = agents.init_stacked(
      lambda key: steps.init_model_state(expert, key, image, tx),
      jax.random.split(key_e, k),
  )
  per_agent = {
      "image": jnp.asarray(
          rng.integers(0, 256, (k, b) + tuple(hw) + (ch,), np.uint8)
      ),
      "label": jnp.asarray(
          rng.integers(0, num_classes, (k, b)).astype(np.int32)
      ),
  }
  params_per_agent = network.count_params(agents.agent_slice(experts.params, 0))

  if stage == "experts":
    step = functools.partial(steps.expert_step, network=expert, **common_kw)
    fn = lambda state, batch, rng_, frozen: step(state, batch, rng_)
    state, batch, frozen, images = experts, per_agent, None, k * b
  elif stage == "collective":
    state = steps.init_model_state(collective, key_c, image, tx)
    owner = (
        np.arange(num_classes) * k
    ) // num_classes  # contiguous groups; any K
    fn = functools.partial(
        steps.collective_step,
        network=collective,
        teacher_network=expert,
        class_owner=jnp.asarray(owner, jnp.int32),
        settings=losses.LossSettings.from_config(config.loss),
        **common_kw,
    )
    batch = {"image": per_agent["image"][0], "label": per_agent["label"][0]}
    frozen, images = experts.variables(), b
  elif stage == "altruism":
    coll_state = steps.init_model_state(collective, key_c, image, tx)
    backbone, head = network.backbone_of(collective), network.head_of(
        collective
    )
    coll_vars = coll_state.variables()
    feats = jax.eval_shape(
        lambda v: backbone.apply(v, image, train=False),
        {n: t["backbone"] for n, t in coll_vars.items()},
    )
    state = agents.init_stacked(
        lambda key: steps.init_model_state(
            head, key, jnp.zeros(feats.shape, jnp.float32), tx
        ),
        jax.random.split(key_h, k),
    )
    fn = functools.partial(
        steps.altruism_step,
        backbone=backbone,
        head=head,
        teacher_network=expert,
        teacher_is_stacked=True,
        settings=losses.LossSettings.from_config(config.loss),
        **common_kw,
    )
    frozen = {
        "backbone": {n: t["backbone"] for n, t in coll_vars.items()},
        "teacher": experts.variables(),
    }
    batch, images = per_agent, k * b
  else:
    raise ValueError(f"unknown stage {stage!r}")

  if spec.get("cast_state") and dtype != jnp.float32:
    # The all-bf16 experiment: parameters, optimiser state and statistics in bf16 too.
    state, frozen = _cast_floats(state, dtype), _cast_floats(frozen, dtype)
    fn_f32 = fn

    def fn(
        state_, batch_, rng_, frozen_
    ):  # keep the state's dtype fixed across steps
      new_state, metrics = fn_f32(state_, batch_, rng_, frozen_)
      return _cast_floats(new_state, dtype), metrics

  jitted = jax.jit(fn, donate_argnums=(0,) if spec.get("donate", True) else ())
  return jitted, (state, batch, frozen), images, config, inp, params_per_agent


def jax_worker(spec: dict[str, Any]) -> dict[str, Any]:
  import jax
  from benchmarks import patches

  load_before = common.loadavg()
  applied = patches.apply(spec.get("patches", []))
  jitted, (state, batch, frozen), images, config, inp, n_params = (
      build_jax_step(spec)
  )
  keys = [
      jax.random.fold_in(jax.random.key(1), i)
      for i in range(spec["warmup"] + spec["steps"])
  ]
  t0 = time.perf_counter()
  compiled = jitted.lower(state, batch, keys[0], frozen).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops_xla = float(cost.get("flops", float("nan"))) if cost else float("nan")

  holder = {"state": state}

  def call(i):
    holder["state"], metrics = compiled(holder["state"], batch, keys[i], frozen)
    return holder["state"], metrics

  stats = common.summarize_times(
      *common.time_calls(
          call, spec["steps"], spec["warmup"], jax.block_until_ready
      )
  )
  dev = jax.devices()[0]
  flops_model = model_flops(
      spec["stage"], config, inp, spec["agents"], spec["batch"]
  )
  peak = common.peak_flops(
      dev.device_kind, dev.platform, spec.get("dtype", "float32")
  )
  achieved = flops_model / stats["median_s"]
  return {
      **spec,
      **stats,
      "kind": "jax",
      "images_per_step": images,
      "images_per_s": images / stats["median_s"],
      "compile_s": compile_s,
      "peak_rss_mib": common.peak_rss_mib(),
      "flops_xla": flops_xla,
      "flops_model": flops_model,
      "flops_per_s": achieved,
      "peak_fraction": achieved / peak if peak else None,
      "params_per_agent": n_params,
      "device": f"{dev.platform}:{dev.device_kind}",
      "patches_applied": applied,
      "jax_version": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_before": load_before,
      "load_after": common.loadavg(),
  }


def torch_worker(spec: dict[str, Any]) -> dict[str, Any]:
  from benchmarks import torch_reference

  load_before = common.loadavg()
  config = _config(
      spec["input"], "auto"
  )  # PyTorch runs float32 whatever spec["dtype"] says
  inp = _input_spec(spec["input"])
  m = config.model
  threads = spec.get("threads") or os.cpu_count()
  t0 = time.perf_counter()
  society = torch_reference.TorchSociety(
      spec["agents"],
      spec["batch"],
      widths=m.expert_widths,
      pool_after=m.pool_after,
      head_hidden=m.head_hidden,
      num_classes=inp["num_classes"],
      in_channels=inp["channels"],
      image_hw=tuple(inp["hw"]),
      dropout_rate=m.dropout_rate,
      lr=config.optim.learning_rate,
      momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay,
      threads=threads,
      channels_last=spec.get("channels_last", False),
  )
  setup_s = time.perf_counter() - t0
  stats = common.summarize_times(
      *common.time_calls(
          lambda i: society.step(), spec["steps"], spec["warmup"], lambda x: x
      )
  )
  images = spec["agents"] * spec["batch"]
  import torch

  return {
      **spec,
      **stats,
      "kind": "torch",
      "images_per_step": images,
      "images_per_s": images / stats["median_s"],
      "setup_s": setup_s,
      "peak_rss_mib": common.peak_rss_mib(),
      "params_per_agent": society.num_params,
      "torch_version": torch.__version__,
      "threads": threads,
      "flops_model": model_flops(
          "experts", config, inp, spec["agents"], spec["batch"]
      ),
      "load_before": load_before,
      "load_after": common.loadavg(),
  }


# ----------------------------------------------------------------------------- driver


def _csv(s: str, cast=str) -> list:
  return [cast(x) for x in s.split(",") if x]


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
      "--stages", default="experts", help=f"comma list of {','.join(STAGES)}"
  )
  p.add_argument("--agents", default="1,2,4,8", help="comma list of K")
  p.add_argument(
      "--strategies",
      default="vmap,unroll",
      help="agent_map strategies (vmap,unroll,auto)",
  )
  p.add_argument(
      "--conv-impls",
      default="auto,xla",
      help="conv.conv3x3 impls (auto,xla,im2col)",
  )
  p.add_argument("--batch", type=int, default=64, help="per-agent batch B")
  p.add_argument("--steps", type=int, default=5, help="timed steps per config")
  p.add_argument(
      "--warmup", type=int, default=2, help="untimed steps after compile"
  )
  p.add_argument(
      "--repeats",
      type=int,
      default=1,
      help="run the sweep R times; keep each config's fastest median",
  )
  p.add_argument(
      "--torch",
      action=argparse.BooleanOptionalAction,
      default=True,
      help="also time the PyTorch reference (stage 1 only)",
  )
  p.add_argument(
      "--torch-threads", type=int, default=0, help="0: os.cpu_count()"
  )
  p.add_argument(
      "--input",
      choices=("cifar", "digits"),
      default="cifar",
      help="cifar: 32x32x3, 100 classes, spec widths; digits: the digits config",
  )
  p.add_argument(
      "--dtypes",
      "--dtype",
      default="float32",
      help="comma list of compute dtypes (config.model.compute_dtype: float32,bfloat16); "
      "bfloat16 is the library's mixed precision",
  )
  p.add_argument(
      "--cast-state",
      action="store_true",
      help="also cast params, optimiser state, BN statistics and frozen models to the "
      "dtype (the all-bf16 speed experiment; not what a run does)",
  )
  p.add_argument(
      "--donate", action=argparse.BooleanOptionalAction, default=True
  )
  p.add_argument(
      "--xla-flags",
      action="append",
      default=[],
      help="appended to XLA_FLAGS for the JAX workers (repeatable; joined with spaces)",
  )
  p.add_argument(
      "--patch",
      action="append",
      default=[],
      help="experimental library patch for the JAX workers (benchmarks/patches.py), repeatable",
  )
  p.add_argument(
      "--cores",
      type=int,
      default=0,
      help="pin each worker to the first N CPU cores (0: all); PyTorch then uses N threads",
  )
  p.add_argument(
      "--timeout", type=float, default=900, help="seconds per worker"
  )
  p.add_argument(
      "--out",
      default="",
      help="JSON path (default benchmarks/results/agent_step_<time>.json)",
  )
  p.add_argument(
      "--show", default="", help="re-print the table of a results JSON and exit"
  )
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _dtype_label(r: dict[str, Any]) -> str:
  dtype = r.get("dtype", "float32")
  return (
      f"{dtype} (all)" if r.get("cast_state") and dtype != "float32" else dtype
  )


def _key(r: dict[str, Any]) -> tuple:
  return (
      r["kind"],
      r["stage"],
      r["agents"],
      r.get("strategy"),
      r.get("conv_impl"),
      _dtype_label(r) if r["kind"] == "jax" else None,
  )


def make_table(results: list[dict[str, Any]]) -> str:
  jax_rows = [r for r in results if r["kind"] == "jax" and "error" not in r]
  torch_by_k = {
      r["agents"]: r
      for r in results
      if r["kind"] == "torch" and "error" not in r
  }
  # K=1 reference: the fastest K=1 step of the same stage, conv impl and dtype,
  # any strategy (at K=1 vmap and unroll compute the same program; taking the
  # fastest makes the ratio robust to one noisy K=1 measurement).
  base: dict[tuple, float] = {}
  for r in jax_rows:
    if r["agents"] == 1:
      key = (r["stage"], r["conv_impl"], _dtype_label(r))
      base[key] = min(base.get(key, float("inf")), r["median_s"])
  headers = [
      "stage",
      "K",
      "strategy",
      "conv",
      "dtype",
      "agent-img/s",
      "step ms",
      "cpu ms",
      "vs K=1",
      "compile s",
      "peak MiB",
      "GFLOP xla",
      "GFLOP model",
      "GFLOP/s",
      "% peak",
      "torch img/s",
      "JAX/torch",
  ]
  rows = []
  order = {s: i for i, s in enumerate(STAGES)}
  for r in sorted(
      jax_rows,
      key=lambda r: (
          order[r["stage"]],
          r["agents"],
          r["strategy"],
          r["conv_impl"],
          _dtype_label(r),
      ),
  ):
    t = torch_by_k.get(r["agents"]) if r["stage"] == "experts" else None
    b1 = base.get((r["stage"], r["conv_impl"], _dtype_label(r)))
    rows.append(
        [
            r["stage"],
            r["agents"],
            r["strategy"],
            r["conv_impl"],
            _dtype_label(r),
            r["images_per_s"],
            1e3 * r["median_s"],
            1e3 * r["median_cpu_s"],
            r["median_s"] / b1 if b1 else None,
            r["compile_s"],
            r["peak_rss_mib"],
            r["flops_xla"] / 1e9,
            r["flops_model"] / 1e9,
            r["flops_per_s"] / 1e9,
            "n/a"
            if r["peak_fraction"] is None
            else f"{100 * r['peak_fraction']:.1f}",
            t["images_per_s"] if t else None,
            r["images_per_s"] / t["images_per_s"] if t else None,
        ]
    )
  for k, t in sorted(torch_by_k.items()):
    rows.append(
        [
            "experts (PyTorch)",
            k,
            "sequential",
            "torch",
            "float32",
            t["images_per_s"],
            1e3 * t["median_s"],
            1e3 * t["median_cpu_s"],
            None,
            t["setup_s"],
            t["peak_rss_mib"],
            None,
            t["flops_model"] / 1e9,
            t["flops_model"] / t["median_s"] / 1e9,
            "n/a",
            None,
            None,
        ]
    )
  return common.markdown_table(headers, rows)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.show:
    with open(args.show) as f:
      saved = json.load(f)
    print(
        f"# {saved['machine']['cpu_model']}, {saved['machine']['cpu_count']} cores; "
        f"XLA_FLAGS={saved.get('xla_flags_workers', '')!r}; patches {saved['args'].get('patch', [])}; "
        f"load after {saved.get('load_after')}"
    )
    print(make_table(saved["results"]))
    return 0
  if args.worker:
    spec = json.loads(args.worker)
    if spec.get("cores"):
      # Before JAX/PyTorch start, so their thread pools see only these cores.
      os.sched_setaffinity(
          0, set(sorted(os.sched_getaffinity(0))[: spec["cores"]])
      )
    result = torch_worker(spec) if spec["kind"] == "torch" else jax_worker(spec)
    print(json.dumps(result))
    return 0

  stages_ = _csv(args.stages)
  bad = [s for s in stages_ if s not in STAGES]
  if bad:
    raise SystemExit(f"unknown stages {bad}; use {STAGES}")
  from masc_jax.nn import network

  dtypes = _csv(args.dtypes)
  bad = [d for d in dtypes if d not in network.COMPUTE_DTYPES]
  if bad or not dtypes:
    raise SystemExit(
        f"--dtypes: use some of {','.join(network.COMPUTE_DTYPES)}, got {args.dtypes!r}"
    )
  base = dict(
      batch=args.batch,
      steps=args.steps,
      warmup=args.warmup,
      input=args.input,
      donate=args.donate,
      patches=args.patch,
      cores=args.cores,
      cast_state=args.cast_state,
  )
  specs = []
  for stage in stages_:
    for k in _csv(args.agents, int):
      for strategy in _csv(args.strategies):
        for impl in _csv(args.conv_impls):
          for dtype in dtypes:
            specs.append(
                dict(
                    base,
                    kind="jax",
                    stage=stage,
                    agents=k,
                    strategy=strategy,
                    conv_impl=impl,
                    dtype=dtype,
                )
            )
      if args.torch and stage == "experts":
        specs.append(
            dict(
                base,
                kind="torch",
                stage=stage,
                agents=k,
                strategy=None,
                conv_impl=None,
                dtype="float32",
                threads=args.torch_threads,
            )
        )
  env = {}
  if args.xla_flags:
    env["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", "")] + args.xla_flags
    ).strip()

  machine = common.machine_info()
  print(
      f"# {machine['cpu_model']}, {machine['cpu_count']} cores; load {common.loadavg()}; "
      f"XLA_FLAGS={env.get('XLA_FLAGS', machine['xla_flags'])!r}",
      flush=True,
  )
  best: dict[tuple, dict[str, Any]] = {}
  all_runs = []
  for rep in range(args.repeats):
    for spec in specs:
      r = common.run_worker(
          "benchmarks.agent_step",
          spec,
          env_extra=env if spec["kind"] == "jax" else None,
          timeout=args.timeout,
      )
      r = {**spec, **r, "repeat": rep}
      all_runs.append(r)
      label = (
          f"[{rep + 1}/{args.repeats}] {spec['stage']} K={spec['agents']} "
          + (
              f"{spec['strategy']}/{spec['conv_impl']}/{_dtype_label(spec)}"
              if spec["kind"] == "jax"
              else "torch"
          )
      )
      if "error" in r:
        print(f"{label}: ERROR {r['error']}", flush=True)
        continue
      print(
          f"{label}: {1e3 * r['median_s']:.0f} ms/step (cpu {1e3 * r['median_cpu_s']:.0f} ms), "
          f"{r['images_per_s']:.1f} img/s, "
          f"compile {r.get('compile_s', r.get('setup_s')):.1f}s, "
          f"load {r['load_before']}->{r['load_after']}",
          flush=True,
      )
      k = _key(r)
      if k not in best or r["median_s"] < best[k]["median_s"]:
        best[k] = {
            **r,
            "medians_s": best.get(k, {}).get("medians_s", []) + [r["median_s"]],
        }
      else:
        best[k]["medians_s"].append(r["median_s"])
  results = list(best.values())

  torch_params = {
      r["params_per_agent"] for r in results if r["kind"] == "torch"
  }
  jax_params = {
      r["params_per_agent"]
      for r in results
      if r["kind"] == "jax" and r["stage"] == "experts"
  }
  if torch_params or jax_params:
    print(
        f"\nexpert parameters per agent: JAX {sorted(jax_params)}, PyTorch {sorted(torch_params)}"
    )
  if torch_params and jax_params:
    assert (
        torch_params == jax_params
    ), f"parameter counts differ: JAX {jax_params} vs PyTorch {torch_params}"

  table = make_table(results)
  print()
  print(table)
  load = common.loadavg()
  print(
      f"\nload average after the sweep: {load} on {machine['cpu_count']} cores"
  )
  out = args.out or os.path.join(
      "benchmarks",
      "results",
      f"agent_step_{datetime.datetime.now():%Y%m%d_%H%M%S}.json",
  )
  common.write_json(
      out,
      {
          "machine": machine,
          "args": vars(args),
          "xla_flags_workers": env.get("XLA_FLAGS", machine["xla_flags"]),
          "load_after": load,
          "results": results,
          "runs": all_runs,
          "table": table,
      },
  )
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
