"""The spec's VGG-style network ("Netwider"), as a backbone and a head.

A network is 13 (or any number of) blocks ``conv3x3(bias) -> BatchNorm -> ReLU``
with a 2x2 max-pool after the blocks listed in ``pool_after``, flattened, then
a head ``Dense -> ReLU -> Dropout`` (per hidden layer) ``-> Dense(C)``.
Outputs are **logits**: no softmax anywhere (see BUILD_NOTES.md).

``Backbone`` and ``Head`` are separate modules because reciprocal altruism
puts a fresh head on the collective's frozen backbone. ``Network`` composes
them under the variable names ``backbone`` and ``head``, so
``variables["params"]["backbone"]`` is exactly what ``Backbone`` expects.

BatchNorm state lives in the ``batch_stats`` collection and is threaded
functionally: ``apply(..., train=True, mutable=["batch_stats"])``.

Mixed precision (``dtype``, the config's ``model.compute_dtype``): with
``bfloat16`` every convolution and dense layer takes bf16 inputs and kernels
(cast from the float32 parameters on the way in, so gradients reach the
parameters as float32) and the activations between layers are bf16. What stays
float32: every parameter, BatchNorm's batch statistics and running averages
(flax computes them in at least float32 and normalises in float32 before
rounding its output to bf16), and the logits, cast back to float32 at the end
of ``Head``, so every loss, free energy and routing decision is float32. The
optimiser sees only float32 parameters and gradients. ``float32`` (the
default) is the plain float32 network: every cast is then a no-op and the
program is the one the library always compiled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "xla", "im2col", "tuned")
# Names accepted for ``dtype`` / ``model.compute_dtype``: what matmuls, convolutions
# and activations run in. Parameters are float32 either way (see the module doc).
COMPUTE_DTYPES = ("float32", "bfloat16")

# PyTorch's default init for conv and linear weights (kaiming_uniform with
# a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1/(3 fan_in).
# We use the same so the PyTorch reference in benchmarks/ starts alike.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# At or below this many output pixels, "auto" computes a 3x3 convolution as one
# matrix multiply over im2col patches. XLA:CPU runs 3x3 kernels on tiny maps
# (2x2, mostly padding) very slowly; a matmul of the same values is fast on
# every backend. See BUILD_NOTES.md "Performance" for the measurements (4 was
# 2-3% cheaper per step on one core; within noise, and 16 is kept).
IM2COL_MAX_PIXELS = 16


def compute_dtype(dtype: Any) -> jnp.dtype:
  """``dtype`` (a jnp dtype or its name) as a ``jnp.dtype``; one of ``COMPUTE_DTYPES``."""
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    resolved = None
  if resolved is None or resolved.name not in COMPUTE_DTYPES:
    raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
  return resolved


def im2col_3x3(x: jax.Array) -> jax.Array:
  """SAME-padded 3x3 patches: ``[..., H, W, C] -> [..., H, W, 9*C]``.

  Tap ``(i, j)`` of the kernel lands at channels ``(3*i + j)*C .. +C``, which is
  the order of ``kernel.reshape(9*C, F)`` for an HWIO kernel.
  """
  *_, h, w, _ = x.shape
  pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
  xp = jnp.pad(x, pad)
  taps = [xp[..., i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
  return jnp.concatenate(taps, axis=-1)


def conv3x3(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
  """3x3, stride 1, SAME convolution without bias.

  Args:
    x: ``[B, H, W, Cin]`` (any number of leading batch dims for ``im2col`` and
      ``tuned``).
    kernel: ``[3, 3, Cin, Cout]`` (HWIO).
    impl: ``xla`` (``lax.conv_general_dilated``, ``xla_conv3x3``), ``im2col``
      (patches @ kernel, autodiff), ``auto`` (im2col for maps of at most
      ``IM2COL_MAX_PIXELS`` pixels, else xla) or ``tuned``: forward, input
      gradient and filter gradient each by the implementation measured fastest
      for this layer's shape and dtype on this machine (``planned_conv3x3``
      with a plan from ``masc_jax/conv_tuning.py``, which measures once, at
      trace time, and keeps the choice beside the compilation cache).

  Returns:
    ``[B, H, W, Cout]``, equal in value and gradients (to float rounding) for
    every impl.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
  h, w, cin = x.shape[-3:]
  if impl == "auto":
    impl = "im2col" if h * w <= IM2COL_MAX_PIXELS else "xla"
  if impl == "im2col":
    return _im2col_conv3x3(x, kernel)
  if impl == "tuned":
    return planned_conv3x3(x, kernel, TUNED_PLAN)
  return xla_conv3x3(x, kernel)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding="SAME",
                                      dimension_numbers=_NHWC)


def _im2col_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
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
  return jax.vjp(lambda x_: _lax_conv3x3(x_, kernel), x)[1](g)[0]


