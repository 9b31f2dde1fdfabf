"""``conv_impl="tuned"``: each pass of each 3x3 convolution by the method measured fastest here.

Which way of computing a 3x3 convolution is fastest depends on the layer's
shape, on the pass (forward, input gradient dx, filter gradient dw) and on the
machine: on one AVX2 machine the 32x32 64->64 layer's filter gradient took
789 ms as a lax conv and 206 ms as im2col patches^T @ g, while the forward
and dx of the 16x16 layers were faster as lax convs. ``kernels.CONV_PASSES``
holds the exact candidates per pass; this module picks one per pass and layer:

* **Key**: the pass and the layer's shape without the batch: ``H x W``,
  ``Cin -> Cout``, dtype, plus the batch size rounded up to a power of two
  (the bucket; the measurement uses the bucket's size), e.g.
  ``dw b64 32x32 64->64 float32``.
* **Measurement**, on first use of a key, when the pass is traced (inside
  ``jax.jit``/``jax.vmap`` of the training step is fine: only the shapes and
  dtype are read, never the traced values). It runs in a separate Python
  thread, so that it is outside every trace (JAX's trace state is per
  thread): random arrays of the key's shape, each candidate jitted,
  compiled, called once untimed and once timed, then ``REPEATS`` to
  ``MAX_REPEATS`` more times unless that timed call was ``PRUNE_FACTOR``
  times slower than the best so far. The smallest median
  (``block_until_ready``) wins, except that what ``conv_impl="auto"`` would
  use is kept when it is within ``KEEP_AUTO_MARGIN`` (10%) of the fastest.
  A forward-only program (evaluation) measures only the forward pass. The candidates are timed alone,
  with a parameter as input; in a training step XLA may fuse a conv's
  neighbours differently (``conv.xla_conv3x3``), which this does not see.
  Under ``jax.vmap`` (``agent_map="vmap"``) the key is one agent's shape,
  while the program runs the chosen method batched over the agents (a grouped
  convolution, or a batched matmul), which is not what was timed.
  Measuring costs 8 small compiles and a few dozen calls per layer shape.
* **Cache**: ``conv_plans.json`` in the folder of JAX's persistent
  compilation cache (``masc_jax/parallel/compile_cache.py``: ``--compilation_cache_dir``,
  ``$MASC_COMPILATION_CACHE_DIR``, ``$JAX_COMPILATION_CACHE_DIR``, else
  ``~/.cache/masc_jax/xla-<cpu>``). Its entries sit under a machine key that
  starts with the CPU tag of ``compile_cache`` (architecture and a hash of the
  CPU's feature flags), then the JAX platform and device kind, the jaxlib
  version and any ``--xla_cpu_max_isa`` in ``XLA_FLAGS``: a file shared by
  AVX2 and AVX-512 machines (or by GPU hosts) gives each its own plans. With
  the compilation cache off (``--compilation_cache_dir=none``, or a program
  that never turns it on, such as the benchmarks), each process measures once
  and keeps its plans in memory.
* **Concurrent runs**: a write takes an exclusive ``flock`` on
  ``conv_plans.json.lock``, re-reads the file, adds its entries (an entry
  already there wins, and this process adopts it) and replaces the file by a
  renamed temporary file, so readers never see half a file and two writers
  never drop each other's entries. A file that is not valid JSON is ignored
  with a warning (and replaced on the next write).
* **Several processes, one run**: process 0 decides (reads the file or
  measures, and writes), and every process takes process 0's choice through
  ``multihost.broadcast_from_primary``: the first lookup of each key is a
  collective. This relies on every process tracing the same programs in the
  same order, which the SPMD training loop does (nothing traces the network on
  process 0 alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from masc_jax.parallel import compile_cache, multihost
from masc_jax.nn import kernels
from masc_jax import paths

FILE_NAME = "conv_plans.json"
VERSION = 1
REPEATS = 3  # timed calls per candidate after the first, at least ...
MAX_REPEATS = (
    15  # ... and more, up to this many, while they add up to under MIN_TIMED_S
)
MIN_TIMED_S = 0.05
PRUNE_FACTOR = 3.0  # a candidate whose first call is this much slower than the best is dropped
# What "auto" computes (conv.conv3x3) is kept unless another candidate is more
# than this fraction faster: measurement noise does not flip a choice, and a
# measured pass in isolation does not see the fusions of a whole training step.
KEEP_AUTO_MARGIN = 0.10


@dataclasses.dataclass(frozen=True)
class LayerKey:
  """What a pass's choice depends on: the batch bucket, the map, the channels, the dtype."""

  batch: int
  h: int
  w: int
  cin: int
  cout: int
  dtype: str

  def name(self, pass_name: str) -> str:
    return f"{pass_name} b{self.batch} {self.h}x{self.w} {self.cin}->{self.cout} {self.dtype}"

  def auto_choice(self, pass_name: str) -> str:
    """The method ``conv_impl="auto"`` uses for this pass (im2col autodiff, or xla_conv3x3)."""
    if self.h * self.w <= kernels.IM2COL_MAX_PIXELS:
      return {"fwd": "im2col", "dx": "im2col_vjp", "dw": "im2col"}[pass_name]
    return kernels.XLA_PLAN[list(kernels.CONV_PASSES).index(pass_name)]


