#!/usr/bin/env python3
"""Checks on the AWS documents in packaging/aws/, one per subcommand (static.sh runs each as one
test). Exit 0 when the property holds, else 1 with the reason on stderr.

  check_aws.py parse                 every *.json parses
  check_aws.py no-delete             no Allow statement of any policy grants a delete, a way
                                     around a retention, s3:* or *
  check_aws.py instance-policy       least privilege: exactly the actions a run uses, on the prefix
  check_aws.py restore-policy        the restore policy: exactly what restore and verify use, on
                                     the prefix, s3:RestoreObject included; no other document
                                     grants s3:RestoreObject, and the bucket policy denies it to
                                     the backup role
  check_aws.py bucket-policy         TLS required, only the role writes, levels split, the role
                                     can set a retention (bounded) but never lift one
  check_aws.py lifecycle             incomplete multipart uploads aborted after 7 days
  check_aws.py bucket-template       bucket.yaml: versioning, Object Lock, no public access,
                                     default encryption, lifecycle.json's rule, kept on delete
  check_aws.py alarm                 the alarm of docs/metrics.md, within CloudWatch's limits
  check_aws.py scale-out-roles       scale-out.yaml: both roles have the instance policy's S3 and
                                     CloudWatch statements with exactly one change each (the
                                     coordinator reads the prefix, a worker is denied writing
                                     .nightcopy/), only their SQS calls, and read only the key,
                                     a generated plain-text secret of 64 characters
  check_aws.py scale-out-queues      scale-out.yaml: redrive to the DLQ, retention, SSE, TLS only,
                                     and the scaling policy's backlog per worker

The prefix and names are the ones of config/nightcopy.example.yaml (see packaging/aws/README.md).
scale-out.yaml and bucket.yaml are CloudFormation templates (YAML with !Ref, !Sub … tags): they
need PyYAML, so static.sh runs this script with the packaging venv's Python. Their statements and
settings are compared with the JSON documents after their parameters are replaced by their
defaults.
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
TEMPLATE = "scale-out.yaml"
BUCKET_TEMPLATE = "bucket.yaml"
# What the instance policy grants, per resource: the bucket, the objects under the prefix, and the
# manifest's copy (offsite.rs; `<prefix>.nightcopy/manifest.gz`), which a host with an empty state
# directory reads back. Nothing else is read: the backed-up objects are the restore role's.
BUCKET_ARN = f"arn:aws:s3:::{BUCKET}"
PREFIX_ARN = f"arn:aws:s3:::{BUCKET}/{PREFIX}*"
MANIFEST_ARN = f"arn:aws:s3:::{BUCKET}/{PREFIX}.nightcopy/manifest.gz"
INSTANCE_WANT = {
    "s3:ListBucket": BUCKET_ARN,
    "s3:GetBucketVersioning": BUCKET_ARN,
    "s3:GetBucketObjectLockConfiguration": BUCKET_ARN,
    "s3:PutObject": PREFIX_ARN,
    "s3:PutObjectRetention": PREFIX_ARN,
    "s3:ListMultipartUploadParts": PREFIX_ARN,
    "s3:AbortMultipartUpload": PREFIX_ARN,
    "s3:GetObject": MANIFEST_ARN,
    "cloudwatch:PutMetricData": "*",
}
# What the restore policy grants (restore and verify, `restore --thaw` included), per resource.
RESTORE_WANT = {
    "s3:ListBucket": BUCKET_ARN,
    "s3:ListBucketVersions": BUCKET_ARN,
    "s3:GetObject": PREFIX_ARN,
    "s3:GetObjectVersion": PREFIX_ARN,
    "s3:RestoreObject": PREFIX_ARN,
}
# The scale-out roles differ from the instance policy in one statement each (scale-out.yaml says
# why): the coordinator reads every object under the prefix (a HEAD of each upload a worker
# reports, and the manifest's copy) instead of the copy alone, and a worker may not write
# nightcopy's reserved `<prefix>.nightcopy/`, by a Deny no Allow can override.
RESERVED_ARN = f"arn:aws:s3:::{BUCKET}/{PREFIX}.nightcopy/*"
COORDINATOR_READ = {"Sid": "HeadReportedUploadsAndReadTheManifestCopy", "Effect": "Allow",
                    "Action": "s3:GetObject", "Resource": PREFIX_ARN}
WORKER_DENY = {"Sid": "DenyWritingTheReservedPrefix", "Effect": "Deny",
               "Action": ["s3:PutObject", "s3:PutObjectRetention", "s3:AbortMultipartUpload"],
               "Resource": RESERVED_ARN}
# What each role may and may not do on an object, whatever its statements look like: (action,
# object key, allowed?). The manifest's copy stands for the reserved part of the prefix.
MANIFEST_KEY = f"{PREFIX}.nightcopy/manifest.gz"
ROLE_OBJECT_ACCESS = {
    "CoordinatorRole": [("s3:GetObject", f"{PREFIX}home/a.txt", True),
                        ("s3:GetObject", MANIFEST_KEY, True),
                        ("s3:PutObject", MANIFEST_KEY, True),
                        ("s3:GetObjectVersion", f"{PREFIX}home/a.txt", False),
                        ("s3:GetObject", "other/a.txt", False)],
    "WorkerRole": [("s3:PutObject", f"{PREFIX}home/a.txt", True),
                   ("s3:PutObject", MANIFEST_KEY, False),
                   ("s3:PutObject", f"{PREFIX}.nightcopy/index-1", False),
                   ("s3:PutObjectRetention", MANIFEST_KEY, False),
                   ("s3:AbortMultipartUpload", MANIFEST_KEY, False),
                   ("s3:GetObject", f"{PREFIX}home/a.txt", False)],
}
# Pseudo parameters, as in the example account of packaging/aws/README.md.
PSEUDO = {"AWS::Partition": "aws", "AWS::Region": "eu-west-1", "AWS::AccountId": "111122223333",
          "AWS::StackName": "nightcopy"}
# The SQS calls each side makes, per queue (logical IDs of scale-out.yaml); nothing else.
SQS_WANT = {
    "CoordinatorRole": {
        "WorkQueue": {"sqs:SendMessage", "sqs:GetQueueAttributes"},
        "ResultsQueue": {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"},
        "DeadLetterQueue": {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"},
    },
    "WorkerRole": {
        "WorkQueue": {"sqs:ReceiveMessage", "sqs:ChangeMessageVisibility", "sqs:DeleteMessage",
                      "sqs:GetQueueAttributes"},
        "ResultsQueue": {"sqs:SendMessage"},
    },
}


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


def load_template(name=TEMPLATE):
    """A template with each short-form intrinsic function as its long form ({"Ref": …})."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def intrinsic(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        if suffix == "Ref":
            return {"Ref": value}
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {f"Fn::{suffix}": value}

    Loader.add_multi_constructor("!", intrinsic)
    with open(os.path.join(AWS_DIR, name), encoding="utf-8") as f:
        return yaml.load(f, Loader=Loader)  # noqa: S506 - SafeLoader plus the CloudFormation tags