def _dx_im2col(x, kernel, g):
  del x
  # dx = g correlated with the kernel rotated by 180 degrees, in and out swapped.
  return _im2col_conv3x3(g, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))


def _dx_im2col_vjp(x, kernel, g):
  return jax.vjp(lambda x_: _im2col_conv3x3(x_, kernel), x)[1](g)[0]


def _dw_xla(x, kernel, g):
  del kernel
  # out[co, i, j, ci] = sum_{b,h,w} g_padded[b, h + i, w + j, co] * x[b, h, w, ci],
  # i.e. the correlation of g with x as the kernel: tap (ti, tj) of the filter
  # gradient is out[:, 2 - ti, 2 - tj, :].
  roles = jax.lax.ConvDimensionNumbers(lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2),
                                       out_spec=(0, 3, 1, 2))
  out = jax.lax.conv_general_dilated(g, x, window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                     dimension_numbers=roles)          # [Cout, 3, 3, Cin]
  return jnp.transpose(out[:, ::-1, ::-1, :], (1, 2, 3, 0))          # [3, 3, Cin, Cout]


def _dw_lax_vjp(x, kernel, g):
  return jax.vjp(lambda k_: _lax_conv3x3(x, k_), kernel)[1](g)[0]


def _dw_im2col(x, kernel, g):
  lead = tuple(range(x.ndim - 1))
  dw = jnp.tensordot(im2col_3x3(x), g, axes=(lead, lead))           # [9*Cin, Cout]
  return dw.reshape(kernel.shape)


CONV_PASSES = {
    "fwd": {"xla": _lax_conv3x3, "im2col": _im2col_conv3x3},
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


def _resolve(pass_name: str, impl: str, x: jax.Array, kernel: jax.Array) -> str:
  if impl != TUNED:
    return impl
  from masc_jax import conv_tuning           # imports this module

  return conv_tuning.choose(pass_name, x.shape, kernel.shape[-1], x.dtype)


def planned_conv3x3(x: jax.Array, kernel: jax.Array, plan: Sequence[str]) -> jax.Array:
  """``conv3x3`` with each pass computed as ``plan = (fwd, dx, dw)`` says.

  Each entry is a key of ``CONV_PASSES[pass]`` or ``"tuned"`` (measured for
  this layer's shape when the pass is traced, ``masc_jax/conv_tuning.py``).
  Every plan gives the same value and gradients to float rounding
  (tests/test_conv_tuning.py). ``x``: ``[..., H, W, Cin]`` (leading dims are
  flattened into one batch dim). Reverse-mode only (no ``jax.jvp``).
  """
  plan = tuple(plan)
  if len(plan) != 3 or any(impl != TUNED and impl not in CONV_PASSES[p]
                           for p, impl in zip(CONV_PASSES, plan)):
    raise ValueError(f"a conv plan is (fwd, dx, dw) with fwd in {tuple(CONV_PASSES['fwd'])}, "
                     f"dx in {tuple(CONV_PASSES['dx'])}, dw in {tuple(CONV_PASSES['dw'])} "
                     f"(or {TUNED!r}), got {plan!r}")
  lead = x.shape[:-3]
  y = _planned_conv3x3(x.reshape((-1,) + x.shape[-3:]), kernel, plan)
  return y.reshape(lead + y.shape[1:])


def _planned_forward(x, kernel, plan):
  return conv3x3_pass("fwd", _resolve("fwd", plan[0], x, kernel), x, kernel)


_planned_conv3x3 = jax.custom_vjp(_planned_forward, nondiff_argnums=(2,))


def _planned_fwd(x, kernel, plan):
  return _planned_forward(x, kernel, plan), (x, kernel)


def _planned_bwd(plan, residuals, g):
  x, kernel = residuals
  dx = conv3x3_pass("dx", _resolve("dx", plan[1], x, kernel), x, kernel, g)
  dw = conv3x3_pass("dw", _resolve("dw", plan[2], x, kernel), x, kernel, g)
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
  plan ``XLA_PLAN`` of ``planned_conv3x3``.
  """
  return planned_conv3x3(x, kernel, XLA_PLAN)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 VALID max-pool: ``[..., H, W, C] -> [..., H//2, W//2, C]``.

  Equal in value and gradient to ``nn.max_pool(x, (2, 2), strides=(2, 2))``
  (the gradient goes to the first maximum of each window, row-major, as XLA's
  select-and-scatter does), but its backward pass is elementwise: XLA:CPU
  compiles the default one into a variadic reduce-window plus a scatter that
  took a quarter of the expert step (BUILD_NOTES.md "Performance").
  """
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


class Conv3x3(nn.Module):
  """3x3 SAME convolution with bias; ``impl`` picks how it is computed.

  Parameters are float32; input, kernel and bias are cast to ``dtype`` first,
  so the convolution and its output are in ``dtype`` (see the module doc).
  """
  features: int
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = compute_dtype(self.dtype)
    kernel = self.param("kernel", torch_default_kernel_init,
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return conv3x3(x.astype(dtype), kernel.astype(dtype), self.impl) + bias.astype(dtype)


class Backbone(nn.Module):
  """Conv blocks: ``[B, H, W, C] -> [B, F]`` features (flattened last map).

  Attributes:
    widths: output channels of each conv block.
    pool_after: 0-based block indices followed by a 2x2/2 max-pool.
    conv_impl: see ``conv3x3``.
    dtype: compute dtype of the convolutions and of the activations (and so of
      the returned features); see the module doc.
  """
  widths: Sequence[int]
  pool_after: Sequence[int]
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dtype = compute_dtype(self.dtype)
    for i, width in enumerate(self.widths):
      x = Conv3x3(width, impl=self.conv_impl, dtype=dtype, name=f"conv{i}")(x)
      # momentum=0.9 here is PyTorch's momentum=0.1 (the update weight of the new batch).
      # ``dtype`` is only BatchNorm's output dtype: its statistics, running
      # averages and normalisation arithmetic are float32 (flax promotes them).
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=dtype, param_dtype=jnp.float32, name=f"bn{i}")(x)
      x = nn.relu(x)
      if i in self.pool_after:
        x = max_pool_2x2(x)
    return x.reshape(x.shape[:-3] + (-1,))


class Head(nn.Module):
  """Classifier: ``[B, F] -> [B, num_classes]`` float32 logits.

  The dense layers compute in ``dtype`` (features of any float dtype are cast
  to it); the logits are cast to float32 whatever ``dtype`` is.
  """
  hidden: Sequence[int]
  num_classes: int
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool) -> jax.Array:
    dtype = compute_dtype(self.dtype)
    x = features
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, kernel_init=torch_default_kernel_init, dtype=dtype,
                   param_dtype=jnp.float32, name=f"dense{i}")(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, kernel_init=torch_default_kernel_init, dtype=dtype,
                      param_dtype=jnp.float32, name="logits")(x)
    return logits.astype(jnp.float32)


