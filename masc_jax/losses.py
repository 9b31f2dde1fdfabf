"""MASC's losses as pure, jit-able functions of logits.

Shapes: ``B`` batch, ``C`` classes, ``K`` agents. All inputs are logits
(never probabilities). Every function checks ranks and shapes at its boundary
with chex, so a mismatch fails at trace time with the shapes in the message.

    L_CC = CE(z_S, y) + kd_weight * KD(teacher(x), z_S) + align_weight * ALIGN(z_S)
    L_RA = CE(z_G, y) + kd_weight * KD(z_A, z_G)       + align_weight * ALIGN(z_G)
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

KD_TEACHERS = ("owner", "amalgamate", "all")

Terms = dict[str, jax.Array]


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
  chex.assert_rank(logits, 2)
  chex.assert_rank(labels, 1)
  chex.assert_equal_shape_prefix([logits, labels], 1)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  check_label_range(labels, logits.shape[-1])


def check_label_range(labels: jax.Array, num_classes: int) -> None:
  """ValueError if concrete ``labels`` fall outside ``[0, num_classes)``.

  Under ``jit`` labels are tracers whose values are unknown; the data layer
  validates them on the host before they reach a compiled step.
  """
  if isinstance(labels, jax.core.Tracer):
    return
  values = np.asarray(labels)
  bad = values[(values < 0) | (values >= num_classes)]
  if bad.size:
    raise ValueError(f"labels must lie in [0, {num_classes}), got {bad[:5].tolist()}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer class ids in ``[0, C)``.

  Returns:
    scalar.
  """
  _check_logits_labels(logits, labels)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
  return -jnp.mean(picked)


def distillation(student_logits: jax.Array, teacher_logits: jax.Array,
                 temperature: float = 1.0) -> jax.Array:
  """Knowledge distillation: ``T^2 * mean_b KL(softmax(t/T) || softmax(s/T))``.

  The teacher is not differentiated (``stop_gradient``): teachers are frozen.

  Args:
    student_logits: ``[B, C]``.
    teacher_logits: ``[B, C]``.
    temperature: ``T > 0``.

  Returns:
    scalar.
  """
  chex.assert_rank(student_logits, 2)
  chex.assert_equal_shape([student_logits, teacher_logits])
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature)
  log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  return temperature**2 * jnp.mean(kl)


