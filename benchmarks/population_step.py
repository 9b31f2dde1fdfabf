"""Benchmark of a population's stage steps: P members trained together vs one.

    python -m benchmarks.population_step                                # digits, P=1,2,4, auto
    python -m benchmarks.population_step --config=cifar100 --members 1,2,4,8 \
        --strategies vmap,loop --stages experts,collective --steps 5 --warmup 2

Each (P, strategy) runs in a fresh worker process that builds the run's own
objects (``train.build_society`` on synthetic data of the config's shapes, a
population of seeds ``0..P-1``, ``train.compile_stage``: exactly what a run
compiles, member mapping included) and times ``--steps`` steps of every
stage named, each ending in ``block_until_ready``. Reported per config:

  step ms        median step time of the population (all P members).
  member-img/s   images consumed per second, summed over members and agents.
  vs P=1         this step's time / the P=1 step's (same stage, strategy): the
                 goal on an accelerator is <= 1.5 until the device is full.
  compile s      the stage step's compile time (``compile_stage``).
  GFLOP/s, MFU   ``cost_analysis`` FLOPs are not available through the looped
                 step, so the analytic count of ``benchmarks.agent_step``
                 (x P members) over the step time; MFU against the device's
                 peak for the row's dtype (``common.PEAK_FLOPS``), n/a on CPU.

``--dtypes float32,bfloat16`` sweeps ``config.model.compute_dtype`` (bfloat16:
the library's mixed precision); ``--collective-batches shuffled,by_owner``
sweeps ``config.collective_batches`` (by_owner: each teacher runs on its own
share of the collective's batch). Every row and JSON record names both.

P=1 is a single run (one member, its own program under member_map=auto). Results go to
``benchmarks/results/population_step_<time>.json`` with the machine named.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
from typing import Any

import numpy as np

from benchmarks import common

STAGES = ("experts", "collective", "altruism")


def synthetic_dataset(config):
  """Random uint8 images and balanced labels with the shapes of ``config.dataset``."""
  from masc_jax.data import arrays, registry

  info = registry.DATASETS[config.dataset]
  h, w, c = info.image_shape
  rng = np.random.default_rng(0)
  per_class = 2 * config.batch_size  # every agent fills its batches
  labels = np.repeat(np.arange(info.num_classes), per_class).astype(np.int32)
  test_labels = np.arange(info.num_classes, dtype=np.int32)
  return arrays.ArrayDataset(
      name=config.dataset,
      train_images=rng.integers(0, 256, (len(labels), h, w, c), dtype=np.uint8),
      train_labels=labels,
      test_images=rng.integers(
          0, 256, (len(test_labels), h, w, c), dtype=np.uint8
      ),
      test_labels=test_labels,
      num_classes=info.num_classes,
      mean=np.full(c, 0.5, np.float32),
      std=np.full(c, 0.25, np.float32),
  )


def worker(spec: dict[str, Any]) -> dict[str, Any]:
  import jax
  from masc_jax import config_lib
  from masc_jax.training import protocol, train
  from masc_jax.training.society import build_society
  from masc_jax.method import steps
  from benchmarks import agent_step

  dtype = spec.get("dtype", "float32")
  overrides = [
      f"seeds={','.join(map(str, range(spec['members'])))}",
      f"member_map={spec['strategy']}",
      f"batch_size={spec['batch']}",
      f"model.compute_dtype={dtype}",
      f"collective_batches={spec.get('collective_batches', 'shuffled')}",
      *spec.get("variant", []),
  ]
  config = config_lib.load_config(spec["config"], overrides)
  society = build_society(config, synthetic_dataset(config))
  run = train.Run(society, "/nonexistent-benchmark", log=lambda _: None)
  init = lambda: train.init_population_state(society, run.init_key)
  state = run.fresh_state(train.state_shardings(society, jax.eval_shape(init)))
  dev = jax.devices()[0]
  peak = common.peak_flops(dev.device_kind, dev.platform, dtype)
  out = []
  names = protocol.stage_names(config)
  for stage in spec["stages"]:
    stage_spec = protocol.BY_NAME[stage]
    key = society.members.fold_in(run.train_key, names.index(stage))
    t0 = time.perf_counter()
    compiled, frozen, get_batch = train.compile_stage(
        society, stage_spec, state, 0, key
    )
    compile_s = time.perf_counter() - t0
    # As the training loop does: members in turn keep their states apart within a stage.
    holder = {"state": compiled.unstack(state[stage])}
    batches = [get_batch(i) for i in range(spec["warmup"] + spec["steps"])]

    def call(i):
      holder["state"], metrics = compiled.step_members(
          holder["state"], batches[i], society.members.fold_in(key, i), frozen
      )
      return holder["state"], metrics

    stats = common.summarize_times(
        *common.time_calls(
            call,
            spec["steps"],
            spec["warmup"],
            lambda out: compiled.ready(out[0]),
        )
    )
    state = {**state, stage: compiled.stack(holder["state"])}
    images = protocol.images_per_step(society, stage_spec)
    info = society.dataset
    inp = {
        "hw": info.image_shape[:2],
        "channels": info.image_shape[2],
        "num_classes": info.num_classes,
    }
    groups = society.owner_batch_sizes
    teachers_on = (
        steps.owner_batch_index(groups)[0].size  # [K, largest group]
        if groups and config.loss.kd_teachers == "owner"
        else None
    )
    flops = spec["members"] * agent_step.model_flops(
        stage, config, inp, config.num_agents, config.batch_size, teachers_on
    )
    out.append(
        {
            **spec,
            **stats,
            "stage": stage,
            "dtype": dtype,
            "compile_s": compile_s,
            "variant": ",".join(spec.get("variant", [])),
            "images_per_step": images,
            "images_per_s": images / stats["median_s"],
            "flops_model": flops,
            "flops_per_s": flops / stats["median_s"],
            "mfu": flops / stats["median_s"] / peak if peak else None,
            "device": f"{dev.platform}:{dev.device_kind}",
            "num_devices": jax.device_count(),
            "resolved_strategy": society.members.strategy,
            "mesh": dict(society.mesh.shape),
            "jax_version": jax.__version__,
        }
    )
  run.close()
  return {"results": out, "peak_rss_mib": common.peak_rss_mib()}


def make_table(results: list[dict[str, Any]]) -> str:
  dtype = lambda r: r.get("dtype", "float32")
  order = lambda r: r.get("collective_batches", "shuffled")
  setting = lambda r: (
      r["stage"],
      r["strategy"],
      dtype(r),
      order(r),
      r.get("variant", ""),
  )
  one = {setting(r): r["median_s"] for r in results if r["members"] == 1}
  rows = []
  for r in sorted(
      results,
      key=lambda r: (STAGES.index(r["stage"]), *setting(r)[1:], r["members"]),
  ):
    base = one.get(setting(r))
    rows.append(
        [
            r["stage"],
            r["members"],
            f"{r['strategy']} ({r['resolved_strategy']})",
            dtype(r),
            order(r),
            r.get("variant") or "-",
            1e3 * r["median_s"],
            r["images_per_s"],
            r["median_s"] / base if base else None,
            r["compile_s"],
            r["flops_model"] / 1e9,
            r["flops_per_s"] / 1e9,
            f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a",
        ]
    )
  return common.markdown_table(
      [
          "stage",
          "P",
          "strategy",
          "dtype",
          "collective batches",
          "variant",
          "step ms",
          "member-img/s",
          "vs P=1",
          "compile s",
          "GFLOP/step",
          "GFLOP/s",
          "MFU",
      ],
      rows,
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
      "--config", default="digits", help="a config name (its shapes and K)"
  )
  p.add_argument("--members", default="1,2,4", help="comma list of P")
  p.add_argument(
      "--strategies",
      default="auto",
      help="member_map strategies (auto,vmap,unroll,loop,threads)",
  )
  p.add_argument(
      "--stages",
      default="experts,collective",
      help=f"comma list of {','.join(STAGES)}",
  )
  p.add_argument(
      "--batch", type=int, default=32, help="per-agent batch (the paper's: 32)"
  )
  p.add_argument(
      "--dtypes",
      default="float32",
      help="comma list of config.model.compute_dtype values (float32,bfloat16)",
  )
  p.add_argument(
      "--collective-batches",
      default="shuffled",
      help="comma list of config.collective_batches values (shuffled,by_owner)",
  )
  p.add_argument(
      "--variants",
      default="",
      help="';'-separated sets of comma-separated config overrides to compare, e.g. "
      "'agent_map=vmap;agent_map=unroll,model.conv_impl=im2col' (empty: the config's own)",
  )
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--timeout", type=float, default=1800)
  p.add_argument("--out", default="")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return 0
  stages = [s for s in args.stages.split(",") if s]
  if any(s not in STAGES for s in stages):
    raise SystemExit(f"--stages: use some of {STAGES}")
  from masc_jax import config_lib
  from masc_jax.nn import network

  dtypes = [d for d in args.dtypes.split(",") if d]
  if not dtypes or any(d not in network.COMPUTE_DTYPES for d in dtypes):
    raise SystemExit(
        f"--dtypes: use some of {','.join(network.COMPUTE_DTYPES)}, got {args.dtypes!r}"
    )
  machine = common.machine_info()
  print(
      f"# {machine['cpu_model']}, {machine['cpu_count']} cores; load {common.loadavg()}",
      flush=True,
  )
  from masc_jax.data import batches as batches_lib

  orders = [o for o in args.collective_batches.split(",") if o]
  if not orders or any(o not in batches_lib.COLLECTIVE_BATCHES for o in orders):
    raise SystemExit(
        f"--collective-batches: use some of {','.join(batches_lib.COLLECTIVE_BATCHES)}"
    )
  variants = [[o for o in v.split(",") if o] for v in args.variants.split(";")]
  for (
      variant
  ) in variants:  # a bad override stops here, before any worker starts
    config_lib.load_config(args.config, variant)
  results = []
  for strategy, dtype, order, variant, members in itertools.product(
      args.strategies.split(","),
      dtypes,
      orders,
      variants,
      map(int, args.members.split(",")),
  ):
    spec = dict(
        config=args.config,
        members=members,
        strategy=strategy,
        stages=stages,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        dtype=dtype,
        collective_batches=order,
        variant=variant,
    )
    name = f"P={members} {strategy} {dtype} {order} {','.join(variant) or '-'}"
    r = common.run_worker(
        "benchmarks.population_step", spec, timeout=args.timeout
    )
    if "error" in r:
      print(f"{name}: ERROR {r['error']}", flush=True)
      continue
    for row in r["results"]:
      print(
          f"{name} {row['stage']}: {1e3 * row['median_s']:.1f} ms/step, "
          f"{row['flops_model'] / 1e9:.2f} GFLOP, compile {row['compile_s']:.1f}s",
          flush=True,
      )
    results += r["results"]
  table = make_table(results)
  print("\n" + table)
  out = args.out or os.path.join(
      "benchmarks",
      "results",
      f"population_step_{datetime.datetime.now():%Y%m%d_%H%M%S}.json",
  )
  common.write_json(
      out,
      {
          "machine": machine,
          "args": vars(args),
          "results": results,
          "table": table,
          "load_after": common.loadavg(),
      },
  )
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
