"""Does feeding real batches slow the train step? The run's input path vs one fixed batch.

    python -m benchmarks.input_pipeline                     # digits, its real config, stage 1
    python -m benchmarks.input_pipeline --cifar-synthetic   # + a CIFAR-size synthetic array (K=4, spec widths)

The run keeps the uint8 training images on the device and, every step, asks
``batches.AgentBatches`` for the ``[K, B]`` indices and gathers the batch with a
small jitted gather (``train.batch_source``). This benchmark builds the run's
own objects (``train.build_society``, ``train.init_run_state``,
``train.stage_step``, ``train.frozen_inputs``, ``train.batch_source``),
compiles the stage's step as ``Run.train_stage`` does (sharding constraint,
state donated) and times the training loop two ways, alternating:

  real    ``compiled(state, get_batch(step), fold_in(key, step), frozen)``, the run's loop
  fixed   the same, with one batch gathered beforehand and fed every step

No sync inside the loop (like the run, which fetches metrics every
``log_every_steps``); one ``block_until_ready`` at the end. Reported: ms per
step of each (medians over the repeats), the rate ratio real/fixed (the
median over the repeats of fixed_time/real_time of each adjacent pair of
loops; goal: >= 0.95) and the host time of one ``get_batch`` call (indices +
gather, waited for).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from benchmarks import common


def synthetic_cifar_society(society, num_images: int, seed: int = 0):
  """``society`` with a synthetic CIFAR-100-size dataset and the cifar100 config's networks."""
  import jax
  from masc_jax.method import agents
  from masc_jax.data import batches, arrays, registry
  from masc_jax import config_lib
  from masc_jax.nn import network
  from masc_jax.parallel import sharding

  config = config_lib.load_config("cifar100")
  rng = np.random.default_rng(seed)
  labels = (np.arange(num_images) % 100).astype(np.int32)
  rng.shuffle(labels)
  ds = arrays.ArrayDataset(
      name="cifar100",
      train_images=rng.integers(0, 256, (num_images, 32, 32, 3), np.uint8),
      train_labels=labels,
      test_images=rng.integers(0, 256, (100, 32, 32, 3), np.uint8),
      test_labels=np.arange(100, dtype=np.int32),
      num_classes=100,
      mean=np.asarray(registry.DATASETS["cifar100"].mean, np.float32),
      std=np.asarray(registry.DATASETS["cifar100"].std, np.float32),
  )
  groups = batches.make_class_groups(100, config.num_agents)
  per_agent = batches.agent_indices(ds.train_labels, groups)
  pooled = np.sort(np.concatenate(per_agent))
  mesh = sharding.make_mesh(
      config.num_agents, config.num_devices, config.agent_axis_size
  )
  expert = network.make_network(config.model, 100, config.model.expert_widths)
  collective = network.make_network(
      config.model, 100, config.model.collective_widths
  )
  rep = sharding.replicated(mesh)
  return dataclasses.replace(
      society,
      config=config,
      dataset=ds,
      class_groups=groups,
      mesh=mesh,
      expert_network=expert,
      collective_network=collective,
      backbone=network.backbone_of(collective),
      head=network.head_of(collective),
      agent_batches=batches.AgentBatches(
          per_agent, config.batch_size, seed=config.seed
      ),
      pooled_batches=batches.PooledBatches(
          pooled, config.batch_size, seed=config.seed
      ),
      train_images=jax.device_put(ds.train_images, rep),
      train_labels=jax.device_put(ds.train_labels, rep),
      test_images=jax.device_put(ds.test_images, rep),
      strategy=agents.resolve_strategy(config.agent_map),
  )


