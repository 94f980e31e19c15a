#!/usr/bin/env bash
# End to end under a real systemd: a debootstrapped Debian bookworm (cached by install-tools.sh)
# is booted with systemd as PID 1 in new PID/mount/UTS/IPC/cgroup namespaces sharing this
# machine's network, so it reaches the servers this script starts on 127.0.0.1: s3s-fs (S3),
# moto behind the CBOR proxy (CloudWatch), the IMDSv2 stand-in (instance-role credentials, region
# and instance ID) and the artifact server. The .deb of `make deb` ($NIGHTCOPY_PKG_DEB) is installed
# and purged with dpkg by itself first (nothing enabled, the user and directories made, purge
# removes the state); then the Ansible role installs it with the beta inventory and
# nightcopy_install_method: deb, and the checks talk to that systemd through systemctl and
# journalctl -o json. At the end the package is removed again (the timer stops).
#
# The root is an overlay over the cached one, so every run starts from the same fresh system and
# the cache stays as debootstrap made it. Systemd gets its own cgroup namespace rooted in a child
# of this script's cgroups: its units stay inside this machine's limits, and nothing is left in
# the host's cgroup tree afterwards. The booted systemd is always killed at the end (trap).
set -uo pipefail
source "$(dirname "$0")/lib.sh"

echo "== e2e: the role and nightcopy under systemd as PID 1"

: "${NIGHTCOPY_ROOTFS:?}"
: "${NIGHTCOPY_PKG_DEB:?}"
dir="$WORK/e2e"
root="$dir/root"
mkdir -p "$dir/upper" "$dir/ovl-work" "$root" "$dir/s3data/e2e-backups" "$dir/artifacts"

fails_before="$(grep -c '^FAIL ' "$NIGHTCOPY_PKG_RESULTS")"
SYSTEMD_PID=
UNSHARE_PID=
S3_PID=
CW_PID=
IMDS_PID=
cg_dirs=()

cleanup_e2e() {
  # What the booted system logged, kept with the work directory; nightcopy's part is shown when
  # a check of this script failed.
  if [ -n "$SYSTEMD_PID" ] && [ -n "$root" ]; then
    in_root journalctl -b --no-pager >"$dir/journal.log" 2>&1 || true
    if [ "$(grep -c '^FAIL ' "$NIGHTCOPY_PKG_RESULTS")" -gt "$fails_before" ]; then
      echo "  --- journal of the booted system, nightcopy units (last 40 lines) ---"
      in_root journalctl --no-pager -o short-monotonic -u nightcopy.service -u nightcopy.timer -n 40 2>&1 | sed 's/^/  /'
    fi
  fi
  # SIGKILL to PID 1 of the namespace ends every process in it; the overlay and the other
  # mounts live in its mount namespace and go with it.
  if [ -n "$SYSTEMD_PID" ]; then kill -KILL "$SYSTEMD_PID" 2>/dev/null || true; fi
  if [ -n "$UNSHARE_PID" ]; then
    kill -KILL "$UNSHARE_PID" 2>/dev/null || true
    wait "$UNSHARE_PID" 2>/dev/null || true
  fi
  stop_pid "$S3_PID"
  stop_pid "$CW_PID"
  stop_pid "$IMDS_PID"
  stop_pid "${MOTO_PID:-}"
  stop_pid "${HTTP_PID:-}"
  # The cgroups systemd made below ours empty once its processes are gone (a moment after the
  # kill); remove them bottom-up.
  local d
  for d in "${cg_dirs[@]}"; do
    for _ in $(seq 1 50); do
      [ -d "$d" ] || break
      find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
      [ -d "$d" ] && sleep 0.1
    done
    [ -d "$d" ] && echo "warning: could not remove cgroup $d" >&2
  done
}
trap cleanup_e2e EXIT
trap 'exit 130' INT TERM

# A run killed without its trap (SIGKILL) leaves its booted system running in its cgroups, which
# carry that run's PID in their name. End the processes found there, by PID, and remove the
# cgroups.
sweep_stale_runs() {
  local d owner pid
  while read -r d; do
    owner="${d##*nightcopy-e2e-}"
    [ -d "/proc/$owner" ] && continue
    for pid in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u); do
      kill -KILL "$pid" 2>/dev/null || true
    done
    for _ in $(seq 1 50); do
      find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
      [ -d "$d" ] || break
      sleep 0.1
    done
  done < <(find /sys/fs/cgroup -maxdepth 5 -type d -name 'nightcopy-e2e-*' -prune 2>/dev/null)
}
sweep_stale_runs

