"""PyTorch reference of the stage-1 (expert) train step, for the JAX/PyTorch ratio.

The paper's expert network ("Netwider", docs/method.md "Networks"):
13 x [Conv2d 3x3 (bias, padding 1) -> BatchNorm2d -> ReLU], 2x2 max-pool after
the blocks in ``pool_after``, flatten, Linear 1024 -> ReLU -> Dropout 0.5 ->
Linear 1024 -> ReLU -> Dropout 0.5 -> Linear C. The step is the paper's SGD
(lr 0.005, momentum 0.9, coupled weight decay 5e-4) on softmax cross-entropy
of the logits. K agents are K separate models + optimizers stepped one after
another, which is how one would write the society in plain PyTorch.

The input is fed already normalised (float32, NCHW), so the reference does no
augmentation while the JAX step does its crop+flip+normalise inside the jit:
that favours PyTorch slightly (the augmentation is a few ms of a ~1 s step).

Used by ``benchmarks.agent_step`` (``--torch``); runnable alone::

    python -m benchmarks.torch_reference --agents 1,4 --batch 64 --steps 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np


def build_network(
    widths: Sequence[int],
    pool_after: Sequence[int],
    head_hidden: Sequence[int],
    num_classes: int,
    in_channels: int,
    image_hw: tuple[int, int],
    dropout_rate: float = 0.5,
):
  """The paper's network as a ``torch.nn.Sequential`` (NCHW input, logits out)."""
  import torch.nn as nn

  layers = []
  c, (h, w) = in_channels, image_hw
  for i, width in enumerate(widths):
    layers += [
        nn.Conv2d(c, width, 3, padding=1, bias=True),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]
    c = width
    if i in pool_after:
      layers.append(nn.MaxPool2d(2, 2))
      h, w = h // 2, w // 2
  layers.append(nn.Flatten())
  features = c * h * w
  for width in head_hidden:
    layers += [
        nn.Linear(features, width),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout_rate),
    ]
    features = width
  layers.append(nn.Linear(features, num_classes))
  return nn.Sequential(*layers)


def count_params(model) -> int:
  return sum(p.numel() for p in model.parameters())


class TorchSociety:
  """K independent (model, optimizer) pairs and their train step."""

  def __init__(
      self,
      num_agents: int,
      batch: int,
      *,
      widths,
      pool_after,
      head_hidden,
      num_classes,
      in_channels,
      image_hw,
      dropout_rate=0.5,
      lr=0.005,
      momentum=0.9,
      weight_decay=5e-4,
      threads: int | None = None,
      seed: int = 0,
      channels_last: bool = False,
  ):
    import torch

    if threads:
      torch.set_num_threads(threads)
    torch.manual_seed(seed)
    self.torch = torch
    self.models = [
        build_network(
            widths,
            pool_after,
            head_hidden,
            num_classes,
            in_channels,
            image_hw,
            dropout_rate,
        )
        for _ in range(num_agents)
    ]
    memory_format = (
        torch.channels_last if channels_last else torch.contiguous_format
    )
    for m in self.models:
      m.train()
      if channels_last:
        m.to(memory_format=memory_format)
    self.opts = [
        torch.optim.SGD(
            m.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        for m in self.models
    ]
    rng = np.random.default_rng(seed)
    h, w = image_hw
    self.x = [
        torch.from_numpy(
            rng.standard_normal((batch, in_channels, h, w), np.float32)
        ).contiguous(memory_format=memory_format)
        for _ in range(num_agents)
    ]
    self.y = [
        torch.from_numpy(rng.integers(0, num_classes, batch))
        for _ in range(num_agents)
    ]
    self.loss = torch.nn.CrossEntropyLoss()

  @property
  def num_params(self) -> int:
    return count_params(self.models[0])

  def step(self) -> float:
    total = 0.0
    for model, opt, x, y in zip(self.models, self.opts, self.x, self.y):
      opt.zero_grad(set_to_none=True)
      loss = self.loss(model(x), y)
      loss.backward()
      opt.step()
      total += float(loss.detach())  # a sync point, like block_until_ready
    return total


def time_steps(step, steps: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times


def main(argv=None):
  from masc_jax.configs import common

  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--agents", default="1,4")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=0, help="0: os.cpu_count()")
  p.add_argument("--channels-last", action="store_true")
  args = p.parse_args(argv)
  import os

  threads = args.threads or os.cpu_count()
  for k in [int(a) for a in args.agents.split(",")]:
    soc = TorchSociety(
        k,
        args.batch,
        widths=common.EXPERT_WIDTHS,
        pool_after=common.POOL_AFTER,
        head_hidden=(1024, 1024),
        num_classes=100,
        in_channels=3,
        image_hw=(32, 32),
        threads=threads,
        channels_last=args.channels_last,
    )
    times = time_steps(soc.step, args.steps, args.warmup)
    med = float(np.median(times))
    print(
        json.dumps(
            {
                "agents": k,
                "params": soc.num_params,
                "median_step_s": med,
                "agent_images_per_s": k * args.batch / med,
                "threads": threads,
                "loadavg": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
  main()
