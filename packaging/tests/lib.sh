# Shared by the packaging test scripts (sourced, not run): how a check is recorded, bounded waits,
# free ports, and helpers that start servers on 127.0.0.1 only.
#
# Every check ends as one line in $NIGHTCOPY_PKG_RESULTS ("PASS name" or "FAIL name"), which
# run.sh counts; the scripts themselves go on after a failure, so one run shows every problem.

# HTTP_PID and MOTO_PID, set below, are used by the scripts that source this file.
# shellcheck disable=SC2034
: "${NIGHTCOPY_PKG_RESULTS:?run the packaging tests through packaging/tests/run.sh}"

PKG_TESTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$PKG_TESTS_DIR/../.." && pwd)"

pass() {
  echo "PASS $1" >>"$NIGHTCOPY_PKG_RESULTS"
  echo "  ok   $1"
}

# fail NAME [DETAIL...]: DETAIL is printed under the name (why it failed).
fail() {
  local name="$1"
  shift
  echo "FAIL $name" >>"$NIGHTCOPY_PKG_RESULTS"
  echo "  FAIL $name"
  if [ $# -gt 0 ]; then
    printf '%s\n' "$@" | sed 's/^/       /'
  fi
}

# check NAME COMMAND...: passes when COMMAND exits 0; on failure shows its output.
check() {
  local name="$1"
  shift
  local out
  if out="$("$@" 2>&1)"; then
    pass "$name"
  else
    fail "$name" "$(printf '%s\n' "$out" | tail -n 25)"
  fi
}

# expect NAME ACTUAL EXPECTED: string equality, showing both on failure.
expect() {
  if [ "$2" = "$3" ]; then
    pass "$1"
  else
    fail "$1" "expected: $3" "actual:   $2"
  fi
}

# wait_for SECONDS COMMAND...: runs COMMAND every 0.2 s until it succeeds; 1 on timeout.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A fresh random value for a fake credential: made here, used by the servers and never printed.
random_hex() {
  od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}

# serve_dir DIR: an HTTP server for DIR on 127.0.0.1; sets HTTP_PORT and HTTP_PID.
serve_dir() {
  HTTP_PORT="$(free_port)"
  python3 -m http.server --bind 127.0.0.1 --directory "$1" "$HTTP_PORT" >"$1.http.log" 2>&1 &
  HTTP_PID=$!
  wait_for 15 curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/" ||
    { echo "the artifact server did not start: $(cat "$1.http.log")" >&2; return 1; }
}

# start_moto LOGFILE: moto on 127.0.0.1; sets MOTO_PORT and MOTO_PID.
start_moto() {
  MOTO_PORT="$(free_port)"
  "$NIGHTCOPY_MOTO" -H 127.0.0.1 -p "$MOTO_PORT" >"$1" 2>&1 &
  MOTO_PID=$!
  wait_for 30 curl -s -o /dev/null "http://127.0.0.1:$MOTO_PORT/" ||
    { echo "moto did not start: $(tail -5 "$1")" >&2; return 1; }
}

# Ends a process this script started, by its PID, and reaps it.
stop_pid() {
  local pid="${1:-}"
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# ansible-playbook from the test venv, with the collections from the wheel and the repo's
# ansible.cfg. Fact caching and retry files stay out of the tree.
ansible_env() {
  env ANSIBLE_CONFIG="$REPO/packaging/ansible/ansible.cfg" \
    ANSIBLE_COLLECTIONS_PATH="$NIGHTCOPY_PKG_COLLECTIONS" \
    ANSIBLE_LOCAL_TEMP="$WORK/ansible-local" \
    ANSIBLE_HOME="$WORK/ansible-home" \
    ANSIBLE_NOCOLOR=1 \
    PATH="$NIGHTCOPY_PKG_VENV/bin:$PATH" \
    "$@"
}

# "changed=N" of the PLAY RECAP's lines, summed.
recap_changed() {
  awk '/ changed=/ { for (i = 1; i <= NF; i++) if ($i ~ /^changed=/) { split($i, a, "="); n += a[2] } } END { print n + 0 }' "$1"
}
