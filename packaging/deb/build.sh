#!/usr/bin/env bash
# `make deb`: builds target/debian/nightcopy_VERSION-1_ARCH.deb (docs/packaging.md, "The .deb").
#
#   1. cargo-deb, pinned, into ~/.cache/nightcopy-tools/cargo-deb-VERSION (once, ~1-2 min)
#   2. the release binary: cargo build --release --locked
#   3. target/deb-assets/, what the package holds that is not a file of the tree as it is: the
#      units and the notify script of packaging/systemd/ with the package's paths (/usr/bin,
#      /usr/lib/nightcopy) instead of the bare install's /usr/local ones, the manual page
#      rendered by the binary itself, and the changelog entry of this version
#   4. cargo deb --no-build, configured by [package.metadata.deb] in Cargo.toml
#
# NIGHTCOPY_DEB_MAINTAINER="Team <team@example.com>" sets the Maintainer field and the changelog's
# signature, for a site that publishes the package to its own mirror.
# The last line on stdout is the .deb's path; progress goes to stderr.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
CACHE="${NIGHTCOPY_TOOLS:-$HOME/.cache/nightcopy-tools}"
CARGO_DEB_VERSION=3.8.0

die() {
  echo "make deb: $*" >&2
  exit 1
}

# cargo-deb fills the package's Depends ($auto) from the binary's libraries with dpkg-shlibdeps.
command -v dpkg-shlibdeps >/dev/null ||
  die "dpkg-shlibdeps not found: install it with 'apt-get install dpkg-dev', then run make deb again"

cargo_deb="$CACHE/cargo-deb-$CARGO_DEB_VERSION/bin/cargo-deb"
if [ ! -x "$cargo_deb" ]; then
  echo "installing cargo-deb $CARGO_DEB_VERSION into $CACHE/cargo-deb-$CARGO_DEB_VERSION (once, ~1-2 min)" >&2
  mkdir -p "$CACHE"
  rm -rf "$CACHE/cargo-deb-$CARGO_DEB_VERSION.tmp"
  cargo install "cargo-deb@$CARGO_DEB_VERSION" --locked --root "$CACHE/cargo-deb-$CARGO_DEB_VERSION.tmp" >&2 ||
    die "cargo install cargo-deb@$CARGO_DEB_VERSION failed (output above); check that crates.io is reachable"
  rm -rf "$CACHE/cargo-deb-$CARGO_DEB_VERSION"
  mv "$CACHE/cargo-deb-$CARGO_DEB_VERSION.tmp" "$CACHE/cargo-deb-$CARGO_DEB_VERSION"
fi

echo "building the release binary (cargo build --release --locked)" >&2
cargo build --release --locked >&2 || die "cargo build --release --locked failed (output above)"
target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target_dir/release/nightcopy"
version="$("$bin" --version | awk '{print $2}')"
[ -n "$version" ] || die "$bin --version printed no version"

assets="$repo/target/deb-assets"
rm -rf "$assets"
mkdir -p "$assets"

# The bare install's paths become the package's. Anything of /usr/local left afterwards is a path
# this list does not know yet: better no package than units pointing at a binary that is not there.
to_package_paths() {
  sed -e 's#/usr/local/bin/nightcopy#/usr/bin/nightcopy#g' \
    -e 's#/usr/local/lib/nightcopy/notify#/usr/lib/nightcopy/notify#g' "$1"
}
for unit in nightcopy.service nightcopy.timer nightcopy-worker.service nightcopy-notify@.service; do
  {
    echo "# Installed by the nightcopy package, from packaging/systemd/$unit of its source with the"
    echo "# package's paths. An upgrade replaces this file: change it with \`systemctl edit $unit\`."
    # Documentation= only here: the bare install has neither the manual page nor the documents.
    to_package_paths "packaging/systemd/$unit" |
      sed '/^Description=/a Documentation=man:nightcopy(1) file:/usr/share/doc/nightcopy/operations.md'
  } >"$assets/$unit"
done
to_package_paths packaging/systemd/nightcopy-notify >"$assets/notify"
if grep -l /usr/local "$assets"/*; then
  die "the files above still name /usr/local after the path rewrite: add their paths to to_package_paths in packaging/deb/build.sh"
fi

# gzip -n: no name or time stamp in the header, so the same page gives the same bytes.
"$bin" generate-man | gzip -9n >"$assets/nightcopy.1.gz"

# Debian wants a changelog in every package; the project's history is its git log, so the entry
# says only which version and commit this is.
# NIGHTCOPY_DEB_MAINTAINER: who publishes this build (Cargo.toml has the project's placeholder).
maintainer="${NIGHTCOPY_DEB_MAINTAINER:-$(sed -n 's/^maintainer = "\(.*\)"$/\1/p' Cargo.toml | head -1)}"
commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
when="$(git log -1 --format=%cD 2>/dev/null || date -R)"
cat >"$assets/changelog" <<EOT
nightcopy ($version-1) unstable; urgency=medium

  * nightcopy $version, built from commit $commit.

 -- $maintainer  $when
EOT

echo "packing the .deb (cargo-deb $CARGO_DEB_VERSION)" >&2
# --strip: the release profile keeps line tables for backtraces; the package ships without them.
"$cargo_deb" --no-build --strip --maintainer "$maintainer" >&2 || die "cargo deb failed (output above)"
deb="$target_dir/debian/nightcopy_${version}-1_$(dpkg --print-architecture).deb"
[ -f "$deb" ] || die "cargo deb reported success but $deb is not there"
echo "$deb"
