"""Any prepared TFDS image-classification dataset by name, with the paper's protocol.

    python -m masc_jax.main --config=tfds:svhn_cropped --config.num_agents=5

NAME is a TFDS name as `tfds` knows it (``svhn_cropped``, ``emnist/letters``,
``NAME:VERSION``), prepared once as array_record with
``bash launch/prepare_data.sh NAME`` into ``--config.data_dir`` (default
$TFDS_DATA_DIR, else ~/tensorflow_datasets). The image shape, class count
and splits are read from the prepared files; mean / std are computed from the
train split once and cached beside the data (or in ~/.cache/masc_jax when
that folder is read-only). ``num_agents`` has no default: K must divide the
dataset's class count, and the error lists the choices. The networks are the
paper's (five 2x2 pools: images need at least 32x32, else change
``model.pool_after``); 100 epochs per stage.
"""

from masc_jax.configs import common


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError(
        "the tfds config needs a dataset name: --config=tfds:NAME, e.g. "
        "--config=tfds:svhn_cropped --config.num_agents=5"
    )
  config = common.base_config()
  config.dataset = f"tfds:{arg}"
  config.num_agents = 0  # unset: validation lists the K that divide the classes
  return config
