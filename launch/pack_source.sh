#!/usr/bin/env bash
# launch/pack_source.sh: pack a local checkout of masc_jax into a .tar.gz for
# the TPU workers (launch/setup_tpu.sh runs it when no --repo-url is given).
#
# In a git checkout it packs exactly what git sees: tracked files plus
# untracked files that are not ignored, with your uncommitted edits, and
# without .git, virtual environments, run directories or anything else the
# .gitignore files exclude. Outside git it packs the directory minus .git,
# venvs, __pycache__, *.egg-info, runs/ and workdirs/.
#
#   launch/pack_source.sh SOURCE_DIR OUT.tar.gz
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MASC_DESCRIPTION="Pack SOURCE_DIR (a masc_jax checkout) into OUT.tar.gz: the files git sees (tracked + untracked-not-ignored, uncommitted edits included), or the directory minus .git/venvs/caches outside git."
MASC_POSITIONAL_HELP="SOURCE_DIR OUT.tar.gz"
MASC_MAX_POSITIONAL=2
masc_parse "$@"

if ((${#MASC_POSITIONAL[@]} != 2)); then
  masc_die 2 "expected SOURCE_DIR and OUT.tar.gz (see $MASC_SCRIPT --help)"
fi
src=${MASC_POSITIONAL[0]}
out=${MASC_POSITIONAL[1]}
[[ -d $src ]] || masc_die 2 "no such directory: $src"
if masc_is_dry_run; then
  masc_info "Would pack $src into $out"
  exit 0
fi

export COPYFILE_DISABLE=1 # no macOS ._* resource files in the archive
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  list=$(mktemp "${TMPDIR:-/tmp}/masc_pack_list.XXXXXX")
  trap 'rm -f "$list"' EXIT
  n=0
  # NUL-separated so that any file name survives; deleted-but-tracked files
  # are skipped (git still lists them until the deletion is committed).
  while IFS= read -r -d '' f; do
    if [[ -e $src/$f || -L $src/$f ]]; then
      printf '%s\0' "$f" >>"$list"
      n=$((n + 1))
    fi
  done < <(git -C "$src" ls-files -z --cached --others --exclude-standard)
  ((n > 0)) || masc_die 1 "git lists no files in $src"
  tar -C "$src" --null -T "$list" -czf "$out"
  masc_info "Packed $n files (as git sees them) from $src into $out"
else
  tar -C "$src" --exclude=.git --exclude=.venv --exclude=venv \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=./runs --exclude=./workdirs -czf "$out" .
  masc_info "Packed $src (not a git checkout) into $out"
fi
