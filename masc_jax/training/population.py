"""Populations: several societies trained together, one per seed and sweep setting.

``--config.seeds=0,1,2,3,4`` trains P societies, each with its own
initialisation and data order; ``--config.sweep='loss.align_weight=0.05,0.1;
optim.learning_rate=0.01,0.05'`` crosses a grid of numeric settings with the
seeds. Every run carries a leading *member* axis ``[P, ...]`` on every model,
batch and key: a single run is a population of one (P = 1). The swept values
are per-member arrays (``hparams``), so one compile serves the whole grid.

How the member axis is mapped is decided here, behind one interface
(``MemberAxis.compile_step``, ``MemberAxis.init``): one program for all members
(``vmap``, ``unroll``: a ``WholeStep``), or one member's compiled program run
for each member in turn (``loop``, ``threads``: ``MembersInTurn``). The training
loop calls both the same way.

Member p computes what a single run of ``config_lib.member_config(config, members[p])``
computes (the members and their configs are read from the config by
``config_lib``); run in turn, exactly (the same program). A population of one
runs in turn by default: its one member's own program, which is the single run.

    members = config_lib.members_of(config)        # grid x seeds, in that order
    axis = MemberAxis(members, strategy="vmap")
    step = axis.map(one_member_step)    # [P, ...] state, batch, keys, hparams
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from masc_jax import config_lib
from masc_jax.method import agents
from masc_jax.parallel import sharding

PyTree = Any


def threads_possible() -> bool:
  """Whether members may run side by side on host threads: one CPU device, one process.

  With several devices or processes a member's program holds collectives, and
  programs started from several threads could enter them in a different order
  on different devices (or processes): a deadlock.
  """
  return (
      jax.default_backend() == "cpu"
      and jax.local_device_count() == 1
      and jax.process_count() == 1
  )


def resolve_member_map(
    strategy: str,
    backend: str | None = None,
    threads_ok: bool | None = None,
    num_members: int | None = None,
) -> str:
  """``auto`` -> ``loop`` for one member; else ``vmap`` on TPU/GPU, on CPU ``threads``
  where possible, else ``loop``.

  ``vmap``: one batched program (the member axis can be split over devices).
  ``unroll``: P copies of a member's program in one. ``loop``: a member's
  compiled program run for each member in turn (members share the devices).
  ``threads``: the same programs, the members' steps run side by side on host
  threads (one CPU device in one process: ``threads_possible``). BUILD_NOTES.md
  "Design: populations" has the measurements.

  ``num_members``: the population's size (None: several). One member runs its
  own program (``loop``) on every backend: that is the single run's program,
  and a batched program of one member would only round differently.
  """
  if strategy not in config_lib.MEMBER_MAP_STRATEGIES:
    raise ValueError(
        f"member_map must be one of {config_lib.MEMBER_MAP_STRATEGIES}, got {strategy!r}"
    )
  threads_ok = threads_possible() if threads_ok is None else threads_ok
  if strategy == config_lib.THREADS and not threads_ok:
    raise config_lib.PopulationError(
        f"member_map={config_lib.THREADS} runs members side by side on host threads, which needs one CPU "
        f"device in one process (here: {jax.local_device_count()} {jax.default_backend()} "
        f"device(s), {jax.process_count()} process(es)); use member_map={config_lib.LOOP}"
    )
  if strategy != "auto":
    return strategy
  if num_members == 1:
    return config_lib.LOOP
  # On TPU/GPU one batched program keeps the device full. On XLA:CPU a vmapped
  # convolution with per-member kernels becomes a slow grouped convolution and P
  # unrolled copies multiply the compile time; measured on digits, 3 seeds
  # (BUILD_NOTES.md): members in turn are the fastest there, and side by side on
  # two threads faster still (one member's program keeps about 1.5 of 2 cores busy).
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return "vmap"
  return config_lib.THREADS if threads_ok else config_lib.LOOP


class MemberAxis:
  """The leading member axis ``[P, ...]`` of every run (P = 1 for a single seed).

  ``keys``, ``fold_in``, ``batches`` and ``hparams`` build the per-member
  inputs; ``map(fn)`` maps ``fn`` over the member axis inside one program;
  ``compile_step`` and ``init`` decide how a stage's step and the initial
  state are run over the members (one program, or each member's own program
  in turn) and hide which.
  """

  def __init__(
      self, members: Sequence[config_lib.Member], strategy: str = "auto"
  ):
    if not members:
      raise ValueError("a population needs at least one member")
    self.members = tuple(members)
    self.strategy = resolve_member_map(strategy, num_members=len(self.members))
    self.swept = tuple(field for field, _ in self.members[0].settings)
    self._in_turn = self.strategy in config_lib.IN_TURN

  @property
  def size(self) -> int:
    return len(self.members)

  @property
  def mesh_members(self) -> int:
    """How many members the mesh's member axis holds side by side.

    1 when members run in turn: each member's program uses every device.
    """
    return 1 if self._in_turn else self.size

  def hparams(self) -> dict[str, np.ndarray]:
    """Swept field -> ``[P]`` float32 values (``{}`` without a sweep)."""
    return {
        field: np.asarray(
            [dict(m.settings)[field] for m in self.members], np.float32
        )
        for field in self.swept
    }

  def distinct_settings(self) -> list[dict[str, float]]:
    """Each swept setting once, in member order."""
    return [dict(s) for s in dict.fromkeys(m.settings for m in self.members)]

  def batches(self, make: Callable[[config_lib.Member], Any]) -> StackedBatches:
    """``make(member)`` (a batch order, ``batches.AgentBatches`` or ``PooledBatches``) per
    member, as one order whose ``indices(step)`` stacks the members' ``[P, ...]``.
    """
    return StackedBatches([make(m) for m in self.members])

  def fold_in(self, keys: jax.Array, data: int) -> jax.Array:
    """``jax.random.fold_in`` of every member's key (``[P]`` keys)."""
    return _fold_in_members(keys, data)

  def keys(self, make: Callable[[int], jax.Array]) -> jax.Array:
    """``make(seed)`` per member, stacked: ``[P, ...]`` keys."""
    return jax.numpy.stack([make(m.seed) for m in self.members])

  def map(
      self,
      fn: Callable[..., Any],
      in_axes: int | None | Sequence[int | None] = 0,
  ) -> Callable[..., Any]:
    """``fn`` over the member axis inside one program (``in_axes`` as in ``jax.vmap``).

    Members in turn (``loop``, ``threads``) map as ``unroll`` here: their
    stage steps run through ``compile_step``'s ``MembersInTurn`` instead.
    """
    strategy = "unroll" if self._in_turn else self.strategy
    return agents.agent_map(fn, in_axes=in_axes, strategy=strategy)

  def compile_step(
      self,
      member_step: Callable,
      constrain: Callable[[Callable, bool], Callable],
      example: tuple,
      frozen: PyTree,
      hparams: PyTree,
  ) -> MembersInTurn | WholeStep:
    """A stage's step over the members, compiled ahead of time for ``example``.

    Args:
      member_step: ``(state, batch, rng, frozen, settings) -> (state, metrics)`` of
        one member.
      constrain: ``constrain(step_fn, member_axis)``: ``step_fn`` with its outputs
        placed on the mesh, for states with (True) or without (False) the member
        axis.
      example: ``(state, batch, rng)``, stacked ``[P, ...]``: the shapes to compile for.
      frozen, hparams: stacked ``[P, ...]`` frozen models and swept settings.

    Returns:
      A step with ``step_members``, ``unstack``, ``stack`` and ``ready`` (see
      ``MembersInTurn``). In turn: each member's own program (one compile), its
      state donated. Otherwise one program for all members (``map``), the
      stacked state donated.
    """
    jitted = self.step_program(member_step, constrain)
    if self._in_turn:
      return MembersInTurn(
          jitted,
          example,
          frozen,
          hparams,
          self.size,
          threads=self.strategy == config_lib.THREADS,
      )
    compiled = jitted.lower(
        *self.program_inputs(example, frozen, hparams)
    ).compile()
    one_at_a_time = (
        sharding.one_program_at_a_time()
    )  # several CPU devices: see there

    def step(model_state, batch, rng, frozen):
      out = compiled(model_state, batch, rng, frozen, hparams)
      return jax.block_until_ready(out) if one_at_a_time else out

    return WholeStep(step)

  @property
  def in_turn(self) -> bool:
    """Whether each member runs its own program in turn (``loop``, ``threads``)."""
    return self._in_turn

  def step_program(
      self,
      member_step: Callable,
      constrain: Callable[[Callable, bool], Callable],
  ) -> Callable:
    """The jitted program ``compile_step`` compiles (arguments as there), not compiled.

    In turn: one member's step; otherwise every member's in one program. The
    trained state is donated.
    """
    if self._in_turn:
      return jax.jit(constrain(member_step, False), donate_argnums=(0,))
    return jax.jit(constrain(self.map(member_step), True), donate_argnums=(0,))

  def program_inputs(
      self, example: tuple, frozen: PyTree, hparams: PyTree
  ) -> tuple:
    """The inputs ``compile_step`` lowers ``step_program`` with.

    ``example``, ``frozen``, ``hparams`` as in ``compile_step``: arrays, or
    ``jax.ShapeDtypeStruct``s with the shapes and shardings of the arrays (a
    compile for devices that hold no data). In turn: member 0's slices, with
    the shardings the split gives them; otherwise the stacked inputs as they are.
    """
    args = (*example, frozen, hparams)
    if not self._in_turn:
      return args
    split = _splitter(self.size)
    leaves = jax.tree.leaves(args)
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
      return tuple(split(args)[0])
    shardings = split.lower(args).compile().output_shardings[0]
    return tuple(
        jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(split, args)[0],
            shardings,
        )
    )

  def init(
      self,
      init_member: Callable[[jax.Array, dict], PyTree],
      keys: jax.Array,
      shardings: PyTree,
  ) -> PyTree:
    """Every member's ``init_member(key, settings)``, stacked ``[P, ...]`` with ``shardings``.

    In turn: one member's init compiled once and called per member, not P
    copies of it in one program.
    """
    hparams = self.hparams()
    if self._in_turn:
      return init_in_turn(init_member, keys, hparams, shardings)
    return jax.jit(
        lambda: self.map(init_member)(keys, hparams), out_shardings=shardings
    )()

  def nonfinite_members(self, finite: np.ndarray) -> list[config_lib.Member]:
    """The members whose entries of ``finite`` (``[P, ...]`` bool) are not all true."""
    flat = np.asarray(finite).reshape(self.size, -1).all(axis=1)
    return [m for m, ok in zip(self.members, flat) if not ok]


