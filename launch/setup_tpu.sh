#!/usr/bin/env bash
# launch/setup_tpu.sh: install masc_jax on every worker of a TPU VM.
#
# 1. Puts the code on all workers: either this local checkout (packed by
#    launch/pack_source.sh, copied with `gcloud compute tpus tpu-vm scp
#    --worker=all`, unpacked into --remote-dir) or, with --repo-url, a
#    `git clone` + checkout of --repo-ref on every worker.
# 2. On all workers (`gcloud compute tpus tpu-vm ssh --worker=all`): finds a
#    Python >= 3.11 (JAX needs it; installs python3.11 with apt if the image
#    has none), creates the venv --venv, runs `pip install -e ".[tpu]"` and
#    checks `python -c 'import jax; print(jax.device_count())'`.
#
# Safe to re-run (e.g. after editing the code): the venv is reused.
# Try it with --dry-run first. See launch/README.md.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MASC_DESCRIPTION="Copy (or git clone) masc_jax onto every TPU worker, create a venv there, pip install -e \".[tpu]\" and check jax.device_count()."
MASC_EPILOG="Examples:
  $MASC_SCRIPT --project=my-proj --zone=us-central2-b --tpu-name=masc-v4 --dry-run
  $MASC_SCRIPT --tpu-name=masc-v4 --repo-url=https://github.com/you/masc_jax.git --repo-ref=main"

masc_define repo_url --repo-url MASC_REPO_URL "" value URL \
  "git URL to clone on the workers; unset = copy this local checkout with gcloud scp."
masc_define repo_ref --repo-ref MASC_REPO_REF "" value REF \
  "Branch, tag or commit to check out with --repo-url; default: the remote's HEAD."
masc_define worker_python --python MASC_WORKER_PYTHON "" value PYTHON \
  "Python used to create the worker venv; default: the first of python3, python3.13, python3.12, python3.11 that is >= 3.11, else python3.11 from apt."
masc_define check --check MASC_CHECK 1 bool "" \
  "Finish with python -c 'import jax; print(jax.device_count())' on all workers (--no-check to skip)."

masc_use project! zone! tpu_name! repo_url repo_ref remote_dir venv worker_python check
masc_parse "$@"
masc_check_tpu_name
masc_need gcloud
if [[ -n $OPT_repo_ref && -z $OPT_repo_url ]]; then
  masc_die 2 "$(masc_setting_name repo_ref) needs $(masc_setting_name repo_url)"
fi

R=$(masc_remote_home_path "$OPT_remote_dir")
V=$(masc_remote_home_path "$OPT_venv")
remote_tarball=masc_jax-src.tar.gz # relative to the worker's $HOME

# The script every worker runs, as one line of bash.
steps=("set -euo pipefail" "R=$R" "V=$V")
if [[ -z $OPT_repo_url ]]; then
  steps+=(
    'mkdir -p "$R"'
    "tar -xzf \"\$HOME\"/$remote_tarball -C \"\$R\""
    "rm -f \"\$HOME\"/$remote_tarball"
  )
else
  steps+=(
    "if [ ! -d \"\$R/.git\" ]; then git clone --no-checkout $(masc_quote "$OPT_repo_url") \"\$R\"; fi"
    "git -C \"\$R\" fetch origin $(masc_quote "${OPT_repo_ref:-HEAD}")"
    'git -C "$R" checkout --force --detach FETCH_HEAD'
  )
fi
steps+=(
  "PY=${OPT_worker_python:+$(masc_quote "$OPT_worker_python")}"
  'if [ -z "$PY" ]; then for c in python3 python3.13 python3.12 python3.11; do if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then PY=$c; break; fi; done; fi'
  'if [ -z "$PY" ]; then echo "$(hostname): no python >= 3.11 (JAX needs it), installing python3.11 with apt"; sudo apt-get update -qq; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; PY=python3.11; fi'
  'if ! "$V/bin/python" -c "import sys; sys.exit(sys.version_info < (3, 11))" >/dev/null 2>&1 || ! "$V/bin/python" -m pip --version >/dev/null 2>&1; then rm -rf "$V"; "$PY" -m venv "$V" || { PYV=$("$PY" -c "import sysconfig; print(sysconfig.get_python_version())"); sudo apt-get update -qq; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$PYV-venv"; rm -rf "$V"; "$PY" -m venv "$V"; }; fi'
  '"$V/bin/python" -m pip install -q --upgrade pip'
  'cd "$R"'
  '"$V/bin/python" -m pip install -e ".[tpu]"'
)
if [[ $OPT_check == 1 ]]; then
  steps+=('echo "$(hostname): jax.device_count() = $("$V/bin/python" -c "import jax; print(jax.device_count())")"')
fi
remote_script=$(masc_join_steps "${steps[@]}")

masc_tpu_flags
if [[ -z $OPT_repo_url ]]; then
  masc_info "Copying the local checkout $MASC_REPO_ROOT to $(masc_display_home_path "$OPT_remote_dir") on all workers of '$OPT_tpu_name'"
  tarball="${TMPDIR:-/tmp}/masc_jax-src-$$.tar.gz"
  if ! masc_is_dry_run; then
    trap 'rm -f "$tarball"' EXIT
  fi
  masc_run "$MASC_LAUNCH_DIR/pack_source.sh" "$MASC_REPO_ROOT" "$tarball"
  masc_run gcloud compute tpus tpu-vm scp "$tarball" "$OPT_tpu_name:$remote_tarball" \
    "${MASC_TPU_FLAGS[@]}" --worker=all
else
  masc_info "Cloning $OPT_repo_url (${OPT_repo_ref:-HEAD}) into $(masc_display_home_path "$OPT_remote_dir") on all workers of '$OPT_tpu_name'"
fi
masc_info "Installing masc_jax[tpu] into the venv $(masc_display_home_path "$OPT_venv") on all workers (a few minutes)"
masc_run gcloud compute tpus tpu-vm ssh "$OPT_tpu_name" "${MASC_TPU_FLAGS[@]}" --worker=all \
  --command "$remote_script"
if ! masc_is_dry_run; then
  masc_info "Setup done; next: launch/prepare_data.sh (once) and launch/run_tpu.sh"
fi
