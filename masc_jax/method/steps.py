"""The three stages' train steps and the evaluation step, as pure functions.

Each train step is ``(state, batch, rng[, frozen]) -> (state, metrics)``; the
fixed dependencies (networks, optimiser, augmentation, loss settings, agent
strategy) are keyword arguments bound with ``functools.partial`` before
``jax.jit``. Frozen models (teachers, S's backbone) are passed as arguments,
not bound, so they are inputs of the compiled program and not constants.

Shapes: ``K`` agents, ``B`` batch, ``C`` classes, images ``[..., H, W, Ch]`` uint8.
  stage 1 (experts):     state stacked [K, ...], batch image [K, B, H, W, Ch], label [K, B]
  stage 2 (collective):  state of S,             batch image [B, H, W, Ch],    label [B]
  stage 3 (altruism):    state stacked [K, ...] (heads), batch as stage 1
Metrics are per agent ``[K]`` (stages 1, 3) or scalars (stage 2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from masc_jax.method import agents, losses, routing

PyTree = Any
Augment = Callable[
    [jax.Array, jax.Array], jax.Array
]  # (uint8 images, rng) -> float32


@flax.struct.dataclass
class ModelState:
  """What training changes in one model (or K stacked models)."""

  params: PyTree
  batch_stats: PyTree  # {} for heads, which have no BatchNorm
  opt_state: PyTree

  def variables(self) -> dict[str, PyTree]:
    """The Flax variables for ``apply`` (params and BatchNorm statistics)."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def make_optimizer(optim_config: Any) -> optax.GradientTransformation:
  """SGD with momentum and weight decay added to the gradient (PyTorch's coupled decay).

  Order as in PyTorch: optional global-norm clipping of the raw gradient, then
  ``g + wd * p``, then the momentum trace and the learning rate.
  """
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts.append(optax.add_decayed_weights(optim_config.weight_decay))
  momentum = optim_config.momentum
  if isinstance(momentum, (int, float)) and momentum == 0:
    # No trace at all for plain SGD; a swept (traced) momentum always keeps one,
    # which at 0 computes the same update.
    momentum = None
  parts.append(optax.sgd(optim_config.learning_rate, momentum=momentum))
  return optax.chain(*parts)


def init_model_state(
    module: nn.Module,
    rng: jax.Array,
    sample_input: jax.Array,
    tx: optax.GradientTransformation,
) -> ModelState:
  """Initialise one model's params, BatchNorm statistics and optimiser state."""
  variables = module.init({"params": rng}, sample_input, train=False)
  params = variables["params"]
  return ModelState(
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
  )


def _update(
    state: ModelState,
    grads: PyTree,
    batch_stats: PyTree,
    tx: optax.GradientTransformation,
) -> ModelState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return ModelState(
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
  )


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def expert_step(
    state: ModelState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    network: nn.Module,
    tx: optax.GradientTransformation,
    augment: Augment,
    strategy: str = "auto",
) -> tuple[ModelState, dict[str, jax.Array]]:
  """Stage 1: every agent takes one SGD step of cross-entropy on its own batch.

  Args:
    state: stacked ``[K, ...]`` expert states.
    batch: ``image [K, B, H, W, Ch]`` uint8, ``label [K, B]`` int.
    rng: step key; split into one key per agent (augmentation, dropout).

  Returns:
    new stacked state, metrics ``ce``, ``total``, ``accuracy`` each ``[K]``.
  """

  def one_agent(state_k, images, labels, rng_k):
    aug_rng, dropout_rng = jax.random.split(rng_k)
    x = augment(images, aug_rng)

    def loss_fn(params):
      logits, new_vars = network.apply(
          {"params": params, "batch_stats": state_k.batch_stats},
          x,
          train=True,
          mutable=["batch_stats"],
          rngs={"dropout": dropout_rng},
      )
      return losses.cross_entropy(logits, labels), (
          new_vars["batch_stats"],
          logits,
      )

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state_k.params)
    metrics = {"ce": loss, "total": loss, "accuracy": _accuracy(logits, labels)}
    return _update(state_k, grads, batch_stats, tx), metrics

  num_agents = batch["label"].shape[0]
  rngs = jax.random.split(rng, num_agents)
  return agents.agent_map(one_agent, strategy=strategy)(
      state, batch["image"], batch["label"], rngs
  )


