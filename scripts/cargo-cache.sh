#!/usr/bin/env bash
# Prints the CARGO_TARGET_DIR that CI builds in: a folder under ~/.cache kept between runs on the
# same machine, so a fresh clone recompiles only nightcopy itself, not the ~400 crates below it.
#
# The folder is keyed by the toolchain and Cargo.lock. A new key is seeded from the newest folder
# already there (cargo then rebuilds only the crates whose versions changed); only the two newest
# folders are kept. With --prune (what CI runs) nightcopy's own artifacts are removed first: a fresh clone rebuilds
# them anyway (new mtimes), and clones at different paths would otherwise pile up copies of them.
# A machine with no cache simply fills it (docs/packaging.md, "CI").
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
root="${NIGHTCOPY_TARGET_CACHE:-$HOME/.cache/nightcopy-target}"
toolchain="$(rustc -vV | sha256sum | cut -c1-12)"
lock="$(sha256sum "$repo/Cargo.lock" | cut -c1-12)"
dir="$root/$toolchain-$lock"

mkdir -p "$root"
# One CI run at a time per cache: two cargo processes share a target dir safely (cargo's own
# lock), but seeding and pruning must not race.
exec 8>"$root/.lock"
flock 8

# nightcopy's own artifacts go first, in every kept folder: a fresh clone rebuilds them anyway, and
# a seed then copies only the dependencies (about 5 GB, not the 14 GB a day of builds left here).
prune() {
  for profile in debug release; do
    [ -d "$1/$profile" ] || continue
    rm -rf "$1/$profile"/deps/nightcopy-* "$1/$profile"/deps/libnightcopy-* \
      "$1/$profile"/deps/it-* "$1/$profile"/.fingerprint/nightcopy-* \
      "$1/$profile"/build/nightcopy-* "$1/$profile"/incremental
  done
}
# Only with --prune (CI's fresh clone): a build in progress in the folder — a developer's, using
# this script only to find the folder — would lose its files under it.
if [ "${1:-}" = "--prune" ]; then
  for d in "$root"/*/; do
    [ -d "$d" ] && prune "${d%/}"
  done
fi

if [ ! -d "$dir" ]; then
  newest="$(find "$root" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | head -1 | cut -d' ' -f2-)"
  if [ -n "$newest" ]; then
    echo "seeding $dir from $newest" >&2
    cp -a --reflink=auto "$newest" "$dir.tmp"
    mv "$dir.tmp" "$dir"
  else
    echo "no compiled dependencies cached yet: this run fills $dir" >&2
    mkdir -p "$dir"
  fi
fi
touch "$dir"

# Keep the two newest keys.
find "$root" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | tail -n +3 | cut -d' ' -f2- |
  while read -r old; do
    echo "pruning $old" >&2
    rm -rf "$old"
  done


echo "$dir"