def batch_bucket(n: int) -> int:
  """``n`` rounded up to a power of two (1, 2, 4, ...)."""
  return 1 << max(int(n) - 1, 0).bit_length()


def layer_key(x_shape: Sequence[int], cout: int, dtype: Any) -> LayerKey:
  """The key of a convolution of an input ``[..., H, W, Cin]`` into ``cout`` channels."""
  *lead, h, w, cin = (int(d) for d in x_shape)
  return LayerKey(
      batch_bucket(int(np.prod(lead, dtype=np.int64))),
      h,
      w,
      cin,
      int(cout),
      np.dtype(dtype).name,
  )


def machine_key() -> str:
  """``<cpu tag> <platform>:<device kind> jaxlib-<version>[ max_isa=...]``: whose timings these are."""
  import jax
  import jaxlib

  device = jax.devices()[0]
  key = (
      f"{compile_cache.cpu_tag()} {device.platform}:{device.device_kind} "
      f"jaxlib-{jaxlib.__version__}"
  )
  isa = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
  return key + (f" max_isa={isa.group(1)}" if isa else "")


def _outside_traces(fn: Callable[..., Any], *args: Any) -> Any:
  """``fn(*args)`` in a fresh thread: JAX's trace state is per thread, so nothing is staged."""
  result: dict[str, Any] = {}

  def target():
    try:
      result["value"] = fn(*args)
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
      result["error"] = e

  thread = threading.Thread(target=target, name="masc-conv-tuning")
  thread.start()
  thread.join()
  if "error" in result:
    raise result["error"]
  return result["value"]


def _pass_arguments(key: LayerKey, pass_name: str) -> tuple[Any, ...]:
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  x = rng.standard_normal((key.batch, key.h, key.w, key.cin), np.float32)
  kernel = rng.standard_normal((3, 3, key.cin, key.cout), np.float32) / np.sqrt(
      9 * key.cin
  )
  arrays = (x, kernel)
  if pass_name != "fwd":
    arrays += (
        rng.standard_normal((key.batch, key.h, key.w, key.cout), np.float32),
    )
  return tuple(jnp.asarray(a, key.dtype) for a in arrays)


