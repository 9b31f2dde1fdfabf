"""``--compile_for=SLICE``: compile every program of a run for a TPU slice and report.

``preflight(config, ...)`` checks everything it is given first (slice name,
libtpu, the config against the slice: a config that cannot be laid out is a
``PreflightInputError``, one line, nothing written), then compiles each
stage's train step and evaluation program in turn and writes
``preflight.json`` / ``preflight.md`` after each. A program that fails to
compile (too big for HBM, or a compiler error) is reported and the rest go
on; the return value is then 1.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from masc_jax import config_lib
from masc_jax.data import arrays
from masc_jax.data import batches as batches_lib
from masc_jax.parallel import sharding
from masc_jax.preflight import chips, costs, report as report_lib, topology


@contextlib.contextmanager
def not_cached_on_disk():
  """Programs compiled inside the block are not written to JAX's persistent cache.

  A program compiled for a TPU topology, with no TPU here, could be written
  but not read back (that needs the TPU's client): JAX would warn and compile
  it again on the next pre-flight. JAX decides once per process whether to use
  the cache at all, so the block raises the minimum compile time of an entry
  worth writing instead.
  """
  import jax

  name = "jax_persistent_cache_min_compile_time_secs"
  before = getattr(jax.config, name)
  jax.config.update(name, float("inf"))
  try:
    yield
  finally:
    jax.config.update(name, before)


class PreflightInputError(ValueError):
  """A pre-flight that cannot start: bad slice, no libtpu, a config the slice cannot hold."""


def default_workdir(config_name: str, slice_name: str) -> str:
  """``runs/<config>_preflight_<slice>``."""
  safe = slice_name.strip().lower().replace(":", "_").replace("/", "_")
  return f"runs/{config_name}_preflight_{safe}"


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


class Preflight:
  """One pre-flight: the slice, the run's society and state on it, the report so far."""

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      config_name: str,
      slice_name: str,
      *,
      stages: Sequence[str] = (),
      top: int = 0,
      overrides: Sequence[str] = (),
      keep_compiled: bool = False,
  ):
    """Checks every input; raises ``PreflightInputError`` (one line) before writing anything.

    ``keep_compiled``: keep each compiled program in ``compiled[(stage, kind)]``.
    """
    try:
      self.slice = topology.parse_slice(slice_name)
      libtpu = topology.libtpu_version()
    except (topology.TopologyError, topology.LibtpuMissingError) as e:
      raise PreflightInputError(str(e)) from None
    # Imported after the checks above: the training code is heavier.
    from masc_jax.preflight import programs

    self._programs = programs
    try:
      self.config = programs.resolve_for_backend(config, "tpu")
      self.devices = topology.slice_devices(self.slice)
    except (config_lib.ConfigError, topology.TopologyError) as e:
      raise PreflightInputError(str(e)) from None
    try:
      self.society = programs.abstract_society(self.config, self.devices)
    except (
        config_lib.ConfigError,
        sharding.MeshError,
        arrays.DatasetNotPreparedError,
    ) as e:
      raise PreflightInputError(
          f"cannot lay out {config_name} on {self.slice.name}: {_one_line(e)}"
      ) from None
    from masc_jax.training import protocol

    self._protocol = protocol
    specs = protocol.stages_for(self.config)
    names = [spec.name for spec in specs]
    unknown = [name for name in stages if name not in names]
    if unknown:
      raise PreflightInputError(
          f"--preflight_stages names {', '.join(unknown)}, not stages of this "
          f"run: {', '.join(names)}"
      )
    self.specs = [s for s in specs if not stages or s.name in stages]
    self.top = top
    self.compiled: dict[tuple[str, str], Any] | None = (
        {} if keep_compiled else None
    )
    self.report = self._header(config_name, libtpu, overrides)

  def _header(self, config_name, libtpu, overrides) -> dict[str, Any]:
    import jax

    society, config, s = self.society, self.config, self.slice
    kind = self.devices[0].device_kind
    spec = chips.CHIP_SPECS.get(kind)
    per_chip = chips.devices_per_chip(self.devices)
    usable = chips.usable_hbm_bytes(self.devices[0])
    source = "stated by the compiler"
    if usable is None and spec is not None:
      usable, source = spec.hbm_bytes // per_chip, "published figure"
    self.chip_spec, self.usable_hbm = spec, usable
    mesh_devices = list(society.mesh.devices.flat)
    self.num_chips = len(mesh_devices) // per_chip
    processes = {d.process_index for d in self.devices}
    members = society.members
    versions = {
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "libtpu": libtpu,
        "python": platform.python_version(),
    }
    short = (
        f"cost-model estimate, {s.name}, jax {versions['jax']}, libtpu {libtpu}"
    )
    return {
        "format": "masc_jax preflight 1",
        "estimate": (
            f"Cost-model estimates: the TPU compiler's cost model (libtpu {libtpu}, "
            f"jax {versions['jax']}) for {s.name}, compiled on this host without a "
            "TPU; not measured"
        ),
        "estimate_short": short,
        "config_name": config_name,
        "overrides": list(overrides),
        "config": json.loads(config.to_json()),
        "versions": versions,
        "slice": {
            "name": s.name,
            "description": s.describe(),
            "generation": s.generation.name,
            "libtpu_topology": s.libtpu_topology,
            "chips_per_host": list(s.chips_per_host),
            "device_kind": kind,
            "devices": len(self.devices),
            "chips": len(self.devices) // per_chip,
            "processes": len(processes),
            "devices_per_process": len(self.devices) // len(processes),
            "usable_hbm_bytes": usable * per_chip if usable else None,
            "usable_hbm_source": source,
            "peak_bf16_flops": spec.peak_bf16_flops if spec else None,
            "hbm_bytes_per_s": spec.hbm_bytes_per_s if spec else None,
            "spec_source": spec.source if spec else "none",
        },
        "run": {
            "mesh": {k: int(v) for k, v in society.mesh.shape.items()},
            "mesh_devices": len(mesh_devices),
            "mesh_chips": self.num_chips,
            "agent_map": society.strategy,
            "member_map": members.strategy,
            "members": members.size,
            "members_in_turn": members.in_turn,
            "num_agents": society.num_agents,
            "batch_size": config.batch_size,
            "eval_batch_size": config.eval_batch_size,
            "compute_dtype": config.model.compute_dtype,
            "conv_impl": config.model.conv_impl,
            "layout_notes": sharding.describe_layout(
                society.mesh, config.batch_size
            ),
        },
        "programs": [],
        "stages": [],
        "protocol_seconds": None,
        "leaves_out": list(costs.LEAVES_OUT),
        "failures": 0,
        "complete": False,
    }

  def stage_lengths(self) -> list[dict[str, Any]]:
    test_size = len(self.society.dataset.test_labels)
    eval_batches = sum(
        1
        for _ in batches_lib.eval_batches(
            test_size, self.config.eval_batch_size
        )
    )
    return [
        {
            "stage": spec.name,
            "steps": self._protocol.total_steps(self.society, spec),
            "images_per_step": self._protocol.images_per_step(
                self.society, spec
            ),
            "eval_batches": eval_batches,
        }
        for spec in self.specs
    ]

  def compile_one(self, build: Callable[[], Any]) -> dict[str, Any]:
    """Build, lower and compile one program; its report entry."""
    import jax

    program = build()
    entry: dict[str, Any] = {
        "stage": program.stage,
        "kind": program.kind,
        "runs_per_step": program.runs_per_step,
        "model_flops": program.model_flops,
    }
    start = time.perf_counter()
    try:
      with not_cached_on_disk():
        compiled = program.lower().compile()
    except jax.errors.JaxRuntimeError as e:
      entry["compile_seconds"] = time.perf_counter() - start
      message = _one_line(e)
      entry["error"] = message
      fit = chips.out_of_memory(message)
      if fit is not None:
        entry["status"] = "does_not_fit"
        over = (
            fit["required_bytes"] - fit["available_bytes"]
            if fit["required_bytes"] is not None
            and fit["available_bytes"] is not None
            else None
        )
        entry["does_not_fit"] = {**fit, "over_by_bytes": over}
      else:
        entry["status"] = "error"
      return entry
    entry["compile_seconds"] = time.perf_counter() - start
    entry["status"] = "compiled"
    if self.compiled is not None:
      self.compiled[(program.stage, program.kind)] = compiled
    text = compiled.as_text()
    timing = costs.step_time(compiled, text)
    breakdown = timing.pop("breakdown")
    entry.update(timing)
    entry["memory"] = costs.memory(compiled, self.usable_hbm)
    entry["mfu"] = costs.mfu(
        program.model_flops,
        self.num_chips,
        entry["step_seconds"],
        self.chip_spec,
    )
    entry["total_cycles"] = breakdown.total_cycles
    entry["unknown_trip_counts"] = breakdown.unknown_trip_counts
    if self.top:
      entry["top"] = costs.top_rows(breakdown, self.top)
    return entry

  def run(
      self, workdir: str, log: Callable[[str], None] = print
  ) -> dict[str, Any]:
    """Compile every program, writing the report after each; returns the report."""
    programs = self._programs
    state = programs.abstract_state(self.society)
    report = self.report
    lengths = self.stage_lengths()
    for spec in self.specs:
      for kind, build in (
          ("train", lambda: programs.stage_program(self.society, spec, state)),
          ("eval", lambda: programs.eval_program(self.society, spec, state)),
      ):
        log(f"[preflight] compiling {spec.name} {kind} for {self.slice.name}")
        entry = self.compile_one(build)
        report["programs"].append(entry)
        report["failures"] += entry["status"] != "compiled"
        log(
            f"[preflight] {spec.name} {kind}: {entry['status']} in "
            f"{entry['compile_seconds']:.1f} s"
        )
        report["stages"], report["protocol_seconds"] = report_lib.projections(
            report["programs"], lengths
        )
        report_lib.write(workdir, report)
    report["complete"] = True
    report_lib.write(workdir, report)
    return report
