#!/usr/bin/env bash
# The .deb as built by `make deb` (packaging/deb/build.sh), taken from $NIGHTCOPY_PKG_DEB (run.sh
# builds it once, for this part and e2e.sh): lintian, exactly the files it holds, its units against
# packaging/systemd/, the control fields, the maintainer scripts. Installing, removing and purging
# it on a booted system is e2e.sh's part.
# Run by run.sh, which sets up the environment (NIGHTCOPY_PKG_DEB, WORK).
set -uo pipefail
source "$(dirname "$0")/lib.sh"

echo "== deb: the package's contents, control fields and lintian"

: "${NIGHTCOPY_PKG_DEB:?}"
deb="$NIGHTCOPY_PKG_DEB"
dir="$WORK/deb"
rm -rf "$dir"
mkdir -p "$dir/x"
dpkg-deb -x "$deb" "$dir/x"

# --- lintian: no error and no warning; overrides only from packaging/deb/lintian-overrides -------
# Judged by its output: with --show-overrides, lintian's exit code counts the overridden tags too
# (2), so only 0 or 2 without an E: or W: line passes (1 is lintian's own failure). Infos (I:),
# the overrides (O:) and their reasons (N:) are shown, and kept for the docs.
lintian_clean() {
  lintian --display-info --show-overrides "$deb" >"$dir/lintian.log" 2>&1
  local rc=$?
  grep -v '^running with root privileges' "$dir/lintian.log"
  { [ "$rc" = 0 ] || [ "$rc" = 2 ]; } && ! grep -qE '^[EW]: ' "$dir/lintian.log"
}
check "lintian: no error, no warning (overrides: packaging/deb/lintian-overrides)" lintian_clean
echo "       lintian: $(grep -cE '^[EW]: ' "$dir/lintian.log") errors and warnings," \
  "$(grep -cE '^I: ' "$dir/lintian.log") infos, $(grep -cE '^O: ' "$dir/lintian.log") overridden"
sed 's/^/lintian /' "$dir/lintian.log" | grep -v 'root privileges' >>"$WORK/measurements"
# Every override in the package has its reason written above it, and is explained in the docs.
overrides_explained() {
  local tag missing=0
  while read -r tag; do
    grep -q "\`$tag\`" "$REPO/docs/packaging.md" || { echo "$tag is not explained in docs/packaging.md"; missing=1; }
  done < <(sed -n 's/^nightcopy: \([a-z0-9-]*\).*/\1/p' "$REPO/packaging/deb/lintian-overrides")
  return $missing
}
check "lintian: every override is explained in docs/packaging.md" overrides_explained