# Commands inside the booted system: its namespaces, chrooted into its root, a clean environment.
in_root() {
  timeout 120 nsenter -t "$SYSTEMD_PID" -m -p -u -i -- \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 \
    chroot "$root" "$@"
}
unit_prop() { in_root systemctl show nightcopy.service -p "$1" --value; }
unit_state_is() { [ "$(unit_prop ActiveState)" = "$1" ]; }
# The host sees only the empty mount point: the overlay exists in the booted system's namespace.
root_sha256() { in_root sha256sum "$1" | cut -d' ' -f1; }
root_lacks() { in_root test ! -e "$1"; }
# journald takes a unit's stream asynchronously: a line logged just before the unit ended may be
# read a moment later (seen with the machine busy). Up to 5 s for it, then a failure.
journal_has() {
  local _
  for _ in $(seq 20); do
    in_root journalctl -u nightcopy.service --no-pager -o cat | grep -q "$1" && return 0
    sleep 0.25
  done
  return 1
}

# --- servers on 127.0.0.1 -----------------------------------------------------------------------
key="AKIA$(random_hex 8)"
secret="$(random_hex 20)"
token="$(random_hex 24)"
instance_id="i-0e2e$(random_hex 6)"

s3_port="$(free_port)"
# s3s-fs takes its keys only on the command line; they are fake values made for this run.
"$NIGHTCOPY_S3S_FS" --host 127.0.0.1 --port "$s3_port" --access-key "$key" --secret-key "$secret" \
  "$dir/s3data" >"$dir/s3s-fs.log" 2>&1 &
S3_PID=$!

start_moto "$dir/moto.log" || { fail "start moto"; exit 0; }
"$NIGHTCOPY_PYTHON" "$REPO/tests/servers/cloudwatch_cbor_proxy.py" --listen 127.0.0.1:0 \
  --moto "http://127.0.0.1:$MOTO_PORT" >"$dir/cw.port" 2>"$dir/cw.log" &
CW_PID=$!
IMDS_ACCESS_KEY_ID="$key" IMDS_SECRET_ACCESS_KEY="$secret" IMDS_SESSION_TOKEN="$token" \
  "$NIGHTCOPY_PYTHON" "$REPO/tests/servers/imds.py" --listen 127.0.0.1:0 --log "$dir/imds.log" \
  --role nightcopy-backup --instance-id "$instance_id" --region us-east-1 >"$dir/imds.port" 2>"$dir/imds.err" &
IMDS_PID=$!

# The package under its name on a mirror, nightcopy_VERSION-REVISION_ARCH.deb.
deb_version="$(dpkg-deb -f "$NIGHTCOPY_PKG_DEB" Version)"
version="${deb_version%-*}"
deb_name="nightcopy_${deb_version}_$(dpkg-deb -f "$NIGHTCOPY_PKG_DEB" Architecture).deb"
cp "$NIGHTCOPY_PKG_DEB" "$dir/artifacts/$deb_name"
sha="$(sha256sum "$dir/artifacts/$deb_name" | cut -d' ' -f1)"
serve_dir "$dir/artifacts" || { fail "start the artifact server"; exit 0; }

if wait_for 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$s3_port" && wait_for 30 test -s "$dir/cw.port" &&
  wait_for 30 test -s "$dir/imds.port"; then
  cw_port="$(head -1 "$dir/cw.port")"
  imds_port="$(head -1 "$dir/imds.port")"
  pass "servers up on 127.0.0.1: s3s-fs, moto + CBOR proxy, IMDSv2, artifacts"
else
  fail "servers up on 127.0.0.1" "$(tail -5 "$dir"/s3s-fs.log "$dir"/cw.log "$dir"/imds.err)"
  exit 0
fi

# --- boot ----------------------------------------------------------------------------------------
# Files of the booted system that the test adds, written to the overlay's upper layer.
mkdir -p "$dir/upper/etc/systemd/system"
echo nightcopy-e2e >"$dir/upper/etc/hostname"
# The source is a real mount (a tmpfs), so RequiresMountsFor= has a mount unit to pull in and
# nightcopy's require-mountpoint check passes.
cat >"$dir/upper/etc/systemd/system/srv-data.mount" <<'EOF'
# The backup source of the end-to-end test (packaging/tests/e2e.sh).
[Mount]
What=tmpfs
Where=/srv/data
Type=tmpfs
Options=mode=0755,size=256m
EOF

# A child of each of our cgroups, for the new cgroup namespace to be rooted in (see the top).
# Lines for boot.sh: the hierarchy's directory below /sys/fs/cgroup, fs type, mount options.
: >"$dir/cgroups"
while read -r mnt fstype opts; do
  if [ "$fstype" = cgroup2 ]; then
    key_re='^0::'
    mount_opts=rw
  else
    controllers="$(tr ',' '\n' <<<"$opts" | grep -vxE 'rw|ro|relatime|noatime|nosuid|nodev|noexec|clone_children|xattr|nsdelegate|memory_recursiveprot' | paste -sd, -)"
    key_re="^[0-9]+:$controllers:"
    mount_opts="$controllers"
    [[ "$controllers" = name=* ]] && mount_opts="none,$controllers"
  fi
  path="$(grep -E "$key_re" /proc/self/cgroup | head -1 | cut -d: -f3-)"
  [ -n "$path" ] || continue
  child="$mnt${path%/}/nightcopy-e2e-$$"
  mkdir -p "$child"
  if [[ ",$opts," = *,cpuset,* ]]; then
    # A v1 cpuset cgroup accepts no task until it has CPUs and memory nodes.
    cat "$(dirname "$child")/cpuset.cpus" >"$child/cpuset.cpus"
    cat "$(dirname "$child")/cpuset.mems" >"$child/cpuset.mems"
  fi
  cg_dirs+=("$child")
  name="${mnt#/sys/fs/cgroup}"
  echo "${name:-.} $fstype $mount_opts" >>"$dir/cgroups"
