"""Tests for masc_jax.method.agents: stacked agents equal K separate single-agent programs.

The reference is always a Python loop over agents calling the plain
single-agent function on agent k's slice.
"""

from __future__ import annotations

import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masc_jax.method import agents, losses, steps
from masc_jax.nn import network
from conftest import random_variables

# Each test compares programs it compiles itself, for a few steps: compiled
# with most of XLA's optimisation off (conftest.quick_compile).
pytestmark = pytest.mark.usefixtures("quickly_compiled")

STRATEGIES = ("vmap", "unroll")


def _tree(k: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "w": jnp.asarray(rng.standard_normal((k, 3, 2)), jnp.float32),
      "nested": {
          "b": jnp.asarray(rng.standard_normal((k, 2)), jnp.float32),
          "n": jnp.asarray(rng.integers(0, 9, (k,)), jnp.int32),
      },
  }


def _fn(tree, shared, own):
  """A per-agent function with a dict/tuple output mixing stacked and shared inputs."""
  y = shared @ tree["w"] + tree["nested"]["b"] * tree["nested"]["n"]
  return {"y": y, "pair": (jnp.sum(own * y), own.shape[0] * jnp.ones(()))}


# ----------------------------------------------------------------------------- stacking


def test_stack_unstack_round_trip() -> None:
  k = 4
  trees = [jax.tree.map(lambda x: x[0], _tree(1, seed)) for seed in range(k)]
  stacked = agents.stack_agents(trees)
  assert agents.num_agents(stacked) == k
  for leaf, *per_agent in zip(
      jax.tree.leaves(stacked), *[jax.tree.leaves(t) for t in trees]
  ):
    assert leaf.shape == (k,) + per_agent[0].shape
    for a in range(k):
      np.testing.assert_array_equal(
          np.asarray(leaf[a]), np.asarray(per_agent[a])
      )
  for a in range(k):
    chex.assert_trees_all_equal(agents.agent_slice(stacked, a), trees[a])
  back = agents.unstack_agents(stacked)
  assert len(back) == k
  for a in range(k):
    chex.assert_trees_all_equal(back[a], trees[a])
  chex.assert_trees_all_equal(agents.stack_agents(back), stacked)


def test_num_agents_errors() -> None:
  with pytest.raises(ValueError, match="disagree"):
    agents.num_agents({"a": jnp.zeros((3, 2)), "b": jnp.zeros((4,))})
  with pytest.raises(ValueError):
    agents.stack_agents([])


def test_init_stacked_equals_separate_inits() -> None:
  keys = jax.random.split(jax.random.key(0), 3)
  init = lambda key: {
      "a": jax.random.normal(key, (2, 3)),
      "b": jax.random.uniform(key, (4,)),
  }
  stacked = agents.init_stacked(init, keys)
  for a in range(3):
    chex.assert_trees_all_close(
        agents.agent_slice(stacked, a), init(keys[a]), rtol=1e-6, atol=1e-7
    )


def test_resolve_strategy() -> None:
  assert agents.resolve_strategy("vmap") == "vmap"
  assert agents.resolve_strategy("unroll") == "unroll"
  # auto: unrolled on XLA:CPU (grouped convolutions are slow there), one batched program elsewhere.
  assert agents.resolve_strategy("auto", "cpu") == "unroll"
  assert agents.resolve_strategy("auto", "gpu") == "vmap"
  assert agents.resolve_strategy("auto", "tpu") == "vmap"
  assert agents.resolve_strategy("auto") == agents.resolve_strategy(
      "auto", jax.default_backend()
  )
  with pytest.raises(ValueError, match="pmap"):
    agents.resolve_strategy("pmap")
  with pytest.raises(ValueError):
    agents.agent_map(lambda x: x, strategy="loop")


# ----------------------------------------------------------------------------- agent_map


def _loop(fn, in_axes, *args):
  k = agents.num_agents([a for a, ax in zip(args, in_axes) if ax == 0])
  outs = [
      fn(
          *[
              agents.agent_slice(a, i) if ax == 0 else a
              for a, ax in zip(args, in_axes)
          ]
      )
      for i in range(k)
  ]
  return agents.stack_agents(outs)


