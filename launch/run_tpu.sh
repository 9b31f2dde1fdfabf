#!/usr/bin/env bash
# launch/run_tpu.sh: run masc_jax on every worker of a TPU VM at once:
#
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command '...
#       export TFDS_DATA_DIR=...
#       python -m masc_jax.main --config=CONFIG --workdir=WORKDIR [--multihost] [ARGS...]'
#
# Every worker runs the same command (JAX's multi-controller model); with
# --multihost, masc_jax.main calls jax.distributed.initialize() first, which
# slices with more than one host (v4-16 and up, v5litepod-16 and up, ...)
# need. Arguments after "--" go to masc_jax.main unchanged, e.g.
# `-- --config.seed=1`.
#
# Data: with a gs:// --data-dir the datasets are first copied (rsync, so only
# once) to --worker-data-dir on each worker's local disk and TFDS_DATA_DIR
# points there, because ArrayRecord reading straight from GCS depends on the
# array_record/etils versions; --no-stage-data exports the gs:// path as is.
#
# Output: by default the run is in the foreground: every worker's output is
# streamed here and also appended to --log-file on that worker; if this
# connection drops, the run may die with it. --background starts it with
# nohup instead (output only in the log file) and returns at once: use that
# for long runs. Try it with --dry-run first. See launch/README.md.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MASC_DESCRIPTION="Run python -m masc_jax.main --config=CONFIG --workdir=WORKDIR on all workers of a TPU VM (--worker=all), with TFDS_DATA_DIR exported; ARGS after -- are passed to masc_jax.main."
MASC_PASSTHROUGH_HELP="[-- MAIN_ARGS...]"
MASC_ALLOW_PASSTHROUGH=1
MASC_EPILOG="Examples:
  $MASC_SCRIPT --tpu-name=masc-v4 --workdir=runs/c100 --data-dir=gs://my-bucket/tfds -- --config.seed=1
  $MASC_SCRIPT --tpu-name=masc-v4-32 --multihost --background --workdir=gs://my-bucket/runs/c100 --data-dir=gs://my-bucket/tfds"

masc_define multihost --multihost MASC_MULTIHOST 0 bool "" \
  "Pass --multihost to masc_jax.main (jax.distributed.initialize()); needed when the slice has more than one host."
masc_define background --background MASC_DETACH 0 bool "" \
  "Start the run with nohup and return at once (output only in --log-file); default: foreground."
masc_define log_file --log-file MASC_LOG_FILE "" value FILE \
  "Log file on each worker, relative to --remote-dir unless absolute; default: logs/CONFIG-UTCTIME.log."
masc_define stage_data --stage-data MASC_STAGE_DATA 1 bool "" \
  "With a gs:// --data-dir, rsync it to --worker-data-dir on each worker first (--no-stage-data: read gs:// directly)."
masc_define worker_data_dir --worker-data-dir MASC_WORKER_DATA_DIR tensorflow_datasets value DIR \
  "Where a gs:// --data-dir is staged on each worker; relative = relative to \$HOME."

masc_use project! zone! tpu_name! config workdir data_dir multihost background log_file \
  stage_data worker_data_dir remote_dir venv
masc_parse "$@"
masc_check_tpu_name
masc_require config
masc_need gcloud
masc_default_workdir

config_base=$(basename "${OPT_config%%:*}")
if [[ -z $OPT_data_dir && $config_base == cifar* ]]; then
  masc_die_missing data_dir "config '$OPT_config' reads TFDS array_record data; make it once with launch/prepare_data.sh"
fi

if [[ -z $OPT_log_file ]]; then
  cfg_name=$(basename "$OPT_config")
  cfg_name=${cfg_name%.py}
  cfg_name=$(printf '%s' "$cfg_name" | tr -c 'A-Za-z0-9._-' '_')
  OPT_log_file="logs/${cfg_name}-$(date -u +%Y%m%d-%H%M%S).log"
fi

R=$(masc_remote_home_path "$OPT_remote_dir")
V=$(masc_remote_home_path "$OPT_venv")
log=$(masc_remote_word "$OPT_log_file")

