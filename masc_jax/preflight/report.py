"""The pre-flight report: ``preflight.json`` and its Markdown rendering ``preflight.md``.

The report (a dict, the JSON file's content) holds the slice, the run's
layout, one entry per program (``programs``) and the projected times
(``stages``, ``protocol_seconds``). Every time and MFU in it comes from the TPU
compiler's cost model and is labelled so (``estimate``); none is measured.
"""

from __future__ import annotations

import json
import math
from typing import Any

from masc_jax import paths

GIB = 2**30
MIB = 2**20


def projections(programs: list[dict[str, Any]], stages: list[dict[str, Any]]):
  """Each stage's projected time and the protocol's, from its programs' step estimates.

  ``stages``: ``{stage, steps, eval_batches}`` per stage. A stage takes its
  steps x its train program's runs per step x the estimated step time, plus
  its evaluation: the test batches x the members (evaluated one at a time) x
  the evaluation program's estimate. None where a program has no estimate.
  """
  by_key = {(p["stage"], p["kind"]): p for p in programs}
  rows, total = [], 0.0
  for stage in stages:
    train = by_key.get((stage["stage"], "train"), {})
    evaluation = by_key.get((stage["stage"], "eval"), {})
    row = dict(stage)

    def seconds(program, count):
      estimate = program.get("step_seconds")
      if estimate is None:
        return None
      return count * program["runs_per_step"] * estimate

    row["train_step_seconds"] = train.get("step_seconds")
    row["runs_per_step"] = train.get("runs_per_step")
    row["train_seconds"] = seconds(train, stage["steps"])
    row["eval_seconds"] = (
        seconds(evaluation, stage["eval_batches"]) if evaluation else 0.0
    )
    parts = (row["train_seconds"], row["eval_seconds"])
    row["seconds"] = None if None in parts else sum(parts)
    total = (
        None
        if total is None or row["seconds"] is None
        else total + row["seconds"]
    )
    rows.append(row)
  return rows, total


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "n/a"
  if seconds < 1:
    return f"{seconds * 1e3:.3g} ms"
  if seconds < 120:
    return f"{seconds:.3g} s"
  if seconds < 2 * 3600:
    return f"{seconds / 60:.3g} min"
  return f"{seconds / 3600:.3g} h"


