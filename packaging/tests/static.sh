#!/usr/bin/env bash
# Checks that need no running systemd: the units (systemd-analyze verify, security exposure,
# calendar), the role's templates against packaging/systemd/ and the config template's optional
# sections, the AWS documents (the JSON ones and the CloudFormation templates of the bucket and of
# scale-out, with cfn-lint), ansible-lint and a lint of these scripts
# (shellcheck); at its end monitoring.sh (the dashboard against moto, the Prometheus rules with
# promtool, the failure notification).
# Run by run.sh, which sets up the environment (NIGHTCOPY_BIN, the venv, WORK).
set -uo pipefail
source "$(dirname "$0")/lib.sh"

echo "== static: units, templates, AWS documents, lint"

units="$WORK/static"
mkdir -p "$units"

# render VARIANT [-e k=v ...]: the role's templates with its defaults plus the overrides.
render() {
  local out="$units/$1"
  shift
  mkdir -p "$out"
  ansible_env ansible-playbook -i localhost, "$PKG_TESTS_DIR/render-units.yml" \
    -e "ansible_python_interpreter=$NIGHTCOPY_PKG_VENV/bin/python" -e "out_dir=$out" "$@" \
    >"$out.log" 2>&1 || { echo "rendering $out failed:"; tail -20 "$out.log"; return 1; }
}

# The binary must exist for verify (it checks ExecStart=), so point the units at the built one
# (the nightly unit and the worker's, which every rendering has), and the failure report's
# template at the script in the tree.
point_at_binary() {
  local u
  for u in nightcopy.service nightcopy-worker.service; do
    [ -f "$1/$u" ] && sed -i "s#^ExecStart=[^ ]*#ExecStart=$NIGHTCOPY_BIN#" "$1/$u"
  done
  [ -f "$1/nightcopy-notify@.service" ] &&
    sed -i "s#^ExecStart=[^ ]*#ExecStart=$REPO/packaging/systemd/nightcopy-notify#" "$1/nightcopy-notify@.service"
  return 0
}

# verify_units DIR: `systemd-analyze verify` of every unit in DIR must pass and say nothing
# (unknown or misspelled keys are only warnings, exit 0).
verify_units() {
  local out
  if ! out="$(cd "$1" && systemd-analyze verify ./*.service ./*.timer 2>&1)" ||
    [ -n "$out" ]; then
    echo "$out"
    return 1
  fi
}

# exposure DIR [UNIT]: systemd-analyze's overall exposure level of the service, e.g. 1.5.
exposure() {
  systemd-analyze security --offline=true --no-pager "$1/${2:-nightcopy.service}" 2>&1 |
    sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p'
}

mkdir -p "$units/shipped"
cp "$REPO/packaging/systemd/nightcopy.service" "$REPO/packaging/systemd/nightcopy.timer" \
  "$REPO/packaging/systemd/nightcopy-worker.service" "$REPO/packaging/systemd/nightcopy-notify@.service" \
  "$units/shipped/"
point_at_binary "$units/shipped"
check "systemd-analyze verify: packaging/systemd units" verify_units "$units/shipped"

level="$(exposure "$units/shipped")"
echo "       exposure of packaging/systemd/nightcopy.service: ${level:-unknown}"
echo "exposure capability $level" >>"$WORK/measurements"
# --threshold is on systemd's 0-100 scale: 20 means 2.0. It exits non-zero above it.
check "systemd-analyze security: exposure $level <= 2.0" \
  systemd-analyze security --offline=true --threshold=20 --no-pager "$units/shipped/nightcopy.service"
worker_level="$(exposure "$units/shipped" nightcopy-worker.service)"
echo "       exposure of packaging/systemd/nightcopy-worker.service: ${worker_level:-unknown}"
echo "exposure worker $worker_level" >>"$WORK/measurements"
check "systemd-analyze security: worker exposure $worker_level <= 2.0" \
  systemd-analyze security --offline=true --threshold=20 --no-pager "$units/shipped/nightcopy-worker.service"

