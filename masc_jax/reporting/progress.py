"""What a run prints and logs while it trains.

* one-line console strings: :func:`progress_line` (during a stage),
  :func:`evaluation_line` (an evaluation during a stage) and
  :func:`stage_summary_line` (at a stage end), with durations written by
  :func:`format_duration`;
* ``metrics.jsonl``: one JSON object per logged step (:class:`MetricsLogger`),
  values converted by :func:`to_jsonable`.

This module owns the two small vocabularies the end-of-run report shares with
the training log: how a duration reads (:func:`format_duration`) and how a
numpy / jax value becomes JSON (:func:`to_jsonable`); ``masc_jax.reporting.report``
imports both from here. numpy only: no jax import (jax scalars/arrays are
handled through the ``__array__`` / ``item`` protocols).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from typing import Any, Mapping

import numpy as np

from masc_jax import paths

__all__ = [
    "MetricsLogger",
    "evaluation_line",
    "format_duration",
    "progress_line",
    "stage_summary_line",
    "to_jsonable",
]


# ----------------------------------------------------------------------------
# JSON values
# ----------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
  """Recursively converts numpy / jax values to plain JSON types.

  Dict keys become strings, tuples/sets become lists, numpy (and jax, via
  ``__array__``) arrays become nested lists, non-finite floats become None.
  """
  if obj is None or isinstance(obj, (str, bool)):
    return obj
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, numbers.Integral):
    return int(obj)
  if isinstance(obj, numbers.Real):
    f = float(obj)
    return f if math.isfinite(f) else None
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, (set, frozenset)):
    return [to_jsonable(v) for v in sorted(obj, key=repr)]
  if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
    arr = np.asarray(obj)
    if arr.ndim == 0:
      return to_jsonable(arr.item())
    return [to_jsonable(v) for v in arr.tolist()]
  if hasattr(obj, "item"):  # other scalar-likes
    return to_jsonable(obj.item())
  raise TypeError(f"reporting: cannot convert {type(obj).__name__} to JSON")


# ----------------------------------------------------------------------------
# Console lines
# ----------------------------------------------------------------------------


def _compact(v: Any) -> str:
  """Compact number for one-line summaries: ints as ints, floats with 4 significant digits."""
  if isinstance(v, (bool, np.bool_)):
    return "yes" if v else "no"
  if isinstance(v, numbers.Integral):
    return str(int(v))
  try:
    f = float(v)
  except (TypeError, ValueError):
    return str(v)
  if not math.isfinite(f):
    return str(f)
  return f"{f:.4g}"


def _term(v: Any) -> str:
  """A loss term for progress lines: 4 decimals, scientific when tiny or huge."""
  try:
    f = float(v)
  except (TypeError, ValueError):
    return str(v)
  if not math.isfinite(f):
    return str(f)
  a = abs(f)
  if a >= 1e5 or (0.0 < a < 1e-4):
    return f"{f:.3e}"
  return f"{f:.4f}"


def format_duration(seconds: float) -> str:
  """Human duration: '45.2s' under a minute, '3m25s' under an hour, '1h02m', '2d03h'."""
  try:
    s = float(seconds)
  except (TypeError, ValueError):
    return "--"
  if not math.isfinite(s) or s < 0:
    return "--"
  if s < 59.95:
    return f"{s:.1f}s"
  total = int(round(s))
  if total < 3600:
    m, sec = divmod(total, 60)
    return f"{m}m{sec:02d}s"
  minutes = int(round(s / 60.0))
  if minutes < 24 * 60:
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m"
  hours = int(round(s / 3600.0))
  d, h = divmod(hours, 24)
  return f"{d}d{h:02d}h"


def progress_line(
    stage: str,
    step: int,
    total_steps: int,
    images_per_s: float,
    eta_s: float,
    terms: Mapping[str, float],
) -> str:
  """One console line during a stage, e.g.

  ``[collective] step  1200/ 4000 ( 30.0%) |  812.3 img/s | ETA 3m25s | ce 0.4512 kd 0.1020``
  """
  step, total_steps = int(step), int(total_steps)
  width = max(5, len(str(total_steps)))
  pct = 100.0 * step / total_steps if total_steps > 0 else 0.0
  try:
    ips = float(images_per_s)
  except (TypeError, ValueError):
    ips = float("nan")
  line = (
      f"[{stage}] step {step:>{width}d}/{total_steps:>{width}d} ({pct:5.1f}%) | "
      f"{ips:6.1f} img/s | ETA {format_duration(eta_s)}"
  )
  if terms:
    line += " | " + " ".join(f"{k} {_term(v)}" for k, v in terms.items())
  return line


def stage_summary_line(
    stage: str,
    steps: int,
    seconds: float,
    compile_seconds: float,
    metrics: Mapping[str, float],
) -> str:
  """One line at a stage end, e.g.

  ``[experts] done: 900 steps in 41.2s (compile 6.1s) | expert acc 0.991 loss 0.0312``
  """
  line = (
      f"[{stage}] done: {int(steps)} steps in {format_duration(seconds)} "
      f"(compile {format_duration(compile_seconds)})"
  )
  if metrics:
    line += " | " + " ".join(
        f"{str(k).replace('_', ' ')} {_compact(v)}" for k, v in metrics.items()
    )
  return line


def evaluation_line(
    stage: str, epoch: int, epochs: int, metrics: Mapping[str, float]
) -> str:
  """One line for an evaluation during a stage, e.g.

  ``[experts] epoch 10/30 | expert 0.9712 general 0 society 0.3046``
  """
  line = f"[{stage}] epoch {int(epoch)}/{int(epochs)}"
  if metrics:
    line += " | " + " ".join(
        f"{str(k).replace('_', ' ')} {_compact(v)}" for k, v in metrics.items()
    )
  return line


# ----------------------------------------------------------------------------
# Per-step log
# ----------------------------------------------------------------------------


class MetricsLogger:
  """Appends one JSON object per line to ``path`` (workdir/metrics.jsonl).

  ``enabled=False`` (multi-host processes other than 0): nothing is opened or written.
  numpy / jax scalars are converted (integers stay integers, others via float());
  non-finite values are written as null so every line is strict JSON. Local files:
  each line is appended and flushed as written. Object stores (``gs://``) cannot
  append: the file is read once, lines are added in memory, and the whole object
  is uploaded again at most every ``upload_every_s`` seconds and on ``close``.
  Usable as a context manager.
  """

  def __init__(
      self, path: str, enabled: bool = True, upload_every_s: float = 30.0
  ):
    self.path = path
    self.enabled = bool(enabled)
    self._f = None
    self._closed = False
    self._remote_lines: list[str] | None = None
    self._upload_every_s, self._uploaded_at, self._dirty = (
        upload_every_s,
        0.0,
        False,
    )
    if not self.enabled:
      return
    if paths.is_local(path):
      directory = os.path.dirname(os.path.abspath(path))
      os.makedirs(directory, exist_ok=True)
      self._f = open(path, "a", encoding="utf-8")
    else:
      old = paths.read_text(path) if paths.exists(path) else ""
      self._remote_lines = old.splitlines(keepends=True)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    if self._closed:
      raise ValueError(f"MetricsLogger({self.path!r}) is closed")
    line = json.dumps(
        {str(k): to_jsonable(v) for k, v in record.items()}, allow_nan=False
    )
    if self._f is not None:
      self._f.write(line + "\n")
      self._f.flush()
      return
    self._remote_lines.append(line + "\n")
    self._dirty = True
    if time.monotonic() - self._uploaded_at >= self._upload_every_s:
      self._upload()

  def _upload(self) -> None:
    paths.write_atomic(self.path, "".join(self._remote_lines))
    self._uploaded_at, self._dirty = time.monotonic(), False

  def close(self) -> None:
    if self._dirty:
      self._upload()
    if self._f is not None:
      self._f.close()
      self._f = None
    self._closed = True

  def __enter__(self) -> "MetricsLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