def resolve(value, params):
    """Replaces Ref and Fn::Sub of parameters (their defaults) and pseudo parameters."""
    known = {**PSEUDO, **{k: str(v.get("Default", "")) for k, v in params.items()}}
    if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in known:
        return known[value["Ref"]]
    if isinstance(value, dict) and set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        out = value["Fn::Sub"]
        for k, v in known.items():
            out = out.replace("${" + k + "}", v)
        if "${" in out:
            fail(f"cannot resolve {value}")
        return out
    if isinstance(value, dict):
        return {k: resolve(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, params) for v in value]
    return value


def template_policies(t, where=TEMPLATE):
    """(where, policy document) of every IAM and resource policy in the template."""
    out = []
    for name, r in t["Resources"].items():
        props = r.get("Properties", {})
        for p in props.get("Policies", []):
            out.append((f"{where} {name} {p.get('PolicyName')}", p["PolicyDocument"]))
        if "PolicyDocument" in props:
            out.append((f"{where} {name}", props["PolicyDocument"]))
        if "ManagedPolicyArns" in props:
            fail(f"{where} {name}: attaches managed policies {props['ManagedPolicyArns']}")
    return out


def grants_delete(action):
    """True when an IAM action pattern could match a delete (or everything)."""
    a = action.lower()
    if a in ("*", "s3:*"):
        return True
    # A wildcard pattern such as s3:Del* or s3:*Object* matches a delete action.
    deletes = ["s3:deleteobject", "s3:deleteobjectversion", "s3:deletebucket",
               "s3:deleteobjecttagging", "s3:deletebucketpolicy"]
    return a.startswith("s3:delete") or any(fnmatch.fnmatchcase(d, a) for d in deletes)


