"""The networks' 3x3 convolution, computed by a chosen implementation (``impl``).

``conv3x3(x, kernel, impl)``: ``auto`` (the default) takes XLA's convolution,
or one matrix multiply over im2col patches for maps of at most
``kernels.IM2COL_MAX_PIXELS`` pixels; ``tuned`` takes, for each pass, the
method measured fastest on this machine (``masc_jax.nn.conv_tuning``). Every
implementation computes the same values and gradients to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from masc_jax.nn import conv_tuning, kernels

CONV_IMPLS = ("auto", "xla", "im2col", "tuned")


def conv3x3(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
  """3x3, stride 1, SAME convolution without bias.

  Args:
    x: ``[B, H, W, Cin]`` (any number of leading batch dims for ``im2col`` and
      ``tuned``).
    kernel: ``[3, 3, Cin, Cout]`` (HWIO).
    impl: ``xla`` (``lax.conv_general_dilated``, ``xla_conv3x3``), ``im2col``
      (patches @ kernel, autodiff), ``auto`` (im2col for maps of at most
      ``kernels.IM2COL_MAX_PIXELS`` pixels, else xla) or ``tuned``: forward, input
      gradient and filter gradient each by the implementation measured fastest
      for this layer's shape and dtype on this machine (``planned_conv3x3``
      with a plan from ``masc_jax/nn/conv_tuning.py``, which measures once, at
      trace time, and keeps the choice beside the compilation cache).

  Returns:
    ``[B, H, W, Cout]``, equal in value and gradients (to float rounding) for
    every impl.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
  h, w, cin = x.shape[-3:]
  if impl == "auto":
    impl = "im2col" if h * w <= kernels.IM2COL_MAX_PIXELS else "xla"
  if impl == "im2col":
    return kernels.im2col_conv3x3(x, kernel)
  if impl == "tuned":
    return planned_conv3x3(x, kernel, kernels.TUNED_PLAN)
  return xla_conv3x3(x, kernel)


def _resolve(pass_name: str, impl: str, x: jax.Array, kernel: jax.Array) -> str:
  if impl != kernels.TUNED:
    return impl
  return conv_tuning.choose(pass_name, x.shape, kernel.shape[-1], x.dtype)


def planned_conv3x3(
    x: jax.Array, kernel: jax.Array, plan: Sequence[str]
) -> jax.Array:
  """``conv3x3`` with each pass computed as ``plan = (fwd, dx, dw)`` says.

  Each entry is a key of ``kernels.CONV_PASSES[pass]`` or ``"tuned"`` (measured for
  this layer's shape when the pass is traced, ``masc_jax/nn/conv_tuning.py``).
  Every plan gives the same value and gradients to float rounding
  (tests/test_conv_tuning.py). ``x``: ``[..., H, W, Cin]`` (leading dims are
  flattened into one batch dim). Reverse-mode only (no ``jax.jvp``).
  """
  plan = tuple(plan)
  if len(plan) != 3 or any(
      impl != kernels.TUNED and impl not in kernels.CONV_PASSES[p]
      for p, impl in zip(kernels.CONV_PASSES, plan)
  ):
    raise ValueError(
        f"a conv plan is (fwd, dx, dw) with fwd in {tuple(kernels.CONV_PASSES['fwd'])}, "
        f"dx in {tuple(kernels.CONV_PASSES['dx'])}, dw in {tuple(kernels.CONV_PASSES['dw'])} "
        f"(or {kernels.TUNED!r}), got {plan!r}"
    )
  lead = x.shape[:-3]
  y = _planned_conv3x3(x.reshape((-1,) + x.shape[-3:]), kernel, plan)
  return y.reshape(lead + y.shape[1:])


def _planned_forward(x, kernel, plan):
  return kernels.conv3x3_pass(
      "fwd", _resolve("fwd", plan[0], x, kernel), x, kernel
  )


_planned_conv3x3 = jax.custom_vjp(_planned_forward, nondiff_argnums=(2,))


def _planned_fwd(x, kernel, plan):
  return _planned_forward(x, kernel, plan), (x, kernel)


def _planned_bwd(plan, residuals, g):
  x, kernel = residuals
  dx = kernels.conv3x3_pass(
      "dx", _resolve("dx", plan[1], x, kernel), x, kernel, g
  )
  dw = kernels.conv3x3_pass(
      "dw", _resolve("dw", plan[2], x, kernel), x, kernel, g
  )
  return dx, dw


_planned_conv3x3.defvjp(_planned_fwd, _planned_bwd)


def xla_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``lax.conv_general_dilated`` 3x3 SAME, ``[B, H, W, Cin] -> [B, H, W, Cout]``.

  Same value and input gradient as autodiff of the plain convolution, and the
  same filter gradient to float rounding (tests/test_models.py; bit for bit in
  the cases checked on XLA:CPU), computed with the operands' roles swapped.
  Autodiff writes the filter gradient as a convolution whose "batch" is the
  activations' channel axis, so XLA:CPU
  transposes the activations to ``[Cin, H, W, B]``; it fuses the producer of
  the activations (bias, BatchNorm, ReLU) into that transpose and evaluates it
  in transposed order, 31 ms of a 450 ms expert step for the 32x32 layer
  alone. Here the output gradient takes that role instead (its producer is
  cheap to transpose) and the activations become the kernel, a transpose that
  keeps channels contiguous. Reverse-mode only (no ``jax.jvp``). It is the
  plan ``kernels.XLA_PLAN`` of ``planned_conv3x3``.
  """
  return planned_conv3x3(x, kernel, kernels.XLA_PLAN)
