#!/usr/bin/env bash
# The Ansible role converged against this machine into scratch roots (nightcopy_destdir, with
# service management off), the artifact served by `python3 -m http.server` on 127.0.0.1 and the
# alarm created in moto on 127.0.0.1. Checks every file the role writes, idempotence, that a
# wrong checksum or version leaves the installed binary alone, that preflight and `validate:`
# refuse bad values, that beta and prod differ only in their variables, and the scale-out modes
# (a worker converged, idempotent, without alarm, and switched back to single; the key that seals
# the queue messages, given as text or read from a Secrets Manager secret in moto, installed
# root's alone and never printed). The .deb install
# (nightcopy_install_method: deb) needs apt and dpkg's database in the host's own root, so only its
# refusals are here; e2e.sh converges it in the booted system.
#
# The role creates its system user for real; here it is `nightcopy-pkgtest` (not `nightcopy`),
# removed again at the end if this script created it.
set -uo pipefail
source "$(dirname "$0")/lib.sh"

echo "== role: converged into scratch roots on this machine"

dir="$WORK/role"
mkdir -p "$dir"
user=nightcopy-pkgtest
created_user=0
id "$user" >/dev/null 2>&1 || created_user=1

cleanup_role() {
  stop_pid "${HTTP_PID:-}"
  stop_pid "${MOTO_PID:-}"
  if [ "$created_user" = 1 ]; then
    userdel "$user" >/dev/null 2>&1 || true
    groupdel "$user" >/dev/null 2>&1 || true
  fi
}
trap cleanup_role EXIT

# --- the artifacts: the real binary under its version, and two bad ones -------------------------
version="$("$NIGHTCOPY_BIN" --version | awk '{print $2}')"
art="$dir/artifacts"
mkdir -p "$art"
cp "$NIGHTCOPY_BIN" "$art/nightcopy-$version-x86_64-linux"
sha="$(sha256sum "$art/nightcopy-$version-x86_64-linux" | cut -d' ' -f1)"
# A mirror that serves a modified file under a new version: the pinned checksum is the real one.
cp "$NIGHTCOPY_BIN" "$art/nightcopy-9.9.9-x86_64-linux"
printf 'tampered' >>"$art/nightcopy-9.9.9-x86_64-linux"
bad_sha="$(sha256sum "$art/nightcopy-9.9.9-x86_64-linux" | cut -d' ' -f1)"
# The right checksum, but for a binary that is not the version pinned.
cp "$NIGHTCOPY_BIN" "$art/nightcopy-9.9.8-x86_64-linux"
serve_dir "$art" || { fail "start the artifact server"; exit 0; }
url_base="http://127.0.0.1:$HTTP_PORT"

start_moto "$dir/moto.log" || { fail "start moto"; exit 0; }
# Fake credentials for the alarm task (boto3's chain reads the environment); never printed.
AWS_ACCESS_KEY_ID="AKIA$(random_hex 8)"
AWS_SECRET_ACCESS_KEY="$(random_hex 20)"
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_URL
# The fleet's authentication key (auth-key-file) for the coordinator and worker converges; the
# role must never print it.
auth_key="$(random_hex 32)"

# host NAME ROOT: an inventory that puts NAME (this machine, local connection) into the
# `nightcopy` group, installing below ROOT.
host() {
  cat >"$dir/$1.yml" <<EOF
nightcopy:
  hosts:
    $1:
      ansible_connection: local
      ansible_python_interpreter: $NIGHTCOPY_PKG_VENV/bin/python
      nightcopy_destdir: $2
      nightcopy_manage_service: false
      nightcopy_system_user: $user
      nightcopy_system_group: $user
      nightcopy_version: "$version"
      nightcopy_artifact_url: "$url_base/nightcopy-{{ nightcopy_version }}-x86_64-linux"
      nightcopy_artifact_sha256: "$sha"
      nightcopy_alarm_region: us-east-1
      nightcopy_alarm_endpoint_url: "http://127.0.0.1:$MOTO_PORT"
      nightcopy_alarm_instance_id: i-0pkgtest$1
EOF
}

# converge ENV NAME LOG [ansible-playbook args...]: site.yml with inventories/ENV plus host NAME.
converge() {
  local env="$1" name="$2" log="$3"
  shift 3
  (cd "$REPO/packaging/ansible" &&
    ansible_env ansible-playbook -i "inventories/$env" -i "$dir/$name.yml" --limit "$name" \
      site.yml "$@") >"$log" 2>&1
}

prod="$dir/prod-root"
host scratch-prod "$prod"
if converge prod scratch-prod "$dir/converge-1.log"; then
  pass "converge inventories/prod into a scratch root"
else
  fail "converge inventories/prod into a scratch root" "$(tail -30 "$dir/converge-1.log")"
fi

# --- every file the role wrote ----------------------------------------------------------------
expected_files="$(cat <<EOF
d 755 root root /etc
d 750 root $user /etc/nightcopy
f 640 root $user /etc/nightcopy/config.yaml
d 755 root root /etc/systemd
d 755 root root /etc/systemd/system
f 644 root root /etc/systemd/system/nightcopy.service
f 644 root root /etc/systemd/system/nightcopy.timer
d 755 root root /usr
d 755 root root /usr/local
d 755 root root /usr/local/bin
l 777 root root /usr/local/bin/nightcopy
d 755 root root /usr/local/lib
d 755 root root /usr/local/lib/nightcopy
f 755 root root /usr/local/lib/nightcopy/nightcopy-$version
d 755 root root /var
d 755 root root /var/lib
d 700 $user $user /var/lib/nightcopy
EOF
)"
tree() { (cd "$1" && find . -mindepth 1 -printf '%y %m %u %g /%P\n' | sed 's# /\./# /#' | sort -k5); }
expect "exactly these files, with these modes and owners" "$(tree "$prod")" "$expected_files"

