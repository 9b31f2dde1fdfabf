"""Entry point: ``python -m masc_jax.main --config=NAME[:ARG] [--config.FIELD=VALUE ...] [--workdir=DIR]``.

Flags, then one call: ``train.train_and_evaluate(config, workdir)``. Every bad
input ends here with one clear message and exit status 2, before anything is
written to the workdir.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from masc_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config: a registered name (cifar100, cifar10, digits, tiny), NAME:ARG, or a path to a "
    "get_config() file. Override fields with --config.FIELD=VALUE.",
    lock_config=True)
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


def _resolve_config_argv(argv: list[str]) -> tuple[list[str], str]:
  """Map ``--config=NAME[:ARG]`` to the packaged config file (ml_collections wants a path)."""
  out, spec = [], None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
      arg = "--config=" + config_lib.resolve_config_spec(spec)
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
      argv[i + 1] = config_lib.resolve_config_spec(spec)
    out.append(arg)
  if spec is None:
    raise config_lib.ConfigError(
        f"--config is required: one of {', '.join(config_lib.REGISTERED)} "
        "(try --config=digits, which runs offline)")
  return out, spec


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _MULTIHOST.value:
    import jax
    jax.distributed.initialize()
  # Imported here so that a bad flag fails fast, before JAX and TFDS load.
  from masc_jax import checkpointing, data, train

  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config_lib.config_name(_SPEC))
  try:
    train.train_and_evaluate(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except (config_lib.ConfigError, data.DatasetNotPreparedError, train.WorkdirError,
          checkpointing.NoGoodCheckpointError, train.NonFiniteLossError) as e:
    _fail(str(e))
  except ValueError as e:   # e.g. a mesh that cannot hold the agents
    _fail(str(e))


_SPEC = "config"


def run() -> None:
  global _SPEC
  try:
    argv, _SPEC = _resolve_config_argv(list(sys.argv))
  except config_lib.ConfigError as e:
    _fail(str(e))
  logging.set_verbosity(logging.WARNING)
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
