#!/usr/bin/env bash
# Installs what the packaging tests need, into the same versioned cache as scripts/test-tools.sh
# (outside the clone, so CI reuses it), and prints KEY=VALUE lines for packaging/tests/run.sh.
# Prints nothing else on a warm cache; progress goes to stderr.
#
#   - the S3 and CloudWatch test servers: scripts/test-tools.sh (s3s-fs, moto, cbor2)
#   - a venv with ansible-core, ansible-lint, boto3 (amazon.aws needs boto3), cfn-lint (the
#     scale-out CloudFormation template, packaging/aws/scale-out.yaml) and the aws cli (the role's
#     dashboard task: amazon.aws has no module for CloudWatch dashboards)
#   - two collections taken from the `ansible` wheel on PyPI: amazon.aws (the alarm task) and
#     community.general (its chroot connection drives the role into the booted test root).
#     Ansible Galaxy is not reachable from these machines; the wheel carries both collections.
#   - Debian packages: systemd (systemd-analyze), shellcheck (for these scripts), debootstrap,
#     and for the .deb (packaging/deb/build.sh, deb.sh): dpkg-dev (dpkg-shlibdeps, which fills in
#     the package's Depends), lintian, groff-base (the manual page's check) and file
#   - promtool (the Prometheus rules and textfile), taken out of Debian's `prometheus` package
#     unless one is on PATH
#   - a Debian bookworm root with systemd and python3, made by debootstrap, booted by e2e.sh
#
# `--no-rootfs` skips the debootstrap root (for runs that skip the end-to-end test).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
CACHE="${NIGHTCOPY_TOOLS:-$HOME/.cache/nightcopy-tools}"

# Bump a version when what it installs changes: the old folder is then left alone and a new one
# built beside it.
PKG_VENV_VERSION=3
ANSIBLE_CORE=2.19.14      # the last line supporting Python 3.11 (2.20 needs 3.12)
ANSIBLE_LINT=26.10.1
BOTO3=1.44.5
CFN_LINT=1.58.0
AWSCLI=1.46.3             # pins botocore exactly: 1.46.3 takes the botocore boto3 1.44.5 resolves to
ANSIBLE_BUNDLE=12.3.0     # the `ansible` release matching ansible-core 2.19; source of collections
PROMTOOL_VERSION=1        # bump to take Debian's current `prometheus` package again
ROOTFS_VERSION=3
ROOTFS_SUITE=bookworm
# python3: Ansible modules run inside the root. dbus: systemctl and journald need the bus.
# ca-certificates: the role requires it (nightcopy's TLS stack reads the system trust store).
# python3-apt: Ansible's apt module needs it, and would otherwise install it itself.
# Both are here so that a test run never needs the network to install packages.
ROOTFS_INCLUDE=systemd,systemd-sysv,dbus,python3,python3-apt,ca-certificates

want_rootfs=1
[ "${1:-}" = "--no-rootfs" ] && want_rootfs=0

mkdir -p "$CACHE"
# One installer at a time per cache: two CI runs on one machine would otherwise build the same
# venv or root over each other. The lock goes when this script exits.
exec 9>"$CACHE/.packaging-install.lock"
if ! flock -n 9; then
  echo "waiting for another install into $CACHE" >&2
  flock 9
fi

# The servers the Rust tests use as well; their script prints NIGHTCOPY_S3S_FS= etc.
"$repo/scripts/test-tools.sh"