def grants_unlock(action):
    """True when an IAM action pattern could shorten or lift a retention or a legal hold."""
    a = action.lower()
    unlocks = ["s3:bypassgovernanceretention", "s3:putobjectlegalhold"]
    return any(fnmatch.fnmatchcase(u, a) for u in unlocks)


def grants_queue_change(action):
    """True when an IAM action pattern could purge, delete or reconfigure a queue (or all SQS)."""
    a = action.lower()
    changes = ["sqs:deletequeue", "sqs:purgequeue", "sqs:setqueueattributes", "sqs:createqueue",
               "sqs:addpermission", "sqs:removepermission", "sqs:startmessagemovetask"]
    return a in ("*", "sqs:*") or any(fnmatch.fnmatchcase(c, a) for c in changes)


def check_no_delete():
    documents = [(name, load(name)) for name in POLICIES]
    documents += template_policies(load_template())
    documents += template_policies(load_template(BUCKET_TEMPLATE), BUCKET_TEMPLATE)
    for name, doc in documents:
        for st in statements(doc):
            if st["Effect"] != "Allow":
                continue
            if "NotAction" in st or "NotResource" in st:
                fail(f"{name} {st.get('Sid')}: Allow with NotAction/NotResource grants everything else")
            for action in as_list(st["Action"]):
                if grants_delete(action):
                    fail(f"{name} {st.get('Sid')}: Allow {action} could delete")
                if grants_unlock(action):
                    fail(f"{name} {st.get('Sid')}: Allow {action} could lift a retention")
                if grants_queue_change(action):
                    fail(f"{name} {st.get('Sid')}: Allow {action} could purge or change a queue")


def check_instance_policy():
    doc = load("iam-instance-policy.json")
    allowed = {}
    for st in statements(doc):
        if st["Effect"] != "Allow":
            fail(f"unexpected {st['Effect']} statement {st.get('Sid')}")
        for action in as_list(st["Action"]):
            allowed.setdefault(action, []).append(st)
    if set(allowed) != set(INSTANCE_WANT):
        fail(f"actions are {sorted(allowed)}, want exactly {sorted(INSTANCE_WANT)}")
    for action, resource in INSTANCE_WANT.items():
        for st in allowed[action]:
            if as_list(st["Resource"]) != [resource]:
                fail(f"{action} on {st['Resource']}, want only {resource}")
    for st in allowed["s3:ListBucket"]:
        prefixes = as_list(st.get("Condition", {}).get("StringLike", {}).get("s3:prefix", []))
        if not prefixes or any(not p.startswith(PREFIX) for p in prefixes):
            fail(f"ListBucket is not limited to the prefix {PREFIX}: {prefixes}")
    for st in allowed["cloudwatch:PutMetricData"]:
        ns = st.get("Condition", {}).get("StringEquals", {}).get("cloudwatch:namespace")
        if ns != NAMESPACE:
            fail(f"PutMetricData is not limited to the namespace {NAMESPACE}: {ns}")


