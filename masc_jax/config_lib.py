"""Configs: found by name, loaded from files, validated before anything runs.

``--config`` takes a registered name (``cifar100``, ``cifar10``,
``fashion_mnist``, ``digits``, ``tiny``), ``NAME:ARG`` for a variant
(``fashion_mnist:spec``; ``tfds:NAME`` for any prepared TFDS
image-classification dataset), or a path to a ``get_config()`` file
(``path.py[:ARG]``). ``validate`` checks every field at once and raises one
``ConfigError`` that lists every problem it found.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import itertools
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from masc_jax.method import agents, losses, routing
from masc_jax.data import arrays, batches, registry
from masc_jax.nn import conv, network

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
# Configs that only make sense with an argument, named as NAME:ARG: what they
# are called in help and error messages.
NEEDS_ARGUMENT = {
    "tfds": "tfds:NAME (any prepared TFDS image-classification dataset)",
}
# Every other get_config() file in masc_jax/configs/ is a registered config,
# found by its name.
REGISTERED = tuple(
    sorted(
        name[:-3]
        for name in os.listdir(CONFIG_DIR)
        if name.endswith(".py")
        and name not in ("__init__.py", "common.py")
        and name[:-3] not in NEEDS_ARGUMENT
    )
)


def known_names() -> str:
  """The config names a user can give, for help and error messages."""
  return ", ".join(REGISTERED) + ", or " + ", ".join(NEEDS_ARGUMENT.values())


class ConfigError(ValueError):
  """A config that cannot work; the message lists every problem."""


def _one_line(error: BaseException) -> str:
  """An exception's message as one readable line.

  ml_collections raises ``KeyError``s whose message is itself a quoted,
  escaped string (``'\\'batch_sizee\\'\\nDid you mean ...'``): unquote it and
  join its lines.
  """
  text = (
      str(error.args[0])
      if isinstance(error, (KeyError, AttributeError)) and error.args
      else str(error)
  )
  while len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    try:
      unquoted = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
    if not isinstance(unquoted, str):
      break
    text = unquoted
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def resolve_config_spec(spec: str) -> str:
  """``NAME[:ARG]`` or ``PATH[:ARG]`` -> ``PATH[:ARG]`` for ml_collections' config flag.

  Raises:
    ConfigError: for a name that is neither registered nor an existing file.
  """
  name, sep, arg = spec.partition(":")
  if name in REGISTERED or name in NEEDS_ARGUMENT:
    return os.path.join(CONFIG_DIR, f"{name}.py") + sep + arg
  if os.path.isfile(name):
    return spec
  raise ConfigError(
      f"unknown config {name!r}: use one of {known_names()} "
      "(optionally NAME:ARG) or a path to a config .py file with get_config()"
  )


def config_name(spec: str) -> str:
  """A short name for a config spec (for the default workdir): one folder name.

  ``tfds:emnist/letters:3.1.0`` -> ``tfds_emnist_letters_3.1.0``.
  """
  name, _, arg = spec.partition(":")
  base = os.path.splitext(os.path.basename(name))[0]
  arg = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in arg)
  return base + (f"_{arg}" if arg else "")


def _get_config_of(path: str) -> Callable[..., Any]:
  """The ``get_config`` of the config file at ``path``, executed as a fresh module."""
  base = os.path.splitext(os.path.basename(path))[0]
  name = "_masc_config_" + "".join(c if c.isalnum() else "_" for c in base)
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None or module_spec.loader is None:
    raise ImportError(f"{path} is not a Python file")
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  module_spec.loader.exec_module(module)
  return module.get_config


def load_config(
    spec: str, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
  """Load a config by name/path and apply ``FIELD=VALUE`` overrides (for code and tests).

  Overrides follow ``--config.FIELD=VALUE`` semantics: the field must exist and
  the value is parsed to the field's type (ml_collections' config flag).
  The file is loaded and its ``get_config(ARG)`` called here, so whatever
  they raise is reported as the config's own error, and an error while
  parsing the overrides as a bad override.
  """
  from ml_collections import config_flags
  from absl import flags

  path, sep, arg = resolve_config_spec(spec).partition(":")
  try:
    config = _get_config_of(path)(*([arg] if sep else []))
  except Exception as e:  # noqa: BLE001 - whatever the user's file or get_config raises
    raise ConfigError(f"config {spec!r} did not load: {_one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
        f"config {spec!r} did not load: get_config() returned "
        f"{type(config).__name__}, not a ConfigDict"
    )
  argv = ["masc"] + [f"--config.{o}" for o in overrides]
  flag_values = flags.FlagValues()
  try:
    # The override flags are defined from the argv they will parse.
    config_flags.DEFINE_config_dict(
        "config",
        config,
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    flag_values(argv)
    config = flag_values.config
  except KeyError as e:
    raise ConfigError(
        f"bad config override: no such field {_one_line(e)}"
    ) from None
  except AttributeError as e:
    if isinstance(
        e.__context__, KeyError
    ):  # ml_collections' "no such field" lookup
      raise ConfigError(
          f"bad config override: no such field {_one_line(e.__context__)}"
      ) from None
    raise ConfigError(f"bad config override: {_one_line(e)}") from None
  except (flags.Error, TypeError, ValueError) as e:
    raise ConfigError(f"bad config override: {_one_line(e)}") from None
  return config


def _problems(heading: str, errors: Sequence[str]) -> str:
  """One line for one problem; a heading and one line per problem for several."""
  if len(errors) == 1:
    return f"{heading}: {errors[0]}"
  return f"{heading}:\n  - " + "\n  - ".join(errors)


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ``ConfigError`` listing every field that cannot work.

  Checks types, ranges, enum values, that K divides the classes and that the
  networks' pools fit the input size; for a population, the seed list, the
  sweep and every swept value. Data-dependent checks (batch size vs an agent's
  data) are in ``check_against_data``.
  """
  errors = _field_errors(config)
  for field in ("seeds", "sweep"):
    if not isinstance(config[field], str):
      errors.append(f"{field} must be a string, got {config[field]!r}")
  if not errors:
    try:
      members = members_of(config)
    except PopulationError as e:
      errors.append(str(e))
    else:
      # Swept values obey the rules of their fields: check each setting's config.
      for member in {m.settings: m for m in members}.values():
        errors += [
            f"sweep: {e}"
            for e in _field_errors(member_config(config, member))
            if e not in errors and f"sweep: {e}" not in errors
        ]
  if errors:
    raise ConfigError(_problems("invalid config", errors))


