"""Routing: per input, which of several models answers, by a rule picked by name.

Two choices in MASC use one rule (``config.routing``):
  * a grown agent chooses between S's head and its own head: models ``[S, G_k]``,
    so index 0 is S and ties go to S;
  * the society chooses, per input, which agent answers: models in agent order.

A rule maps ``logits_stack [M, B, C]`` to ``choice [B]`` (int32, the model
index per input); every rule sends ties to the lowest index. Registered rules:

  ``energy``         the lowest free energy ``F(z) = -T logsumexp(z / T)`` (the
                     docs/method.md's rule, from the authors' code; the default).
  ``msp``            the highest maximum softmax probability (the classic
                     confidence score of Hendrycks & Gimpel, 2017).
  ``energy_margin``  the lowest-index model whose free energy is within
                     ``margin`` of the lowest: with S first, an agent's own head
                     answers only if it is more confident than S by more than
                     the margin. ``margin = 0`` is ``energy``.

Research code adds a rule with ``register_rule`` (README "Extend it").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from masc_jax.method import losses


@dataclasses.dataclass(frozen=True)
class RoutingSettings:
  """What a rule may read besides the logits: the free-energy temperature and a margin."""

  temperature: float = 1.0
  margin: float = 0.0


Rule = Callable[
    [jax.Array, RoutingSettings], jax.Array
]  # [M, B, C] -> [B] int32

RULES: dict[str, Rule] = {}


def register_rule(
    name: str, *, replace: bool = False
) -> Callable[[Rule], Rule]:
  """Decorator: make ``fn(logits_stack [M, B, C], settings) -> choice [B]`` a rule named ``name``."""

  def decorate(fn: Rule) -> Rule:
    if name in RULES and not replace:
      raise ValueError(
          f"a routing rule named {name!r} is already registered "
          "(pass replace=True to override it)"
      )
    RULES[name] = fn
    return fn

  return decorate


def lookup(name: str) -> Rule:
  if name not in RULES:
    raise ValueError(
        f"no routing rule named {name!r} is registered; registered: {', '.join(RULES)}"
    )
  return RULES[name]


def _energies(logits_stack: jax.Array, temperature: float) -> jax.Array:
  return jax.vmap(lambda z: losses.free_energy(z, temperature))(
      logits_stack
  )  # [M, B]


@register_rule("energy")
def lowest_energy(
    logits_stack: jax.Array, settings: RoutingSettings
) -> jax.Array:
  # argmin returns the first minimum: ties go to the lowest index.
  return jnp.argmin(
      _energies(logits_stack, settings.temperature), axis=0
  ).astype(jnp.int32)


@register_rule("msp")
def highest_softmax_probability(
    logits_stack: jax.Array, settings: RoutingSettings
) -> jax.Array:
  probs = jax.nn.softmax(
      logits_stack.astype(jnp.float32) / settings.temperature, axis=-1
  )
  return jnp.argmax(jnp.max(probs, axis=-1), axis=0).astype(jnp.int32)


@register_rule("energy_margin")
def energy_within_margin(
    logits_stack: jax.Array, settings: RoutingSettings
) -> jax.Array:
  energies = _energies(logits_stack, settings.temperature)  # [M, B]
  close_enough = energies <= jnp.min(energies, axis=0) + settings.margin
  return jnp.argmax(close_enough, axis=0).astype(jnp.int32)  # the first True


def route(
    logits_stack: jax.Array,
    rule: str | Rule = "energy",
    settings: RoutingSettings = RoutingSettings(),
) -> tuple[jax.Array, jax.Array]:
  """Per sample, the logits of the model the rule picks.

  Args:
    logits_stack: ``[M, B, C]`` logits of M models on the same B inputs.
    rule: a registered rule's name, or a rule function.
    settings: temperature and margin for the rule.

  Returns:
    ``(logits [B, C], choice [B] int32)``.
  """
  chex.assert_rank(logits_stack, 3)
  choice = (lookup(rule) if isinstance(rule, str) else rule)(
      logits_stack, settings
  )
  chosen = jnp.take_along_axis(logits_stack, choice[None, :, None], axis=0)[0]
  return chosen, choice


def select_by_energy(
    logits_stack: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """Per sample, the logits of the model with the lowest free energy (the ``energy`` rule).

  Args:
    logits_stack: ``[M, B, C]`` logits of M models on the same B inputs.
    temperature: of the free energy.

  Returns:
    ``(logits [B, C], choice [B] int32)``; ties go to the lowest model index.
  """
  return route(logits_stack, "energy", RoutingSettings(temperature=temperature))


def grown_agent_logits(
    collective_logits: jax.Array,
    head_logits: jax.Array,
    temperature: float = 1.0,
    rule: str | Rule = "energy",
    margin: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Every grown agent's answer: its own head or S's head, by the rule.

  Args:
    collective_logits: ``[B, C]`` logits of the collective S.
    head_logits: ``[K, B, C]`` logits of the K grown heads G_k.
    temperature, rule, margin: the routing rule and its settings.

  Returns:
    ``(logits [K, B, C], chose_own_head [K, B] bool)``.
  """
  chex.assert_rank(collective_logits, 2)
  chex.assert_rank(head_logits, 3)
  chex.assert_equal_shape([collective_logits, head_logits[0]])
  settings = RoutingSettings(temperature=temperature, margin=margin)

  def one_agent(own):
    chosen, choice = route(jnp.stack([collective_logits, own]), rule, settings)
    return chosen, choice == 1

  return jax.vmap(one_agent)(head_logits)


def settings_from_config(config: Any) -> tuple[str, RoutingSettings]:
  """The run's rule name and settings (temperature: the loss's energy temperature)."""
  return config.routing, RoutingSettings(
      temperature=config.loss.energy_temperature, margin=config.routing_margin
  )