steps=("set -euo pipefail" "cd $R" "export PATH=$V/bin:\"\$PATH\"")
data_note=""
case $OPT_data_dir in
  "")
    data_note="TFDS_DATA_DIR not set (fine for configs that need no TFDS data, e.g. digits)"
    ;;
  gs://*)
    if [[ $OPT_stage_data == 1 ]]; then
      src=$(masc_quote "${OPT_data_dir%/}")
      dst=$(masc_remote_home_path "$OPT_worker_data_dir")
      steps+=(
        "mkdir -p $dst"
        "if command -v gcloud >/dev/null 2>&1; then gcloud storage rsync --recursive $src $dst; else gsutil -m rsync -r $src $dst; fi"
        "export TFDS_DATA_DIR=$dst"
      )
      data_note="copies $OPT_data_dir to $(masc_display_home_path "$OPT_worker_data_dir") on each worker (rsync: only new files) and exports TFDS_DATA_DIR=$(masc_display_home_path "$OPT_worker_data_dir")"
    else
      steps+=("export TFDS_DATA_DIR=$(masc_quote "$OPT_data_dir")")
      data_note="exports TFDS_DATA_DIR=$OPT_data_dir (read directly from GCS)"
    fi
    ;;
  *)
    steps+=("export TFDS_DATA_DIR=$(masc_remote_word "$OPT_data_dir")")
    data_note="exports TFDS_DATA_DIR=$OPT_data_dir (a path on the workers: it must exist on every one of them)"
    ;;
esac

main_cmd="python -m masc_jax.main --config=$(masc_quote "$OPT_config") --workdir=$(masc_remote_word "$OPT_workdir")"
if [[ $OPT_multihost == 1 ]]; then
  main_cmd+=" --multihost"
fi
if ((${#MASC_PASSTHROUGH[@]})); then
  main_cmd+=" $(masc_quote_cmd "${MASC_PASSTHROUGH[@]}")"
fi

steps+=("mkdir -p \"\$(dirname $log)\"")
if [[ $OPT_background == 1 ]]; then
  steps+=(
    "nohup $main_cmd >$log 2>&1 </dev/null &"
    "echo \"\$(hostname): started masc_jax.main (pid \$!), log:\" $log"
  )
else
  steps+=("$main_cmd 2>&1 | tee -a $log")
fi
remote_script=$(masc_join_steps "${steps[@]}")

masc_info "Running masc_jax.main --config=$OPT_config on all workers of '$OPT_tpu_name' ($([[ $OPT_background == 1 ]] && echo "in the background" || echo "in the foreground"))"
masc_note "workdir: $OPT_workdir$([[ $OPT_workdir != gs://* && $OPT_workdir != /* && $OPT_workdir != "~/"* ]] && echo " (relative to $(masc_display_home_path "$OPT_remote_dir") on the workers)")"
masc_note "data: $data_note"
masc_note "log on each worker: $OPT_log_file$([[ $OPT_log_file != /* && $OPT_log_file != "~/"* ]] && echo " (in $(masc_display_home_path "$OPT_remote_dir"))")"
if [[ $OPT_multihost == 1 ]]; then
  masc_note "multi-host: every worker runs the same command; only process 0 writes the results"
fi
masc_tpu_flags
masc_run gcloud compute tpus tpu-vm ssh "$OPT_tpu_name" "${MASC_TPU_FLAGS[@]}" --worker=all \
  --command "$remote_script"

if [[ $OPT_background == 1 ]]; then
  follow="tail -f $log"
  if [[ $OPT_log_file != /* && $OPT_log_file != "~/"* ]]; then
    follow="cd $R && $follow"
  fi
  stop='pkill -f "[m]asc_jax.main" || true'
  masc_info "Started. Follow worker 0's log:"
  masc_note "$(masc_quote_cmd gcloud compute tpus tpu-vm ssh "$OPT_tpu_name" "${MASC_TPU_FLAGS[@]}" --worker=0 --command "$follow")"
  masc_info "Stop it on all workers:"
  masc_note "$(masc_quote_cmd gcloud compute tpus tpu-vm ssh "$OPT_tpu_name" "${MASC_TPU_FLAGS[@]}" --worker=all --command "$stop")"
fi
masc_info "Then: launch/fetch_results.sh --workdir=$(masc_quote "$OPT_workdir")"
