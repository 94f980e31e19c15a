#!/usr/bin/env python3
"""Lets aws-sdk-cloudwatch (Smithy RPCv2-CBOR) talk to moto, which speaks CloudWatch only as JSON/query.

aws-sdk-cloudwatch >= 1.100 POSTs CBOR to /service/GraniteServiceVersion20100801/operation/<Op>;
moto 5.2.5 answers that route with 404 (moto issue 9195). This proxy decodes the CBOR request,
sends the same operation to moto with the awsJson1.0 protocol, and encodes moto's JSON answer
(or error) back into CBOR, so the metrics are stored and read back by moto's real CloudWatch
implementation rather than by a recorder.

Usage:
  cloudwatch_cbor_proxy.py --listen 127.0.0.1:0 --moto http://127.0.0.1:MOTO_PORT

The first stdout line is the bound port (`--listen` port 0 picks a free one), printed once the
socket listens. Only 127.0.0.1 is accepted, for listening and for --moto.

Test hooks (plain text, not part of CloudWatch):
  GET /__requests   one line per CloudWatch request seen, tab-separated:
                    OPERATION <TAB> STATUS <TAB> NAMESPACE <TAB> N_METRIC_DATA
                    (NAMESPACE is `-` when the request has none; N_METRIC_DATA counts the
                    MetricData entries of a PutMetricData, 0 for other operations).
  GET /__health     200 "ok" once moto answers a CloudWatch call (ListMetrics), 502 otherwise.

Traps this encodes (each found against aws-sdk-cloudwatch 1.140 and moto 5.2.5):
- moto picks the service from the SigV4 credential scope (`.../monitoring/aws4_request`) of the
  Authorization header; without it the request lands in moto's S3 backend, which answers 200 with a
  ListAllMyBuckets XML. So the SigV4 headers are forwarded as sent (moto does not verify signatures;
  the signature is over the CBOR request and would not verify against the JSON one anyway).
- The SDK reads CBOR doubles strictly: minicbor's f64() accepts only CBOR floats, so an integral
  value encoded as a CBOR integer (`1` instead of `1.0`) fails to deserialize. Members that are
  doubles in the model are therefore forced to float. cbor2 must not use canonical mode, which may
  shrink floats to half precision (the SDK's minicbor is not guaranteed to read f16).
- Timestamps are CBOR tag 1 (epoch seconds) both ways; the JSON protocol wants epoch numbers.
  cbor2 decodes tag 1 to a datetime, so requests are converted to epoch floats, and epoch numbers
  (moto sends ints in GetMetricData's Timestamps, floats elsewhere) become tag 1 floats.
- Blobs are base64 strings in JSON and byte strings in CBOR.
- CloudWatch is "awsQueryCompatible": the SDK matches errors on the query error code, taken from
  the `x-amzn-query-error: Code;Sender` header (moto sends it) or else from `__type`. Errors must be
  a CBOR map even when moto fails with an HTML page, or the SDK reports a deserialization error.
- PutMetricData bodies over the SDK's compression threshold (10 KiB by default) arrive gzip-encoded.
- urllib honours http_proxy/no_proxy from the environment; the moto leg disables that so a proxy
  setting on a CI machine cannot send test traffic anywhere but 127.0.0.1.
"""

import argparse
import base64
import datetime
import gzip
import json
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cbor2

from listen import parse_listen  # tests/servers/listen.py, beside this file

PREFIX = "/service/GraniteServiceVersion20100801/operation/"
TARGET_PREFIX = "GraniteServiceVersion20100801."

# Member names whose shapes are timestamp / double / blob in the CloudWatch model (botocore
# cloudwatch/2010-08-01/service-2.json). "Value" and "ExtendedStatistics" are also string-typed in
# other structures, so conversion applies only to values that already have the matching JSON type.
TIMESTAMP_MEMBERS = {
    "AlarmConfigurationUpdatedTimestamp", "CreatedAt", "CreationDate", "EndDate", "EndTime",
    "ExpireDate", "LastModified", "LastUpdateDate", "LastUpdatedTimestamp", "StartDate",
    "StartTime", "StateTransitionedTimestamp", "StateUpdatedTimestamp", "Timestamp",
    "Timestamps", "UpdatedAt",
}
DOUBLE_MEMBERS = {
    "AggregateValue", "ApproximateAggregateValue", "ApproximateValue", "Average", "Counts",
    "ExtendedStatistics", "MaxContributorValue", "Maximum", "Minimum", "SampleCount", "Sum",
    "Threshold", "UniqueContributors", "Value", "Values",
}
BLOB_MEMBERS = {"MetricWidgetImage"}

UTC = datetime.timezone.utc


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---- CBOR request -> JSON request ------------------------------------------------------------

def to_json(value):
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    if isinstance(value, cbor2.CBORTag) and value.tag == 1:
        return float(value.value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, cbor2.CBORTag):
        raise ValueError(f"unexpected CBOR tag {value.tag}")
    return value


# ---- JSON response -> CBOR response ----------------------------------------------------------

