"""Run by tests/test_sharding.py in a subprocess with 8 forced CPU devices.

Usage: python tests/sharding_worker.py steps|population|e2e|partial WORKDIR
Prints one JSON object on its last line.
"""

import json
import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from masc_jax import config_lib
from masc_jax.training import protocol, train  # noqa: E402
from masc_jax.training.society import build_society
from masc_jax.training import workdir as workdir_lib  # noqa: E402

TINY_K2 = ["num_agents=2"]  # K=2: a 4-device mesh is 2 (agents) x 2 (data)
# The end-to-end checks skip the ablation stages: the same steps, already checked in "steps".
NO_ABLATIONS = ["ablations=False"]


def society_on(num_devices, extra=()):
  config = config_lib.load_config(
      "tiny", TINY_K2 + [f"num_devices={num_devices}", *extra]
  )
  return build_society(config)


def stage_steps(num_devices, num_steps=3, extra=()):
  """Three steps of every stage from the same initial state; losses and final states."""
  society = society_on(num_devices, extra)
  names = protocol.stage_names(society.config)
  members = society.members
  keys = members.keys(lambda seed: jax.random.split(jax.random.key(seed)))
  init_key, train_key = keys[..., 0], keys[..., 1]
  init = lambda: train.init_population_state(society, init_key)
  state = jax.jit(
      init, out_shardings=train.state_shardings(society, jax.eval_shape(init))
  )()
  losses, sharded = {}, {}
  for stage in names:
    key = members.fold_in(train_key, names.index(stage))
    compiled, frozen, get_batch = train.compile_stage(
        society, protocol.BY_NAME[stage], state, 0, key
    )
    model_state = state[stage]
    totals = []
    for step in range(num_steps):
      model_state, metrics = compiled(
          model_state, get_batch(step), members.fold_in(key, step), frozen
      )
      totals.append(np.asarray(metrics["total"]).tolist())
    state = {**state, stage: model_state}
    losses[stage] = totals
    leaf = jax.tree.leaves(model_state.params)[
        0
    ]  # [P, ...]: [P, K, ...] when stacked
    shard = leaf.sharding.shard_shape(leaf.shape)
    sharded[stage] = {
        "devices": len(leaf.sharding.device_set),
        "members": leaf.shape[0],
        "member_shard": shard[0],
        "rows": leaf.shape[1],
        "shard_rows": shard[1],
    }
  params = {
      stage: [
          np.asarray(x).tolist() for x in jax.tree.leaves(state[stage].params)
      ]
      for stage in names
  }
  return {
      "losses": losses,
      "params": params,
      "sharded": sharded,
      "mesh": dict(society.mesh.shape),
  }


def main():
  mode, workdir = sys.argv[1], sys.argv[2]
  if mode == "steps":
    # Three devices: K=2 and the batch of 16 divide by neither, so the batches stay whole.
    out = {
        "one": stage_steps(1),
        "four": stage_steps(4),
        "three": stage_steps(3),
    }
  elif mode == "population":
    # Two members (a seed each), batched: one device; 4 devices (members 2 x agents 2);
    # 6 devices (members 2 x data 3, a batch of 16 that 3 does not divide). Members in
    # turn (loop, CPU's default) share all 3 devices of a mesh without a member axis.
    seeds = NO_ABLATIONS + ["seeds=0,1"]
    vmapped = seeds + ["member_map=vmap"]
    out = {
        "one": stage_steps(1, extra=vmapped),
        "four": stage_steps(4, extra=vmapped),
        "six": stage_steps(6, extra=vmapped),
        "loop_three": stage_steps(3, extra=seeds + ["member_map=loop"]),
    }
    # The per-member finiteness check before a save is read on every process of a
    # multi-process run: it must come back whole on every device.
    society = society_on(4, vmapped)
    run = train.Run(society, workdir, log=lambda _: None)
    state, _ = run.restore_or_init()
    out["finite_replicated"] = bool(
        run._finite(state).sharding.is_fully_replicated
    )
    run.close()
  elif mode == "e2e":
    extra = sys.argv[
        4:
    ]  # e.g. agent_map=unroll: fields a resumed run may change
    config = config_lib.load_config(
        "tiny", TINY_K2 + NO_ABLATIONS + [f"num_devices={sys.argv[3]}", *extra]
    )
    lines = []
    out = train.train_and_evaluate(config, workdir, log=lines.append)
    out["log"] = lines
    # The experts as the run ended (restored from its last checkpoint): a resumed run must
    # not have retrained them.
    run = train.Run(build_society(config), workdir, log=lambda _: None)
    state, _ = run.restore_or_init()
    run.close()
    out["experts_checksum"] = float(
        sum(
            np.abs(np.asarray(x, np.float64)).sum()
            for x in jax.tree.leaves(state["experts"].params)
        )
    )
  elif mode == "partial":
    # The experts stage only, on 4 devices, then a checkpoint as at a stage end.
    society = society_on(4, NO_ABLATIONS)
    run = train.Run(society, workdir, log=lambda _: None)
    state, meta = run.restore_or_init()
    with workdir_lib.StopSignals() as flag:
      state = run.train_stage(protocol.BY_NAME["experts"], state, meta, flag)
    run.save(state, {**meta, "stage": "collective", "stage_step": 0})
    run.close()
    workdir_lib.atomic_write_json(
        os.path.join(workdir, "config.json"),
        json.loads(society.config.to_json()),
    )
    out = {
        "saved_on": len(jax.devices()),
        "mesh": dict(society.mesh.shape),
        "global_step": run.offsets["collective"],
        "experts_checksum": float(
            sum(
                np.abs(np.asarray(x, np.float64)).sum()
                for x in jax.tree.leaves(state["experts"].params)
            )
        ),
    }
  else:
    raise SystemExit(f"unknown mode {mode}")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
