"""MASC's losses as pure, jit-able functions of logits, and the losses registered by name.

Shapes: ``B`` batch, ``C`` classes, ``K`` agents. All inputs are logits
(never probabilities). Every function checks ranks and shapes at its boundary
with chex, so a mismatch fails at trace time with the shapes in the message.

    L_CC = CE(z_S, y) + kd_weight * KD(teacher(x), z_S)  + align_weight * ALIGN(z_S)
    L_RA = CE(z_G, y) + ra_kd_weight * KD(z_A, z_G)      + align_weight * ALIGN(z_G)

Every weight and temperature travels as one frozen ``LossSettings``. The loss a
stage trains with is picked by name (``config.loss.cc``, ``config.loss.ra``)
from ``CC_LOSSES`` / ``RA_LOSSES``; research code adds its own with
``register_cc_loss`` / ``register_ra_loss`` (README "Extend it").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

# The teacher modes, side by side. Whose logits S distils in L_CC:
KD_TEACHERS = ("owner", "amalgamate", "all")
# Whose logits a grown head distils in L_RA: its former expert self A_k, S, or none.
RA_TEACHERS = ("self", "collective", "none")

Terms = dict[str, jax.Array]


@flax.struct.dataclass
class LossSettings:
  """Every weight, temperature and teacher mode of L_CC and L_RA, as one value.

  A pytree: the numbers are leaves (so a later version can make them traced,
  per-member arrays), the teacher modes are static. Defaults are docs/method.md's.
  """

  kd_teachers: str = flax.struct.field(pytree_node=False, default="owner")
  ra_teacher: str = flax.struct.field(pytree_node=False, default="self")
  kd_weight: Any = 1.0  # L_CC's KD weight
  ra_kd_weight: Any = 1.0  # L_RA's KD weight
  kd_temperature: Any = 1.0
  align_weight: Any = 0.1
  energy_anchor: Any = -10.0
  energy_temperature: Any = 1.0

  @classmethod
  def from_config(cls, loss_config: Any) -> "LossSettings":
    """From the config's ``loss`` section (the loss names ``cc``/``ra`` are not settings)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: loss_config[name] for name in names})


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
    raise ValueError(
        f"labels must lie in [0, {num_classes}), got {bad[:5].tolist()}"
    )


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
  picked = jnp.take_along_axis(
      log_probs, labels[:, None].astype(jnp.int32), axis=1
  )[:, 0]
  return -jnp.mean(picked)