def _field_errors(config: ml_collections.ConfigDict) -> list[str]:
  """One message per field of ``config`` that cannot work (``validate``)."""
  errors: list[str] = []

  def need(ok: bool, message: str) -> None:
    if not ok:
      errors.append(message)

  def positive_int(path: str, value: Any, minimum: int = 1) -> bool:
    ok = _is_int(value) and value >= minimum
    need(ok, f"{path} must be an integer >= {minimum}, got {value!r}")
    return ok

  def number(
      path: str,
      value: Any,
      low: float | None = None,
      high: float | None = None,
      low_open: bool = False,
  ) -> None:
    ok = _is_number(value)
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value <= high
    bounds = (
        f" in {'(' if low_open else '['}{low}, {high if high is not None else 'inf'}"
        f"{']' if high is not None else ')'}"
        if low is not None
        else ""
    )
    need(ok, f"{path} must be a number{bounds}, got {value!r}")

  def one_of(path: str, value: Any, choices: Sequence[str]) -> None:
    need(
        value in choices,
        f"{path} must be one of {', '.join(choices)}, got {value!r}",
    )

  dataset = None
  if registry.is_tfds_name(config.dataset):
    try:
      dataset = registry.dataset_info(
          config.dataset,
          config.data_dir if isinstance(config.data_dir, str) else None,
      )
    except arrays.DatasetNotPreparedError as e:
      errors.append(_one_line(e))  # it names the dataset
  else:
    one_of(
        "dataset",
        config.dataset,
        tuple(n for n in registry.DATASETS if not registry.is_tfds_name(n))
        + (f"{registry.TFDS_PREFIX}NAME (a prepared TFDS dataset)",),
    )
    dataset = registry.DATASETS.get(config.dataset)
  if config.num_agents == 0 and registry.is_tfds_name(config.dataset):
    # tfds:NAME has no default K: it depends on the class count, read from
    # the prepared files (if they were not found, that error says enough).
    if dataset is not None:
      c = dataset.num_classes
      errors.append(
          f"num_agents is not set: pass --config.num_agents=K, K dividing the "
          f"{c} classes of {config.dataset}: one of "
          f"{[k for k in range(1, c + 1) if c % k == 0]}"
      )
  elif positive_int("num_agents", config.num_agents) and dataset is not None:
    c = dataset.num_classes
    need(
        c % config.num_agents == 0 and config.num_agents <= c,
        f"num_agents={config.num_agents} does not divide the {c} classes of {config.dataset}: "
        f"use one of {[k for k in range(1, c + 1) if c % k == 0]}",
    )
  need(
      _is_int(config.class_order_seed) and config.class_order_seed >= -1,
      f"class_order_seed must be -1 (label order) or a seed >= 0, got {config.class_order_seed!r}",
  )
  positive_int("augment.crop_padding", config.augment.crop_padding, minimum=0)
  need(
      isinstance(config.augment.flip, bool),
      f"augment.flip must be True or False, got {config.augment.flip!r}",
  )

  m = config.model
  for name in ("expert_widths", "collective_widths"):
    widths = tuple(getattr(m, name))
    if not widths or not all(_is_int(w) and w >= 1 for w in widths):
      errors.append(
          f"model.{name} must be a non-empty list of positive integers, got {widths!r}"
      )
    elif dataset is not None:
      try:
        network.feature_map_sizes(
            dataset.image_shape[:2], len(widths), tuple(m.pool_after)
        )
      except ValueError as e:
        errors.append(f"model.{name} with model.pool_after: {e}")
  hidden = tuple(m.head_hidden)
  need(
      all(_is_int(h) and h >= 1 for h in hidden),
      f"model.head_hidden must be positive integers, got {hidden!r}",
  )
  number("model.dropout_rate", m.dropout_rate, 0.0, 1.0)
  if _is_number(m.dropout_rate):
    need(
        m.dropout_rate < 1.0,
        f"model.dropout_rate must be < 1, got {m.dropout_rate!r}",
    )
  one_of("model.conv_impl", m.conv_impl, conv.CONV_IMPLS)
  one_of("model.compute_dtype", m.compute_dtype, network.COMPUTE_DTYPES)

  o = config.optim
  number("optim.learning_rate", o.learning_rate, 0.0, low_open=True)
  number("optim.momentum", o.momentum, 0.0, 1.0)
  number("optim.weight_decay", o.weight_decay, 0.0)
  number("optim.grad_clip_norm", o.grad_clip_norm, 0.0)
  positive_int("batch_size", config.batch_size)
  positive_int("eval_batch_size", config.eval_batch_size)
  for stage in ("experts", "collective", "altruism"):
    positive_int(f"epochs.{stage}", config.epochs[stage])

  lo = config.loss
  one_of("loss.cc", lo.cc, tuple(losses.CC_LOSSES))
  one_of("loss.ra", lo.ra, tuple(losses.RA_LOSSES))
  one_of("loss.kd_teachers", lo.kd_teachers, losses.KD_TEACHERS)
  one_of("loss.ra_teacher", lo.ra_teacher, losses.RA_TEACHERS)
  number("loss.kd_weight", lo.kd_weight, 0.0)
  number("loss.ra_kd_weight", lo.ra_kd_weight, 0.0)
  number("loss.kd_temperature", lo.kd_temperature, 0.0, low_open=True)
  number("loss.align_weight", lo.align_weight, 0.0)
  number("loss.energy_anchor", lo.energy_anchor)
  number("loss.energy_temperature", lo.energy_temperature, 0.0, low_open=True)
  need(
      isinstance(config.ablations, bool),
      f"ablations must be True or False, got {config.ablations!r}",
  )
  one_of("routing", config.routing, tuple(routing.RULES))
  number("routing_margin", config.routing_margin, 0.0)

  positive_int("seed", config.seed, minimum=0)
  one_of(
      "collective_batches",
      config.collective_batches,
      batches.COLLECTIVE_BATCHES,
  )
  one_of("agent_map", config.agent_map, agents.AGENT_MAP_STRATEGIES)
  one_of("member_map", config.member_map, MEMBER_MAP_STRATEGIES)
  positive_int("num_devices", config.num_devices, minimum=0)
  positive_int("agent_axis_size", config.agent_axis_size, minimum=0)
  positive_int("log_every_steps", config.log_every_steps)
  positive_int("checkpoint_every_steps", config.checkpoint_every_steps)
  positive_int("keep_checkpoints", config.keep_checkpoints)
  need(
      isinstance(config.tensorboard, bool),
      f"tensorboard must be True or False, got {config.tensorboard!r}",
  )
  positive_int("eval_every_epochs", config.eval_every_epochs, minimum=0)
  try:
    parse_profile_steps(config.profile_steps)
  except ValueError as e:
    errors.append(str(e))
  need(
      isinstance(config.data_dir, str),
      f"data_dir must be a path, got {config.data_dir!r}",
  )
  if (
      isinstance(config.data_dir, str)
      and config.data_dir
      and "://" not in config.data_dir
  ):
    need(
        not os.path.exists(config.data_dir) or os.path.isdir(config.data_dir),
        f"data_dir={config.data_dir} is not a directory",
    )
  return errors