# apt-get update once, and only when something is missing.
apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    echo "apt-get update" >&2
    apt-get update -qq >&2
    apt_updated=1
  fi
}
apt_install() {
  apt_update
  echo "apt-get install $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}
command -v systemd-analyze >/dev/null || apt_install systemd
command -v shellcheck >/dev/null || apt_install shellcheck
command -v dpkg-shlibdeps >/dev/null || apt_install dpkg-dev
command -v lintian >/dev/null || apt_install lintian
command -v groff >/dev/null || apt_install groff-base
command -v file >/dev/null || apt_install file
if [ "$want_rootfs" = 1 ]; then
  command -v debootstrap >/dev/null || apt_install debootstrap
fi
if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then
  apt_install python3 python3-venv
fi

venv="$CACHE/packaging-venv-$PKG_VENV_VERSION"
if [ ! -f "$venv/.complete" ]; then
  echo "creating $venv (ansible-core $ANSIBLE_CORE, ansible-lint $ANSIBLE_LINT, boto3, cfn-lint $CFN_LINT, awscli $AWSCLI)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  pip=("$venv/bin/pip" --quiet --disable-pip-version-check)
  "${pip[@]}" install "ansible-core==$ANSIBLE_CORE" "ansible-lint==$ANSIBLE_LINT" \
    "boto3==$BOTO3" "cfn-lint==$CFN_LINT" "awscli==$AWSCLI" >&2
  # Only two folders of the ~54 MB wheel are kept (the whole `ansible` package is ~470 MB
  # installed). A wheel is a zip file, so no pip install is needed to read it.
  dl="$(mktemp -d)"
  "${pip[@]}" download --no-deps --dest "$dl" "ansible==$ANSIBLE_BUNDLE" >&2
  "$venv/bin/python" - "$dl"/ansible-*.whl "$venv/collections" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
wanted = ("ansible_collections/amazon/aws/", "ansible_collections/community/general/")
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(wanted)]
    if not any(n.startswith(wanted[0]) for n in names) or not any(n.startswith(wanted[1]) for n in names):
        sys.exit(f"{wheel} lacks amazon.aws or community.general")
    z.extractall(dest, names)
EOF
  rm -rf "$dl"
  touch "$venv/.complete"
fi

# promtool only, not the package: installing `prometheus` would start a Prometheus server on
# 0.0.0.0:9090 (and pull in node-exporter, another listener), create a user and enable both at
# boot. Debian's promtool is one binary that needs only libc, so it is taken out of the .deb.
promtool="$(command -v promtool || true)"
if [ -z "$promtool" ]; then
  promtool_dir="$CACHE/promtool-$PROMTOOL_VERSION"
  promtool="$promtool_dir/promtool"
  if [ ! -x "$promtool" ]; then
    echo "taking promtool out of Debian's prometheus package into $promtool_dir" >&2
    apt_update
    dl="$(mktemp -d)"
    # As root into a directory _apt cannot write: no sandbox user for this download.
    (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root prometheus >&2)
    dpkg-deb -x "$dl"/prometheus_*.deb "$dl/x"
    rm -rf "$promtool_dir" "$promtool_dir.tmp"
    mkdir -p "$promtool_dir.tmp"
    cp "$dl/x/usr/bin/promtool" "$promtool_dir.tmp/promtool"
    dpkg-deb -f "$dl"/prometheus_*.deb Version >"$promtool_dir.tmp/debian-version"
    rm -rf "$dl"
    "$promtool_dir.tmp/promtool" --version >/dev/null
    mv "$promtool_dir.tmp" "$promtool_dir"
  fi
fi

rootfs="$CACHE/rootfs-$ROOTFS_SUITE-$ROOTFS_VERSION"
if [ "$want_rootfs" = 1 ] && [ ! -f "$rootfs.complete" ]; then
  echo "debootstrap $ROOTFS_SUITE into $rootfs (once, ~1 min)" >&2
  rm -rf "$rootfs" "$rootfs.tmp"
  debootstrap --variant=minbase --include="$ROOTFS_INCLUDE" "$ROOTFS_SUITE" "$rootfs.tmp" >&2
  # Downloaded .debs are not needed to boot (~70 MB).
  rm -rf "$rootfs.tmp"/var/cache/apt/archives/*.deb
  mv "$rootfs.tmp" "$rootfs"
  # A marker beside the root rather than in it: the root itself is mounted read-only (as the lower
  # layer of an overlay) by the test, and must stay exactly as debootstrap left it.
  touch "$rootfs.complete"
fi

echo "NIGHTCOPY_PKG_VENV=$venv"
echo "NIGHTCOPY_PKG_COLLECTIONS=$venv/collections"
echo "NIGHTCOPY_PROMTOOL=$promtool"
if [ "$want_rootfs" = 1 ]; then
  echo "NIGHTCOPY_ROOTFS=$rootfs"
fi