_fold_in_members = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


class StackedBatches:
  """The members' batch orders as one: ``indices(step)`` is ``[P, ...]``."""

  def __init__(self, orders: Sequence[Any]):
    self.orders = tuple(orders)
    self.steps_per_epoch = self.orders[0].steps_per_epoch
    self.batch_size = self.orders[0].batch_size

  def indices(self, step: int) -> np.ndarray:
    return np.stack([order.indices(step) for order in self.orders])


# ----------------------------------------------------------------------------- members in turn
# ``loop`` and ``threads``: one member's compiled program, run for each member.


class MembersInTurn:
  """A stage step that runs one member's compiled step for each member (``loop``, ``threads``).

  One compile (a member's program) serves every member, and each member runs
  exactly the program a single run would (bit-identical results): on XLA:CPU
  this beats a batched program, whose per-member convolutions become slow
  grouped ones. (Slicing member ``p`` inside the member's program instead saves
  no time and changes its rounding.)

  Two ways to call it:

    step(state, batch, rng, frozen) -> (state, metrics)      # stacked [P, ...]
    step.step_members(states, batch, rng, frozen) -> (states, metrics)   # lists of P

  The training loop keeps the members' states apart for a whole stage
  (``unstack`` once, ``stack`` for a checkpoint and at the end), so a step
  splits only its batch and keys. With ``threads`` the members' steps run side
  by side on P host threads: one member's program keeps about 1.5 of the two
  cores of our CPU busy, and programs dispatched from one thread ran one after
  another (1.5 cores) where the same programs called from two threads used 1.97
  (docs/performance.md, "Populations on a CPU"). Every member still runs its own
  program on its own inputs: the results are the same bits either way.
  """

  def __init__(
      self,
      jitted_member_step: Callable,
      example: tuple,
      frozen: PyTree,
      hparams: PyTree,
      size: int,
      threads: bool = False,
  ):
    """
    Args:
      jitted_member_step: ``(state, batch, rng, frozen, settings) -> (state, metrics)`` of
        one member, jitted (its state donated).
      example: ``(state, batch, rng)``, stacked ``[P, ...]``: the shapes to compile for.
      frozen, hparams: stacked ``[P, ...]`` frozen models and swept settings.
      size: P.
      threads: run the members' steps side by side on host threads (``threads_possible``).
    """
    self.size = size
    self._split = _splitter(size)
    self._frozen_of, self._hparams_of = self._split(frozen), self._split(
        hparams
    )
    self._compiled = jitted_member_step.lower(
        *self._split(example)[0], self._frozen_of[0], self._hparams_of[0]
    ).compile()
    self._one_at_a_time = (
        sharding.one_program_at_a_time()
    )  # several CPU devices: see there
    # threads: one worker per member, so a member's steps run in order on its own thread
    # while the loop goes on to the next step (at most ``_AHEAD`` steps ahead).
    self._workers = (
        [
            concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"member{p}"
            )
            for p in range(size)
        ]
        if threads
        else None
    )
    self._in_flight: collections.deque = collections.deque()

  def unstack(self, stacked_state: PyTree) -> list[PyTree]:
    """``[P, ...]`` -> P member states (one dispatch)."""
    return self._split(stacked_state)

  def stack(self, member_states: Sequence[PyTree]) -> PyTree:
    """P member states -> ``[P, ...]`` (one dispatch; the member states stay valid)."""
    return _stack([_state_of(s) for s in member_states])

  def ready(self, member_states: Sequence[Any]) -> list[PyTree]:
    """The member states once computed (waits for running steps; for timing)."""
    return jax.block_until_ready([_state_of(s) for s in member_states])

  def _member_step(self, p: int, state: PyTree, batch: PyTree, rng: jax.Array):
    state = _state_of(
        state
    )  # a Pending: the member's previous step, on this thread
    out = self._compiled(
        state, batch, rng, self._frozen_of[p], self._hparams_of[p]
    )
    # On a member's own thread, wait here: its Pending is then done only when the step
    # is, so the run-ahead bound in ``step_members`` really bounds the work in flight.
    return (
        jax.block_until_ready(out)
        if self._one_at_a_time or self._workers
        else out
    )

  def step_members(
      self,
      member_states: Sequence[PyTree],
      batch: PyTree,
      rng: jax.Array,
      unused_frozen: PyTree = None,
  ) -> tuple[list[Any], list[Any]]:
    """One step of every member: P states in, P states and P metrics out.

    With threads the members' states and metrics come back as ``Pending``
    (the step runs on the member's thread); ``stack`` and
    ``stack_member_metrics`` wait for them, and so does a later step's call
    when the loop is ``_AHEAD`` steps ahead of the slowest member.
    """
    inputs = self._split((batch, rng))  # P x (batch, rng)
    if not self._workers:
      outs = [
          self._member_step(p, member_states[p], *inputs[p])
          for p in range(self.size)
      ]
      return [out[0] for out in outs], [out[1] for out in outs]
    pending = [
        Pending(
            self._workers[p].submit(
                self._member_step, p, member_states[p], *inputs[p]
            )
        )
        for p in range(self.size)
    ]
    self._in_flight.append(pending)
    while len(self._in_flight) > _AHEAD:
      for old in self._in_flight.popleft():
        old.future.result()  # raises a member's error here, at the latest
    return pending, pending

  def __call__(
      self,
      model_state: PyTree,
      batch: PyTree,
      rng: jax.Array,
      unused_frozen: PyTree = None,
  ) -> tuple[PyTree, dict]:
    states, metrics = self.step_members(self.unstack(model_state), batch, rng)
    return self.stack(states), _stack([_metrics_of(m) for m in metrics])