def check_restore_policy():
    doc = load("iam-restore-policy.json")
    allowed = {}
    for st in statements(doc):
        if st["Effect"] != "Allow":
            fail(f"unexpected {st['Effect']} statement {st.get('Sid')}")
        for action in as_list(st["Action"]):
            allowed.setdefault(action, []).append(st)
    if set(allowed) != set(RESTORE_WANT):
        fail(f"actions are {sorted(allowed)}, want exactly {sorted(RESTORE_WANT)}")
    for action, resource in RESTORE_WANT.items():
        for st in allowed[action]:
            if as_list(st["Resource"]) != [resource]:
                fail(f"{action} on {st['Resource']}, want only {resource}")
    for st in allowed["s3:ListBucket"] + allowed["s3:ListBucketVersions"]:
        prefixes = as_list(st.get("Condition", {}).get("StringLike", {}).get("s3:prefix", []))
        if not prefixes or any(not p.startswith(PREFIX) for p in prefixes):
            fail(f"{st.get('Sid')} is not limited to the prefix {PREFIX}: {prefixes}")
    # A thaw is billed: only whoever restores may ask for one, never the backup's roles.
    others = [(name, load(name)) for name in POLICIES if name != "iam-restore-policy.json"]
    others += template_policies(load_template())
    others += template_policies(load_template(BUCKET_TEMPLATE), BUCKET_TEMPLATE)
    for name, doc in others:
        for st in statements(doc):
            if st["Effect"] == "Allow" and any(
                    fnmatch.fnmatch("s3:restoreobject", a.lower()) for a in as_list(st["Action"])):
                fail(f"{name} {st.get('Sid')}: allows s3:RestoreObject; only the restore policy may")
    denied = [s for s in statements(load("bucket-policy.json"))
              if s["Effect"] == "Deny" and s.get("Principal") == {"AWS": ROLE}
              and "Condition" not in s and "s3:RestoreObject" in as_list(s["Action"])]
    if not denied:
        fail("the bucket policy does not deny s3:RestoreObject to the backup role")


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
    for s in sts:
        if (s["Effect"] == "Deny" and s.get("Principal") == {"AWS": ROLE} and "Condition" not in s
                and "s3:PutObjectRetention" in as_list(s["Action"])):
            fail(f"{s.get('Sid')} denies the backup role s3:PutObjectRetention outright: "
                 "destination.object-lock could not write a single object")
    denied_to_role = set()
    for s in sts:
        if s["Effect"] == "Deny" and s.get("Principal") == {"AWS": ROLE} and "Condition" not in s:
            denied_to_role.update(as_list(s["Action"]))
    for must in ("s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutBucketPolicy",
                 "s3:PutLifecycleConfiguration", "s3:PutBucketVersioning",
                 "s3:BypassGovernanceRetention", "s3:PutObjectLegalHold",
                 "s3:PutBucketObjectLockConfiguration"):
        if must not in denied_to_role:
            fail(f"the backup role is not explicitly denied {must}")
    # A retention can only be lengthened without s3:BypassGovernanceRetention; what bounds how
    # far is a deny above a number of days.
    caps = [s for s in sts if s["Effect"] == "Deny" and s.get("Principal") == {"AWS": ROLE}
            and as_list(s["Action"]) == ["s3:PutObjectRetention"]
            and "s3:object-lock-remaining-retention-days"
            in s.get("Condition", {}).get("NumericGreaterThan", {})]
    if not caps:
        fail("no statement bounds the retention the backup role may set")
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