# The worker runs with the nightly unit's user, sandbox and limits (the role includes the same
# blocks in both templates; a hand install gets these two files): every directive is the same
# but those that make it a long-running worker instead of a nightly run.
directives() {
  grep -vE '^(#|$|\[|Description=|ExecStart=|SuccessExitStatus=|Restart=|RestartSec=|RestartPreventExitStatus=|RuntimeMaxSec=|StartLimitIntervalSec=|WantedBy=)' "$1"
}
check "worker unit: the nightly unit's user, sandbox and limits, line for line" \
  diff -u <(directives "$REPO/packaging/systemd/nightcopy.service") \
  <(directives "$REPO/packaging/systemd/nightcopy-worker.service")
check "worker unit: restarted on failure every 30s without a start limit, no runtime limit" bash -c "
  f='$REPO/packaging/systemd/nightcopy-worker.service'
  grep -qx 'Restart=on-failure' \"\$f\" && grep -qx 'RestartSec=30s' \"\$f\" &&
  grep -qx 'StartLimitIntervalSec=0' \"\$f\" && ! grep -q '^RuntimeMaxSec=' \"\$f\" &&
  grep -qx 'WantedBy=multi-user.target' \"\$f\" &&
  grep -qx 'ExecStart=/usr/local/bin/nightcopy worker --config /etc/nightcopy/config.yaml' \"\$f\""

check "systemd-analyze calendar: the default schedule is valid" \
  systemd-analyze calendar --iterations=2 '*-*-* 02:00:00'
next="$(systemd-analyze calendar '*-*-* 02:00:00' 2>/dev/null | sed -n 's/.*Next elapse: [A-Za-z]* [0-9-]* \([0-9:]*\).*/\1/p')"
expect "systemd-analyze calendar: the default schedule elapses at 02:00:00" "$next" "02:00:00"

# The shipped units are the role's templates rendered with its defaults (from [Unit] on; the
# header comments differ: one says Ansible manages the file).
body() { sed -n '/^\[Unit\]/,$p' "$1"; }
if render defaults; then
  for u in nightcopy.service nightcopy.timer nightcopy-notify@.service; do
    check "template equals packaging/systemd/$u with the role's defaults" \
      diff -u <(body "$REPO/packaging/systemd/$u") <(body "$units/defaults/$u")
  done
  check "single mode: the config has no distribute: section" \
    bash -c "! grep -q '^distribute:' '$units/defaults/config.yaml'"
  check "defaults: the config has no small-files: or object-lock: (nightcopy's own rule, no lock)" \
    bash -c "! grep -qE '^  (small-files|object-lock):' '$units/defaults/config.yaml'"
else
  fail "render the role's templates with its defaults"
fi

# Scale-out: the worker's unit and config, from the role's defaults plus the mode and the queues.
queue=https://sqs.eu-west-1.amazonaws.com/111122223333/nightcopy
if render worker -e nightcopy_mode=worker -e "nightcopy_distribute_queue_url=$queue-work" \
  -e "nightcopy_distribute_results_queue_url=$queue-results" \
  -e "nightcopy_distribute_dead_letter_queue_url=$queue-work-dlq"; then
  check "worker template equals packaging/systemd/nightcopy-worker.service (mode worker)" \
    diff -u <(body "$REPO/packaging/systemd/nightcopy-worker.service") <(body "$units/worker/nightcopy-worker.service")
  expect "worker config: the distribute: section, every key, strings as JSON" \
    "$("$NIGHTCOPY_PKG_VENV/bin/python" -c 'import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))["distribute"], sort_keys=True))' "$units/worker/config.yaml")" \
    "{\"batch-bytes\": \"1GiB\", \"batch-files\": 20, \"dead-letter-queue-url\": \"$queue-work-dlq\", \"deadline\": \"6h\", \"max-queued\": 10000, \"queue-url\": \"$queue-work\", \"results-queue-url\": \"$queue-results\", \"visibility-timeout\": \"5min\"}"
  # Needs a binary that knows distribute: (the scale-out release on); the role's validate: runs
  # the same command before it installs this file on a coordinator or worker.
  check "worker config: nightcopy check-config accepts it" \
    "$NIGHTCOPY_BIN" check-config --config "$units/worker/config.yaml"
  point_at_binary "$units/worker"
  check "systemd-analyze verify: the worker's rendering" verify_units "$units/worker"