def parse_profile_steps(text: Any) -> tuple[int, int] | None:
  """``config.profile_steps``: ``"START:COUNT"`` -> ``(START, COUNT)``; ``""`` -> None (off).

  Raises:
    ValueError: naming the field, for anything else.
  """
  if not isinstance(text, str):
    raise ValueError(
        f"profile_steps must be a string START:COUNT, got {text!r}"
    )
  if not text.strip():
    return None
  start, sep, count = text.strip().partition(":")
  if not (sep and start.strip().isdigit() and count.strip().isdigit()):
    raise ValueError(
        "profile_steps must be START:COUNT (the first step to trace, from 0, "
        f"and how many steps), e.g. 10:5, or empty (off); got {text!r}"
    )
  if int(count) < 1:
    raise ValueError(f"profile_steps={text}: COUNT must be at least 1")
  return int(start), int(count)


def check_against_data(
    config: ml_collections.ConfigDict,
    agent_train_sizes: Sequence[int],
    pooled_train_size: int,
) -> None:
  """Data-dependent checks: every agent must fill at least one batch."""
  errors = []
  short = [
      (k, n) for k, n in enumerate(agent_train_sizes) if n < config.batch_size
  ]
  if short:
    who = ", ".join(f"agent {k} has {n}" for k, n in short[:3]) + (
        f" (and {len(short) - 3} more agents)" if len(short) > 3 else ""
    )
    errors.append(
        f"{who} training images, fewer than batch_size={config.batch_size}: "
        f"use --config.batch_size={min(agent_train_sizes)} or smaller"
    )
  if pooled_train_size < config.batch_size:
    errors.append(
        f"the pooled data has {pooled_train_size} images, fewer than batch_size={config.batch_size}"
    )
  if errors:
    raise ConfigError(_problems("invalid config for this data", errors))