def check_bucket_template():
    t = load_template(BUCKET_TEMPLATE)
    params = t["Parameters"]
    buckets = {n: r for n, r in t["Resources"].items() if r["Type"] == "AWS::S3::Bucket"}
    if len(buckets) != 1:
        fail(f"{BUCKET_TEMPLATE}: want exactly one bucket, found {sorted(buckets)}")
    name, r = next(iter(buckets.items()))
    # The backups outlive the stack: deleting it, or a change that replaces the bucket, keeps it.
    if r.get("DeletionPolicy") != "Retain" or r.get("UpdateReplacePolicy") != "Retain":
        fail(f"{name}: DeletionPolicy and UpdateReplacePolicy must both be Retain")
    props = r["Properties"]
    if props.get("VersioningConfiguration", {}).get("Status") != "Enabled":
        fail(f"{name}: versioning is not enabled")
    if props.get("ObjectLockEnabled") is not True:
        fail(f"{name}: Object Lock is not enabled at creation (ObjectLockEnabled: true)")
    block = props.get("PublicAccessBlockConfiguration", {})
    for k in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"):
        if block.get(k) is not True:
            fail(f"{name}: {k} is not true")
    sse = props.get("BucketEncryption", {}).get("ServerSideEncryptionConfiguration", [])
    if not sse or "ServerSideEncryptionByDefault" not in sse[0]:
        fail(f"{name}: no default encryption")
    # Default retention and noncurrent-version expiration are off unless asked for: with the
    # defaults, nothing is locked by the bucket and nothing is ever deleted.
    lock = resolve(props.get("ObjectLockConfiguration"), params)
    cond = t["Conditions"]
    if params["DefaultRetentionMode"].get("Default") != "" or not (
            isinstance(lock, dict) and lock.get("Fn::If", [None])[0] == "HasDefaultRetention"
            and lock["Fn::If"][2] == {"Ref": "AWS::NoValue"}):
        fail(f"{name}: the default retention must be off by default (DefaultRetentionMode '')")
    if cond.get("HasDefaultRetention") != {"Fn::Not": [{"Fn::Equals": [{"Ref": "DefaultRetentionMode"}, ""]}]}:
        fail(f"{name}: HasDefaultRetention is not 'DefaultRetentionMode is set'")
    rules = props.get("LifecycleConfiguration", {}).get("Rules", [])
    plain = [x for x in rules if "Fn::If" not in x]
    conditional = [x for x in rules if "Fn::If" in x]
    want = load("lifecycle.json")["Rules"]
    got = [{"ID": x.get("Id"), "Status": x.get("Status"), "Filter": {"Prefix": x.get("Prefix", "")},
            "AbortIncompleteMultipartUpload": x.get("AbortIncompleteMultipartUpload")}
           for x in plain]
    if got != want:
        fail(f"{name}: the unconditional lifecycle rules are not lifecycle.json's:\n{json.dumps(got, indent=1)}")
    for x in conditional:
        c, rule, other = x["Fn::If"]
        if other != {"Ref": "AWS::NoValue"} or set(rule) - {"Id", "Status", "NoncurrentVersionExpiration"}:
            fail(f"{name}: an optional lifecycle rule may only expire noncurrent versions: {x}")
        if cond.get(c) != {"Fn::Not": [{"Fn::Equals": [{"Ref": "NoncurrentVersionExpirationDays"}, "0"]}]}:
            fail(f"{name}: the noncurrent-version rule is not conditional on NoncurrentVersionExpirationDays")
    if str(params["NoncurrentVersionExpirationDays"].get("Default")) != "0":
        fail(f"{name}: noncurrent versions must be kept by default (NoncurrentVersionExpirationDays 0)")


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


def allows(sts, action, resource):
    """IAM's verdict for one action on one resource, over Allow and Deny statements with plain
    Action and Resource lists (wildcards * and ?): allowed when some Allow matches and no Deny."""
    def matches(st):
        return (any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in as_list(st["Action"]))
                and any(fnmatch.fnmatchcase(resource, r) for r in as_list(st["Resource"])))
    hits = [st for st in sts if matches(st)]
    return any(st["Effect"] == "Allow" for st in hits) and not any(st["Effect"] == "Deny" for st in hits)


