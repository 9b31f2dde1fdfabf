"""Experimental speed patches, applied inside a benchmark worker only (``--patch NAME``).

These let the benchmarks measure a proposed library change without editing the
library: each patch swaps a function of ``flax``/``masc_jax`` for a rewrite
that computes the same values. ``tests`` in ``benchmarks/check_patches.py``
(run ``python -m benchmarks.check_patches``) compare every patch against the
original, forward and gradient. Nothing here is imported by the library.

Patches:
  maxpool      (now the library's own pooling: ``kernels.max_pool_2x2``; this
               patch only matters for code that still calls ``nn.max_pool``)
               2x2/2 max-pool as reshape+max with a custom VJP whose gradient
               goes to the first maximum of each window (exactly what XLA's
               select-and-scatter, JAX's autodiff of reduce_window max, does),
               computed with elementwise ops instead of the select-and-scatter /
               variadic reduce-window that XLA:CPU emits for the default VJP.
  im2col=N     kernels.IM2COL_MAX_PIXELS = N ('auto' uses im2col up to N pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

from masc_jax.nn.kernels import max_pool_2x2  # adopted by the library (BUILD_NOTES.md)


def apply(patches: Sequence[str]) -> list[str]:
  """Apply the named patches in this process; returns their descriptions."""
  applied = []
  for patch in patches:
    name, _, arg = patch.partition("=")
    if name == "maxpool":
      import flax.linen as nn

      original = nn.max_pool

      def patched(inputs, window_shape, strides=None, padding="VALID"):
        if (
            tuple(window_shape) == (2, 2)
            and tuple(strides or ()) == (2, 2)
            and padding == "VALID"
        ):
          return max_pool_2x2(inputs)
        return original(inputs, window_shape, strides=strides, padding=padding)

      nn.max_pool = patched
      applied.append(
          "maxpool: 2x2 max-pool as reshape+max, custom VJP (first max)"
      )
    elif name == "im2col":
      from masc_jax.nn import kernels

      kernels.IM2COL_MAX_PIXELS = int(arg)
      applied.append(f"im2col: IM2COL_MAX_PIXELS={int(arg)}")
    elif name:
      raise ValueError(f"unknown patch {patch!r}")
  return applied
