"""Fields shared by every config: the method's defaults (docs/method.md).

Dataset configs start from ``base_config()`` and change what their protocol
needs. Every field is documented here; ``masc_jax.config_lib.validate``
checks them all before a run writes anything.
"""

import ml_collections

# The paper's VGG widths (docs/method.md, "Networks"): 13 conv blocks, pools after blocks 1, 3, 6, 9, 12.
EXPERT_WIDTHS = (64, 64, 64, 64, 128, 128, 128, 256, 256, 256, 256, 256, 256)
COLLECTIVE_WIDTHS = (
    64,
    64,
    128,
    128,
    256,
    256,
    256,
    512,
    512,
    512,
    512,
    512,
    512,
)
POOL_AFTER = (1, 3, 6, 9, 12)


def base_config() -> ml_collections.ConfigDict:
  """The paper's protocol on CIFAR-100; dataset configs override what differs."""
  config = ml_collections.ConfigDict()

  # Data.
  # cifar100 | cifar10 | fashion_mnist | digits | tfds:NAME (any prepared TFDS
  # image-classification dataset).
  config.dataset = "cifar100"
  # TFDS data dir; "" = $TFDS_DATA_DIR or TFDS's default. fashion_mnist also
  # takes a folder of IDX files, and searches the Debian package's folder.
  config.data_dir = ""
  config.num_agents = 4  # K; the classes split into K equal groups (0: unset)
  config.class_order_seed = (
      -1
  )  # -1: label order; else a seeded class permutation
  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 4  # random crop after zero padding (0 = off)
  config.augment.flip = True  # random horizontal flip

  # Networks.
  config.model = ml_collections.ConfigDict()
  config.model.expert_widths = EXPERT_WIDTHS
  config.model.collective_widths = COLLECTIVE_WIDTHS
  config.model.pool_after = POOL_AFTER
  config.model.head_hidden = (1024, 1024)
  config.model.dropout_rate = 0.5
  config.model.conv_impl = (
      "auto"  # auto | xla | im2col | tuned (measured per layer: models.conv3x3)
  )
  # float32 | bfloat16: what convolutions, dense layers and activations compute in.
  # bfloat16 is mixed precision: parameters, BatchNorm statistics, optimiser state,
  # logits and losses stay float32 (see masc_jax/nn/network.py). Meant for TPUs and
  # GPUs with bf16 tensor cores; on a 2-core CPU it was slower than float32.
  config.model.compute_dtype = "float32"

  # Optimisation (docs/method.md, "Optimisation"): SGD, coupled weight decay, no schedule.
  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 0.005
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.grad_clip_norm = (
      0.0  # > 0: clip each model's global gradient norm
  )
  config.batch_size = (
      32  # per agent (stages 1 and 3) and for the collective (stage 2)
  )
  config.eval_batch_size = 500
  # The collective's batches (stage 2), both over the pooled data: "by_owner" gives
  # each agent a fixed share of every batch, in proportion to its data, so that
  # with kd_teachers=owner each expert teaches only its own share (about B teacher
  # forwards a step instead of K x B; on digits the same results within the
  # 5-seed intervals, BUILD_NOTES); "shuffled" draws each batch from one shuffle.
  config.collective_batches = "by_owner"

  config.epochs = ml_collections.ConfigDict()
  config.epochs.experts = 100
  config.epochs.collective = 100
  config.epochs.altruism = 100

  # Losses (spec: L_CC and L_RA). `cc` and `ra` name registered losses
  # (masc_jax.method.losses.CC_LOSSES / RA_LOSSES: "masc" is the paper's, "ce" is CE alone);
  # the ablation's collective always trains with "ce".
  config.loss = ml_collections.ConfigDict()
  config.loss.cc = "masc"
  config.loss.ra = "masc"
  config.loss.kd_teachers = "owner"  # owner | amalgamate | all
  config.loss.kd_weight = 1.0
  config.loss.kd_temperature = 1.0
  config.loss.align_weight = 0.1
  config.loss.energy_anchor = -10.0
  config.loss.energy_temperature = 1.0
  config.loss.ra_teacher = "self"  # self (A_k) | collective (S) | none
  config.loss.ra_kd_weight = 1.0

  # Also train the CE-only collective and RA on it: the paper's ablation rows.
  config.ablations = True

  # Inference: which head a grown agent answers with, and which agent answers for
  # the society (masc_jax.method.routing.RULES): energy | msp | energy_margin.
  config.routing = "energy"
  config.routing_margin = (
      0.0  # energy_margin: S (or the lowest agent) keeps ties within it
  )

  # Execution.
  config.seed = 0  # a single run's seed (config.seeds: a population)
  # Populations (masc_jax.training.population): seeds trained together, crossed with a grid of
  # shape-keeping settings, e.g. seeds="0,1,2,3,4",
  # sweep="loss.align_weight=0.05,0.1;optim.learning_rate=0.01,0.05". "" = one run.
  config.seeds = ""
  config.sweep = ""
  config.member_map = (
      "auto"  # auto | vmap | unroll | loop | threads: how members are mapped
  )
  config.agent_map = "auto"  # auto | vmap | unroll
  config.num_devices = 0  # 0: every visible device
  config.agent_axis_size = (
      0  # devices along the mesh's agent axis; 0: largest that divides K
  )

  # Logging and checkpoints.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2

  # Watching a run (none of these changes what a run computes).
  # TensorBoard event files in <workdir>/tensorboard/, one TensorBoard run per
  # member (seed_0, or seed_0_optim.learning_rate=0.01 for a swept member): each
  # stage's loss terms, learning rate and images/s at every logged step, and its
  # evaluations, at the global step (tags <stage>/<term>, <stage>/eval/<figure>).
  config.tensorboard = True
  # Evaluate the stage's rows on the test split every N epochs of a stage as well
  # as at its end (metrics.jsonl, TensorBoard, report.png curves); 0: at the end
  # only. results.json/.md hold the stage-end evaluations either way.
  config.eval_every_epochs = 0
  # "START:COUNT": a jax.profiler trace of COUNT steps, beginning with the
  # START-th step (0-based) this run trains, all within the first stage it
  # trains, written to <workdir>/profile/ (TensorBoard's profile plugin). "" = off.
  config.profile_steps = ""
  return config


def paper_config(
    dataset: str, num_agents: int, arg: str | None
) -> ml_collections.ConfigDict:
  """The paper's protocol on a CIFAR dataset; ``arg="quick"``: 2 epochs per stage."""
  config = base_config()
  config.dataset = dataset
  config.num_agents = num_agents
  if arg == "quick":
    config.epochs.experts = config.epochs.collective = (
        config.epochs.altruism
    ) = 2
  elif arg:
    raise ValueError(
        f"the {dataset} config takes no argument or 'quick', got {arg!r}"
    )
  return config