# --- exactly these files, with these modes and owners ------------------------------------------
# The documents are docs/*.md of the tree as it is, so a new document needs no change here.
expected="$(
  {
    echo "-rwxr-xr-x 0/0 ./usr/bin/nightcopy"
    echo "-rwxr-xr-x 0/0 ./usr/lib/nightcopy/notify"
    for u in nightcopy.service nightcopy.timer nightcopy-worker.service nightcopy-notify@.service; do
      echo "-rw-r--r-- 0/0 ./lib/systemd/system/$u"
    done
    echo "-rw-r--r-- 0/0 ./usr/share/man/man1/nightcopy.1.gz"
    for f in README.md README.Debian copyright changelog.Debian.gz examples/nightcopy.example.yaml examples/exclude.example; do
      echo "-rw-r--r-- 0/0 ./usr/share/doc/nightcopy/$f"
    done
    for f in "$REPO"/docs/*.md; do
      echo "-rw-r--r-- 0/0 ./usr/share/doc/nightcopy/$(basename "$f")"
    done
    echo "-rw-r--r-- 0/0 ./usr/share/lintian/overrides/nightcopy"
  } | sort -k3
)"
# dpkg-deb -c: mode, uid/gid (numeric: 0/0 is root), size, date, time, path; directories left out.
actual="$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $1, $2, $6 }' | sort -k3)"
expect "contents: exactly these files, with these modes and owners (no /etc, no config.yaml)" "$actual" "$expected"
check "contents: every directory is root's, 0755" bash -c \
  "dpkg-deb -c '$deb' | awk '\$1 ~ /^d/ && (\$1 != \"drwxr-xr-x\" || \$2 != \"0/0\") { print; bad = 1 } END { exit bad }'"
check "contents: no conffiles (the config is the operator's, or the role's)" \
  bash -c "! dpkg-deb --ctrl-tarfile '$deb' | tar -t | grep -q conffiles"

version="$("$dir/x/usr/bin/nightcopy" --version 2>&1)"
check "binary: runs and reports its version ($version)" grep -qE '^nightcopy [0-9]+\.[0-9]+\.[0-9]+' <<<"$version"
check "binary: stripped (the package ships no debug info)" bash -c "file '$dir/x/usr/bin/nightcopy' | grep -q ', stripped'"
if [ -n "${NIGHTCOPY_BIN:-}" ]; then
  expect "binary: the same version as the tested build" "$version" "$("$NIGHTCOPY_BIN" --version 2>&1)"
fi

# --- the units: packaging/systemd's, with the package's paths ------------------------------------
units="$dir/x/lib/systemd/system"
expect "units: ExecStart=/usr/bin/nightcopy (nightly run, worker), /usr/lib/nightcopy/notify (report)" \
  "$(grep -h '^ExecStart=' "$units/nightcopy.service" "$units/nightcopy-worker.service" "$units/nightcopy-notify@.service" | tr '\n' '|')" \
  'ExecStart=/usr/bin/nightcopy run --config /etc/nightcopy/config.yaml|ExecStart=/usr/bin/nightcopy worker --config /etc/nightcopy/config.yaml|ExecStart=/usr/lib/nightcopy/notify %i|'
check "units and notify script: nothing names /usr/local" \
  bash -c "! grep -n /usr/local '$units'/* '$dir/x/usr/lib/nightcopy/notify'"
# From [Unit] on, less the Documentation= line the package adds, and with the bare install's
# paths put back, each unit is its file in packaging/systemd/: the package cannot drift from it.
as_shipped() {
  sed -n '/^\[Unit\]/,$p' "$1" | grep -v '^Documentation=man:nightcopy(1) ' |
    sed -e 's#/usr/bin/nightcopy#/usr/local/bin/nightcopy#g' -e 's#/usr/lib/nightcopy/notify#/usr/local/lib/nightcopy/notify#g'
}
for u in nightcopy.service nightcopy.timer nightcopy-worker.service nightcopy-notify@.service; do
  check "units: $u is packaging/systemd/$u with the package's paths" \
    diff -u <(sed -n '/^\[Unit\]/,$p' "$REPO/packaging/systemd/$u") <(as_shipped "$units/$u")
done
check "notify script: packaging/systemd/nightcopy-notify with the package's paths" \
  diff -u <(sed -e 's#/usr/local/bin/nightcopy#/usr/bin/nightcopy#g' -e 's#/usr/local/lib/nightcopy/notify#/usr/lib/nightcopy/notify#g' \
    "$REPO/packaging/systemd/nightcopy-notify") "$dir/x/usr/lib/nightcopy/notify"
# The role in deb mode writes the package's units (from [Unit] on, less Documentation=) to
# /etc/systemd/system: with its defaults, the units it puts in front of the package's are the same.
mkdir -p "$dir/role-deb"
if ansible_env ansible-playbook -i localhost, "$PKG_TESTS_DIR/render-units.yml" \
  -e "ansible_python_interpreter=$NIGHTCOPY_PKG_VENV/bin/python" -e "out_dir=$dir/role-deb" \
  -e nightcopy_install_method=deb >"$dir/role-deb.log" 2>&1; then
  for u in nightcopy.service nightcopy.timer nightcopy-worker.service nightcopy-notify@.service; do
    check "role, nightcopy_install_method deb: its $u is the package's" \
      diff -u <(sed -n '/^\[Unit\]/,$p' "$units/$u" | grep -v '^Documentation=man:nightcopy(1) ') \
      <(sed -n '/^\[Unit\]/,$p' "$dir/role-deb/$u")
  done
else
  fail "render the role's templates with nightcopy_install_method=deb" "$(tail -20 "$dir/role-deb.log")"
fi
# verify checks that ExecStart= exists: point the units at the extracted files. --man=no: the
# page of Documentation=man:nightcopy(1) is installed by the package, not on this machine.
mkdir -p "$dir/verify"
cp "$units"/* "$dir/verify/"
sed -i -e "s#^ExecStart=/usr/bin/nightcopy#ExecStart=$dir/x/usr/bin/nightcopy#" \
  -e "s#^ExecStart=/usr/lib/nightcopy/notify#ExecStart=$dir/x/usr/lib/nightcopy/notify#" "$dir/verify"/*
verify_quiet() {
  local out
  if ! out="$(cd "$dir/verify" && systemd-analyze verify --man=no ./*.service ./*.timer 2>&1)" || [ -n "$out" ]; then
    echo "$out"
    return 1
  fi
}
check "units: systemd-analyze verify, no warning" verify_quiet
level="$(systemd-analyze security --offline=true --no-pager "$dir/verify/nightcopy.service" 2>&1 |
  sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')"
echo "exposure deb $level" >>"$WORK/measurements"
check "units: the package's nightcopy.service has exposure $level <= 2.0" \
  systemd-analyze security --offline=true --threshold=20 --no-pager "$dir/verify/nightcopy.service"
# Only what an operator enables has a WantedBy=: the timer (timers.target) and the worker.
expect "units: WantedBy= in the timer and the worker only" \
  "$(grep -H '^WantedBy=' "$units"/* | sed 's#.*/##' | tr '\n' ' ')" \
  "nightcopy-worker.service:WantedBy=multi-user.target nightcopy.timer:WantedBy=timers.target "

# The manual page: roff that man renders without a warning, with every subcommand.
man_page() {
  local out
  if ! out="$(zcat "$dir/x/usr/share/man/man1/nightcopy.1.gz" | groff -man -Tutf8 -ww -z 2>&1)" || [ -n "$out" ]; then
    echo "$out"
    return 1
  fi
}
check "man page: groff renders it without a warning" man_page
check "man page: nightcopy(1) with its commands and exit codes" bash -c "
  zcat '$dir/x/usr/share/man/man1/nightcopy.1.gz' >'$dir/nightcopy.1' &&
  grep -q '^.TH nightcopy 1 ' '$dir/nightcopy.1' && grep -q '^.SS \"nightcopy run\"' '$dir/nightcopy.1' &&
  grep -q '^.SH \"EXIT STATUS\"' '$dir/nightcopy.1'"

# --- control fields ------------------------------------------------------------------------------
field() { dpkg-deb -f "$deb" "$1"; }
expect "control: Package, Version (the binary's, revision 1), Architecture, Section, Priority" \
  "$(field Package) $(field Version) $(field Architecture) $(field Section) $(field Priority)" \
  "nightcopy ${version#nightcopy }-1 $(dpkg --print-architecture) admin optional"
depends="$(field Depends)"
echo "       Depends: $depends"
# $auto was filled in by dpkg-shlibdeps: libc6 and nothing else of the binary's; ca-certificates for
# TLS, passwd for the postinst's useradd. libc6's minimum must be met by bookworm (2.36).
expect "control: Depends are libc6, ca-certificates and passwd" \
  "$(tr ',' '\n' <<<"$depends" | sed 's/^ *//; s/ .*//' | sort | tr '\n' ' ')" "ca-certificates libc6 passwd "
libc_min="$(sed -n 's/.*libc6 (>= \([^)]*\)).*/\1/p' <<<"$depends")"
check "control: libc6 (>= ${libc_min:-?}) is met by bookworm's 2.36" \
  dpkg --compare-versions "${libc_min:-999}" le 2.36
check "control: a description of more than one line" bash -c "[ \"\$(dpkg-deb -f '$deb' Description | wc -l)\" -gt 5 ]"

# --- maintainer scripts: the ones of packaging/deb, POSIX sh, shellcheck-clean -------------------
dpkg-deb -e "$deb" "$dir/control"
for s in postinst prerm postrm; do
  check "maintainer script $s: packaging/deb/maintainer-scripts/$s, executable" bash -c "
    cmp -s '$REPO/packaging/deb/maintainer-scripts/$s' '$dir/control/$s' && [ -x '$dir/control/$s' ]"
done
check "shellcheck: the maintainer scripts (POSIX sh, as dpkg runs them)" \
  shellcheck -s sh "$REPO"/packaging/deb/maintainer-scripts/postinst "$REPO"/packaging/deb/maintainer-scripts/prerm \
  "$REPO"/packaging/deb/maintainer-scripts/postrm
check "shellcheck: packaging/deb/build.sh" shellcheck -s bash "$REPO/packaging/deb/build.sh"
# Nothing is enabled or started by the package itself (e2e.sh checks it on a booted system too).
check "maintainer scripts: enable nothing, start nothing" bash -c "
  ! grep -nE 'systemctl +(--[a-z]+ +)*(enable|start|restart)|deb-systemd-helper +enable|deb-systemd-invoke +(start|restart)' \
    '$dir/control/postinst' '$dir/control/prerm' '$dir/control/postrm'"