else
  fail "render the templates with nightcopy_mode=worker"
fi

# The storage class of small files and Object Lock: rendered only when set, every key written
# (storage-class too when left out), and read back by nightcopy as given.
destination() {
  "$NIGHTCOPY_BIN" check-config --config "$1" | "$NIGHTCOPY_PKG_VENV/bin/python" -c '
import json, sys, yaml
d = yaml.safe_load(sys.stdin)["destination"]
print(json.dumps({k: d.get(k) for k in ("storage-class", "small-files", "object-lock")}, sort_keys=True))'
}
if render lock -e '{"nightcopy_storage_class": "GLACIER_IR", "nightcopy_small_files": {"below": "256KiB", "storage_class": "STANDARD_IA"}, "nightcopy_object_lock": {"mode": "COMPLIANCE", "retain": "30d"}}'; then
  check "small files and Object Lock: nightcopy check-config accepts the config" \
    "$NIGHTCOPY_BIN" check-config --config "$units/lock/config.yaml"
  expect "small files and Object Lock: both sections in the file, strings as JSON" \
    "$(grep -E '^  (small-files|object-lock):|^    (below|storage-class|mode|retain):' "$units/lock/config.yaml" | tr '\n' '|')" \
    '  small-files:|    below: "256KiB"|    storage-class: "STANDARD_IA"|  object-lock:|    mode: "COMPLIANCE"|    retain: "30d"|'
  expect "small files and Object Lock: as nightcopy reads them" "$(destination "$units/lock/config.yaml" 2>&1)" \
    '{"object-lock": {"mode": "COMPLIANCE", "retain": "30days"}, "small-files": {"below": "256KiB", "storage-class": "STANDARD_IA"}, "storage-class": "GLACIER_IR"}'
else
  fail "render the config with small files and Object Lock"
fi
if render small-off -e nightcopy_storage_class=STANDARD_IA -e '{"nightcopy_small_files": {"below": 0}}'; then
  expect "small files below 0: the rule off, not nightcopy's 89KiB; no Object Lock" "$(destination "$units/small-off/config.yaml" 2>&1)" \
    '{"object-lock": null, "small-files": {"below": "0", "storage-class": "STANDARD"}, "storage-class": "STANDARD_IA"}'
  check "small files without storage_class: STANDARD written into the file" \
    grep -qx '    storage-class: "STANDARD"' "$units/small-off/config.yaml"
else
  fail "render the config with small files below 0"
fi

# Variants the role can render: each must still verify, and the sandbox must follow the source.
if render root -e nightcopy_run_as=root; then
  point_at_binary "$units/root"
  check "systemd-analyze verify: run as root" verify_units "$units/root"
  check "run as root: no User=nightcopy, no ambient capability, bounding set kept" bash -c "
    ! grep -q '^User=nightcopy' '$units/root/nightcopy.service' &&
    ! grep -q '^AmbientCapabilities=' '$units/root/nightcopy.service' &&
    grep -qx 'User=root' '$units/root/nightcopy.service' &&
    grep -qx 'CapabilityBoundingSet=CAP_DAC_READ_SEARCH' '$units/root/nightcopy.service'"
  root_level="$(exposure "$units/root")"
  echo "       exposure when run as root: ${root_level:-unknown}"
  echo "exposure root $root_level" >>"$WORK/measurements"
  check "run as root: the worker unit too" bash -c "
    grep -qx 'User=root' '$units/root/nightcopy-worker.service' &&
    ! grep -q '^AmbientCapabilities=' '$units/root/nightcopy-worker.service'"
else
  fail "render the templates with nightcopy_run_as=root"
fi

