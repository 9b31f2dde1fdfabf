"""Tests for masc_jax.method.steps and the stage table's predictions: optimiser, steps, rows.

Each compiled step is compared with the same step written out by hand: the
losses from ``masc_jax.method.losses`` on logits computed agent by agent (Python
loops over unstacked models), ``jax.grad`` and the optimiser; the optimiser
itself against PyTorch-style SGD written in NumPy.
"""

from __future__ import annotations

import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from masc_jax.method import agents, losses, steps
from masc_jax.nn import network
from masc_jax.training import protocol
from conftest import random_variables

# Each test compares programs it compiles itself, for a few steps: compiled
# with most of XLA's optimisation off (conftest.quick_compile).
pytestmark = pytest.mark.usefixtures("quickly_compiled")

K, B, C = 3, 4, 6
CLASS_OWNER = jnp.array([1, 0, 2, 0, 2, 1])  # agent owning each class
EXPERT = network.Network(
    widths=(4, 8),
    pool_after=(0, 1),
    head_hidden=(16,),
    num_classes=C,
    dropout_rate=0.5,
)
COLLECTIVE = network.Network(
    widths=(8, 8),
    pool_after=(0, 1),
    head_hidden=(16,),
    num_classes=C,
    dropout_rate=0.5,
)
BACKBONE, HEAD = network.backbone_of(COLLECTIVE), network.head_of(COLLECTIVE)
OPTIM = types.SimpleNamespace(
    learning_rate=0.05, momentum=0.9, weight_decay=5e-4, grad_clip_norm=0.0
)
LOSS = losses.LossSettings(
    kd_teachers="all",
    kd_weight=0.7,
    kd_temperature=2.0,
    align_weight=0.3,
    energy_anchor=-5.0,
    energy_temperature=1.5,
    ra_kd_weight=0.6,
)
TOL = dict(rtol=1e-5, atol=1e-6)


def _augment(images, rng):
  del rng  # identity: the inputs are known
  return images.astype(jnp.float32)


def _normalize(images):
  return images.astype(jnp.float32) / 255.0


def _model_state(module, sample, seed, tx):
  variables = random_variables(module, sample, seed)
  return steps.ModelState(
      params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(variables["params"]),
  )


@functools.lru_cache(maxsize=None)
def _setup():
  """Stacked experts, two collectives and two sets of stacked heads, and batches."""
  tx = steps.make_optimizer(OPTIM)
  image = jnp.zeros((2, 8, 8, 1), jnp.float32)
  features = jnp.zeros((2, 2 * 2 * 8), jnp.float32)
  experts = agents.stack_agents(
      [_model_state(EXPERT, image, a, tx) for a in range(K)]
  )
  heads = agents.stack_agents(
      [_model_state(HEAD, features, 10 + a, tx) for a in range(K)]
  )
  heads_ce = agents.stack_agents(
      [_model_state(HEAD, features, 20 + a, tx) for a in range(K)]
  )
  collective = _model_state(COLLECTIVE, image, 30, tx)
  collective_ce = _model_state(COLLECTIVE, image, 31, tx)
  rng = np.random.default_rng(0)
  pooled = {
      "image": jnp.asarray(rng.integers(0, 4, (B, 8, 8, 1)), jnp.uint8),
      "label": jnp.asarray(rng.integers(0, C, (B,)), jnp.int32),
  }
  per_agent = {
      "image": jnp.asarray(rng.integers(0, 4, (K, B, 8, 8, 1)), jnp.uint8),
      "label": jnp.asarray(rng.integers(0, C, (K, B)), jnp.int32),
  }
  return (
      tx,
      experts,
      collective,
      heads,
      collective_ce,
      heads_ce,
      pooled,
      per_agent,
  )


