"""Tests for masc_jax.method.losses, against NumPy/SciPy re-implementations of docs/method.md.

Every reference here is computed in float64 NumPy/SciPy by a different route
than the library (explicit loops, scipy.special, scipy.stats.entropy), and every
loss is also checked under ``jax.jit``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from masc_jax.method import losses

# Each test compares programs it compiles itself, for a few steps: compiled
# with most of XLA's optimisation off (conftest.quick_compile).
pytestmark = pytest.mark.usefixtures("quickly_compiled")

B, C, K = 6, 5, 3
# A non-contiguous, non-palindromic owner map (agent 2 owns class 0, ...) so that any
# "class c belongs to agent c // (C // K)" shortcut would fail.
CLASS_OWNER = np.array([2, 0, 1, 1, 0])


def _rng(seed: int = 0) -> np.random.Generator:
  return np.random.default_rng(seed)


def _logits(shape, seed=0, scale=3.0) -> np.ndarray:
  return (scale * _rng(seed).standard_normal(shape)).astype(np.float32)


def _labels(seed=0, n=B, c=C) -> np.ndarray:
  return _rng(seed + 100).integers(0, c, n).astype(np.int32)


# ----------------------------------------------------------------------------- NumPy references


def np_ce(logits, labels) -> float:
  z = np.asarray(logits, np.float64)
  m = z.max(axis=1, keepdims=True)
  log_probs = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
  return float(-np.mean([log_probs[b, labels[b]] for b in range(len(labels))]))


def np_kd(student, teacher, temperature) -> float:
  s = np.asarray(student, np.float64) / temperature
  t = np.asarray(teacher, np.float64) / temperature
  p_t = special.softmax(t, axis=1)
  p_s = special.softmax(s, axis=1)
  kl = [
      stats.entropy(p_t[b], p_s[b]) for b in range(s.shape[0])
  ]  # KL(p_t || p_s)
  return float(temperature**2 * np.mean(kl))


def np_free_energy(logits, temperature) -> np.ndarray:
  return -temperature * special.logsumexp(
      np.asarray(logits, np.float64) / temperature, axis=1
  )


def np_align(logits, anchor, temperature) -> float:
  return float(np.mean((np_free_energy(logits, temperature) - anchor) ** 2))


def np_owner_teacher(agent_logits, labels, class_owner) -> np.ndarray:
  out = np.empty(agent_logits.shape[1:], np.float64)
  for b in range(agent_logits.shape[1]):
    out[b] = agent_logits[class_owner[labels[b]], b]
  return out


def np_amalgamated_teacher(agent_logits, class_owner) -> np.ndarray:
  _, nb, nc = agent_logits.shape
  out = np.empty((nb, nc), np.float64)
  for b in range(nb):
    for c in range(nc):
      out[b, c] = agent_logits[class_owner[c], b, c]
  return out


def np_collaboration(
    student,
    labels,
    agent_logits,
    class_owner,
    kd_teachers,
    kd_weight,
    kd_temperature,
    align_weight,
    anchor,
    energy_temperature,
) -> dict:
  ce = np_ce(student, labels)
  if kd_teachers == "owner":
    kd = np_kd(
        student,
        np_owner_teacher(agent_logits, labels, class_owner),
        kd_temperature,
    )
  elif kd_teachers == "amalgamate":
    kd = np_kd(
        student,
        np_amalgamated_teacher(agent_logits, class_owner),
        kd_temperature,
    )
  else:
    kd = sum(
        np_kd(student, agent_logits[k], kd_temperature)
        for k in range(agent_logits.shape[0])
    )
  align = np_align(student, anchor, energy_temperature)
  return {
      "ce": ce,
      "kd": kd,
      "align": align,
      "total": ce + kd_weight * kd + align_weight * align,
  }


def _assert_terms(got: dict, expected: dict, rtol=1e-5, atol=1e-5) -> None:
  assert set(got) == {"ce", "kd", "align", "total"}
  for name, value in expected.items():
    assert np.shape(got[name]) == (), name
    np.testing.assert_allclose(
        float(got[name]), value, rtol=rtol, atol=atol, err_msg=name
    )


# ----------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_matches_numpy_eager_and_jit() -> None:
  logits, labels = _logits((B, C)), _labels()
  expected = np_ce(logits, labels)
  for fn in (losses.cross_entropy, jax.jit(losses.cross_entropy)):
    got = fn(jnp.asarray(logits), jnp.asarray(labels))
    assert got.shape == ()
    np.testing.assert_allclose(float(got), expected, rtol=1e-6, atol=1e-6)


def test_cross_entropy_hand_worked() -> None:
  # Uniform logits over C classes: CE = log C whatever the labels.
  logits = jnp.zeros((4, 7))
  got = losses.cross_entropy(logits, jnp.array([0, 3, 6, 2]))
  np.testing.assert_allclose(float(got), math.log(7), rtol=1e-6)
  # Two classes, logits (log 3, 0): p = (3/4, 1/4); labels 0 and 1 -> mean(-log 3/4, -log 1/4).
  logits = jnp.array([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
  got = losses.cross_entropy(logits, jnp.array([0, 1]))
  np.testing.assert_allclose(
      float(got), (-math.log(0.75) - math.log(0.25)) / 2, rtol=1e-6
  )


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8])
def test_cross_entropy_integer_label_dtypes(dtype) -> None:
  logits, labels = _logits((B, C)), _labels()
  got = losses.cross_entropy(
      jnp.asarray(logits), np.asarray(labels).astype(dtype)
  )
  np.testing.assert_allclose(
      float(got), np_ce(logits, labels), rtol=1e-6, atol=1e-6
  )


def test_cross_entropy_rejects_float_labels() -> None:
  with pytest.raises(ValueError, match="integer"):
    losses.cross_entropy(jnp.zeros((2, 3)), jnp.array([0.0, 1.0]))


@pytest.mark.parametrize(
    "logits_shape,labels_shape",
    [
        ((B, C), (B + 1,)),  # batch mismatch
        ((B, C), (B, 1)),  # labels of rank 2
        ((B,), (B,)),  # logits of rank 1
        ((1, B, C), (B,)),  # logits of rank 3
    ],
)
def test_cross_entropy_shape_errors(logits_shape, labels_shape) -> None:
  with pytest.raises(AssertionError):
    losses.cross_entropy(
        jnp.zeros(logits_shape), jnp.zeros(labels_shape, jnp.int32)
    )


@pytest.mark.parametrize("bad", [-1, C, C + 7])
def test_cross_entropy_labels_out_of_range(bad) -> None:
  labels = _labels().copy()
  labels[2] = bad
  with pytest.raises(ValueError, match=rf"\[0, {C}\)") as info:
    losses.cross_entropy(jnp.asarray(_logits((B, C))), jnp.asarray(labels))
  assert str(bad) in str(info.value)


# ----------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_distillation_matches_scipy_kl(temperature) -> None:
  student, teacher = _logits((B, C), seed=1), _logits((B, C), seed=2)
  expected = np_kd(student, teacher, temperature)
  fn = functools.partial(losses.distillation, temperature=temperature)
  for f in (fn, jax.jit(fn)):
    got = f(jnp.asarray(student), jnp.asarray(teacher))
    assert got.shape == ()
    np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-6)


def test_distillation_temperature_squared_factor() -> None:
  # T^2 * KL at T=3 is not the plain KL of the softened distributions.
  student, teacher = _logits((B, C), seed=1), _logits((B, C), seed=2)
  plain = np.mean(
      [
          stats.entropy(
              special.softmax(teacher[b] / 3.0),
              special.softmax(student[b] / 3.0),
          )
          for b in range(B)
      ]
  )
  got = float(
      losses.distillation(jnp.asarray(student), jnp.asarray(teacher), 3.0)
  )
  np.testing.assert_allclose(got, 9.0 * plain, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_distillation_zero_when_student_equals_teacher(temperature) -> None:
  z = jnp.asarray(_logits((B, C), seed=3))
  assert abs(float(losses.distillation(z, z, temperature))) < 1e-6
  # Invariant to a per-row shift of the student (softmax is): still zero.
  assert abs(float(losses.distillation(z + 5.0, z, temperature))) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_distillation_gradients(temperature) -> None:
  student, teacher = jnp.asarray(_logits((B, C), seed=4)), jnp.asarray(
      _logits((B, C), seed=5)
  )
  grad_teacher = jax.grad(losses.distillation, argnums=1)(
      student, teacher, temperature
  )
  np.testing.assert_array_equal(np.asarray(grad_teacher), np.zeros((B, C)))
  jit_grad_teacher = jax.jit(
      jax.grad(losses.distillation, argnums=1), static_argnums=2
  )(student, teacher, temperature)
  np.testing.assert_array_equal(np.asarray(jit_grad_teacher), np.zeros((B, C)))
  # Analytic gradient wrt the student: T * (softmax(s/T) - softmax(t/T)) / B.
  grad_student = jax.grad(losses.distillation)(student, teacher, temperature)
  s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
  expected = (
      temperature
      * (
          special.softmax(s / temperature, axis=1)
          - special.softmax(t / temperature, axis=1)
      )
      / B
  )
  np.testing.assert_allclose(
      np.asarray(grad_student), expected, rtol=1e-4, atol=1e-6
  )


def test_distillation_shape_errors() -> None:
  with pytest.raises(AssertionError):
    losses.distillation(jnp.zeros((B, C)), jnp.zeros((B, C + 1)))
  with pytest.raises(AssertionError):
    losses.distillation(jnp.zeros((C,)), jnp.zeros((C,)))


# ----------------------------------------------------------------------------- energy


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_free_energy_matches_scipy(temperature) -> None:
  z = _logits((B, C), seed=6)
  expected = np_free_energy(z, temperature)
  fn = functools.partial(losses.free_energy, temperature=temperature)
  for f in (fn, jax.jit(fn)):
    got = f(jnp.asarray(z))
    assert got.shape == (B,)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_free_energy_rank_error() -> None:
  with pytest.raises(AssertionError):
    losses.free_energy(jnp.zeros((2, 3, 4)))


def test_energy_alignment_hand_worked() -> None:
  ln2 = math.log(2.0)
  logits = jnp.array([[1.0, 1.0], [2.0, 2.0]])
  # T=1: F = -(z + ln 2) = (-1 - ln2, -2 - ln2); anchor -10.
  expected = ((9.0 - ln2) ** 2 + (8.0 - ln2) ** 2) / 2
  np.testing.assert_allclose(
      float(losses.energy_alignment(logits)), expected, rtol=1e-6
  )
  # T=2: F = -2 * (z/2 + ln 2) = -(z + 2 ln2); anchor -3.
  expected = ((2.0 - 2 * ln2) ** 2 + (1.0 - 2 * ln2) ** 2) / 2
  got = jax.jit(
      functools.partial(losses.energy_alignment, anchor=-3.0, temperature=2.0)
  )(logits)
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_energy_alignment_matches_numpy() -> None:
  z = _logits((B, C), seed=7)
  got = losses.energy_alignment(jnp.asarray(z), anchor=-4.0, temperature=1.7)
  np.testing.assert_allclose(float(got), np_align(z, -4.0, 1.7), rtol=1e-5)


# ----------------------------------------------------------------------------- teachers


def test_amalgamated_teacher_logits_explicit_loop() -> None:
  agent_logits = _logits((K, B, C), seed=8)
  expected = np_amalgamated_teacher(agent_logits, CLASS_OWNER)
  for f in (
      losses.amalgamated_teacher_logits,
      jax.jit(losses.amalgamated_teacher_logits),
  ):
    got = f(jnp.asarray(agent_logits), jnp.asarray(CLASS_OWNER))
    assert got.shape == (B, C)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_owner_teacher_logits_explicit_loop() -> None:
  agent_logits, labels = _logits((K, B, C), seed=9), _labels(seed=9)
  expected = np_owner_teacher(agent_logits, labels, CLASS_OWNER)
  for f in (losses.owner_teacher_logits, jax.jit(losses.owner_teacher_logits)):
    got = f(
        jnp.asarray(agent_logits), jnp.asarray(labels), jnp.asarray(CLASS_OWNER)
    )
    assert got.shape == (B, C)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_teacher_logits_shape_errors() -> None:
  with pytest.raises(AssertionError):  # class_owner of the wrong length
    losses.amalgamated_teacher_logits(
        jnp.zeros((K, B, C)), jnp.zeros((C + 1,), jnp.int32)
    )
  with pytest.raises(AssertionError):  # agent logits of rank 2
    losses.amalgamated_teacher_logits(
        jnp.zeros((B, C)), jnp.zeros((C,), jnp.int32)
    )
  with pytest.raises(AssertionError):  # labels of the wrong batch size
    losses.owner_teacher_logits(
        jnp.zeros((K, B, C)),
        jnp.zeros((B + 1,), jnp.int32),
        jnp.zeros((C,), jnp.int32),
    )


# ----------------------------------------------------------------------------- L_CC and L_RA

CC_SETTINGS = dict(
    kd_weight=0.7,
    kd_temperature=2.0,
    align_weight=0.3,
    energy_anchor=-5.0,
    energy_temperature=1.5,
)


@pytest.mark.parametrize("kd_teachers", ["owner", "amalgamate", "all"])
def test_collaboration_loss_matches_numpy(kd_teachers) -> None:
  student, labels = _logits((B, C), seed=10), _labels(seed=10)
  agent_logits = _logits((K, B, C), seed=11)
  expected = np_collaboration(
      student,
      labels,
      agent_logits,
      CLASS_OWNER,
      kd_teachers,
      CC_SETTINGS["kd_weight"],
      CC_SETTINGS["kd_temperature"],
      CC_SETTINGS["align_weight"],
      CC_SETTINGS["energy_anchor"],
      CC_SETTINGS["energy_temperature"],
  )
  settings = losses.LossSettings(kd_teachers=kd_teachers, **CC_SETTINGS)
  for f in (losses.collaboration_loss, jax.jit(losses.collaboration_loss)):
    total, terms = f(
        jnp.asarray(student),
        jnp.asarray(labels),
        jnp.asarray(agent_logits),
        jnp.asarray(CLASS_OWNER),
        settings,
    )
    np.testing.assert_allclose(
        float(total), expected["total"], rtol=1e-5, atol=1e-5
    )
    _assert_terms(terms, expected)
    assert float(terms["total"]) == float(total)


def test_collaboration_loss_teacher_modes_differ() -> None:
  # With non-trivial teachers, the three modes are three different KD targets.
  student, labels = _logits((B, C), seed=10), _labels(seed=10)
  agent_logits = jnp.asarray(_logits((K, B, C), seed=11))
  kds = [
      float(
          losses.collaboration_loss(
              jnp.asarray(student),
              jnp.asarray(labels),
              agent_logits,
              jnp.asarray(CLASS_OWNER),
              losses.LossSettings(kd_teachers=mode),
          )[1]["kd"]
      )
      for mode in losses.KD_TEACHERS
  ]
  assert len({round(v, 4) for v in kds}) == 3, kds


def test_collaboration_loss_defaults_follow_spec() -> None:
  # Defaults: kd_weight 1, T 1, align_weight 0.1, anchor -10, T_e 1, owner teacher.
  student, labels = _logits((B, C), seed=12), _labels(seed=12)
  agent_logits = _logits((K, B, C), seed=13)
  expected = np_collaboration(
      student,
      labels,
      agent_logits,
      CLASS_OWNER,
      "owner",
      1.0,
      1.0,
      0.1,
      -10.0,
      1.0,
  )
  total, terms = losses.collaboration_loss(
      jnp.asarray(student),
      jnp.asarray(labels),
      jnp.asarray(agent_logits),
      jnp.asarray(CLASS_OWNER),
  )
  _assert_terms(terms, expected)


def test_collaboration_loss_unknown_teacher_mode() -> None:
  with pytest.raises(ValueError, match="kd_teachers.*'best'"):
    losses.collaboration_loss(
        jnp.zeros((B, C)),
        jnp.zeros((B,), jnp.int32),
        jnp.zeros((K, B, C)),
        jnp.asarray(CLASS_OWNER),
        losses.LossSettings(kd_teachers="best"),
    )


def test_collaboration_loss_shape_errors() -> None:
  with pytest.raises(AssertionError):  # teachers of another batch size
    losses.collaboration_loss(
        jnp.zeros((B, C)),
        jnp.zeros((B,), jnp.int32),
        jnp.zeros((K, B + 1, C)),
        jnp.asarray(CLASS_OWNER),
    )
  with pytest.raises(ValueError, match=rf"\[0, {C}\)"):
    losses.collaboration_loss(
        jnp.zeros((B, C)),
        jnp.full((B,), C, jnp.int32),
        jnp.zeros((K, B, C)),
        jnp.asarray(CLASS_OWNER),
    )


RA_SETTINGS = dict(
    ra_kd_weight=0.4,
    kd_temperature=3.0,
    align_weight=0.2,
    energy_anchor=-7.0,
    energy_temperature=0.8,
)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_altruism_loss_matches_numpy(with_teacher) -> None:
  student, labels = _logits((B, C), seed=14), _labels(seed=14)
  teacher = _logits((B, C), seed=15)
  ce = np_ce(student, labels)
  kd = (
      np_kd(student, teacher, RA_SETTINGS["kd_temperature"])
      if with_teacher
      else 0.0
  )
  align = np_align(
      student, RA_SETTINGS["energy_anchor"], RA_SETTINGS["energy_temperature"]
  )
  expected = {
      "ce": ce,
      "kd": kd,
      "align": align,
      "total": ce
      + RA_SETTINGS["ra_kd_weight"] * kd
      + RA_SETTINGS["align_weight"] * align,
  }
  settings = losses.LossSettings(**RA_SETTINGS)
  args = (
      jnp.asarray(student),
      jnp.asarray(labels),
      jnp.asarray(teacher) if with_teacher else None,
  )
  for f in (losses.altruism_loss, jax.jit(losses.altruism_loss)):
    total, terms = f(*args, settings)
    np.testing.assert_allclose(
        float(total), expected["total"], rtol=1e-5, atol=1e-5
    )
    _assert_terms(terms, expected)
  if not with_teacher:
    assert float(terms["kd"]) == 0.0


def test_altruism_loss_gradient_does_not_reach_teacher() -> None:
  student, labels = jnp.asarray(_logits((B, C), seed=16)), jnp.asarray(
      _labels(seed=16)
  )
  teacher = jnp.asarray(_logits((B, C), seed=17))
  grad_t = jax.grad(lambda t: losses.altruism_loss(student, labels, t)[0])(
      teacher
  )
  np.testing.assert_array_equal(np.asarray(grad_t), 0.0)


# ----------------------------------------------------------------------------- the registries


def test_collaboration_loss_without_teachers_is_ce_plus_alignment() -> None:
  # One code path: no teachers means no KD term, the rest as with teachers.
  student, labels = _logits((B, C), seed=18), _labels(seed=18)
  settings = losses.LossSettings(**CC_SETTINGS)
  total, terms = losses.collaboration_loss(
      jnp.asarray(student),
      jnp.asarray(labels),
      None,
      jnp.asarray(CLASS_OWNER),
      settings,
  )
  ce = np_ce(student, labels)
  align = np_align(
      student, CC_SETTINGS["energy_anchor"], CC_SETTINGS["energy_temperature"]
  )
  assert float(terms["kd"]) == 0.0
  np.testing.assert_allclose(
      float(total), ce + CC_SETTINGS["align_weight"] * align, rtol=1e-5
  )


def test_registered_losses_and_when_they_need_teachers() -> None:
  assert {"masc", "ce"} <= set(losses.CC_LOSSES) and {"masc", "ce"} <= set(
      losses.RA_LOSSES
  )
  assert losses.CC_LOSSES["masc"].fn is losses.collaboration_loss
  assert losses.RA_LOSSES["masc"].fn is losses.altruism_loss
  default = losses.LossSettings()
  assert losses.CC_LOSSES["masc"].uses_teachers(default)
  assert not losses.CC_LOSSES["masc"].uses_teachers(
      default.replace(kd_weight=0.0)
  )
  assert not losses.CC_LOSSES["ce"].uses_teachers(default)
  assert losses.RA_LOSSES["masc"].uses_teachers(default)
  assert not losses.RA_LOSSES["masc"].uses_teachers(
      default.replace(ra_teacher="none")
  )
  assert not losses.RA_LOSSES["masc"].uses_teachers(
      default.replace(ra_kd_weight=0.0)
  )
  student, labels = _logits((B, C), seed=19), _labels(seed=19)
  total, terms = losses.CC_LOSSES["ce"].fn(
      jnp.asarray(student),
      jnp.asarray(labels),
      None,
      jnp.asarray(CLASS_OWNER),
      default,
  )
  np.testing.assert_allclose(float(total), np_ce(student, labels), rtol=1e-6)
  assert set(terms) == {"ce", "total"}


def test_registering_a_loss_twice_is_refused_unless_replaced() -> None:
  with pytest.raises(ValueError, match="already registered"):
    losses.register_cc_loss("masc")(losses.collaboration_loss)
  with pytest.raises(ValueError, match="no loss named 'nope'.*masc"):
    losses.lookup(losses.CC_LOSSES, "nope")


def test_loss_settings_from_config_reads_every_field() -> None:
  from masc_jax import config_lib

  config = config_lib.load_config(
      "digits",
      [
          "loss.kd_weight=0.3",
          "loss.kd_teachers=all",
          "loss.ra_teacher=collective",
          "loss.energy_anchor=-4.0",
      ],
  )
  settings = losses.LossSettings.from_config(config.loss)
  assert (
      settings.kd_weight,
      settings.kd_teachers,
      settings.ra_teacher,
      settings.energy_anchor,
  ) == (0.3, "all", "collective", -4.0)
  assert settings.align_weight == config.loss.align_weight
