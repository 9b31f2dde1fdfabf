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

from masc_jax.parallel import compile_cache, multihost
from masc_jax import config_lib, paths

flags.DEFINE_string(
    "config",
    None,
    "Config: a registered name ("
    + config_lib.known_names()
    + "), NAME:ARG, or a path "
    "to a get_config() file. Override any field with --config.FIELD=VALUE.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Where checkpoints, metrics and results go (default: runs/<config name>).",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir even though its saved config differs in result-changing fields.",
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Join a multi-process run whose processes JAX detects (Cloud TPU slices, SLURM, Open MPI).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0, for a multi-process run started by hand (GPU cluster, N local "
    "processes); default $JAX_COORDINATOR_ADDRESS.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes",
    None,
    "Processes in the run, with --coordinator_address; default "
    "$JAX_NUM_PROCESSES.",
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "This process's index, 0..num_processes-1; default $JAX_PROCESS_ID.",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "JAX's persistent compilation cache (none: off). Default $MASC_COMPILATION_CACHE_DIR, else "
    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/masc_jax/xla-<cpu>.",
)
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for",
    None,
    "Pre-flight: compile every program of the run for this TPU slice (v5e-8, v6e-16, "
    "v4-8, v5p-16, v5e:4x4, ...) on this host, with no TPU and no data, and report "
    "whether each fits and the TPU cost model's estimates (needs libtpu: pip install "
    '-e ".[tpu]"). Trains nothing. Workdir default: runs/<config>_preflight_<slice>.',
)
_PREFLIGHT_TOP = flags.DEFINE_integer(
    "preflight_top",
    0,
    "With --compile_for: list each program's N instructions with the most "
    "estimated cycles.",
)
_PREFLIGHT_STAGES = flags.DEFINE_list(
    "preflight_stages",
    [],
    "With --compile_for: only these stages (default: every stage of the run).",
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "Multi-process runs: a process silent this long is taken as lost and every process stops.",
)


@dataclasses.dataclass(frozen=True)
class Job:
  """What the command line asks for."""

  config_spec: str
  config: ml_collections.ConfigDict
  workdir: str
  processes: multihost.ProcessSpec = multihost.ProcessSpec()
  overrides: tuple[str, ...] = ()
  compile_for: str | None = None  # a TPU slice: the pre-flight instead of a run


def _fail(message: str, status: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


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
      overrides.append(arg[len("--config.") :])
    else:
      rest.append(arg)
  if not spec:
    raise config_lib.ConfigError(
        f"--config is required: one of {config_lib.known_names()} "
        "(try --config=digits, which runs offline)"
    )
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
  if _WORKDIR.value is not None and not _WORKDIR.value.strip():
    _fail(
        "--workdir is empty: give a folder, or leave it out for runs/<config name>"
    )
  if _COMPILE_FOR.value is not None and not _COMPILE_FOR.value.strip():
    _fail("--compile_for is empty: give a TPU slice such as v5e-8")
  if _COMPILE_FOR.value is None and (
      _PREFLIGHT_TOP.value or _PREFLIGHT_STAGES.value
  ):
    _fail("--preflight_top and --preflight_stages go with --compile_for=SLICE")
  if _PREFLIGHT_TOP.value < 0:
    _fail(f"--preflight_top must be >= 0, got {_PREFLIGHT_TOP.value}")
  if _COMPILE_FOR.value:
    from masc_jax.preflight import command as preflight

    default = preflight.default_workdir(
        config_lib.config_name(spec), _COMPILE_FOR.value
    )
    return Job(
        config_spec=spec,
        config=config,
        workdir=_WORKDIR.value or default,
        overrides=tuple(overrides),
        compile_for=_COMPILE_FOR.value.strip(),
    )
  workdir = _WORKDIR.value or os.path.join("runs", config_lib.config_name(spec))
  try:
    processes = multihost.process_spec(
        auto=_MULTIHOST.value,
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        heartbeat_timeout_s=_HEARTBEAT.value,
    )
  except multihost.ProcessSpecError as e:
    _fail(str(e))
  return Job(
      config_spec=spec, config=config, workdir=workdir, processes=processes
  )


def preflight_main(job: Job) -> None:
  """``--compile_for``: the pre-flight instead of a run (no devices, no data, no processes)."""
  from masc_jax.preflight import command as preflight

  try:
    paths.check_supported(job.workdir)
    check = preflight.Preflight(
        job.config,
        config_lib.config_name(job.config_spec),
        job.compile_for,
        stages=_PREFLIGHT_STAGES.value,
        top=_PREFLIGHT_TOP.value,
        overrides=job.overrides,
    )
  except (preflight.PreflightInputError, paths.UnsupportedPathError) as e:
    _fail(str(e))
  try:
    report = check.run(job.workdir)
  except OSError as e:
    _fail(f"cannot write {e.filename or job.workdir}: {e.strerror or e}")
  from masc_jax.preflight import report as report_lib

  print(report_lib.markdown(report), flush=True)
  print(f"[preflight] report: {job.workdir}/preflight.md, preflight.json")
  sys.exit(1 if report["failures"] else 0)


def main(job: Job) -> None:
  logging.set_verbosity(logging.WARNING)
  if job.compile_for:
    preflight_main(job)
  multihost.initialize(job.processes)
  compile_cache.enable(_COMPILATION_CACHE.value)
  # Imported here so that a bad flag fails fast, before TFDS and the training code load.
  from masc_jax.training import checkpointing, faults, step_log, train, workdir
  from masc_jax.data import arrays
  from masc_jax.parallel import sharding

  try:
    # The tests' fault injection (MASC_FAULT), attached to the run's hooks; None when unset.
    hooks = faults.from_environment()
  except ValueError as e:
    _fail(str(e))
  try:
    train.train_and_evaluate(
        job.config,
        job.workdir,
        allow_config_change=_ALLOW_CONFIG_CHANGE.value,
        hooks=hooks,
    )
  except (
      config_lib.ConfigError,
      arrays.DatasetNotPreparedError,
      workdir.WorkdirError,
      checkpointing.NoGoodCheckpointError,
      step_log.NonFiniteLossError,
      sharding.MeshError,
  ) as e:
    _fail(str(e))
  except checkpointing.CheckpointWriteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # The failed save's futures would report themselves once more while the
    # interpreter shuts down (asyncio: "exception was never retrieved"); every
    # file is closed by now.
    os._exit(2)
  except OSError as e:
    # The workdir's filesystem refused a write (read-only, full, gone).
    _fail(f"cannot write {e.filename or job.workdir}: {e.strerror or e}")
  except KeyboardInterrupt:
    # Ctrl-C outside the training loop (which saves and exits 130 itself).
    _fail(
        "interrupted (Ctrl-C); the same command resumes from the last checkpoint",
        status=130,
    )
  except Exception as e:  # noqa: BLE001 - a lost peer is one line; anything else a traceback
    lost = multihost.describe_lost_peer(e)
    if lost is None:
      raise
    print(f"error: {lost}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Skip the exit-time shutdown barrier of jax.distributed: the lost peer never
    # reaches it, and waiting would only end in an abort.
    os._exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