done < <(awk '{ sep = 0; for (i = 7; i <= NF; i++) if ($i == "-") { sep = i; break }
               if ($(sep + 1) == "cgroup" || $(sep + 1) == "cgroup2") print $5, $(sep + 1), $(sep + 3) }' /proc/self/mountinfo)

cat >"$dir/boot.sh" <<'EOF'
# Runs in the new namespaces: builds the root, then becomes the parent of its systemd.
set -e
lower="$1" upper="$2" work="$3" root="$4" cgroups="$5"
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
# Fresh cgroup mounts made inside the new cgroup namespace are rooted at its root. "." is a
# cgroup2 hierarchy mounted at /sys/fs/cgroup itself; otherwise a tmpfs holds one per hierarchy.
[ "$(awk 'NR == 1 { print $1 }' "$cgroups")" = . ] || mount -t tmpfs -o mode=755 tmpfs "$root/sys/fs/cgroup"
while read -r name fstype opts; do
  mkdir -p "$root/sys/fs/cgroup/$name"
  mount -t "$fstype" -o "$opts" "$fstype" "$root/sys/fs/cgroup/$name"
done <"$cgroups"
hostname nightcopy-e2e
exec chroot "$root" /lib/systemd/systemd --system
EOF

(
  for d in "${cg_dirs[@]}"; do echo "$BASHPID" >"$d/cgroup.procs"; done
  exec unshare --cgroup --pid --fork --mount --uts --ipc \
    bash "$dir/boot.sh" "$NIGHTCOPY_ROOTFS" "$dir/upper" "$dir/ovl-work" "$root" "$dir/cgroups"
) >"$dir/console.log" 2>&1 &
UNSHARE_PID=$!

find_systemd() {
  local pid
  pid="$(ps -o pid= --ppid "$UNSHARE_PID" | tr -d ' ' | head -1)"
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ] && SYSTEMD_PID="$pid"
}
if wait_for 30 find_systemd; then
  find_systemd
else
  fail "boot: systemd started as PID 1" "$(tail -20 "$dir/console.log")"
  exit 0
fi
# The manager's socket appears once systemd has set itself up; is-system-running needs it.
manager_up() { in_root test -S /run/systemd/private; }
wait_for 60 manager_up || { fail "boot: systemd's manager socket" "$(tail -20 "$dir/console.log")"; exit 0; }
state="$(timeout 90 nsenter -t "$SYSTEMD_PID" -m -p -u -i -- chroot "$root" systemctl is-system-running --wait 2>&1)"
case "$state" in
  running | degraded) pass "boot: systemd is PID 1 and the system is up ($state)" ;;
  *)
    fail "boot: system up" "is-system-running: $state" "$(in_root systemctl --failed --no-pager 2>&1)"
    exit 0
    ;;
esac
# Seen from here, systemd sits below this script's cgroup, not at the root of the host's tree.
expect "boot: systemd's cgroups are inside this test's cgroups" \
  "$(grep -E ':name=systemd:|^0::' "/proc/$SYSTEMD_PID/cgroup" | sed 's#.*/\(nightcopy-e2e-[0-9]*/init.scope\)$#\1#' | sort -u)" \
  "nightcopy-e2e-$$/init.scope"

# --- install with the role ------------------------------------------------------------------------
cat >"$dir/e2e.yml" <<EOF
nightcopy:
  hosts:
    e2e:
      # Ansible drives the booted root through chroot, from inside its namespaces, so systemctl
      # in the modules reaches this systemd.
      ansible_connection: community.general.chroot
      ansible_host: $root
      ansible_python_interpreter: /usr/bin/python3
      ansible_become: false
      nightcopy_version: "$version"
      nightcopy_install_method: deb
      nightcopy_deb_url: "http://127.0.0.1:$HTTP_PORT/$deb_name"
      nightcopy_deb_sha256: "$sha"
      nightcopy_bucket: e2e-backups
      # Region and credentials come from the IMDSv2 stand-in, as on EC2.
      nightcopy_region: ""
      nightcopy_endpoint_url: "http://127.0.0.1:$s3_port"
      nightcopy_force_path_style: true
      # s3s-fs answers InvalidStorageClass to beta's STANDARD_IA.
      nightcopy_storage_class: ""
      nightcopy_metrics_endpoint_url: "http://127.0.0.1:$cw_port"
      nightcopy_environment:
        AWS_EC2_METADATA_SERVICE_ENDPOINT: "http://127.0.0.1:$imds_port"
