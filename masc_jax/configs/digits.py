"""Offline demo: scikit-learn's bundled 8x8 digits, K=5 agents x 2 classes.

    python -m masc_jax.main --config=digits                  # 3 seeds: means with 95% intervals
    python -m masc_jax.main --config=digits --config.seeds=0   # one run

Needs no download. Small VGG widths that fit 8x8 inputs (two pools: 8 -> 4 -> 2).
A population of three seeds (one seed's table moves with float rounding, see
README "Results on digits"): about 100 s on a 2-core AVX2 CPU with an empty
compilation cache, about 67 s with a filled one (README has the table).
"""

from masc_jax.configs import common


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"digits config takes no argument, got {arg!r}")
  config = common.base_config()
  config.dataset = "digits"
  config.num_agents = 5
  config.augment.crop_padding = 1  # 8x8 images: a 1-pixel jitter
  config.augment.flip = False  # digits are not mirror-symmetric
  config.model.expert_widths = (16, 16, 32, 32)
  config.model.collective_widths = (32, 32, 64, 64)
  config.model.pool_after = (1, 3)
  config.model.head_hidden = (128,)
  config.model.dropout_rate = 0.2
  config.optim.learning_rate = 0.05
  config.batch_size = 32
  config.eval_batch_size = 500
  config.epochs.experts = 30
  config.epochs.collective = 30
  config.epochs.altruism = 30
  # Tiny 8x8 networks: a vmapped (grouped) convolution costs little here, and
  # one batched program compiles about twice as fast as 5 unrolled ones
  # (BUILD_NOTES.md: 76 s vs 107 s end to end on the 2-core CPU).
  config.agent_map = "vmap"
  # One seed is not a result (README "Results on digits"): three, trained together.
  config.seeds = "0,1,2"
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
