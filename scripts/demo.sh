#!/usr/bin/env bash
# make demo: a whole nightcopy run against a local S3-compatible server (s3s-fs) and a local
# CloudWatch endpoint (moto behind the CBOR translator the tests use), all on 127.0.0.1, over a
# generated sample tree: the first run, a catch-up run the guard skips, a forced rerun that finds
# nothing to do, a local delete that is not propagated, a change the next night; then `nightcopy
# status`, the snapshots, what changed between the last two, a restore of the latest compared with
# the source, the bucket listing and the six metrics read back from CloudWatch. Everything lives in a temp dir removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NIGHTCOPY_S3S_FS:?run through 'make demo' (it installs the local server first)}"
: "${NIGHTCOPY_PYTHON:?run through 'make demo'}"
: "${NIGHTCOPY_MOTO:?run through 'make demo'}"
BIN=${NIGHTCOPY_BIN:-target/debug/nightcopy}

work=$(mktemp -d /tmp/nightcopy-demo.XXXXXX)
cleanup() {
  for p in ${server:-} ${moto:-} ${cwproxy:-}; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

port=$("$NIGHTCOPY_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
key=demo$RANDOM$RANDOM
secret=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
mkdir -p "$work/s3/demo-bucket" "$work/state"
"$NIGHTCOPY_S3S_FS" --host 127.0.0.1 --port "$port" --access-key "$key" --secret-key "$secret" "$work/s3" \
  >"$work/server.log" 2>&1 &
server=$!
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; exit 1; }
wait_port "$port"

# CloudWatch: moto stores the metrics; the translator speaks the SDK's RPCv2-CBOR to it.
moto_port=$("$NIGHTCOPY_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$NIGHTCOPY_MOTO" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
moto=$!
wait_port "$moto_port"
"$NIGHTCOPY_PYTHON" tests/servers/cloudwatch_cbor_proxy.py --listen 127.0.0.1:0 --moto "http://127.0.0.1:$moto_port" \
  >"$work/cwproxy.out" 2>"$work/cwproxy.log" &
cwproxy=$!
for _ in $(seq 100); do [ -s "$work/cwproxy.out" ] && break; sleep 0.1; done
cw_port=$(head -n1 "$work/cwproxy.out" | tr -dc '0-9')
wait_port "$cw_port"

echo "== sample tree"
src="$work/tree"
mkdir -p "$src/docs/reports" "$src/photos/2026" "$src/.cache/junk" "$src/music/Élan vital"
for i in $(seq 1 12); do echo "report $i" > "$src/docs/reports/r$i.txt"; done
head -c 200000 /dev/urandom > "$src/photos/2026/IMG 0001.jpg"
head -c 20000000 /dev/urandom > "$src/photos/2026/video+raw.mov"   # multipart (> 8MiB threshold below)
echo "naïve café" > "$src/music/Élan vital/notes 100%.txt"
: > "$src/docs/empty"
echo junk > "$src/.cache/junk/x"
echo tmp > "$src/docs/draft.tmp"
printf '*.tmp\n' > "$work/exclude.txt"
find "$src" -type f | sed "s|$src/|  |" | sort

cat > "$work/config.yaml" <<YAML
source:
  path: $src
  exclude: ["**/.cache/**"]
  exclude-from: $work/exclude.txt
  require-mountpoint: false   # the demo tree is a plain directory
destination:
  bucket: demo-bucket
  prefix: host1/
  region: us-east-1
  endpoint-url: http://127.0.0.1:$port
  force-path-style: true
transfer:
  multipart-threshold: 8MiB
  part-size: 5MiB
state-dir: $work/state
metrics:
  cloudwatch: true
  namespace: NightcopyDemo
  endpoint-url: http://127.0.0.1:$cw_port
  dimensions:
    Environment: demo
guard:
  min-interval: 20h
YAML

export AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null

echo; echo "== nightcopy check-config"
"$BIN" check-config --config "$work/config.yaml" | head -12; echo "  ..."
echo; echo "== first run"
"$BIN" run --config "$work/config.yaml"; echo "exit code $?"
echo; echo "== the timer fires again after a reboot: the guard skips it (exit 75 is not a failure)"
"$BIN" run --config "$work/config.yaml" || echo "exit code $?"
echo; echo "== forced rerun (nothing changed: 0 PUTs)"
"$BIN" run --force --config "$work/config.yaml"; echo "exit code $?"
echo; echo "== a local delete is never propagated"
rm "$src/docs/reports/r1.txt"
"$BIN" run --force --config "$work/config.yaml"; echo "exit code $?"
echo; echo "== the next night: a report revised, a symlink and a new directory"
echo "report 2, revised" > "$src/docs/reports/r2.txt"
ln -s reports/r2.txt "$src/docs/latest-report"
mkdir -p "$src/docs/minutes" && echo "minutes of the 5th" > "$src/docs/minutes/05.txt"
"$BIN" run --force --config "$work/config.yaml"; echo "exit code $?"
echo; echo "== nightcopy status"
"$BIN" status --config "$work/config.yaml"
echo; echo "== nightcopy snapshots: one per completed run, each the tree that run saw"
"$BIN" snapshots --config "$work/config.yaml"
echo; echo "== nightcopy diff: what changed between the last two"
"$BIN" diff --config "$work/config.yaml"
echo; echo "== nightcopy restore (the latest snapshot) into an empty directory, compared with the source"
"$BIN" restore --config "$work/config.yaml" --to "$work/restored"; echo "exit code $?"
# The excluded paths were never backed up; everything else must be there, symlink included.
if diff -r --no-dereference -x .cache -x '*.tmp' "$src" "$work/restored"; then
  echo "  the restored tree is the source as the last run saw it (docs/reports/r1.txt, deleted"
  echo "  before, is still in the bucket but not in the tree: 'restore --include-deleted' brings it)"
else
  echo "  the restored tree differs from the source" >&2
  exit 1
fi

echo; echo "== bucket s3://demo-bucket/host1/ (listed with boto3)"
"$NIGHTCOPY_PYTHON" - "$port" <<'PY'
import sys, boto3
from botocore import handlers
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1")
# botocore asks for URL-encoded keys and decodes '+' as a space; s3s-fs leaves '+' unencoded,
# so keep the keys as sent ("video+raw.mov" would otherwise print as "video raw.mov").
s3.meta.events.unregister("before-parameter-build.s3.ListObjectsV2", handlers.set_list_objects_encoding_type_url)
s3.meta.events.unregister("after-call.s3.ListObjectsV2", handlers.decode_list_object_v2)
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="demo-bucket", Prefix="host1/"):
    for o in page.get("Contents", []):
        print(f"  {o['Size']:>10}  {o['Key']}")
PY

echo; echo "== CloudWatch namespace NightcopyDemo, read back with GetMetricData (one point per run)"
"$NIGHTCOPY_PYTHON" - "$moto_port" <<'PY'
import sys, datetime, boto3
cw = boto3.client("cloudwatch", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1")
names = ["LastSuccess", "FilesTransferred", "BytesTransferred", "Checks", "TransferErrors", "ElapsedSeconds"]
dims = {m["MetricName"]: m["Dimensions"] for m in cw.list_metrics(Namespace="NightcopyDemo")["Metrics"]}
now = datetime.datetime.now(datetime.timezone.utc)
def query(i, n, stat):
    return {"Id": f"{stat.lower()}{i}", "ReturnData": True, "MetricStat": {"Period": 60, "Stat": stat,
            "Metric": {"Namespace": "NightcopyDemo", "MetricName": n, "Dimensions": dims[n]}}}
queries = [query(i, n, stat) for i, n in enumerate(names) for stat in ("SampleCount", "Sum")]
res = cw.get_metric_data(MetricDataQueries=queries, StartTime=now - datetime.timedelta(minutes=10),
                         EndTime=now + datetime.timedelta(minutes=1))["MetricDataResults"]
print("  dimensions:", ", ".join(f"{d['Name']}={d['Value']}" for d in dims["LastSuccess"]))
for i, n in enumerate(names):
    count, total = (sum(r["Values"]) for r in res[2 * i: 2 * i + 2])
    print(f"  {n:<17} {count:g} points (one per published run), sum {total:g}")
PY