if render home -e nightcopy_source_path=/home -e nightcopy_metrics_textfile=/var/lib/node_exporter/textfile/nightcopy.prom \
  -e '{"nightcopy_environment": {"HTTPS_PROXY": "http://proxy.example.internal:3128/%40x"}}' \
  -e nightcopy_io_scheduling_class=best-effort -e nightcopy_environment_file=/etc/nightcopy/credentials.env; then
  point_at_binary "$units/home"
  check "systemd-analyze verify: source /home, textfile, environment, best-effort I/O" verify_units "$units/home"
  check "source /home: ProtectHome=read-only, RequiresMountsFor=/home (both services)" bash -c "
    for u in nightcopy.service nightcopy-worker.service; do
      grep -qx 'ProtectHome=read-only' '$units/home/'\$u &&
      grep -qx 'RequiresMountsFor=/home' '$units/home/'\$u || exit 1
    done"
  check "textfile: its directory is ReadWritePaths=" \
    grep -qx 'ReadWritePaths=/var/lib/node_exporter/textfile' "$units/home/nightcopy.service"
  # systemd itself reads the value back: % must have become %% in the file.
  check "environment: % escaped, value intact for systemd" bash -c "
    cd '$units/home' && grep -qx 'Environment=\"HTTPS_PROXY=http://proxy.example.internal:3128/%%40x\"' nightcopy.service"
  check "best-effort I/O: IOSchedulingPriority written" \
    grep -qx 'IOSchedulingPriority=7' "$units/home/nightcopy.service"
else
  fail "render the templates with a source below /home"
fi
if render root-fs -e nightcopy_source_path=/; then
  check "source /: ProtectHome=read-only (never hide /home from a backup of /)" \
    grep -qx 'ProtectHome=read-only' "$units/root-fs/nightcopy.service"
else
  fail "render the templates with source /"
fi

# The AWS documents. The venv's Python: reading the CloudFormation templates needs PyYAML.
aws_check() { "$NIGHTCOPY_PKG_VENV/bin/python" "$PKG_TESTS_DIR/check_aws.py" "$1"; }
check "aws: every JSON document parses" aws_check parse
check "aws: no policy (JSON or the templates) allows s3:Delete*, a retention bypass, s3:*, sqs:*, a queue change or *" aws_check no-delete
check "aws: instance policy is least privilege and names the prefix" aws_check instance-policy
check "aws: restore policy reads and thaws the prefix; nothing else grants s3:RestoreObject, the bucket policy denies it to the backup role" aws_check restore-policy
check "aws: bucket policy requires TLS, only the role writes, levels split, retention set but never lifted" aws_check bucket-policy
check "aws: lifecycle aborts incomplete multipart uploads after 7 days" aws_check lifecycle
check "aws: bucket.yaml is versioned, Object Lock, private, encrypted, lifecycle.json's rule, retained" aws_check bucket-template
check "aws: alarm JSON is docs/metrics.md's alarm, within CloudWatch limits" aws_check alarm
# cfn-lint exits non-zero on warnings as well as errors (its exit code is a bit mask).
for template in bucket.yaml scale-out.yaml; do
  check "cfn-lint: packaging/aws/$template, no error or warning" \
    "$NIGHTCOPY_PKG_VENV/bin/cfn-lint" --format parseable "$REPO/packaging/aws/$template"
done
check "aws: scale-out roles are the instance policy with one change each, only their SQS calls, only their key" \
  aws_check scale-out-roles
check "aws: scale-out queues redrive after 2 receives, 4/14 days, SSE, TLS; backlog per worker" aws_check scale-out-queues

check "shellcheck: packaging/tests/*.sh" bash -c "cd '$PKG_TESTS_DIR' && shellcheck -x -s bash ./*.sh"
check "shellcheck: packaging/systemd/nightcopy-notify (POSIX sh, as installed)" \
  shellcheck -s sh "$REPO/packaging/systemd/nightcopy-notify"

# Ansible: lint (production profile, from packaging/ansible/.ansible-lint) and syntax per inventory.
lint() { (cd "$REPO/packaging/ansible" && ansible_env ansible-lint --nocolor -q); }
check "ansible-lint: production profile clean" lint
syntax() { (cd "$REPO/packaging/ansible" && ansible_env ansible-playbook -i "inventories/$1" site.yml --syntax-check); }
for inv in beta prod; do
  check "ansible-playbook --syntax-check with inventories/$inv" syntax "$inv"
done

# The dashboard, the Prometheus rules and the failure notification: their own script, which
# starts moto and a webhook on 127.0.0.1 and stops them again.
bash "$PKG_TESTS_DIR/monitoring.sh" || fail "monitoring.sh exited $? before its end"
