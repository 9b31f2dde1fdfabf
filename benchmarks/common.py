"""Shared pieces of the benchmarks: timing, machine description, peaks, subprocess workers.

Timing rules (the machine may be shared, so times are noisy):
  * every timed call ends with ``jax.block_until_ready`` on everything it returns;
  * ``warmup`` calls are run and dropped first (the first calls of a compiled
    program touch fresh memory and fill caches);
  * a config's step time is the **median** of ``steps`` timed calls; with
    ``--repeats R`` the whole sweep is run R times, interleaved, and the
    fastest of the R medians is kept (interference only ever slows a run down);
  * the 1/5/15-minute load averages (``os.getloadavg``) are recorded before and
    after each measurement: on a 2-core machine a 1-minute load above ~2.5
    means another process shared the cores while we timed.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Dense peak FLOP/s of one device, by a substring of ``jax.devices()[0].device_kind``
# (lower-case), for float32 and bfloat16 (vendor data sheets; dense, no sparsity).
# f32 on NVIDIA: the CUDA-core FP32 rate (JAX's default f32 matmul precision on
# GPU may use TF32 tensor cores, so a fraction above 1 is possible there).
PEAK_FLOPS = {
    "h200": {"float32": 67e12, "bfloat16": 989e12},
    "h100": {"float32": 67e12, "bfloat16": 989e12},
    "a100": {"float32": 19.5e12, "bfloat16": 312e12},
    "l4": {"float32": 30.3e12, "bfloat16": 121e12},
    "v100": {
        "float32": 15.7e12,
        "bfloat16": 125e12,
    },  # bf16 column: its fp16 tensor rate
    "tpu v4": {
        "float32": 275e12,
        "bfloat16": 275e12,
    },  # MXU is bf16; f32 matmuls run as bf16 passes
    "tpu v5 lite": {"float32": 197e12, "bfloat16": 197e12},
    "tpu v5e": {"float32": 197e12, "bfloat16": 197e12},
    "tpu v5p": {"float32": 459e12, "bfloat16": 459e12},
    "tpu v5": {"float32": 459e12, "bfloat16": 459e12},
    "tpu v6": {"float32": 918e12, "bfloat16": 918e12},
}


def peak_flops(
    device_kind: str, platform_name: str, dtype: str
) -> float | None:
  """Known peak FLOP/s of the device, or None (CPU, or a device not in the table)."""
  if platform_name == "cpu":
    return None
  kind = device_kind.lower()
  for key, peaks in PEAK_FLOPS.items():
    if key in kind:
      return peaks.get(dtype)
  return None


def loadavg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
  """``Model name`` from lscpu (or /proc/cpuinfo), e.g. 'AMD EPYC'."""
  try:
    out = subprocess.run(
        ["lscpu"], capture_output=True, text=True, timeout=10
    ).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
  """What the results were measured on (host side; the worker adds the device)."""
  return {
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def peak_rss_mib() -> float:
  """This process's resident-memory high-water mark (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_calls(
    call: Callable[[int], Any],
    steps: int,
    warmup: int,
    sync: Callable[[Any], Any],
) -> tuple[list[float], list[float]]:
  """Run ``call(i)`` warmup+steps times.

  Returns the wall times and this process's CPU times (user+sys over all its
  threads, ``time.process_time``) of the last ``steps`` calls. On a loaded
  machine the wall time grows with the other processes' share of the cores,
  the CPU time much less: compare wall times only at similar loads.
  """
  times, cpu_times = [], []
  for i in range(warmup + steps):
    c0, t0 = time.process_time(), time.perf_counter()
    sync(call(i))
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if i >= warmup:
      times.append(dt)
      cpu_times.append(dc)
  return times, cpu_times


def summarize_times(
    times: Sequence[float], cpu_times: Sequence[float] = ()
) -> dict[str, Any]:
  arr = np.asarray(times)
  out = {
      "median_s": float(np.median(arr)),
      "min_s": float(arr.min()),
      "max_s": float(arr.max()),
      "times_s": [round(float(t), 5) for t in arr],
  }
  if len(cpu_times):
    out["median_cpu_s"] = float(np.median(cpu_times))
    out["cpu_times_s"] = [round(float(t), 5) for t in cpu_times]
  return out


def run_worker(
    module: str,
    spec: dict[str, Any],
    env_extra: dict[str, str] | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
  """Run ``python -m module --worker JSON`` in a fresh process; its last stdout line is JSON.

  A fresh process per config makes the peak-memory figure that config's own
  and lets each config have its own XLA_FLAGS (read once, at backend start).
  """
  env = dict(os.environ)
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
  try:
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f}s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail)}
  return json.loads(lines[-1])


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]]
) -> str:
  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      if v != v:
        return "-"
      if abs(v) >= 100:
        return f"{v:.0f}"
      if abs(v) >= 10:
        return f"{v:.1f}"
      return f"{v:.2f}"
    return str(v)

  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