def collective_step(
    state: ModelState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    teachers: dict[str, PyTree] | None,
    *,
    network: nn.Module,
    teacher_network: nn.Module | None,
    tx: optax.GradientTransformation,
    augment: Augment,
    class_owner: jax.Array,
    settings: losses.LossSettings = losses.LossSettings(),
    loss_fn: Callable[
        ..., tuple[jax.Array, losses.Terms]
    ] = losses.collaboration_loss,
    strategy: str = "auto",
    owner_batch_sizes: tuple[int, ...] | None = None,
) -> tuple[ModelState, dict[str, jax.Array]]:
  """Stage 2: the collective S takes one step of its loss (L_CC) on a pooled batch.

  Args:
    state: S's state.
    batch: ``image [B, H, W, Ch]`` uint8, ``label [B]``.
    rng: step key (augmentation, dropout).
    teachers: stacked ``[K, ...]`` frozen expert variables, or ``None`` when the
      loss uses no teachers (then their logits are not computed at all).
    class_owner: ``[C]`` owner agent of each class.
    settings: loss weights and temperatures.
    loss_fn: ``(logits [B, C], labels [B], teacher_logits [K, B, C] | None,
      class_owner, settings) -> (total, terms)``: ``losses.collaboration_loss``
      or another registered CC loss.
    owner_batch_sizes: the batch's owner composition (``batches.OwnerBatches``: the
      first ``owner_batch_sizes[0]`` images are agent 0's, and so on), or ``None`` for
      a batch in any order. With ``kd_teachers=owner`` each expert then runs on
      its own group only (K x the largest group, about B teacher forwards, not
      K x B), and ``loss_fn`` gets the owners' logits as one teacher
      ``[1, B, C]`` that owns every class.

  Returns:
    new state, scalar metrics: the loss's terms and ``accuracy``.
  """
  aug_rng, dropout_rng = jax.random.split(rng)
  x = augment(batch["image"], aug_rng)
  labels = batch["label"]
  teacher_logits = None
  if (
      teachers is not None
      and owner_batch_sizes is not None
      and settings.kd_teachers == "owner"
  ):
    gather, back = owner_batch_index(owner_batch_sizes)
    # Each expert on its own group only: its owner's logits are all the loss reads.
    grouped = agents.agent_map(
        lambda v, xk: teacher_network.apply(v, xk, train=False),
        strategy=strategy,
    )(
        teachers, x[gather]
    )  # [K, m, C]
    owner_logits = grouped.reshape((-1, grouped.shape[-1]))[back]  # [B, C]
    teacher_logits = jax.lax.stop_gradient(owner_logits)[None]  # [1, B, C]
    class_owner = jnp.zeros_like(class_owner)
  elif teachers is not None:
    # Every expert sees the same augmented batch; their logits are constants here.
    teacher_logits = agents.agent_map(
        lambda v: teacher_network.apply(v, x, train=False), strategy=strategy
    )(teachers)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)  # [K, B, C]

  def objective(params):
    logits, new_vars = network.apply(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
    )
    total, terms = loss_fn(
        logits, labels, teacher_logits, class_owner, settings
    )
    return total, (new_vars["batch_stats"], logits, terms)

  (_, (batch_stats, logits, terms)), grads = jax.value_and_grad(
      objective, has_aux=True
  )(state.params)
  return _update(state, grads, batch_stats, tx), {
      **terms,
      "accuracy": _accuracy(logits, labels),
  }