def _apply_updates(state, grads, batch_stats, tx):
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return steps.ModelState(
      params=jax.tree.map(lambda p, u: p + u, state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
  )


def _changed_per_agent(before, after) -> np.ndarray:
  diffs = jax.tree.map(
      lambda a, b: jnp.abs(a - b).reshape(a.shape[0], -1).max(axis=1),
      before,
      after,
  )
  return np.max(np.stack(jax.tree.leaves(diffs)), axis=0) > 0


# ----------------------------------------------------------------------------- optimiser


def _np_sgd(params, grads_seq, lr, momentum, wd, clip):
  """PyTorch SGD (coupled decay, dampening 0) after optional clip_grad_norm_, in float64."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = None
  for grads in grads_seq:
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    if clip > 0:
      norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
      g = {k: v * min(1.0, clip / norm) for k, v in g.items()}
    d = {k: g[k] + wd * p[k] for k in p}
    buf = d if buf is None else {k: momentum * buf[k] + d[k] for k in p}
    p = {k: p[k] - lr * (buf[k] if momentum else d[k]) for k in p}
  return p


@pytest.mark.parametrize(
    "momentum,wd,clip", [(0.9, 5e-4, 0.0), (0.9, 0.01, 1.5), (0.0, 0.1, 0.0)]
)
def test_make_optimizer_is_pytorch_sgd(momentum, wd, clip) -> None:
  rng = np.random.default_rng(1)
  params = {
      "a": rng.standard_normal(3).astype(np.float32),
      "b": rng.standard_normal((2, 2)).astype(np.float32),
  }
  # Step 1 has a gradient norm above the clip (clipped), step 2 one below it (untouched).
  g1 = {
      "a": np.array([3.0, -2.0, 1.0], np.float32),
      "b": np.array([[1.0, 2.0], [0.5, -1.0]], np.float32),
  }
  g2 = {
      "a": np.array([0.1, 0.2, -0.3], np.float32),
      "b": np.array([[0.05, 0.0], [-0.1, 0.2]], np.float32),
  }
  if clip:
    assert np.sqrt(sum(np.sum(v**2) for v in g1.values())) > clip
    assert np.sqrt(sum(np.sum(v**2) for v in g2.values())) < clip
  lr = 0.1
  tx = steps.make_optimizer(
      types.SimpleNamespace(
          learning_rate=lr,
          momentum=momentum,
          weight_decay=wd,
          grad_clip_norm=clip,
      )
  )
  p = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(p)
  for step, g in enumerate((g1, g2), start=1):
    updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, p)
    p = jax.tree.map(lambda x, u: x + u, p, updates)
    expected = _np_sgd(params, (g1, g2)[:step], lr, momentum, wd, clip)
    for k in params:
      np.testing.assert_allclose(
          np.asarray(p[k]),
          expected[k],
          rtol=1e-6,
          atol=1e-7,
          err_msg=f"step {step} leaf {k}",
      )


def test_make_optimizer_clipping_changes_the_step() -> None:
  # The same gradients with and without clipping give different steps (the clip is active).
  params = {"a": jnp.ones(3)}
  g = {"a": jnp.array([3.0, 4.0, 0.0])}  # norm 5
  updates = []
  for clip in (0.0, 1.0):
    tx = steps.make_optimizer(
        types.SimpleNamespace(
            learning_rate=1.0,
            momentum=0.0,
            weight_decay=0.0,
            grad_clip_norm=clip,
        )
    )
    updates.append(np.asarray(tx.update(g, tx.init(params), params)[0]["a"]))
  np.testing.assert_allclose(updates[0], [-3.0, -4.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates[1], [-0.6, -0.8, 0.0], rtol=1e-6)


def test_init_model_state_and_variables() -> None:
  tx = _setup()[0]
  head_state = steps.init_model_state(
      HEAD, jax.random.key(0), jnp.zeros((2, 32)), tx
  )
  assert head_state.batch_stats == {}
  assert set(head_state.variables()) == {"params"}
  chex.assert_trees_all_equal_shapes(
      head_state.params, _setup()[2].params["head"]
  )
  # SGD with momentum starts from a zero trace of the parameters' shapes.
  chex.assert_trees_all_equal(
      jax.tree.leaves(head_state.opt_state),
      jax.tree.leaves(jax.tree.map(jnp.zeros_like, head_state.params)),
  )
  net_state = jax.eval_shape(
      lambda: steps.init_model_state(
          COLLECTIVE, jax.random.key(0), jnp.zeros((2, 8, 8, 1)), tx
      )
  )
  assert set(net_state.variables()) == {"params", "batch_stats"}
  assert set(net_state.params) == {"backbone", "head"}


# ----------------------------------------------------------------------------- stage 2: collective


@jax.jit
def _collective_by_hand(state, batch, rng, teacher_list, kd_weight):
  """L_CC step by hand: teachers' logits agent by agent, losses.collaboration_loss, grad, update.

  ``kd_weight`` 0 is the step without teachers (their logits then do not matter).
  """
  tx = _setup()[0]
  aug_rng, dropout_rng = jax.random.split(rng)
  x = _augment(batch["image"], aug_rng)
  teacher_logits = jnp.stack(
      [EXPERT.apply(v, x, train=False) for v in teacher_list]
  )

  def loss_fn(params):
    logits, new_vars = COLLECTIVE.apply(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
    )
    total, terms = losses.collaboration_loss(
        logits,
        batch["label"],
        teacher_logits,
        CLASS_OWNER,
        LOSS.replace(kd_weight=kd_weight),
    )
    return total, (new_vars["batch_stats"], logits, terms)

  (_, (stats, logits, terms)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
  )(state.params)
  return _apply_updates(state, grads, stats, tx), terms, logits


COLLECTIVE_RNG = jax.random.key(3)


@functools.lru_cache(maxsize=None)
def _collective_reference(with_teachers: bool):
  _, experts, collective, _, _, _, pooled, _ = _setup()
  teacher_list = [agents.agent_slice(experts.variables(), a) for a in range(K)]
  return _collective_by_hand(
      collective,
      pooled,
      COLLECTIVE_RNG,
      teacher_list,
      LOSS.kd_weight if with_teachers else 0.0,
  )


@pytest.mark.parametrize("with_teachers", [False, True])
def test_collective_step_equals_collaboration_loss_by_hand(
    with_teachers,
) -> None:
  tx, experts, collective, _, _, _, pooled, _ = _setup()
  rng = COLLECTIVE_RNG
  expected_state, expected_terms, logits = _collective_reference(with_teachers)
  step = jax.jit(
      functools.partial(
          steps.collective_step,
          network=COLLECTIVE,
          teacher_network=EXPERT,
          tx=tx,
          augment=_augment,
          class_owner=CLASS_OWNER,
          settings=LOSS,
      )
  )
  teachers = experts.variables() if with_teachers else None
  new_state, metrics = step(collective, pooled, rng, teachers)
  assert set(metrics) == {"ce", "kd", "align", "total", "accuracy"}
  for name in ("ce", "align", "total"):
    np.testing.assert_allclose(
        float(metrics[name]), float(expected_terms[name]), **TOL, err_msg=name
    )
  if with_teachers:
    np.testing.assert_allclose(
        float(metrics["kd"]), float(expected_terms["kd"]), **TOL
    )
    assert float(metrics["kd"]) > 0
    np.testing.assert_allclose(
        float(metrics["total"]),
        float(
            metrics["ce"]
            + LOSS.kd_weight * metrics["kd"]
            + LOSS.align_weight * metrics["align"]
        ),
        rtol=1e-5,
    )
  else:
    assert float(metrics["kd"]) == 0.0
    np.testing.assert_allclose(
        float(metrics["total"]),
        float(metrics["ce"] + LOSS.align_weight * metrics["align"]),
        rtol=1e-5,
    )
  np.testing.assert_allclose(
      float(metrics["accuracy"]),
      np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(pooled["label"])),
  )
  chex.assert_trees_all_close(new_state.params, expected_state.params, **TOL)
  chex.assert_trees_all_close(
      new_state.batch_stats, expected_state.batch_stats, **TOL
  )
  chex.assert_trees_all_close(
      new_state.opt_state, expected_state.opt_state, **TOL
  )
  assert not np.allclose(
      np.asarray(new_state.params["head"]["logits"]["kernel"]),
      np.asarray(collective.params["head"]["logits"]["kernel"]),
  )


def test_collective_step_with_the_ce_loss_is_cross_entropy_alone() -> None:
  # The ablation's S trains with the registered "ce" loss: no term of the settings reaches it,
  # whatever their weights (a weight added later cannot leak into the "RA only" row).
  tx, _, collective, _, _, _, pooled, _ = _setup()
  rng = COLLECTIVE_RNG

  @jax.jit
  def by_hand(state):
    aug_rng, dropout_rng = jax.random.split(rng)
    x = _augment(pooled["image"], aug_rng)

    def ce(params):
      logits, new_vars = COLLECTIVE.apply(
          {"params": params, "batch_stats": state.batch_stats},
          x,
          train=True,
          mutable=["batch_stats"],
          rngs={"dropout": dropout_rng},
      )
      log_p = jax.nn.log_softmax(logits)
      return (
          -jnp.mean(log_p[jnp.arange(B), pooled["label"]]),
          new_vars["batch_stats"],
      )

    (loss, stats), grads = jax.value_and_grad(ce, has_aux=True)(state.params)
    return _apply_updates(state, grads, stats, tx), loss

  expected_state, expected_loss = by_hand(collective)
  heavy = LOSS.replace(kd_weight=50.0, align_weight=50.0)
  step = jax.jit(
      functools.partial(
          steps.collective_step,
          network=COLLECTIVE,
          teacher_network=EXPERT,
          tx=tx,
          augment=_augment,
          class_owner=CLASS_OWNER,
          settings=heavy,
          loss_fn=losses.CC_LOSSES["ce"].fn,
      )
  )
  assert not losses.CC_LOSSES["ce"].uses_teachers(heavy)
  new_state, metrics = step(collective, pooled, rng, None)
  assert set(metrics) == {"ce", "total", "accuracy"}
  np.testing.assert_allclose(
      float(metrics["total"]), float(expected_loss), **TOL
  )
  chex.assert_trees_all_close(new_state.params, expected_state.params, **TOL)


def test_collective_step_teachers_change_the_update() -> None:
  # KD with these teachers is a real term: the two steps differ.
  state_none = _collective_reference(False)[0]
  state_kd = _collective_reference(True)[0]
  assert not np.allclose(
      np.asarray(state_none.params["head"]["logits"]["kernel"]),
      np.asarray(state_kd.params["head"]["logits"]["kernel"]),
  )


def test_owner_batch_index_by_hand() -> None:
  # Groups of 2, 0 and 3 images: padded to 3 by repeating a group's last image.
  gather, back = steps.owner_batch_index((2, 0, 3))
  np.testing.assert_array_equal(gather, [[0, 1, 1], [0, 0, 0], [2, 3, 4]])
  np.testing.assert_array_equal(back, [0, 1, 6, 7, 8])


# Batches grouped by owner (CLASS_OWNER: agent 0 owns 1 and 3, agent 1 owns 0 and 5, agent 2 owns
# 2 and 4); one with an empty group.
@pytest.mark.parametrize(
    "groups,labels", [((2, 1, 1), [3, 1, 5, 4]), ((3, 0, 1), [1, 3, 1, 2])]
)
def test_collective_step_owner_batch_sizes_equal_all_teachers(
    groups, labels
) -> None:
  # With kd_teachers=owner, running each expert on its own group only is the same step as
  # running every expert on every image and reading the owner's logits; and it does less work.
  tx, experts, collective, _, _, _, pooled, _ = _setup()
  batch = {"image": pooled["image"], "label": jnp.asarray(labels, jnp.int32)}
  assert [int(CLASS_OWNER[l]) for l in labels] == [
      k for k, n in enumerate(groups) for _ in range(n)
  ]
  owner = LOSS.replace(kd_teachers="owner")
  make = lambda owner_batch_sizes: jax.jit(
      functools.partial(
          steps.collective_step,
          network=COLLECTIVE,
          teacher_network=EXPERT,
          tx=tx,
          augment=_augment,
          class_owner=CLASS_OWNER,
          settings=owner,
          owner_batch_sizes=owner_batch_sizes,
      )
  )
  args = (collective, batch, COLLECTIVE_RNG, experts.variables())
  every_state, every_metrics = make(None)(*args)
  own_state, own_metrics = make(groups)(*args)
  assert float(every_metrics["kd"]) > 0
  for name in every_metrics:
    np.testing.assert_allclose(
        float(own_metrics[name]),
        float(every_metrics[name]),
        **TOL,
        err_msg=name,
    )
  chex.assert_trees_all_close(own_state, every_state, **TOL)
  flops = lambda fn: fn.lower(*args).compile().cost_analysis()["flops"]
  assert flops(make(groups)) < flops(make(None))


# ----------------------------------------------------------------------------- stage 3: altruism


@functools.lru_cache(maxsize=None)
def _frozen_forward():
  """Per agent k: S's backbone features of x[k] and expert k's logits of x[k] (eval mode)."""
  _, experts, collective, _, _, _, _, per_agent = _setup()

  @jax.jit
  def forward(bb_vars, expert_list, images):
    x = _augment(images, None)
    features = jnp.stack(
        [BACKBONE.apply(bb_vars, x[a], train=False) for a in range(K)]
    )
    teacher = jnp.stack(
        [EXPERT.apply(expert_list[a], x[a], train=False) for a in range(K)]
    )
    return features, teacher

  bb_vars = {
      "params": collective.params["backbone"],
      "batch_stats": collective.batch_stats["backbone"],
  }
  expert_list = [agents.agent_slice(experts.variables(), a) for a in range(K)]
  return bb_vars, forward(bb_vars, expert_list, per_agent["image"])


@jax.jit
def _head_step_by_hand(state_k, features_k, labels_k, teacher_k, rng_k):
  tx = _setup()[0]

  def loss_fn(params):
    logits = HEAD.apply(
        {"params": params}, features_k, train=True, rngs={"dropout": rng_k}
    )
    total, terms = losses.altruism_loss(logits, labels_k, teacher_k, LOSS)
    return total, (terms, logits)

  (_, (terms, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state_k.params
  )
  acc = jnp.mean(jnp.argmax(logits, -1) == labels_k)
  return _apply_updates(state_k, grads, {}, tx), {**terms, "accuracy": acc}


@pytest.mark.parametrize(
    "with_teacher,strategy", [(True, "vmap"), (False, "unroll")]
)
def test_altruism_step_equals_per_agent_head_updates(
    with_teacher, strategy
) -> None:
  tx, experts, _, heads, _, _, _, per_agent = _setup()
  bb_vars, (features, teacher_logits) = _frozen_forward()
  rng = jax.random.key(11)
  frozen = {"backbone": bb_vars}
  if with_teacher:
    frozen["teacher"] = experts.variables()
  step = jax.jit(
      functools.partial(
          steps.altruism_step,
          backbone=BACKBONE,
          head=HEAD,
          teacher_network=EXPERT,
          teacher_is_stacked=True,
          tx=tx,
          augment=_augment,
          settings=LOSS,
          strategy=strategy,
      )
  )
  new_state, metrics = step(heads, per_agent, rng, frozen)
  # By hand, with the same keys as the step: aug_rng, rng = split(rng); one key per agent.
  _, head_rng = jax.random.split(rng)
  keys = jax.random.split(head_rng, K)
  expected = agents.stack_agents(
      [
          _head_step_by_hand(
              agents.agent_slice(heads, a),
              features[a],
              per_agent["label"][a],
              teacher_logits[a] if with_teacher else None,
              keys[a],
          )
          for a in range(K)
      ]
  )
  expected_state, expected_metrics = expected
  # Only the heads are trained: the new state is a head state, no BatchNorm statistics.
  assert jax.tree.structure(new_state) == jax.tree.structure(heads)
  assert new_state.batch_stats == {}
  assert _changed_per_agent(heads.params, new_state.params).all()
  chex.assert_trees_all_close(new_state.params, expected_state.params, **TOL)
  chex.assert_trees_all_close(
      new_state.opt_state, expected_state.opt_state, **TOL
  )
  chex.assert_trees_all_close(metrics, expected_metrics, **TOL)
  assert metrics["kd"].shape == (K,)
  if with_teacher:
    assert np.all(np.asarray(metrics["kd"]) > 0)
  else:
    np.testing.assert_array_equal(np.asarray(metrics["kd"]), np.zeros(K))


# ----------------------------------------------------------------------------- predict


def _np_lse(z):
  return special.logsumexp(np.asarray(z, np.float64), axis=-1)


def _np_route(stack):
  """[M, B, C] -> [B] prediction of the model with the highest logsumexp (first on ties)."""
  m = np.argmax(_np_lse(stack), axis=0)
  return np.array([np.argmax(stack[m[b], b]) for b in range(stack.shape[1])])


def _np_grown(s, heads):
  """[K, B, C] logits: own head if strictly more confident than S, else S."""
  own = _np_lse(heads) > _np_lse(s)[None]
  return np.where(own[..., None], heads, s[None])


def _all_logits(experts_v, s_v, heads_v, s_ce_v, heads_ce_v, images):
  """Every model's eval-mode logits, model by model (no agent_map, no routing)."""
  x = _normalize(images)
  out = {
      "experts": jnp.stack(
          [
              EXPERT.apply(agents.agent_slice(experts_v, a), x, train=False)
              for a in range(K)
          ]
      )
  }
  for name, s, h in (("cc", s_v, heads_v), ("ce", s_ce_v, heads_ce_v)):
    feats = BACKBONE.apply(
        {
            "params": s["params"]["backbone"],
            "batch_stats": s["batch_stats"]["backbone"],
        },
        x,
        train=False,
    )
    out[name] = COLLECTIVE.apply(s, x, train=False)
    out[name + "_heads"] = jnp.stack(
        [
            HEAD.apply(agents.agent_slice(h, a), feats, train=False)
            for a in range(K)
        ]
    )
  return out


def _heads_around(s_params, z):
  """K heads on S's features that beat S on about half the samples, with other argmaxes.

  Head k = S's head with classes permuted by pi_k, logits scaled by alpha_k and
  shifted by gamma_k: its logits are alpha_k * z[:, pi_k] + gamma_k, whose
  logsumexp minus S's varies per sample; gamma_k puts the split at the median.
  """
  heads = []
  for a in range(K):
    perm, alpha = np.roll(np.arange(C), a + 1), 1.5 + 0.5 * a
    d = np.sort(_np_lse(alpha * z) - _np_lse(z))
    gamma = -(d[len(d) // 2 - 1] + d[len(d) // 2]) / 2
    logits = s_params["logits"]
    heads.append(
        {
            "dense0": s_params["dense0"],
            "logits": {
                "kernel": alpha * logits["kernel"][:, perm],
                "bias": alpha * logits["bias"][perm] + gamma,
            },
        }
    )
  return {"params": agents.stack_agents(heads)}


@functools.lru_cache(maxsize=None)
def _predict_case():
  """Variables whose energy routing really mixes models, and their logits (float64)."""
  _, experts, collective, heads, collective_ce, heads_ce, _, _ = _setup()
  images = jnp.asarray(
      np.random.default_rng(5).integers(0, 256, (8, 8, 8, 1)), jnp.uint8
  )
  forward = jax.jit(_all_logits)
  variables = {
      "experts": experts.variables(),
      "collective": collective.variables(),
      "heads": heads.variables(),
      "collective_ce": collective_ce.variables(),
      "heads_ce": heads_ce.variables(),
  }
  first = jax.tree.map(
      lambda v: np.asarray(v, np.float64), forward(*variables.values(), images)
  )
  # Experts: shift each one's logits so that its median logsumexp is 0 (argmaxes unchanged).
  shift = np.median(_np_lse(first["experts"]), axis=1)  # [K]
  expert_params = jax.tree.map(lambda x: x, experts.params)
  expert_params["head"]["logits"]["bias"] = (
      experts.params["head"]["logits"]["bias"] - shift[:, None]
  )
  variables["experts"] = {
      "params": expert_params,
      "batch_stats": experts.batch_stats,
  }
  variables["heads"] = _heads_around(collective.params["head"], first["cc"])
  variables["heads_ce"] = _heads_around(
      collective_ce.params["head"], first["ce"]
  )
  logits = jax.tree.map(
      lambda v: np.asarray(v, np.float64), forward(*variables.values(), images)
  )
  # The case is well conditioned (no near-ties) and exercises every branch of the routing.
  for name in ("cc", "ce"):
    gap = _np_lse(logits[name + "_heads"]) - _np_lse(logits[name])[None]
    assert np.abs(gap).min() > 1e-5 and 0 < (gap > 0).mean() < 1
    assert not np.array_equal(
        np.argmax(logits[name + "_heads"], -1),
        np.broadcast_to(np.argmax(logits[name], -1), (K, 8)),
    )
  lse = np.sort(_np_lse(logits["experts"]), axis=0)
  assert (lse[-1] - lse[-2]).min() > 1e-5
  assert len(set(np.argmax(_np_lse(logits["experts"]), axis=0).tolist())) > 1
  return variables, images, logits


def _society(routing="energy", margin=0.0):
  """The parts of ``train.Society`` that the stage table's predictions read."""
  config = types.SimpleNamespace(
      routing=routing,
      routing_margin=margin,
      loss=types.SimpleNamespace(energy_temperature=1.0),
  )
  return types.SimpleNamespace(
      expert_network=EXPERT,
      collective_network=COLLECTIVE,
      backbone=BACKBONE,
      head=HEAD,
      num_agents=K,
      strategy="auto",
      config=config,
  )


@pytest.mark.parametrize(
    "trained",
    [
        ("experts",),
        ("experts", "collective", "altruism"),
        ("collective", "collective_ce", "altruism_ce"),
    ],
)
def test_stage_table_predictions(trained) -> None:
  all_vars, images, logits = _predict_case()
  specs = tuple(protocol.BY_NAME[name] for name in trained)
  present = {spec.variables_key for spec in specs}
  predict = jax.jit(
      lambda v, x: protocol.predict_rows(_society(), specs, v, x, _normalize)
  )
  out = predict({k: all_vars[k] for k in present}, images)
  n = images.shape[0]
  expected = {}
  if "experts" in present:
    expected.update(
        before_growth=np.argmax(logits["experts"], -1),
        society_before_growth=_np_route(logits["experts"]),
    )
  if "collective" in present:
    cc = np.argmax(logits["cc"], -1)
    # CC only: every agent answers with S, and so does the society.
    expected.update(
        cc=cc, cc_only=np.broadcast_to(cc, (K, n)), society_cc_only=cc
    )
  routed = {}
  if "heads" in present:
    grown = _np_grown(logits["cc"], logits["cc_heads"])
    expected.update(
        after_growth=np.argmax(grown, -1), society_after_growth=_np_route(grown)
    )
    routed["after_growth"] = _np_routing_outputs(
        logits["cc"], logits["cc_heads"]
    )
  if "collective_ce" in present:
    ce = np.argmax(logits["ce"], -1)
    # Joint training: the CE-only collective answers for every agent and the society.
    expected.update(ce=ce, joint=np.broadcast_to(ce, (K, n)), society_joint=ce)
  if "heads_ce" in present:
    grown = _np_grown(logits["ce"], logits["ce_heads"])
    expected.update(
        ra_only=np.argmax(grown, -1),
        society_ra_only=_np_route(grown),
    )
    routed["ra_only"] = _np_routing_outputs(logits["ce"], logits["ce_heads"])
  # What each grown row's routing saw (the diagnostics' inputs), by another route.
  for row, outputs in routed.items():
    for name, value in outputs.items():
      got = np.asarray(out.pop(f"routing/{row}/{name}"))
      if name.endswith("energy"):
        np.testing.assert_allclose(
            got, value, rtol=1e-5, atol=1e-5, err_msg=name
        )
      else:
        np.testing.assert_array_equal(got, value, err_msg=name)
  assert set(out) == set(expected)
  for key, value in expected.items():
    per_agent = key in (
        "before_growth",
        "after_growth",
        "ra_only",
        "cc_only",
        "joint",
    )
    assert out[key].shape == ((K, n) if per_agent else (n,)), key
    assert jnp.issubdtype(out[key].dtype, jnp.integer), key
    np.testing.assert_array_equal(np.asarray(out[key]), value, err_msg=key)


def _np_routing_outputs(s_logits, head_logits):
  """Who answers (own head iff its free energy is strictly lower: ties go to S), each
  model's argmax, and the free energies -logsumexp (temperature 1)."""
  head_energy, s_energy = -_np_lse(head_logits), -_np_lse(s_logits)
  return {
      "uses_head": head_energy < s_energy[None],
      "head_pred": np.argmax(head_logits, -1),
      "collective_pred": np.argmax(s_logits, -1),
      "head_energy": head_energy,
      "collective_energy": s_energy,
  }


def _np_msp_route(stack):
  """[M, B, C] -> [B]: the model with the highest maximum softmax probability (first on ties)."""
  p = special.softmax(np.asarray(stack, np.float64), axis=-1).max(-1)
  return np.argmax(p, axis=0)


def _np_margin_route(stack, margin):
  """[M, B, C] -> [B]: the first model whose free energy is within ``margin`` of the lowest."""
  energy = -_np_lse(stack)
  return np.array(
      [
          np.flatnonzero(energy[:, b] <= energy[:, b].min() + margin)[0]
          for b in range(stack.shape[1])
      ]
  )


@pytest.mark.parametrize("rule,margin", [("msp", 0.0), ("energy_margin", 0.5)])
def test_stage_table_predictions_follow_the_configured_rule(
    rule, margin
) -> None:
  # The rule is used where each agent picks S or its own head, and across agents.
  all_vars, images, logits = _predict_case()
  specs = (
      protocol.BY_NAME["experts"],
      protocol.BY_NAME["collective"],
      protocol.BY_NAME["altruism"],
  )
  predict = jax.jit(
      lambda v, x: protocol.predict_rows(
          _society(rule, margin), specs, v, x, _normalize
      )
  )
  out = predict(
      {k: all_vars[k] for k in ("experts", "collective", "heads")}, images
  )
  route = (
      _np_msp_route
      if rule == "msp"
      else functools.partial(_np_margin_route, margin=margin)
  )

  def pick(stack):
    m = route(stack)
    return stack[m, np.arange(stack.shape[1])]

  grown = np.stack(
      [pick(np.stack([logits["cc"], logits["cc_heads"][a]])) for a in range(K)]
  )
  np.testing.assert_array_equal(
      np.asarray(out["after_growth"]), np.argmax(grown, -1)
  )
  np.testing.assert_array_equal(
      np.asarray(out["society_after_growth"]), np.argmax(pick(grown), -1)
  )
  np.testing.assert_array_equal(
      np.asarray(out["society_before_growth"]),
      np.argmax(pick(logits["experts"]), -1),
  )
  # The rule matters here: energy routing answers differently on this case.
  energy = np.argmax(_np_grown(logits["cc"], logits["cc_heads"]), -1)
  assert not np.array_equal(np.asarray(out["after_growth"]), energy)
