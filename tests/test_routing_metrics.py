"""Tests for masc_jax.method.routing (energy-based choice) and masc_jax.method.metrics.

Routing is checked against SciPy's logsumexp and NumPy's argmax, with exact
ties built by construction; metrics against explicit Python loops over samples.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from masc_jax.method import metrics, routing

# Each test compares programs it compiles itself, for a few steps: compiled
# with most of XLA's optimisation off (conftest.quick_compile).
pytestmark = pytest.mark.usefixtures("quickly_compiled")


def _logits(shape, seed=0, scale=3.0) -> np.ndarray:
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(
      np.float32
  )


def np_choice(stack: np.ndarray, temperature: float) -> np.ndarray:
  """Per sample, the model with the highest T * logsumexp(z / T) (first one on ties)."""
  lse = temperature * special.logsumexp(
      np.asarray(stack, np.float64) / temperature, axis=-1
  )  # [M, B]
  return np.argmax(lse, axis=0)


# ----------------------------------------------------------------------------- select_by_energy


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_select_by_energy_matches_numpy(temperature) -> None:
  stack = _logits((4, 32, 5), seed=1)
  expected_choice = np_choice(stack, temperature)
  assert (
      len(set(expected_choice.tolist())) > 1
  )  # the case exercises several models
  fn = functools.partial(routing.select_by_energy, temperature=temperature)
  for f in (fn, jax.jit(fn)):
    chosen, choice = f(jnp.asarray(stack))
    assert chosen.shape == (32, 5) and choice.shape == (32,)
    assert choice.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(choice), expected_choice)
    expected_chosen = np.stack(
        [stack[expected_choice[b], b] for b in range(32)]
    )
    np.testing.assert_array_equal(np.asarray(chosen), expected_chosen)


def test_select_by_energy_ties_go_to_lowest_index() -> None:
  z = _logits((6, 5), seed=2)
  weaker = z - 1.0  # logsumexp exactly 1 lower: never chosen
  # Models 1 and 2 are identical and beat model 0: the tie goes to 1.
  _, choice = routing.select_by_energy(
      jnp.asarray(np.stack([weaker, z, z.copy()]))
  )
  np.testing.assert_array_equal(np.asarray(choice), np.ones(6))
  # All identical: everyone picks 0.
  _, choice = routing.select_by_energy(jnp.asarray(np.stack([z, z, z])))
  np.testing.assert_array_equal(np.asarray(choice), np.zeros(6))
  # Two classes with the logits swapped: logsumexp(a, b) == logsumexp(b, a) exactly.
  pair = _logits((6, 2), seed=3)
  swapped = pair[:, ::-1].copy()
  chosen, choice = routing.select_by_energy(
      jnp.asarray(np.stack([pair, swapped]))
  )
  np.testing.assert_array_equal(np.asarray(choice), np.zeros(6))
  np.testing.assert_array_equal(np.asarray(chosen), pair)
  chosen, choice = routing.select_by_energy(
      jnp.asarray(np.stack([swapped, pair]))
  )
  np.testing.assert_array_equal(np.asarray(chosen), swapped)


def test_select_by_energy_temperature_changes_the_choice() -> None:
  # Model 0 is flat (0, 0); model 1 is peaked (0.6, -10).
  # T=1:   logsumexp: log 2 = 0.693 vs 0.6 + log(1 + e^-10.6) = 0.600 -> model 0.
  # T=0.1: T*lse(z/T): 0.1 * log 2 = 0.069 vs ~0.6                -> model 1.
  stack = jnp.array([[[0.0, 0.0]], [[0.6, -10.0]]])
  for temperature, expected in ((1.0, 0), (0.1, 1)):
    assert np_choice(np.asarray(stack), temperature)[0] == expected
    chosen, choice = routing.select_by_energy(stack, temperature)
    assert int(choice[0]) == expected
    np.testing.assert_array_equal(
        np.asarray(chosen[0]), np.asarray(stack[expected, 0])
    )


def test_select_by_energy_rank_errors() -> None:
  with pytest.raises(AssertionError):
    routing.select_by_energy(jnp.zeros((3, 4)))
  with pytest.raises(AssertionError):
    routing.select_by_energy(jnp.zeros((2, 3, 4, 5)))


# ----------------------------------------------------------------------------- grown agents


def test_grown_agent_logits_matches_numpy() -> None:
  k, b, c = 3, 16, 5
  s = _logits((b, c), seed=4)
  heads = _logits((k, b, c), seed=5)
  for f in (routing.grown_agent_logits, jax.jit(routing.grown_agent_logits)):
    logits, own = f(jnp.asarray(s), jnp.asarray(heads))
    assert (
        logits.shape == (k, b, c)
        and own.shape == (k, b)
        and own.dtype == jnp.bool_
    )
    for a in range(k):
      for i in range(b):
        own_wins = special.logsumexp(
            heads[a, i].astype(np.float64)
        ) > special.logsumexp(s[i].astype(np.float64))
        assert bool(own[a, i]) == own_wins
        np.testing.assert_array_equal(
            np.asarray(logits[a, i]), heads[a, i] if own_wins else s[i]
        )
  assert 0 < np.asarray(own).mean() < 1  # both heads are used in this case


def test_grown_agent_logits_ties_go_to_collective() -> None:
  s = _logits((6, 2), seed=6)
  heads = np.stack(
      [s, s[:, ::-1], s + 1.0, s - 1.0]
  )  # tie, tie (swapped), head wins, S wins
  logits, own = routing.grown_agent_logits(jnp.asarray(s), jnp.asarray(heads))
  np.testing.assert_array_equal(
      np.asarray(own),
      np.array([[False] * 6, [False] * 6, [True] * 6, [False] * 6]),
  )
  for a, expected in enumerate([s, s, s + 1.0, s]):
    np.testing.assert_array_equal(np.asarray(logits[a]), expected)


def test_grown_agent_logits_temperature() -> None:
  s = jnp.array([[0.0, 0.0]])
  head = jnp.array([[[0.6, -10.0]]])
  assert not bool(routing.grown_agent_logits(s, head, 1.0)[1][0, 0])
  assert bool(routing.grown_agent_logits(s, head, 0.1)[1][0, 0])


def test_grown_agent_logits_shape_errors() -> None:
  with pytest.raises(AssertionError):
    routing.grown_agent_logits(
        jnp.zeros((4, 3)), jnp.zeros((4, 3))
    )  # heads rank 2
  with pytest.raises(AssertionError):
    routing.grown_agent_logits(
        jnp.zeros((2, 4, 3)), jnp.zeros((2, 4, 3))
    )  # S rank 3
  with pytest.raises(AssertionError):
    routing.grown_agent_logits(
        jnp.zeros((4, 3)), jnp.zeros((2, 5, 3))
    )  # batch differs


# ----------------------------------------------------------------------------- rules by name


def np_msp_choice(stack: np.ndarray, temperature: float) -> np.ndarray:
  """Per sample, the model whose softmax(z / T) has the largest maximum (first on ties)."""
  probs = special.softmax(np.asarray(stack, np.float64) / temperature, axis=-1)
  return np.argmax(probs.max(axis=-1), axis=0)


def np_margin_choice(
    stack: np.ndarray, temperature: float, margin: float
) -> np.ndarray:
  """Per sample, the first model whose free energy is at most the lowest plus ``margin``."""
  energy = -temperature * special.logsumexp(
      np.asarray(stack, np.float64) / temperature, axis=-1
  )
  return np.array(
      [
          next(
              m
              for m in range(stack.shape[0])
              if energy[m, b] <= energy[:, b].min() + margin
          )
          for b in range(stack.shape[1])
      ]
  )


@pytest.mark.parametrize(
    "rule,margin",
    [
        ("energy", 0.0),
        ("msp", 0.0),
        ("energy_margin", 0.0),
        ("energy_margin", 0.7),
        ("energy_margin", 100.0),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_registered_rules_match_numpy(rule, margin, temperature) -> None:
  stack = _logits((3, 64, 5), seed=31)
  expected = {
      "energy": lambda: np_choice(stack, temperature),
      "msp": lambda: np_msp_choice(stack, temperature),
      "energy_margin": lambda: np_margin_choice(stack, temperature, margin),
  }[rule]()
  settings = routing.RoutingSettings(temperature=temperature, margin=margin)
  route = jax.jit(
      functools.partial(routing.route, rule=rule, settings=settings)
  )
  chosen, choice = route(jnp.asarray(stack))
  np.testing.assert_array_equal(np.asarray(choice), expected)
  np.testing.assert_array_equal(
      np.asarray(chosen), stack[expected, np.arange(64)]
  )
  if rule == "energy_margin" and margin == 100.0:
    assert not np.asarray(choice).any()  # everything within the margin: model 0
  if rule == "energy_margin" and margin == 0.7:
    # A real margin: it keeps model 0 on some inputs where energy alone would not.
    assert (np.asarray(choice) != np_choice(stack, temperature)).any()


def test_msp_and_energy_disagree_where_confidence_is_spread_differently() -> (
    None
):
  # Model 0: one large logit (high max prob, lower logsumexp); model 1: many large logits.
  peaked = np.array([[[6.0, 0.0, 0.0, 0.0]]], np.float32)
  flat = np.array([[[5.9, 5.9, 5.9, 5.9]]], np.float32)
  stack = jnp.asarray(np.concatenate([peaked, flat]))
  assert int(routing.route(stack, "msp")[1][0]) == 0
  assert int(routing.route(stack, "energy")[1][0]) == 1


def test_a_rule_registered_from_outside_is_used_by_name() -> None:
  @routing.register_rule("test_last_model", replace=True)
  def last_model(logits_stack, settings):
    return jnp.full(logits_stack.shape[1], logits_stack.shape[0] - 1, jnp.int32)

  try:
    s, heads = _logits((6, 4), seed=40), _logits((2, 6, 4), seed=41)
    grown, own = routing.grown_agent_logits(
        jnp.asarray(s), jnp.asarray(heads), rule="test_last_model"
    )
    assert np.asarray(own).all()
    np.testing.assert_array_equal(np.asarray(grown), heads)
    with pytest.raises(ValueError, match="already registered"):
      routing.register_rule("test_last_model")(last_model)
  finally:
    del routing.RULES["test_last_model"]
  with pytest.raises(
      ValueError, match="no routing rule named 'test_last_model'.*energy"
  ):
    routing.lookup("test_last_model")


# ----------------------------------------------------------------------------- metrics

K = 3
GROUPS = np.array([[3, 0], [5, 1], [2, 4]])  # non-contiguous class groups


def _random_case(n=60, seed=0, groups=GROUPS):
  rng = np.random.default_rng(seed)
  c = groups.size
  labels = rng.integers(0, c, n)
  # Predictions right about 60% of the time, to get accuracies away from 0 and 1.
  preds = np.where(
      rng.random((groups.shape[0], n)) < 0.6,
      labels[None, :],
      rng.integers(0, c, (groups.shape[0], n)),
  )
  return preds, labels


def _owner_of(label, groups):
  return [k for k in range(len(groups)) if label in groups[k]][0]


def loop_group_accuracy(preds, labels, groups):
  k = len(groups)
  out = np.full((k, k), np.nan)
  for a in range(k):
    for g in range(k):
      hits = [
          preds[a, i] == labels[i]
          for i in range(len(labels))
          if _owner_of(labels[i], groups) == g
      ]
      if hits:
        out[a, g] = sum(hits) / len(hits)
  return out


def loop_expert_general(preds, labels, groups):
  expert, general = [], []
  for a in range(len(groups)):
    own = [
        preds[a, i] == labels[i]
        for i in range(len(labels))
        if labels[i] in groups[a]
    ]
    other = [
        preds[a, i] == labels[i]
        for i in range(len(labels))
        if labels[i] not in groups[a]
    ]
    expert.append(sum(own) / len(own) if own else float("nan"))
    general.append(sum(other) / len(other) if other else float("nan"))
  return expert, general


def loop_directionality(acc):
  k = len(acc)
  return all(all(acc[g][g] >= acc[a][g] for a in range(k)) for g in range(k))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_general_matches_loop(seed) -> None:
  preds, labels = _random_case(seed=seed)
  got = metrics.expert_general(preds, labels, GROUPS)
  expert, general = loop_expert_general(preds, labels, GROUPS)
  assert set(got) == {"expert", "general", "average"}
  assert all(isinstance(v, float) for values in got.values() for v in values)
  np.testing.assert_allclose(got["expert"], expert, rtol=1e-12)
  np.testing.assert_allclose(got["general"], general, rtol=1e-12)
  np.testing.assert_allclose(
      got["average"], [(e + g) / 2 for e, g in zip(expert, general)], rtol=1e-12
  )


def test_expert_general_without_own_test_images_is_nan() -> None:
  labels = np.array([0, 3, 1, 5])  # no label of agent 2's classes (2, 4)
  preds = np.stack([labels, labels, np.zeros(4, int)])
  got = metrics.expert_general(preds, labels, GROUPS)
  assert math.isnan(got["expert"][2]) and math.isnan(got["average"][2])
  assert got["general"][2] == 1 / 4  # only the label 0 is right
  assert got["expert"][:2] == [1.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_group_accuracy_matches_loop(seed) -> None:
  preds, labels = _random_case(seed=seed)
  got = metrics.group_accuracy(preds, labels, GROUPS)
  assert got.shape == (K, K)
  np.testing.assert_allclose(
      got, loop_group_accuracy(preds, labels, GROUPS), rtol=1e-12
  )
  # Expert_k is the diagonal of the group accuracy.
  np.testing.assert_allclose(
      np.diag(got), metrics.expert_general(preds, labels, GROUPS)["expert"]
  )


def test_group_accuracy_missing_group_is_nan() -> None:
  labels = np.array([0, 3, 1])  # groups 0 and 1 only
  preds = np.stack([labels, np.zeros(3, int), labels])
  got = metrics.group_accuracy(preds, labels, GROUPS)
  np.testing.assert_array_equal(np.isnan(got[:, 2]), [True] * 3)
  np.testing.assert_allclose(
      got[:, :2], loop_group_accuracy(preds, labels, GROUPS)[:, :2]
  )


def test_label_group_matches_loop() -> None:
  labels = np.arange(GROUPS.size).repeat(2)
  np.testing.assert_array_equal(
      metrics.label_group(labels, GROUPS),
      [_owner_of(l, GROUPS) for l in labels],
  )


def test_directionality_cases() -> None:
  # Ties count as holding: agent 1 equals the owner on group 0, agent 0 equals it on group 1.
  assert metrics.directionality(np.array([[0.9, 0.5], [0.9, 0.5]]))
  # Strictly best owners.
  assert metrics.directionality(
      np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.3], [0.1, 0.1, 0.7]])
  )
  # Agent 2 beats owner 1 on group 1.
  assert not metrics.directionality(
      np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.6, 0.7]])
  )
  # Agent 1 beats owner 0 on group 0.
  assert metrics.directionality(np.array([[0.9, 0.1], [0.95, 0.2]])) is False
  # Compared per group (column), not per agent (row): agent 0 is better on group 1
  # (0.95) than on its own group (0.9), but owner 1 is better still on group 1.
  assert metrics.directionality(np.array([[0.9, 0.95], [0.1, 0.96]])) is True


def test_directionality_matches_loop_on_random_matrices() -> None:
  rng = np.random.default_rng(3)
  seen = set()
  for _ in range(200):
    acc = rng.integers(0, 4, (3, 3)) / 4.0  # coarse values: ties are frequent
    expected = loop_directionality(acc.tolist())
    seen.add(expected)
    assert metrics.directionality(acc) is expected
  assert seen == {True, False}


def test_accuracy_matches_loop() -> None:
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 6, 50)
  preds = np.where(rng.random(50) < 0.7, labels, rng.integers(0, 6, 50))
  expected = sum(int(p == l) for p, l in zip(preds, labels)) / 50
  assert metrics.accuracy(preds, labels) == pytest.approx(expected, abs=1e-12)


def test_row_combines_the_metrics() -> None:
  preds, labels = _random_case(seed=5)
  got = metrics.row(preds, labels, GROUPS)
  expert, general = loop_expert_general(preds, labels, GROUPS)
  acc = loop_group_accuracy(preds, labels, GROUPS)
  assert set(got) == {
      "expert",
      "general",
      "average",
      "group_accuracy",
      "directionality",
  }
  np.testing.assert_allclose(got["expert"], expert)
  np.testing.assert_allclose(got["general"], general)
  np.testing.assert_allclose(np.array(got["group_accuracy"]), acc)
  assert isinstance(got["group_accuracy"], list)
  assert got["directionality"] is loop_directionality(acc.tolist())
  # A row where the owners are perfect and the others always wrong: directionality holds.
  owner = np.array([_owner_of(l, GROUPS) for l in labels])
  perfect = np.stack(
      [
          np.where(owner == a, labels, (labels + 1) % GROUPS.size)
          for a in range(K)
      ]
  )
  good = metrics.row(perfect, labels, GROUPS)
  assert (
      good["directionality"] is True
      and good["expert"] == [1.0] * K
      and good["general"] == [0.0] * K
  )


@pytest.mark.parametrize(
    "preds_shape,labels_shape,groups",
    [
        ((K, 10), (10,), GROUPS.reshape(-1)),  # groups not [K, M]
        ((K + 1, 10), (10,), GROUPS),  # wrong number of agents
        ((10,), (10,), GROUPS),  # predictions of rank 1
        ((K, 10), (9,), GROUPS),  # labels of the wrong length
        ((K, 10), (10, 1), GROUPS),  # labels of rank 2
    ],
)
def test_metrics_shape_errors(preds_shape, labels_shape, groups) -> None:
  preds, labels = np.zeros(preds_shape, int), np.zeros(labels_shape, int)
  for fn in (metrics.expert_general, metrics.group_accuracy, metrics.row):
    with pytest.raises(ValueError):
      fn(preds, labels, groups)


@pytest.mark.parametrize("bad", [-1, GROUPS.size])
def test_metrics_label_range_error(bad) -> None:
  labels = np.array([0, 1, bad])
  with pytest.raises(ValueError, match=rf"\[0, {GROUPS.size}\)"):
    metrics.expert_general(np.zeros((K, 3), int), labels, GROUPS)


def test_directionality_and_accuracy_shape_errors() -> None:
  with pytest.raises(ValueError):
    metrics.directionality(np.zeros((2, 3)))
  with pytest.raises(ValueError):
    metrics.directionality(np.zeros(3))
  with pytest.raises(ValueError):
    metrics.accuracy(np.zeros(3), np.zeros(4))


def test_directionality_skips_groups_without_test_images():
  acc = np.array([[0.9, np.nan, 0.1], [0.2, np.nan, 0.0], [0.3, np.nan, 0.8]])
  assert metrics.directionality(acc)
  acc[2, 0] = 0.95  # agent 2 now beats the owner on group 0
  assert not metrics.directionality(acc)
