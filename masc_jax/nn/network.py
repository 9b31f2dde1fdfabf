"""The paper's VGG-style network ("Netwider", docs/method.md "Networks"), as a backbone and a head.

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

from masc_jax.nn.conv import conv3x3
from masc_jax.nn.kernels import max_pool_2x2

# Names accepted for ``dtype`` / ``model.compute_dtype``: what matmuls, convolutions
# and activations run in. Parameters are float32 either way (see the module doc).
COMPUTE_DTYPES = ("float32", "bfloat16")

# PyTorch's default init for conv and linear weights (kaiming_uniform with
# a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1/(3 fan_in).
# We use the same so the PyTorch reference in benchmarks/ starts alike.
torch_default_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform"
)


def compute_dtype(dtype: Any) -> jnp.dtype:
  """``dtype`` (a jnp dtype or its name) as a ``jnp.dtype``; one of ``COMPUTE_DTYPES``."""
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    resolved = None
  if resolved is None or resolved.name not in COMPUTE_DTYPES:
    raise ValueError(
        f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}"
    )
  return resolved


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
    kernel = self.param(
        "kernel",
        torch_default_kernel_init,
        (3, 3, x.shape[-1], self.features),
        jnp.float32,
    )
    bias = self.param(
        "bias", nn.initializers.zeros, (self.features,), jnp.float32
    )
    return conv3x3(
        x.astype(dtype), kernel.astype(dtype), self.impl
    ) + bias.astype(dtype)


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
      x = nn.BatchNorm(
          use_running_average=not train,
          momentum=0.9,
          epsilon=1e-5,
          dtype=dtype,
          param_dtype=jnp.float32,
          name=f"bn{i}",
      )(x)
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
      x = nn.Dense(
          width,
          kernel_init=torch_default_kernel_init,
          dtype=dtype,
          param_dtype=jnp.float32,
          name=f"dense{i}",
      )(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(
        self.num_classes,
        kernel_init=torch_default_kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name="logits",
    )(x)
    return logits.astype(jnp.float32)


class Network(nn.Module):
  """Backbone + head: ``[B, H, W, C] -> [B, num_classes]`` logits."""

  widths: Sequence[int]
  pool_after: Sequence[int]
  head_hidden: Sequence[int]
  num_classes: int
  dropout_rate: float = 0.5
  conv_impl: str = "auto"
  dtype: Any = jnp.float32  # compute dtype (module doc); parameters are float32

  def setup(self):
    self.backbone = Backbone(
        self.widths, self.pool_after, self.conv_impl, self.dtype
    )
    self.head = Head(
        self.head_hidden, self.num_classes, self.dropout_rate, self.dtype
    )

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.head(self.backbone(x, train), train)


def backbone_of(network: Network) -> Backbone:
  """A standalone ``Backbone`` with ``network``'s fields (applies to ``params["backbone"]``)."""
  return Backbone(
      network.widths,
      network.pool_after,
      network.conv_impl,
      network.dtype,
      parent=None,
  )


def head_of(network: Network) -> Head:
  """A standalone ``Head`` with ``network``'s fields (a new RA head on its backbone)."""
  return Head(
      network.head_hidden,
      network.num_classes,
      network.dropout_rate,
      network.dtype,
      parent=None,
  )


def feature_map_sizes(
    image_hw: tuple[int, int], num_blocks: int, pool_after: Sequence[int]
) -> list[tuple[int, int]]:
  """Spatial size after each block; raises ValueError if a pool leaves < 1x1."""
  h, w = image_hw
  bad = [p for p in pool_after if not 0 <= p < num_blocks]
  if bad:
    raise ValueError(
        f"pool_after {tuple(pool_after)} names blocks {bad} outside 0..{num_blocks - 1}"
    )
  sizes = []
  for i in range(num_blocks):
    if i in pool_after:
      h, w = h // 2, w // 2
      if h < 1 or w < 1:
        raise ValueError(
            f"the 2x2 max-pool after block {i} shrinks a {image_hw[0]}x{image_hw[1]} input "
            f"below 1x1: use fewer pools (pool_after={tuple(pool_after)}) for this input size"
        )
    sizes.append((h, w))
  return sizes


def make_network(
    model_config: Any, num_classes: int, widths: Sequence[int]
) -> Network:
  """A ``Network`` from a config's ``model`` section and a width list."""
  return Network(
      widths=tuple(widths),
      pool_after=tuple(model_config.pool_after),
      head_hidden=tuple(model_config.head_hidden),
      num_classes=num_classes,
      dropout_rate=model_config.dropout_rate,
      conv_impl=model_config.conv_impl,
      dtype=model_config.compute_dtype,
  )


def forward_flops(
    widths: Sequence[int],
    pool_after: Sequence[int],
    head_hidden: Sequence[int],
    num_classes: int,
    in_channels: int,
    hw: tuple[int, int],
    batch: int,
    with_head: bool = True,
) -> float:
  """Model FLOPs of one forward pass of ``batch`` images: 2 x the multiply-adds.

  Counts the 3x3 convolutions (9 taps per output) and dense layers of a
  ``Network`` (``with_head=False``: its ``Backbone`` alone); BatchNorm, ReLU,
  pooling and biases are left out, as model-FLOP counts usually do. A training
  step (forward and backward) is about 3 x this.
  """
  h, w = hw
  c = in_channels
  flops = 0.0
  for i, width in enumerate(widths):
    flops += 2.0 * 9 * c * width * h * w * batch
    c = width
    if i in pool_after:
      h, w = h // 2, w // 2
  if with_head:
    features = c * h * w
    for width in tuple(head_hidden) + (num_classes,):
      flops += 2.0 * features * width * batch
      features = width
  return flops


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
