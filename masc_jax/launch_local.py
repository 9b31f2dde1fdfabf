"""N local processes as one multi-process run: the multi-host path on one machine.

    python -m masc_jax.launch_local --num_processes=2 --devices_per_process=2 -- \
        --config=tiny --workdir=runs/tiny_2x2

starts ``python -m masc_jax.main ARGS --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I`` for I = 0..N-1, each with its own
``JAX_NUM_CPU_DEVICES`` CPU devices and gloo collectives between processes:
exactly what N hosts of a slice run, with the loopback as the network. Process
0's output passes through; the others' lines are prefixed ``[process I]``.
``--dry-run`` prints the commands and starts nothing.

SIGTERM or Ctrl-C here is forwarded to every process (a preemption: each saves
and exits 143). The exit status is the first non-zero status of a process, or
0. If a process fails, the others stop on their own once its heartbeats are
missed (``--heartbeat_timeout_s``, passed on); after ``--grace_s`` more
seconds any left are killed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(
    main_args: list[str],
    num_processes: int,
    devices_per_process: int,
    port: int,
    heartbeat_timeout_s: int,
) -> list[tuple[dict[str, str], list[str]]]:
  """``(extra environment, argv)`` of every process."""
  out = []
  for i in range(num_processes):
    env = {
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices_per_process),
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    }
    argv = [
        sys.executable,
        "-m",
        "masc_jax.main",
        *main_args,
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={i}",
        f"--heartbeat_timeout_s={heartbeat_timeout_s}",
    ]
    out.append((env, argv))
  return out


def _pump(stream, prefix: str, sink) -> None:
  for line in stream:
    sink.write(prefix + line)
    sink.flush()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="python -m masc_jax.launch_local",
      description=__doc__.split("\n\n")[0],
      usage="%(prog)s [--num_processes N] [--devices_per_process D] [--dry-run] -- MAIN_ARGS...",
  )
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument(
      "--port", type=int, default=0, help="coordinator port (0: a free one)"
  )
  parser.add_argument(
      "--heartbeat_timeout_s",
      type=int,
      default=30,
      help="a process silent this long is lost; the others stop",
  )
  parser.add_argument(
      "--grace_s",
      type=float,
      default=60.0,
      help="after a process fails, kill the rest after this many seconds",
  )
  parser.add_argument(
      "--dry-run", action="store_true", help="print the commands, start nothing"
  )
  if "--" in argv:
    split = argv.index("--")
    ours, main_args = argv[:split], argv[split + 1 :]
  else:
    ours, main_args = argv, []
  args = parser.parse_args(ours)
  problems = []
  if args.num_processes < 1:
    problems.append(f"--num_processes={args.num_processes} must be at least 1")
  if args.devices_per_process < 1:
    problems.append(
        f"--devices_per_process={args.devices_per_process} must be at least 1"
    )
  if not 0 <= args.port < 65536:
    problems.append(f"--port={args.port} must be 0..65535")
  if not any(a.startswith("--config") for a in main_args):
    problems.append(
        "give masc_jax.main's arguments after --, e.g. -- --config=tiny "
        "--workdir=runs/tiny_mp"
    )
  if problems:
    parser.exit(2, "error: " + "; ".join(problems) + "\n")
  return args, main_args


def main(argv: list[str] | None = None) -> int:
  args, main_args = parse_args(sys.argv[1:] if argv is None else argv)
  port = args.port or free_port()
  plan = commands(
      main_args,
      args.num_processes,
      args.devices_per_process,
      port,
      args.heartbeat_timeout_s,
  )
  if args.dry_run:
    for env, cmd in plan:
      print(
          " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(cmd)
      )
    return 0

  procs, pumps = [], []
  for i, (env, cmd) in enumerate(plan):
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        text=True,
        stdout=None if i == 0 else subprocess.PIPE,
        stderr=None if i == 0 else subprocess.STDOUT,
    )
    procs.append(proc)
    if i:
      pump = threading.Thread(
          target=_pump,
          args=(proc.stdout, f"[process {i}] ", sys.stdout),
          daemon=True,
      )
      pump.start()
      pumps.append(pump)

  def forward(signum, frame):
    del frame
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

  previous = {
      s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)
  }
  try:
    status, failed_at = 0, None
    while any(p.poll() is None for p in procs):
      for p in procs:
        code = p.poll()
        if code not in (None, 0) and status == 0:
          status, failed_at = code, time.monotonic()
      if failed_at is not None and time.monotonic() - failed_at > args.grace_s:
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(0.2)
    for p in procs:
      if status == 0 and p.returncode != 0:
        status = p.returncode
    for pump in pumps:
      pump.join(timeout=5)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  # A process killed by a signal has a negative code: report it the shell's way (128 + N).
  return status if status >= 0 else 128 - status


if __name__ == "__main__":
  sys.exit(main())
