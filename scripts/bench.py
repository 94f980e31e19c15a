#!/usr/bin/env python3
"""make bench: nightcopy side by side with rclone, s5cmd and `aws s3 sync` on the same local S3
server (Garage, 127.0.0.1) and the same generated trees.

Each tool copies into a bucket of its own. For every run the table gets wall seconds, CPU seconds
(user + system of the tool's process and its children, from wait4), peak RSS, and the requests the
server counted by type (Garage's own request counters, read from its admin /metrics endpoint before
and after, so counting costs the tools nothing). Medians over --reps runs; ratios are peer ÷
nightcopy. The incremental scenarios run a second time through a proxy that delays every request
(--latency-ms), because loopback has no latency and real S3 has tens of milliseconds.

Trees are generated here, deterministic from --seed:
  small    20,000 files of 1-64 KiB in 300 directories         (full copy)
  large    4 files of 256 MiB                                   (full copy, multipart)
  incr     100,000 files of 0.25-4 KiB in 1,000 directories     (nothing changed; 1% changed)
  million  1,000,000 files of 0-64 bytes in 10,000 directories (nightcopy's memory, vs incr)
--quick divides the file counts by 10 and the large files by 4 and skips `million`.

The scale-out scenario (`--only scaleout`) runs a distributed copy — a coordinator and 1, 2 and 4
`nightcopy worker` processes over SQS (moto on 127.0.0.1) — of
  scale    4,000 files of 1-16 KiB in 40 directories
into Garage behind the delaying proxy, with transfer.concurrency 4 per worker, so that the
workers' concurrency, not this machine's cores, is what is measured; and (full mode) the
coordinator over the million-file tree, for its memory, with a stand-in for the workers that
answers every batch with a report (`StandInWorker`: nothing is read or uploaded), within
--coordinator-limit (default 1,800 s; 0 leaves it out; about 5.5 minutes here with
--coordinator-max-queued 40).

The slow-mount scenarios (`--only slowmount`) read the trees through scripts/slowfs.py, a FUSE
passthrough that sleeps --mount-delays milliseconds in every metadata operation with attribute
and entry caching off (a network filesystem client with cold caches), and count the operations
the kernel sent for each tool:
  slow-a   5,000 files of 0.1-4 KiB in 50 directories
  slow-b   20,000 files of 0.1-4 KiB in one directory
  slow-c   100,000 files of 0.1-4 KiB in 1,000 directories (memory; nightcopy and find only)
Each gets a full copy per tool (into its own bucket), then nothing-changed runs, and the bound
of the mount itself: 64 `stat`s in parallel saturate the FUSE daemon (which is Python, and
CPU-bound near a few thousand operations per second on 2 cores). slow-c runs at the first delay
only. Needs /dev/fuse and root; without them the scenario is skipped, and the report says so.

The restore scenarios (`--only restore`) read back what nightcopy wrote. Per tree, one
`nightcopy run` into a bucket of its own (not measured; if it fails, every tool gets a failed row
saying so), then each tool downloads that whole bucket into an empty directory of its own:
`nightcopy restore --to DIR` with the backup's config (its state directory, so the manifest's
SHA-256s), `rclone copy` and `s5cmd cp`, 16 transfers each; the peers leave out nightcopy's own
`.nightcopy/` objects. Every restored directory is then compared with the tree: the same regular
files, byte for byte, and nothing else. A difference, or a tool's non-zero exit, makes that run a
failed row, and the table names what differed; it is never a figure. The table adds files/s and
MiB/s. Trees:
  restore-small    the `small` tree, and its bound: get-parallel, s5cmd with 64 downloads in
                   flight (per-request latency hidden: what the server and the disk deliver)
  restore-large    the `large` tree
  restore-slow-a   `slow-a`, restored into a writable slow mount: scripts/slowfs.py --rw over an
                   empty directory, a new mount per run, at the first of --mount-delays (1 ms);
                   the table gets each tool's FUSE operations (and by kind under it), and the
                   mount's bound: 64 `cp`s side by side copying the tree in from the local disk
                   (write-parallel), whose operations per second give each tool's daemon bound
                   beside its latency bound (operations × delay ÷ 16). Needs /dev/fuse and root.
  restore-million  (not in --quick) the `million` tree, nightcopy only, once, for its memory,
                   from the `million` scenario's bucket when it ran (its backup is run again as a
                   nothing-changed run, so a first copy stopped at its limit is finished).

A run still going after RUN_LIMIT (300) seconds is stopped and reported as stopped; the
million-file first copy and restore get LONG_LIMIT (1,800), the coordinator's run
--coordinator-limit.

Writes a results block into docs/benchmarks.md (between the bench:begin/end markers) and the raw
figures to target/bench/results.json. Everything listens on 127.0.0.1 only.
"""

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = 16  # the same for every tool: the peers' usual "fast" setting
SLOW_SECONDS = 60  # a tool whose first run of a scenario took longer is not run again there
RUN_LIMIT = 300  # a run still going after this long is stopped and reported as such
LONG_LIMIT = 1800  # the million-file first copy (and a suggested --coordinator-limit)
ACCESS_KEY = "GK" + "b3e1c0ffee" * 2 + "0123"  # local test server only
SECRET_KEY = "5e" * 32


# ---------------------------------------------------------------------------------------------
# Trees