# ----------------------------------------------------------------------------- populations
# ``config.seeds`` and ``config.sweep`` name a population: seeds crossed with a grid of
# settings (``masc_jax.training.population`` maps the members over devices).

# Numeric settings that keep every array shape: a grid over them shares one
# compiled step (their values are traced, per-member arrays).
SWEEPABLE = (
    "loss.kd_weight",
    "loss.ra_kd_weight",
    "loss.kd_temperature",
    "loss.align_weight",
    "loss.energy_anchor",
    "loss.energy_temperature",
    "optim.learning_rate",
    "optim.momentum",
    "optim.weight_decay",
)
# Settings that change shapes or step counts: members could not share a step.
SHAPE_CHANGING = (
    "model.",
    "num_agents",
    "batch_size",
    "eval_batch_size",
    "dataset",
    "epochs.",
)

LOOP = "loop"
THREADS = "threads"
IN_TURN = (LOOP, THREADS)  # one member's compiled program, run for each member
MEMBER_MAP_STRATEGIES = ("auto", "vmap", "unroll", LOOP, THREADS)


class PopulationError(ValueError):
  """A seed list or sweep that cannot be trained."""


@dataclasses.dataclass(frozen=True)
class Member:
  """One society of a population: its seed and its swept settings (field -> value)."""

  seed: int
  settings: tuple[tuple[str, float], ...] = ()

  def describe(self) -> str:
    """``seed 3, loss.align_weight=0.2`` (names the member in logs and errors)."""
    return ", ".join(
        [f"seed {self.seed}"] + [f"{k}={v:g}" for k, v in self.settings]
    )

  def as_dict(self) -> dict[str, Any]:
    return {"seed": self.seed, "settings": dict(self.settings)}