EOF
converge_e2e() {
  local log="$1"
  shift
  (ansible_env timeout 300 nsenter -t "$SYSTEMD_PID" -m -p -u -i --wd="$REPO/packaging/ansible" -- \
      ansible-playbook -i inventories/beta -i "$dir/e2e.yml" --limit e2e site.yml "$@") >"$log" 2>&1
}

# Check mode on a host that has nothing yet: no unit is known to systemd, nothing may fail.
if converge_e2e "$dir/check-fresh.log" --check; then
  pass "role --check on a fresh host: succeeds (handlers and systemd tasks safe)"
else
  fail "role --check on a fresh host" "$(grep -E 'FAILED|fatal|ERROR' -A3 "$dir/check-fresh.log" | tail -20)"
fi
check "role --check on a fresh host: no package installed" root_lacks /usr/bin/nightcopy
check "role --check on a fresh host: no unit written" root_lacks /etc/systemd/system/nightcopy.service

# --- the package by itself: dpkg -i, then --purge -------------------------------------------------
in_root sh -c 'cat >/root/nightcopy.deb' <"$NIGHTCOPY_PKG_DEB"
if out="$(in_root dpkg -i /root/nightcopy.deb 2>&1)"; then
  pass "dpkg -i: the package installs on a fresh bookworm"
else
  fail "dpkg -i: the package installs on a fresh bookworm" "$(tail -15 <<<"$out")"
fi
expect "dpkg -i: postinst made the system user nightcopy, no shell, the state directory as home" \
  "$(in_root getent passwd nightcopy | awk -F: '{ print ($3 < 1000 ? "system" : "uid " $3), $6, $7 }')" \
  "system /var/lib/nightcopy /usr/sbin/nologin"
expect "dpkg -i: /var/lib/nightcopy 0700 nightcopy, /etc/nightcopy 0750 root:nightcopy and empty" \
  "$(in_root stat -c '%a %U:%G %n' /var/lib/nightcopy /etc/nightcopy | tr '\n' '|')$(in_root ls -A /etc/nightcopy | wc -l)" \
  "700 nightcopy:nightcopy /var/lib/nightcopy|750 root:nightcopy /etc/nightcopy|0"
# is-enabled: "static" for a unit without WantedBy= (nightcopy.service is started by the timer).
unit_states() {
  local u
  for u in nightcopy.service nightcopy.timer nightcopy-worker.service nightcopy-notify@nightcopy.service.service; do
    echo "$u $(in_root systemctl is-enabled "$u" 2>&1) $(in_root systemctl is-active "$u" 2>&1)"
  done | tr '\n' '|'
}
expect "dpkg -i: systemd knows the units, none enabled, none started" "$(unit_states)" \
  "nightcopy.service static inactive|nightcopy.timer disabled inactive|nightcopy-worker.service disabled inactive|nightcopy-notify@nightcopy.service.service static inactive|"
