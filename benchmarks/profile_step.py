"""Where a train step's time goes: per-HLO-op times from a ``jax.profiler`` trace.

    python -m benchmarks.profile_step --stage experts --agents 1 --conv-impl auto --top 25

Builds the step like ``benchmarks.agent_step`` (the library's own step
function, jitted and AOT-compiled), runs ``--warmup`` steps, traces ``--steps``
steps with ``jax.profiler.trace``, reads the trace back with
``jax._src.profiler.ProfileData`` and sums the duration of every event named
after an instruction of the compiled HLO (XLA:CPU's thunks are traced under
their HLO names). Each op is labelled with its opcode and shapes from
``compiled.as_text()``; convolutions with their dimension numbers, which tell
forward (``b01f_01io->b01f``) from the backward-input and backward-filter
convolutions that autodiff emits.

The times are per step and per issuing thread: XLA:CPU runs independent thunks
concurrently and an Eigen convolution splits itself over the intra-op pool, so
the per-op sum can differ from the wall time (both are printed). Use it to rank
ops, not to add them up exactly.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import agent_step, common

_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\{[^}]*\})?)\s+([\w\-]+)\((.*)$"
)


_COMP = re.compile(r"^%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
# Ops that name what a fusion is for, most telling first.
_KEY_OPS = (
    "convolution",
    "dot",
    "custom-call",
    "select-and-scatter",
    "scatter",
    "reduce-window",
    "gather",
    "sort",
    "reduce",
    "transpose",
    "concatenate",
    "pad",
    "iota",
    "broadcast",
)


def _operand_shapes(rest: str) -> list[str]:
  return [s for _, s in re.findall(r"(f32|bf16|f16|s32|u8)\[([\d,]*)\]", rest)]


def _describe(opcode: str, shape: str, rest: str) -> str:
  if opcode == "convolution":
    dims = re.search(r"dim_labels=([^,\s]+)", rest)
    window = re.search(r"window=\{([^}]*)\}", rest)
    return (
        f"{dims.group(1) if dims else ''} [{window.group(1) if window else ''}] "
        f"{' x '.join(_operand_shapes(rest)[:2])} -> {shape.split('{')[0]}"
    )
  if opcode in ("dot", "custom-call"):
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    return (
        ((target.group(1) + " ") if target else "")
        + " x ".join(_operand_shapes(rest)[:2])
        + f" -> {shape.split('{')[0]}"
    )
  if opcode == "reduce-window":
    window = re.search(r"window=\{([^}]*)\}", rest)
    return f"[{window.group(1) if window else ''}] {len(_operand_shapes(rest))} operands"
  return ""


def hlo_ops(hlo_text: str) -> dict[str, dict[str, str]]:
  """name -> {opcode, shape, kind, detail} for every instruction of the HLO module.

  For a fusion, ``kind`` and ``detail`` describe the most telling op inside its
  fused computation (a convolution, a dot, a reduce-window, ...).
  """
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    c = _COMP.match(line.strip()) if not line.startswith(" ") else None
    if c and "=" not in line.split("(")[0]:
      current = c.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      comps[current].append(m.groups())

  def key_op(comp: str, depth: int = 0):
    instrs = comps.get(comp, [])
    for wanted in _KEY_OPS:
      for name, shape, opcode, rest in instrs:
        if opcode == wanted:
          return opcode, _describe(opcode, shape, rest)
      if depth < 2:
        for name, shape, opcode, rest in instrs:
          if opcode == "fusion":
            calls = re.search(r"calls=%?([\w.\-]+)", rest)
            if calls:
              inner = key_op(calls.group(1), depth + 1)
              if inner[0] == wanted:
                return inner
    return ("elementwise", "")

  ops = {}
  for comp, instrs in comps.items():
    for name, shape, opcode, rest in instrs:
      kind, detail = opcode, _describe(opcode, shape, rest)
      if opcode == "fusion":
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        kind, detail = key_op(calls.group(1)) if calls else ("fusion", "")
      meta = re.search(r'op_name="([^"]*)"', rest)
      ops[name] = {
          "opcode": opcode,
          "shape": shape,
          "kind": kind,
          "detail": detail.strip(),
          "op_name": meta.group(1) if meta else "",
      }
  return ops


def conv_role(detail: str) -> str:
  """A convolution's role from its window: autodiff's filter gradient convolves
  over the whole feature map (window = H x W), the forward and input-gradient
  convolutions use the 3x3 kernel window."""
  window = re.search(r"\[size=(\d+)x(\d+)", detail)
  if window and (window.group(1), window.group(2)) != ("3", "3"):
    return "conv bwd-filter"
  return "conv fwd / bwd-input (3x3 window)"


def module_of(op_name: str) -> str:
  """'fwd conv3' / 'bwd bn5' / 'bwd head' ... from an HLO op's metadata op_name."""
  if not op_name:
    return "(no metadata)"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  m = re.findall(
      r"/(conv\d+|bn\d+|dense\d+|logits|Dropout_\d+)/", op_name + "/"
  )
  if m:
    return f"{direction} {m[-1]}"
  leaf = op_name.rsplit("/", 1)[-1]
  return f"{direction} other:{leaf[:30]}"


