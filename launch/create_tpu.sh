#!/usr/bin/env bash
# launch/create_tpu.sh: create the Cloud TPU VM (or multi-host slice) that
# masc_jax runs on:
#
#   gcloud compute tpus tpu-vm create NAME --zone=ZONE --project=PROJECT \
#       --accelerator-type=TYPE --version=RUNTIME [--spot | --preemptible]
#
# Billing starts as soon as the TPU exists: delete it with launch/delete_tpu.sh.
# Try it with --dry-run first. See launch/README.md.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MASC_DESCRIPTION="Create a Cloud TPU VM with gcloud (billing starts at once; delete it with launch/delete_tpu.sh)."
MASC_EPILOG="Example:
  $MASC_SCRIPT --project=my-proj --zone=us-central2-b --tpu-name=masc-v4 --accelerator-type=v4-8 --spot --dry-run"

masc_define accelerator_type --accelerator-type MASC_ACCELERATOR_TYPE v4-8 value TYPE \
  "TPU type and size: v4-8, v4-32 (4 hosts), v5litepod-8, v5p-8, v6e-8, ..."
masc_define runtime_version --runtime-version MASC_RUNTIME_VERSION "" value VERSION \
  "TPU VM software version; default from the accelerator: v2-v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e."
masc_define spot --spot MASC_SPOT 0 bool "" \
  "Create a Spot TPU (much cheaper; can be preempted at any time)."
masc_define preemptible --preemptible MASC_PREEMPTIBLE 0 bool "" \
  "Create a preemptible TPU (the older form of --spot)."

masc_use project! zone! tpu_name! accelerator_type runtime_version spot preemptible
masc_parse "$@"
masc_check_tpu_name
masc_need gcloud

if [[ $OPT_spot == 1 && $OPT_preemptible == 1 ]]; then
  masc_die 2 "choose one of --spot and --preemptible, not both"
fi

if [[ -z $OPT_runtime_version ]]; then
  case $OPT_accelerator_type in
    v5litepod-* | v5e-*) OPT_runtime_version=v2-alpha-tpuv5-lite ;;
    v5p-*) OPT_runtime_version=v2-alpha-tpuv5 ;;
    v6e-*) OPT_runtime_version=v2-alpha-tpuv6e ;;
    *) OPT_runtime_version=tpu-ubuntu2204-base ;;
  esac
fi

capacity="on-demand"
capacity_flag=()
if [[ $OPT_spot == 1 ]]; then
  capacity="Spot (preemptible at any time)"
  capacity_flag=(--spot)
elif [[ $OPT_preemptible == 1 ]]; then
  capacity="preemptible"
  capacity_flag=(--preemptible)
fi

masc_info "Creating TPU VM '$OPT_tpu_name': $OPT_accelerator_type, $capacity, runtime $OPT_runtime_version, zone $OPT_zone, project $OPT_project"
masc_note "Billing starts now and runs until launch/delete_tpu.sh; next: launch/setup_tpu.sh"
masc_tpu_flags
masc_run gcloud compute tpus tpu-vm create "$OPT_tpu_name" "${MASC_TPU_FLAGS[@]}" \
  "--accelerator-type=$OPT_accelerator_type" "--version=$OPT_runtime_version" \
  ${capacity_flag[@]+"${capacity_flag[@]}"}
