#!/usr/bin/env bash
# What watches the backups, beside the units: the CloudWatch dashboard (rendered, checked against
# the metrics of src/metrics.rs, put into moto on 127.0.0.1 and read back), the Prometheus rules
# and a sample textfile (promtool), and the failure notification (its template unit verified with
# an instance and with the OnFailure= drop-ins, its script run against a fake nightcopy and a
# local HTTP server). Run by static.sh; needs no systemd. moto or promtool missing is a failure,
# never a skip.
set -uo pipefail
source "$(dirname "$0")/lib.sh"

echo "== static: dashboard, Prometheus rules, failure notification"

dir="$WORK/monitoring"
mkdir -p "$dir"
py="$NIGHTCOPY_PKG_VENV/bin/python"
role="$REPO/packaging/ansible/roles/nightcopy"

cleanup_monitoring() {
  stop_pid "${MOTO_PID:-}"
  stop_pid "${HOOK_PID:-}"
}
trap cleanup_monitoring EXIT

monitoring_check() { "$py" "$PKG_TESTS_DIR/check_monitoring.py" "$@"; }

# --- the CloudWatch dashboard --------------------------------------------------------------------
check "dashboard: the six metrics of src/metrics.rs, SEARCH over InstanceId, grid, alarm, runbook links" \
  monitoring_check dashboard-layout

# Fake credentials for boto3's chain; never printed.
AWS_ACCESS_KEY_ID="AKIA$(random_hex 8)"
AWS_SECRET_ACCESS_KEY="$(random_hex 20)"
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
unset AWS_PROFILE AWS_SESSION_TOKEN
if [ -z "${NIGHTCOPY_MOTO:-}" ] || [ ! -x "$NIGHTCOPY_MOTO" ]; then
  fail "dashboard: PutDashboard and GetDashboard against moto" \
    "moto is not installed (NIGHTCOPY_MOTO='${NIGHTCOPY_MOTO:-}'; scripts/test-tools.sh installs it)"
elif ! start_moto "$dir/moto.log"; then
  fail "dashboard: PutDashboard and GetDashboard against moto" "moto did not start: $(tail -5 "$dir/moto.log")"
else
  check "dashboard: PutDashboard into CloudWatch (moto), GetDashboard gives the same body back" \
    monitoring_check dashboard-round-trip "http://127.0.0.1:$MOTO_PORT"
  stop_pid "$MOTO_PID"
fi

