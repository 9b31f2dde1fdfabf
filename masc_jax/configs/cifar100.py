"""CIFAR-100, the paper's protocol: K=4 agents x 25 classes, the paper's VGG widths.

Run (data prepared once with `bash launch/prepare_data.sh cifar100`):

    python -m masc_jax.main --config=cifar100 --workdir=runs/cifar100

3 stages x 100 epochs (+ 2 ablation stages), batch 32, SGD 0.005/0.9/5e-4.
About 80,000 steps per stage: several hours on one TPU/GPU, days on a CPU.
`--config=cifar100:quick` runs 2 epochs per stage (a smoke test of the whole run).
"""

from masc_jax.configs import common


def get_config(arg: str | None = None):
  return common.paper_config("cifar100", num_agents=4, arg=arg)
