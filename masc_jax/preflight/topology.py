"""TPU slices by name, and their devices as a run on the slice sees them.

A slice is named as Cloud TPU names accelerator types (``v5e-8``,
``v5litepod-16``, ``v6e-8``, ``v4-8``, ``v5p-16``: the number counts chips for
v5e/v6e and TensorCores, two per chip, for v4/v5p) or by generation and chip
grid (``v5e:4x4``, ``v4:2x2x2``). ``slice_devices`` asks libtpu's compile-only
client (``jax.experimental.topologies``) for the slice's devices; nothing runs
and no TPU is needed, only the ``libtpu`` package.

libtpu's defaults are not the Cloud TPU VMs, so the hosts are set here from a
table (``Slice.chips_per_host``): v5e/v6e slices of up to 8 chips are one host
(``v5e-8`` is one VM with 8 chips, where libtpu alone would make it 2 x 4),
larger ones hosts of 4 chips (2x2); v4/v5p hosts hold 4 chips (2x2x1). v4 runs
one device per chip (megacore), as JAX does on a v4 slice, where libtpu alone
makes one device per TensorCore. The devices come sorted by (process index,
id), the order of ``jax.devices()`` on the slice
(``jax_sort_devices_by_process_index``), so a mesh built from them puts every
device where the multi-process run puts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

PIP_HINT = 'pip install -e ".[tpu]"'


class TopologyError(ValueError):
  """A slice name this module does not know, or one libtpu refuses."""


class LibtpuMissingError(RuntimeError):
  """The libtpu package (TPU compiler) is not installed."""


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation as Cloud TPU names its slices.

  Attributes:
    name: the generation's short name (``v5e``).
    libtpu_name: libtpu's name for it (``v5e``).
    dims: 2 (v5e, v6e: a 2-D torus) or 3 (v4, v5p).
    cores_per_chip_in_name: what the number of a Cloud name counts per chip
      (1: chips; 2: TensorCores).
    device_kind: ``jax.Device.device_kind`` of its devices.
    chip_config: libtpu's ``chip_config_name`` (``megacore``: one device per chip).
  """

  name: str
  libtpu_name: str
  dims: int
  cores_per_chip_in_name: int
  device_kind: str
  chip_config: str | None = None


GENERATIONS: dict[str, Generation] = {
    g.name: g
    for g in (
        Generation("v5e", "v5e", 2, 1, "TPU v5 lite"),
        Generation("v6e", "v6e", 2, 1, "TPU v6 lite"),
        Generation("v4", "v4", 3, 2, "TPU v4", chip_config="megacore"),
        Generation("v5p", "v5p", 3, 2, "TPU v5"),
    )
}
_ALIASES = {"v5litepod": "v5e"}

# Chip grids of the Cloud TPU accelerator types, by number of chips.
_GRIDS_2D = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}
_GRIDS_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}

_CLOUD_NAME = re.compile(r"(?P<gen>[a-z0-9]+)-(?P<count>\d+)")
_GRID_NAME = re.compile(r"(?P<gen>[a-z0-9]+):(?P<grid>\d+(?:x\d+){1,2})")


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its generation, chip grid and hosts.

  Attributes:
    name: as the user gave it (``v5e-8``).
    generation: its ``Generation``.
    grid: chips along each axis, 3 entries (``(2, 4, 1)``).
    chips_per_host: each host's chip grid, 3 entries.
  """

  name: str
  generation: Generation
  grid: tuple[int, int, int]
  chips_per_host: tuple[int, int, int]

  @property
  def chips(self) -> int:
    return math.prod(self.grid)

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.chips_per_host)

  @property
  def libtpu_topology(self) -> str:
    """libtpu's topology name (``v5e:2x4``)."""
    grid = self.grid[: self.generation.dims]
    return f"{self.generation.libtpu_name}:{'x'.join(map(str, grid))}"

  @property
  def libtpu_options(self) -> dict[str, Any]:
    """The keyword arguments of ``topologies.get_topology_desc`` besides the name."""
    options: dict[str, Any] = {"chips_per_host_bounds": self.chips_per_host}
    if self.generation.chip_config:
      options["chip_config_name"] = self.generation.chip_config
    return options

  def describe(self) -> str:
    grid = "x".join(map(str, self.grid[: self.generation.dims]))
    host = "x".join(map(str, self.chips_per_host[: self.generation.dims]))
    hosts = (
        "one host" if self.hosts == 1 else f"{self.hosts} hosts of {host} chips"
    )
    return f"{self.name}: TPU {self.generation.name}, {self.chips} chips ({grid}), {hosts}"


