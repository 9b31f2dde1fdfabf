"""Energy-based choice among models: per input, the most confident one answers.

A model is more confident on an input when its free energy
``F(z) = -T logsumexp(z / T)`` is lower, i.e. its logsumexp is higher. A grown
agent answers with ``select_by_energy([S_logits, G_k_logits])`` (ties go to
S, index 0); the society answers with the same rule across agents.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from masc_jax import losses


def select_by_energy(logits_stack: jax.Array,
                     temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Per sample, the logits of the model with the lowest free energy.

  Args:
    logits_stack: ``[M, B, C]`` logits of M models on the same B inputs.
    temperature: of the free energy.

  Returns:
    ``(logits [B, C], choice [B] int32)``; ties go to the lowest model index.
  """
  chex.assert_rank(logits_stack, 3)
  energies = jax.vmap(lambda z: losses.free_energy(z, temperature))(logits_stack)  # [M, B]
  choice = jnp.argmin(energies, axis=0).astype(jnp.int32)   # argmin: first minimum wins ties
  chosen = jnp.take_along_axis(logits_stack, choice[None, :, None], axis=0)[0]
  return chosen, choice


def grown_agent_logits(collective_logits: jax.Array, head_logits: jax.Array,
                       temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Every grown agent's answer: its own head or S's head, by energy.

  Args:
    collective_logits: ``[B, C]`` logits of the collective S.
    head_logits: ``[K, B, C]`` logits of the K grown heads G_k.

  Returns:
    ``(logits [K, B, C], chose_own_head [K, B] bool)``.
  """
  chex.assert_rank(collective_logits, 2)
  chex.assert_rank(head_logits, 3)
  chex.assert_equal_shape([collective_logits, head_logits[0]])

  def one_agent(own):
    chosen, choice = select_by_energy(jnp.stack([collective_logits, own]), temperature)
    return chosen, choice == 1

  return jax.vmap(one_agent)(head_logits)