@pytest.mark.parametrize("strategy", STRATEGIES + ("auto",))
@pytest.mark.parametrize("jit", [False, True])
def test_agent_map_mixed_in_axes_equals_loop(strategy, jit) -> None:
  k = 3
  tree = _tree(k)
  shared = jnp.asarray(
      np.random.default_rng(1).standard_normal((5, 3)), jnp.float32
  )
  own = jnp.asarray(
      np.random.default_rng(2).standard_normal((k, 5, 2)), jnp.float32
  )
  in_axes = (0, None, 0)
  mapped = agents.agent_map(_fn, in_axes=in_axes, strategy=strategy)
  if jit:
    mapped = jax.jit(mapped)
  got = mapped(tree, shared, own)
  expected = _loop(_fn, in_axes, tree, shared, own)
  assert got["y"].shape == (k, 5, 2)
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_agent_map_single_int_in_axes(strategy) -> None:
  k = 3
  a = jnp.arange(k * 4, dtype=jnp.float32).reshape(k, 4)
  b = jnp.ones((k, 4)) * jnp.arange(k)[:, None]
  got = agents.agent_map(
      lambda x, y: (x * y).sum(), in_axes=0, strategy=strategy
  )(a, b)
  np.testing.assert_allclose(
      np.asarray(got), [float((a[i] * b[i]).sum()) for i in range(k)]
  )


def test_agent_map_unroll_errors() -> None:
  x = jnp.zeros((3, 2))
  with pytest.raises(ValueError, match="0 or None"):
    agents.agent_map(lambda a: a, in_axes=1, strategy="unroll")(x)
  with pytest.raises(ValueError, match="stacked"):
    agents.agent_map(lambda a: a, in_axes=None, strategy="unroll")(x)
  with pytest.raises(ValueError, match="entries"):
    agents.agent_map(lambda a, b: a, in_axes=(0,), strategy="unroll")(x, x)


# ----------------------------------------------------------------------------- stacked networks

K, B, C = 3, 4, 6
NET = network.Network(
    widths=(4, 8),
    pool_after=(0, 1),
    head_hidden=(16,),
    num_classes=C,
    dropout_rate=0.5,
)
OPTIM = types.SimpleNamespace(
    learning_rate=0.05, momentum=0.9, weight_decay=5e-4, grad_clip_norm=0.0
)
TOL = dict(rtol=1e-5, atol=1e-6)


def _augment(images, rng):
  del rng
  return images.astype(jnp.float32) / 255.0


def _random_state(seed, tx):
  """A tiny expert's state with random values (shapes from ``init`` traced, not compiled)."""
  variables = random_variables(NET, jnp.zeros((2, 8, 8, 1)), seed)
  return steps.ModelState(
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]),
  )


@functools.lru_cache(maxsize=None)
def _setup():
  tx = steps.make_optimizer(OPTIM)
  state = agents.stack_agents([_random_state(seed, tx) for seed in range(K)])
  rng = np.random.default_rng(0)
  batch = {
      "image": jnp.asarray(rng.integers(0, 256, (K, B, 8, 8, 1)), jnp.uint8),
      "label": jnp.asarray(rng.integers(0, C, (K, B)), jnp.int32),
  }
  return tx, state, batch