def measure(
    pass_name: str, key: LayerKey, candidates: Sequence[str]
) -> dict[str, float]:
  """Milliseconds per call of each candidate for ``pass_name`` at ``key`` (run it outside traces).

  Each candidate is compiled and called once untimed (one that fails, e.g.
  out of memory, is left out with a warning), then once timed. Unless that
  call took ``PRUNE_FACTOR`` times the best first timed call so far (then it
  is the candidate's time), it is called ``REPEATS`` more times (up to
  ``MAX_REPEATS`` while they add up to less than ``MIN_TIMED_S``), and its
  time is the median of those.
  """
  import jax

  args = _pass_arguments(key, pass_name)
  times: dict[str, float] = {}
  best_first = float("inf")
  for impl in candidates:
    fn = functools.partial(kernels.conv3x3_pass, pass_name, impl)
    try:
      compiled = jax.jit(fn).lower(*args).compile()
      jax.block_until_ready(compiled(*args))
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: not a candidate here
      warnings.warn(
          f"conv tuning: {pass_name} {impl} failed at {key} ({type(e).__name__}: "
          f"{str(e)[:200]}); not a candidate",
          stacklevel=2,
      )
      continue

    def call():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      return time.perf_counter() - t0

    first = call()
    if first > PRUNE_FACTOR * best_first:
      times[impl] = 1e3 * first
      continue
    best_first = min(best_first, first)
    calls = [call() for _ in range(REPEATS)]
    while len(calls) < MAX_REPEATS and sum(calls) < MIN_TIMED_S:
      calls.append(call())
    times[impl] = 1e3 * statistics.median(calls)
  return times


@contextlib.contextmanager
def _locked(path: str):
  """An exclusive lock on ``path`` (a file beside the plans) for a read-merge-write."""
  try:
    import fcntl
  except ImportError:  # not POSIX: the rename still keeps the file whole
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def read_plans(path: str) -> dict[str, Any]:
  """The plans file's contents (``{"version", "machines": {machine: {entry: record}}}``).

  A missing file is empty; an unreadable or malformed one is empty too, with a warning.
  """
  try:
    with open(path) as f:
      data = json.load(f)
  except (FileNotFoundError, NotADirectoryError):
    return {"version": VERSION, "machines": {}}
  except (OSError, ValueError) as e:
    warnings.warn(f"ignoring the conv plans file {path}: {e}", stacklevel=2)
    return {"version": VERSION, "machines": {}}
  if not (
      isinstance(data, dict)
      and isinstance(data.get("machines"), dict)
      and all(isinstance(v, dict) for v in data["machines"].values())
  ):
    warnings.warn(
        f"ignoring the conv plans file {path}: not a conv plans file",
        stacklevel=2,
    )
    return {"version": VERSION, "machines": {}}
  return data


def pick(times: Mapping[str, float], auto: str) -> str:
  """The fastest candidate, or ``auto`` if within ``KEEP_AUTO_MARGIN`` of it (or none was timed)."""
  if not times:
    return auto
  best = min(times, key=times.get)
  return (
      auto
      if times.get(auto, float("inf")) <= (1 + KEEP_AUTO_MARGIN) * times[best]
      else best
  )


def _valid(record: Any, candidates: Sequence[str]) -> bool:
  return isinstance(record, dict) and record.get("impl") in candidates