def measure(society, stage: str, steps: int, warmup: int, repeats: int) -> dict:
  import jax
  from masc_jax.training import train
  from masc_jax.training.society import build_society

  key = jax.random.key(society.config.seed)
  init_key, train_key = jax.random.split(key)
  state = jax.jit(lambda: train.init_run_state(society, init_key))()
  get_batch = train.batch_source(society, stage)
  step_fn = train.stage_step(society, stage)
  shardings = train.state_shardings(society, {stage: state[stage]})[stage]

  def constrained(model_state, batch, rng, frozen):  # as Run.train_stage
    new_state, metrics = step_fn(model_state, batch, rng, frozen)
    return jax.lax.with_sharding_constraint(new_state, shardings), metrics

  frozen = train.frozen_inputs(society, stage, state)
  stage_key = jax.random.fold_in(train_key, 0)
  t0 = time.perf_counter()
  compiled = (
      jax.jit(constrained, donate_argnums=(0,))
      .lower(
          state[stage], get_batch(0), jax.random.fold_in(stage_key, 0), frozen
      )
      .compile()
  )
  compile_s = time.perf_counter() - t0
  fixed = jax.block_until_ready(get_batch(0))
  holder = {"state": state[stage], "step": 0}

  def loop(feed, n):
    pending = []
    t0 = time.perf_counter()
    for _ in range(n):
      s = holder["step"]
      rng = jax.random.fold_in(stage_key, s)
      holder["state"], metrics = compiled(holder["state"], feed(s), rng, frozen)
      pending.append(metrics)
      holder["step"] = s + 1
    jax.block_until_ready((holder["state"], pending))
    return (time.perf_counter() - t0) / n

  loop(get_batch, warmup)
  loop(lambda s: fixed, warmup)
  real, fix = [], []
  for r in range(repeats):
    # Alternate the order so a drift in machine load hits both alike.
    if r % 2 == 0:
      real.append(loop(get_batch, steps))
      fix.append(loop(lambda s: fixed, steps))
    else:
      fix.append(loop(lambda s: fixed, steps))
      real.append(loop(get_batch, steps))
  # Host cost of producing one batch (indices on the host + gather dispatch + wait).
  t0 = time.perf_counter()
  n_get = 50
  for s in range(n_get):
    jax.block_until_ready(get_batch(1000 + s))
  get_ms = (time.perf_counter() - t0) / n_get * 1e3
  med_real, med_fix = float(np.median(real)), float(np.median(fix))
  return {
      "stage": stage,
      "agents": society.num_agents,
      "batch": society.config.batch_size,
      "images_per_step": society.images_per_step(stage),
      "compile_s": compile_s,
      "real_ms": 1e3 * med_real,
      "fixed_ms": 1e3 * med_fix,
      "real_ms_all": [1e3 * x for x in real],
      "fixed_ms_all": [1e3 * x for x in fix],
      # Each real loop ran next to a fixed loop: the median of the paired
      # ratios cancels the machine's load drifts better than a ratio of medians.
      "rate_ratio": float(np.median(np.asarray(fix) / np.asarray(real))),
      "rate_ratio_of_medians": med_fix / med_real,
      "get_batch_ms": get_ms,
      "strategy": society.strategy,
      "load": common.loadavg(),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
      "--stages",
      default="experts",
      help="comma list: experts,collective,altruism",
  )
  p.add_argument(
      "--steps", type=int, default=40, help="steps per timed loop (digits)"
  )
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument(
      "--repeats", type=int, default=5, help="alternating real/fixed loops"
  )
  p.add_argument(
      "--cifar-synthetic",
      action="store_true",
      help="also a synthetic CIFAR-size dataset with the cifar100 config (K=4, spec widths)",
  )
  p.add_argument("--cifar-images", type=int, default=10000)
  p.add_argument("--cifar-steps", type=int, default=4)
  p.add_argument("--cifar-repeats", type=int, default=3)
  p.add_argument(
      "--agent-map",
      default="",
      help="override config.agent_map (auto|vmap|unroll)",
  )
  p.add_argument("--out", default="")
  args = p.parse_args(argv)

  from masc_jax.method import agents
  from masc_jax import config_lib
  from masc_jax.training import train

  config = config_lib.load_config("digits")
  if args.agent_map:
    config.agent_map = args.agent_map
  society = build_society(config)
  print(
      f"# {common.cpu_model()}, {os.cpu_count()} cores; load {common.loadavg()}",
      flush=True,
  )
  results = []
  for stage in [s for s in args.stages.split(",") if s]:
    r = measure(society, stage, args.steps, args.warmup, args.repeats)
    r["input"] = "digits (real config)"
    results.append(r)
    print(
        f"digits {stage}: real {r['real_ms']:.2f} ms/step, fixed {r['fixed_ms']:.2f} ms/step, "
        f"ratio {r['rate_ratio']:.3f}, get_batch {r['get_batch_ms']:.3f} ms, load {r['load']}",
        flush=True,
    )
  if args.cifar_synthetic:
    cifar = synthetic_cifar_society(society, args.cifar_images)
    if args.agent_map:
      cifar = dataclasses.replace(
          cifar, strategy=agents.resolve_strategy(args.agent_map)
      )
    r = measure(cifar, "experts", args.cifar_steps, 1, args.cifar_repeats)
    r["input"] = (
        f"synthetic CIFAR-size ({args.cifar_images} images, cifar100 config)"
    )
    results.append(r)
    print(
        f"cifar-synthetic experts: real {r['real_ms']:.1f} ms/step, fixed {r['fixed_ms']:.1f} "
        f"ms/step, ratio {r['rate_ratio']:.3f}, get_batch {r['get_batch_ms']:.3f} ms, "
        f"load {r['load']}",
        flush=True,
    )
  table = common.markdown_table(
      [
          "input",
          "stage",
          "K",
          "B",
          "strategy",
          "real ms/step",
          "fixed ms/step",
          "rate real/fixed",
          "get_batch ms",
      ],
      [
          [
              r["input"],
              r["stage"],
              r["agents"],
              r["batch"],
              r["strategy"],
              r["real_ms"],
              r["fixed_ms"],
              f"{r['rate_ratio']:.3f}",
              r["get_batch_ms"],
          ]
          for r in results
      ],
  )
  print()
  print(table)
  print(f"\nload average: {common.loadavg()}")
  if args.out:
    common.write_json(
        args.out,
        {
            "machine": common.machine_info(),
            "results": results,
            "table": table,
            "args": vars(args),
        },
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