expect "binary: the artifact, byte for byte" \
  "$(sha256sum "$prod/usr/local/lib/nightcopy/nightcopy-$version" | cut -d' ' -f1)" "$sha"
expect "binary path: a relative link to the pinned version" \
  "$(readlink "$prod/usr/local/bin/nightcopy")" "../lib/nightcopy/nightcopy-$version"

check "user: a system user with no login shell, in its own group" bash -c "
  uid=\$(id -u $user) && [ \"\$uid\" -lt 1000 ] &&
  [ \"\$(id -gn $user)\" = $user ] &&
  [ \"\$(getent passwd $user | cut -d: -f7)\" = /usr/sbin/nologin ] &&
  [ \"\$(getent passwd $user | cut -d: -f6)\" = /var/lib/nightcopy ]"

for f in etc/nightcopy/config.yaml etc/systemd/system/nightcopy.service etc/systemd/system/nightcopy.timer; do
  expect "$f begins with the ansible_managed comment" "$(head -3 "$prod/$f" | tr '\n' '|')" "#|# Ansible managed|#|"
done

check "config: nightcopy check-config accepts it" "$NIGHTCOPY_BIN" check-config --config "$prod/etc/nightcopy/config.yaml"
# The effective config (defaults filled in by the binary) has prod's values.
effective() {
  "$NIGHTCOPY_BIN" check-config --config "$1" | "$NIGHTCOPY_PKG_VENV/bin/python" -c '
import json, sys, yaml
c = yaml.safe_load(sys.stdin)
print(json.dumps({
  "source": c["source"]["path"], "exclude": c["source"]["exclude"],
  "bucket": c["destination"]["bucket"], "prefix": c["destination"]["prefix"],
  "region": c["destination"]["region"], "class": c["destination"]["storage-class"],
  "concurrency": c["transfer"]["concurrency"], "part": c["transfer"]["part-size"],
  "threshold": c["transfer"]["multipart-threshold"], "bw": str(c["transfer"]["bandwidth-limit"]),
  "state": c["state-dir"], "dims": c["metrics"]["dimensions"], "min": c["guard"]["min-interval"],
}, sort_keys=True))'
}
expect "config: prod's values, as nightcopy reads them" "$(effective "$prod/etc/nightcopy/config.yaml")" \
  '{"bucket": "example-backups-prod", "bw": "0", "class": "STANDARD_IA", "concurrency": 32, "dims": {"Environment": "prod"}, "exclude": ["**/.snapshot/**", "*.tmp", "*.swp"], "min": "20h", "part": "32MiB", "prefix": "scratch-prod/", "region": "eu-west-1", "source": "/srv/data", "state": "/var/lib/nightcopy", "threshold": "128MiB"}'

# prod leaves nightcopy_small_files empty: nightcopy's own rule for STANDARD_IA applies, and the
# file says nothing about it; Object Lock is off (commented out in prod's group_vars).
small_and_lock() {
  "$NIGHTCOPY_BIN" check-config --config "$1" | "$NIGHTCOPY_PKG_VENV/bin/python" -c '
import json, sys, yaml
d = yaml.safe_load(sys.stdin)["destination"]
print(json.dumps({k: d.get(k) for k in ("small-files", "object-lock")}, sort_keys=True))'
}
expect "config: prod's small files by nightcopy's own rule for STANDARD_IA, no Object Lock" \
  "$(small_and_lock "$prod/etc/nightcopy/config.yaml" 2>&1)" \
  '{"object-lock": null, "small-files": {"below": "89KiB", "storage-class": "STANDARD"}}'
check "config: prod's file has no small-files: or object-lock: section" \
  bash -c "! grep -qE '^  (small-files|object-lock):' '$prod/etc/nightcopy/config.yaml'"

# Unit lines that carry the variables (the rest is compared with packaging/systemd/ by static.sh).
unit_lines() {
  grep -E '^(Description|RequiresMountsFor|ExecStart|User|Group|AmbientCapabilities|StateDirectory|ProtectHome|WatchdogSec|RuntimeMaxSec|TimeoutStartSec|TimeoutStopSec|SuccessExitStatus|Type|MemoryHigh|MemoryMax|CPUQuota|Nice|IOSchedulingClass|TasksMax|OnCalendar|RandomizedDelaySec|FixedRandomDelay|Persistent|AccuracySec|WantedBy)=' "$@"
}
expect "service unit: prod's values" "$(unit_lines "$prod/etc/systemd/system/nightcopy.service" | tr '\n' '|')" \
  "Description=nightcopy: additive-only backup of /srv/data to S3|RequiresMountsFor=/srv/data|Type=notify|ExecStart=/usr/local/bin/nightcopy run --config /etc/nightcopy/config.yaml|SuccessExitStatus=75|TimeoutStartSec=5min|WatchdogSec=40min|RuntimeMaxSec=22h|TimeoutStopSec=2min|User=$user|Group=$user|AmbientCapabilities=CAP_DAC_READ_SEARCH|StateDirectory=nightcopy|ProtectHome=yes|Nice=5|IOSchedulingClass=idle|MemoryHigh=1280M|MemoryMax=1536M|CPUQuota=200%|TasksMax=256|"
expect "timer unit: 02:00, fixed random delay of up to 1h, persistent" "$(unit_lines "$prod/etc/systemd/system/nightcopy.timer" | tr '\n' '|')" \
  "Description=nightcopy: nightly backup to S3|OnCalendar=*-*-* 02:00:00|RandomizedDelaySec=1h|FixedRandomDelay=true|Persistent=true|AccuracySec=1min|WantedBy=timers.target|"

units="$dir/units-prod"
mkdir -p "$units"
cp "$prod/etc/systemd/system/nightcopy.service" "$prod/etc/systemd/system/nightcopy.timer" "$units/"
sed -i "s#^ExecStart=[^ ]*#ExecStart=$NIGHTCOPY_BIN#" "$units/nightcopy.service"
check "rendered units pass systemd-analyze verify" bash -c "
  cd '$units' && out=\$(systemd-analyze verify ./nightcopy.service ./nightcopy.timer 2>&1) && [ -z \"\$out\" ] || { echo \"\$out\"; exit 1; }"
check "rendered service: exposure <= 2.0" systemd-analyze security --offline=true --threshold=20 --no-pager "$units/nightcopy.service"

# --- the alarm, as moto stored it ---------------------------------------------------------------
alarm() {
  AWS_DEFAULT_REGION=us-east-1 "$NIGHTCOPY_PKG_VENV/bin/python" - "http://127.0.0.1:$MOTO_PORT" "$1" <<'EOF'
import json, sys, boto3
cw = boto3.client("cloudwatch", endpoint_url=sys.argv[1], region_name="us-east-1")
alarms = cw.describe_alarms(AlarmNames=[sys.argv[2]])["MetricAlarms"]
if len(alarms) != 1:
    sys.exit(f"{len(alarms)} alarms named {sys.argv[2]}")
a = alarms[0]
print(json.dumps({k: a.get(k) for k in ("Namespace", "MetricName", "Statistic", "Period",
    "EvaluationPeriods", "DatapointsToAlarm", "Threshold", "ComparisonOperator",
    "TreatMissingData", "AlarmActions", "OKActions")} | {"Dimensions": sorted((d["Name"], d["Value"]) for d in a["Dimensions"])}, sort_keys=True))
EOF
}
expect "alarm: created in CloudWatch (moto) as docs/metrics.md says" "$(alarm nightcopy-last-success-scratch-prod 2>&1)" \
  '{"AlarmActions": ["arn:aws:sns:eu-west-1:111122223333:nightcopy-pages"], "ComparisonOperator": "LessThanThreshold", "DatapointsToAlarm": 25, "Dimensions": [["Environment", "prod"], ["InstanceId", "i-0pkgtestscratch-prod"]], "EvaluationPeriods": 25, "MetricName": "LastSuccess", "Namespace": "Nightcopy", "OKActions": ["arn:aws:sns:eu-west-1:111122223333:nightcopy-pages"], "Period": 3600, "Statistic": "Maximum", "Threshold": 1.0, "TreatMissingData": "breaching"}'

# packaging/aws/alarm-last-success.json is accepted by the same API call, field for field.
json_alarm() {
  AWS_DEFAULT_REGION=us-east-1 "$NIGHTCOPY_PKG_VENV/bin/python" - "http://127.0.0.1:$MOTO_PORT" "$REPO/packaging/aws/alarm-last-success.json" <<'EOF'
import json, sys, boto3
cw = boto3.client("cloudwatch", endpoint_url=sys.argv[1], region_name="us-east-1")
cw.put_metric_alarm(**json.load(open(sys.argv[2])))
EOF
}
check "alarm JSON: accepted by PutMetricAlarm" json_alarm
expect "alarm JSON: same settings as the role's alarm" \
  "$(alarm nightcopy-last-success-fileserver-1 2>&1 | "$NIGHTCOPY_PKG_VENV/bin/python" -c 'import json,sys; a=json.load(sys.stdin); [a.pop(k) for k in ("AlarmActions","OKActions","Dimensions")]; print(json.dumps(a, sort_keys=True))')" \
  "$(alarm nightcopy-last-success-scratch-prod 2>&1 | "$NIGHTCOPY_PKG_VENV/bin/python" -c 'import json,sys; a=json.load(sys.stdin); [a.pop(k) for k in ("AlarmActions","OKActions","Dimensions")]; print(json.dumps(a, sort_keys=True))')"

# --- idempotence ---------------------------------------------------------------------------------
if converge prod scratch-prod "$dir/converge-2.log"; then
  expect "second converge: changed=0" "$(recap_changed "$dir/converge-2.log")" 0
else
  fail "second converge" "$(tail -30 "$dir/converge-2.log")"
fi

# --- a bad artifact never replaces the installed binary ----------------------------------------
snapshot() { printf '%s %s\n' "$(readlink "$prod/usr/local/bin/nightcopy")" \
  "$(sha256sum "$prod/usr/local/lib/nightcopy/nightcopy-$version" | cut -d' ' -f1)"; }
before="$(snapshot)"

if converge prod scratch-prod "$dir/tampered.log" -e nightcopy_version=9.9.9; then
  fail "new version, tampered artifact: the play fails"
else
  check "new version, tampered artifact: the play fails, saying so" \
    grep -q "nightcopy 9.9.9 was NOT installed.*checksum" "$dir/tampered.log"
fi
expect "new version, tampered artifact: installed binary untouched" "$(snapshot)" "$before"
check "new version, tampered artifact: nothing left in the install directory" \
  test ! -e "$prod/usr/local/lib/nightcopy/nightcopy-9.9.9"

if converge prod scratch-prod "$dir/wrong-sha.log" -e "nightcopy_artifact_sha256=$bad_sha"; then
  fail "same version, wrong pinned checksum: the play fails"
else
  check "same version, wrong pinned checksum: the play fails, saying so" \
    grep -q "nightcopy $version was NOT installed.*checksum" "$dir/wrong-sha.log"
fi
expect "same version, wrong pinned checksum: installed binary untouched" "$(snapshot)" "$before"

if converge prod scratch-prod "$dir/wrong-version.log" -e nightcopy_version=9.9.8; then
  fail "checksum right but another version inside: the play fails"
else
  check "checksum right but another version inside: the play fails, saying so" \
    grep -q "not nightcopy 9.9.8" "$dir/wrong-version.log"
fi
expect "checksum right but another version inside: link not moved" "$(snapshot)" "$before"

# --- refusals before anything changes -----------------------------------------------------------
before_tree="$(tree "$prod")"
before_config="$(sha256sum "$prod/etc/nightcopy/config.yaml")"
if converge prod scratch-prod "$dir/preflight.log" -e nightcopy_source_path=srv/data; then
  fail "preflight: a relative source path is refused"
else
  check "preflight: a relative source path is refused, naming the variable" \
    grep -q "nightcopy_source_path.*must be absolute" "$dir/preflight.log"
fi
if converge prod scratch-prod "$dir/watchdog.log" -e nightcopy_watchdog_sec=10min; then
  fail "preflight: a watchdog shorter than nightcopy's own retries is refused"
else
  check "preflight: a watchdog shorter than nightcopy's own retries is refused" \
    grep -q "nightcopy_watchdog_sec (10min) must be" "$dir/watchdog.log"
fi
if converge prod scratch-prod "$dir/argspec.log" -e nightcopy_run_as=sudo; then
  fail "argument spec: an unknown nightcopy_run_as is refused"
else
  check "argument spec: an unknown nightcopy_run_as is refused" grep -q "nightcopy_run_as" "$dir/argspec.log"
fi
if converge prod scratch-prod "$dir/lock-mode.log" -e '{"nightcopy_object_lock": {"mode": "governance", "retain": "30d"}}'; then
  fail "argument spec: an Object Lock mode other than GOVERNANCE or COMPLIANCE is refused"
else
  check "argument spec: an Object Lock mode other than GOVERNANCE or COMPLIANCE is refused" \
    grep -q "mode must be one of: GOVERNANCE, COMPLIANCE.*nightcopy_object_lock" "$dir/lock-mode.log"
fi
if converge prod scratch-prod "$dir/lock-retain.log" -e '{"nightcopy_object_lock": {"mode": "GOVERNANCE"}}'; then
  fail "preflight: Object Lock without a retain is refused"
else
  check "preflight: Object Lock without a retain is refused" \
    grep -q "nightcopy_object_lock is empty or has mode GOVERNANCE or COMPLIANCE and retain" "$dir/lock-retain.log"
fi
if converge prod scratch-prod "$dir/small-below.log" -e '{"nightcopy_small_files": {"storage_class": "STANDARD"}}'; then
  fail "preflight: small files without below are refused"
else
  check "preflight: small files without below are refused" \
    grep -q "nightcopy_small_files is empty or has below" "$dir/small-below.log"
fi
# deb mode (nightcopy_install_method: deb) installs with apt into the host's own root, so it is
# converged in e2e.sh's booted system; here only its refusals, which come before any change.
if converge prod scratch-prod "$dir/method.log" -e nightcopy_install_method=rpm; then
  fail "argument spec: an unknown nightcopy_install_method is refused"
else
  check "argument spec: an unknown nightcopy_install_method is refused" \
    grep -q "value of nightcopy_install_method must be one of: binary, deb" "$dir/method.log"
fi
if converge prod scratch-prod "$dir/deb-pin.log" -e nightcopy_install_method=deb; then
  fail "preflight: deb mode without the .deb's SHA-256 is refused"
else
  check "preflight: deb mode without the .deb's SHA-256 is refused, naming the variable" \
    grep -q "nightcopy_deb_sha256 must be the 64 hex digits" "$dir/deb-pin.log"
fi
if converge prod scratch-prod "$dir/deb-destdir.log" -e nightcopy_install_method=deb -e "nightcopy_deb_sha256=$sha"; then
  fail "preflight: deb mode into a scratch root is refused"
else
  check "preflight: deb mode into a scratch root is refused (apt installs into /)" \
    grep -q "nightcopy_install_method deb installs with apt into /" "$dir/deb-destdir.log"
fi
# 0 passes every Ansible type check; only nightcopy's own validation knows concurrency is 1-256.
if converge prod scratch-prod "$dir/validate.log" -e nightcopy_concurrency=0; then
  fail "validate: a config nightcopy rejects is not installed"
else
  check "validate: check-config's verdict stops the play" grep -q "failed to validate" "$dir/validate.log"
fi
expect "refused runs changed no file" "$(tree "$prod")" "$before_tree"
expect "refused runs left the config as it was" "$(sha256sum "$prod/etc/nightcopy/config.yaml")" "$before_config"

# --- small files and Object Lock: the config validate: accepts, with both sections --------------
if converge prod scratch-prod "$dir/lock.log" \
  -e '{"nightcopy_small_files": {"below": "128KiB"}, "nightcopy_object_lock": {"mode": "GOVERNANCE", "retain": "30d"}}'; then
  pass "converge prod with small files below 128KiB and Object Lock GOVERNANCE 30d"
  check "small files and Object Lock: nightcopy check-config accepts the installed config" \
    "$NIGHTCOPY_BIN" check-config --config "$prod/etc/nightcopy/config.yaml"
  expect "small files and Object Lock: as nightcopy reads them" "$(small_and_lock "$prod/etc/nightcopy/config.yaml" 2>&1)" \
    '{"object-lock": {"mode": "GOVERNANCE", "retain": "30days"}, "small-files": {"below": "128KiB", "storage-class": "STANDARD"}}'
  expect "small files and Object Lock: only the config changed" "$(recap_changed "$dir/lock.log")" 1
else
  fail "converge prod with small files and Object Lock" "$(tail -30 "$dir/lock.log")"
fi

# --- beta: same role and templates, other values ------------------------------------------------
beta="$dir/beta-root"
host scratch-beta "$beta"
if converge beta scratch-beta "$dir/beta.log"; then
  pass "converge inventories/beta into a scratch root"
  expect "beta config: few uploads, small parts, a bandwidth cap" \
    "$(effective "$beta/etc/nightcopy/config.yaml" | "$NIGHTCOPY_PKG_VENV/bin/python" -c 'import json,sys; c=json.load(sys.stdin); print(c["concurrency"], c["part"], c["threshold"], c["bw"], c["dims"]["Environment"])')" \
    "4 8MiB 32MiB 16MiB beta"
  # Between prod and beta, the service unit differs in exactly the tuned lines.
  changed_keys="$(diff <(sed "s/scratch-prod/HOST/" "$prod/etc/systemd/system/nightcopy.service") \
    <(sed "s/scratch-beta/HOST/" "$beta/etc/systemd/system/nightcopy.service") |
    sed -n 's/^> \([A-Za-z]*\)=.*/\1/p' | sort | tr '\n' ' ')"
  expect "beta vs prod service unit: only the resource lines differ" "$changed_keys" \
    "CPUQuota MemoryHigh MemoryMax Nice "
  expect "beta service unit: small memory limit, half a core, lowest priority" \
    "$(grep -E '^(MemoryMax|CPUQuota|Nice)=' "$beta/etc/systemd/system/nightcopy.service" | tr '\n' ' ')" \
    "Nice=19 MemoryMax=256M CPUQuota=50% "
  no_alarm() { ! alarm "$1" >/dev/null 2>&1; }
  check "beta: no alarm created (alarm off in beta)" no_alarm nightcopy-last-success-scratch-beta
else
  fail "converge inventories/beta into a scratch root" "$(tail -30 "$dir/beta.log")"
fi

# --- scale-out: a worker, and back to single ----------------------------------------------------
# prod's values plus nightcopy_mode: worker (the queues come from inventories/prod) and the key.
# validate: runs check-config on a config with distribute:, so this needs a binary of the
# scale-out release. --diff -vv: the key must stay out of even the most talkative output.
worker="$dir/worker-root"
host scratch-worker "$worker"
system_units() { tree "$1" | grep ' /etc/systemd/system/' | tr '\n' '|'; }
# key_checks WHAT ROOT LOG KEY: the key file is root's alone and holds KEY, the config names it as
# config/nightcopy.example.yaml does and nightcopy reads it back, and KEY is not in LOG, a play
# whose key task ran with its output hidden.
key_checks() {
  local what="$1" root="$2" log="$3" key="$4"
  expect "$what: the key file, a regular file root's alone (0600)" \
    "$(tree "$root" | grep ' /etc/nightcopy/auth.key$')" "f 600 root root /etc/nightcopy/auth.key"
  check "$what: the key file holds the key as given" cmp -s "$root/etc/nightcopy/auth.key" <(printf '%s' "$key")
  check "$what: config/nightcopy.example.yaml's auth-key-file entry, written into the config" bash -c "
    grep -qx '# auth-key-file: /etc/nightcopy/auth.key' '$REPO/config/nightcopy.example.yaml' &&
    grep -qx 'auth-key-file: \"/etc/nightcopy/auth.key\"' '$root/etc/nightcopy/config.yaml'"
  expect "$what: auth-key-file as nightcopy reads the config" \
    "$("$NIGHTCOPY_BIN" check-config --config "$root/etc/nightcopy/config.yaml" | "$NIGHTCOPY_PKG_VENV/bin/python" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin).get("auth-key-file"))')" \
    /etc/nightcopy/auth.key
  check "$what: the key task ran with its output hidden (no_log)" \
    grep -q "the output has been hidden due to the fact that 'no_log: true'" "$log"
  check "$what: the key is nowhere in the play's output" bash -c "! grep -qF '$key' '$log'"
}
no_key_checks() {
  check "$1: no key file" test ! -e "$2/etc/nightcopy/auth.key"
  check "$1: the config names no auth-key-file" bash -c "! grep -q '^auth-key-file:' '$2/etc/nightcopy/config.yaml'"
}
if converge prod scratch-worker "$dir/worker.log" -e nightcopy_mode=worker -e "nightcopy_auth_key=$auth_key" --diff -vv; then
  pass "converge inventories/prod as a worker into a scratch root"
  expect "worker: its own unit, no nightly service or timer" "$(system_units "$worker")" \
    "f 644 root root /etc/systemd/system/nightcopy-worker.service|"
  key_checks worker "$worker" "$dir/worker.log" "$auth_key"
  check "worker config: nightcopy check-config accepts it" \
    "$NIGHTCOPY_BIN" check-config --config "$worker/etc/nightcopy/config.yaml"
  expect "worker config: prod's queues, as nightcopy reads them" \
    "$("$NIGHTCOPY_BIN" check-config --config "$worker/etc/nightcopy/config.yaml" | "$NIGHTCOPY_PKG_VENV/bin/python" -c '
import sys, yaml
d = yaml.safe_load(sys.stdin)["distribute"]
print(d["queue-url"], d["results-queue-url"], d["dead-letter-queue-url"], d["batch-files"], d["batch-bytes"], d["max-queued"])')" \
    "https://sqs.eu-west-1.amazonaws.com/111122223333/nightcopy-prod-work https://sqs.eu-west-1.amazonaws.com/111122223333/nightcopy-prod-results https://sqs.eu-west-1.amazonaws.com/111122223333/nightcopy-prod-work-dlq 20 1GiB 2000"
  expect "worker unit: prod's values, long-running" "$(unit_lines "$worker/etc/systemd/system/nightcopy-worker.service" | tr '\n' '|')" \
    "Description=nightcopy worker: uploads batches of /srv/data from the SQS work queue to S3|RequiresMountsFor=/srv/data|Type=notify|ExecStart=/usr/local/bin/nightcopy worker --config /etc/nightcopy/config.yaml|SuccessExitStatus=143|TimeoutStartSec=5min|WatchdogSec=40min|TimeoutStopSec=2min|User=$user|Group=$user|AmbientCapabilities=CAP_DAC_READ_SEARCH|StateDirectory=nightcopy|ProtectHome=yes|Nice=5|IOSchedulingClass=idle|MemoryHigh=1280M|MemoryMax=1536M|CPUQuota=200%|TasksMax=256|WantedBy=multi-user.target|"
  wunits="$dir/units-worker"
  mkdir -p "$wunits"
  cp "$worker/etc/systemd/system/nightcopy-worker.service" "$wunits/"
  sed -i "s#^ExecStart=[^ ]*#ExecStart=$NIGHTCOPY_BIN#" "$wunits/nightcopy-worker.service"
  check "rendered worker unit passes systemd-analyze verify" bash -c "
    cd '$wunits' && out=\$(systemd-analyze verify ./nightcopy-worker.service 2>&1) && [ -z \"\$out\" ] || { echo \"\$out\"; exit 1; }"
  check "rendered worker unit: exposure <= 2.0" systemd-analyze security --offline=true --threshold=20 --no-pager "$wunits/nightcopy-worker.service"
  # prod has its alarm on; a worker publishes no LastSuccess, so it must not get one.
  worker_no_alarm() { ! alarm nightcopy-last-success-scratch-worker >/dev/null 2>&1; }
  check "worker: no LastSuccess alarm, although prod's alarm is on" worker_no_alarm
  if converge prod scratch-worker "$dir/worker-2.log" -e nightcopy_mode=worker -e "nightcopy_auth_key=$auth_key"; then
    expect "worker, second converge: changed=0" "$(recap_changed "$dir/worker-2.log")" 0
  else
    fail "worker, second converge" "$(tail -30 "$dir/worker-2.log")"
  fi
  if converge prod scratch-worker "$dir/worker-single.log"; then
    expect "worker back to single: the nightly units, the worker's removed" "$(system_units "$worker")" \
      "f 644 root root /etc/systemd/system/nightcopy.service|f 644 root root /etc/systemd/system/nightcopy.timer|"
    check "worker back to single: the config has no distribute: section" \
      bash -c "! grep -q '^distribute:' '$worker/etc/nightcopy/config.yaml'"
    no_key_checks "worker back to single (no key given)" "$worker"
  else
    fail "converge the worker back to single" "$(tail -30 "$dir/worker-single.log")"
  fi
  # The fleet is authenticated by default: a worker without a key is refused before anything
  # changes, unless nightcopy_auth_key_required is false.
  before_tree="$(tree "$worker")"
  if converge prod scratch-worker "$dir/worker-nokey.log" -e nightcopy_mode=worker; then
    fail "preflight: a worker without the authentication key is refused"
  else
    check "preflight: a worker without the authentication key is refused, naming both variables" \
      grep -q "needs the fleet's authentication key: nightcopy_auth_key .* or nightcopy_auth_key_secret" "$dir/worker-nokey.log"
  fi
  expect "preflight: the refused worker changed no file" "$(tree "$worker")" "$before_tree"
  if converge prod scratch-worker "$dir/worker-optional.log" -e nightcopy_mode=worker -e nightcopy_auth_key_required=false; then
    pass "a worker without the key converges with nightcopy_auth_key_required: false"
    no_key_checks "worker with nightcopy_auth_key_required: false" "$worker"
    check "worker with nightcopy_auth_key_required: false: nightcopy check-config accepts the config" \
      "$NIGHTCOPY_BIN" check-config --config "$worker/etc/nightcopy/config.yaml"
  else
    fail "a worker without the key converges with nightcopy_auth_key_required: false" "$(tail -30 "$dir/worker-optional.log")"
  fi
else
  fail "converge inventories/prod as a worker into a scratch root" "$(tail -30 "$dir/worker.log")"
fi

# --- scale-out: a coordinator, its key given as text, then read from Secrets Manager (moto) -------
coord="$dir/coordinator-root"
host scratch-coordinator "$coord"
if converge prod scratch-coordinator "$dir/coordinator.log" -e nightcopy_mode=coordinator \
  -e "nightcopy_auth_key=$auth_key" --diff -vv; then
  pass "converge inventories/prod as a coordinator with nightcopy_auth_key"
  expect "coordinator: the nightly units" "$(system_units "$coord")" \
    "f 644 root root /etc/systemd/system/nightcopy.service|f 644 root root /etc/systemd/system/nightcopy.timer|"
  key_checks coordinator "$coord" "$dir/coordinator.log" "$auth_key"
  check "coordinator config: nightcopy check-config accepts it" \
    "$NIGHTCOPY_BIN" check-config --config "$coord/etc/nightcopy/config.yaml"

  # The secret as packaging/aws/scale-out.yaml makes it (64 letters and digits), in moto; the
  # lookup runs on the controller and finds moto through AWS_URL (amazon.aws's endpoint_url), in
  # the region of the secret's ARN. Real Secrets Manager is not reached from here.
  secret_value="$(random_hex 32)"
  secret_arn="$(AWS_DEFAULT_REGION=us-east-1 "$NIGHTCOPY_PKG_VENV/bin/python" - "http://127.0.0.1:$MOTO_PORT" "$secret_value" <<'PYEOF'
import sys, boto3
sm = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
print(sm.create_secret(Name="nightcopy-pkgtest-auth-key", SecretString=sys.argv[2])["ARN"])
PYEOF
)"
  if [ -z "$secret_arn" ]; then
    fail "create the key's secret in moto"
  elif AWS_URL="http://127.0.0.1:$MOTO_PORT" converge prod scratch-coordinator "$dir/coordinator-secret.log" \
    -e nightcopy_mode=coordinator -e "nightcopy_auth_key_secret=$secret_arn" --diff -vv; then
    pass "converge the coordinator with nightcopy_auth_key_secret (the lookup against moto)"
    key_checks "coordinator, key from Secrets Manager" "$coord" "$dir/coordinator-secret.log" "$secret_value"
    # A secret that cannot be read fails the play before the key or the config change.
    before_key="$(sha256sum "$coord/etc/nightcopy/auth.key" "$coord/etc/nightcopy/config.yaml")"
    if AWS_URL="http://127.0.0.1:$MOTO_PORT" converge prod scratch-coordinator "$dir/coordinator-nosecret.log" \
      -e nightcopy_mode=coordinator -e "nightcopy_auth_key_secret=${secret_arn%-*}-gone-AbCdEf"; then
      fail "a secret that does not exist fails the play"
    else
      check "a secret that does not exist fails the play, saying it was not found" \
        grep -q "Failed to find secret .*-gone-AbCdEf (ResourceNotFound)" "$dir/coordinator-nosecret.log"
    fi
    expect "a secret that does not exist: key file and config as they were" \
      "$(sha256sum "$coord/etc/nightcopy/auth.key" "$coord/etc/nightcopy/config.yaml")" "$before_key"
  else
    fail "converge the coordinator with nightcopy_auth_key_secret (the lookup against moto)" \
      "$(tail -30 "$dir/coordinator-secret.log")"
  fi
else
  fail "converge inventories/prod as a coordinator with nightcopy_auth_key" "$(tail -30 "$dir/coordinator.log")"
fi

# preflight: a coordinator without its queues, or waiting longer than its run may last.
if converge prod scratch-prod "$dir/no-queue.log" -e nightcopy_mode=coordinator -e nightcopy_distribute_queue_url=; then
  fail "preflight: a coordinator without a work queue URL is refused"
else
  check "preflight: a coordinator without a work queue URL is refused, naming the variable" \
    grep -q "need nightcopy_distribute_queue_url" "$dir/no-queue.log"
fi
if converge prod scratch-prod "$dir/deadline.log" -e nightcopy_mode=coordinator -e nightcopy_distribute_deadline=23h; then
  fail "preflight: a deadline beyond RuntimeMaxSec is refused"
else
  check "preflight: a deadline beyond RuntimeMaxSec is refused" \
    grep -q "nightcopy_distribute_deadline (23h) and" "$dir/deadline.log"
fi
if converge prod scratch-prod "$dir/short-key.log" -e nightcopy_mode=coordinator -e nightcopy_auth_key=0123456789abcdef; then
  fail "preflight: a key shorter than 32 bytes is refused"
else
  check "preflight: a key shorter than 32 bytes is refused" grep -q "its text, 32 to 4096 bytes" "$dir/short-key.log"
fi

# --- the dashboard and failure notification -----------------------------------------------------
# prod's values plus both switched on, the webhook's URL with every character the notify.env
# quoting must escape. The dashboard goes to moto (the host's alarm region, us-east-1) with the
# aws cli of the test venv; its alarm widget must list every prod host with an alarm, although
# the play is limited to this one.
watch="$dir/watch-root"
host scratch-watch "$watch"
hook_token="$(random_hex 12)"
hook_url="https://hooks.example.internal/services/$hook_token?a=\"b\"&c=\$d\`e\`\\f"
runbook=https://git.example.internal/nightcopy/-/blob/main
watch_vars=(-e nightcopy_notify_enabled=true -e nightcopy_dashboard_enabled=true
  -e "nightcopy_dashboard_runbook_url=$runbook" -e '{"nightcopy_notify_command": "cat >/dev/null"}'
  -e "{\"nightcopy_notify_url\": $(printf '%s' "$hook_url" | "$NIGHTCOPY_PKG_VENV/bin/python" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}")
dashboard() {
  AWS_DEFAULT_REGION=us-east-1 "$NIGHTCOPY_PKG_VENV/bin/python" - "http://127.0.0.1:$MOTO_PORT" "$@" <<'PYEOF'
import json, sys, boto3
cw = boto3.client("cloudwatch", endpoint_url=sys.argv[1], region_name="us-east-1")
print(cw.get_dashboard(DashboardName=sys.argv[2])["DashboardBody"])
PYEOF
}
if converge prod scratch-watch "$dir/watch.log" "${watch_vars[@]}"; then
  pass "converge prod with the dashboard and failure notification on"
  expect "notify: the script, notify.env (root only), the template unit and the nightly unit's drop-in" \
    "$(tree "$watch" | grep -E 'notify|\.service\.d' | tr '\n' '|')" \
    "f 600 root root /etc/nightcopy/notify.env|f 644 root root /etc/systemd/system/nightcopy-notify@.service|d 755 root root /etc/systemd/system/nightcopy.service.d|f 644 root root /etc/systemd/system/nightcopy.service.d/notify.conf|f 755 root root /usr/local/lib/nightcopy/notify|"
  check "notify: the installed script is packaging/systemd/nightcopy-notify" \
    cmp "$REPO/packaging/systemd/nightcopy-notify" "$watch/usr/local/lib/nightcopy/notify"
  # systemd reads a double-quoted EnvironmentFile= value as POSIX sh does ("\\", "\"", "\$", "\`").
  expect "notify.env: the URL and the command come back as given, quoted for systemd" \
    "$(sh -c 'set -a; . "$1"; printf "%s|%s" "$NIGHTCOPY_NOTIFY_URL" "$NIGHTCOPY_NOTIFY_COMMAND"' sh "$watch/etc/nightcopy/notify.env")" \
    "$hook_url|cat >/dev/null"
  check "notify: the webhook's token is nowhere in the play's output" \
    bash -c "! grep -q '$hook_token' '$dir/watch.log'"
  expect "notify: the drop-in gives nightcopy.service OnFailure= on the template" \
    "$(grep -v '^#' "$watch/etc/systemd/system/nightcopy.service.d/notify.conf" | tr '\n' '|')" \
    "[Unit]|OnFailure=nightcopy-notify@%n.service|"
  wu="$dir/units-watch"
  mkdir -p "$wu/nightcopy.service.d"
  cp "$watch/etc/systemd/system/nightcopy.service" "$watch/etc/systemd/system/nightcopy-notify@.service" "$wu/"
  cp "$watch/etc/systemd/system/nightcopy.service.d/notify.conf" "$wu/nightcopy.service.d/"
  sed -i "s#^ExecStart=[^ ]*#ExecStart=$NIGHTCOPY_BIN#" "$wu/nightcopy.service"
  sed -i "s#^ExecStart=[^ ]*#ExecStart=$REPO/packaging/systemd/nightcopy-notify#" "$wu/nightcopy-notify@.service"
  check "rendered nightcopy.service, its drop-in and nightcopy-notify@nightcopy.service.service pass verify" bash -c "
    cd '$wu' && out=\$(systemd-analyze verify ./nightcopy.service ./nightcopy-notify@nightcopy.service.service 2>&1) && [ -z \"\$out\" ] || { echo \"\$out\"; exit 1; }"

  # moto's STS says the account is 123456789012.
  arns=""
  for h in fileserver-1.example.internal fileserver-2.example.internal scratch-watch; do
    arns="$arns --alarm-arn=arn:aws:cloudwatch:us-east-1:123456789012:alarm:nightcopy-last-success-$h"
  done
  # shellcheck disable=SC2086 # one --alarm-arn= word per host
  want_body="$(python3 "$REPO/packaging/aws/render_dashboard.py" --region us-east-1 --namespace Nightcopy \
    --dimension Environment=prod --runbook-url "$runbook" $arns)"
  same_json() { "$NIGHTCOPY_PKG_VENV/bin/python" -c 'import json,sys; sys.exit(json.loads(sys.argv[1]) != json.loads(sys.argv[2]))' "$1" "$2"; }
  check "dashboard: nightcopy-prod in CloudWatch (moto) is render_dashboard.py's, with every prod host's alarm" \
    same_json "$(dashboard nightcopy-prod 2>&1)" "$want_body"

  if converge prod scratch-watch "$dir/watch-2.log" "${watch_vars[@]}"; then
    expect "dashboard and notify, second converge: changed=0" "$(recap_changed "$dir/watch-2.log")" 0
  else
    fail "dashboard and notify, second converge" "$(tail -30 "$dir/watch-2.log")"
  fi
  if converge prod scratch-watch "$dir/watch-check.log" "${watch_vars[@]}" --check \
    -e nightcopy_dashboard_runbook_url=https://docs.example.internal/nightcopy; then
    check "dashboard, --check with a new runbook URL: reported as a change, and that it would be replaced" \
      bash -c "grep -q 'would be replaced (check mode)' '$dir/watch-check.log' && [ \"\$(awk '/ changed=/ {for (i = 1; i <= NF; i++) if (\$i ~ /^changed=/) {split(\$i, a, \"=\"); n += a[2]}} END {print n + 0}' '$dir/watch-check.log')\" -ge 1 ]"
    check "dashboard, --check: CloudWatch's dashboard unchanged" same_json "$(dashboard nightcopy-prod 2>&1)" "$want_body"
  else
    fail "dashboard, --check with a new runbook URL" "$(tail -30 "$dir/watch-check.log")"
  fi

  # Switched off again: everything notify wrote is gone (the drop-in directory stays).
  if converge prod scratch-watch "$dir/watch-off.log"; then
    expect "notify off: script, notify.env, unit and drop-in removed" \
      "$(tree "$watch" | grep -E 'notify|\.service\.d' | tr '\n' '|')" \
      "d 755 root root /etc/systemd/system/nightcopy.service.d|"
  else
    fail "converge with failure notification switched off again" "$(tail -30 "$dir/watch-off.log")"
  fi
else
  fail "converge prod with the dashboard and failure notification on" "$(tail -30 "$dir/watch.log")"
fi

if converge prod scratch-watch "$dir/notify-none.log" -e nightcopy_notify_enabled=true; then
  fail "preflight: failure notification without a URL or command is refused"
else
  check "preflight: failure notification without a URL or command is refused" \
    grep -q "Failure notification needs" "$dir/notify-none.log"
fi
if converge prod scratch-watch "$dir/notify-http.log" -e nightcopy_notify_enabled=true \
  -e nightcopy_notify_url=http://hooks.example.internal/x; then
  fail "preflight: a plain http:// webhook off loopback is refused"
else
  check "preflight: a plain http:// webhook off loopback is refused" grep -q "Failure notification needs" "$dir/notify-http.log"
fi
if converge prod scratch-watch "$dir/dashboard-url.log" -e nightcopy_dashboard_enabled=true; then
  fail "preflight: the dashboard without its runbook URL is refused"
else
  check "preflight: the dashboard without its runbook URL is refused" grep -q "nightcopy_dashboard_runbook_url" "$dir/dashboard-url.log"
fi
