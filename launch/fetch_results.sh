#!/usr/bin/env bash
# launch/fetch_results.sh: copy a run's results from TPU worker 0 (process 0
# writes them) to this machine:
#
#   gcloud compute tpus tpu-vm scp NAME:WORKDIR/FILE DEST/ --worker=0 ...
#
# for FILE in results.md results.json report.png metrics.jsonl, or, with a
# gs:// --workdir, `gcloud storage cp gs://.../FILE DEST/` (no TPU needed, so
# this works after the TPU is deleted). --all copies the whole workdir instead
# (checkpoints included), to DEST/<workdir name>. A missing file is reported
# and skipped; the script fails only if nothing could be fetched.
# Try it with --dry-run first. See launch/README.md.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MASC_DESCRIPTION="Copy results.md, results.json, report.png and metrics.jsonl of a run from TPU worker 0 (or from a gs:// workdir) into a local folder."
MASC_EPILOG="--project, --zone and --tpu-name are required unless --workdir is gs://...

Examples:
  $MASC_SCRIPT --tpu-name=masc-v4 --workdir=runs/c100 --dry-run
  $MASC_SCRIPT --workdir=gs://my-bucket/runs/c100 --dest=./c100"

RESULT_FILES=(results.md results.json report.png metrics.jsonl)

masc_define dest --dest MASC_RESULTS_DIR "" value DIR \
  "Local folder for the files; default: runs/from_tpu/<workdir name> in this checkout."
masc_define all --all MASC_FETCH_ALL 0 bool "" \
  "Copy the whole workdir (checkpoints too) into DEST/<workdir name> instead of the four result files."

# --project/--zone/--tpu-name are required unless the workdir is on GCS.
masc_use project zone tpu_name config workdir remote_dir dest all
masc_parse "$@"
masc_default_workdir

wd=${OPT_workdir%/}
[[ -n $wd ]] || wd=/
name=$(basename "$wd")
if [[ -z $OPT_dest ]]; then
  if [[ $OPT_all == 1 ]]; then
    OPT_dest="$MASC_REPO_ROOT/runs/from_tpu"
  else
    OPT_dest="$MASC_REPO_ROOT/runs/from_tpu/$name"
  fi
fi

if [[ $wd == gs://* ]]; then
  source_desc="$wd"
  masc_need gcloud
else
  missing=0
  for key in project zone tpu_name; do
    var="OPT_$key"
    if [[ -z ${!var} ]]; then
      printf '%s: error: missing required setting %s (needed unless --workdir is gs://...)\n' \
        "$MASC_SCRIPT" "$(masc_setting_name "$key")" >&2
      missing=1
    fi
  done
  ((missing == 0)) || exit 2
  masc_check_tpu_name
  masc_need gcloud
  masc_tpu_flags
  # scp paths on the worker are relative to its $HOME.
  case $wd in
    /*) remote=$wd ;;
    "~/"*) remote=${wd#"~/"} ;;
    *)
      rd=${OPT_remote_dir%/}
      rd=${rd#"~/"}
      remote="$rd/$wd"
      ;;
  esac
  source_desc="worker 0 of '$OPT_tpu_name': $(masc_display_home_path "$remote")"
fi

# fetch SOURCE DEST_DIR [--recurse]: one copy; returns its status.
fetch() {
  local src=$1 dst=$2
  shift 2
  if [[ $wd == gs://* ]]; then
    masc_run gcloud storage cp "$@" "$src" "$dst/"
  else
    masc_run gcloud compute tpus tpu-vm scp "$@" "$OPT_tpu_name:$src" "$dst/" \
      "${MASC_TPU_FLAGS[@]}" --worker=0
  fi
}

if [[ $OPT_all == 1 ]]; then
  masc_info "Copying the whole workdir from $source_desc to $OPT_dest/$name"
  masc_run mkdir -p "$OPT_dest"
  if [[ $wd == gs://* ]]; then
    fetch "$wd" "$OPT_dest" --recursive
  else
    fetch "$remote" "$OPT_dest" --recurse
  fi
  masc_is_dry_run || masc_info "Fetched into $OPT_dest/$name"
  exit 0
fi

masc_info "Copying ${RESULT_FILES[*]} from $source_desc to $OPT_dest"
masc_run mkdir -p "$OPT_dest"
fetched=0
failed=()
for f in "${RESULT_FILES[@]}"; do
  if [[ $wd == gs://* ]]; then
    src="$wd/$f"
  else
    src="$remote/$f"
  fi
  if fetch "$src" "$OPT_dest"; then
    fetched=$((fetched + 1))
  else
    masc_warn "could not fetch $f (not written yet, or the run failed?)"
    failed+=("$f")
  fi
done
if masc_is_dry_run; then
  exit 0
fi
if ((fetched == 0)); then
  masc_die 1 "nothing fetched from $source_desc: check --workdir (and that the run has finished)"
fi
masc_info "Fetched $fetched file(s) into $OPT_dest${failed[0]:+ (missing: ${failed[*]})}"
if [[ -f $OPT_dest/results.md ]]; then
  masc_note "see $OPT_dest/results.md"
fi
