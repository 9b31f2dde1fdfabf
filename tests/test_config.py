"""Configs: found by name, variants, files, typed overrides, and every bad input refused up front."""

import os

import pytest

from masc_jax import config_lib
from conftest import run_main


@pytest.mark.parametrize("name", config_lib.REGISTERED)
def test_registered_configs_load_and_validate(name):
  config = config_lib.load_config(name)
  config_lib.validate(config)
  assert config.num_agents >= 1


def test_variant_file_and_override():
  quick = config_lib.load_config("cifar100:quick")
  assert (
      quick.epochs.experts,
      quick.epochs.collective,
      quick.epochs.altruism,
  ) == (2, 2, 2)
  by_path = config_lib.load_config(
      os.path.join(config_lib.CONFIG_DIR, "digits.py"),
      ["batch_size=8", "loss.kd_teachers=all"],
  )
  assert by_path.batch_size == 8 and isinstance(by_path.batch_size, int)
  assert by_path.loss.kd_teachers == "all"


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        ("imagenet", [], "unknown config 'imagenet'"),
        ("digits", ["batch_sise=8"], "batch_sise"),
        ("digits", ["batch_size=eight"], "batch_size"),
        ("cifar100:fast", [], "quick"),
    ],
)
def test_load_errors(spec, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load_config(spec, overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "num_agents=3",
            "num_agents=3 does not divide the 10 classes of digits: use one of \\[1, 2, 5, 10\\]",
        ),
        ("num_agents=0", "num_agents must be an integer >= 1"),
        ("model.pool_after=(0, 1, 2, 3)", "shrinks a 8x8 input below 1x1"),
        ("model.pool_after=(7,)", "outside 0..3"),
        (
            "loss.kd_teachers='best'",
            "loss.kd_teachers must be one of owner, amalgamate, all",
        ),
        (
            "loss.ra_teacher='teacher'",
            "loss.ra_teacher must be one of self, collective, none",
        ),
        (
            "optim.learning_rate=-0.1",
            "optim.learning_rate must be a number in \\(0.0, inf\\)",
        ),
        (
            "optim.momentum=1.5",
            "optim.momentum must be a number in \\[0.0, 1.0\\]",
        ),
        ("model.dropout_rate=1.0", "model.dropout_rate must be < 1"),
        (
            "model.conv_impl='cudnn'",
            "model.conv_impl must be one of auto, xla, im2col",
        ),
        (
            "model.compute_dtype=float16",
            "model.compute_dtype must be one of float32, bfloat16, got 'float16'",
        ),
        ("agent_map='pmap'", "agent_map must be one of auto, vmap, unroll"),
        ("epochs.collective=0", "epochs.collective must be an integer >= 1"),
        (
            "dataset='mnist'",
            "dataset must be one of cifar100, cifar10, fashion_mnist, digits, tfds:NAME",
        ),
        (
            "model.expert_widths=(16, 0)",
            "model.expert_widths must be a non-empty list of positive integers",
        ),
        (
            "loss.kd_temperature=0.0",
            "loss.kd_temperature must be a number in \\(0.0, inf\\)",
        ),
        ("class_order_seed=-5", "class_order_seed must be -1"),
        ("loss.cc='kd_only'", "loss.cc must be one of masc, ce"),
        ("loss.ra='kd_only'", "loss.ra must be one of masc, ce"),
        ("routing='vote'", "routing must be one of energy, msp, energy_margin"),
        (
            "routing_margin=-1.0",
            "routing_margin must be a number in \\[0.0, inf\\)",
        ),
    ],
)
def test_validate_names_each_bad_field(override, message):
  config = config_lib.load_config("digits", [override])
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_validate_lists_every_problem_at_once():
  config = config_lib.load_config(
      "digits", ["num_agents=3", "optim.momentum=2.0"]
  )
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  assert "num_agents=3" in str(info.value) and "optim.momentum" in str(
      info.value
  )


def test_batch_larger_than_an_agents_data():
  config = config_lib.load_config("digits", ["batch_size=300"])
  with pytest.raises(
      config_lib.ConfigError,
      match="agent 0 has 259, agent 1 has 260 training images, fewer than batch_size=300: use --config.batch_size=259",
  ):
    config_lib.check_against_data(config, [259, 260], 1297)


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        (
            "digits:foo",
            [],
            "config 'digits:foo' did not load: digits config takes no argument, got 'foo'",
        ),
        (
            "cifar100:slow",
            [],
            "config 'cifar100:slow' did not load: the cifar100 config takes no argument",
        ),
        (
            "digits",
            ["batch_sizee=3"],
            "bad config override: no such field 'batch_sizee' Did you mean \"batch_size\"",
        ),
        (
            "digits",
            ["batch_size=abc"],
            "bad config override: flag --config.batch_size=abc",
        ),
    ],
)
def test_load_errors_are_one_readable_line(spec, overrides, message):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load_config(spec, overrides)
  text = str(info.value)
  assert text.startswith(message), text
  assert "\n" not in text and "\\n" not in text and "Traceback" not in text


def test_registered_configs_are_the_files_in_configs():
  files = {
      f[:-3] for f in os.listdir(config_lib.CONFIG_DIR) if f.endswith(".py")
  }
  assert set(config_lib.REGISTERED) | set(
      config_lib.NEEDS_ARGUMENT
  ) == files - {
      "__init__",
      "common",
  }
  assert {"cifar100", "cifar10", "digits", "tiny"} <= set(config_lib.REGISTERED)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=nope"], "unknown config 'nope'"),
        (
            ["--config=tiny", "--config.num_agents=4"],
            "num_agents=4 does not divide",
        ),
        (["--config=tiny", "--config.no_such_field=1"], "no_such_field"),
        (
            ["--config=tiny", "--config.batch_size=1000"],
            "fewer than batch_size=1000",
        ),
        (["--config=tiny", "stray"], "unexpected arguments: stray"),
    ],
)
def test_main_refuses_bad_input_before_writing(tmp_path, args, message):
  workdir = tmp_path / "run"
  result = run_main(args + [f"--workdir={workdir}"])
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_missing_cifar_data_says_how_to_prepare(tmp_path):
  workdir = tmp_path / "run"
  result = run_main(
      ["--config=cifar100", f"--workdir={workdir}"],
      env_extra={"TFDS_DATA_DIR": str(tmp_path / "empty")},
  )
  assert result.returncode == 2
  for needle in ("TFDS_DATA_DIR", "launch/prepare_data.sh", "--config=digits"):
    assert needle in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()
