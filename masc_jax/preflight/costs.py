"""What a compiled TPU program says about itself: memory, FLOPs, the cost model's step time.

All figures are per device (one SPMD partition of the program): the
arguments, outputs and temporaries one device holds, the FLOPs and bytes one
device computes and moves, and ``optimal_seconds``, the cost model's time of
one run of the program with every device working in parallel.

The raw ``optimal_seconds`` counts -1 s for every ``ConcatBitcast`` custom call
(an op the model has no estimate for): the estimate is ``raw + count``
(``hlo.count_custom_calls``). It is then checked to lie in (0, 1) s, as every
step of this project's configs does; a value outside means another op without
an estimate, and the program is flagged with the kinds of instruction that
carry none.
"""

from __future__ import annotations

import math
from typing import Any

from masc_jax.preflight import chips, hlo

CONCAT_BITCAST = "ConcatBitcast"

# What the cost model leaves out (every report says so).
LEAVES_OUT = (
    "inter-chip communication: collectives (the gradient all-reduce of a "
    "replicated collective, all-gathers) are costed as local memory traffic, with "
    "no time on the interconnect",
    "matmul precision passes: the estimate is the same for one bf16 pass and for "
    "float32 at `highest` precision (about 6 passes); at JAX's default precision a "
    "float32 convolution runs as one bf16 pass on TPU, so float32 runs are not "
    "float32-accurate there",
    "ops without an estimate: ConcatBitcast custom calls (counted -1 s each by the "
    "model, added back here) and any listed under a program",
    "the host: the per-step batch gather (a separate small program), dispatch, "
    "logging, checkpoints, and evaluation's transfers",
    "validation: these estimates have not been compared with measured TPU step "
    "times",
)


def memory(compiled: Any, usable_hbm_bytes: int | None) -> dict[str, Any]:
  """Per-device memory of a compiled program (bytes), against the usable HBM."""
  analysis = compiled.memory_analysis()
  fields = ("argument", "output", "alias", "temp", "generated_code")
  out = {
      f"{name}_bytes": int(getattr(analysis, f"{name}_size_in_bytes"))
      for name in fields
  }
  # What the compiler checks against the HBM limit: a donated argument's buffer
  # is reused for its output (aliased), so it counts once.
  out["total_bytes"] = (
      out["argument_bytes"]
      + out["output_bytes"]
      - out["alias_bytes"]
      + out["temp_bytes"]
  )
  out["usable_bytes"] = usable_hbm_bytes
  out["fraction_of_usable"] = (
      out["total_bytes"] / usable_hbm_bytes if usable_hbm_bytes else None
  )
  return out


def step_time(compiled: Any, text: str) -> dict[str, Any]:
  """The cost model's time of one run, corrected for ``ConcatBitcast``s, and its checks."""
  analysis = compiled.cost_analysis() or {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  raw = analysis.get("optimal_seconds")
  count = hlo.count_custom_calls(text, CONCAT_BITCAST)
  estimate = raw + count if raw is not None else None
  breakdown = hlo.cycle_breakdown(text)
  anomaly = None
  if estimate is None or not math.isfinite(estimate):
    anomaly = "the cost model gave no optimal_seconds"
  elif not 0 < estimate < 1:
    anomaly = (
        f"optimal_seconds {raw:.6g} + {count} {CONCAT_BITCAST} = {estimate:.6g} s, "
        "outside (0, 1) s: another op without an estimate"
    )
  return {
      "xla_flops_per_device": analysis.get("flops"),
      "bytes_accessed_per_device": analysis.get("bytes accessed"),
      "optimal_seconds_raw": raw,
      "concat_bitcasts": count,
      "step_seconds": estimate if anomaly is None else None,
      "anomaly": anomaly,
      "ops_without_estimate": dict(sorted(breakdown.no_estimate.items())),
      "breakdown": breakdown,
  }


def mfu(
    model_flops: float | None,
    num_chips: int,
    seconds: float | None,
    spec: chips.ChipSpec | None,
) -> float | None:
  """Model FLOPs / (chips x seconds x bf16 peak): the share of the slice's peak the
  model's own arithmetic would use at the estimated time. Work every device
  repeats (a replicated evaluation batch) counts once.
  """
  if not model_flops or not seconds or spec is None or num_chips < 1:
    return None
  return model_flops / (num_chips * seconds * spec.peak_bf16_flops)


def top_rows(breakdown: hlo.Breakdown, count: int) -> list[dict[str, Any]]:
  """The ``count`` entry instructions with the most estimated cycles."""
  total = max(breakdown.total_cycles, 1)
  return [
      {
          "instruction": name,
          "op": op,
          "cycles": cycles,
          "share": cycles / total,
          "op_name": op_name,
      }
      for name, op, cycles, op_name in breakdown.rows[:count]
  ]
