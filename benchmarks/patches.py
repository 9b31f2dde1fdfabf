"""Experimental speed patches, applied inside a benchmark worker only (``--patch NAME``).

These let the benchmarks measure a proposed library change without editing the
library: each patch swaps a function of ``flax``/``masc_jax`` for a rewrite
that computes the same values. ``tests`` in ``benchmarks/check_patches.py``
(run ``python -m benchmarks.check_patches``) compare every patch against the
original, forward and gradient. Nothing here is imported by the library.

Patches:
  maxpool      2x2/2 max-pool as reshape+max with a custom VJP whose gradient
               goes to the first maximum of each window (exactly what XLA's
               select-and-scatter, JAX's autodiff of reduce_window max, does),
               computed with elementwise ops instead of the select-and-scatter /
               variadic reduce-window that XLA:CPU emits for the default VJP.
  im2col=N     models.IM2COL_MAX_PIXELS = N ('auto' uses im2col up to N pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 VALID max-pool over the two axes before the last: ``[..., H, W, C]``."""
  return _pool_fwd(x)[0]


def _windows(x):
  *lead, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[..., : 2 * h2, : 2 * w2, :]
  return x.reshape(*lead, h2, 2, w2, 2, c), (h, w)


def _pool_fwd(x):
  xr, _ = _windows(x)
  y = jnp.max(xr, axis=(-4, -2))
  return y, (x, y)


def _pool_bwd(res, g):
  x, y = res
  xr, (h, w) = _windows(x)
  taken = None
  parts = []
  # Window order of select-and-scatter: row-major over (dh, dw); the first maximum wins.
  for dh in (0, 1):
    for dw in (0, 1):
      tap = xr[..., :, dh, :, dw, :]
      hit = tap == y
      if taken is not None:
        hit = hit & ~taken
      taken = hit if taken is None else (taken | hit)
      parts.append(jnp.where(hit, g, jnp.zeros_like(g)))
  # parts[2*dh + dw]: [..., h2, w2, c] -> [..., h2, 2, w2, 2, c]
  stacked = jnp.stack(parts, axis=-2)                       # [..., h2, w2, 4, c]
  *lead, h2, w2, _, c = stacked.shape
  stacked = stacked.reshape(*lead, h2, w2, 2, 2, c)
  stacked = jnp.moveaxis(stacked, -3, -4)                   # [..., h2, 2(dh), w2, 2(dw), c]
  dx = stacked.reshape(*lead, 2 * h2, 2 * w2, c)
  if (2 * h2, 2 * w2) != (h, w):
    pad = [(0, 0)] * (dx.ndim - 3) + [(0, h - 2 * h2), (0, w - 2 * w2), (0, 0)]
    dx = jnp.pad(dx, pad)
  return (dx,)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


def apply(patches: Sequence[str]) -> list[str]:
  """Apply the named patches in this process; returns their descriptions."""
  applied = []
  for patch in patches:
    name, _, arg = patch.partition("=")
    if name == "maxpool":
      import flax.linen as nn
      original = nn.max_pool

      def patched(inputs, window_shape, strides=None, padding="VALID"):
        if tuple(window_shape) == (2, 2) and tuple(strides or ()) == (2, 2) and padding == "VALID":
          return max_pool_2x2(inputs)
        return original(inputs, window_shape, strides=strides, padding=padding)

      nn.max_pool = patched
      applied.append("maxpool: 2x2 max-pool as reshape+max, custom VJP (first max)")
    elif name == "im2col":
      from masc_jax import models
      models.IM2COL_MAX_PIXELS = int(arg)
      applied.append(f"im2col: IM2COL_MAX_PIXELS={int(arg)}")
    elif name:
      raise ValueError(f"unknown patch {patch!r}")
  return applied
