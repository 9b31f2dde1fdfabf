"""CIFAR-10: K=5 agents x 2 classes, the spec's VGG widths, the paper's optimiser.

    python -m masc_jax.main --config=cifar10 --workdir=runs/cifar10

About 100 epochs x 3 stages (+ ablations): hours on one accelerator.
`--config=cifar10:quick` runs 2 epochs per stage.
"""

from masc_jax.configs import common


def get_config(arg: str | None = None):
  config = common.base_config()
  config.dataset = "cifar10"
  config.num_agents = 5
  if arg == "quick":
    config.epochs.experts = config.epochs.collective = config.epochs.altruism = 2
  elif arg:
    raise ValueError(f"cifar10 config takes no argument or 'quick', got {arg!r}")
  return config
