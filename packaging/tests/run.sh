#!/usr/bin/env bash
# The packaging tests: the systemd units, the Ansible role, the AWS documents, and the whole
# thing end to end under a real systemd. Installs what it needs (packaging/tests/install-tools.sh,
# into ~/.cache/nightcopy-tools), builds the .deb (when deb or e2e runs; its release binary is
# then the one every part tests) or else a debug binary, runs
#
#   static.sh   systemd-analyze verify/security/calendar, templates vs packaging/systemd/,
#               AWS documents, ansible-lint            (no systemd needed)
#   role.sh     the role converged into scratch roots on this machine: every file, idempotence,
#               wrong checksums, beta vs prod, the alarm against moto
#   deb.sh      the .deb of `make deb` (built once here, for deb.sh and e2e.sh): lintian, its
#               files, units and control fields, the maintainer scripts
#   e2e.sh      a debootstrapped Debian booted with systemd as PID 1: the .deb installed, purged,
#               then installed by the role (nightcopy_install_method: deb); nightcopy backs up to
#               s3s-fs and publishes to CloudWatch (moto), all on 127.0.0.1
#
# and ends with one line "N passed, M failed"; the exit code is non-zero on any failure.
#   packaging/tests/run.sh                 everything
#   packaging/tests/run.sh static role     only those parts
# Needs root (users, mounts, namespaces) and about 700 MB in the cache on first use.
# NIGHTCOPY_PKG_KEEP=1 keeps the work directory for a look after a failure;
# NIGHTCOPY_PKG_BIN=PATH tests that binary instead of building one (e.g. a release artifact);
# NIGHTCOPY_PKG_DEB=PATH that .deb instead of `make deb` (the package a mirror will serve).
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo" || exit 1
started=$SECONDS

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(static role deb e2e)

WORK="$(mktemp -d /tmp/nightcopy-pkgtest.XXXXXX)"
export WORK
export NIGHTCOPY_PKG_RESULTS="$WORK/results"
: >"$NIGHTCOPY_PKG_RESULTS"
: >"$WORK/measurements"
export PYTHONDONTWRITEBYTECODE=1

cleanup() {
  if [ "${NIGHTCOPY_PKG_KEEP:-}" = 1 ]; then
    echo "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

finish() {
  local passed failed
  passed="$(grep -c '^PASS ' "$NIGHTCOPY_PKG_RESULTS")"
  failed="$(grep -c '^FAIL ' "$NIGHTCOPY_PKG_RESULTS")"
  echo
  if [ "$failed" -gt 0 ]; then
    echo "failed:"
    sed -n 's/^FAIL /  /p' "$NIGHTCOPY_PKG_RESULTS"
  fi
  if [ -s "$WORK/measurements" ]; then
    echo "measured:"
    sed 's/^/  /' "$WORK/measurements"
  fi
  echo "packaging tests took $((SECONDS - started)) s"
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
}

if [ "$(id -u)" != 0 ]; then
  echo "FAIL packaging tests need root (system users, mounts, namespaces)" >>"$NIGHTCOPY_PKG_RESULTS"
  finish
  exit 1
fi

want_rootfs=--no-rootfs
for p in "${parts[@]}"; do [ "$p" = e2e ] && want_rootfs=; done
echo "== installing test tools (cached in ${NIGHTCOPY_TOOLS:-$HOME/.cache/nightcopy-tools})"
t=$SECONDS
if ! tools="$("$here/install-tools.sh" $want_rootfs)"; then
  echo "FAIL install the test tools (packaging/tests/install-tools.sh)" >>"$NIGHTCOPY_PKG_RESULTS"
  finish
  exit 1
fi
while IFS='=' read -r key value; do
  case "$key" in NIGHTCOPY_*) export "$key=$value" ;; esac
done <<<"$tools"
echo "   ($((SECONDS - t)) s)"

target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"

# The .deb, once, for deb.sh and e2e.sh, made only when one of them runs: `make deb` is a
# release build (about 10 minutes from a fresh clone, docs/packaging.md).
want_deb=0
built_deb=0
for p in "${parts[@]}"; do case "$p" in deb | e2e) want_deb=1 ;; esac; done
if [ "$want_deb" = 1 ] && [ -n "${NIGHTCOPY_PKG_DEB:-}" ]; then
  export NIGHTCOPY_PKG_DEB
  echo "== testing the given package $NIGHTCOPY_PKG_DEB"
elif [ "$want_deb" = 1 ]; then
  echo "== building the .deb (make deb: packaging/deb/build.sh)"
  t=$SECONDS
  if deb="$("$repo/packaging/deb/build.sh" 2>"$WORK/deb-build.log" | tail -1)" && [ -f "$deb" ]; then
    export NIGHTCOPY_PKG_DEB="$deb"
    built_deb=1
    echo "   $deb ($((SECONDS - t)) s)"
    echo "make deb $((SECONDS - t)) s" >>"$WORK/measurements"
  else
    echo "FAIL make deb (packaging/deb/build.sh)" >>"$NIGHTCOPY_PKG_RESULTS"
    tail -n 30 "$WORK/deb-build.log"
  fi
fi

if [ -n "${NIGHTCOPY_PKG_BIN:-}" ]; then
  # A given binary (a release build, the artifact a mirror will serve) instead of building one.
  export NIGHTCOPY_BIN="$NIGHTCOPY_PKG_BIN"
  echo "== testing the given binary $NIGHTCOPY_BIN"
elif [ "$built_deb" = 1 ] && [ -x "$target_dir/release/nightcopy" ]; then
  # The binary the package was just made from (before its strip): the other parts test the
  # shipped build too, and no debug build is needed (after `make test` it is not free either:
  # without the dev-dependencies' features cargo rebuilds part of the tree, ~2 min in CI).
  export NIGHTCOPY_BIN="$target_dir/release/nightcopy"
  echo "== testing the release binary of the .deb, $NIGHTCOPY_BIN"
else
  echo "== building nightcopy (cargo build --locked)"
  t=$SECONDS
  if ! cargo build --locked --quiet; then
    echo "FAIL cargo build --locked" >>"$NIGHTCOPY_PKG_RESULTS"
    finish
    exit 1
  fi
  export NIGHTCOPY_BIN="$target_dir/debug/nightcopy"
  echo "   $NIGHTCOPY_BIN ($((SECONDS - t)) s)"
fi

for part in "${parts[@]}"; do
  case "$part" in
    static | role | deb | e2e) ;;
    *)
      echo "FAIL unknown part '$part' (static, role, deb, e2e)" >>"$NIGHTCOPY_PKG_RESULTS"
      continue
      ;;
  esac
  t=$SECONDS
  before="$(wc -l <"$NIGHTCOPY_PKG_RESULTS")"
  bash "$here/$part.sh"
  rc=$?
  # A script that stopped early (a bug in the test itself) must not look like a pass.
  if [ "$rc" -ne 0 ]; then
    echo "FAIL $part.sh exited $rc before its end" >>"$NIGHTCOPY_PKG_RESULTS"
  elif [ "$(wc -l <"$NIGHTCOPY_PKG_RESULTS")" -eq "$before" ]; then
    echo "FAIL $part.sh ran no check" >>"$NIGHTCOPY_PKG_RESULTS"
  fi
  echo "   ($part: $((SECONDS - t)) s)"
  echo "$part.sh $((SECONDS - t)) s" >>"$WORK/measurements"
done

finish