def _one_agent(state_k, images, labels, rng_k):
  """One agent by hand: eval logits, CE gradient, new BN stats, and one SGD step.

  The same key use as ``steps.expert_step``: ``aug_rng, dropout_rng = split(rng_k)``.
  """
  tx = _setup()[0]
  aug_rng, dropout_rng = jax.random.split(rng_k)
  x = _augment(images, aug_rng)
  eval_logits = NET.apply(state_k.variables(), x, train=False)

  def loss_fn(params):
    logits, new_vars = NET.apply(
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

  (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state_k.params
  )
  updates, opt_state = tx.update(grads, state_k.opt_state, state_k.params)
  new = steps.ModelState(
      params=jax.tree.map(lambda p, u: p + u, state_k.params, updates),
      batch_stats=stats,
      opt_state=opt_state,
  )
  acc = jnp.mean(jnp.argmax(logits, -1) == labels)
  return {
      "eval_logits": eval_logits,
      "grads": grads,
      "state": new,
      "metrics": {"ce": loss, "total": loss, "accuracy": acc},
  }


STEP_RNG = jax.random.key(7)


@functools.lru_cache(maxsize=None)
def _reference():
  """K separate single-agent calls (one compiled single-agent program, called K times)."""
  _, state, batch = _setup()
  one = jax.jit(_one_agent)
  keys = jax.random.split(STEP_RNG, K)
  return agents.stack_agents(
      [
          one(
              agents.agent_slice(state, a),
              batch["image"][a],
              batch["label"][a],
              keys[a],
          )
          for a in range(K)
      ]
  )


def test_vmapped_networks_logits_grads_and_step_equal_loop() -> None:
  _, state, batch = _setup()
  expected = _reference()
  mapped = jax.jit(
      agents.agent_map(_one_agent, in_axes=(0, 0, 0, 0), strategy="vmap")
  )
  got = mapped(
      state, batch["image"], batch["label"], jax.random.split(STEP_RNG, K)
  )
  chex.assert_trees_all_close(got, expected, **TOL)
  assert got["eval_logits"].shape == (K, B, C)
  # The agents really differ (distinct inits and batches), so a mix-up of agents would show.
  assert not np.allclose(
      np.asarray(got["eval_logits"][0]), np.asarray(got["eval_logits"][1])
  )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expert_step_equals_separate_single_agent_steps(strategy) -> None:
  tx, state, batch = _setup()
  expected = _reference()
  step = jax.jit(
      functools.partial(
          steps.expert_step,
          network=NET,
          tx=tx,
          augment=_augment,
          strategy=strategy,
      )
  )
  new_state, metrics = step(state, batch, STEP_RNG)
  expected_state = expected["state"]
  chex.assert_trees_all_close(new_state.params, expected_state.params, **TOL)
  chex.assert_trees_all_close(
      new_state.batch_stats, expected_state.batch_stats, **TOL
  )
  chex.assert_trees_all_close(
      new_state.opt_state, expected_state.opt_state, **TOL
  )
  chex.assert_trees_all_close(metrics, expected["metrics"], **TOL)
  assert metrics["ce"].shape == (K,)
  # The step did change the parameters and BatchNorm statistics of every agent.
  for before, after in (
      (state.params, new_state.params),
      (state.batch_stats, new_state.batch_stats),
  ):
    diffs = jax.tree.map(
        lambda a, b: jnp.abs(a - b).reshape(K, -1).max(axis=1), before, after
    )
    assert np.all(np.max(np.stack(jax.tree.leaves(diffs)), axis=0) > 0)


def test_gradient_clipping_is_per_agent() -> None:
  """optim.grad_clip_norm clips each agent's own gradient norm, not the norm over all agents."""
  _, state, batch = _setup()
  norms = [
      float(optax_global_norm(agents.agent_slice(_reference()["grads"], a)))
      for a in range(K)
  ]
  clip = float(np.median(norms))  # some agents above the clip, some below
  assert min(norms) < clip <= max(norms) and min(norms) < 0.95 * clip
  tx = steps.make_optimizer(
      types.SimpleNamespace(**{**vars(OPTIM), "grad_clip_norm": clip})
  )
  state = steps.ModelState(
      params=state.params,
      batch_stats=state.batch_stats,
      opt_state=jax.vmap(tx.init)(state.params),
  )
  step = jax.jit(
      functools.partial(steps.expert_step, network=NET, tx=tx, augment=_augment)
  )
  new_state, _ = step(state, batch, STEP_RNG)
  # By hand, agent by agent: SGD on the gradient scaled by min(1, clip / its own norm).
  for a in range(K):
    grads = agents.agent_slice(_reference()["grads"], a)
    scale = min(1.0, clip / norms[a])
    params = agents.agent_slice(state.params, a)
    expected = jax.tree.map(
        lambda p, g: p
        - OPTIM.learning_rate * (scale * g + OPTIM.weight_decay * p),
        params,
        grads,
    )
    chex.assert_trees_all_close(
        agents.agent_slice(new_state.params, a), expected, rtol=1e-5, atol=1e-6
    )


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