check "dpkg -i: the package's nightcopy.service runs /usr/bin/nightcopy, from /lib/systemd/system" bash -c "
  [[ \"\$1\" =~ ^(/usr)?/lib/systemd/system/nightcopy.service\$ ]] && grep -q 'path=/usr/bin/nightcopy ' <<<\"\$2\"" _ \
  "$(unit_prop FragmentPath)" "$(unit_prop ExecStart)"
expect "dpkg -i: /usr/bin/nightcopy runs" "$(in_root /usr/bin/nightcopy --version 2>&1)" "nightcopy $version"
uid_first="$(in_root id -u nightcopy)"
if out="$(in_root dpkg --purge nightcopy 2>&1)"; then
  pass "dpkg --purge: succeeds"
else
  fail "dpkg --purge: succeeds" "$(tail -15 <<<"$out")"
fi
present() {
  local p
  for p in "$@"; do if in_root test -e "$p"; then echo "$p kept"; else echo "$p gone"; fi; done | tr '\n' '|'
}
expect "dpkg --purge: binary, units and state directory gone; the user and /etc/nightcopy kept" \
  "$(present /usr/bin/nightcopy /lib/systemd/system/nightcopy.timer /var/lib/nightcopy /etc/nightcopy) uid $(in_root id -u nightcopy 2>&1)" \
  "/usr/bin/nightcopy gone|/lib/systemd/system/nightcopy.timer gone|/var/lib/nightcopy gone|/etc/nightcopy kept| uid $uid_first"
expect "dpkg --purge: systemd no longer knows the timer (postrm's daemon-reload)" \
  "$(in_root systemctl show -p LoadState --value nightcopy.timer)" "not-found"

if converge_e2e "$dir/converge-1.log"; then
  pass "role converges into the booted system (inventories/beta, nightcopy_install_method: deb)"
else
  fail "role converges into the booted system" "$(grep -E 'FAILED|fatal|ERROR' -A5 "$dir/converge-1.log" | tail -30)"
  exit 0
fi
if converge_e2e "$dir/converge-2.log"; then
  expect "second converge under systemd: changed=0" "$(recap_changed "$dir/converge-2.log")" 0
else
  fail "second converge under systemd" "$(tail -20 "$dir/converge-2.log")"
fi

# shellcheck disable=SC2016 # dpkg-query's own ${field} format
expect "deb mode: the package installed by apt, its .deb kept in /var/cache/nightcopy" \
  "$(in_root dpkg-query -W -f '${Status} ${Version}' nightcopy) $(root_sha256 "/var/cache/nightcopy/$deb_name")" \
  "install ok installed $deb_version $sha"
expect "deb mode: the user made by the first install kept its uid" "$(in_root id -u nightcopy)" "$uid_first"
expect "deb mode: the role's units take precedence, and run /usr/bin/nightcopy" \
  "$(unit_prop FragmentPath) $(in_root systemctl show nightcopy.timer -p FragmentPath --value) $(unit_prop ExecStart | grep -o 'path=[^ ]*')" \
  "/etc/systemd/system/nightcopy.service /etc/systemd/system/nightcopy.timer path=/usr/bin/nightcopy"

# --- a .deb that does not match its pin leaves the installed package alone -----------------------
pkg_state() {
  # shellcheck disable=SC2016 # dpkg-query's own ${field} format
  echo "$(in_root dpkg-query -W -f '${Version}' nightcopy) $(root_sha256 /usr/bin/nightcopy) $(in_root ls /var/cache/nightcopy | tr '\n' ' ')"
}
before_pkg="$(pkg_state)"
# Tampered: one byte more, under a new name, with the pinned checksum of the real one.
tampered="nightcopy_${version}-2_amd64.deb"
cp "$NIGHTCOPY_PKG_DEB" "$dir/artifacts/$tampered"
printf x >>"$dir/artifacts/$tampered"
if converge_e2e "$dir/deb-tampered.log" -e "nightcopy_deb_url=http://127.0.0.1:$HTTP_PORT/$tampered"; then
  fail "deb mode, tampered .deb: the play fails"
else
  check "deb mode, tampered .deb: the play fails, saying the package was left alone" \
    grep -q "was NOT installed, and the installed nightcopy package" "$dir/deb-tampered.log"
fi
if converge_e2e "$dir/deb-wrong-pin.log" -e "nightcopy_deb_sha256=$(printf '0%.0s' $(seq 1 64))"; then
  fail "deb mode, wrong pinned checksum for the cached .deb: the play fails"
else
  check "deb mode, wrong pinned checksum for the cached .deb: the play fails" \
    grep -q "was NOT installed" "$dir/deb-wrong-pin.log"
fi
expect "deb mode: after those, the same package, the same binary, and nothing new in the cache" \
  "$(pkg_state)" "$before_pkg"
# The right checksum, but another version inside (the control file's Version changed). It matched
# its pin, so it stays in the cache; apt never sees it.
other="nightcopy_${version}-3_amd64.deb"
dpkg-deb -R "$NIGHTCOPY_PKG_DEB" "$dir/other-pkg"
sed -i 's/^Version: .*/Version: 9.9.8-1/' "$dir/other-pkg/DEBIAN/control"
dpkg-deb -Znone -b "$dir/other-pkg" "$dir/artifacts/$other" >/dev/null
rm -rf "$dir/other-pkg"
if converge_e2e "$dir/deb-other-version.log" -e "nightcopy_deb_url=http://127.0.0.1:$HTTP_PORT/$other" \
  -e "nightcopy_deb_sha256=$(sha256sum "$dir/artifacts/$other" | cut -d' ' -f1)"; then
  fail "deb mode, another version inside: the play fails"
else
  check "deb mode, another version inside: the play fails before apt, saying so" \
    grep -q "is 'nightcopy 9.9.8-1', not" "$dir/deb-other-version.log"
fi
expect "deb mode, another version inside: the same package and binary" \
  "$(pkg_state | cut -d' ' -f1-2)" "$(cut -d' ' -f1-2 <<<"$before_pkg")"

expect "timer: enabled and active" "$(in_root systemctl is-enabled nightcopy.timer) $(in_root systemctl is-active nightcopy.timer)" "enabled active"
expect "service: loaded, inactive until the timer fires" "$(unit_prop LoadState) $(unit_prop ActiveState)" "loaded inactive"
level="$(in_root systemd-analyze security --no-pager nightcopy.service 2>&1 | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')"
echo "exposure booted-beta $level" >>"$WORK/measurements"
check "systemd-analyze security in the booted system: exposure $level <= 2.0" \
  in_root systemd-analyze security --no-pager --threshold=20 nightcopy.service

# --- the source: many files, an excluded one, and one only root may read -------------------------
in_root systemctl start srv-data.mount
# shellcheck disable=SC2016 # expanded by the shell inside the booted system
in_root sh -c '
  set -e
  mkdir -p /srv/data/bulk /srv/data/private
  for i in $(seq 1 20); do head -c 4194304 /dev/urandom >/srv/data/bulk/part-$i.bin; done
  echo "scratch" >/srv/data/bulk/editor.tmp
  head -c 4096 /dev/urandom >/srv/data/private/secret.bin
  chown -R root:root /srv/data/private
  chmod 0700 /srv/data/private
  chmod 0600 /srv/data/private/secret.bin'
cannot_read_plainly() { ! in_root runuser -u nightcopy -- cat /srv/data/private/secret.bin >/dev/null 2>&1; }
check "root-only file: the nightcopy user cannot read it without the capability" cannot_read_plainly

# --- the first run ---------------------------------------------------------------------------------
# `systemctl start` of a Type=notify unit returns at READY=1; the upload of 80 MiB under beta's
# 16 MiB/s cap takes about five seconds more, during which STATUS= must change.
t0=$SECONDS
in_root systemctl start nightcopy.service
start_rc=$?
after_start="$(unit_prop ActiveState)/$(unit_prop SubState)"
: >"$dir/status.log"
deadline=$((SECONDS + 120))
while [ "$SECONDS" -lt "$deadline" ]; do
  # `show` prints properties in its own order, not the order asked for.
  props="$(in_root systemctl show nightcopy.service -p ActiveState -p StatusText)"
  active="$(sed -n 's/^ActiveState=//p' <<<"$props")"
  echo "$active|$(sed -n 's/^StatusText=//p' <<<"$props")" >>"$dir/status.log"
  case "$active" in active | activating | deactivating) sleep 0.3 ;; *) break ;; esac