def free_energy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Free energy ``F(z) = -T * logsumexp(z / T)``: lower means more confident.

  Args:
    logits: ``[B, C]``.
    temperature: ``T > 0``.

  Returns:
    ``[B]``.
  """
  chex.assert_rank(logits, 2)
  return -temperature * jax.nn.logsumexp(logits.astype(jnp.float32) / temperature, axis=-1)


def energy_alignment(logits: jax.Array, anchor: float = -10.0,
                     temperature: float = 1.0) -> jax.Array:
  """``mean_b (F(z_b) - anchor)^2``: pulls every model's energy to one scale.

  Args:
    logits: ``[B, C]``.
    anchor: the target free energy.
    temperature: of the free energy.

  Returns:
    scalar.
  """
  return jnp.mean(jnp.square(free_energy(logits, temperature) - anchor))


def amalgamated_teacher_logits(agent_logits: jax.Array, class_owner: jax.Array) -> jax.Array:
  """Each expert speaks only for its own classes.

  Args:
    agent_logits: ``[K, B, C]`` logits of every agent on the same inputs.
    class_owner: ``[C]`` int, the agent owning each class.

  Returns:
    ``[B, C]`` with entry ``[b, c] = agent_logits[class_owner[c], b, c]``.
  """
  chex.assert_rank(agent_logits, 3)
  chex.assert_rank(class_owner, 1)
  chex.assert_axis_dimension(class_owner, 0, agent_logits.shape[2])
  # A gather, not a one-hot matmul: exact on every backend (no TF32/bf16 passes).
  num_classes = agent_logits.shape[2]
  return agent_logits[class_owner, :, jnp.arange(num_classes)].T


def owner_teacher_logits(agent_logits: jax.Array, labels: jax.Array,
                         class_owner: jax.Array) -> jax.Array:
  """Per sample, the full logits of the agent owning the sample's label.

  Args:
    agent_logits: ``[K, B, C]``.
    labels: ``[B]`` int.
    class_owner: ``[C]`` int.

  Returns:
    ``[B, C]``: ``agent_logits[class_owner[labels[b]], b, :]``.
  """
  chex.assert_rank(agent_logits, 3)
  chex.assert_rank([labels, class_owner], 1)
  chex.assert_axis_dimension(labels, 0, agent_logits.shape[1])
  owner = class_owner[labels]                                   # [B]
  return agent_logits[owner, jnp.arange(agent_logits.shape[1])]


def collaboration_loss(student_logits: jax.Array, labels: jax.Array,
                       teacher_logits: jax.Array, class_owner: jax.Array, *,
                       kd_teachers: str = "owner", kd_weight: float = 1.0,
                       kd_temperature: float = 1.0, align_weight: float = 0.1,
                       energy_anchor: float = -10.0,
                       energy_temperature: float = 1.0) -> tuple[jax.Array, Terms]:
  """Collective collaboration loss L_CC of the collective network S.

  Args:
    student_logits: ``[B, C]`` logits of S.
    labels: ``[B]`` int labels.
    teacher_logits: ``[K, B, C]`` logits of the K frozen experts on the same batch.
    class_owner: ``[C]`` int, owner agent of each class.
    kd_teachers: ``owner`` (the label's owner's full logits), ``amalgamate``
      (entry c from owner(c)) or ``all`` (sum of KD over all K experts).
    kd_weight, kd_temperature: weight and temperature of the KD term.
    align_weight, energy_anchor, energy_temperature: the energy-alignment term.

  Returns:
    ``(loss, terms)`` with scalar terms ``ce``, ``kd``, ``align``, ``total``.
  """
  if kd_teachers not in KD_TEACHERS:
    raise ValueError(f"kd_teachers must be one of {KD_TEACHERS}, got {kd_teachers!r}")
  _check_logits_labels(student_logits, labels)
  chex.assert_rank(teacher_logits, 3)
  chex.assert_equal_shape([teacher_logits[0], student_logits])
  ce = cross_entropy(student_logits, labels)
  if kd_teachers == "owner":
    kd = distillation(student_logits, owner_teacher_logits(teacher_logits, labels, class_owner),
                      kd_temperature)
  elif kd_teachers == "amalgamate":
    kd = distillation(student_logits, amalgamated_teacher_logits(teacher_logits, class_owner),
                      kd_temperature)
  else:
    kd = jnp.sum(jax.vmap(lambda t: distillation(student_logits, t, kd_temperature))(teacher_logits))
  align = energy_alignment(student_logits, energy_anchor, energy_temperature)
  total = ce + kd_weight * kd + align_weight * align
  return total, {"ce": ce, "kd": kd, "align": align, "total": total}


def altruism_loss(student_logits: jax.Array, labels: jax.Array,
                  teacher_logits: jax.Array | None, *, kd_weight: float = 1.0,
                  kd_temperature: float = 1.0, align_weight: float = 0.1,
                  energy_anchor: float = -10.0,
                  energy_temperature: float = 1.0) -> tuple[jax.Array, Terms]:
  """Reciprocal altruism loss L_RA of one grown agent G_k on its own data.

  Args:
    student_logits: ``[B, C]`` logits of G_k (S's backbone + k's new head).
    labels: ``[B]`` int labels (agent k's classes).
    teacher_logits: ``[B, C]`` logits of the KD source (A_k itself or S), or
      ``None`` for no KD term (then ``kd`` is reported as 0).
    kd_weight, kd_temperature, align_weight, energy_anchor, energy_temperature:
      as in ``collaboration_loss``.

  Returns:
    ``(loss, terms)`` with scalar terms ``ce``, ``kd``, ``align``, ``total``.
  """
  _check_logits_labels(student_logits, labels)
  ce = cross_entropy(student_logits, labels)
  if teacher_logits is None:
    kd = jnp.zeros((), jnp.float32)
  else:
    kd = distillation(student_logits, teacher_logits, kd_temperature)
  align = energy_alignment(student_logits, energy_anchor, energy_temperature)
  total = ce + kd_weight * kd + align_weight * align
  return total, {"ce": ce, "kd": kd, "align": align, "total": total}
