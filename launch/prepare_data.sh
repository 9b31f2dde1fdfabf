#!/usr/bin/env bash
# launch/prepare_data.sh DATASET: build a TFDS dataset as array_record, once,
# on THIS machine (no TPU involved), and optionally upload it to GCS:
#
#   python3 -m venv VENV && VENV/bin/python -m pip install -e "REPO[prepare]"
#   VENV/bin/tfds build DATASET --file_format=array_record --data_dir=BUILD_DIR
#   gcloud storage rsync --recursive BUILD_DIR/DATASET gs://BUCKET/PATH/DATASET
#
# DATASET is cifar100, cifar10 or fashion_mnist, or tfds:NAME for any TFDS
# image-classification dataset (NAME or NAME/CONFIG as TFDS spells it; train
# on it with --config=tfds:NAME). digits ships with scikit-learn and needs no
# preparation; fashion_mnist can also come from `apt-get install
# dataset-fashion-mnist` instead. Building needs TensorFlow, which the
# separate venv VENV gets (the `prepare` extra: tensorflow-cpu); reading the
# result later does not. It downloads the dataset (CIFAR: ~170 MB) from its
# original site.
#
# At the end it prints the `export TFDS_DATA_DIR=...` line to use with
# launch/run_tpu.sh. If TFDS_DATA_DIR / --data-dir is already a gs:// path,
# that is where the dataset is uploaded to.
# Try it with --dry-run first. See launch/README.md.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MASC_DESCRIPTION="Build TFDS DATASET (cifar100, cifar10, fashion_mnist, or tfds:NAME for any TFDS image-classification dataset) as array_record here, in a separate venv with tensorflow-cpu, optionally upload it to GCS, and print the export TFDS_DATA_DIR=... line for launch/run_tpu.sh."
MASC_POSITIONAL_HELP="DATASET"
MASC_MAX_POSITIONAL=1
MASC_EPILOG="Examples:
  $MASC_SCRIPT cifar100 --gcs-bucket=gs://my-bucket/tfds --dry-run
  $MASC_SCRIPT tfds:svhn_cropped --data-dir=\$HOME/tensorflow_datasets
  TFDS_DATA_DIR=\$HOME/tensorflow_datasets $MASC_SCRIPT cifar10"

cache_home=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}
masc_define build_dir --build-dir MASC_BUILD_DIR "" value DIR \
  "Local directory to build in; default: --data-dir if it is a local path, else ~/tensorflow_datasets."
masc_define gcs_bucket --gcs-bucket MASC_GCS_BUCKET "" value gs://BUCKET/PATH \
  "Upload the built dataset to gs://BUCKET/PATH/DATASET (default: --data-dir if it is gs://)."
masc_define prepare_venv --venv MASC_PREPARE_VENV "$cache_home/masc_jax/prepare-venv" value DIR \
  "Local venv with the [prepare] extra (tensorflow-cpu), kept for later runs."
masc_define prepare_python --python MASC_PREPARE_PYTHON python3 value PYTHON \
  "Python that creates the venv (one tensorflow-cpu has wheels for)."
masc_define tensorflow --tensorflow MASC_PREPARE_TENSORFLOW "" value PIP_SPEC \
  "Install the project plus this TensorFlow package instead of the [prepare] extra (tensorflow-cpu); default on macOS: tensorflow (tensorflow-cpu has no macOS wheels)."
masc_define install --install MASC_PREPARE_INSTALL 1 bool "" \
  "pip install -e \".[prepare]\" into the venv (--no-install: use the venv as it is)."

masc_use data_dir build_dir gcs_bucket prepare_venv prepare_python tensorflow install
masc_parse "$@"

