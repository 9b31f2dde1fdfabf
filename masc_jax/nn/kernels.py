"""The exact kernels of the networks: each pass of a 3x3 convolution, and a 2x2 max-pool.

A 3x3, stride-1, SAME convolution can be computed several exact ways, and the
fastest differs by backend and layer shape: ``CONV_PASSES`` names every way of
computing each pass (forward, input gradient ``dx``, filter gradient ``dw``).
``masc_jax.nn.conv`` composes them into one convolution with a custom
gradient, and ``masc_jax.nn.conv_tuning`` measures them per layer. Every
method of a pass gives the same value to float rounding (tests/test_models.py,
tests/test_conv_tuning.py).

``max_pool_2x2`` is a 2x2 max-pool whose gradient is elementwise (see there).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# At or below this many output pixels, "auto" computes a 3x3 convolution as one
# matrix multiply over im2col patches. XLA:CPU runs 3x3 kernels on tiny maps
# (2x2, mostly padding) very slowly; a matmul of the same values is fast on
# every backend. See BUILD_NOTES.md "Performance" for the measurements (4 was
# 2-3% cheaper per step on one core; within noise, and 16 is kept).
IM2COL_MAX_PIXELS = 16


def im2col_3x3(x: jax.Array) -> jax.Array:
  """SAME-padded 3x3 patches: ``[..., H, W, C] -> [..., H, W, 9*C]``.

  Tap ``(i, j)`` of the kernel lands at channels ``(3*i + j)*C .. +C``, which is
  the order of ``kernel.reshape(9*C, F)`` for an HWIO kernel.
  """
  *_, h, w, _ = x.shape
  pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
  xp = jnp.pad(x, pad)
  taps = [xp[..., i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
  return jnp.concatenate(taps, axis=-1)


_NHWC = ("NHWC", "HWIO", "NHWC")


def lax_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding="SAME", dimension_numbers=_NHWC
  )


def im2col_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return im2col_3x3(x) @ kernel.reshape(9 * x.shape[-1], kernel.shape[-1])


# The exact ways to compute each pass of the convolution; a plan
# ``(fwd, dx, dw)`` names one per pass (``planned_conv3x3``). Each function
# takes ``(x, kernel)`` (fwd) or ``(x, kernel, g)`` (dx, dw; ``g`` is the
# output gradient, and dx reads only the shape of ``x``, dw only that of
# ``kernel``).
#   fwd  xla         lax.conv_general_dilated
#        im2col      patches @ kernel
#   dx   xla         the transposed lax conv (autodiff's input gradient of lax.conv)
#        im2col      patches of g @ the flipped, in/out-swapped kernel
#        im2col_vjp  autodiff of the im2col forward (g @ kernel^T, then the
#                    adjoint of the patch extraction: nine shifted adds)
#   dw   xla         a lax conv with the operands' roles swapped (see xla_conv3x3)
#        lax_vjp     autodiff's filter gradient of lax.conv
#        im2col      patches^T @ g
def _dx_xla(x, kernel, g):
  return jax.vjp(lambda x_: lax_conv3x3(x_, kernel), x)[1](g)[0]


def _dx_im2col(x, kernel, g):
  del x
  # dx = g correlated with the kernel rotated by 180 degrees, in and out swapped.
  return im2col_conv3x3(g, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))


def _dx_im2col_vjp(x, kernel, g):
  return jax.vjp(lambda x_: im2col_conv3x3(x_, kernel), x)[1](g)[0]


def _dw_xla(x, kernel, g):
  del kernel
  # out[co, i, j, ci] = sum_{b,h,w} g_padded[b, h + i, w + j, co] * x[b, h, w, ci],
  # i.e. the correlation of g with x as the kernel: tap (ti, tj) of the filter
  # gradient is out[:, 2 - ti, 2 - tj, :].
  roles = jax.lax.ConvDimensionNumbers(
      lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(0, 3, 1, 2)
  )
  out = jax.lax.conv_general_dilated(
      g,
      x,
      window_strides=(1, 1),
      padding=((1, 1), (1, 1)),
      dimension_numbers=roles,
  )  # [Cout, 3, 3, Cin]
  return jnp.transpose(out[:, ::-1, ::-1, :], (1, 2, 3, 0))  # [3, 3, Cin, Cout]


def _dw_lax_vjp(x, kernel, g):
  return jax.vjp(lambda k_: lax_conv3x3(x, k_), kernel)[1](g)[0]


def _dw_im2col(x, kernel, g):
  lead = tuple(range(x.ndim - 1))
  dw = jnp.tensordot(im2col_3x3(x), g, axes=(lead, lead))  # [9*Cin, Cout]
  return dw.reshape(kernel.shape)


CONV_PASSES = {
    "fwd": {"xla": lax_conv3x3, "im2col": im2col_conv3x3},
    "dx": {"xla": _dx_xla, "im2col": _dx_im2col, "im2col_vjp": _dx_im2col_vjp},
    "dw": {"xla": _dw_xla, "lax_vjp": _dw_lax_vjp, "im2col": _dw_im2col},
}
# A plan entry "tuned" is looked up (conv_tuning.choose) when that pass is
# traced: a forward-only program (evaluation) never measures the backward passes.
TUNED = "tuned"
TUNED_PLAN = (TUNED, TUNED, TUNED)
XLA_PLAN = ("xla", "xla", "xla")


def conv3x3_pass(pass_name: str, impl: str, *args: jax.Array) -> jax.Array:
  """One pass of the convolution by one exact method: ``CONV_PASSES[pass_name][impl](*args)``."""
  return CONV_PASSES[pass_name][impl](*args)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 VALID max-pool: ``[..., H, W, C] -> [..., H//2, W//2, C]``.

  Two programs, equal in value and gradient (the gradient goes to the first
  maximum of each window, row-major, as XLA's select-and-scatter does), one
  per backend. XLA:CPU compiles the reduce-window's gradient into a variadic
  reduce-window plus a scatter that took a quarter of the expert step
  (BUILD_NOTES.md "Performance"), so there the windows are reshaped apart and
  the backward pass is elementwise (``max_pool_2x2_by_windows``). On TPU that
  reshape splits the sublane dimension (W) of the tiled layout and its max
  is one of the largest fusions of the step by the compiler's cost model,
  while the reduce-window and its select-and-scatter are native there.
  """
  return jax.lax.platform_dependent(
      x,
      # Flax's pool: one lax.reduce_window; autodiff's gradient, select-and-scatter.
      tpu=functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2)),
      default=max_pool_2x2_by_windows,
  )


@jax.custom_vjp
def max_pool_2x2_by_windows(x: jax.Array) -> jax.Array:
  """``max_pool_2x2`` over reshaped windows, with an elementwise backward pass."""
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
  stacked = jnp.stack(parts, axis=-2)  # [..., h2, w2, 4, c]
  *lead, h2, w2, _, c = stacked.shape
  stacked = stacked.reshape(*lead, h2, w2, 2, 2, c)
  stacked = jnp.moveaxis(stacked, -3, -4)  # [..., h2, 2(dh), w2, 2(dw), c]
  dx = stacked.reshape(*lead, 2 * h2, 2 * w2, c)
  if (2 * h2, 2 * w2) != (h, w):
    pad = [(0, 0)] * (dx.ndim - 3) + [(0, h - 2 * h2), (0, w - 2 * w2), (0, 0)]
    dx = jnp.pad(dx, pad)
  return (dx,)


max_pool_2x2_by_windows.defvjp(_pool_fwd, _pool_bwd)
