"""Entry point: ``python -m masc_jax.main --config=NAME[:ARG] [--config.FIELD=VALUE ...] [--workdir=DIR]``.

Flags, then one call: ``train.train_and_evaluate(config, workdir)``. Every bad
input ends here with one clear line on stderr and exit status 2, before
anything is written to the workdir.

``--config`` and its ``--config.FIELD=VALUE`` overrides are parsed by
``config_lib.load_config`` (ml_collections' config flag, with registered names
resolved to their files); the remaining flags by absl. Both happen in
``parse_flags``, absl's ``flags_parser`` hook, so a bad flag never reaches the
training code and never shows a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import ml_collections
from absl import app, flags, logging

from masc_jax import config_lib

flags.DEFINE_string(
    "config", None,
    "Config: a registered name (" + ", ".join(config_lib.REGISTERED) + "), NAME:ARG, or a path "
    "to a get_config() file. Override any field with --config.FIELD=VALUE.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and results go (default: runs/<config name>).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a workdir even though its saved config differs in result-changing fields.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (multi-host TPU slices).")


@dataclasses.dataclass(frozen=True)
class Job:
  """What the command line asks for."""
  config_spec: str
  config: ml_collections.ConfigDict
  workdir: str


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_args(argv: list[str]) -> tuple[str, list[str], list[str]]:
  """``argv`` -> (config spec, ``FIELD=VALUE`` overrides, the other arguments)."""
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
  return spec, overrides, rest


def parse_flags(argv: list[str]) -> Job:
  """absl's ``flags_parser``: the config and its overrides, then every other flag."""
  try:
    spec, overrides, rest = _config_args(list(argv))
    config = config_lib.load_config(spec, overrides)
  except config_lib.ConfigError as e:
    _fail(str(e))
  try:
    positional = flags.FLAGS(rest + [f"--config={spec}"])
  except flags.Error as e:
    _fail(str(e))
  if len(positional) > 1:
    _fail(f"unexpected arguments: {' '.join(positional[1:])}")
  workdir = _WORKDIR.value or os.path.join("runs", config_lib.config_name(spec))
  return Job(config_spec=spec, config=config, workdir=workdir)


def main(job: Job) -> None:
  logging.set_verbosity(logging.WARNING)
  if _MULTIHOST.value:
    import jax
    jax.distributed.initialize()
  # Imported here so that a bad flag fails fast, before TFDS and the training code load.
  from masc_jax import checkpointing, data, sharding, step_log, train, workdir

  try:
    train.train_and_evaluate(job.config, job.workdir,
                             allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except (config_lib.ConfigError, data.DatasetNotPreparedError, workdir.WorkdirError,
          checkpointing.NoGoodCheckpointError, step_log.NonFiniteLossError,
          sharding.MeshError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