def parse_seeds(text: str) -> tuple[int, ...]:
  """``"0,1,2"`` -> ``(0, 1, 2)``; ``""`` -> ``()``."""
  if not text.strip():
    return ()
  seeds = []
  for part in text.split(","):
    part = part.strip()
    if not part.isdigit():
      raise PopulationError(
          f"seeds must be comma-separated integers >= 0, got {text!r}"
      )
    seeds.append(int(part))
  repeated = sorted({s for s in seeds if seeds.count(s) > 1})
  if repeated:
    raise PopulationError(
        f"seeds lists seed {repeated[0]} twice ({text!r}): members would be "
        "identical"
    )
  return tuple(seeds)


def parse_sweep(text: str) -> tuple[tuple[str, tuple[float, ...]], ...]:
  """``"loss.align_weight=0.05,0.1;optim.momentum=0,0.9"`` -> ((field, values), ...)."""
  grid = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    field, eq, values = part.partition("=")
    field = field.strip()
    if not eq or not field or not values.strip():
      raise PopulationError(
          f"sweep entries are FIELD=V1,V2,... separated by ';', got {part!r}"
      )
    if field.startswith(SHAPE_CHANGING) or field in SHAPE_CHANGING:
      raise PopulationError(
          f"cannot sweep {field}: it changes array shapes or step counts, so the members "
          "could not share one compiled step; run one config per value instead"
      )
    if field not in SWEEPABLE:
      raise PopulationError(
          f"cannot sweep {field}; sweepable settings: {', '.join(SWEEPABLE)}"
      )
    if field in dict(grid):
      raise PopulationError(f"sweep names {field} twice")
    try:
      parsed = tuple(float(v) for v in values.split(","))
    except ValueError:
      raise PopulationError(
          f"sweep values of {field} must be numbers, got {values!r}"
      ) from None
    if not all(map(math.isfinite, parsed)):
      raise PopulationError(
          f"sweep values of {field} must be finite, got {values!r}"
      )
    if len(set(parsed)) != len(parsed):
      raise PopulationError(
          f"sweep lists a value of {field} twice ({values!r})"
      )
    grid.append((field, parsed))
  return tuple(grid)


def members_of(config: ml_collections.ConfigDict) -> tuple[Member, ...]:
  """The population ``config`` trains: every sweep setting crossed with every seed.

  Order: settings in grid order (the first field varies slowest), then seeds.
  Without ``config.seeds`` the one seed is ``config.seed``.
  """
  seeds = parse_seeds(config.seeds)
  if seeds and config.seed != 0:
    raise PopulationError(
        f"seed={config.seed} is for a single run but this config trains seeds {config.seeds} "
        f"(config.seeds): pass --config.seeds={config.seed} for one seed"
    )
  grid = parse_sweep(config.sweep)
  fields = [field for field, _ in grid]
  settings = [
      tuple(zip(fields, values))
      for values in itertools.product(*(v for _, v in grid))
  ]
  return tuple(
      Member(seed, s) for s in settings for seed in (seeds or (config.seed,))
  )


def with_settings(
    config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of ``config`` with dotted fields set to ``values`` (floats or traced arrays)."""
  if not values:
    return config
  out = copy.deepcopy(config)
  with (
      out.ignore_type()
  ):  # traced arrays in float fields, inside a compiled step
    for field, value in values.items():
      section, name = field.rsplit(".", 1)
      out[section][name] = value
  return out


def member_config(
    config: ml_collections.ConfigDict, member: Member
) -> ml_collections.ConfigDict:
  """The single-run config member ``member`` of ``config``'s population computes."""
  out = with_settings(config, dict(member.settings))
  if out is config:
    out = copy.deepcopy(config)
  out.seed, out.seeds, out.sweep = member.seed, "", ""
  return out
