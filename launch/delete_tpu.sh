#!/usr/bin/env bash
# launch/delete_tpu.sh: delete the Cloud TPU VM, which stops its billing:
#
#   gcloud compute tpus tpu-vm delete NAME --zone=ZONE --project=PROJECT --quiet
#
# Everything on the workers' disks goes with it: fetch the results first
# (launch/fetch_results.sh). See launch/README.md.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MASC_DESCRIPTION="Delete a Cloud TPU VM (stops billing; its disks are lost: run launch/fetch_results.sh first)."

masc_use project! zone! tpu_name!
masc_parse "$@"
masc_check_tpu_name
masc_need gcloud

masc_info "Deleting TPU VM '$OPT_tpu_name' in zone $OPT_zone, project $OPT_project (no confirmation prompt)"
masc_tpu_flags
masc_run gcloud compute tpus tpu-vm delete "$OPT_tpu_name" "${MASC_TPU_FLAGS[@]}" --quiet
