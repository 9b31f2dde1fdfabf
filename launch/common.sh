# shellcheck shell=bash
# launch/common.sh: shared helpers for the launch/*.sh scripts of masc_jax.
#
# Sourced, never run. It provides:
#   * a small settings registry: every setting has a flag, an environment
#     variable and a default; flags win over environment variables, which win
#     over defaults (masc_define / masc_use / masc_parse -> $OPT_<key>);
#   * generated --help text;
#   * masc_run: print a command as "+ <shell-quoted argv>" (copy-pasteable),
#     then run it, or only print it under --dry-run;
#   * quoting helpers for building the remote --command strings.
#
# Written for bash >= 3.2 (macOS' /bin/bash): no associative arrays, no
# ${var,,}, no mapfile, and every possibly-empty array is expanded guardedly.

if [[ -n ${_MASC_COMMON_LOADED:-} ]]; then
  return 0
fi
_MASC_COMMON_LOADED=1

MASC_LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MASC_REPO_ROOT=$(cd "$MASC_LAUNCH_DIR/.." && pwd)
MASC_SCRIPT="launch/$(basename "$0")"

_MASC_KEYS=""        # every defined setting key, in definition order
_MASC_USED=""        # keys the current script accepts, in --help order
_MASC_REQUIRED=""    # keys that must be set (checked by masc_parse)
MASC_POSITIONAL=()   # positional arguments
MASC_PASSTHROUGH=()  # arguments after "--" (only if MASC_ALLOW_PASSTHROUGH=1)
MASC_ALLOW_PASSTHROUGH=${MASC_ALLOW_PASSTHROUGH:-0}
MASC_MAX_POSITIONAL=${MASC_MAX_POSITIONAL:-0}
MASC_POSITIONAL_HELP=${MASC_POSITIONAL_HELP:-}
MASC_PASSTHROUGH_HELP=${MASC_PASSTHROUGH_HELP:-}

# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------
masc_info() { printf '==> %s\n' "$*"; }
masc_note() { printf '    %s\n' "$*"; }
masc_warn() { printf '%s: warning: %s\n' "$MASC_SCRIPT" "$*" >&2; }
# masc_die CODE MESSAGE...
masc_die() {
  local code=$1
  shift
  printf '%s: error: %s\n' "$MASC_SCRIPT" "$*" >&2
  exit "$code"
}

# --------------------------------------------------------------------------
# Quoting
# --------------------------------------------------------------------------
# masc_quote STRING: print STRING quoted for a POSIX shell. Plain words stay
# bare, most others get single quotes (readable), strings with control
# characters fall back to bash's printf %q ($'...').
masc_quote() {
  local s=$1
  local safe='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ $s =~ $safe ]]; then
    printf '%s' "$s"
  elif [[ $s == *[[:cntrl:]]* ]]; then
    printf '%q' "$s"
  else
    local sq="'" esc="'\\''"
    local body=${s//$sq/$esc}
    printf "'%s'" "$body"
  fi
}

# masc_quote_cmd ARG...: the argv as one copy-pasteable command line.
masc_quote_cmd() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(masc_quote "$arg")"
  done
  printf '%s' "$out"
}