def _known_forms() -> str:
  gens = ", ".join(GENERATIONS)
  return (
      f"a Cloud TPU type such as v5e-8, v5litepod-16, v6e-8, v4-8, v5p-16, or "
      f"GENERATION:GRID such as v5e:4x4, v4:2x2x2 (generations: {gens})"
  )


def _hosts_of(generation: Generation, grid: tuple[int, int, int]) -> tuple:
  """The chip grid of one host of a slice with ``grid`` (Cloud TPU VMs)."""
  chips = math.prod(grid)
  if generation.dims == 3:
    return (2, 2, 1) if chips >= 4 else grid
  # v5e/v6e: slices of up to 8 chips are one VM; larger ones are VMs of 4 chips.
  if chips <= 8:
    return grid
  return (2, 2, 1)


def parse_slice(name: str) -> Slice:
  """``v5e-8`` / ``v5e:2x4`` -> a ``Slice``; ``TopologyError`` (one line) if unknown."""
  text = (name or "").strip().lower()
  cloud, grid_name = _CLOUD_NAME.fullmatch(text), _GRID_NAME.fullmatch(text)
  match = cloud or grid_name
  gen_name = (
      _ALIASES.get(match.group("gen"), match.group("gen")) if match else ""
  )
  generation = GENERATIONS.get(gen_name)
  if generation is None:
    raise TopologyError(f"unknown TPU slice {name!r}: use {_known_forms()}")
  if cloud:
    count = int(cloud.group("count"))
    if count % generation.cores_per_chip_in_name:
      raise TopologyError(
          f"unknown TPU slice {name!r}: {generation.name} slices count "
          f"TensorCores, {generation.cores_per_chip_in_name} per chip"
      )
    chips = count // generation.cores_per_chip_in_name
    grids = _GRIDS_2D if generation.dims == 2 else _GRIDS_3D
    if chips not in grids:
      sizes = ", ".join(
          f"{generation.name}-{c * generation.cores_per_chip_in_name}"
          for c in grids
      )
      raise TopologyError(f"unknown TPU slice {name!r}: use one of {sizes}")
    grid = grids[chips]
  else:
    grid = tuple(int(d) for d in grid_name.group("grid").split("x"))
    if len(grid) != generation.dims or 0 in grid:
      raise TopologyError(
          f"unknown TPU slice {name!r}: {generation.name} grids have "
          f"{generation.dims} axes of at least one chip"
      )
  grid3 = tuple(grid) + (1,) * (3 - len(grid))
  return Slice(text, generation, grid3, _hosts_of(generation, grid3))


def libtpu_version() -> str:
  """The installed libtpu's version; ``LibtpuMissingError`` (one line) without it."""
  from importlib import metadata

  try:
    import libtpu  # noqa: F401 - only whether it imports
  except ImportError:
    raise LibtpuMissingError(
        "compiling for a TPU slice needs libtpu, the TPU compiler: "
        f"{PIP_HINT} (Linux x86-64; no TPU needed)"
    ) from None
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "unknown"


# libtpu's start-up lines on a host without TPU hardware (it looks for the TPU VM's
# metadata, finds none, says so, and carries on: compiling needs none of it).
_STARTUP_NOISE = re.compile(
    r"^(?:[WIE]\d{4} |WARNING: Logging before InitGoogle|=== Source Location"
    r"|\S*libtpu_init_utils|Failed to find host bounds|\s*$)"
)


@contextlib.contextmanager
def _libtpu_startup_lines_filtered() -> Iterator[None]:
  """Hide libtpu's start-up noise on stderr (file descriptor 2); pass anything else on."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines()
      kept = [line for line in lines if not _STARTUP_NOISE.match(line)]
      if kept:
        print("\n".join(kept), file=sys.stderr, flush=True)


def slice_devices(tpu_slice: Slice) -> list[Any]:
  """The slice's compile-only TPU devices, in ``jax.devices()`` order on the slice.

  Raises:
    LibtpuMissingError: libtpu is not installed.
    TopologyError: libtpu refuses the slice (one line).
  """
  libtpu_version()
  # Compiling needs no device, and a TPU VM's chips may be busy with a run: this
  # process keeps to the CPU backend for its own arrays. libtpu takes a lock file
  # even to compile; this lets it do so beside another libtpu process.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  from jax.experimental import topologies

  if not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")
  try:
    with _libtpu_startup_lines_filtered():
      description = topologies.get_topology_desc(
          topology_name=tpu_slice.libtpu_topology,
          platform="tpu",
          **tpu_slice.libtpu_options,
      )
  except jax.errors.JaxRuntimeError as e:
    message = " ".join(str(e).split())
    raise TopologyError(
        f"libtpu cannot lay out TPU slice {tpu_slice.name!r} "
        f"({tpu_slice.libtpu_topology}): {message}"
    ) from None
  return sorted(description.devices, key=lambda d: (d.process_index, d.id))