def _number(value: float | None, scale: float = 1.0, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return f"{value / scale:.{digits}g}"


def _status(program: dict[str, Any]) -> str:
  if program["status"] == "compiled":
    return "compiled" + (" (anomaly)" if program.get("anomaly") else "")
  if program["status"] == "does_not_fit":
    return "**does not fit**"
  return "**error**"


def markdown(report: dict[str, Any]) -> str:
  """The report as Markdown (what the command prints and ``preflight.md`` holds)."""
  s, run = report["slice"], report["run"]
  lines = [
      f"# Pre-flight: {report['config_name']} on {s['name']}",
      "",
      f"**{report['estimate']}.**",
      "",
      f"- Slice: {s['description']}; {s['devices']} devices "
      f"({s['device_kind']}), {s['processes']} process(es) of "
      f"{s['devices_per_process']} devices; libtpu topology `{s['libtpu_topology']}`.",
      f"- Per chip: usable HBM {_number(s['usable_hbm_bytes'], GIB, 4)} GiB "
      f"({s['usable_hbm_source']}), bf16 peak "
      f"{_number(s['peak_bf16_flops'], 1e12)} TFLOP/s (published: {s['spec_source']}).",
      f"- Run: mesh {' x '.join(f'{k}={v}' for k, v in run['mesh'].items())} on "
      f"{run['mesh_devices']} devices; {run['members']} member(s), member_map="
      f"{run['member_map']}, agent_map={run['agent_map']}; K={run['num_agents']}, "
      f"batch {run['batch_size']}, eval batch {run['eval_batch_size']}, "
      f"{run['compute_dtype']}, conv {run['conv_impl']}.",
  ]
  if run["members_in_turn"]:
    lines.append(
        f"- Members run in turn: each train and evaluation program below is one "
        f"member's, run {run['members']} time(s) per step or batch."
    )
  lines += [f"- Note: {note}" for note in run["layout_notes"]]
  if report.get("overrides"):
    lines.append(
        "- Overrides: " + " ".join(f"`{o}`" for o in report["overrides"])
    )
  lines += [
      "",
      "## Programs (per chip)",
      "",
      "| stage | program | status | compile s | HBM MiB (args + out - aliased + temp) "
      "| of usable | XLA GFLOP | optimal_seconds (raw) | ConcatBitcast "
      "| est. step | est. cycles | model GFLOP | est. MFU |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for p in report["programs"]:
    mem = p.get("memory") or {}
    fraction = mem.get("fraction_of_usable")
    lines.append(
        "| "
        + " | ".join(
            [
                p["stage"],
                p["kind"],
                _status(p),
                _number(p.get("compile_seconds"), digits=3),
                (
                    f"{_number(mem['argument_bytes'], MIB)} + {_number(mem['output_bytes'], MIB)}"
                    f" - {_number(mem['alias_bytes'], MIB)} + {_number(mem['temp_bytes'], MIB)}"
                    f" = {_number(mem['total_bytes'], MIB)}"
                    if mem
                    else "n/a"
                ),
                f"{100 * fraction:.2f}%" if fraction is not None else "n/a",
                _number(p.get("xla_flops_per_device"), 1e9),
                _number(p.get("optimal_seconds_raw"), digits=6),
                str(p.get("concat_bitcasts", "n/a")),
                _duration(p.get("step_seconds")),
                (
                    f"{p['total_cycles'] / 1e6:.4g} M"
                    if p.get("total_cycles") is not None
                    else "n/a"
                ),
                _number(p.get("model_flops"), 1e9),
                f"{100 * p['mfu']:.2g}%" if p.get("mfu") is not None else "n/a",
            ]
        )
        + " |"
    )
  lines += [
      "",
      "Per chip: one device per chip on this slice; every figure is the "
      "program's part on one chip (an SPMD partition). est. step: the cost "
      "model's `optimal_seconds` + 1 s per ConcatBitcast (which it counts as "
      "-1 s). est. cycles: the sum of the compiler's `estimated_cycles` over "
      "the program, loops expanded (a second model: see the last section). "
      "est. MFU: model FLOPs / (chips x est. step x bf16 peak).",
  ]
  problems = [
      p
      for p in report["programs"]
      if p["status"] != "compiled" or p.get("anomaly")
  ]
  if problems:
    lines += ["", "## Problems", ""]
    for p in problems:
      what = f"{p['stage']} {p['kind']}"
      if p["status"] == "does_not_fit":
        fit = p["does_not_fit"]
        if fit.get("required_bytes") is not None:
          lines.append(
              f"- {what}: does not fit in HBM: needs "
              f"{_number(fit['required_bytes'], GIB)} GiB per chip, "
              f"{_number(fit['available_bytes'], GIB)} GiB usable: "
              f"{_number(fit['over_by_bytes'], GIB)} GiB over."
          )
        else:
          lines.append(f"- {what}: does not fit in HBM: {p['error']}")
      elif p["status"] == "error":
        lines.append(f"- {what}: the compiler failed: {p['error']}")
      else:
        ops = ", ".join(
            f"{op} x{n}" for op, n in p["ops_without_estimate"].items()
        )
        lines.append(
            f"- {what}: {p['anomaly']}. Instructions without an estimate: {ops or 'none'}."
        )
  lines += [
      "",
      f"## Projected time ({report['estimate_short']})",
      "",
      "| stage | steps | runs per step | est. step | train | eval batches "
      "| eval | stage |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in report["stages"]:
    lines.append(
        f"| {row['stage']} | {row['steps']} | {row['runs_per_step'] or 'n/a'} "
        f"| {_duration(row['train_step_seconds'])} | {_duration(row['train_seconds'])} "
        f"| {row['eval_batches']} | {_duration(row['eval_seconds'])} "
        f"| {_duration(row['seconds'])} |"
    )
  lines.append(
      f"| **whole protocol** | {sum(r['steps'] for r in report['stages'])} | | | | | "
      f"| **{_duration(report['protocol_seconds'])}** |"
  )
  lines += [
      "",
      "## What the estimate leaves out",
      "",
      *[f"- {item}" for item in report["leaves_out"]],
  ]
  no_estimate = [
      (p, p["ops_without_estimate"])
      for p in report["programs"]
      if p.get("ops_without_estimate")
  ]
  if no_estimate:
    lines += [
        "",
        "Instructions without an estimate, by program (asynchronous copies and "
        "collectives overlap or communicate; their time is not in the estimate):",
        "",
    ]
    for p, ops in no_estimate:
      listed = ", ".join(f"{op} x{n}" for op, n in ops.items())
      lines.append(f"- {p['stage']} {p['kind']}: {listed}")
  tops = [p for p in report["programs"] if p.get("top")]
  if tops:
    lines += [
        "",
        "## Where a program's time goes (the compiler's estimated cycles)",
        "",
        "The TPU compiler's `estimated_cycles` of each instruction of the "
        "program's entry computation, while loops expanded by their trip count. "
        "A separate model from `optimal_seconds`: read the shares.",
    ]
    for p in tops:
      lines += [
          "",
          f"### {p['stage']} {p['kind']}: {p['total_cycles']:,} cycles",
          "",
          "| cycles | share | instruction | JAX operation |",
          "|---:|---:|---|---|",
      ]
      for row in p["top"]:
        lines.append(
            f"| {row['cycles']:,} | {100 * row['share']:.1f}% | {row['op']} "
            f"| `{row['op_name'] or row['instruction']}` |"
        )
  if not report["complete"]:
    lines += ["", "*Incomplete: the pre-flight is still compiling.*"]
  return "\n".join(lines) + "\n"


def write(workdir: str, report: dict[str, Any]) -> None:
  """``preflight.json`` and ``preflight.md`` in ``workdir``, each written atomically."""
  paths.makedirs(workdir)
  payload = json.dumps(report, indent=2, sort_keys=True, allow_nan=False)
  paths.write_atomic(paths.join(workdir, "preflight.json"), payload + "\n")
  paths.write_atomic(paths.join(workdir, "preflight.md"), markdown(report))
