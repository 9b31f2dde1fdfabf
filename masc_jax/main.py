"""Entry point: ``python -m masc_jax.main --config=NAME[:ARG] [--config.FIELD=VALUE ...] [--workdir=DIR]``.

Flags, then one call: ``train.train_and_evaluate(config, workdir)``. Every bad
input ends here with one clear message and exit status 2, before anything is
written to the workdir.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from masc_jax import config_lib

flags.DEFINE_string(
    "config", None,
    "Config: a registered name (cifar100, cifar10, digits, tiny), NAME:ARG, or a path to a "
    "get_config() file. Override any field with --config.FIELD=VALUE.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and results go (default: runs/<config name>).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a workdir even though its saved config differs in result-changing fields.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (multi-host TPU slices).")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def split_config_args(argv: list[str]) -> tuple[str, list[str], list[str]]:
  """``argv`` -> (config spec, ``FIELD=VALUE`` overrides, the remaining argv for absl)."""
  spec, overrides, rest = None, [], [argv[0]]
  args = iter(argv[1:])
  for arg in args:
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config":
      spec = next(args, "")
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  if not spec:
    raise config_lib.ConfigError(
        f"--config is required: one of {', '.join(config_lib.REGISTERED)} "
        "(try --config=digits, which runs offline)")
  return spec, overrides, rest + [f"--config={spec}"]


class _Job:
  spec: str = ""
  config = None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _MULTIHOST.value:
    import jax
    jax.distributed.initialize()
  # Imported here so that a bad flag fails fast, before TFDS and the training code load.
  from masc_jax import checkpointing, data, sharding, train

  workdir = _WORKDIR.value or os.path.join("runs", config_lib.config_name(_Job.spec))
  try:
    train.train_and_evaluate(_Job.config, workdir,
                             allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except (config_lib.ConfigError, data.DatasetNotPreparedError, train.WorkdirError,
          checkpointing.NoGoodCheckpointError, train.NonFiniteLossError,
          sharding.MeshError) as e:
    _fail(str(e))


def run() -> None:
  """Parse the config and its overrides (one clear error), then hand over to absl."""
  try:
    _Job.spec, overrides, argv = split_config_args(list(sys.argv))
    _Job.config = config_lib.load_config(_Job.spec, overrides)
  except config_lib.ConfigError as e:
    _fail(str(e))
  logging.set_verbosity(logging.WARNING)
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