dataset=${MASC_POSITIONAL[0]-}
expected="cifar100, cifar10, fashion_mnist, or tfds:NAME for any TFDS dataset (digits needs no preparation)"
case $dataset in
  cifar100 | cifar10 | fashion_mnist) ;;
  tfds:*)
    # Any TFDS name, spelled as TFDS does: lower case, digits, '_', one optional /CONFIG.
    dataset=${dataset#tfds:}
    if [[ ! $dataset =~ ^[a-z0-9_]+(/[a-z0-9_.]+)?$ ]]; then
      masc_die 2 "bad TFDS name '$dataset' in tfds:NAME: expected NAME or NAME/CONFIG (lower case, digits, '_')"
    fi
    ;;
  digits)
    masc_info "digits needs no preparation: it ships with scikit-learn and is read from there (no TFDS_DATA_DIR needed)."
    exit 0
    ;;
  "")
    masc_die 2 "missing DATASET: $expected; see $MASC_SCRIPT --help"
    ;;
  *)
    masc_die 2 "unknown dataset '$dataset': expected $expected"
    ;;
esac

upload=${OPT_gcs_bucket%/}
build=$OPT_build_dir
case $OPT_data_dir in
  gs://*)
    if [[ -n $upload && $upload != "${OPT_data_dir%/}" ]]; then
      masc_die 2 "$(masc_setting_name data_dir) is $OPT_data_dir but $(masc_setting_name gcs_bucket) is $upload: give one gs:// destination"
    fi
    upload=${OPT_data_dir%/}
    ;;
  "") ;;
  *) build=${build:-$OPT_data_dir} ;;
esac
build=${build:-${HOME:-/tmp}/tensorflow_datasets}
if [[ $build == gs://* ]]; then
  masc_die 2 "$(masc_setting_name build_dir) must be a local directory, not $build"
fi
if [[ $build != /* ]]; then
  build="$PWD/$build"
fi
build=${build%/}
if [[ -n $upload && $upload != gs://?* ]]; then
  masc_die 2 "$(masc_setting_name gcs_bucket) must look like gs://BUCKET[/PATH], got '$upload'"
fi

venv=${OPT_prepare_venv%/}
py="$venv/bin/python"
masc_info "Preparing TFDS '$dataset' as array_record in $build$([[ -n $upload ]] && echo ", then uploading it to $upload/$dataset")"
if [[ $OPT_install == 1 ]]; then
  masc_need "$OPT_prepare_python"
  if [[ ! -x $py ]]; then
    masc_note "creating the venv $venv (tensorflow-cpu: a few minutes, ~1 GB)"
    masc_run "$OPT_prepare_python" -m venv "$venv"
  else
    masc_note "reusing the venv $venv"
  fi
  if [[ -z $OPT_tensorflow && $(uname -s 2>/dev/null || true) == Darwin ]]; then
    OPT_tensorflow=tensorflow
    masc_note "macOS: installing 'tensorflow' (tensorflow-cpu, the [prepare] extra, has no macOS wheels)"
  fi
  if [[ -n $OPT_tensorflow ]]; then
    masc_run "$py" -m pip install -e "$MASC_REPO_ROOT" "$OPT_tensorflow"
  else
    masc_run "$py" -m pip install -e "${MASC_REPO_ROOT}[prepare]"
  fi
elif ! masc_is_dry_run && [[ ! -x $venv/bin/tfds ]]; then
  masc_die 2 "no $venv/bin/tfds: run without --no-install first"
fi

masc_run "$venv/bin/tfds" build "$dataset" --file_format=array_record "--data_dir=$build"

if [[ -n $upload ]]; then
  masc_need gcloud
  masc_run gcloud storage rsync --recursive "$build/$dataset" "$upload/$dataset"
  data_dir=$upload
else
  data_dir=$build
fi

masc_info "$([[ $OPT_dry_run == 1 ]] && echo "When done, use" || echo "Done. Use") this data directory (in this shell, or pass --data-dir to launch/run_tpu.sh):"
printf '    export TFDS_DATA_DIR=%s\n' "$(masc_quote "$data_dir")"
if [[ -z $upload ]]; then
  masc_note "(a local path: a TPU worker can only use it if the same path exists there; for TPU VMs use --gcs-bucket=gs://...)"
fi