def to_cbor(value, member=None):
    if isinstance(value, dict):
        # a map of doubles (ExtendedStatistics) keeps its member context; a structure does not
        if member in DOUBLE_MEMBERS:
            return {k: to_cbor(v, member) for k, v in value.items()}
        return {k: to_cbor(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cbor(v, member) for v in value]
    if member in TIMESTAMP_MEMBERS:
        if is_number(value):
            return cbor2.CBORTag(1, float(value))
        if isinstance(value, str):
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return cbor2.CBORTag(1, parsed.timestamp())
    if member in DOUBLE_MEMBERS and is_number(value):
        return float(value)
    if member in BLOB_MEMBERS and isinstance(value, str):
        return base64.b64decode(value)
    return value


class Moto:
    def __init__(self, base):
        parsed = urllib.parse.urlsplit(base)
        if parsed.scheme != "http" or parsed.hostname != "127.0.0.1":
            raise SystemExit("--moto must be http://127.0.0.1:PORT")
        self.url = f"http://127.0.0.1:{parsed.port}/"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, op, payload, headers):
        """Returns (status, headers, body bytes); never raises for an HTTP status."""
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), method="POST")
        for name, value in headers.items():
            req.add_header(name, value)
        req.add_header("X-Amz-Target", TARGET_PREFIX + op)
        req.add_header("Content-Type", "application/x-amz-json-1.0")
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()
        except (urllib.error.URLError, OSError) as err:
            # moto not up yet (the harness polls /__health) or gone: answer, don't crash the handler
            return 502, {}, f"moto unreachable: {err}".encode()


# Request headers worth passing on: SigV4 (moto routes on the credential scope) and the SDK's ids.
FORWARDED = (
    "Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-Sha256",
    "User-Agent", "X-Amz-User-Agent", "amz-sdk-invocation-id", "amz-sdk-request",
)


class Log:
    def __init__(self):
        self.lock = threading.Lock()
        self.lines = []

    def add(self, op, status, namespace, n_data):
        with self.lock:
            self.lines.append(f"{op}\t{status}\t{namespace or '-'}\t{n_data}")

    def text(self):
        with self.lock:
            return "".join(line + "\n" for line in self.lines)


class Handler(BaseHTTPRequestHandler):
    server_version = "cloudwatch-cbor-proxy"
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK pools connections

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        pass

    def send(self, status, body, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_cbor(self, status, doc, headers=()):
        body = cbor2.dumps(doc)
        self.send(status, body, "application/cbor", [("smithy-protocol", "rpc-v2-cbor"), *headers])

    def send_error_cbor(self, status, code, message, request_id=None, query_error=None):
        doc = {"__type": code, "message": message}
        fault = "Sender" if status < 500 else "Receiver"
        short = code.rsplit("#", 1)[-1]
        headers = [("x-amzn-query-error", query_error or f"{short};{fault}")]
        if request_id:
            headers.append(("x-amzn-RequestId", request_id))
        self.send_cbor(status, doc, headers)

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        return body

    def do_GET(self):
        if self.path == "/__requests":
            self.send(200, self.server.log.text().encode(), "text/plain; charset=utf-8")
        elif self.path == "/__health":
            status, _, body = self.server.moto.call("ListMetrics", {"Namespace": "__health"}, {
                "Authorization": "AWS4-HMAC-SHA256 Credential=HEALTH/20000101/us-east-1/"
                                 "monitoring/aws4_request, SignedHeaders=host, Signature=0",
            })
            ok = status == 200 and body.lstrip().startswith(b"{")
            self.send(200 if ok else 502, b"ok" if ok else body[:200], "text/plain")
        else:
            self.send(404, b"", "text/plain")

    def do_POST(self):
        body = self.read_body()
        if not self.path.startswith(PREFIX):
            self.send_error_cbor(404, "UnknownOperationException", f"no route for {self.path}")
            return
        op = self.path[len(PREFIX):]
        # Strict about the protocol markers, so a change in the SDK shows up here, not as a
        # confusing moto error.
        if self.headers.get("smithy-protocol") != "rpc-v2-cbor":
            self.reject(op, "smithy-protocol header must be rpc-v2-cbor")
            return
        if body and self.headers.get("Content-Type") != "application/cbor":
            self.reject(op, "Content-Type must be application/cbor")
            return
        try:
            request = cbor2.loads(body) if body else {}
            if not isinstance(request, dict):
                raise ValueError("the request body is not a CBOR map")
            payload = to_json(request)
        except Exception as err:  # any decoding problem is the client's
            self.reject(op, f"cannot decode the CBOR request: {err}")
            return

        headers = {h: self.headers[h] for h in FORWARDED if self.headers.get(h) is not None}
        status, moto_headers, raw = self.server.moto.call(op, payload, headers)
        request_id = moto_headers.get("x-amzn-RequestId")
        namespace = payload.get("Namespace")
        n_data = len(payload.get("MetricData") or []) if op == "PutMetricData" else 0
        self.server.log.add(op, status, namespace, n_data)

        try:
            doc = json.loads(raw) if raw.strip() else {}
        except ValueError:
            doc = None
        if status >= 300 or not isinstance(doc, dict):
            if not isinstance(doc, dict):
                doc = {"__type": "InternalFailure",
                       "message": f"moto answered {status}: {raw[:200].decode(errors='replace')}"}
                status = status if status >= 300 else 500
            message = doc.get("message") or doc.get("Message") or ""
            self.send_error_cbor(status, doc.get("__type", "InternalFailure"), message,
                                 request_id, moto_headers.get("x-amzn-query-error"))
            return
        extra = [("x-amzn-RequestId", request_id)] if request_id else []
        self.send_cbor(200, to_cbor(doc), extra)

    def reject(self, op, message):
        self.server.log.add(op, 400, None, 0)
        self.send_error_cbor(400, "ValidationError", message)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 0))
    p.add_argument("--moto", required=True, help="http://127.0.0.1:PORT of moto_server")
    args = p.parse_args()

    server = ThreadingHTTPServer(args.listen, Handler)
    server.daemon_threads = True
    server.moto = Moto(args.moto)
    server.log = Log()
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