@functools.lru_cache(maxsize=None)
def _splitter(size: int) -> Callable[[PyTree], list[PyTree]]:
  """``[P, ...]`` -> P member trees, one dispatch; one jit per P, so that every stage
  (and every run in a process) reuses its compiled programs for trees it has seen.
  """
  return jax.jit(
      lambda tree: [jax.tree.map(lambda x: x[p], tree) for p in range(size)]
  )


_AHEAD = 2  # steps the loop may dispatch ahead of a member's thread (bounds batches held)


@dataclasses.dataclass(frozen=True)
class Pending:
  """A member's step running on its thread (``MembersInTurn`` with threads)."""

  future: concurrent.futures.Future


def _state_of(step: PyTree | Pending) -> PyTree:
  """A member's state; for a ``Pending`` step, once its thread has run it."""
  return step.future.result()[0] if isinstance(step, Pending) else step


def _metrics_of(step: dict | Pending) -> dict:
  """A member's step metrics; for a ``Pending`` step, once its thread has run it."""
  return step.future.result()[1] if isinstance(step, Pending) else step


class WholeStep:
  """A stage step with ``MembersInTurn``'s interface: one program for every member (``vmap``,
  ``unroll``), its state one stacked pytree (``unstack`` and ``stack`` return it as it is).
  """

  def __init__(self, step: Callable):
    self._step = step

  def __call__(self, model_state, batch, rng, frozen):
    return self._step(model_state, batch, rng, frozen)

  step_members = __call__

  @staticmethod
  def unstack(state: PyTree) -> PyTree:
    return state

  @staticmethod
  def stack(state: PyTree) -> PyTree:
    return state

  @staticmethod
  def ready(state: PyTree) -> PyTree:
    return jax.block_until_ready(state)


def stack_member_metrics(metrics: dict | Sequence[dict | Pending]) -> dict:
  """A step's metrics as one dict of ``[P]`` values.

  Members in turn give P dicts (``step_members``): stacked into host arrays. A
  ``WholeStep``'s dict of ``[P]`` arrays is returned as it is.
  """
  if isinstance(metrics, dict):
    return metrics
  dicts = jax.device_get([_metrics_of(m) for m in metrics])
  return {
      term: np.stack([np.asarray(m[term]) for m in dicts]) for term in dicts[0]
  }


def init_in_turn(
    init_member: Callable[[jax.Array, dict], PyTree],
    keys: jax.Array,
    hparams: Mapping[str, np.ndarray],
    shardings: PyTree,
) -> PyTree:
  """``init_member(key, settings)`` compiled once, called per member, stacked with ``shardings``."""
  one = jax.jit(init_member)
  states = [
      one(keys[p], {field: values[p] for field, values in hparams.items()})
      for p in range(len(keys))
  ]
  return jax.jit(
      lambda trees: jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees),
      out_shardings=shardings,
  )(states)


_stack = jax.jit(
    lambda trees: jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)
)