done
run_seconds=$((SECONDS - t0))
echo "first run ${run_seconds} s" >>"$WORK/measurements"
expect "first run: systemctl start returned at READY, with the run still going" "$start_rc $after_start" "0 active/running"
statuses="$(grep '^active|' "$dir/status.log" | cut -d'|' -f2- | sort -u)"
if [ "$(grep -cE '^[0-9]+ scanned, [0-9]+ uploaded' <<<"$statuses")" -ge 2 ]; then
  pass "first run: live STATUS= seen while active ($(grep -cE 'scanned' <<<"$statuses") distinct)"
else
  fail "first run: live STATUS= seen while active" "$(tail -20 "$dir/status.log")"
fi
expect "first run: exit 0, unit inactive (not failed)" "$(unit_prop ExecMainStatus) $(unit_prop Result) $(unit_prop ActiveState)" "0 success inactive"

# The summary line, as journald stored it (JSON, one entry per line).
summary() {
  in_root journalctl -u nightcopy.service -o json --no-pager MESSAGE_ID=6b3c2f0a9d7e4c1f8e5a2b4d6c8e0f13 |
    tail -1 | "$NIGHTCOPY_PKG_VENV/bin/python" -c '
import json, sys
e = json.loads(sys.stdin.read() or "{}")
keys = ("OUTCOME", "LAST_SUCCESS", "FILES_TRANSFERRED", "BYTES_TRANSFERRED", "CHECKS", "TRANSFER_ERRORS", "EXIT_CODE")
print(" ".join(f"{k}={e.get(k)}" for k in keys), "ELAPSED_SECONDS" if float(e.get("ELAPSED_SECONDS", "0")) > 0 else "NO_ELAPSED", "_UID=" + str(e.get("_UID")))'
}
nightcopy_uid="$(in_root id -u nightcopy)"
expect "journal: the summary line with every figure, logged as the nightcopy user" "$(summary)" \
  "OUTCOME=success LAST_SUCCESS=1 FILES_TRANSFERRED=21 BYTES_TRANSFERRED=$((20 * 4194304 + 4096)) CHECKS=0 TRANSFER_ERRORS=0 EXIT_CODE=0 ELAPSED_SECONDS _UID=$nightcopy_uid"

# READY=1: systemd logs "Started" for a notify unit only when READY=1 arrives; it must come
# before the summary line of the same run.
order="$(in_root journalctl -o json --no-pager _PID=1 + MESSAGE_ID=6b3c2f0a9d7e4c1f8e5a2b4d6c8e0f13 |
  "$NIGHTCOPY_PKG_VENV/bin/python" -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    m = e.get("MESSAGE", "")
    if e.get("MESSAGE_ID") == "6b3c2f0a9d7e4c1f8e5a2b4d6c8e0f13":
        print("summary"); break
    if isinstance(m, str) and m.startswith("Started nightcopy.service"):
        print("ready")')"
expect "journal: READY (\"Started nightcopy.service\") before the summary" "$(tr '\n' ' ' <<<"$order" | sed 's/ $//')" "ready summary"