def distillation(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
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
  log_p_student = jax.nn.log_softmax(
      student_logits.astype(jnp.float32) / temperature
  )
  kl = jnp.sum(
      jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1
  )
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
  return -temperature * jax.nn.logsumexp(
      logits.astype(jnp.float32) / temperature, axis=-1
  )


def energy_alignment(
    logits: jax.Array, anchor: float = -10.0, temperature: float = 1.0
) -> jax.Array:
  """``mean_b (F(z_b) - anchor)^2``: pulls every model's energy to one scale.

  Args:
    logits: ``[B, C]``.
    anchor: the target free energy.
    temperature: of the free energy.

  Returns:
    scalar.
  """
  return jnp.mean(jnp.square(free_energy(logits, temperature) - anchor))


def amalgamated_teacher_logits(
    agent_logits: jax.Array, class_owner: jax.Array
) -> jax.Array:
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


def owner_teacher_logits(
    agent_logits: jax.Array, labels: jax.Array, class_owner: jax.Array
) -> jax.Array:
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
  owner = class_owner[labels]  # [B]
  return agent_logits[owner, jnp.arange(agent_logits.shape[1])]


def _kd_from_teachers(
    student_logits: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array,
    class_owner: jax.Array,
    settings: LossSettings,
) -> jax.Array:
  """L_CC's KD term for the teacher mode ``settings.kd_teachers``."""
  mode, temperature = settings.kd_teachers, settings.kd_temperature
  if mode == "owner":
    return distillation(
        student_logits,
        owner_teacher_logits(teacher_logits, labels, class_owner),
        temperature,
    )
  if mode == "amalgamate":
    return distillation(
        student_logits,
        amalgamated_teacher_logits(teacher_logits, class_owner),
        temperature,
    )
  return jnp.sum(
      jax.vmap(lambda t: distillation(student_logits, t, temperature))(
          teacher_logits
      )
  )


def collaboration_loss(
    student_logits: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array | None,
    class_owner: jax.Array,
    settings: LossSettings = LossSettings(),
) -> tuple[jax.Array, Terms]:
  """Collective collaboration loss L_CC of the collective network S.

  Args:
    student_logits: ``[B, C]`` logits of S.
    labels: ``[B]`` int labels.
    teacher_logits: ``[K, B, C]`` logits of the K frozen experts on the same
      batch, or ``None`` for no KD term (then ``kd`` is reported as 0).
    class_owner: ``[C]`` int, owner agent of each class.
    settings: ``kd_teachers`` (``owner``: the label's owner's full logits;
      ``amalgamate``: entry c from owner(c); ``all``: sum of KD over all K
      experts), ``kd_weight``, ``kd_temperature`` and the energy-alignment terms.

  Returns:
    ``(loss, terms)`` with scalar terms ``ce``, ``kd``, ``align``, ``total``.
  """
  if settings.kd_teachers not in KD_TEACHERS:
    raise ValueError(
        f"kd_teachers must be one of {KD_TEACHERS}, got {settings.kd_teachers!r}"
    )
  _check_logits_labels(student_logits, labels)
  ce = cross_entropy(student_logits, labels)
  if teacher_logits is None:
    kd = jnp.zeros((), jnp.float32)
  else:
    chex.assert_rank(teacher_logits, 3)
    chex.assert_equal_shape([teacher_logits[0], student_logits])
    kd = _kd_from_teachers(
        student_logits, labels, teacher_logits, class_owner, settings
    )
  align = energy_alignment(
      student_logits, settings.energy_anchor, settings.energy_temperature
  )
  total = ce + settings.kd_weight * kd + settings.align_weight * align
  return total, {"ce": ce, "kd": kd, "align": align, "total": total}


def altruism_loss(
    student_logits: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array | None,
    settings: LossSettings = LossSettings(),
) -> tuple[jax.Array, Terms]:
  """Reciprocal altruism loss L_RA of one grown agent G_k on its own data.

  Args:
    student_logits: ``[B, C]`` logits of G_k (S's backbone + k's new head).
    labels: ``[B]`` int labels (agent k's classes).
    teacher_logits: ``[B, C]`` logits of the KD source (A_k itself or S), or
      ``None`` for no KD term (then ``kd`` is reported as 0).
    settings: ``ra_kd_weight``, ``kd_temperature`` and the energy-alignment terms.

  Returns:
    ``(loss, terms)`` with scalar terms ``ce``, ``kd``, ``align``, ``total``.
  """
  _check_logits_labels(student_logits, labels)
  ce = cross_entropy(student_logits, labels)
  if teacher_logits is None:
    kd = jnp.zeros((), jnp.float32)
  else:
    kd = distillation(student_logits, teacher_logits, settings.kd_temperature)
  align = energy_alignment(
      student_logits, settings.energy_anchor, settings.energy_temperature
  )
  total = ce + settings.ra_kd_weight * kd + settings.align_weight * align
  return total, {"ce": ce, "kd": kd, "align": align, "total": total}


def cross_entropy_only(
    student_logits: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array | None,
    *_: Any,
) -> tuple[jax.Array, Terms]:
  """CE alone, for any stage: the ablation's collective ("S trained with CE alone")."""
  del teacher_logits
  ce = cross_entropy(student_logits, labels)
  return ce, {"ce": ce, "total": ce}


# ----------------------------------------------------------------------------- registries


@dataclasses.dataclass(frozen=True)
class RegisteredLoss:
  """A loss a stage can be trained with, found by name.

  ``fn`` is ``(student_logits [B, C], labels [B], teacher_logits, class_owner [C],
  settings) -> (total, terms)`` for L_CC (teachers ``[K, B, C]``) and
  ``(student_logits, labels, teacher_logits [B, C], settings) -> (total, terms)``
  for L_RA; ``teacher_logits`` is ``None`` when ``uses_teachers(settings)`` is
  false, and the step then does not compute them at all.
  """

  name: str
  fn: Callable[..., tuple[jax.Array, Terms]]
  uses_teachers: Callable[[LossSettings], bool]


CC_LOSSES: dict[str, RegisteredLoss] = {}
RA_LOSSES: dict[str, RegisteredLoss] = {}


def _registrar(table: dict[str, RegisteredLoss], kind: str):
  def register(
      name: str,
      *,
      uses_teachers: Callable[[LossSettings], bool] = lambda s: False,
      replace: bool = False,
  ):
    def decorate(fn):
      if name in table and not replace:
        raise ValueError(
            f"a {kind} loss named {name!r} is already registered "
            "(pass replace=True to override it)"
        )
      table[name] = RegisteredLoss(name, fn, uses_teachers)
      return fn

    return decorate

  return register


register_cc_loss = _registrar(CC_LOSSES, "CC")
register_ra_loss = _registrar(RA_LOSSES, "RA")


def lookup(table: dict[str, RegisteredLoss], name: str) -> RegisteredLoss:
  """The registered loss ``name``; a ValueError listing the registered ones otherwise."""
  if name not in table:
    raise ValueError(
        f"no loss named {name!r} is registered; registered: {', '.join(table)}"
    )
  return table[name]


register_cc_loss("masc", uses_teachers=lambda s: s.kd_weight > 0)(
    collaboration_loss
)
register_cc_loss("ce")(cross_entropy_only)
register_ra_loss(
    "masc",
    uses_teachers=lambda s: s.ra_kd_weight > 0 and s.ra_teacher != "none",
)(altruism_loss)
register_ra_loss("ce")(cross_entropy_only)
