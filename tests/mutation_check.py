"""Mutation check of the run guarantees: break each promise, watch its test fail.

    python tests/mutation_check.py              # every mutant (about 45 minutes on 2 cores)
    python tests/mutation_check.py --list       # the mutants, the guarantee each breaks
    python tests/mutation_check.py lock-shared sigterm-exit-0   # some of them

Each mutant is one exact text replacement in one library file that breaks one
guarantee of docs/guarantees.md, together with the tests that claim to guard it. The
check copies the repository (the files git tracks, and untracked files it does
not ignore) to a temporary folder, runs those tests unmutated there first (they
must pass), then for each mutant applies it to the copy, runs its tests, and
restores the file. A mutant is *killed* when its tests fail, *survives* when
they pass. The working tree is never touched, so an interrupted check leaves
nothing behind. Exit status: 0 when every mutant tried was killed, 1 otherwise.

Not run in CI (it is slow): BUILD_NOTES.md has the last result.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = "tests/test_guarantees.py::"
F = "tests/test_faults.py::"
W = "tests/test_watch.py::"


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  guarantee: str
  path: str  # relative to the repository root
  old: str  # must occur exactly once in the file
  new: str
  tests: tuple[str, ...]


MUTANTS = (
    # -- kill anywhere, resume, same answer; progress lost is bounded
    Mutant(
        "resume-ignored",
        "a restarted run resumes from its latest checkpoint",
        "masc_jax/training/train.py",
        "    if restored is None:\n",
        "    if True:\n",
        (
            G
            + "test_killed_during_a_save_mid_stage_and_between_stages_resumes_exactly",
            "tests/test_sharding.py::test_checkpoint_written_on_4_devices_resumes_on_1",
        ),
    ),
    Mutant(
        "resume-at-stage-start",
        "a resumed stage continues at the saved step",
        "masc_jax/training/train.py",
        'total, start = protocol.total_steps(society, spec), meta["stage_step"]',
        "total, start = protocol.total_steps(society, spec), 0",
        (
            G
            + "test_killed_during_a_save_mid_stage_and_between_stages_resumes_exactly",
        ),
    ),
    Mutant(
        "checkpoint-interval-doubled",
        "progress lost is at most checkpoint_every_steps",
        "masc_jax/training/train.py",
        "done % config.checkpoint_every_steps == 0",
        "done % (2 * config.checkpoint_every_steps) == 0",
        (
            G
            + "test_checkpoints_every_interval_bound_the_progress_a_kill_loses",
        ),
    ),
    Mutant(
        "step-key-from-wrong-step",
        "data order and step keys are functions of (seed, stage, step)",
        "masc_jax/training/train.py",
        "          self.members.fold_in(stage_key, step),\n",
        "          self.members.fold_in(stage_key, step - start),\n",
        (
            G
            + "test_killed_during_a_save_mid_stage_and_between_stages_resumes_exactly",
        ),
    ),
    # -- SIGTERM
    Mutant(
        "sigterm-no-save",
        "SIGTERM saves a checkpoint of the current position",
        "masc_jax/training/train.py",
        "      self.save(state, meta)\n      self.checkpointer.wait()\n",
        "      pass\n",
        (G + "test_sigterm_before_the_first_checkpoint_saves_step_0",),
    ),
    Mutant(
        "sigterm-ignored-in-compile",
        "SIGTERM during a compile stops before training",
        "masc_jax/training/train.py",
        "    self.stop_if_preempted(\n"
        '        stop, state, {**meta, "stage": name, "stage_step": start}\n'
        "    )\n",
        "",
        (G + "test_sigterm_during_compile_and_evaluation_saves_and_exits_143",),
    ),
    Mutant(
        "sigterm-ignored-between-stages",
        "SIGTERM between stages stops before the next",
        "masc_jax/training/train.py",
        "        self.stop_if_preempted(stop, state, meta)\n",
        "",
        (G + "test_sigterm_between_stages_stops_before_the_next_one",),
    ),
    Mutant(
        "sigterm-exit-0",
        "SIGTERM exits with status 143",
        "masc_jax/training/train.py",
        "raise Preempted(stop.exit_status)",
        "raise Preempted(0)",
        (F + "test_sigterm_saves_a_checkpoint_where_it_stopped",),
    ),
    Mutant(
        "sigterm-no-handler",
        "SIGTERM is caught, not fatal",
        "masc_jax/training/workdir.py",
        "        self._previous[signal.SIGTERM] = signal.signal(\n"
        "            signal.SIGTERM, self._handle\n"
        "        )\n",
        "        pass\n",
        (F + "test_sigterm_saves_a_checkpoint_where_it_stopped",),
    ),
    Mutant(
        "sigint-no-handler",
        "Ctrl-C saves a checkpoint and exits 130, no traceback",
        "masc_jax/training/workdir.py",
        "      self._previous[signal.SIGINT] = signal.signal(\n"
        "          signal.SIGINT, self._interrupt\n"
        "      )\n",
        "      pass\n",
        (
            W
            + "test_ctrl_c_saves_where_it_stopped_and_the_same_command_resumes_exactly",
        ),
    ),
    Mutant(
        "curves-not-purged-on-resume",
        "a resumed run continues its curves without a step twice",
        "masc_jax/reporting/tensorboard_log.py",
        "      if purge_from is not None:\n",
        "      if False:\n",
        (W + "test_event_files_hold_what_metrics_jsonl_holds_each_step_once",),
    ),
    # -- checkpoints are never half-trusted
    Mutant(
        "tmp-saves-kept",
        "an unfinished save is cleaned up, never a checkpoint",
        "masc_jax/training/checkpointing.py",
        "cleanup_tmp_directories=True",
        "cleanup_tmp_directories=False",
        (
            G
            + "test_killed_during_a_save_mid_stage_and_between_stages_resumes_exactly",
            F + "test_an_unfinished_save_is_ignored",
        ),
    ),
    Mutant(
        "damaged-raises",
        "a damaged checkpoint is skipped for the previous one",
        "masc_jax/training/checkpointing.py",
        "        self._set_aside(step)\n",
        "        raise\n",
        (F + "test_a_damaged_latest_checkpoint_is_skipped",),
    ),
    Mutant(
        "damaged-left-in-place",
        "a damaged checkpoint is moved to checkpoints/bad/",
        "masc_jax/training/checkpointing.py",
        "        self._set_aside(step)\n",
        "        pass\n",
        (F + "test_a_damaged_latest_checkpoint_is_skipped",),
    ),
    Mutant(
        "shape-check-off",
        "a checkpoint of other shapes is reported, not used",
        "masc_jax/training/checkpointing.py",
        "    if problem is not None:\n",
        "    if False:\n",
        (F + "test_checkpoint_of_another_shape_is_not_trusted",),
    ),
    Mutant(
        "old-checkpoint-refused",
        "a single run checkpointed without the member axis resumes",
        "masc_jax/training/checkpointing.py",
        "    add_axis = lacks_leading_axis(saved, wanted)\n",
        "    add_axis = False\n",
        (
            "tests/test_train.py::"
            "test_a_checkpoint_without_the_member_axis_resumes_to_the_same_results",
        ),
    ),
    Mutant(
        "start-over-on-bad",
        "no usable checkpoint: exit, never start over",
        "masc_jax/training/checkpointing.py",
        "    raise NoGoodCheckpointError(\n",
        "    return None\n    raise NoGoodCheckpointError(\n",
        (F + "test_no_good_checkpoint_exits_instead_of_starting_over",),
    ),
    # -- workdir guards
    Mutant(
        "config-guard-off",
        "a changed result field is refused on resume",
        "masc_jax/training/workdir.py",
        "  if diffs and not allow_config_change:\n",
        "  if False:\n",
        (F + "test_resuming_with_a_different_config_is_refused",),
    ),
    Mutant(
        "checkpoint-interval-not-neutral",
        "the checkpoint interval may change on resume",
        "masc_jax/training/workdir.py",
        '    "checkpoint_every_steps",\n',
        "",
        (G + "test_sigterm_during_compile_and_evaluation_saves_and_exits_143",),
    ),
    Mutant(
        "agent-map-not-neutral",
        "the agent strategy (and device count) may change on resume",
        "masc_jax/training/workdir.py",
        '    "agent_map",\n    "member_map",\n',
        '    "member_map",\n',
        (
            "tests/test_sharding.py::test_checkpoint_written_on_4_devices_resumes_on_1",
        ),
    ),
    Mutant(
        "log-rate-not-neutral",
        "the logging rate may change on resume",
        "masc_jax/training/workdir.py",
        '(\n    "log_every_steps",\n',
        "(\n",
        (G + "test_sigterm_during_compile_and_evaluation_saves_and_exits_143",),
    ),
    Mutant(
        "lock-shared",
        "a second run on the same workdir is refused",
        "masc_jax/training/workdir.py",
        "fcntl.LOCK_EX | fcntl.LOCK_NB",
        "fcntl.LOCK_SH | fcntl.LOCK_NB",
        (F + "test_a_second_run_on_the_same_workdir_is_refused",),
    ),
    # -- numerical faults
    Mutant(
        "nan-check-off",
        "a NaN stops the run",
        "masc_jax/training/step_log.py",
        "        if not np.all(np.isfinite(value)):\n",
        "        if False:\n",
        (
            G
            + "test_a_non_finite_term_stops_the_run_naming_stage_step_and_term",
            F + "test_a_nan_stops_the_run_naming_stage_step_and_term",
        ),
    ),
    Mutant(
        "inf-passes",
        "an Inf stops the run",
        "masc_jax/training/step_log.py",
        "np.all(np.isfinite(value))",
        "np.all(~np.isnan(value))",
        (
            G
            + "test_a_non_finite_term_stops_the_run_naming_stage_step_and_term",
        ),
    ),
    Mutant(
        "term-unnamed",
        "the NaN message names the term",
        "masc_jax/training/step_log.py",
        "non-finite loss term '{term}'{whose} in stage",
        "non-finite loss{whose} in stage",
        (
            G
            + "test_a_non_finite_term_stops_the_run_naming_stage_step_and_term",
            F + "test_a_nan_stops_the_run_naming_stage_step_and_term",
        ),
    ),
    Mutant(
        "non-finite-params-saved",
        "no checkpoint with non-finite parameters is written",
        "masc_jax/training/train.py",
        "    if bad:\n",
        "    if False:\n",
        (G + "test_parameters_that_are_not_finite_are_never_checkpointed",),
    ),
    Mutant(
        "clip-ignored",
        "grad_clip_norm clips each model's gradient norm",
        "masc_jax/method/steps.py",
        "  if optim_config.grad_clip_norm > 0:\n",
        "  if False:\n",
        ("tests/test_agents.py::test_gradient_clipping_is_per_agent",),
    ),
    Mutant(
        "clip-elementwise",
        "grad_clip_norm clips the norm, not each element",
        "masc_jax/method/steps.py",
        "optax.clip_by_global_norm(",
        "optax.clip(",
        ("tests/test_agents.py::test_gradient_clipping_is_per_agent",),
    ),
    # -- bad input
    Mutant(
        "workdir-made-first",
        "bad input writes nothing",
        "masc_jax/main.py",
        "  try:\n    train.train_and_evaluate(",
        "  os.makedirs(job.workdir, exist_ok=True)\n  try:\n    train.train_and_evaluate(",
        (
            "tests/test_config.py::test_main_refuses_bad_input_before_writing",
            G
            + "test_device_settings_that_cannot_hold_the_run_exit_2_writing_nothing",
        ),
    ),
    Mutant(
        "bad-input-exit-1",
        "bad input exits with status 2",
        "masc_jax/main.py",
        "def _fail(message: str, status: int = 2)",
        "def _fail(message: str, status: int = 1)",
        (
            G
            + "test_device_settings_that_cannot_hold_the_run_exit_2_writing_nothing",
            "tests/test_config.py::test_missing_cifar_data_says_how_to_prepare",
        ),
    ),
    Mutant(
        "validation-off",
        "every config field is checked before anything runs",
        "masc_jax/config_lib.py",
        '    raise ConfigError(_problems("invalid config", errors))',
        "    return",
        ("tests/test_config.py::test_validate_names_each_bad_field",),
    ),
    # -- devices
    Mutant(
        "visible-count-unchecked",
        "num_devices above the visible count is refused",
        "masc_jax/parallel/sharding.py",
        "    if num_devices > len(devices):\n",
        "    if False:\n",
        (
            G
            + "test_device_settings_that_cannot_hold_the_run_exit_2_writing_nothing",
        ),
    ),
    Mutant(
        "agent-axis-unchecked",
        "an agent axis that does not divide is refused",
        "masc_jax/parallel/sharding.py",
        "    if num_agents % requested or num_devices % requested:\n",
        "    if False:\n",
        (
            G
            + "test_device_settings_that_cannot_hold_the_run_exit_2_writing_nothing",
        ),
    ),
    Mutant(
        "batch-split-regardless",
        "a batch the data axis cannot split runs whole on each device",
        "masc_jax/parallel/sharding.py",
        "  per_agent = P(AGENTS, DATA) if batch_size % data == 0 else P(AGENTS)\n",
        "  per_agent = P(AGENTS, DATA)\n",
        (
            G + "test_batches_split_over_the_widest_axes_they_divide",
            "tests/test_sharding.py::test_device_counts_that_split_nothing_evenly_match_one_device",
        ),
    ),
    Mutant(
        "default-one-device",
        "by default a run uses every visible device",
        "masc_jax/parallel/sharding.py",
        "else jax.devices())",
        "else jax.devices()[:1])",
        (G + "test_by_default_the_mesh_spans_every_visible_device",),
    ),
    Mutant(
        "auto-always-vmap",
        "agent_map=auto is unroll on CPU, vmap on TPU/GPU",
        "masc_jax/method/agents.py",
        'return "unroll" if backend == "cpu" else "vmap"',
        'return "vmap"',
        ("tests/test_agents.py::test_resolve_strategy",),
    ),
    Mutant(
        "agents-not-split",
        "stacked agents are split along the mesh's agent axis",
        "masc_jax/parallel/sharding.py",
        "  return NamedSharding(mesh, with_members(P(AGENTS), members))\n",
        "  return NamedSharding(mesh, with_members(P(), members))\n",
        (
            "tests/test_sharding.py::test_every_stage_step_sharded_over_4_devices_matches_one_device",
        ),
    ),
    # -- several processes, object stores
    Mutant(
        "every-process-writes",
        "only process 0 writes logs and results",
        "masc_jax/training/train.py",
        "    self.is_writer = jax.process_index() == 0\n",
        "    self.is_writer = True\n",
        (
            "tests/test_multiprocess.py::"
            "test_a_run_moves_between_process_counts_and_survives_preemption_and_a_lost_process",
        ),
    ),
    Mutant(
        "metrics-to-local-disk",
        "a gs:// workdir writes nothing locally",
        "masc_jax/reporting/progress.py",
        "    if paths.is_local(path):\n",
        "    if True:\n",
        (
            "tests/test_paths.py::test_a_gs_workdir_gets_every_file_and_the_local_disk_none",
        ),
    ),
    # -- determinism
    Mutant(
        "init-seed-ignored",
        "config.seed picks the initialisation",
        "masc_jax/training/train.py",
        "jax.random.split(jax.random.key(seed))",
        "jax.random.split(jax.random.key(0))",
        (
            G
            + "test_the_run_draws_its_initialisation_and_data_order_from_config_seed",
        ),
    ),
    Mutant(
        "data-seed-ignored",
        "config.seed picks the data order",
        "masc_jax/training/society.py",
        "              per_agent, config.batch_size, seed=m.seed\n          )",
        "              per_agent, config.batch_size, seed=0\n          )",
        (
            G
            + "test_the_run_draws_its_initialisation_and_data_order_from_config_seed",
        ),
    ),
    # -- wiring
    Mutant(
        "ra-teacher-always-experts",
        "ra_teacher=collective distils from S",
        "masc_jax/training/protocol.py",
        '        if society.config.loss.ra_teacher == "self"\n        else collective\n',
        "        if True\n        else collective\n",
        (G + "test_ra_teacher_collective_distils_from_the_collective",),
    ),
    Mutant(
        "eval-padding-kept",
        "a padded last eval batch counts only real images",
        "masc_jax/training/evaluation.py",
        "np.asarray(value)[..., :valid]",
        "np.asarray(value)",
        (G + "test_a_padded_last_eval_batch_gives_the_unpadded_predictions",),
    ),
    Mutant(
        "reports-not-rewritten",
        "a run killed before its reports writes them on restart",
        "masc_jax/training/train.py",
        "      if not (only_missing and all(map(paths.exists, files))):\n",
        "      if not only_missing:\n",
        (
            G
            + "test_a_kill_after_the_last_checkpoint_still_gets_its_results_written",
        ),
    ),
    # -- populations
    Mutant(
        "member-unnamed",
        "a NaN in one member names its seed and settings",
        "masc_jax/training/step_log.py",
        "whose = f\" of member {'; '.join(m.describe() for m in bad)}\"",
        'whose = ""',
        (
            "tests/test_population.py::test_a_diverging_member_is_named_with_its_seed_and_settings",
            G + "test_a_non_finite_term_names_only_the_members_it_is_in",
        ),
    ),
    Mutant(
        "member-settings-ignored",
        "member p trains with its own swept settings",
        "masc_jax/training/train.py",
        "return spec.make_step(society.with_settings(settings), spec)(",
        "return spec.make_step(society, spec)(",
        (
            "tests/test_population.py::test_members_match_their_single_runs_step_by_step",
        ),
    ),
    Mutant(
        "owner-groups-ignored",
        "each teacher's logits go to its own group's images",
        "masc_jax/method/steps.py",
        "owner_logits = grouped.reshape((-1, grouped.shape[-1]))[back]",
        "owner_logits = grouped.reshape((-1, grouped.shape[-1]))[jnp.sort(back)[::-1]]",
        (
            "tests/test_stages.py::test_collective_step_owner_batch_sizes_equal_all_teachers",
        ),
    ),
    Mutant(
        "members-share-data-order",
        "each member draws its own data order",
        "masc_jax/training/society.py",
        "        per_agent, config.batch_size, seed=m.seed\n    )\n  else:",
        "        per_agent, config.batch_size, seed=0\n    )\n  else:",
        (
            "tests/test_population.py::test_each_member_draws_the_data_order_of_its_seed",
        ),
    ),
    Mutant(
        "members-share-frozen-models",
        "each member's step reads its own frozen models",
        "masc_jax/training/population.py",
        "state, batch, rng, self._frozen_of[p], self._hparams_of[p]",
        "state, batch, rng, self._frozen_of[0], self._hparams_of[p]",
        (
            "tests/test_population.py::test_members_match_their_single_runs_step_by_step",
        ),
    ),
)


def copy_repo(target: str) -> None:
  files = (
      subprocess.run(
          ["git", "ls-files", "-co", "--exclude-standard", "-z"],
          cwd=REPO,
          capture_output=True,
          check=True,
      )
      .stdout.decode()
      .split("\0")
  )
  for rel in filter(None, files):
    source = os.path.join(REPO, rel)
    if os.path.isfile(source):
      os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
      shutil.copy2(source, os.path.join(target, rel))


def run_tests(
    root: str, tests: tuple[str, ...], timeout: int
) -> tuple[bool, str]:
  """True if every test passes; the tail of pytest's output."""
  env = {
      **os.environ,
      "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }
  try:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            *tests,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
  except subprocess.TimeoutExpired:
    return False, "timed out"
  lines = (out.stdout + out.stderr).strip().splitlines()
  return out.returncode == 0, lines[-1] if lines else ""


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help="mutants to try (default: all)")
  parser.add_argument(
      "--list", action="store_true", help="list the mutants and exit"
  )
  parser.add_argument(
      "--timeout", type=int, default=900, help="seconds per pytest run"
  )
  args = parser.parse_args()
  by_name = {m.name: m for m in MUTANTS}
  if len(by_name) != len(MUTANTS):
    raise SystemExit("two mutants share a name")
  if args.list:
    for m in MUTANTS:
      print(f"{m.name:34s} {m.path:28s} {m.guarantee}")
    return 0
  unknown = [n for n in args.names if n not in by_name]
  if unknown:
    print(f"error: unknown mutants {unknown}; see --list", file=sys.stderr)
    return 2
  chosen = [by_name[n] for n in args.names] if args.names else list(MUTANTS)

  with tempfile.TemporaryDirectory(prefix="masc_mutants_") as root:
    copy_repo(root)
    for m in chosen:  # every mutant must apply to today's code
      with open(os.path.join(root, m.path)) as f:
        count = f.read().count(m.old)
      if count != 1:
        print(
            f"error: mutant {m.name}: its text occurs {count} times in {m.path}",
            file=sys.stderr,
        )
        return 2
    tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    ok, tail = run_tests(root, tests, args.timeout * 2)
    print(
        f"baseline, unmutated ({len(tests)} tests): {'pass' if ok else 'FAIL'}  {tail}",
        flush=True,
    )
    if not ok:
      print(
          "error: the tests fail without any mutant; fix them first",
          file=sys.stderr,
      )
      return 2
    survivors = []
    for m in chosen:
      path = os.path.join(root, m.path)
      with open(path) as f:
        original = f.read()
      with open(path, "w") as f:
        f.write(original.replace(m.old, m.new))
      try:
        t0 = time.perf_counter()
        passed, tail = run_tests(root, m.tests, args.timeout)
      finally:
        with open(path, "w") as f:
          f.write(original)
      verdict = "SURVIVED" if passed else "killed"
      if passed:
        survivors.append(m.name)
      print(
          f"{verdict:8s} {m.name:34s} {time.perf_counter() - t0:5.0f}s  {tail}",
          flush=True,
      )
  print(
      f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed"
      + (f"; survivors: {', '.join(survivors)}" if survivors else "")
  )
  return 1 if survivors else 0


if __name__ == "__main__":
  sys.exit(main())