def check_scale_out_roles():
    t = load_template()
    params = t["Parameters"]
    res = t["Resources"]
    instance = statements(load("iam-instance-policy.json"))
    if sum(1 for s in instance if s.get("Sid") == "ReadTheManifestCopy") != 1:
        fail("iam-instance-policy.json has no ReadTheManifestCopy statement for the coordinator to widen")
    want_s3 = {
        "CoordinatorRole": [COORDINATOR_READ if s.get("Sid") == "ReadTheManifestCopy" else s for s in instance],
        "WorkerRole": instance + [WORKER_DENY],
    }
    # The key: a generated plain-text secret (no JSON template), letters and digits, of at least
    # the 32 bytes nightcopy requires; its ARN is an output.
    secrets = {n: r for n, r in res.items() if r["Type"] == "AWS::SecretsManager::Secret"}
    if list(secrets) != ["AuthKeySecret"]:
        fail(f"{TEMPLATE}: want exactly one secret, AuthKeySecret, found {sorted(secrets)}")
    gen = secrets["AuthKeySecret"]["Properties"].get("GenerateSecretString", {})
    if (int(gen.get("PasswordLength", 0)) != 64 or gen.get("ExcludePunctuation") is not True
            or gen.get("IncludeSpace", False) is not False
            or {"SecretStringTemplate", "GenerateStringKey"} & set(gen)):
        fail(f"AuthKeySecret generates {gen}, want 64 letters and digits as plain text")
    if "SecretString" in secrets["AuthKeySecret"]["Properties"]:
        fail("AuthKeySecret carries a SecretString in the template; the key must be generated")
    if t.get("Outputs", {}).get("AuthKeySecretArn", {}).get("Value") != {"Ref": "AuthKeySecret"}:
        fail("no output AuthKeySecretArn with the secret's ARN")
    for role, queues in SQS_WANT.items():
        r = res.get(role)
        if not r or r["Type"] != "AWS::IAM::Role":
            fail(f"{TEMPLATE}: no role {role}")
        props = r["Properties"]
        trust = statements(props["AssumeRolePolicyDocument"])
        if [s.get("Principal") for s in trust] != [{"Service": "ec2.amazonaws.com"}]:
            fail(f"{role} is assumable by {[s.get('Principal') for s in trust]}, want EC2 only")
        sts = [s for p in props.get("Policies", []) for s in statements(p["PolicyDocument"])]

        def service(s):
            prefixes = {a.split(":", 1)[0] for a in as_list(s["Action"])}
            if len(prefixes) != 1:
                fail(f"{role} {s.get('Sid')} mixes the actions of {sorted(prefixes)}")
            return prefixes.pop()

        other = [resolve(s, params) for s in sts if service(s) in ("s3", "cloudwatch")]
        if other != want_s3[role]:
            fail(f"{role}: the S3 and CloudWatch statements are not those of iam-instance-policy.json "
                 f"with {role}'s one change:\n{json.dumps(other, indent=1)}")
        for action, key, want in ROLE_OBJECT_ACCESS[role]:
            if allows(other, action, f"arn:aws:s3:::{BUCKET}/{key}") != want:
                fail(f"{role} {'cannot' if want else 'can'} {action} {key}")
        keys = [s for s in sts if service(s) == "secretsmanager"]
        if keys != [{"Sid": "ReadTheAuthKey", "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
                     "Resource": {"Ref": "AuthKeySecret"}}]:
            fail(f"{role}: want exactly secretsmanager:GetSecretValue on AuthKeySecret, found {keys}")
        unknown = [s.get("Sid") for s in sts if service(s) not in ("s3", "cloudwatch", "secretsmanager", "sqs")]
        if unknown:
            fail(f"{role}: statements of another service: {unknown}")
        got = {}
        for s in sts:
            if service(s) != "sqs":
                continue
            if s["Effect"] != "Allow":
                fail(f"{role} {s.get('Sid')}: only Allow statements expected for SQS")
            for res_ in as_list(s["Resource"]):
                queue = res_.get("Fn::GetAtt", [None])[0] if isinstance(res_, dict) else None
                if queue is None or res_["Fn::GetAtt"][1] != "Arn":
                    fail(f"{role} {s.get('Sid')}: SQS on {res_}, want one queue's Arn")
                got.setdefault(queue, set()).update(as_list(s["Action"]))
        if got != queues:
            fail(f"{role}: SQS actions are {dict(sorted((k, sorted(v)) for k, v in got.items()))}, "
                 f"want {dict(sorted((k, sorted(v)) for k, v in queues.items()))}")


