"""Per-chip figures of TPU generations: HBM, bf16 peak, HBM bandwidth.

Neither libtpu's devices nor its compiled programs state capacity or peak. The
usable HBM of a device is read from the compiler itself (``usable_hbm_bytes``:
the limit its out-of-memory message names); the published figures in
``CHIP_SPECS`` are the fallback for HBM and the only source for the peak.

The MXUs compute in bfloat16: a float32 matmul or convolution at JAX's default
precision runs as one bf16 pass (the compiler's cycle estimates for a 4096^3
matmul on v5e: bf16 1.08 M cycles, f32 default 1.11 M, f32 ``highest`` 6.39 M),
so the bf16 peak is the peak for both of the project's compute dtypes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Published figures of one TPU chip.

  Attributes:
    generation: short name (``v5e``).
    hbm_bytes: HBM per chip (the pages' "16 GB" are GiB: the compiler allows
      15.75 GiB on a v5e).
    peak_bf16_flops: dense bf16 FLOP/s per chip.
    hbm_bytes_per_s: HBM bandwidth per chip.
    source: the page the figures come from.
  """

  generation: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  source: str


# By ``jax.Device.device_kind``.
CHIP_SPECS: dict[str, ChipSpec] = {
    "TPU v4": ChipSpec(
        "v4", 32 * 2**30, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"
    ),
    "TPU v5 lite": ChipSpec(
        "v5e",
        16 * 2**30,
        197e12,
        819e9,
        "https://cloud.google.com/tpu/docs/v5e",
    ),
    "TPU v5": ChipSpec(
        "v5p",
        96 * 2**30,
        459e12,
        2765e9,
        "https://cloud.google.com/tpu/docs/v5p",
    ),
    "TPU v6 lite": ChipSpec(
        "v6e",
        32 * 2**30,
        918e12,
        1640e9,
        "https://cloud.google.com/tpu/docs/v6e",
    ),
}

_UNITS = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = r"([\d.]+)\s*([KMGT]i?B?|B)"


def parse_size(number: str, unit: str) -> int:
  """``("15.75", "G")`` -> bytes; the compiler's G/M/K are binary (GiB, ...)."""
  return int(round(float(number) * 1024 ** _UNITS[unit[0].upper()]))


_AVAILABLE = re.compile(r"available HBM \(" + _SIZE + r"\)")
_REQUIRED = re.compile(
    r"required for [^(]*\("
    + _SIZE
    + r"\) exceeds available HBM \("
    + _SIZE
    + r"\)"
)


def out_of_memory(message: str) -> dict[str, int] | None:
  """What a RESOURCE_EXHAUSTED compile error says: ``{required_bytes, available_bytes}``.

  The TPU compiler refuses a program that does not fit in HBM ("Ran out of
  memory on HBM, the total memory required for HLO temporaries (27.20G)
  exceeds available HBM (15.75G)"; the required figure includes the
  arguments and outputs). None if ``message`` is not such an error.
  """
  if "RESOURCE_EXHAUSTED" not in message or "HBM" not in message:
    return None
  found = _REQUIRED.search(message)
  if found:
    return {
        "required_bytes": parse_size(*found.group(1, 2)),
        "available_bytes": parse_size(*found.group(3, 4)),
    }
  available = _AVAILABLE.search(message)
  return {
      "required_bytes": None,
      "available_bytes": parse_size(*available.group(1, 2))
      if available
      else None,
  }


def usable_hbm_bytes(device: Any) -> int | None:
  """The HBM one device may use, as the TPU compiler states it (None if it does not say).

  Compiles a sum over a 1 TiB argument on ``device`` and reads the limit from
  the compiler's refusal. About a second.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  mesh = jax.sharding.Mesh(np.array([device]), ("d",))
  huge = jax.ShapeDtypeStruct(
      (2**38,),
      jnp.float32,
      sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )
  try:
    jax.jit(jnp.sum).lower(huge).compile()
  except jax.errors.JaxRuntimeError as e:
    found = out_of_memory(str(e))
    return found["available_bytes"] if found else None
  return None


def devices_per_chip(devices: list[Any]) -> int:
  """How many devices share a chip (1 for every slice ``topology`` makes)."""
  chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
  return len(devices) // max(len(chips), 1)