# One copy of each, in the role (which must be whole by itself); packaging/ links to it.
for f in aws/dashboard.json aws/render_dashboard.py systemd/nightcopy-notify; do
  check "packaging/$f is a link to the role's files/${f#*/}" \
    test "$(readlink -f "$REPO/packaging/$f")" = "$(readlink -f "$role/files/${f#*/}")"
done

# --- Prometheus ----------------------------------------------------------------------------------
promtool="${NIGHTCOPY_PROMTOOL:-}"
if [ -z "$promtool" ] || [ ! -x "$promtool" ]; then
  fail "promtool: check rules, check metrics, test rules" \
    "promtool is not installed (NIGHTCOPY_PROMTOOL='$promtool'; packaging/tests/install-tools.sh)"
else
  check "promtool check rules: packaging/prometheus/nightcopy.rules.yml" \
    "$promtool" check rules "$REPO/packaging/prometheus/nightcopy.rules.yml"
  # Exit 3 on a lint finding (a _total gauge, a unit that is not a base unit), not only on errors.
  check "promtool check metrics: the sample textfile (fixtures/nightcopy.prom), no lint finding" \
    bash -c "'$promtool' check metrics <'$PKG_TESTS_DIR/fixtures/nightcopy.prom'"
  # Run from its directory: the test file names the rules file relative to itself.
  check "promtool test rules: 26 h rule silent at 25 h, firing at 27 h; never succeeded; absent; errors" \
    bash -c "cd '$REPO/packaging/prometheus' && '$promtool' test rules nightcopy.rules.test.yml"
fi
check "Prometheus: fixture and rules use exactly the textfile names of src/metrics.rs" \
  monitoring_check prometheus-names

# --- failure notification: the units -------------------------------------------------------------
check "packaging/systemd/nightcopy-notify is executable" test -x "$REPO/packaging/systemd/nightcopy-notify"

# The shipped units with the drop-in docs/operations.md gives for a hand install, binaries pointed
# at the built nightcopy and the script in the tree. verify of a unit loads its drop-ins and the
# OnFailure= unit, instantiated: a bad key in any of them is a warning, and any output fails.
units="$dir/units"
mkdir -p "$units/nightcopy.service.d" "$units/nightcopy-worker.service.d"
cp "$REPO/packaging/systemd/nightcopy.service" "$REPO/packaging/systemd/nightcopy-worker.service" \
  "$REPO/packaging/systemd/nightcopy-notify@.service" "$units/"
sed -i "s#^ExecStart=[^ ]*#ExecStart=$NIGHTCOPY_BIN#" "$units/nightcopy.service" "$units/nightcopy-worker.service"
sed -i "s#^ExecStart=[^ ]*#ExecStart=$REPO/packaging/systemd/nightcopy-notify#" "$units/nightcopy-notify@.service"
dropin="$(grep -A1 -x '\[Unit\]' "$REPO/docs/operations.md" | grep -x 'OnFailure=nightcopy-notify@%n.service')"
expect "docs/operations.md: the drop-in names nightcopy-notify@%n.service" "$dropin" "OnFailure=nightcopy-notify@%n.service"
for u in nightcopy.service nightcopy-worker.service; do
  printf '[Unit]\n%s\n' "$dropin" >"$units/$u.d/notify.conf"
done
verify_quiet() {
  local out
  if ! out="$(cd "$units" && systemd-analyze verify "$@" 2>&1)" || [ -n "$out" ]; then
    echo "$out"
    return 1
  fi
}
check "systemd-analyze verify: nightcopy-notify@nightcopy.service.service (the template, instantiated)" \
  verify_quiet ./nightcopy-notify@nightcopy.service.service
check "systemd-analyze verify: nightcopy.service and the worker with their OnFailure= drop-ins" \
  verify_quiet ./nightcopy.service ./nightcopy-worker.service
level="$(systemd-analyze security --offline=true --no-pager "$units/nightcopy-notify@nightcopy.service.service" 2>&1 |
  sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')"
echo "       exposure of nightcopy-notify@nightcopy.service.service: ${level:-unknown}"
echo "exposure notify $level" >>"$WORK/measurements"
# Measured 1.1: below the backup units' 1.5, since it keeps no capability and has its own user
# namespace; what remains is the network it needs.
check "systemd-analyze security: notify exposure $level <= 1.5" \
  systemd-analyze security --offline=true --threshold=15 --no-pager "$units/nightcopy-notify@nightcopy.service.service"

# --- failure notification: the script ------------------------------------------------------------
# A fake nightcopy (prints a status JSON, as `nightcopy status --json` does, or fails as it does
# without a run), a fake systemctl (the failed unit's Result= and status), and a wrapper of curl
# that records its command line (the URL must never be on it).
bin="$dir/bin"
mkdir -p "$bin"
status_json="$dir/status.json"
cat >"$status_json" <<'EOF'
{
  "started": 1764554181,
  "ended": 1764556112,
  "outcome": "file-errors",
  "exit_code": 2,
  "figures": {
    "files_transferred": 214,
    "bytes_transferred": 3882795008,
    "checks": 1203377,
    "transfer_errors": 3,
    "elapsed_seconds": 1931.5,
    "scanned": 1203594,
    "excluded": 812,
    "skipped_special": 0,
    "skipped_symlinks": 4,
    "remote_only": 0,
    "vanished": 1
  },
  "last_success_started": 1764469790,
  "metrics_published": true,
  "seconds_since_start": 3930,
  "seconds_since_last_success": 88321
}
EOF
cat >"$bin/nightcopy" <<EOF
#!/bin/sh
[ "\$*" = "status --config /etc/nightcopy/pkgtest.yaml --json" ] || { echo "unexpected arguments: \$*" >&2; exit 64; }
if [ "\${FAKE_NO_RUN:-}" = 1 ]; then
  echo 'no run recorded in /var/lib/nightcopy yet ("pkgtest")' >&2
  exit 1
fi
cat '$status_json'
EOF
cat >"$bin/systemctl" <<'EOF'
#!/bin/sh
[ "${FAKE_NO_SYSTEMD:-}" = 1 ] && { echo "System has not been booted with systemd" >&2; exit 1; }
printf 'Result=exit-code\nExecMainStatus=2\n'
EOF
real_curl="$(command -v curl)"
cat >"$bin/curl" <<EOF
#!/bin/sh
printf '%s\n' "\$*" >>'$dir/curl-argv'
exec '$real_curl' "\$@"
EOF
chmod 755 "$bin/nightcopy" "$bin/systemctl" "$bin/curl"

# The webhook: records each request (method, path, Content-Type, body) as one JSON file; 200
# below /ok/, 404 elsewhere (not retried by curl, so the failure case takes no retry delays).
cat >"$dir/hook.py" <<'EOF'
import http.server, json, os, sys
out = sys.argv[2]
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        n = len(os.listdir(out))
        with open(os.path.join(out, f"{n:03}.json"), "w") as f:
            json.dump({"method": "POST", "path": self.path,
                       "content_type": self.headers.get("Content-Type"), "body": body}, f)
        self.send_response(200 if self.path.startswith("/ok/") else 404)
        self.end_headers()
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
EOF
mkdir -p "$dir/requests"
HOOK_PORT="$(free_port)"
python3 "$dir/hook.py" "$HOOK_PORT" "$dir/requests" >"$dir/hook.log" 2>&1 &
HOOK_PID=$!
if ! wait_for 15 curl -sf -o /dev/null "http://127.0.0.1:$HOOK_PORT/"; then
  fail "notify: start the local webhook" "$(cat "$dir/hook.log")"
fi
token="$(random_hex 16)"

# notify OUT [VAR=value ...] -- UNIT: the script with only these variables, its output in OUT.
notify() {
  local out="$1"
  shift
  local vars=()
  while [ "$1" != -- ]; do vars+=("$1"); shift; done
  shift
  env -i PATH="$bin:/usr/bin:/bin" NIGHTCOPY_CONFIG=/etc/nightcopy/pkgtest.yaml "${vars[@]}" \
    "$REPO/packaging/systemd/nightcopy-notify" "$@" >"$out" 2>&1
}
last_request() { find "$dir/requests" -name '*.json' | sort | tail -1; }
requests() { find "$dir/requests" -name '*.json' | wc -l; }
no_token() { ! grep -q "$token" "$@"; }

# 1. The webhook: one POST of the summary, as JSON.
: >"$dir/curl-argv"
if notify "$dir/url.out" "NIGHTCOPY_NOTIFY_URL=http://127.0.0.1:$HOOK_PORT/ok/$token" -- nightcopy.service; then
  pass "notify: NIGHTCOPY_NOTIFY_URL: exit 0"
else
  fail "notify: NIGHTCOPY_NOTIFY_URL: exit 0" "$(cat "$dir/url.out")"
fi
expect "notify: one request, a POST of application/json to the URL's path" \
  "$(requests) $("$py" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["method"], r["path"], r["content_type"])' "$(last_request)" 2>&1)" \
  "1 POST /ok/$token application/json"
"$py" -c 'import json,sys; open(sys.argv[2], "w").write(json.load(open(sys.argv[1]))["body"])' "$(last_request)" "$dir/url-body.json" 2>/dev/null
check "notify: the body is the summary: unit, host, Result=, exit status, nightcopy status --json" \
  monitoring_check notify-body "$dir/url-body.json" nightcopy.service exit-code 2 "$status_json"
check "notify: the URL's token is in no output and on no command line" no_token "$dir/url.out" "$dir/curl-argv"

# 1b. A ~/.curlrc is not read (curl -q): the service's home may be writable by it, and a proxy
# set there would take the summary elsewhere (here: to a closed port, so the POST would fail).
mkdir -p "$dir/home"
printf 'proxy = "http://127.0.0.1:1/"\n' >"$dir/home/.curlrc"
: >"$dir/curl-argv"
before="$(requests)"
if notify "$dir/curlrc.out" "HOME=$dir/home" "NIGHTCOPY_NOTIFY_URL=http://127.0.0.1:$HOOK_PORT/ok/$token" -- nightcopy.service; then
  pass "notify: a ~/.curlrc setting a proxy is not read: exit 0"
else
  fail "notify: a ~/.curlrc setting a proxy is not read: exit 0" "$(cat "$dir/curlrc.out")"
fi
expect "notify: with a ~/.curlrc, one request reached the webhook; curl's first argument is -q" \
  "$(($(requests) - before)) $(cut -d' ' -f1 "$dir/curl-argv" | sort -u | tr '\n' ' ')" "1 -q "

# 2. The command: the same summary on its stdin.
if notify "$dir/cmd.out" "NIGHTCOPY_NOTIFY_COMMAND=cat >\"\$NOTIFY_OUT\"" "NOTIFY_OUT=$dir/cmd-body.json" -- nightcopy.service; then
  pass "notify: NIGHTCOPY_NOTIFY_COMMAND: exit 0"
else
  fail "notify: NIGHTCOPY_NOTIFY_COMMAND: exit 0" "$(cat "$dir/cmd.out")"
fi
check "notify: the command read the same summary on its stdin" \
  monitoring_check notify-body "$dir/cmd-body.json" nightcopy.service exit-code 2 "$status_json"

# 3. No run recorded, no systemd, a unit name with a backslash: still valid JSON, saying why.
if notify "$dir/norun.out" FAKE_NO_RUN=1 FAKE_NO_SYSTEMD=1 "NIGHTCOPY_NOTIFY_COMMAND=cat >\"\$NOTIFY_OUT\"" \
  "NOTIFY_OUT=$dir/norun-body.json" -- 'nightcopy\x2dtest.service'; then
  check "notify: without a run record: status null, nightcopy's message, Result= null" \
    monitoring_check notify-body "$dir/norun-body.json" 'nightcopy\x2dtest.service' null null \
    'null:no run recorded in /var/lib/nightcopy yet ("pkgtest")'
else
  fail "notify: without a run record the summary is still sent" "$(cat "$dir/norun.out")"
fi

# 4. Both set, the webhook refusing: exit 1, naming the URL's variable but not the URL; the
# command is still run.
before="$(requests)"
rm -f "$dir/both-body.json"
if notify "$dir/refused.out" "NIGHTCOPY_NOTIFY_URL=http://127.0.0.1:$HOOK_PORT/refused/$token" \
  "NIGHTCOPY_NOTIFY_COMMAND=cat >\"\$NOTIFY_OUT\"" "NOTIFY_OUT=$dir/both-body.json" -- nightcopy.service; then
  fail "notify: a webhook answering 404 fails the script" "$(cat "$dir/refused.out")"
else
  check "notify: a webhook answering 404: exit 1, 'POST to NIGHTCOPY_NOTIFY_URL failed', no token" bash -c "
    grep -q 'the POST to NIGHTCOPY_NOTIFY_URL failed (curl exit 22)' '$dir/refused.out' && ! grep -q '$token' '$dir/refused.out'"
fi
expect "notify: the refused webhook was tried once, the command still ran" \
  "$(($(requests) - before)) $(test -s "$dir/both-body.json" && echo ran)" "1 ran"

# 5. Plain http off loopback is refused before anything is sent; so is user info on loopback.
for url in "http://192.0.2.1/hook/$token" "http://localhost:1@192.0.2.1/hook/$token"; do
  : >"$dir/curl-argv"
  if notify "$dir/insecure.out" "NIGHTCOPY_NOTIFY_URL=$url" -- nightcopy.service; then
    fail "notify: ${url%%/hook/*}/… is refused" "$(cat "$dir/insecure.out")"
  else
    check "notify: ${url%%/hook/*}/… is refused, nothing sent, the URL not printed" bash -c "
      grep -q 'must be https://' '$dir/insecure.out' && [ ! -s '$dir/curl-argv' ] && ! grep -q '$token' '$dir/insecure.out'"
  fi
done

# 6. Nothing configured: exit 1, saying so (the notify unit then shows failed).
if notify "$dir/none.out" -- nightcopy.service; then
  fail "notify: nothing configured fails" "$(cat "$dir/none.out")"
else
  check "notify: nothing configured: exit 1, 'was NOT reported'" grep -q "was NOT reported" "$dir/none.out"
fi
