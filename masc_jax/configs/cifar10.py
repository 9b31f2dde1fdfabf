"""CIFAR-10: K=5 agents x 2 classes, the paper's VGG widths, the paper's optimiser.

    python -m masc_jax.main --config=cifar10 --workdir=runs/cifar10

About 100 epochs x 3 stages (+ ablations): hours on one accelerator.
`--config=cifar10:quick` runs 2 epochs per stage.
"""

from masc_jax.configs import common


def get_config(arg: str | None = None):
  return common.paper_config("cifar10", num_agents=5, arg=arg)