# masc_remote_home_path PATH: PATH as a word for the remote shell, where a
# relative PATH (or ~/PATH) is taken relative to the remote $HOME.
masc_remote_home_path() {
  local p=$1
  case $p in
    /*) masc_quote "$p" ;;
    "~") printf '"$HOME"' ;;
    "~/"*) printf '"$HOME"/%s' "$(masc_quote "${p#"~/"}")" ;;
    *) printf '"$HOME"/%s' "$(masc_quote "$p")" ;;
  esac
}

# masc_display_home_path PATH: PATH for messages (~/PATH when relative).
masc_display_home_path() {
  case $1 in
    /* | "~" | "~/"*) printf '%s' "$1" ;;
    *) printf '~/%s' "$1" ;;
  esac
}

# masc_remote_word STRING: STRING for the remote shell; a leading "~/" is
# turned into "$HOME"/ so that it still expands there.
masc_remote_word() {
  local p=$1
  case $p in
    "~/"*) printf '"$HOME"/%s' "$(masc_quote "${p#"~/"}")" ;;
    *) masc_quote "$p" ;;
  esac
}

# masc_join_steps STATEMENT...: one line of shell, the statements joined by
# "; " (by " " after one that ends in "&", since "& ;" is a syntax error).
masc_join_steps() {
  local out="" s
  for s in "$@"; do
    if [[ -z $out ]]; then
      out=$s
    elif [[ $out == *"&" ]]; then
      out+=" $s"
    else
      out+="; $s"
    fi
  done
  printf '%s' "$out"
}

# --------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------
# masc_run CMD ARG...: print "+ CMD ARG..." and run it (unless --dry-run).
masc_run() {
  printf '+ %s\n' "$(masc_quote_cmd "$@")"
  if [[ ${OPT_dry_run:-0} == 1 ]]; then
    return 0
  fi
  "$@"
}

masc_is_dry_run() { [[ ${OPT_dry_run:-0} == 1 ]]; }

# masc_need CMD: unless --dry-run, fail early (exit 2) when CMD is missing.
masc_need() {
  if masc_is_dry_run || command -v "$1" >/dev/null 2>&1; then
    return 0
  fi
  case $1 in
    gcloud) masc_die 2 "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or use --dry-run" ;;
    *) masc_die 2 "$1 not found on PATH" ;;
  esac
}

# --------------------------------------------------------------------------
# Settings registry
# --------------------------------------------------------------------------
# masc_define KEY FLAG ENV DEFAULT KIND METAVAR HELP
#   KIND: "value" (--flag=V or --flag V) or "bool" (--flag / --no-flag; the
#   env var is true for 1/true/yes/on, false for 0/false/no/off/empty).
#   ENV may be "" for flag-only settings.
masc_define() {
  local key=$1
  printf -v "_MASC_FLAG_$key" '%s' "$2"
  printf -v "_MASC_ENV_$key" '%s' "$3"
  printf -v "_MASC_DEFAULT_$key" '%s' "$4"
  printf -v "_MASC_KIND_$key" '%s' "$5"
  printf -v "_MASC_METAVAR_$key" '%s' "$6"
  printf -v "_MASC_HELP_$key" '%s' "$7"
  case " $_MASC_KEYS " in
    *" $key "*) ;;
    *) _MASC_KEYS+=" $key" ;;
  esac
}

_masc_get() { # _masc_get FIELD KEY
  local var="_MASC_${1}_$2"
  printf '%s' "${!var-}"
}

# masc_use KEY[!]...: the settings this script accepts; a trailing "!" marks a
# setting as required.
masc_use() {
  local spec key
  for spec in "$@"; do
    key=${spec%!}
    if [[ -z $(_masc_get FLAG "$key") ]]; then
      masc_die 70 "internal: unknown setting '$key'"
    fi
    _MASC_USED+=" $key"
    if [[ $spec == *! ]]; then
      _MASC_REQUIRED+=" $key"
    fi
  done
}

# masc_setting_name KEY: "--flag (or $ENV)" for messages.
masc_setting_name() {
  local flag env
  flag=$(_masc_get FLAG "$1")
  env=$(_masc_get ENV "$1")
  if [[ -n $env ]]; then
    printf '%s (or $%s)' "$flag" "$env"
  else
    printf '%s' "$flag"
  fi
}

# masc_die_missing KEY [EXTRA]: exit 2 naming the missing setting.
masc_die_missing() {
  local extra=${2:-}
  masc_die 2 "missing required setting $(masc_setting_name "$1")${extra:+: $extra}"
}

masc_usage() {
  local key flag env def kind metavar help left req
  printf 'Usage: %s [options]%s%s\n\n' "$MASC_SCRIPT" \
    "${MASC_POSITIONAL_HELP:+ $MASC_POSITIONAL_HELP}" \
    "${MASC_PASSTHROUGH_HELP:+ $MASC_PASSTHROUGH_HELP}"
  printf '%s\n\n' "$MASC_DESCRIPTION"
  printf 'Options (a flag wins over its environment variable):\n'
  for key in $_MASC_USED; do
    flag=$(_masc_get FLAG "$key")
    env=$(_masc_get ENV "$key")
    def=$(_masc_get DEFAULT "$key")
    kind=$(_masc_get KIND "$key")
    metavar=$(_masc_get METAVAR "$key")
    help=$(_masc_get HELP "$key")
    if [[ $kind == value ]]; then
      left="$flag=${metavar:-VALUE}"
    else
      left="$flag"
    fi
    req=""
    case " $_MASC_REQUIRED " in *" $key "*) req=" (required)" ;; esac
    printf '  %-28s %s%s\n' "$left" "$help" "$req"
    if [[ -n $env ]]; then
      printf '  %-28s   env: $%s' "" "$env"
    else
      printf '  %-28s   env: (none)' ""
    fi
    if [[ -n $def ]]; then
      if [[ $kind == bool ]]; then
        [[ $def == 1 ]] && printf '; default: on' || printf '; default: off'
      else
        printf '; default: %s' "$def"
      fi
    fi
    printf '\n'
  done
  printf '  %-28s %s\n' "-h, --help" "Show this help and exit."
  if [[ -n ${MASC_EPILOG:-} ]]; then
    printf '\n%s\n' "$MASC_EPILOG"
  fi
}

_masc_truthy() { # _masc_truthy VALUE WHAT -> prints 1 or 0
  case $(printf '%s' "$1" | tr '[:upper:]' '[:lower:]') in
    1 | true | yes | on) printf 1 ;;
    0 | false | no | off | "") printf 0 ;;
    *) masc_die 2 "$2 must be 1/0/true/false, got '$1'" ;;
  esac
}

# masc_parse "$@": parse the command line into $OPT_<key> for every used key
# (flag > environment variable > default), MASC_POSITIONAL and
# MASC_PASSTHROUGH, handle --help, then check the required settings.
masc_parse() {
  masc_use dry_run
  local arg key flag kind name value matched
  local set_keys=" "
  while (($#)); do
    arg=$1
    case $arg in
      -h | --help)
        masc_usage
        exit 0
        ;;
      --)
        shift
        if [[ $MASC_ALLOW_PASSTHROUGH != 1 ]]; then
          if (($#)); then
            masc_die 2 "unexpected arguments after '--': $*"
          fi
        else
          MASC_PASSTHROUGH=("$@")
        fi
        break
        ;;
      -*)
        matched=""
        name=${arg%%=*}
        for key in $_MASC_USED; do
          flag=$(_masc_get FLAG "$key")
          kind=$(_masc_get KIND "$key")
          if [[ $kind == value && $name == "$flag" ]]; then
            if [[ $arg == *=* ]]; then
              value=${arg#*=}
            else
              if (($# < 2)); then
                masc_die 2 "$flag needs a value (see --help)"
              fi
              shift
              value=$1
            fi
            printf -v "OPT_$key" '%s' "$value"
            matched=1
          elif [[ $kind == bool && $arg == "$flag" ]]; then
            printf -v "OPT_$key" '%s' 1
            matched=1
          elif [[ $kind == bool && $arg == "--no-${flag#--}" ]]; then
            printf -v "OPT_$key" '%s' 0
            matched=1
          elif [[ $kind == bool && $name == "$flag" ]]; then
            masc_die 2 "$flag takes no value (got '$arg')"
          fi
          if [[ -n $matched ]]; then
            set_keys+="$key "
            break
          fi
        done
        if [[ -z $matched ]]; then
          masc_die 2 "unknown option '$arg' (see $MASC_SCRIPT --help)"
        fi
        ;;
      *)
        if ((${#MASC_POSITIONAL[@]} >= MASC_MAX_POSITIONAL)); then
          masc_die 2 "unexpected argument '$arg' (see $MASC_SCRIPT --help)"
        fi
        MASC_POSITIONAL+=("$arg")
        ;;
    esac
    shift
  done

  # Environment variables, then defaults, for everything not given as a flag.
  local env def
  for key in $_MASC_USED; do
    case $set_keys in *" $key "*) continue ;; esac
    env=$(_masc_get ENV "$key")
    def=$(_masc_get DEFAULT "$key")
    kind=$(_masc_get KIND "$key")
    value=$def
    if [[ -n $env && -n ${!env-} ]]; then
      value=${!env}
    fi
    if [[ $kind == bool ]]; then
      value=$(_masc_truthy "$value" "$(masc_setting_name "$key")") || exit $?
    fi
    printf -v "OPT_$key" '%s' "$value"
  done

  local var missing=0
  for key in $_MASC_REQUIRED; do
    var="OPT_$key"
    if [[ -z ${!var} ]]; then
      printf '%s: error: missing required setting %s\n' "$MASC_SCRIPT" "$(masc_setting_name "$key")" >&2
      missing=1
    fi
  done
  if ((missing)); then
    exit 2
  fi
}

# masc_require KEY [EXTRA]: die (exit 2) unless $OPT_KEY is set.
masc_require() {
  local var="OPT_$1"
  if [[ -z ${!var-} ]]; then
    masc_die_missing "$1" "${2:-}"
  fi
}

# --------------------------------------------------------------------------
# The shared settings
# --------------------------------------------------------------------------
masc_define dry_run --dry-run MASC_DRY_RUN 0 bool "" \
  "Print the commands (one per line, prefixed '+ ') and exit 0 without running them."
masc_define project --project MASC_PROJECT "" value PROJECT_ID \
  "Google Cloud project ID."
masc_define zone --zone MASC_ZONE "" value ZONE \
  "TPU zone, e.g. us-central2-b (v4), us-west4-a (v5e)."
masc_define tpu_name --tpu-name MASC_TPU_NAME "" value NAME \
  "Name of the TPU VM (lowercase letters, digits, hyphens)."
masc_define remote_dir --remote-dir MASC_REMOTE_DIR masc-jax value DIR \
  "The project's checkout on every worker; relative = relative to the worker's \$HOME (not named masc_jax, which would shadow the package)."
masc_define venv --venv MASC_REMOTE_VENV masc_venv value DIR \
  "Python virtual environment on every worker; relative = relative to \$HOME."
masc_define config --config MASC_CONFIG cifar100 value CONFIG \
  "masc_jax.main's --config: a registered name (cifar100, cifar10, digits, tiny), NAME:ARG or a config file path."
masc_define workdir --workdir MASC_WORKDIR "" value DIR \
  "masc_jax.main's --workdir on the workers: gs://..., an absolute path, ~/path, or a path relative to --remote-dir; default: runs/<config name>, as masc_jax.main."
masc_define data_dir --data-dir TFDS_DATA_DIR "" value DIR \
  "TFDS data directory holding the prepared array_record datasets (gs://bucket/path or a path)."

# masc_default_workdir: if --workdir is unset, set it to masc_jax.main's own
# default, runs/<config name> (config_lib.config_name: NAME[:ARG] ->
# basename of NAME without extension, plus _ARG).
masc_default_workdir() {
  if [[ -n $OPT_workdir ]]; then
    return 0
  fi
  local name=${OPT_config%%:*} arg=""
  if [[ $OPT_config == *:* ]]; then
    arg=${OPT_config#*:}
  fi
  name=$(basename "$name")
  name=${name%.*}
  OPT_workdir="runs/$name${arg:+_$arg}"
}

# masc_tpu_flags: set the array MASC_TPU_FLAGS to the flags every
# `gcloud compute tpus tpu-vm` command of these scripts gets.
masc_tpu_flags() {
  MASC_TPU_FLAGS=("--zone=$OPT_zone" "--project=$OPT_project")
}

# masc_check_tpu_name: fail early on names gcloud would reject.
masc_check_tpu_name() {
  local re='^[a-z]([-a-z0-9]*[a-z0-9])?$'
  if [[ ! $OPT_tpu_name =~ $re ]]; then
    masc_die 2 "invalid TPU name '$OPT_tpu_name' for $(masc_setting_name tpu_name): use lowercase letters, digits and hyphens, starting with a letter"
  fi
}