def profile(
    spec: dict, steps: int, warmup: int, top: int, trace_dir: str | None
) -> dict:
  import jax
  from jax._src.profiler import ProfileData

  jitted, (state, batch, frozen), images, *_ = agent_step.build_jax_step(spec)
  key = jax.random.key(0)
  compiled = jitted.lower(state, batch, key, frozen).compile()
  ops = hlo_ops(compiled.as_text())
  for i in range(warmup):
    state, _ = compiled(state, batch, jax.random.fold_in(key, i), frozen)
  jax.block_until_ready(state)
  tmp = trace_dir or tempfile.mkdtemp(prefix="masc_profile_")
  t0 = time.perf_counter()
  with jax.profiler.trace(tmp):
    for i in range(steps):
      state, metrics = compiled(
          state, batch, jax.random.fold_in(key, 100 + i), frozen
      )
      jax.block_until_ready((state, metrics))
  wall_ms = (time.perf_counter() - t0) * 1e3 / steps
  files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
  data = ProfileData.from_file(max(files, key=os.path.getmtime))
  per_op = collections.defaultdict(float)
  count = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in ops:
          per_op[ev.name] += ev.duration_ns / 1e6 / steps
          count[ev.name] += 1
  if not trace_dir:
    shutil.rmtree(tmp, ignore_errors=True)
  total = sum(per_op.values())
  by_kind = collections.defaultdict(float)
  for name, ms in per_op.items():
    op = ops[name]
    kind = (
        conv_role(op["detail"]) if op["kind"] == "convolution" else op["kind"]
    )
    by_kind[kind] += ms
  by_module = collections.defaultdict(float)
  for name, ms in per_op.items():
    by_module[module_of(ops[name].get("op_name", ""))] += ms
  ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
  return {
      "spec": spec,
      "wall_ms_per_step": wall_ms,
      "op_ms_sum_per_step": total,
      "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
      "by_module": dict(sorted(by_module.items(), key=lambda kv: -kv[1])),
      "top": [
          {"name": n, "ms": ms, "calls_per_step": count[n] / steps, **ops[n]}
          for n, ms in ranked[:top]
      ],
      "load": common.loadavg(),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--stage", default="experts", choices=agent_step.STAGES)
  p.add_argument("--agents", type=int, default=1)
  p.add_argument("--strategy", default="vmap")
  p.add_argument("--conv-impl", default="auto")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--input", default="cifar", choices=("cifar", "digits"))
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--top", type=int, default=25)
  p.add_argument(
      "--trace-dir",
      default="",
      help="keep the trace here (for TensorBoard/Perfetto)",
  )
  p.add_argument(
      "--patch", action="append", default=[], help="see benchmarks/patches.py"
  )
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  from benchmarks import patches

  patches.apply(args.patch)
  spec = dict(
      kind="jax",
      stage=args.stage,
      agents=args.agents,
      strategy=args.strategy,
      conv_impl=args.conv_impl,
      batch=args.batch,
      input=args.input,
      dtype=args.dtype,
      steps=args.steps,
      warmup=args.warmup,
  )
  res = profile(spec, args.steps, args.warmup, args.top, args.trace_dir or None)
  print(
      f"# {args.stage} K={args.agents} {args.strategy}/{args.conv_impl} B={args.batch}: "
      f"wall {res['wall_ms_per_step']:.0f} ms/step (traced), per-op sum "
      f"{res['op_ms_sum_per_step']:.0f} ms/step; load {res['load']}; "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; patches {args.patch}"
  )
  print(
      common.markdown_table(
          ["op kind", "ms/step", "%"],
          [
              [k, v, 100 * v / res["op_ms_sum_per_step"]]
              for k, v in res["by_kind"].items()
          ],
      )
  )
  print()
  print(
      common.markdown_table(
          ["module (from HLO metadata)", "ms/step", "%"],
          [
              [k, v, 100 * v / res["op_ms_sum_per_step"]]
              for k, v in list(res["by_module"].items())[: args.top]
          ],
      )
  )
  print()
  print(
      common.markdown_table(
          ["op", "kind", "ms/step", "shape", "detail"],
          [
              [
                  t["name"],
                  t["kind"],
                  t["ms"],
                  t["shape"].split("{")[0][:40],
                  (t["detail"] or module_of(t.get("op_name", "")))[:100],
              ]
              for t in res["top"]
          ],
      )
  )
  if args.out:
    common.write_json(args.out, res)
  return 0


if __name__ == "__main__":
  sys.exit(main())
