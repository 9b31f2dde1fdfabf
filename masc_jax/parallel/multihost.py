"""Several processes, one run: starting ``jax.distributed``, and agreeing across processes.

JAX's multi-controller model runs the same program in every process; each
process drives its own devices and the mesh spans all of them. What a run
needs on top of that:

* ``ProcessSpec`` / ``initialize``: how the processes find each other. Either
  auto-detected (``--multihost``: Cloud TPU, SLURM, Open MPI), or explicit
  (``--coordinator_address``, ``--num_processes``, ``--process_id``, or the
  environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``), which is how a GPU cluster or N local processes start.
  Missing heartbeats of a peer for ``heartbeat_timeout_s`` end every process.
* ``broadcast_from_primary``: process 0 decides (the workdir lock), the others
  follow, so every process takes the same branch.
* ``sync``: a barrier across processes (no-op in one process).
* ``describe_lost_peer``: the one-line message for a run that lost a process.

With one process all of this is a no-op: the single-host run is unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class ProcessSpecError(ValueError):
  """Process flags that cannot start a run."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """How this process joins the run: nothing (one process), auto-detected, or explicit."""

  auto: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_s: int = 100
  initialization_timeout_s: int = 300

  @property
  def explicit(self) -> bool:
    return self.num_processes is not None

  @property
  def enabled(self) -> bool:
    return self.auto or self.explicit


def process_spec(
    auto: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int = 100,
    initialization_timeout_s: int = 300,
    environ: dict[str, str] | None = None,
) -> ProcessSpec:
  """Flags first, then the environment; every problem is one ``ProcessSpecError`` line.

  An explicit spec needs all three of coordinator, process count and process
  id (``--multihost`` may leave them to JAX's cluster detection instead).
  """
  environ = os.environ if environ is None else environ

  def from_env(value, name, kind):
    if value is not None or name not in environ:
      return value
    raw = environ[name]
    if kind is int:
      if not re.fullmatch(r"\d+", raw.strip()):
        raise ProcessSpecError(f"{name}={raw!r} must be a whole number")
      return int(raw)
    return raw

  coordinator_address = from_env(coordinator_address, ENV_COORDINATOR, str)
  num_processes = from_env(num_processes, ENV_NUM_PROCESSES, int)
  process_id = from_env(process_id, ENV_PROCESS_ID, int)
  given = {
      "coordinator_address": coordinator_address,
      "num_processes": num_processes,
      "process_id": process_id,
  }
  if any(v is not None for v in (num_processes, process_id)):
    missing = [f"--{name}" for name, value in given.items() if value is None]
    if missing:
      raise ProcessSpecError(
          f"{', '.join(missing)} missing: an explicit multi-process run needs "
          "--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I (0..N-1), "
          "or --multihost to detect them (TPU, SLURM, Open MPI)"
      )
  if coordinator_address is not None and not re.fullmatch(
      r"\[?[\w.:-]+\]?:\d+", coordinator_address
  ):
    raise ProcessSpecError(
        f"--coordinator_address={coordinator_address!r} must be HOST:PORT"
    )
  if num_processes is not None:
    if num_processes < 1:
      raise ProcessSpecError(
          f"--num_processes={num_processes} must be at least 1"
      )
    if not 0 <= process_id < num_processes:
      raise ProcessSpecError(
          f"--process_id={process_id} must be between 0 and num_processes - 1 = {num_processes - 1}"
      )
  for name, value in (
      ("heartbeat_timeout_s", heartbeat_timeout_s),
      ("initialization_timeout_s", initialization_timeout_s),
  ):
    if value < 1:
      raise ProcessSpecError(f"--{name}={value} must be at least 1 second")
  if coordinator_address is not None and num_processes is None and not auto:
    raise ProcessSpecError(
        f"--coordinator_address (or {ENV_COORDINATOR}) needs --num_processes and --process_id, "
        "or --multihost"
    )
  return ProcessSpec(
      auto=auto,
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      heartbeat_timeout_s=heartbeat_timeout_s,
      initialization_timeout_s=initialization_timeout_s,
  )


def initialize(spec: ProcessSpec) -> None:
  """``jax.distributed.initialize`` for ``spec`` (nothing for a one-process spec).

  Must run before anything touches a JAX backend.
  """
  if not spec.enabled:
    return
  import jax

  jax.distributed.initialize(
      coordinator_address=spec.coordinator_address,
      num_processes=spec.num_processes,
      process_id=spec.process_id,
      initialization_timeout=spec.initialization_timeout_s,
      heartbeat_timeout_seconds=spec.heartbeat_timeout_s,
  )


def is_primary() -> bool:
  import jax

  return jax.process_index() == 0


def broadcast_from_primary(value: int) -> int:
  """Process 0's ``value`` on every process (a collective: every process must call it)."""
  import jax

  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def sync(name: str) -> None:
  """Wait until every process reaches the barrier ``name``."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _lost_processes() -> list[int]:
  """The processes the coordination service no longer counts as live (best effort)."""
  import jax
  from jax._src import distributed

  me, count = jax.process_index(), jax.process_count()
  if count == 2:
    return [1 - me]  # the only other one
  try:
    live = distributed.global_state.client.get_live_nodes(list(range(count)))
  except Exception:  # noqa: BLE001 - the coordinator itself may be gone
    return [] if me == 0 else [0]
  return sorted(set(range(count)) - set(live))


_PEER_LOSS_WORDS = (
    "connection closed by peer",
    "connection reset",
    "heartbeat",
    "unavailable",
    "gloo",
    "barrier",
    "coordination service",
    "socket closed",
)


def describe_lost_peer(error: BaseException) -> str | None:
  """One line for an error that means another process of the run died; else None.

  A peer that dies (SIGKILL, OOM, a crashed host) closes its collective
  connections: the survivors' next collective fails at once with a
  connection error, which lands here. A peer that hangs without closing them
  is caught by the coordination service's heartbeat (``heartbeat_timeout_s``),
  which ends every process.
  """
  import jax

  if jax.process_count() == 1:
    return None
  text = str(error)
  if not any(word in text.lower() for word in _PEER_LOSS_WORDS):
    return None
  lost = _lost_processes()
  who = (
      " and ".join(f"process {t}" for t in lost) if lost else "another process"
  )
  first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  return (
      f"process {jax.process_index()} of {jax.process_count()} lost {who} of this run "
      f"({first[:240]}); restart every process with the same command to resume from "
      "the last checkpoint"
  )
