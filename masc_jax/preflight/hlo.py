"""Reading the TPU compiler's optimised HLO text (``compiled.as_text()``).

Two things the cost figures need:

* ``count_custom_calls(text, "ConcatBitcast")``: the compiler's
  ``optimal_seconds`` counts every ``ConcatBitcast`` custom call (its prefetch
  of stacked weights into on-chip memory) as -1 s, an op it has no estimate
  for; the integer part of the raw figure is minus their number, and adding
  the count back gives the estimate (``costs``).
* ``cycle_breakdown(text)``: the compiler's ``estimated_cycles`` of every
  instruction it emitted (in each instruction's ``backend_config``), summed
  over the entry computation with while loops expanded by their trip count,
  with the JAX operation each came from (``metadata={op_name=...}``), and the
  kinds of instruction that carry no estimate (collectives, asynchronous
  copies, custom calls, ...). A cycle count is a different model from
  ``optimal_seconds``: use its shares, not its seconds.
"""

from __future__ import annotations

import dataclasses
import re

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*.+?\s(?P<op>[a-z][\w\-]*)\("
)
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{\s*$")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_CALLED = {
    "body": re.compile(r"body=%([\w.\-]+)"),
    "condition": re.compile(r"condition=%([\w.\-]+)"),
    "to_apply": re.compile(r"to_apply=%([\w.\-]+)"),
    "branches": re.compile(r"branch_computations=\{([^}]*)\}"),
}

# Instructions that cost nothing themselves (no estimate expected).
_FREE = frozenset(
    {
        "parameter",
        "get-tuple-element",
        "tuple",
        "bitcast",
        "constant",
        "partition-id",
        "replica-id",
        "after-all",
        "opt-barrier",
        "while",
        "call",
        "conditional",
    }
)


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  op: str  # custom calls as ``custom-call[TARGET]``
  cycles: int | None  # the compiler's estimated_cycles, if it wrote one
  op_name: str  # the JAX operation it came from
  line: str


def parse_computations(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """Optimised HLO text -> ``({computation: [Instruction]}, entry computation's name)``."""
  computations: dict[str, list[Instruction]] = {}
  current, entry = None, ""
  for line in text.splitlines():
    if not line.startswith(" "):
      header = _COMPUTATION.match(line)
      if header:
        current = header.group("name")
        computations[current] = []
        entry = current if header.group("entry") else entry
      elif line.startswith("}"):
        current = None
      continue
    found = _INSTRUCTION.match(line) if current else None
    if not found:
      continue
    op = found.group("op")
    target = _TARGET.search(line)
    if target:
      op = f"{op}[{target.group(1)}]"
    cycles = _CYCLES.search(line)
    op_name = _OP_NAME.search(line)
    computations[current].append(
        Instruction(
            found.group("name"),
            op,
            int(cycles.group(1)) if cycles else None,
            op_name.group(1) if op_name else "",
            line,
        )
    )
  return computations, entry


def count_custom_calls(text: str, target: str) -> int:
  """Custom-call instructions with ``custom_call_target=target``, in every computation."""
  computations, _ = parse_computations(text)
  return sum(
      i.op == f"custom-call[{target}]"
      for instructions in computations.values()
      for i in instructions
  )


def trip_count(
    computations: dict[str, list[Instruction]], while_line: str
) -> int | None:
  """A while loop's trip count, when its condition is ``i < N`` on a constant N.

  (The form XLA gives the loops here; the counter starts at 0.) None otherwise.
  """
  condition = _CALLED["condition"].search(while_line)
  instructions = computations.get(condition.group(1)) if condition else None
  if not instructions:
    return None
  constants = [
      int(m.group(1))
      for i in instructions
      if i.op == "constant"
      for m in [re.search(r"constant\((\d+)\)", i.line)]
      if m
  ]
  compares = [i for i in instructions if i.op == "compare"]
  if (
      len(constants) == 1
      and len(compares) == 1
      and "direction=LT" in compares[0].line
  ):
    return constants[0]
  return None


@dataclasses.dataclass
class Breakdown:
  """Where the compiler's cycle estimate of a program goes.

  Attributes:
    total_cycles: the entry computation's cycles, while loops expanded.
    rows: ``(instruction, op, cycles, JAX op_name)`` of the entry computation,
      largest first; a while loop is one row (``while x N``: its body's cycles
      times its trip count).
    no_estimate: op kind -> number of instructions without an estimate
      (free ones such as parameters, tuples and bitcasts left out), over
      every computation the entry runs.
    unknown_trip_counts: while loops whose trip count could not be read
      (their body counted once).
  """

  total_cycles: int = 0
  rows: list[tuple[str, str, int, str]] = dataclasses.field(
      default_factory=list
  )
  no_estimate: dict[str, int] = dataclasses.field(default_factory=dict)
  unknown_trip_counts: int = 0


def cycle_breakdown(text: str) -> Breakdown:
  """The ``estimated_cycles`` of an optimised TPU HLO text, by entry instruction."""
  computations, entry = parse_computations(text)
  result = Breakdown()

  def total(name: str, depth: int = 0) -> int:
    """Cycles of one run of computation ``name`` (loops and calls expanded)."""
    cycles = 0
    for instruction in computations.get(name, []):
      cycles += cost_of(instruction, depth)
    return cycles

  def cost_of(instruction: Instruction, depth: int) -> int:
    if depth > 50:  # a malformed text; computations do not recurse
      return 0
    line = instruction.line
    if instruction.op == "while":
      body = _CALLED["body"].search(line)
      trips = trip_count(computations, line)
      if trips is None:
        result.unknown_trip_counts += 1
      per_trip = total(body.group(1), depth + 1) if body else 0
      return per_trip * (1 if trips is None else trips)
    if instruction.op == "call":
      called = _CALLED["to_apply"].search(line)
      return total(called.group(1), depth + 1) if called else 0
    if instruction.op == "conditional":
      branches = _CALLED["branches"].search(line)
      names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
      return max((total(n, depth + 1) for n in names), default=0)
    if instruction.cycles is None:
      if instruction.op not in _FREE:
        result.no_estimate[instruction.op] = (
            result.no_estimate.get(instruction.op, 0) + 1
        )
      return 0
    return instruction.cycles

  for instruction in computations.get(entry, []):
    cycles = cost_of(instruction, 0)
    op = instruction.op
    if op == "while":
      trips = trip_count(computations, instruction.line)
      op = f"while x{trips if trips is not None else '?'}"
    if cycles or op.startswith("while"):
      result.rows.append((instruction.name, op, cycles, instruction.op_name))
    result.total_cycles += cycles
  result.rows.sort(key=lambda row: -row[2])
  return result
