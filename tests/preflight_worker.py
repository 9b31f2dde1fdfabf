"""Run by tests/test_preflight_units.py in a subprocess with 4 forced CPU devices.

Usage: python tests/preflight_worker.py CONFIG [--stages=A,B] [FIELD=VALUE ...]

For every stage of the config: the program the training loop compiles (its
real society, state, batch and key) and the pre-flight's program (the same
society built on the same devices without data, shapes only), both compiled
for the same CPU mesh. Prints one JSON object on its last line:
``{stage: {kind: {same_text, same_input_shardings, same_output_shardings}}}``.
"""

import json
import os
import re
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

import jax  # noqa: E402

from masc_jax import config_lib  # noqa: E402
from masc_jax.data import batches  # noqa: E402
from masc_jax.preflight import programs  # noqa: E402
from masc_jax.training import protocol, train  # noqa: E402
from masc_jax.training.society import build_society  # noqa: E402


def optimised_text(compiled) -> str:
  """The optimised HLO without source locations (the two programs come from different lines)."""
  text = compiled.as_text().split("\nFileNames")[0]
  return re.sub(r",? ?metadata=\{[^}]*\}", "", text)


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
  out = {}
  for spec in protocol.stages_for(config):
    if wanted and spec.name not in wanted:
      continue
    stage_key = members.fold_in(keys[..., 1], names.index(spec.name))
    get_batch = train.batch_source(real, spec)
    example = (state[spec.name], get_batch(0), members.fold_in(stage_key, 0))
    run_jitted, run_args = train.stage_program(real, spec, state, example)
    pairs = {
        "train": (
            run_jitted.lower(*run_args).compile(),
            programs.stage_program(shapes, spec, abstract_state)
            .lower()
            .compile(),
        )
    }
    # Evaluation: the loop's first test batch of member 0 (Run.evaluate_stage).
    variables = train.stage_variables(spec, state)
    if members.is_population:
      variables = jax.tree.map(lambda x: x[0], variables)
    idx, _ = next(
        iter(
            batches.eval_batches(
                len(real.dataset.test_labels), config.eval_batch_size
            )
        )
    )
    images = real.test_images[idx]
    settings = dict(members.members[0].settings)
    predict = train.predict_program(real, spec)
    pairs["eval"] = (
        predict.lower(variables, settings, images).compile(),
        programs.eval_program(shapes, spec, abstract_state).lower().compile(),
    )
    out[spec.name] = {
        kind: {
            "same_text": optimised_text(a) == optimised_text(b),
            "same_input_shardings": a.input_shardings == b.input_shardings,
            "same_output_shardings": a.output_shardings == b.output_shardings,
            "devices": len(jax.tree.leaves(a.input_shardings)[0].device_set),
        }
        for kind, (a, b) in pairs.items()
    }
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
