"""Run by tests/test_preflight_units.py in a subprocess with 4 forced CPU devices.

Usage: python tests/preflight_worker.py CONFIG [--stages=A,B] [FIELD=VALUE ...]

For every stage of the config, the pre-flight's programs (the society built
on the same devices without data: shapes only) against the training loop's
(its real society, state, batch and key), both compiled for the same CPU
mesh:

* ``same_text``, ``same_input_shardings``, ``same_output_shardings``: the
  pre-flight's train step and evaluation program against the same functions
  lowered with the loop's real inputs;
* ``same_step_outputs``: the pre-flight's compiled train step, run on the
  loop's inputs, gives bit for bit what ``train.compile_stage``'s step gives.

Prints one JSON object on its last line: ``{stage: {kind: {check: bool}}}``.
"""

import json
import os
import re
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from masc_jax import config_lib  # noqa: E402
from masc_jax.data import batches  # noqa: E402
from masc_jax.parallel import sharding  # noqa: E402
from masc_jax.preflight import programs  # noqa: E402
from masc_jax.training import protocol, train  # noqa: E402
from masc_jax.training.society import build_society  # noqa: E402


def optimised_text(compiled) -> str:
  """The optimised HLO without source locations (the two programs come from different lines)."""
  text = compiled.as_text().split("\nFileNames")[0]
  return re.sub(r",? ?metadata=\{[^}]*\}", "", text)


def compare(a, b) -> dict:
  return {
      "same_text": optimised_text(a) == optimised_text(b),
      "same_input_shardings": a.input_shardings == b.input_shardings,
      "same_output_shardings": a.output_shardings == b.output_shardings,
      "devices": len(jax.tree.leaves(a.input_shardings)[0].device_set),
  }


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


def main(name, args):
  stages = [a for a in args if a.startswith("--stages=")]
  overrides = [a for a in args if a not in stages]
  wanted = stages[0].split("=", 1)[1].split(",") if stages else None
  # Resolved for the TPU, as the pre-flight does: the programs a TPU run compiles.
  config = programs.resolve_for_backend(
      config_lib.load_config(name, overrides), "tpu"
  )
  real = build_society(config)
  shapes = programs.abstract_society(config, jax.devices())
  members = real.members
  keys = members.keys(lambda seed: jax.random.split(jax.random.key(seed)))
  init = lambda: train.init_population_state(real, keys[..., 0])
  state = jax.jit(
      init, out_shardings=train.state_shardings(real, jax.eval_shape(init))
  )()
  abstract_state = programs.abstract_state(shapes)
  names = protocol.stage_names(config)
  replicated = sharding.replicated(real.mesh)
  out = {}
  for spec in protocol.stages_for(config):
    if wanted and spec.name not in wanted:
      continue
    stage_key = members.fold_in(keys[..., 1], names.index(spec.name))
    step, frozen, get_batch = train.compile_stage(
        real, spec, state, 0, stage_key
    )
    batch, rng = get_batch(0), members.fold_in(stage_key, 0)
    # The loop's program (``members.compile_step``'s) lowered with the loop's inputs.
    jitted = members.step_program(
        *train.stage_step_functions(real, spec, state)
    )
    args = members.program_inputs(
        (state[spec.name], batch, rng),
        frozen,
        jax.device_put(members.hparams(), replicated),
    )
    preflight = programs.stage_program(shapes, spec, abstract_state)
    compiled = preflight.lower().compile()
    train_checks = compare(jitted.lower(*args).compile(), compiled)
    # The pre-flight's executable on the loop's inputs, against the loop's step.
    inputs = (
        copy(state[spec.name]),
        batch,
        rng,
        frozen,
        jax.device_put(members.hparams(), replicated),
    )
    if members.in_turn:  # one member's program: member 0's inputs
      inputs = jax.tree.map(lambda x: x[0], inputs)
    inputs = jax.device_put(inputs, compiled.input_shardings[0])
    mine = compiled(*inputs)
    theirs = step(copy(state[spec.name]), batch, rng, frozen)
    if members.in_turn:
      theirs = jax.tree.map(lambda x: x[0], theirs)
    train_checks["same_step_outputs"] = jax.tree.structure(
        mine
    ) == jax.tree.structure(theirs) and all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs))
    )
    # Evaluation: the loop's first test batch of member 0 (Run.evaluate_stage).
    variables = jax.tree.map(lambda x: x[0], train.stage_variables(spec, state))
    idx, _ = next(
        iter(
            batches.eval_batches(
                len(real.dataset.test_labels), config.eval_batch_size
            )
        )
    )
    settings = dict(members.members[0].settings)
    predict = train.predict_program(real, spec)
    eval_checks = compare(
        predict.lower(variables, settings, real.test_images[idx]).compile(),
        programs.eval_program(shapes, spec, abstract_state).lower().compile(),
    )
    out[spec.name] = {"train": train_checks, "eval": eval_checks}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