class Network(nn.Module):
  """Backbone + head: ``[B, H, W, C] -> [B, num_classes]`` logits."""
  widths: Sequence[int]
  pool_after: Sequence[int]
  head_hidden: Sequence[int]
  num_classes: int
  dropout_rate: float = 0.5
  conv_impl: str = "auto"
  dtype: Any = jnp.float32          # compute dtype (module doc); parameters are float32

  def setup(self):
    self.backbone = Backbone(self.widths, self.pool_after, self.conv_impl, self.dtype)
    self.head = Head(self.head_hidden, self.num_classes, self.dropout_rate, self.dtype)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.head(self.backbone(x, train), train)


def backbone_of(network: Network) -> Backbone:
  """A standalone ``Backbone`` with ``network``'s fields (applies to ``params["backbone"]``)."""
  return Backbone(network.widths, network.pool_after, network.conv_impl, network.dtype,
                  parent=None)


def head_of(network: Network) -> Head:
  """A standalone ``Head`` with ``network``'s fields (a new RA head on its backbone)."""
  return Head(network.head_hidden, network.num_classes, network.dropout_rate, network.dtype,
              parent=None)


def feature_map_sizes(image_hw: tuple[int, int], num_blocks: int,
                      pool_after: Sequence[int]) -> list[tuple[int, int]]:
  """Spatial size after each block; raises ValueError if a pool leaves < 1x1."""
  h, w = image_hw
  bad = [p for p in pool_after if not 0 <= p < num_blocks]
  if bad:
    raise ValueError(f"pool_after {tuple(pool_after)} names blocks {bad} outside 0..{num_blocks - 1}")
  sizes = []
  for i in range(num_blocks):
    if i in pool_after:
      h, w = h // 2, w // 2
      if h < 1 or w < 1:
        raise ValueError(
            f"the 2x2 max-pool after block {i} shrinks a {image_hw[0]}x{image_hw[1]} input "
            f"below 1x1: use fewer pools (pool_after={tuple(pool_after)}) for this input size")
    sizes.append((h, w))
  return sizes


def make_network(model_config: Any, num_classes: int, widths: Sequence[int]) -> Network:
  """A ``Network`` from a config's ``model`` section and a width list."""
  return Network(widths=tuple(widths), pool_after=tuple(model_config.pool_after),
                 head_hidden=tuple(model_config.head_hidden), num_classes=num_classes,
                 dropout_rate=model_config.dropout_rate, conv_impl=model_config.conv_impl,
                 dtype=model_config.compute_dtype)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
