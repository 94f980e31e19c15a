#!/usr/bin/env python3
"""Strict IMDSv2 stand-in, so tests can run aws-config's default credential chain as on EC2.

moto's IMDS emulation omits the token-TTL response header, which aws-config rejects (`NoTtl`),
and it does not enforce tokens at all; this server behaves like IMDSv2 with `HttpTokens=required`:

  PUT /latest/api/token      needs `X-aws-ec2-metadata-token-ttl-seconds` (1..21600), answers a
                             random token and echoes the TTL header back (aws-config requires it);
                             a request carrying `X-Forwarded-For` is refused (403), as on EC2.
  GET <anything>             needs a valid, unexpired `X-aws-ec2-metadata-token`, else 401.
  GET /latest/meta-data/iam/security-credentials/          the role name
  GET /latest/meta-data/iam/security-credentials/<role>    the credentials JSON
  GET /latest/meta-data/instance-id, /placement/region, /placement/availability-zone
  GET /latest/dynamic/instance-identity/document           JSON with region and instanceId

Usage:
  IMDS_ACCESS_KEY_ID=AK IMDS_SECRET_ACCESS_KEY=SK IMDS_SESSION_TOKEN=TOKEN \
  imds.py --listen 127.0.0.1:0 --log FILE --role ROLE --instance-id i-... --region us-east-1

The credential values may also be given as --access-key-id / --secret-access-key /
--session-token; the environment keeps them off the command line, where `ps` would show them.

The first stdout line is the bound port (`--listen` port 0 picks a free one), printed once the
socket listens, so a harness can read it without racing. Nothing else goes to stdout; the
credential values are never printed or logged.

The log (`--log`) gets one line per request, flushed at once, tab-separated:
  METHOD <TAB> PATH <TAB> TOKEN <TAB> STATUS
where TOKEN is `valid`, `missing`, `invalid` or `expired` (and `-` for the token PUT itself).
Tests read it to assert the token flow (PUT before any GET, every GET with a valid token).
Only 127.0.0.1 is accepted as a listen address.
"""

import argparse
import datetime
import json
import os
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from listen import parse_listen  # tests/servers/listen.py, beside this file

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
CREDS_PREFIX = "/latest/meta-data/iam/security-credentials/"
MAX_TTL = 21600  # EC2's limit: six hours


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.tokens = {}  # token -> monotonic expiry
        self.log = open(args.log, "a", encoding="utf-8") if args.log else None

    def issue(self, ttl):
        token = secrets.token_urlsafe(32)
        with self.lock:
            self.tokens[token] = time.monotonic() + ttl
        return token

    def check(self, token):
        if token is None:
            return "missing"
        with self.lock:
            expiry = self.tokens.get(token)
        if expiry is None:
            return "invalid"
        if time.monotonic() >= expiry:
            return "expired"
        return "valid"

    def record(self, method, path, token_state, status):
        if self.log is None:
            return
        with self.lock:
            self.log.write(f"{method}\t{path}\t{token_state}\t{status}\n")
            self.log.flush()


def iso(ts):
    return ts.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Handler(BaseHTTPRequestHandler):
    server_version = "imds-standin"
    protocol_version = "HTTP/1.1"  # keep-alive, like the real service; aws-config pools connections

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        pass  # the request log goes to --log; stderr stays quiet

    @property
    def state(self):
        return self.server.state

    def reply(self, status, body=b"", content_type="text/plain", headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def drain(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def do_PUT(self):
        self.drain()
        path = self.path
        if path != TOKEN_PATH:
            status = 404
        elif self.headers.get("X-Forwarded-For") is not None:
            status = 403
        else:
            raw = self.headers.get(TTL_HEADER)
            try:
                ttl = int(raw)
            except (TypeError, ValueError):
                ttl = 0
            status = 200 if 1 <= ttl <= MAX_TTL else 400
        if status != 200:
            self.state.record("PUT", path, "-", status)
            self.reply(status)
            return
        token = self.state.issue(ttl)
        self.state.record("PUT", path, "-", 200)
        self.reply(200, token, headers=[(TTL_HEADER, str(ttl))])

    def do_GET(self):
        path = self.path
        token_state = self.state.check(self.headers.get(TOKEN_HEADER))
        if token_state != "valid":
            self.state.record("GET", path, token_state, 401)
            self.reply(401)
            return
        status, body, content_type = self.route(path)
        self.state.record("GET", path, token_state, status)
        self.reply(status, body, content_type)

    def route(self, path):
        a = self.state.args
        now = datetime.datetime.now(datetime.timezone.utc)
        if path == CREDS_PREFIX:
            return 200, a.role, "text/plain"
        if path == CREDS_PREFIX + a.role:
            doc = {
                "Code": "Success",
                "LastUpdated": iso(now),
                "Type": "AWS-HMAC",
                "AccessKeyId": a.access_key_id,
                "SecretAccessKey": a.secret_access_key,
                "Token": a.session_token,
                "Expiration": iso(now + datetime.timedelta(hours=6)),
            }
            return 200, json.dumps(doc, indent=2), "text/plain"
        if path == "/latest/meta-data/instance-id":
            return 200, a.instance_id, "text/plain"
        if path == "/latest/meta-data/placement/region":
            return 200, a.region, "text/plain"
        if path == "/latest/meta-data/placement/availability-zone":
            return 200, a.region + "a", "text/plain"
        if path == "/latest/dynamic/instance-identity/document":
            doc = {
                "accountId": "123456789012",
                "availabilityZone": a.region + "a",
                "instanceId": a.instance_id,
                "region": a.region,
            }
            return 200, json.dumps(doc, indent=2), "text/plain"
        return 404, "", "text/plain"

    def refuse(self):
        self.drain()
        self.state.record(self.command, self.path, "-", 405)
        self.reply(405)

    do_POST = do_DELETE = do_PATCH = refuse


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 0))
    p.add_argument("--log", help="file to append one line per request to")
    p.add_argument("--role", required=True)
    p.add_argument("--access-key-id", default=os.environ.get("IMDS_ACCESS_KEY_ID"))
    p.add_argument("--secret-access-key", default=os.environ.get("IMDS_SECRET_ACCESS_KEY"))
    p.add_argument("--session-token", default=os.environ.get("IMDS_SESSION_TOKEN"))
    p.add_argument("--instance-id", default="i-0123456789abcdef0")
    p.add_argument("--region", default="us-east-1")
    args = p.parse_args()
    for name in ("access_key_id", "secret_access_key", "session_token"):
        if not getattr(args, name):
            p.error(f"--{name.replace('_', '-')} or IMDS_{name.upper()} is required")

    server = ThreadingHTTPServer(args.listen, Handler)
    server.daemon_threads = True
    server.state = State(args)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
