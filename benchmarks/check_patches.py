"""Check that every patch of ``benchmarks.patches`` computes exactly what it replaces.

    python -m benchmarks.check_patches

Compares values and gradients bit for bit on random data, on data full of ties
(small integers, ReLU zeros) and inside the expert network's train step
(``stages.expert_step``) for a few steps.
"""

from __future__ import annotations

import functools
import sys

import numpy as np


def check_maxpool() -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from benchmarks.patches import max_pool_2x2

  rng = np.random.default_rng(0)
  cases = {
      "normal": rng.standard_normal((3, 8, 8, 5)).astype(np.float32),
      "ties (ints 0..2)": rng.integers(0, 3, (3, 8, 8, 5)).astype(np.float32),
      "relu zeros": np.maximum(rng.standard_normal((2, 6, 6, 4)), 0).astype(
          np.float32
      ),
      "odd size": rng.standard_normal((2, 7, 5, 3)).astype(np.float32),
      "stacked [K,B,...]": rng.integers(0, 2, (2, 3, 4, 4, 2)).astype(
          np.float32
      ),
  }
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  for name, x in cases.items():
    x = jnp.asarray(x)
    g = jnp.asarray(rng.standard_normal(ref(x).shape).astype(np.float32))
    y0, vjp0 = jax.vjp(ref, x)
    y1, vjp1 = jax.vjp(max_pool_2x2, x)
    np.testing.assert_array_equal(
        np.asarray(y0), np.asarray(y1), err_msg=f"maxpool fwd {name}"
    )
    np.testing.assert_array_equal(
        np.asarray(vjp0(g)[0]),
        np.asarray(vjp1(g)[0]),
        err_msg=f"maxpool grad {name}",
    )
    # Also under jit and vmap.
    dx0 = jax.jit(jax.vmap(lambda a, b: jax.vjp(ref, a)[1](b)[0]))(
        x[None], g[None]
    )
    dx1 = jax.jit(jax.vmap(lambda a, b: jax.vjp(max_pool_2x2, a)[1](b)[0]))(
        x[None], g[None]
    )
    np.testing.assert_array_equal(
        np.asarray(dx0), np.asarray(dx1), err_msg=f"maxpool jit/vmap {name}"
    )
    print(f"maxpool {name}: forward and gradient identical")


def check_step(patch: str, steps: int = 3, strategy: str = "vmap") -> None:
  """Run the real expert step with and without the patch (separate traces); compare."""
  import flax.linen as nn
  import jax
  from benchmarks import agent_step, patches

  spec = dict(
      kind="jax",
      stage="experts",
      agents=2,
      strategy=strategy,
      conv_impl="auto",
      batch=8,
      input="digits",
      dtype="float32",
  )
  outs = []
  original = nn.max_pool
  for use in (False, True):
    nn.max_pool = original
    if use:
      patches.apply([patch])
    jitted, (state, batch, frozen), *_ = agent_step.build_jax_step(spec)
    for i in range(steps):
      state, metrics = jitted(state, batch, jax.random.key(i), frozen)
    outs.append((jax.device_get(state.params), jax.device_get(metrics)))
  nn.max_pool = original
  flat0 = jax.tree.leaves(outs[0])
  flat1 = jax.tree.leaves(outs[1])
  worst = max(float(np.max(np.abs(a - b))) for a, b in zip(flat0, flat1))
  exact = all(np.array_equal(a, b) for a, b in zip(flat0, flat1))
  print(
      f"{patch} in expert_step ({steps} steps, digits widths, {strategy}): "
      + (
          "bit-identical params and metrics"
          if exact
          else f"max abs difference {worst:.3g}"
      )
  )
  if not exact and worst > 1e-5:
    raise AssertionError(f"{patch}: train step differs by {worst}")


def main() -> int:
  check_maxpool()
  check_step("maxpool", strategy="vmap")
  check_step("maxpool", strategy="unroll")
  return 0


if __name__ == "__main__":
  sys.exit(main())
