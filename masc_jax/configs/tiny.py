"""A tiny config for tests: the digits protocol (K=5 x 2) with very narrow networks, 1 epoch per stage.

    python -m masc_jax.main --config=tiny --workdir=/tmp/masc_tiny

Seconds on a CPU; the numbers it reports mean nothing.
"""

from masc_jax.configs import digits


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"tiny config takes no argument, got {arg!r}")
  config = digits.get_config()
  config.model.expert_widths = (4, 8)
  config.model.collective_widths = (8, 8)
  config.model.pool_after = (0, 1)
  config.model.head_hidden = (16,)
  config.model.dropout_rate = 0.1
  config.batch_size = 16
  config.eval_batch_size = 250
  config.epochs.experts = config.epochs.collective = config.epochs.altruism = 1
  config.seeds = ""  # one run (digits trains a population)
  config.log_every_steps = 5
  # digits' checkpoint interval (500 steps) is longer than any tiny stage, so
  # tiny saves at stage ends only: a save of its 100 small arrays takes about
  # 0.3 s on a 2-core host, longer than ten tiny steps. Runs that need
  # checkpoints inside a stage set --config.checkpoint_every_steps.
  return config