def check_scale_out_queues():
    t = load_template()
    params = t["Parameters"]
    res = t["Resources"]
    queues = {n: r["Properties"] for n, r in res.items() if r["Type"] == "AWS::SQS::Queue"}
    if set(queues) != {"WorkQueue", "ResultsQueue", "DeadLetterQueue"}:
        fail(f"queues are {sorted(queues)}")
    work, dlq = queues["WorkQueue"], queues["DeadLetterQueue"]
    redrive = work.get("RedrivePolicy", {})
    if redrive.get("deadLetterTargetArn") != {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}:
        fail(f"the work queue does not redrive to the dead-letter queue: {redrive}")
    if str(resolve(redrive.get("maxReceiveCount"), params)) != "2":
        fail(f"maxReceiveCount is {redrive.get('maxReceiveCount')}, want 2 (a batch that failed twice)")
    if "RedrivePolicy" in queues["ResultsQueue"] or "RedrivePolicy" in dlq:
        fail("only the work queue has a dead-letter queue")
    days = {n: int(resolve(q["MessageRetentionPeriod"], params)) / 86400 for n, q in queues.items()}
    if days != {"WorkQueue": 4, "ResultsQueue": 4, "DeadLetterQueue": 14}:
        fail(f"retention in days is {days}, want 4, 4 and 14")
    if str(resolve(work["VisibilityTimeout"], params)) != "300":
        fail("the work queue's visibility timeout is not distribute.visibility-timeout's default, 300 s")
    for n, q in queues.items():
        if q.get("SqsManagedSseEnabled") is not True:
            fail(f"{n} is not encrypted (SqsManagedSseEnabled)")
    tls = [r["Properties"] for r in res.values() if r["Type"] == "AWS::SQS::QueuePolicy"]
    covered = {q["Ref"] for p in tls for q in p["Queues"]
               if any(s["Effect"] == "Deny" and s.get("Principal") == "*"
                      and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
                      for s in statements(p["PolicyDocument"]))}
    if covered != set(queues):
        fail(f"TLS is required only on {sorted(covered)}")
    # Target tracking on visible batches per in-service worker.
    group = res["WorkerGroup"]["Properties"]
    if not any("GroupInServiceInstances" in m.get("Metrics", []) for m in group.get("MetricsCollection", [])):
        fail("the group does not collect GroupInServiceInstances, which the policy divides by")
    policies = [r["Properties"] for r in res.values() if r["Type"] == "AWS::AutoScaling::ScalingPolicy"]
    if len(policies) != 1 or policies[0].get("PolicyType") != "TargetTrackingScaling":
        fail("want exactly one target-tracking scaling policy")
    cfg = policies[0]["TargetTrackingConfiguration"]
    if str(resolve(cfg["TargetValue"], params)) != "100":
        fail(f"target is {cfg['TargetValue']}, want 100 batches per worker")
    metrics = {m["Id"]: m for m in cfg["CustomizedMetricSpecification"]["Metrics"]}
    shown = [m for m in metrics.values() if m.get("ReturnData", True)]
    if len(shown) != 1:
        fail("the policy must return exactly one series")
    expr = shown[0].get("Expression", "").replace(" ", "")
    num, _, den = expr.partition("/")
    want = {num: ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName",
                  {"Fn::GetAtt": ["WorkQueue", "QueueName"]}),
            den: ("AWS/AutoScaling", "GroupInServiceInstances", "AutoScalingGroupName",
                  {"Ref": "WorkerGroup"})}
    for mid, (ns, name, dim, value) in want.items():
        m = metrics.get(mid, {}).get("MetricStat", {}).get("Metric", {})
        if (m.get("Namespace"), m.get("MetricName"), m.get("Dimensions")) != (ns, name, [{"Name": dim, "Value": value}]):
            fail(f"{expr}: {mid} is not {name} of the {'work queue' if ns == 'AWS/SQS' else 'worker group'}")


CHECKS = {
    "parse": check_parse,
    "no-delete": check_no_delete,
    "instance-policy": check_instance_policy,
    "restore-policy": check_restore_policy,
    "bucket-policy": check_bucket_policy,
    "lifecycle": check_lifecycle,
    "bucket-template": check_bucket_template,
    "alarm": check_alarm,
    "scale-out-roles": check_scale_out_roles,
    "scale-out-queues": check_scale_out_queues,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKS:
        fail(f"usage: {sys.argv[0]} {{{'|'.join(CHECKS)}}}")
    CHECKS[sys.argv[1]]()
