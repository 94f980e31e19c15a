#!/usr/bin/env bash
# make demo: a whole nightcopy run against a local S3-compatible server (s3s-fs on 127.0.0.1),
# over a generated sample tree; then a second run that finds nothing to do, and a listing of the
# bucket. Everything lives in a temp dir that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NIGHTCOPY_S3S_FS:?run through 'make demo' (it installs the local server first)}"
: "${NIGHTCOPY_PYTHON:?run through 'make demo'}"
BIN=${NIGHTCOPY_BIN:-target/debug/nightcopy}

work=$(mktemp -d /tmp/nightcopy-demo.XXXXXX)
cleanup() { [ -n "${server:-}" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port=$("$NIGHTCOPY_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
key=demo$RANDOM$RANDOM
secret=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
mkdir -p "$work/s3/demo-bucket" "$work/state"
"$NIGHTCOPY_S3S_FS" --host 127.0.0.1 --port "$port" --access-key "$key" --secret-key "$secret" "$work/s3" \
  >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

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
YAML

export AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null

echo; echo "== nightcopy check-config"
"$BIN" check-config --config "$work/config.yaml" | head -12; echo "  ..."
echo; echo "== first run"
"$BIN" run --config "$work/config.yaml"; echo "exit code $?"
echo; echo "== second run (nothing changed)"
"$BIN" run --config "$work/config.yaml"; echo "exit code $?"
echo; echo "== a local delete is never propagated"
rm "$src/docs/reports/r1.txt"
"$BIN" run --config "$work/config.yaml"; echo "exit code $?"

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
