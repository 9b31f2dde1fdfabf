"""Fashion-MNIST, the paper's CIFAR-10 protocol: K=5 agents x 2 classes.

    python -m masc_jax.main --config=fashion_mnist          # 3 seeds, sized for a 2-core CPU
    python -m masc_jax.main --config=fashion_mnist:spec     # the paper's networks, 100 epochs

The data (60,000 train / 10,000 test 28x28 grayscale images) comes from
--config.data_dir (a folder of the four IDX files, or a TFDS data dir), a
prepared TFDS copy (`bash launch/prepare_data.sh fashion_mnist`), or the
Debian package (`apt-get install dataset-fashion-mnist`); see
`masc_jax.data.fashion_mnist`. Images are zero-padded to 32x32, so the
networks' five 2x2 pools apply unchanged. Train-time augmentation: a random
shift of up to 2 pixels (crop after 2 pixels of zero padding: the garment
never leaves the frame) and a random horizontal flip.

Default: five blocks, a pool after each (32 -> 1), widths 8-32 (experts) and
16-64 (the collective), one hidden layer of 128; the paper's SGD (lr 0.005,
momentum 0.9, weight decay 5e-4), batch 32; 1 epoch per stage, the ablation
stages included (the RA-only row and the joint-training reference); three
seeds trained together (one seed is not a result). Sized from measurements on
a loaded 2-core CPU (BUILD_NOTES.md); measured: 5 min 56 s for the three seeds
on a quiet 2-core AVX2 CPU with an empty compilation cache.

`:spec`: the paper's VGG widths (13 blocks, experts 64-256, the collective
64-512), head 1024x1024, dropout 0.5, SGD lr 0.005, 100 epochs per stage plus
the two ablation stages, one seed: about 490,000 steps (37,500 per agent
stage, 187,500 per collective stage). For an accelerator: by the TPU
compiler's estimates for the same networks on CIFAR-sized input (BUILD_NOTES)
about half an hour to an hour on one v5e chip; weeks on a 2-core CPU.
"""

from masc_jax.configs import common


def get_config(arg: str | None = None):
  if arg not in (None, "", "spec"):
    raise ValueError(
        f"the fashion_mnist config takes no argument or 'spec', got {arg!r}"
    )
  config = common.base_config()
  config.dataset = "fashion_mnist"
  config.num_agents = 5
  # 28x28 content in a 32x32 frame: a 2-pixel shift never cuts the garment.
  config.augment.crop_padding = 2
  # Tops, trousers, bags and shoes stay what they are when mirrored.
  config.augment.flip = True
  if arg == "spec":
    return config
  config.model.expert_widths = (8, 16, 32, 32, 32)
  config.model.collective_widths = (16, 32, 64, 64, 64)
  config.model.pool_after = (0, 1, 2, 3, 4)
  config.model.head_hidden = (128,)
  config.model.dropout_rate = 0.2
  # The paper's optimiser (common.py: SGD lr 0.005, momentum 0.9, weight
  # decay 5e-4): lr 0.05 left the routing untrained after one epoch
  # (after-growth General 37% against 70%, BUILD_NOTES.md).
  config.epochs.experts = 1
  config.epochs.collective = 1
  config.epochs.altruism = 1
  config.seeds = "0,1,2"
  config.log_every_steps = 250
  config.checkpoint_every_steps = 2000
  return config