def owner_batch_index(
    owner_batch_sizes: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
  """Static indices between a batch grouped by owner and its per-agent groups.

  Returns:
    ``gather [K, m]`` (m = the largest group): the batch positions of agent k's
    group, a short group padded by repeating its last image (an empty group
    reads position 0; its outputs are never used); and ``back [B]``: where each
    batch position's output sits in the flattened ``[K * m]`` group outputs.
  """
  width = max(max(owner_batch_sizes), 1)
  gather = np.zeros((len(owner_batch_sizes), width), np.int32)
  back = np.zeros(sum(owner_batch_sizes), np.int32)
  start = 0
  for k, size in enumerate(owner_batch_sizes):
    if size:
      gather[k] = start + np.minimum(np.arange(width), size - 1)
      back[start : start + size] = k * width + np.arange(size)
    start += size
  return gather, back


def altruism_step(
    state: ModelState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    frozen: dict[str, PyTree],
    *,
    backbone: nn.Module,
    head: nn.Module,
    teacher_network: nn.Module | None,
    teacher_is_stacked: bool,
    tx: optax.GradientTransformation,
    augment: Augment,
    settings: losses.LossSettings = losses.LossSettings(),
    loss_fn: Callable[
        ..., tuple[jax.Array, losses.Terms]
    ] = losses.altruism_loss,
    strategy: str = "auto",
) -> tuple[ModelState, dict[str, jax.Array]]:
  """Stage 3: every agent's new head on S's frozen backbone takes one step of its loss (L_RA).

  Args:
    state: stacked ``[K, ...]`` head states.
    batch: ``image [K, B, H, W, Ch]``, ``label [K, B]`` (each agent its own data).
    rng: step key.
    frozen: ``backbone`` (S's backbone variables, shared) and ``teacher``
      (stacked expert variables if ``teacher_is_stacked``, else S's variables,
      or absent when the loss uses no teachers).
    settings: loss weights and temperatures.
    loss_fn: ``(logits [B, C], labels [B], teacher_logits [B, C] | None, settings)
      -> (total, terms)``: ``losses.altruism_loss`` or another registered RA loss.

  Returns:
    new stacked head state, metrics: the loss's terms and ``accuracy``, each ``[K]``.
  """
  k, b = batch["label"].shape
  aug_rng, rng = jax.random.split(rng)
  x = augment(batch["image"], aug_rng)  # [K, B, H, W, Ch]
  flat_x = x.reshape((k * b,) + x.shape[2:])
  # One frozen backbone for all agents: a single forward over K*B images.
  features = backbone.apply(frozen["backbone"], flat_x, train=False)
  features = jax.lax.stop_gradient(features).reshape(k, b, -1)  # [K, B, F]
  teacher = frozen.get("teacher")
  if teacher is None:
    teacher_logits = None
  elif teacher_is_stacked:
    teacher_logits = agents.agent_map(
        lambda v, xk: teacher_network.apply(v, xk, train=False),
        strategy=strategy,
    )(teacher, x)
  else:
    teacher_logits = teacher_network.apply(
        teacher, flat_x, train=False
    ).reshape(k, b, -1)

  def one_agent(state_k, features_k, labels_k, teacher_k, rng_k):
    def objective(params):
      logits = head.apply(
          {"params": params}, features_k, train=True, rngs={"dropout": rng_k}
      )
      total, terms = loss_fn(logits, labels_k, teacher_k, settings)
      return total, (logits, terms)

    (_, (logits, terms)), grads = jax.value_and_grad(objective, has_aux=True)(
        state_k.params
    )
    return _update(state_k, grads, {}, tx), {
        **terms,
        "accuracy": _accuracy(logits, labels_k),
    }

  rngs = jax.random.split(rng, k)
  if teacher_logits is None:
    mapped = agents.agent_map(
        lambda s, f, l, r: one_agent(s, f, l, None, r), strategy=strategy
    )
    return mapped(state, features, batch["label"], rngs)
  return agents.agent_map(one_agent, strategy=strategy)(
      state,
      features,
      batch["label"],
      jax.lax.stop_gradient(teacher_logits),
      rngs,
  )


# ----------------------------------------------------------------------------- inference
# Logits of each kind of trained model in inference mode (BatchNorm running
# statistics, no dropout), on normalised images ``x [B, H, W, Ch]``. The stage
# table (``protocol``) composes them into its result rows.


def expert_logits(
    experts: PyTree, x: jax.Array, *, network: nn.Module, strategy: str = "auto"
) -> jax.Array:
  """``[K, B, C]``: every expert A_k alone."""
  return agents.agent_map(
      lambda v: network.apply(v, x, train=False), strategy=strategy
  )(experts)


def collective_logits(
    collective: PyTree, x: jax.Array, *, network: nn.Module
) -> jax.Array:
  """``[B, C]``: the collective S."""
  return network.apply(collective, x, train=False)


def grown_logits(
    heads: PyTree,
    collective: PyTree,
    x: jax.Array,
    *,
    backbone: nn.Module,
    head: nn.Module,
    rule: str | routing.Rule = "energy",
    routing_settings: routing.RoutingSettings = routing.RoutingSettings(),
    strategy: str = "auto",
) -> jax.Array:
  """``[K, B, C]``: every grown agent G_k, answering with its own head or S's by the rule."""
  return grown_outputs(
      heads,
      collective,
      x,
      backbone=backbone,
      head=head,
      rule=rule,
      routing_settings=routing_settings,
      strategy=strategy,
  )[0]


def grown_outputs(
    heads: PyTree,
    collective: PyTree,
    x: jax.Array,
    *,
    backbone: nn.Module,
    head: nn.Module,
    rule: str | routing.Rule = "energy",
    routing_settings: routing.RoutingSettings = routing.RoutingSettings(),
    strategy: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The grown agents' logits ``[K, B, C]`` and what their routing saw.

  Returns:
    ``(logits, routing)`` with ``routing``: ``uses_head [K, B]`` (agent k answered
    with its own head, not S), ``head_pred [K, B]``, ``collective_pred [B]``, and
    the free energies ``head_energy [K, B]``, ``collective_energy [B]`` at the
    routing temperature (``masc_jax.reporting.routing_diagnostics`` summarises them).
  """
  # S is ``head(backbone(x))``: one backbone pass feeds S's head and every agent's.
  backbone_vars = {name: tree["backbone"] for name, tree in collective.items()}
  features = backbone.apply(backbone_vars, x, train=False)
  s_logits = head.apply(
      {"params": collective["params"]["head"]}, features, train=False
  )
  head_logits = agents.agent_map(
      lambda v: head.apply(v, features, train=False), strategy=strategy
  )(heads)
  grown, uses_head = routing.grown_agent_logits(
      s_logits,
      head_logits,
      routing_settings.temperature,
      rule,
      routing_settings.margin,
  )
  energy = functools.partial(
      losses.free_energy, temperature=routing_settings.temperature
  )
  return grown, {
      "uses_head": uses_head,
      "head_pred": jnp.argmax(head_logits, -1),
      "collective_pred": jnp.argmax(s_logits, -1),
      "head_energy": jax.vmap(energy)(head_logits),
      "collective_energy": energy(s_logits),
  }
