#!/usr/bin/env python3
"""Checks on the AWS documents in packaging/aws/, one per subcommand (static.sh runs each as one
test). Exit 0 when the property holds, else 1 with the reason on stderr.

  check_aws.py parse                 every *.json parses
  check_aws.py no-delete             no Allow statement of any policy grants a delete, s3:* or *
  check_aws.py instance-policy       least privilege: exactly the actions a run uses, on the prefix
  check_aws.py bucket-policy         TLS required, only the role writes, levels split
  check_aws.py lifecycle             incomplete multipart uploads aborted after 7 days
  check_aws.py alarm                 the alarm of docs/metrics.md, within CloudWatch's limits

The prefix and names are the ones of config/nightcopy.example.yaml (see packaging/aws/README.md).
"""

import fnmatch
import glob
import json
import os
import sys

AWS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "aws")
BUCKET = "my-backups"
PREFIX = "fs/"
NAMESPACE = "Nightcopy"
ROLE = "arn:aws:iam::111122223333:role/nightcopy-backup"
POLICIES = ["iam-instance-policy.json", "iam-restore-policy.json", "bucket-policy.json"]


def load(name):
    with open(os.path.join(AWS_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def as_list(v):
    return v if isinstance(v, list) else [v]


def statements(doc):
    return as_list(doc["Statement"])


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def check_parse():
    files = sorted(glob.glob(os.path.join(AWS_DIR, "*.json")))
    if len(files) < 5:
        fail(f"expected at least 5 JSON files in {AWS_DIR}, found {files}")
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except ValueError as e:
            fail(f"{path}: {e}")


def grants_delete(action):
    """True when an IAM action pattern could match a delete (or everything)."""
    a = action.lower()
    if a in ("*", "s3:*"):
        return True
    # A wildcard pattern such as s3:Del* or s3:*Object* matches a delete action.
    deletes = ["s3:deleteobject", "s3:deleteobjectversion", "s3:deletebucket",
               "s3:deleteobjecttagging", "s3:deletebucketpolicy"]
    return a.startswith("s3:delete") or any(fnmatch.fnmatchcase(d, a) for d in deletes)


def check_no_delete():
    for name in POLICIES:
        for st in statements(load(name)):
            if st["Effect"] != "Allow":
                continue
            if "NotAction" in st:
                fail(f"{name} {st.get('Sid')}: Allow with NotAction grants everything else")
            for action in as_list(st["Action"]):
                if grants_delete(action):
                    fail(f"{name} {st.get('Sid')}: Allow {action} could delete")


def check_instance_policy():
    doc = load("iam-instance-policy.json")
    allowed = {}
    for st in statements(doc):
        if st["Effect"] != "Allow":
            fail(f"unexpected {st['Effect']} statement {st.get('Sid')}")
        for action in as_list(st["Action"]):
            allowed.setdefault(action, []).append(st)
    want = {"s3:ListBucket", "s3:PutObject", "s3:AbortMultipartUpload", "cloudwatch:PutMetricData"}
    if set(allowed) != want:
        fail(f"actions are {sorted(allowed)}, want exactly {sorted(want)}")
    for st in allowed["s3:ListBucket"]:
        if as_list(st["Resource"]) != [f"arn:aws:s3:::{BUCKET}"]:
            fail(f"ListBucket on {st['Resource']}, want the bucket ARN")
        prefixes = as_list(st.get("Condition", {}).get("StringLike", {}).get("s3:prefix", []))
        if not prefixes or any(not p.startswith(PREFIX) for p in prefixes):
            fail(f"ListBucket is not limited to the prefix {PREFIX}: {prefixes}")
    for action in ("s3:PutObject", "s3:AbortMultipartUpload"):
        for st in allowed[action]:
            if as_list(st["Resource"]) != [f"arn:aws:s3:::{BUCKET}/{PREFIX}*"]:
                fail(f"{action} on {st['Resource']}, want only arn:aws:s3:::{BUCKET}/{PREFIX}*")
    for st in allowed["cloudwatch:PutMetricData"]:
        ns = st.get("Condition", {}).get("StringEquals", {}).get("cloudwatch:namespace")
        if ns != NAMESPACE:
            fail(f"PutMetricData is not limited to the namespace {NAMESPACE}: {ns}")


def check_bucket_policy():
    sts = statements(load("bucket-policy.json"))
    tls = [s for s in sts if s["Effect"] == "Deny"
           and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"]
    if not tls or "s3:*" not in as_list(tls[0]["Action"]):
        fail("no statement denies every request without TLS")
    others = [s for s in sts if s["Effect"] == "Deny" and "s3:PutObject" in as_list(s["Action"])
              and s.get("Principal") == "*"
              and ROLE in as_list(s.get("Condition", {}).get("ArnNotEquals", {}).get("aws:PrincipalArn", []))]
    if not others:
        fail("no statement denies PutObject to every principal but the backup role")
    denied_to_role = set()
    for s in sts:
        if s["Effect"] == "Deny" and s.get("Principal") == {"AWS": ROLE}:
            denied_to_role.update(as_list(s["Action"]))
    for must in ("s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutBucketPolicy",
                 "s3:PutLifecycleConfiguration", "s3:PutBucketVersioning"):
        if must not in denied_to_role:
            fail(f"the backup role is not explicitly denied {must}")
    # Bucket-level and object-level resources never share a statement.
    for s in sts:
        resources = as_list(s["Resource"])
        levels = {"object" if "/" in r.split(":::", 1)[1] else "bucket" for r in resources}
        if len(levels) > 1 and s["Action"] != "s3:*":
            fail(f"{s.get('Sid')} mixes bucket and object resources")
        sid = s.get("Sid", "")
        if sid.startswith("BucketLevel") and levels != {"bucket"}:
            fail(f"{sid} is named bucket-level but names {resources}")
        if sid.startswith("ObjectLevel") and levels != {"object"}:
            fail(f"{sid} is named object-level but names {resources}")
    for s in sts:
        if s["Effect"] == "Allow" and s.get("Principal") != {"AWS": ROLE}:
            fail(f"{s.get('Sid')} allows someone other than the backup role")


def check_lifecycle():
    rules = load("lifecycle.json")["Rules"]
    ok = [r for r in rules if r.get("Status") == "Enabled"
          and r.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation") == 7
          and r.get("Filter", {}).get("Prefix", None) == ""]
    if not ok:
        fail(f"no enabled bucket-wide rule aborts incomplete multipart uploads after 7 days: {rules}")
    if any("Expiration" in r or "NoncurrentVersionExpiration" in r for r in rules):
        fail("the lifecycle deletes objects; it must only abort incomplete uploads")


def check_alarm():
    a = load("alarm-last-success.json")
    want = {
        "Namespace": NAMESPACE, "MetricName": "LastSuccess", "Statistic": "Maximum",
        "Period": 3600, "EvaluationPeriods": 25, "DatapointsToAlarm": 25, "Threshold": 1.0,
        "ComparisonOperator": "LessThanThreshold", "TreatMissingData": "breaching",
    }
    for k, v in want.items():
        if a.get(k) != v:
            fail(f"{k} is {a.get(k)!r}, docs/metrics.md says {v!r}")
    if not any(d["Name"] == "InstanceId" for d in a["Dimensions"]):
        fail("the alarm lacks the InstanceId dimension every data point carries")
    # CloudWatch's limit (PutMetricAlarm): Period x EvaluationPeriods <= 7 days, and <= 1 day
    # when the period is under an hour. Emulators do not enforce it.
    span = a["Period"] * a["EvaluationPeriods"]
    if span > 604800 or (a["Period"] < 3600 and span > 86400):
        fail(f"Period x EvaluationPeriods = {span} s is beyond CloudWatch's limit")


CHECKS = {
    "parse": check_parse,
    "no-delete": check_no_delete,
    "instance-policy": check_instance_policy,
    "bucket-policy": check_bucket_policy,
    "lifecycle": check_lifecycle,
    "alarm": check_alarm,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKS:
        fail(f"usage: {sys.argv[0]} {{{'|'.join(CHECKS)}}}")
    CHECKS[sys.argv[1]]()