class Tuner:
  """Chooses, remembers and stores the implementation of each pass per layer key.

  Args:
    path: the JSON plans file (None: keep the plans in memory only).
    measure: ``(pass, LayerKey, candidates) -> {candidate: ms}``; ``measure``
      above by default (tests pass fake timings).
    machine: the key of this machine's plans in the file (``machine_key()``).
  """

  def __init__(
      self,
      path: str | None,
      measure: Callable[
          [str, LayerKey, Sequence[str]], Mapping[str, float]
      ] = measure,
      machine: str | None = None,
  ):
    self.path = path
    self._measure = measure
    self._machine = machine
    self._plans: dict[str, dict[str, Any]] = {}
    self._lock = threading.RLock()

  @property
  def machine(self) -> str:
    if self._machine is None:
      self._machine = machine_key()
    return self._machine

  def plans(self) -> dict[str, dict[str, Any]]:
    """The entries decided so far in this process: ``{entry name: {"impl", "ms", ...}}``."""
    with self._lock:
      return {k: dict(v) for k, v in self._plans.items()}

  def record(self, pass_name: str, key: LayerKey) -> dict[str, Any]:
    """The decision for one pass at one key: ``{"impl": name, "ms": {candidate: ms}}``."""
    candidates = tuple(kernels.CONV_PASSES[pass_name])
    name = key.name(pass_name)
    with self._lock:
      if name not in self._plans:
        self._plans[name] = self._decide(pass_name, key, name, candidates)
      return self._plans[name]

  def choose(self, pass_name: str, key: LayerKey) -> str:
    return self.record(pass_name, key)["impl"]

  def _decide(self, pass_name, key, name, candidates):
    import jax

    several = jax.process_count() > 1
    record = None
    if not several or jax.process_index() == 0:
      record = self._stored(name, candidates)
      if record is None:
        times = {
            c: float(t)
            for c, t in _outside_traces(
                self._measure, pass_name, key, candidates
            ).items()
        }
        record = self._store(
            name,
            {"impl": pick(times, key.auto_choice(pass_name)), "ms": times},
            candidates,
        )
    if several:
      mine = candidates.index(record["impl"]) if record is not None else -1
      chosen = candidates[
          _outside_traces(multihost.broadcast_from_primary, mine)
      ]
      if record is None or record["impl"] != chosen:
        record = {"impl": chosen, "from": "process 0"}
    return record

  def _machine_entries(self, data: dict[str, Any]) -> dict[str, Any]:
    return data["machines"].get(self.machine, {})

  def _stored(self, name, candidates):
    if self.path is None:
      return None
    record = self._machine_entries(read_plans(self.path)).get(name)
    return dict(record) if _valid(record, candidates) else None

  def _store(self, name, record, candidates):
    """Adds ``record`` to the file (merging); returns the record now in the file for ``name``."""
    if self.path is None:
      return record
    try:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      with _locked(self.path + ".lock"):
        data = read_plans(self.path)
        entries = data["machines"].setdefault(self.machine, {})
        if _valid(entries.get(name), candidates):
          return dict(
              entries[name]
          )  # another run measured it first: use its choice
        entries[name] = record
        data["version"] = VERSION
        paths.write_atomic(
            self.path, json.dumps(data, indent=1, sort_keys=True)
        )
    except OSError as e:
      warnings.warn(
          f"cannot write the conv plans file {self.path} ({e}); "
          "keeping the plan in memory",
          stacklevel=2,
      )
    return record


def plans_path() -> str | None:
  """``conv_plans.json`` beside JAX's persistent compilation cache; None when that is off."""
  import jax

  folder = jax.config.jax_compilation_cache_dir
  return os.path.join(os.path.expanduser(folder), FILE_NAME) if folder else None


_TUNERS: dict[str | None, Tuner] = {}
_TUNERS_LOCK = threading.Lock()


def default_tuner() -> Tuner:
  """The process's tuner for the current plans file (one per file, plus one in memory)."""
  path = plans_path()
  with _TUNERS_LOCK:
    if path not in _TUNERS:
      _TUNERS[path] = Tuner(path)
    return _TUNERS[path]


def choose(
    pass_name: str, x_shape: Sequence[int], cout: int, dtype: Any
) -> str:
  """The implementation of ``pass_name`` for an input ``x_shape`` into ``cout`` channels."""
  return default_tuner().choose(pass_name, layer_key(x_shape, cout, dtype))


def plan_for(
    x_shape: Sequence[int], cout: int, dtype: Any, tuner: Tuner | None = None
) -> dict[str, dict[str, Any]]:
  """Every pass's decision for one layer (measuring what is not known yet): ``{pass: record}``."""
  tuner = tuner or default_tuner()
  key = layer_key(x_shape, cout, dtype)
  return {p: tuner.record(p, key) for p in kernels.CONV_PASSES}