def tree_spec(name, quick):
    div = 10 if quick else 1
    if name == "small":
        return dict(files=20_000 // div, dirs=300 // div or 1, lo=1024, hi=64 * 1024)
    if name == "large":
        return dict(files=4 if not quick else 2, dirs=1,
                    lo=(64 if quick else 256) << 20, hi=(64 if quick else 256) << 20)
    if name == "incr":
        return dict(files=100_000 // div, dirs=1_000 // div, lo=256, hi=4096)
    if name == "million":
        return dict(files=1_000_000, dirs=10_000, lo=0, hi=64)
    if name == "scale":
        return dict(files=4_000 // div, dirs=40 // div or 1, lo=1024, hi=16 * 1024, flat=True)
    if name == "slow-a":
        return dict(files=5_000 // div, dirs=50 // div or 1, lo=100, hi=4096, flat=True)
    if name == "slow-b":
        return dict(files=20_000 // div, dirs=1, lo=100, hi=4096, flat=True)
    if name == "slow-c":
        return dict(files=100_000 // div, dirs=1_000 // div, lo=100, hi=4096, flat=True)
    raise ValueError(name)


def rel_path(i, spec):
    # Two directory levels, files spread evenly; names sort differently from their numbers
    # (x10 before x9) the way real names do. The slow-mount trees have one level.
    d = i % spec["dirs"]
    if spec.get("flat"):
        return f"d{d:04}/f{i}.dat"
    return f"d{d // 20:03}/e{d % 20:02}/f{i}.dat"


def generate(root, spec, seed):
    """Writes the tree; a marker file makes a finished tree reusable."""
    marker = root.parent / (root.name + ".complete")
    if marker.exists():
        return
    if root.exists():
        shutil.rmtree(root)
    rng = random.Random(seed)
    chunk = 8 << 20
    for i in range(spec["files"]):
        p = root / rel_path(i, spec)
        p.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(spec["lo"], spec["hi"])
        with open(p, "wb") as f:
            left = size
            while left:
                n = min(left, chunk)
                f.write(rng.randbytes(n))
                left -= n
    marker.write_text(json.dumps(spec))


def warm(root):
    """Reads every file once so every tool starts from the same (warm) page cache."""
    for dirpath, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                while f.read(8 << 20):
                    pass


def change_one_percent(root, spec, seed, rep):
    """Rewrites about 1% of the files with new content and size; a different 1% each rep."""
    rng = random.Random(f"{seed}-change-{rep}")
    picked = rng.sample(range(spec["files"]), max(1, spec["files"] // 100))
    for i in picked:
        p = root / rel_path(i, spec)
        p.write_bytes(rng.randbytes(rng.randint(spec["lo"], spec["hi"])))
    return len(picked)


def tree_bytes(root):
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 << 20), fb.read(8 << 20)
            if x != y:
                return False
            if not x:
                return True


def compare_trees(source, restored):
    """None when `restored` holds exactly `source`'s files (regular files, same relative paths,
    same bytes) and nothing else but directories; otherwise what differs, for the report."""
    def files(root):
        found = {}
        for dirpath, _, names in os.walk(root):
            for n in names:
                path = os.path.join(dirpath, n)
                found[os.path.relpath(path, root)] = os.lstat(path)
        return found

    want, got = files(source), files(restored)
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    differ = sorted(rel for rel in want.keys() & got.keys()
                    if not stat_is_file(got[rel]) or got[rel].st_size != want[rel].st_size
                    or not same_bytes(os.path.join(source, rel), os.path.join(restored, rel)))
    if not (missing or extra or differ):
        return None
    parts = [f"the restored tree is not the source: {len(got):,} files where it has {len(want):,}"]
    for what, rels in [("missing", missing), ("not in the source", extra), ("other bytes", differ)]:
        if rels:
            parts.append(f"{len(rels):,} {what} (e.g. {', '.join(rels[:3])})")
    return "; ".join(parts)


def stat_is_file(st):
    return (st.st_mode & 0o170000) == 0o100000


# ---------------------------------------------------------------------------------------------
# Servers


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, what, proc=None, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


class Garage:
    """A single-node Garage on 127.0.0.1 with one key that owns every bucket."""

    def __init__(self, binary, work):
        self.binary = binary
        self.dir = work / "garage"
        self.dir.mkdir(parents=True)
        self.s3_port, rpc, admin = free_port(), free_port(), free_port()
        self.admin_port = admin
        self.metrics_token = os.urandom(16).hex()
        self.conf = self.dir / "garage.toml"
        self.conf.write_text(f"""
metadata_dir = "{self.dir}/meta"
data_dir = "{self.dir}/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{os.urandom(32).hex()}"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:{self.s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{os.urandom(16).hex()}"
metrics_token = "{self.metrics_token}"
""")
        self.log = open(self.dir / "garage.log", "wb")
        self.proc = subprocess.Popen([binary, "-c", self.conf, "server"], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
        wait_port(self.s3_port, "garage", self.proc)
        wait_port(admin, "garage admin", self.proc)
        node = self.cli("node", "id", "-q").split("@")[0].strip()
        self.cli("layout", "assign", "-z", "dc1", "-c", "100G", node)
        self.cli("layout", "apply", "--version", "1")
        self.cli("key", "import", "--yes", "-n", "bench", ACCESS_KEY, SECRET_KEY)
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"

    def cli(self, *args):
        for attempt in range(50):
            r = subprocess.run([self.binary, "-c", self.conf, *args], capture_output=True, text=True)
            if r.returncode == 0:
                return r.stdout
            time.sleep(0.2)  # the layout takes a moment to settle after start
        sys.exit(f"garage {' '.join(args)} failed: {r.stderr.strip()}")

    def bucket(self, name):
        self.cli("bucket", "create", name)
        self.cli("bucket", "allow", "--read", "--write", "--owner", name, "--key", "bench")
        return name

    def requests(self):
        """Garage's S3 request counters by endpoint (PutObject, ListObjectsV2, ...)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/metrics",
                                     headers={"Authorization": f"Bearer {self.metrics_token}"})
        text = urllib.request.urlopen(req, timeout=10).read().decode()
        counts = {}
        for line in text.splitlines():
            m = re.match(r'api_s3_request_counter\{.*api_endpoint="([^"]+)".*\}\s+([0-9.e+]+)', line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + int(float(m.group(2)))
        return counts

    def stop(self):
        terminate(self.proc)


def terminate(proc):
    """SIGTERM, and SIGKILL after 10 s: a server must not outlive the bench."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def request_kinds(before, after):
    kinds = {"LIST": 0, "HEAD": 0, "PUT": 0, "GET": 0, "other": 0}
    for ep, n in after.items():
        d = n - before.get(ep, 0)
        if not d:
            continue
        if ep.startswith("List"):
            kinds["LIST"] += d
        elif ep == "HeadObject":
            kinds["HEAD"] += d
        elif ep in ("PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload"):
            kinds["PUT"] += d
        elif ep == "GetObject":
            kinds["GET"] += d
        else:
            kinds["other"] += d
    return kinds


class DelayProxy:
    """A TCP proxy that holds each HTTP request for `ms` before passing it on: one round trip of
    latency per request, as between an EC2 host and S3. A request starts when the client writes
    after the server has answered (keep-alive, no pipelining: what every tool here does)."""

    def __init__(self, upstream_port, ms, count_to=None):
        self.port = free_port()
        self.count_to = count_to
        self.proc = subprocess.Popen([sys.executable, __file__, "_proxy", str(self.port),
                                      str(upstream_port), str(ms), str(count_to or "")])
        wait_port(self.port, "delay proxy", self.proc)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self):
        """Ends the proxy; with `count_to`, returns the requests it passed by X-Amz-Target
        action (SQS's JSON protocol names the call there)."""
        self.proc.terminate()
        self.proc.wait()
        if self.count_to:
            return json.loads(Path(self.count_to).read_text())
        return None


# The action of an AWS JSON-protocol request: `X-Amz-Target: AmazonSQS.ReceiveMessage`.
TARGET = re.compile(rb"(?im)^x-amz-target:\s*[\w.]*?\.(\w+)\s*$")


def run_proxy(listen, upstream, ms, count_to=""):
    delay = ms / 1000
    counts = {}

    async def handle(creader, cwriter):
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            cwriter.close()
            return
        state = {"answered": True}

        async def up():
            while data := await creader.read(1 << 16):
                if state["answered"]:
                    state["answered"] = False
                    if count_to:
                        # The headers come in the request's first read (they are a few hundred
                        # bytes); a request without the header counts as "other".
                        m = TARGET.search(data.split(b"\r\n\r\n", 1)[0])
                        action = m.group(1).decode() if m else "other"
                        counts[action] = counts.get(action, 0) + 1
                    await asyncio.sleep(delay)
                swriter.write(data)
                await swriter.drain()
            swriter.close()

        async def down():
            while data := await sreader.read(1 << 16):
                state["answered"] = True
                cwriter.write(data)
                await cwriter.drain()
            cwriter.close()

        try:
            await asyncio.gather(up(), down())
        except (ConnectionError, OSError):
            pass
        finally:
            cwriter.close()
            swriter.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=512)
        async with server:
            await server.serve_forever()

    def stop(*_):
        if count_to:
            Path(count_to).write_text(json.dumps(counts))
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    asyncio.run(main())


class Moto:
    """moto's SQS on 127.0.0.1, for the scale-out scenario."""

    def __init__(self, peers_bin, work):
        self.port = free_port()
        self.log = open(work / "moto.log", "ab")
        self.proc = subprocess.Popen([str(Path(peers_bin) / "moto_server"), "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=self.log, stderr=self.log)
        wait_port(self.port, "moto", self.proc)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.aws = str(Path(peers_bin) / "aws")
        self.env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null"}

    def sqs(self, *args):
        out = subprocess.run([self.aws, "--endpoint-url", self.endpoint, "sqs", *args, "--output",
                              "json"], env=self.env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout) if out.stdout.strip() else {}

    def queues(self, name):
        dlq = self.sqs("create-queue", "--queue-name", f"{name}-dlq")["QueueUrl"]
        arn = self.sqs("get-queue-attributes", "--queue-url", dlq, "--attribute-names",
                       "QueueArn")["Attributes"]["QueueArn"]
        policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "2"})
        work = self.sqs("create-queue", "--queue-name", f"{name}-work", "--attributes",
                        json.dumps({"RedrivePolicy": policy}))["QueueUrl"]
        results = self.sqs("create-queue", "--queue-name", f"{name}-results")["QueueUrl"]
        return dict(work=work, results=results, dlq=dlq)

    def stop(self):
        terminate(self.proc)


class StandInWorker:
    """Answers every batch of a work queue with a report that its files were uploaded, without
    reading or uploading anything: for the coordinator's million-file memory, where real workers
    would make the run as long as 1,000,000 uploads through moto. Its reports are what a worker
    sends (queue.rs `Report`), with the SHA-256 of nothing, so the coordinator's figures and
    manifest of that run say "uploaded" for files that were not: only its memory, disk and
    requests are read from it. Two threads, boto3 (moto's own dependency)."""

    def __init__(self, moto, work, results, threads=2):
        import boto3
        self.work, self.results = work, results
        self.sqs = boto3.client("sqs", endpoint_url=moto.endpoint, region_name="us-east-1",
                                aws_access_key_id="bench", aws_secret_access_key="bench")
        self.done = threading.Event()
        self.answered = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.serve, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def serve(self):
        empty = hashlib.sha256(b"").hexdigest()
        while not self.done.is_set():
            got = self.sqs.receive_message(QueueUrl=self.work, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=1).get("Messages", [])
            if not got:
                continue
            reports = []
            for i, m in enumerate(got):
                b = json.loads(m["Body"])
                files = [dict(key=f["key"], path=f["path"], outcome="uploaded", size=f["size"],
                              mtime_ns=f["mtime_ns"], sha256=empty) for f in b["files"]]
                report = dict(run=b["run"], batch=b["batch"], worker="bench-stand-in", files=files)
                reports.append(dict(Id=str(i), MessageBody=json.dumps(report)))
            self.sqs.send_message_batch(QueueUrl=self.results, Entries=reports)
            self.sqs.delete_message_batch(QueueUrl=self.work, Entries=[
                dict(Id=str(i), ReceiptHandle=m["ReceiptHandle"]) for i, m in enumerate(got)])
            with self.lock:
                self.answered += len(got)

    def stop(self):
        self.done.set()
        for t in self.threads:
            t.join(30)
        return self.answered


class SlowMount:
    """scripts/slowfs.py over a tree: every metadata operation sleeps `delay_ms`, caches off.
    With `rw`, writable (`--rw`): writes go to `source`, and write operations sleep too."""

    def __init__(self, python, source, work, delay_ms, threads=64, rw=False, label=None):
        label = label or f"{source.name}-{delay_ms:g}ms"
        self.mountpoint = work / f"mnt-{label}"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.stats = work / f"slowfs-{label}.json"
        self.log = open(work / "slowfs.log", "ab")
        self.proc = subprocess.Popen(
            [python, str(REPO / "scripts/slowfs.py"), str(source), str(self.mountpoint),
             "--delay-ms", str(delay_ms), "--stats", str(self.stats), "--max-threads", str(threads)]
            + (["--rw"] if rw else []),
            stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline().decode().strip()
        if line != "ready":
            sys.exit(f"slowfs did not mount {self.mountpoint} (see {work / 'slowfs.log'})")
        self.delay_ms = delay_ms

    def _signal(self, sig):
        gen = json.loads(self.stats.read_text())["generation"]
        self.proc.send_signal(sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                doc = json.loads(self.stats.read_text())
                if doc["generation"] > gen:
                    return doc["ops"]
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        sys.exit("slowfs did not answer its stats signal")

    def reset(self):
        self._signal(signal.SIGUSR2)

    def ops(self):
        return self._signal(signal.SIGUSR1)

    def stop(self):
        subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


def fuse_usable():
    """Why the slow mount cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if os.geteuid() != 0:
        return "mounting needs root"
    return None


# ---------------------------------------------------------------------------------------------
# Tools


class Tools:
    def __init__(self, args, work):
        self.work = work
        self.nightcopy = args.nightcopy
        self.bin = Path(args.peers_bin)
        self.only = set(args.tools.split(",")) if args.tools else None
        self.aws_config = work / "aws-config"
        self.aws_config.write_text(
            "[default]\nregion = us-east-1\ns3 =\n"
            f"  max_concurrent_requests = {CONCURRENCY}\n  addressing_style = path\n")

    def names(self, scenario):
        # rclone's fast flags only change how it decides "unchanged": no use on an empty bucket.
        if scenario == "restore":
            # The peers of the restore are the two fast downloaders; the AWS CLI is not one.
            names = ["nightcopy", "rclone", "s5cmd"]
        elif scenario.startswith("full"):
            names = ["nightcopy", "rclone", "s5cmd", "aws"]
        else:
            names = ["nightcopy", "rclone", "rclone-fast", "s5cmd", "aws"]
        if self.only:
            names = [n for n in names if n in self.only]
        return names

    def env(self, endpoint):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_REGION="us-east-1", AWS_CONFIG_FILE=str(self.aws_config),
                   AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_EC2_METADATA_DISABLED="true")
        # rclone's remote `B:`, from the environment alone.
        env.update(RCLONE_CONFIG_B_TYPE="s3", RCLONE_CONFIG_B_PROVIDER="Other",
                   RCLONE_CONFIG_B_ENDPOINT=endpoint, RCLONE_CONFIG_B_ACCESS_KEY_ID=ACCESS_KEY,
                   RCLONE_CONFIG_B_SECRET_ACCESS_KEY=SECRET_KEY,
                   RCLONE_CONFIG_B_REGION="us-east-1", RCLONE_CONFIG_B_FORCE_PATH_STYLE="true",
                   RCLONE_CONFIG="/dev/null")
        return env

    def command(self, tool, tree, bucket, endpoint, walk_concurrency=None, distribute=None,
                concurrency=None, args=("run", "--force", "-q")):
        env = self.env(endpoint)
        if tool == "nightcopy":
            state = self.work / "nightcopy-state" / bucket
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            cfg = state.parent / f"{bucket}-{endpoint.rsplit(':', 1)[1]}.yaml"
            walk = f"\n  walk-concurrency: {walk_concurrency}" if walk_concurrency else ""
            dist = ""
            if distribute:
                dist = ("distribute:\n" + "".join(f"  {k}: {v}\n" for k, v in distribute.items()))
            # Written whole, then renamed: workers already started read the same file while the
            # coordinator's command writes it again, and must never see it half written.
            part = cfg.with_suffix(".yaml.new")
            part.write_text(f"""source:
  path: {tree}
  require-mountpoint: false{walk}
destination:
  bucket: {bucket}
  prefix: ""
  region: us-east-1
  endpoint-url: {endpoint}
  force-path-style: true
transfer:
  concurrency: {concurrency or CONCURRENCY}
state-dir: {state}
metrics:
  cloudwatch: false
{dist}""")
            part.replace(cfg)
            return [self.nightcopy, *args[:1], "--config", str(cfg), *args[1:]], env
        if tool.startswith("rclone"):
            argv = [str(self.bin / "rclone"), "copy", str(tree), f"B:{bucket}/",
                    "--transfers", str(CONCURRENCY), "--checkers", str(CONCURRENCY)]
            if tool == "rclone-fast":
                argv += ["--fast-list", "--update", "--use-server-modtime"]
            return argv, env
        if tool == "s5cmd":
            return [str(self.bin / "s5cmd"), "--endpoint-url", endpoint, "--numworkers",
                    str(CONCURRENCY), "sync", f"{tree}/", f"s3://{bucket}/"], env
        if tool == "aws":
            return [str(self.bin / "aws"), "--endpoint-url", endpoint, "s3", "sync", str(tree),
                    f"s3://{bucket}/", "--only-show-errors"], env
        if tool == "find":
            return ["find", str(tree), "-type", "f", "-printf", "%s %T@\n"], env
        if tool == "find-parallel":
            # What the mount can deliver: the files' names from one find (readdir gives their
            # type, so it stats nothing), then 64 stat processes side by side.
            return ["sh", "-c", f"find '{tree}' -type f -print0 | xargs -0 -P 64 -n 64 "
                    "stat --printf '%s %Y\\n' >/dev/null"], env
        raise ValueError(tool)

    def restore_command(self, tool, tree, bucket, endpoint, target, walk_concurrency=None):
        """A download of the whole bucket that nightcopy backed `tree` up into, into the empty
        directory `target`. nightcopy's own objects (`.nightcopy/`: the manifest's copy) are
        no file of the tree: the peers leave them out, nightcopy's restore never writes them."""
        if tool == "nightcopy":
            # The backup's own config: bucket, endpoint, state directory (its manifest) and
            # transfer.concurrency.
            return self.command("nightcopy", tree, bucket, endpoint, walk_concurrency,
                                args=("restore", "--to", str(target), "-q"))
        env = self.env(endpoint)
        if tool == "rclone":
            return [str(self.bin / "rclone"), "copy", f"B:{bucket}/", str(target), "--transfers",
                    str(CONCURRENCY), "--checkers", str(CONCURRENCY), "--exclude",
                    "/.nightcopy/**"], env
        if tool in ("s5cmd", "get-parallel"):
            # get-parallel: the same with 64 downloads in flight, which hides the server's
            # per-request latency: what the server and the disk deliver (the bound).
            workers = 64 if tool == "get-parallel" else CONCURRENCY
            return [str(self.bin / "s5cmd"), "--endpoint-url", endpoint, "--numworkers",
                    str(workers), "cp", "--exclude", ".nightcopy/*", f"s3://{bucket}/*",
                    f"{target}/"], env
        if tool == "write-parallel":
            # What a mount can take at most: the tree's directories made, then 64 `cp`s side by
            # side copy its files in from the local disk (no S3, no checks, no metadata).
            return ["sh", "-c", f"cd '{tree}' && find . -mindepth 1 -type d -print0 | "
                    f"(cd '{target}' && xargs -0 -r -P 64 -n 64 mkdir -p) && "
                    f"find . -type f -print0 | xargs -0 -r -P 64 -n 64 cp --parents -t '{target}'"], env
        raise ValueError(tool)

    def flags(self):
        c = CONCURRENCY
        return {
            "nightcopy": f"`nightcopy run --force` (config: transfer.concurrency {c}, defaults otherwise)",
            "rclone": f"`rclone copy --transfers {c} --checkers {c}`",
            "rclone-fast": f"`rclone copy --transfers {c} --checkers {c} --fast-list --update --use-server-modtime`",
            "s5cmd": f"`s5cmd --numworkers {c} sync`",
            "aws": f"`aws s3 sync` with `s3.max_concurrent_requests = {c}`",
            "find": "`find TREE -type f -printf '%s %T@\\n' >/dev/null`",
            "find-parallel": "`find TREE -type f -print0 | xargs -0 -P 64 -n 64 stat` (what the mount delivers at most: the bound)",
            "restore: nightcopy": "`nightcopy restore --to DIR` (the backup's config: transfer.concurrency "
                                  f"{c}, its state directory's manifest)",
            "restore: rclone": f"`rclone copy B:BUCKET/ DIR --transfers {c} --checkers {c} --exclude '/.nightcopy/**'`",
            "restore: s5cmd": f"`s5cmd --numworkers {c} cp --exclude '.nightcopy/*' 's3://BUCKET/*' DIR/`",
            "restore: get-parallel": "`s5cmd --numworkers 64 cp` as above (64 downloads in flight: what the "
                                     "server and the disk deliver, the bound of restore-small)",
            "restore: write-parallel": "the tree's directories by `mkdir -p`, then `find TREE -type f -print0 | "
                                       "xargs -0 -P 64 -n 64 cp --parents -t MOUNT` from the local disk "
                                       "(what the writable mount takes at most: the bound)",
        }


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


class PeakSize(threading.Thread):
    """The largest a directory's files grew while a run lasted, sampled twice a second."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.peak, self.done = path, 0, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            self.peak = max(self.peak, dir_bytes(self.path))

    def stop(self):
        self.done.set()
        self.join()
        self.peak = max(self.peak, dir_bytes(self.path))


def measure(argv, env, log, garage=None, limit=RUN_LIMIT):
    """Runs argv under GNU time: its peak RSS is the tool's own. (wait4 from here would count
    this Python process too: a forked child's peak RSS includes what it had before exec.)"""
    before = garage.requests() if garage else None
    usage = Path(log).with_suffix(".time")
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        stdout = subprocess.DEVNULL if argv[0] == "find" else out
        t0 = time.monotonic()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%U %S %M", "-o", str(usage), *argv],
                                env=env, stdout=stdout, stderr=out, start_new_session=True)
        try:
            rc = proc.wait(limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
        wall = time.monotonic() - t0
    if rc == "timeout":
        return dict(wall=wall, cpu=0.0, rss_mib=0.0, rc=rc, limit=limit)
    # time(1) puts "Command terminated by signal N" first when the tool died of a signal; the
    # figures are always the last line.
    user, system, rss_kib = usage.read_text().strip().splitlines()[-1].split()
    r = dict(wall=wall, cpu=float(user) + float(system), rss_mib=int(rss_kib) / 1024, rc=rc)
    if garage:
        r["requests"] = request_kinds(before, garage.requests())
    return r


# ---------------------------------------------------------------------------------------------
# Scenarios


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work) if args.work else Path(
            subprocess.check_output(["mktemp", "-d", "/tmp/nightcopy-bench.XXXXXX"], text=True).strip())
        self.cache = Path(args.trees)
        self.garage = Garage(args.garage, self.work)
        self.tools = Tools(args, self.work)
        self.log = self.work / "tools.log"
        self.results = {}  # scenario -> tool -> [runs]
        self.notes = {}
        self.proxy = None

    def tree(self, name, fresh=False):
        spec = tree_spec(name, self.args.quick)
        tag = f"{name}-{spec['files']}-{spec['hi']}-{self.args.seed}"
        root = (self.work / "trees" / tag) if fresh else (self.cache / tag)
        t0 = time.monotonic()
        generate(root, spec, self.args.seed)
        say(f"tree {name}: {spec['files']} files ({time.monotonic() - t0:.0f}s to make or find)")
        return root, spec

    def run(self, scenario, tool, tree, bucket, endpoint=None, mount=None, limit=RUN_LIMIT,
            args=None):
        done = self.results.get(scenario, {}).get(tool, [])
        if done and (done[0]["wall"] > SLOW_SECONDS or done[0]["rc"] == "timeout"):
            return None  # one slow run says enough; it is not repeated
        more = dict(args=args) if args else {}
        argv, env = self.tools.command(tool, tree, bucket, endpoint or self.garage.endpoint,
                                       self.args.walk_concurrency, **more)
        if mount:
            mount.reset()
        r = measure(argv, env, self.log, None if tool.startswith("find") else self.garage, limit)
        if mount:
            r["fuse_ops"] = mount.ops()
        return self.record(scenario, tool, r)

    def record(self, scenario, tool, r):
        self.results.setdefault(scenario, {}).setdefault(tool, []).append(r)
        reqs = r.get("requests", {})
        fuse = r.get("fuse_ops")
        say(f"  {scenario:<22} {tool:<14} {r['wall']:7.2f}s wall {r['cpu']:7.2f}s cpu "
            f"{r['rss_mib']:7.1f} MiB  rc={r['rc']}  "
            + " ".join(f"{k}={v}" for k, v in reqs.items() if v)
            + (f"  fuse={sum(fuse.values())}" if fuse else "")
            + (f"  {r['files_per_s']:,.0f} files/s {r['mib_per_s']:,.1f} MiB/s"
               if r.get("files_per_s") else ""))
        if r.get("mismatch"):
            say(f"  !!! {scenario} {tool} FAILED (exit {r.get('exit', r['rc'])}): {r['mismatch']}")
        elif r["rc"] != 0:
            say(f"  ! {tool} exited {r['rc']}: see {self.log}")
        return r

    def full(self, name):
        tree, spec = self.tree(name)
        self.notes[f"full-{name}"] = dict(files=spec["files"], bytes=tree_bytes(tree))
        warm(tree)
        for rep in range(self.args.reps):
            tools = rotate(self.tools.names("full"), rep)
            for tool in tools:
                bucket = self.garage.bucket(f"f{name}-{tool}-{rep}")
                self.run(f"full-{name}", tool, tree, bucket)

    def incremental(self):
        tree, spec = self.tree("incr", fresh=True)
        self.notes["incr"] = dict(files=spec["files"], bytes=tree_bytes(tree))
        warm(tree)
        tools = self.tools.names("incr")
        buckets = {t: self.garage.bucket(f"incr-{t}") for t in tools}
        for tool in tools:
            self.run("first-copy-incr", tool, tree, buckets[tool])
        for latency in [0, self.args.latency_ms]:
            endpoint = None
            sfx = ""
            if latency:
                self.proxy = DelayProxy(self.garage.s3_port, latency)
                endpoint, sfx = self.proxy.endpoint, f"@{latency:g}ms"
                # nightcopy's manifest names the endpoint it was written for, so through the
                # proxy it first runs once, unmeasured, to write its own (last night's run).
                if "nightcopy" in tools:
                    argv, env = self.tools.command("nightcopy", tree, buckets["nightcopy"], endpoint)
                    measure(argv, env, self.log)
            for rep in range(self.args.reps):
                for tool in rotate(tools + ["find"], rep):
                    if tool == "find" and latency:
                        continue
                    self.run(f"incr-nothing{sfx}", tool, tree, buckets.get(tool), endpoint)
            for rep in range(self.args.reps):
                n = change_one_percent(tree, spec, self.args.seed, rep + 100 * latency)
                self.notes["incr"]["changed"] = n
                for tool in rotate(tools, rep):
                    self.run(f"incr-1pct{sfx}", tool, tree, buckets[tool], endpoint)
            if self.proxy:
                self.proxy.stop()
                self.proxy = None

    def slowmount(self):
        why = fuse_usable()
        if why:
            say(f"SKIPPED the slow-mount scenarios: {why}")
            self.notes["slowmount-skipped"] = dict(files=0, why=why)
            return
        delays = [float(d) for d in self.args.mount_delays.split(",")]
        for name in self.args.slow_trees.split(","):
            tree, spec = self.tree(name)
            self.notes[name] = dict(files=spec["files"], bytes=tree_bytes(tree))
            # The 100,000-file tree is for memory: once, at the smallest delay.
            for delay in delays[:1] if name == "slow-c" else delays:
                self.slow_tree(name, tree, spec, delay)

    def slow_tree(self, name, tree, spec, delay):
        mount = SlowMount(self.args.python, tree, self.work, delay)
        sfx = f"{name}@{delay:g}ms"
        try:
            if name == "slow-c":
                # Memory and the walk at 100,000 files: nightcopy against find and the bound.
                tools = [t for t in ["nightcopy"] if not self.tools.only or t in self.tools.only]
            else:
                tools = self.tools.names("incr")
            buckets = {t: self.garage.bucket(f"{name}-{delay:g}-{t}".replace(".", "-")) for t in tools}
            for tool in [t for t in tools if t != "rclone-fast"]:
                self.run(f"full-{sfx}", tool, mount.mountpoint, buckets[tool], mount=mount)
            if "rclone-fast" in buckets:
                buckets["rclone-fast"] = buckets.get("rclone", buckets["rclone-fast"])
            reps = self.args.reps
            for rep in range(reps):
                for tool in rotate(tools + ["find", "find-parallel"], rep):
                    self.run(f"nothing-{sfx}", tool, mount.mountpoint, buckets.get(tool), mount=mount)
            self.notes[f"bound-{sfx}"] = dict(files=spec["files"], delay=delay)
        finally:
            mount.stop()

    def scaleout(self):
        moto = Moto(self.args.peers_bin, self.work)
        self.proxy = DelayProxy(self.garage.s3_port, self.args.latency_ms)
        try:
            tree, spec = self.tree("scale")
            self.notes["scale"] = dict(files=spec["files"], bytes=tree_bytes(tree))
            warm(tree)
            for workers in [int(w) for w in self.args.scale_workers.split(",") if w]:
                for rep in range(self.args.reps):
                    self.distributed_copy(moto, tree, spec, workers, rep)
            if not self.args.quick and self.args.coordinator_limit > 0:
                self.coordinator_memory(moto)
        finally:
            moto.stop()
            self.proxy.stop()
            self.proxy = None

    def distributed_copy(self, moto, tree, spec, workers, rep):
        name = f"scale-{workers}w-{rep}"
        q = moto.queues(name)
        # Every SQS request of the run, coordinator's and workers', by action, through a
        # counting proxy that adds no delay.
        sqs = DelayProxy(moto.port, 0, count_to=self.work / f"{name}-sqs.json")
        distribute = {"queue-url": q["work"], "results-queue-url": q["results"],
                      "dead-letter-queue-url": q["dlq"], "batch-files": 20, "deadline": "30min",
                      "visibility-timeout": "2min", "endpoint-url": sqs.endpoint}
        bucket = self.garage.bucket(name)
        argv, env = self.tools.command("nightcopy", tree, bucket, self.proxy.endpoint,
                                       distribute=distribute, concurrency=4, args=("worker", "-q"))
        procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(self.work / f"{name}-w{i}.log", "wb"))
                 for i in range(workers)]
        try:
            argv, env = self.tools.command("nightcopy", tree, bucket, self.proxy.endpoint,
                                           distribute=distribute, concurrency=4,
                                           args=("run", "--force"))
            r = measure(argv, env, self.log, self.garage)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            r_sqs = sqs.stop()
        r["sqs"] = r_sqs
        # One message per batch.
        m = re.findall(r"(\d+) batches sent;", Path(self.log).read_text())
        if m:
            r["batches"] = r["messages"] = int(m[-1])
        r["files_per_s"] = spec["files"] / r["wall"]
        r["mib_per_s"] = self.notes["scale"]["bytes"] / 2**20 / r["wall"]
        scenario = f"scaleout-{workers}-workers"
        self.results.setdefault(scenario, {}).setdefault("nightcopy", []).append(r)
        say(f"  {scenario:<22} {r['wall']:7.2f}s wall {r['cpu']:7.2f}s cpu (coordinator) "
            f"{r['rss_mib']:7.1f} MiB  {r['files_per_s']:.0f} files/s  "
            f"{sum(r_sqs.values())} SQS requests  rc={r['rc']}")

    def coordinator_memory(self, moto):
        """The coordinator over a million files: it plans, spools, sends 50,000 batches, collects
        50,000 reports and writes the manifest — its whole path, at the speed of the queue: the
        reports come from a stand-in (`StandInWorker`), not from uploads."""
        tree, spec = self.tree("million")
        q = moto.queues("scale-million")
        # moto looks at every message of a queue for each one it receives, so its receives slow
        # down in proportion to what is queued: sending all 50,000 batches at once made it answer
        # about 9 batches a second. A small max-queued keeps both queues short; it changes when
        # batches are sent, not what the coordinator keeps (its memory does not depend on it).
        distribute = {"queue-url": q["work"], "results-queue-url": q["results"],
                      "dead-letter-queue-url": q["dlq"], "batch-files": 20, "deadline": "12h",
                      "max-queued": self.args.coordinator_max_queued,
                      "endpoint-url": moto.endpoint}
        bucket = self.garage.bucket("scale-million")
        argv, env = self.tools.command("nightcopy", tree, bucket, self.garage.endpoint,
                                       distribute=distribute, args=("run", "--force", "-q"))
        # What the coordinator keeps on disk instead of in memory: its state directory (plan,
        # reports, index, then the manifest), sampled while it runs.
        state = self.work / "nightcopy-state" / bucket
        peak = PeakSize(state)
        peak.start()
        stand_in = StandInWorker(moto, q["work"], q["results"])
        try:
            r = measure(argv, env, self.work / "coordinator-million.log", self.garage,
                        limit=self.args.coordinator_limit)
        finally:
            answered = stand_in.stop()
            peak.stop()
        r["answered"] = answered
        r["files"] = spec["files"]
        self.notes.setdefault("million", dict(files=spec["files"]))
        # What the coordinator says it sent; every file is new to this bucket, so without that line
        # it is the plan's batches of 20 (the files are far below batch-bytes).
        m = re.findall(r"(\d+) batches sent;", (self.work / "coordinator-million.log").read_text())
        r["batches"] = int(m[-1]) if m else -(-spec["files"] // 20)
        r["state_peak_mib"] = peak.peak / 2**20
        r["state_end_mib"] = dir_bytes(state) / 2**20
        self.results.setdefault("scaleout-coordinator-1M-files", {})["nightcopy"] = [r]
        self.notes["coordinator-disk"] = dict(peak_mib=r["state_peak_mib"],
                                              end_mib=r["state_end_mib"], files=spec["files"])
        say(f"  coordinator, 1M files ({answered:,} batches answered): {r['wall']:.1f}s wall {r['cpu']:.1f}s cpu "
            f"{r['rss_mib']:.1f} MiB peak RSS, state directory at most {r['state_peak_mib']:.0f} "
            f"MiB ({r['state_end_mib']:.0f} MiB after) rc={r['rc']}")

    def million(self):
        tree, spec = self.tree("million")
        self.notes["million"] = dict(files=spec["files"])
        bucket = self.garage.bucket("million-nightcopy")
        self.million_bucket = bucket  # the restore's million-file scenario reads it back
        # The first copy of a million files is PUT-bound (about 6 minutes here): it must finish,
        # or the nothing-changed runs after it would be finishing it.
        # Not quiet: the snapshot's cost is read from the run's info line.
        loud = ("run", "--force")
        self.run("first-copy-million", "nightcopy", tree, bucket, limit=LONG_LIMIT, args=loud)
        self.snapshot_cost("first-copy-million")
        for _ in range(self.args.reps):
            self.run("incr-nothing-million", "nightcopy", tree, bucket, args=loud)
            self.snapshot_cost("incr-nothing-million")

    def snapshot_cost(self, scenario):
        """What the night's snapshot cost the run just made: its size per entry and the seconds
        after the walk (join, compression, upload), from the run's own log line, beside the run's
        wall time and peak RSS (which include it)."""
        runs = self.results.get(scenario, {}).get("nightcopy", [])
        text = Path(self.log).read_text(errors="replace")
        m = re.findall(r"snapshot \S+ saved: (\d+) entries, (\d+) bytes in ([0-9.]+)s", text)
        if not runs or not m:
            return
        entries, size, secs = int(m[-1][0]), int(m[-1][1]), float(m[-1][2])
        runs[-1]["snapshot"] = dict(entries=entries, bytes=size, seconds=secs)
        say(f"  snapshot of {scenario}: {entries:,} entries, {size / 2**20:.1f} MiB "
            f"({size / max(entries, 1):.1f} bytes per entry), {secs:.1f}s after the walk")

    # -- restore ------------------------------------------------------------------------------

    def restore(self):
        """nightcopy backs each tree up once; then each tool restores that bucket into an empty
        directory of its own, and the result is compared with the tree, byte for byte."""
        tools = self.tools.names("restore")
        parts = self.args.restore_parts.split(",")
        for name in [n for n in ["small", "large"] if n in parts]:
            tree, spec = self.tree(name)
            self.notes[f"restore-{name}"] = dict(files=spec["files"], bytes=tree_bytes(tree))
            bucket = self.backup_for_restore(name, tree, f"restore-{name}", tools)
            if not bucket:
                continue
            for rep in range(self.args.reps):
                # Many small files: 64 downloads at once show what the server gives when its
                # per-request latency is hidden (for four large files 64 workers are four).
                bound = ["get-parallel"] if name == "small" else []
                for tool in rotate(tools + bound, rep):
                    self.restore_run(f"restore-{name}", tool, tree, bucket, rep)
        if "slow" in parts:
            self.restore_slow(tools)
        if "million" in parts and not self.args.quick and self.args.restore_million_limit:
            self.restore_million()

    def backup_for_restore(self, name, tree, scenario, tools, bucket=None, limit=RUN_LIMIT):
        """The bucket a restore reads: one `nightcopy run` of the tree (not measured). If it
        fails, every tool gets a failed row in `scenario` rather than a restore of half a tree."""
        bucket = bucket or self.garage.bucket(f"restore-{name}")
        argv, env = self.tools.command("nightcopy", tree, bucket, self.garage.endpoint,
                                       self.args.walk_concurrency)
        t0 = time.monotonic()
        r = measure(argv, env, self.log, limit=limit)
        say(f"  backup of {name} for the restores: {time.monotonic() - t0:.1f}s rc={r['rc']}")
        if r["rc"] == 0:
            return bucket
        for tool in tools:
            self.record(scenario, tool, dict(
                wall=0.0, cpu=0.0, rss_mib=0.0, rc=f"no backup ({r['rc']})",
                mismatch=f"the nightcopy backup of {name} that the restores read failed "
                         f"(exit {r['rc']}; see {self.log}): nothing restored"))
        return None

    def restore_run(self, scenario, tool, tree, bucket, rep, mount_delay=None, limit=RUN_LIMIT):
        done = self.results.get(scenario, {}).get(tool, [])
        if done and (done[0]["wall"] > SLOW_SECONDS or done[0]["rc"] == "timeout"):
            return None  # one slow run says enough; it is not repeated
        label = f"{scenario}-{tool}-{rep}".replace("@", "-")
        # The directory the tool writes into: empty, its own; on the slow mount, the mount's
        # backing directory, checked after the mount is gone.
        target = self.work / "restored" / label
        target.mkdir(parents=True)
        mount = None
        if mount_delay is not None:
            mount = SlowMount(self.args.python, target, self.work, mount_delay, rw=True, label=label)
        try:
            argv, env = self.tools.restore_command(
                tool, tree, bucket, self.garage.endpoint, mount.mountpoint if mount else target,
                self.args.walk_concurrency)
            if mount:
                mount.reset()
            # Every tool starts with no dirty pages of the one before: the peers do not flush
            # what they wrote (nightcopy does, file by file, before a file gets its name), and
            # their write-back would otherwise land in the next tool's time.
            os.sync()
            r = measure(argv, env, self.log, None if tool == "write-parallel" else self.garage,
                        limit)
            if mount:
                r["fuse_ops"] = mount.ops()
        finally:
            if mount:
                mount.stop()
        files, size = tree_spec_files(self.notes, scenario)
        r["files"] = files
        if r["rc"] == 0 and r["wall"] > 0:
            r["files_per_s"] = files / r["wall"]
            r["mib_per_s"] = size / 2**20 / r["wall"]
        if r["rc"] != "timeout":
            problem = compare_trees(tree, target)
            if problem:
                r["mismatch"] = problem
                r["exit"] = r["rc"]
                if r["rc"] == 0:
                    r["rc"] = "mismatch"  # a failed row: its figures are not a restore's
        shutil.rmtree(target, ignore_errors=True)
        return self.record(scenario, tool, r)

    def restore_slow(self, tools):
        """Into a writable slow mount (scripts/slowfs.py --rw over an empty directory), at the
        first of --mount-delays: the slow-a tree, each tool into a mount of its own, and the
        bound, 64 `cp`s side by side from the local tree."""
        why = fuse_usable()
        if why:
            say(f"SKIPPED the restore into the slow mount: {why}")
            self.notes["restore-slowmount-skipped"] = dict(files=0, why=why)
            return
        delay = float(self.args.mount_delays.split(",")[0])
        name = "slow-a"
        scenario = f"restore-{name}@{delay:g}ms"
        tree, spec = self.tree(name)
        self.notes[f"restore-{name}"] = dict(files=spec["files"], bytes=tree_bytes(tree))
        bucket = self.backup_for_restore(name, tree, scenario, tools)
        if not bucket:
            return
        for rep in range(self.args.reps):
            for tool in rotate(tools + ["write-parallel"], rep):
                self.restore_run(scenario, tool, tree, bucket, rep, mount_delay=delay)
        self.notes[f"bound-{scenario}"] = dict(files=spec["files"], delay=delay)

    def restore_million(self):
        """nightcopy alone, once, for memory: the million-file tree's bucket (the `million`
        scenario's, when it ran; the backup is run again, as a nothing-changed run there, so
        that a first copy stopped at its limit is finished)."""
        if self.tools.only and "nightcopy" not in self.tools.only:
            return
        tree, spec = self.tree("million")
        self.notes["restore-million"] = dict(files=spec["files"], bytes=tree_bytes(tree))
        bucket = getattr(self, "million_bucket", None) or self.garage.bucket("million-nightcopy")
        self.million_bucket = bucket
        if self.backup_for_restore("million", tree, "restore-million", ["nightcopy"],
                                   bucket=bucket, limit=LONG_LIMIT):
            self.restore_run("restore-million", "nightcopy", tree, bucket, 0,
                             limit=self.args.restore_million_limit)

    def close(self):
        if self.proxy:
            self.proxy.stop()
        for m in Path(self.work).glob("mnt-*"):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        self.garage.stop()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


def tree_spec_files(notes, scenario):
    """Files and bytes of the tree a restore scenario restores."""
    note = notes[scenario.split("@")[0]]
    return note["files"], note["bytes"]


def rotate(items, k):
    k %= len(items)
    return items[k:] + items[:k]


def say(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Report


def med(runs, key):
    vals = [r[key] for r in runs if r["rc"] == 0 and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=2):
    return "failed" if v is None else f"{v:.{digits}f}"


def take_earlier_rows(bench, earlier, only, source):
    """In a scenario this run repeated with a subset of the tools (--tools), the other tools' rows
    come from the earlier run, and the block says which ones: their figures do not depend on
    nightcopy's build, and re-running them costs most of the bench's time."""
    taken = []
    for scenario, runs in earlier["results"].items():
        if scenario_group(scenario) not in only or scenario not in bench.results:
            continue
        for tool, tool_runs in runs.items():
            if tool not in bench.results[scenario]:
                bench.results[scenario][tool] = tool_runs
                taken.append(f"{tool} in {scenario}")
    if taken:
        # An earlier run may itself have taken rows from one before it: both are named.
        prior = bench.notes.get("earlier-rows")
        if prior:
            # Kept only where this run took the scenario whole (`<tool> in <scenario>`).
            taken += [f"{row} (via {prior['source']})" for row in prior["rows"]
                      if scenario_group(row.split(" in ", 1)[-1]) not in only]
        bench.notes["earlier-rows"] = dict(files=0, source=Path(source).name, rows=taken)


def report(bench, command, started):
    args = bench.args
    lines = []
    cpu = platform.processor() or platform.machine()
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for tool, argv in [("rclone", ["rclone", "version"]), ("s5cmd", ["s5cmd", "version"]),
                       ("aws", ["aws", "--version"])]:
        try:
            out = subprocess.run([str(Path(args.peers_bin) / argv[0]), *argv[1:]], capture_output=True,
                                 text=True, timeout=60)
            versions[tool] = (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            versions[tool] = "?"
    nc = subprocess.run([bench.tools.nightcopy, "--version"], capture_output=True, text=True).stdout.strip()
    # Which source the figures belong to; "+changes" when the tree had uncommitted edits.
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty=+changes"],
                            capture_output=True, text=True).stdout.strip()
    if commit and args.nightcopy == str(REPO / "target/release/nightcopy"):
        nc += f" (commit {commit})"
    garage = subprocess.run([args.garage, "--version"], capture_output=True, text=True).stdout.strip()
    lines += [
        f"Command: `{command}` — {time.strftime('%Y-%m-%d', time.gmtime(started))}, "
        f"{(time.time() - started) / 60:.0f} min, {args.reps} runs per cell (medians), seed {args.seed}"
        + (", **quick mode** (trees ÷ 10)" if args.quick else "") + ".",
        f"Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}; server and tools share the cores.",
        f"Server: {garage.splitlines()[0] if garage else 'garage'} (single node, lmdb) on 127.0.0.1. "
        f"Tools: {nc}; {versions['rclone']}; s5cmd {versions['s5cmd']}; {versions['aws']}.",
        f"Every tool runs with {CONCURRENCY} concurrent transfers; a tool whose first run of a "
        f"scenario took over {SLOW_SECONDS} s is not run again there (see `runs`). Flags:",
        "",
    ]
    for tool, flag in bench.tools.flags().items():
        lines.append(f"- {tool}: {flag}")
    lines.append("")
    for key, note in bench.notes.items():
        if key == "slowmount-skipped":
            lines.append(f"- **slow-mount scenarios SKIPPED**: {note['why']}")
            continue
        if key == "restore-slowmount-skipped":
            lines.append(f"- **restore into the slow mount SKIPPED**: {note['why']}")
            continue
        if key.startswith("bound-") or key == "coordinator-disk":
            continue
        if key == "earlier-rows":
            lines.append(f"- rows not run again, taken from the earlier run `{note['source']}` "
                         f"(--merge-results): {', '.join(note['rows'])}")
            continue
        desc = f"{note['files']:,} files"
        if "bytes" in note:
            desc += f", {note['bytes'] / 2**20:,.0f} MiB"
        if "changed" in note:
            desc += f"; 1% changed = {note['changed']:,} files rewritten (new content and size) before each run"
        lines.append(f"- tree `{key}`: {desc}")
    lines.append("")
    for scenario, by_tool in bench.results.items():
        base = by_tool.get("nightcopy", [])
        base_wall = med(base, "wall")
        lines.append(f"#### {scenario}")
        lines.append("")
        fuse = any(r.get("fuse_ops") for runs in by_tool.values() for r in runs)
        restore = scenario.startswith("restore-")
        head = "| tool | runs | wall s | ÷ nightcopy | CPU s | peak RSS MiB | LIST | HEAD | PUT | GET | other |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        if restore:
            head += " files/s | MiB/s |"
            rule += "---:|---:|"
        if fuse:
            head += " FUSE ops | per file |"
            rule += "---:|---:|"
        lines.append(head)
        lines.append(rule)
        for tool, runs in by_tool.items():
            wall = med(runs, "wall")
            ratio = "" if tool == "nightcopy" or wall is None or not base_wall else f"{wall / base_wall:.2f}×"
            reqs = [r.get("requests") for r in runs if r["rc"] == 0 and r.get("requests")]
            cells = []
            for k in ["LIST", "HEAD", "PUT", "GET", "other"]:
                vals = [q[k] for q in reqs]
                cells.append(str(int(statistics.median(vals))) if vals else "")
            extra = ""
            if scenario.startswith("full-large") and wall and "bytes" in bench.notes.get("full-large", {}):
                extra = f" ({bench.notes['full-large']['bytes'] / 2**20 / wall:,.0f} MiB/s)"
            failed = sum(1 for r in runs if r["rc"] not in (0, "timeout"))
            stopped = sum(1 for r in runs if r["rc"] == "timeout")
            name = tool + (f" ({failed} failed)" if failed else "")
            if stopped:
                limit = max(r.get("limit", RUN_LIMIT) for r in runs if r["rc"] == "timeout")
                name += f" (stopped at {limit} s)"
            if scenario.startswith("scaleout-") and med(runs, "files_per_s") is not None:
                extra += (f" ({med(runs, 'files_per_s'):,.0f} files/s, {med(runs, 'mib_per_s'):.1f} MiB/s"
                          + (f", {int(med(runs, 'messages'))} messages" if med(runs, "messages") else "")
                          + ")")
            row = (f"| {name} | {len(runs)} | {fmt(wall)}{extra} | {ratio} | {fmt(med(runs, 'cpu'))} | "
                   f"{fmt(med(runs, 'rss_mib'), 1)} | " + " | ".join(cells) + " |")
            if restore:
                row += f" {fmt(med(runs, 'files_per_s'), 0)} | {fmt(med(runs, 'mib_per_s'), 1)} |"
            if fuse:
                ops = [sum(r["fuse_ops"].values()) for r in runs if r.get("fuse_ops") and r["rc"] == 0]
                files = next((r["files"] for r in runs if r.get("files")), None) or \
                    bench.notes.get(scenario.split("-", 1)[1].split("@")[0], {}).get("files")
                if ops:
                    n = statistics.median(ops)
                    row += f" {int(n):,} | {n / files:.1f} |" if files else f" {int(n):,} | |"
                else:
                    row += " | |"
            lines.append(row)
        lines.append("")
        for tool, runs in by_tool.items():
            for i, r in enumerate(runs):
                if r.get("mismatch"):
                    lines += [f"**{tool}, run {i + 1} failed** (exit {r.get('exit', r['rc'])}): "
                              f"{r['mismatch']}.", ""]
        lines += bounds(bench, scenario, by_tool)
        lines += write_bounds(scenario, by_tool)
        lines += get_bounds(scenario, by_tool)
        lines += fuse_kinds(scenario, by_tool)
        lines += sqs_requests(bench, scenario, by_tool)
        lines += snapshot_costs(scenario, by_tool)
        disk = bench.notes.get("coordinator-disk")
        answered = [r.get("answered") for r in by_tool.get("nightcopy", []) if r.get("answered")]
        if scenario == "scaleout-coordinator-1M-files" and answered:
            sent = [r.get("batches") for r in by_tool.get("nightcopy", []) if r.get("batches")]
            of = (f" to the plan's {sent[-1]:,} batches (SQS delivers at least once: a batch "
                  "received twice is answered twice, and its first report counts)"
                  ) if sent and sent[-1] != answered[-1] else ""
            lines += [f"Workers: the bench's stand-in (`StandInWorker`), which read or uploaded "
                      f"nothing and answered every batch with a report: {answered[-1]:,} "
                      f"answers{of}. The coordinator's figures of this run are its memory, disk "
                      "and time only.", ""]
        if scenario == "scaleout-coordinator-1M-files" and disk:
            lines += [f"The coordinator's state directory held at most {disk['peak_mib']:,.0f} MiB "
                      f"while it ran ({disk['peak_mib'] * 2**20 / disk['files']:,.0f} bytes per "
                      f"file: plan, reports, index, manifest) and {disk['end_mib']:,.0f} MiB after.",
                      ""]
    return "\n".join(lines)


def snapshot_costs(scenario, by_tool):
    """The snapshot index a million-file run wrote: bytes per entry, seconds after the walk (medians
    over the runs), beside the run's peak RSS, which includes it."""
    runs = [r for r in by_tool.get("nightcopy", []) if r.get("snapshot") and r["rc"] in (0, 2)]
    if not runs:
        return []
    entries = runs[-1]["snapshot"]["entries"]
    size = statistics.median(r["snapshot"]["bytes"] for r in runs)
    secs = statistics.median(r["snapshot"]["seconds"] for r in runs)
    rss = statistics.median(r["rss_mib"] for r in runs)
    wall = statistics.median(r["wall"] for r in runs)
    return [f"Snapshot of this run (median of {len(runs)}): {entries:,} entries in "
            f"{size / 2**20:.1f} MiB ({size / entries:.1f} bytes per entry, gzip), written and "
            f"uploaded in {secs:.1f}s after the walk ({100 * secs / wall:.0f}% of the run's "
            f"{wall:.1f}s); the run's peak RSS with it: {rss:.1f} MiB.", ""]


def sqs_requests(bench, scenario, by_tool):
    """The SQS requests of a distributed copy (coordinator and workers together), by action,
    medians over the runs, and per file: what SQS bills."""
    runs = [r for r in by_tool.get("nightcopy", []) if r.get("sqs") and r["rc"] == 0]
    files = bench.notes.get("scale", {}).get("files")
    if not scenario.startswith("scaleout-") or not runs or not files:
        return []
    actions = sorted({a for r in runs for a in r["sqs"]})
    per = {a: statistics.median(r["sqs"].get(a, 0) for r in runs) for a in actions}
    total = statistics.median(sum(r["sqs"].values()) for r in runs)
    return [f"SQS requests (coordinator and workers): {int(total):,} = {total / files:.3f} per "
            "file; " + ", ".join(f"{a} {int(n):,}" for a, n in per.items()) + ".", ""]


def bounds(bench, scenario, by_tool):
    """For a nothing-changed run on the slow mount: what the mount allows, and how close
    nightcopy came. Latency bound: nightcopy's FUSE operations × the delay ÷ its walk threads.
    Daemon bound: the same operations at the rate the parallel finds got out of the daemon."""
    if not scenario.startswith("nothing-slow"):
        return []
    nc = [r for r in by_tool.get("nightcopy", []) if r["rc"] == 0 and r.get("fuse_ops")]
    fp = [r for r in by_tool.get("find-parallel", []) if r["rc"] == 0 and r.get("fuse_ops")]
    if not nc or not fp:
        return []
    delay = float(scenario.rsplit("@", 1)[1].rstrip("ms")) / 1000
    ops = statistics.median(sum(r["fuse_ops"].values()) for r in nc)
    wall = statistics.median(r["wall"] for r in nc)
    rate = statistics.median(sum(r["fuse_ops"].values()) / r["wall"] for r in fp)
    # Per operation, the daemon sleeps the delay and then does its own work: with the delay alone
    # as the cost, the latency bound is a floor.
    threads = bench.args.walk_concurrency or 32
    latency = ops * delay / threads
    daemon = ops / rate
    bound = max(latency, daemon)
    return [f"Bounds: nightcopy's {int(ops):,} operations × {delay * 1000:g} ms ÷ {threads} threads = "
            f"{latency:.2f} s; at the daemon's measured {rate:,.0f} operations/s (parallel finds) "
            f"= {daemon:.2f} s. nightcopy took {wall:.2f} s, {wall / bound:.1f}× the higher bound.", ""]


def write_bounds(scenario, by_tool):
    """For a restore into the writable slow mount: what the mount allows each tool. Latency
    bound: the tool's FUSE operations × the delay ÷ its 16 transfers; daemon bound: the same
    operations at the rate 64 `cp`s side by side (write-parallel) got out of the daemon."""
    if not scenario.startswith("restore-slow"):
        return []
    wp = [r for r in by_tool.get("write-parallel", []) if r["rc"] == 0 and r.get("fuse_ops")]
    if not wp:
        return []
    delay = float(scenario.rsplit("@", 1)[1].rstrip("ms")) / 1000
    rate = statistics.median(sum(r["fuse_ops"].values()) / r["wall"] for r in wp)
    out = [f"Bounds: 64 `cp`s side by side (write-parallel) got {rate:,.0f} operations/s out of "
           f"the mount's daemon ({statistics.median(r['wall'] for r in wp):.2f} s for the tree)."]
    for tool, runs in by_tool.items():
        ok = [r for r in runs if r["rc"] == 0 and r.get("fuse_ops")]
        if tool == "write-parallel" or not ok:
            continue
        ops = statistics.median(sum(r["fuse_ops"].values()) for r in ok)
        wall = statistics.median(r["wall"] for r in ok)
        latency, daemon = ops * delay / CONCURRENCY, ops / rate
        out.append(f"{tool}: {int(ops):,} operations × {delay * 1000:g} ms ÷ {CONCURRENCY} = "
                   f"{latency:.2f} s; at the daemon's rate {daemon:.2f} s; took {wall:.2f} s, "
                   f"{wall / max(latency, daemon):.1f}× the higher bound.")
    return [" ".join(out), ""]


def get_bounds(scenario, by_tool):
    """For a restore to the local disk: what 64 downloads in flight (get-parallel) got, beside
    each tool's 16."""
    gp = [r for r in by_tool.get("get-parallel", []) if r["rc"] == 0 and r.get("files_per_s")]
    if not scenario.startswith("restore-") or not gp:
        return []
    fps = statistics.median(r["files_per_s"] for r in gp)
    mps = statistics.median(r["mib_per_s"] for r in gp)
    out = [f"Bound: 64 downloads in flight (get-parallel) got {fps:,.0f} files/s, {mps:,.1f} "
           "MiB/s out of the server and the disk;"]
    for tool, runs in by_tool.items():
        if tool != "get-parallel" and med(runs, "files_per_s"):
            out.append(f"{tool} {med(runs, 'files_per_s') / fps:.0%} of it,")
    return [" ".join(out).rstrip(",") + ".", ""]


def fuse_kinds(scenario, by_tool):
    """The FUSE operations of a restore into the slow mount, by kind (medians): what each tool
    asks of a network filesystem per file."""
    if not scenario.startswith("restore-slow"):
        return []
    out = []
    for tool, runs in by_tool.items():
        ok = [r["fuse_ops"] for r in runs if r["rc"] == 0 and r.get("fuse_ops")]
        if not ok:
            continue
        kinds = sorted({k for o in ok for k in o})
        per = {k: statistics.median(o.get(k, 0) for o in ok) for k in kinds}
        out.append(f"- {tool}: " + ", ".join(f"{k} {int(n):,}" for k, n in
                                             sorted(per.items(), key=lambda kv: -kv[1]) if n))
    return (["FUSE operations by kind (medians):", ""] + out + [""]) if out else []


ALL_SCENARIOS = "small,large,incr,million,slowmount,scaleout,restore"


def scenario_group(scenario):
    """The --only name a results key belongs to."""
    for prefix, group in [("restore", "restore"), ("full-slow", "slowmount"), ("nothing-slow", "slowmount"),
                          ("scaleout", "scaleout"), ("full-small", "small"), ("full-large", "large"),
                          ("first-copy-million", "million"), ("incr-nothing-million", "million")]:
        if scenario.startswith(prefix):
            return group
    return "incr"


def write_doc(path, block, quick, only):
    """Each set of scenarios has a block of its own, so that a run of some of them (`--only`)
    replaces its own earlier figures and leaves the others' standing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    tag = "quick" if quick else "full"
    if only != set(ALL_SCENARIOS.split(",")):
        tag += ":" + "+".join(s for s in ALL_SCENARIOS.split(",") if s in only)
    begin, end = f"<!-- bench:{tag}:begin -->", f"<!-- bench:{tag}:end -->"
    new = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    path.write_text(text)


def main():
    global CONCURRENCY
    if len(sys.argv) > 1 and sys.argv[1] == "_proxy":
        run_proxy(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                  sys.argv[5] if len(sys.argv) > 5 else "")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="trees ÷ 10, no million-file run")
    ap.add_argument("--reps", type=int, default=None, help="runs per cell (default 3, quick 1)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY,
                    help="transfers in flight, the same for every tool")
    ap.add_argument("--tools", help="comma-separated subset of the tools to run")
    ap.add_argument("--only", default=ALL_SCENARIOS,
                    help="comma-separated scenarios: small,large,incr,million,slowmount,scaleout,restore")
    ap.add_argument("--mount-delays", default="1,5",
                    help="milliseconds per metadata operation on the slow mount (quick: 1)")
    ap.add_argument("--walk-concurrency", type=int, default=None,
                    help="source.walk-concurrency for nightcopy (default: its own default)")
    ap.add_argument("--python", default=os.environ.get("NIGHTCOPY_PYTHON", sys.executable),
                    help="the Python that has mfusepy, for the slow mount")
    ap.add_argument("--garage", default=os.environ.get("NIGHTCOPY_GARAGE"))
    ap.add_argument("--peers-bin", default=os.environ.get("NIGHTCOPY_PEERS_BIN"))
    ap.add_argument("--nightcopy", default=str(REPO / "target/release/nightcopy"),
                    help="the binary to measure (e.g. an older build, to compare a change)")
    ap.add_argument("--trees", default=os.path.expanduser("~/.cache/nightcopy-bench"))
    ap.add_argument("--work", help="work directory (default: a new one in /tmp, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true", help="print the table, do not touch docs/")
    ap.add_argument("--slow-trees", default="slow-a,slow-b,slow-c",
                    help="the slow mount's trees to run (comma-separated)")
    ap.add_argument("--scale-workers", default="1,2,4",
                    help="worker counts of the distributed copies (empty: none, for the "
                         "coordinator's run alone)")
    ap.add_argument("--coordinator-max-queued", type=int, default=40,
                    help="distribute.max-queued of the coordinator's million-file run")
    ap.add_argument("--restore-parts", default="small,large,slow,million",
                    help="which restores the restore scenario runs (comma-separated)")
    ap.add_argument("--restore-million-limit", type=int, default=LONG_LIMIT,
                    help=f"seconds the million-file restore may take (default {LONG_LIMIT}; 0: not "
                    "run — a million GETs take about 40 minutes on Garage here)")
    ap.add_argument("--coordinator-limit", type=int, default=LONG_LIMIT,
                    help=f"seconds the coordinator's million-file run may take (default {LONG_LIMIT}; "
                    "0: not run): with --coordinator-max-queued 40, moto answered about "
                    "160 batches a second here, so its 50,000 batches take about 5.5 minutes")
    ap.add_argument("--merge-results", help="target/bench/results.json of an earlier run (same "
                    "machine, same flags): its scenarios that this run does not repeat go into "
                    "this run's block and take part in its name; in a scenario "
                    "repeated with --tools, the other tools' rows are taken from it (and named)")
    args = ap.parse_args()
    if not args.garage or not args.peers_bin:
        sys.exit("run through `make bench` (it installs Garage and the peers first)")
    CONCURRENCY = args.concurrency
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.quick and args.mount_delays == "1,5":
        args.mount_delays = "1"
    only = set(args.only.split(","))
    merged = set()
    if args.quick:
        only.discard("million")
    command = "make bench" + (" BENCH_ARGS='" + " ".join(sys.argv[1:]) + "'" if sys.argv[1:] else "")
    started = time.time()
    bench = Bench(args)
    if args.merge_results:
        earlier = json.loads(Path(args.merge_results).read_text())
        for scenario, runs in earlier["results"].items():
            group = scenario_group(scenario)
            if group not in only:
                bench.results[scenario] = runs
                merged.add(group)
        for key, note in earlier["notes"].items():
            bench.notes.setdefault(key, note)
    say(f"work directory {bench.work}; Garage on 127.0.0.1:{bench.garage.s3_port}; log {bench.log}")
    try:
        if "small" in only:
            bench.full("small")
        if "large" in only:
            bench.full("large")
        if "incr" in only:
            bench.incremental()
        if "million" in only:
            bench.million()
        if "slowmount" in only:
            bench.slowmount()
        if "scaleout" in only:
            bench.scaleout()
        if "restore" in only:
            bench.restore()
    finally:
        if args.merge_results:
            take_earlier_rows(bench, earlier, only, args.merge_results)
        block = report(bench, command, started)
        json_path = REPO / "target/bench/results.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(dict(results=bench.results, notes=bench.notes), indent=1))
        bench.close()
    print()
    print(block)
    if not args.no_doc:
        write_doc(Path(args.out), block, args.quick, set(args.only.split(",")) | merged)
        say(f"\nwritten to {args.out} and {json_path}")


if __name__ == "__main__":
    main()