# The root-only file went through, byte for byte: CAP_DAC_READ_SEARCH, under the sandbox.
stored="$dir/s3data/e2e-backups/e2e/private/secret.bin"
expect "root-only file: backed up through the capability, byte for byte" \
  "$(sha256sum <"$stored" 2>/dev/null | cut -d' ' -f1)" "$(root_sha256 /srv/data/private/secret.bin)"
check "exclude list: *.tmp was left out" test ! -e "$dir/s3data/e2e-backups/e2e/bulk/editor.tmp"

# CloudWatch (moto, read back through its API): LastSuccess=1 under the IMDS instance ID.
last_success() {
  "$NIGHTCOPY_PKG_VENV/bin/python" - "http://127.0.0.1:$MOTO_PORT" "$instance_id" <<'EOF'
import datetime, sys, boto3
cw = boto3.client("cloudwatch", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
now = datetime.datetime.now(datetime.timezone.utc)
r = cw.get_metric_statistics(Namespace="Nightcopy", MetricName="LastSuccess",
    Dimensions=[{"Name": "InstanceId", "Value": sys.argv[2]}, {"Name": "Environment", "Value": "beta"}],
    StartTime=now - datetime.timedelta(hours=1), EndTime=now + datetime.timedelta(hours=1),
    Period=3600, Statistics=["Maximum", "SampleCount"])
print(" ".join(f"{p['Maximum']:g}x{p['SampleCount']:g}" for p in r["Datapoints"]) or "none")
EOF
}
expect "CloudWatch: LastSuccess=1 once, InstanceId from IMDS, Environment=beta" "$(last_success 2>&1)" "1x1"

# --- a second start within guard.min-interval --------------------------------------------------
in_root systemctl start nightcopy.service
second_rc=$?
wait_for 60 unit_state_is inactive
expect "second start: exit 75, result success, unit inactive" \
  "$second_rc $(unit_prop ExecMainStatus) $(unit_prop Result) $(unit_prop ActiveState)" "0 75 success inactive"
expect "second start: the unit is not failed" "$(in_root systemctl is-failed nightcopy.service)" "inactive"
check "second start: the skip is logged with its reason" journal_has 'skipped: the last successful run started'
expect "second start: no second LastSuccess data point" "$(last_success 2>&1)" "1x1"

# --- the dry run recipe of docs/operations.md ------------------------------------------------------
# As the service's user with its capability, but outside the unit (no min-interval to wait for).
# Only the metadata endpoint is added here: on EC2 it is the default address.
in_root sh -c 'echo new >/srv/data/new-file.txt'
dry="$(in_root systemd-run --quiet --wait --pipe --collect -p User=nightcopy \
  -p AmbientCapabilities=CAP_DAC_READ_SEARCH \
  -p "Environment=AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:$imds_port" \
  /usr/bin/nightcopy run --dry-run --config /etc/nightcopy/config.yaml 2>&1)"
dry_rc=$?
if [ "$dry_rc" = 0 ] && grep -q 'new-file.txt' <<<"$dry"; then
  pass "dry run via systemd-run as the nightcopy user: plans the new file"
else
  fail "dry run via systemd-run as the nightcopy user: plans the new file" "exit $dry_rc" "$(tail -15 <<<"$dry")"
fi
check "dry run: uploaded nothing" test ! -e "$dir/s3data/e2e-backups/e2e/new-file.txt"

# --- a stalled run is killed by the watchdog ------------------------------------------------------
# The documented way to force a run (docs/operations.md), with a 5 s watchdog for the test. Right
# after READY the process is frozen with SIGSTOP: a hang nothing inside nightcopy can end (as a
# deadlock, or a read from a dead NFS server, would be). Its counters stop, so it stops feeding the
# watchdog. (A stalled S3 connection is not used: since transfer.request-timeout nightcopy ends
# that itself, and the unit's 40 min watchdog is sized to let it.)
# shellcheck disable=SC2016 # expanded by the shell inside the booted system
in_root sh -c 'for i in $(seq 1 10); do head -c 4194304 /dev/urandom >/srv/data/bulk/more-$i.bin; done'
in_root mkdir -p /run/systemd/system/nightcopy.service.d
in_root sh -c 'cat >/run/systemd/system/nightcopy.service.d/e2e.conf <<EOF
[Service]
ExecStart=
ExecStart=/usr/bin/nightcopy run --force --config /etc/nightcopy/config.yaml
WatchdogSec=5s
EOF'
in_root systemctl daemon-reload
# (WatchdogUSec shows the last invocation's value until the next start; the drop-in list is current.)
check "watchdog test: drop-in in effect" grep -q e2e.conf <<<"$(unit_prop DropInPaths)"
t0=$SECONDS
in_root systemctl start nightcopy.service
main_pid="$(unit_prop MainPID)"
# Through systemd: the booted root (minbase) has no kill(1). Only the main process, nightcopy.
in_root systemctl kill --kill-whom=main --signal=SIGSTOP nightcopy.service
# The state field of /proc/PID/stat follows the ")" that closes the command name.
proc_state() { in_root cat "/proc/$main_pid/stat" | sed 's/.*) \([A-Za-z]\) .*/\1/'; }
expect "stalled run: frozen while active, after READY" "$(unit_prop ActiveState)/$(proc_state)" "active/T"
wait_for 60 unit_state_is failed
killed_after=$((SECONDS - t0))
echo "watchdog kill after ${killed_after} s (WatchdogSec=5s)" >>"$WORK/measurements"
expect "stalled run: killed by the watchdog (Result=watchdog, failed)" \
  "$(unit_prop Result) $(unit_prop ActiveState)" "watchdog failed"
check "stalled run: systemd logged the watchdog timeout and killed that process" \
  journal_has "Killing process $main_pid (nightcopy) with signal SIGABRT"
check "stalled run: 'Watchdog timeout' in the journal" journal_has 'Watchdog timeout'
if [ "$killed_after" -ge 5 ] && [ "$killed_after" -le 30 ]; then
  pass "stalled run: killed ${killed_after} s after the start (WatchdogSec=5s)"
else
  fail "stalled run: killed between 5 and 30 s after the start" "took ${killed_after} s"
fi
in_root rm -f /run/systemd/system/nightcopy.service.d/e2e.conf
in_root systemctl daemon-reload
in_root systemctl reset-failed nightcopy.service

# --- the timer --------------------------------------------------------------------------------------
next_elapse() { unit_prop_timer NextElapseUSecRealtime; }
unit_prop_timer() { in_root systemctl show nightcopy.timer -p "$1" --value; }
next="$(next_elapse)"
list="$(in_root systemctl list-timers nightcopy.timer --no-pager)"
echo "       list-timers: $(sed -n 2p <<<"$list")"
echo "timer next elapse: $next" >>"$WORK/measurements"
check "list-timers: shows nightcopy.timer activating nightcopy.service" grep -q 'nightcopy.timer.*nightcopy.service' <<<"$list"
in_window() {
  local t now
  t="$(date -u -d "$1" +%s)" || return 1
  now="$(date -u +%s)"
  local hhmm
  hhmm="$(date -u -d "$1" +%H%M)"
  # Next 02:00 plus a delay below RandomizedDelaySec=1h, within the coming 25 hours.
  [ "$hhmm" -ge 0200 ] && [ "$hhmm" -lt 0300 ] && [ "$t" -gt "$now" ] && [ "$t" -le $((now + 25 * 3600)) ]
}
check "timer: next elapse is the coming 02:00 plus the fixed delay ($next)" in_window "$next"
check "list-timers: NEXT is that same time" grep -qF "$(date -u -d "$next" '+%Y-%m-%d %H:%M:%S')" <<<"$list"
in_root systemctl restart nightcopy.timer
expect "timer: FixedRandomDelay keeps the same time across a restart" "$(next_elapse)" "$next"

# --- check mode on the installed host, with a change pending -----------------------------------
timer_sum="$(root_sha256 /etc/systemd/system/nightcopy.timer)"
if converge_e2e "$dir/check-change.log" --check -e 'nightcopy_on_calendar=*-*-* 03:30:00'; then
  if grep -q 'RUNNING HANDLER \[nightcopy : Restart the timer\]' "$dir/check-change.log" &&
    [ "$(recap_changed "$dir/check-change.log")" -gt 0 ]; then
    pass "role --check with a new schedule: reports the change, handlers run in check mode"
  else
    fail "role --check with a new schedule: reports the change" "$(tail -20 "$dir/check-change.log")"
  fi
else
  fail "role --check with a new schedule" "$(grep -E 'FAILED|fatal|ERROR' -A3 "$dir/check-change.log" | tail -20)"
fi
expect "role --check: the timer unit is unchanged" "$(root_sha256 /etc/systemd/system/nightcopy.timer)" "$timer_sum"
expect "role --check: the next elapse is unchanged" "$(next_elapse)" "$next"

# --- removing the package ----------------------------------------------------------------------------
# prerm stops the timer (whichever unit file defines it: here the role's), so nothing starts the
# binary that is gone; the role's units, the config and the state directory stay.
if out="$(in_root dpkg --remove nightcopy 2>&1)"; then
  pass "dpkg --remove: succeeds"
else
  fail "dpkg --remove: succeeds" "$(tail -15 <<<"$out")"
fi
expect "dpkg --remove: the timer stopped; the role's units, the config and the state kept" \
  "$(in_root systemctl is-active nightcopy.timer 2>&1) $(present /usr/bin/nightcopy /etc/systemd/system/nightcopy.timer /etc/nightcopy/config.yaml /var/lib/nightcopy)" \
  "inactive /usr/bin/nightcopy gone|/etc/systemd/system/nightcopy.timer kept|/etc/nightcopy/config.yaml kept|/var/lib/nightcopy kept|"
