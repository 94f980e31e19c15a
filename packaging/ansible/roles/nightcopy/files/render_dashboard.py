#!/usr/bin/env python3
"""Renders packaging/aws/dashboard.json, the CloudWatch dashboard of docs/metrics.md ("Dashboard and
alerts"), into the body PutDashboard takes, on stdout:

  render_dashboard.py --region eu-west-1 --runbook-url https://git.example.internal/nightcopy/-/blob/main \\
      [--namespace Nightcopy] [--dimension Environment=prod ...] [--alarm-arn ARN ...] [--template FILE]
  aws cloudwatch put-dashboard --dashboard-name nightcopy-prod --dashboard-body file://body.json

Python's standard library only, so it runs wherever the aws cli or Ansible does; the role runs
this same file: it lives in the role (roles/nightcopy/files/, so that the role is whole by itself),
and packaging/aws/render_dashboard.py and dashboard.json are links to it.

The template is JSON with placeholders in its strings, so it parses as it is (check_aws.py parse):

  ${Namespace}        metrics.namespace
  ${Region}           the region of the metrics and alarms (a dashboard's widgets each name one)
  ${RunbookUrl}       base URL under which docs/operations.md and docs/metrics.md are served,
                      e.g. the repository's web view; without a trailing /
  ${DimensionSchema}  ",Environment" for metrics.dimensions {Environment: prod}: a SEARCH schema
                      matches only metrics with exactly its dimensions, and nightcopy adds the
                      configured ones to InstanceId, so they must be named there
  ${DimensionFilter}  ' Environment="prod"': the hosts with these values only (one environment)
  ${ScopeText}        " with Environment=prod", for the text widget
  "${AlarmArn}"       a list element: replaced by one element per --alarm-arn. Without any, the
                      alarm widget is left out (CloudWatch refuses an empty one) and the text
                      widget takes the whole row.

Any other ${Name} in the template is an error, so a placeholder cannot be left in by mistake.
CloudWatch's own dynamic labels, ${PROP('Dim.InstanceId')}, are not names and pass through.
The alarm ARNs of the role's alarms (nightcopy-last-success-HOST) are listed by
  aws cloudwatch describe-alarms --alarm-name-prefix nightcopy-last-success- \\
      --query 'MetricAlarms[].AlarmArn' --output text
"""

import argparse
import json
import os
import re
import sys

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.json")
PLACEHOLDER = re.compile(r"\$\{([A-Za-z]+)\}")
ALARM_ELEMENT = "${AlarmArn}"
# What a SEARCH expression can carry unquoted (namespace, dimension names) and within double
# quotes (dimension values); CloudWatch allows more, but ' " \ { } would need escaping inside
# SEARCH('…'), and nightcopy's own names never contain them.
NAME = re.compile(r"^[A-Za-z0-9_.#:/-]{1,255}$")
VALUE = re.compile(r"^[^'\"\\{}\x00-\x1f]{1,1024}$")
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
ALARM_ARN = re.compile(r"^arn:aws[a-z-]*:cloudwatch:[a-z0-9-]+:[0-9]{12}:alarm:[^\s]{1,255}$")
URL = re.compile(r"^https?://[^\s\"'<>()\[\]]+$")
# The alarm status widget shows at most 100 alarms.
MAX_ALARMS = 100


def render(template, namespace, region, runbook_url, dimensions, alarm_arns):
    """The dashboard body (a dict) from the template (a dict) and the values, checked."""
    problems = []
    if not NAME.match(namespace) or namespace.startswith("AWS/"):
        problems.append(f"namespace {namespace!r}: letters, digits and _.#:/- only, not AWS/…")
    if not REGION.match(region):
        problems.append(f"region {region!r} is not a region name such as eu-west-1")
    if not URL.match(runbook_url):
        problems.append(f"runbook URL {runbook_url!r} is not an http(s):// URL")
    for name, value in dimensions:
        if not NAME.match(name) or name == "InstanceId":
            problems.append(f"dimension name {name!r}: letters, digits and _.#:/- only, not InstanceId")
        if not VALUE.match(value):
            problems.append(f"dimension {name}: value {value!r} is empty or has ' \" \\ {{ }}")
    if len({n for n, _ in dimensions}) != len(dimensions):
        problems.append("a dimension is given twice")
    for arn in alarm_arns:
        if not ALARM_ARN.match(arn):
            problems.append(f"{arn!r} is not a CloudWatch alarm ARN")
    if len(alarm_arns) > MAX_ALARMS:
        problems.append(f"{len(alarm_arns)} alarms: an alarm widget shows at most {MAX_ALARMS}")
    if problems:
        raise ValueError("; ".join(problems))

    values = {
        "Namespace": namespace,
        "Region": region,
        "RunbookUrl": runbook_url.rstrip("/"),
        "DimensionSchema": "".join("," + n for n, _ in dimensions),
        "DimensionFilter": "".join(f' {n}="{v}"' for n, v in dimensions),
        "ScopeText": (" with " + ", ".join(f"{n}={v}" for n, v in dimensions)) if dimensions else "",
    }

    def text(s):
        def one(m):
            if m.group(1) not in values:
                raise ValueError(f"the template has an unknown placeholder {m.group(0)}")
            return values[m.group(1)]
        return PLACEHOLDER.sub(one, s)

    def walk(node):
        if isinstance(node, str):
            return text(node)
        if isinstance(node, list):
            out = []
            for item in node:
                if item == ALARM_ELEMENT:
                    out.extend(alarm_arns)
                else:
                    out.append(walk(item))
            return out
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    body = walk(template)
    if not alarm_arns:
        body["widgets"] = [w for w in body["widgets"] if w.get("type") != "alarm"]
        for w in body["widgets"]:
            if w.get("type") == "text" and w.get("y") == 0:
                w["x"], w["width"] = 0, 24
    return body


def dimension(arg):
    name, sep, value = arg.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{arg!r} is not NAME=VALUE")
    return name, value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--template", default=TEMPLATE, help="default: dashboard.json beside this file")
    p.add_argument("--namespace", default="Nightcopy", help="metrics.namespace (default Nightcopy)")
    p.add_argument("--region", required=True)
    p.add_argument("--runbook-url", required=True, help="base URL of the docs/ directory's parent")
    p.add_argument("--dimension", type=dimension, action="append", default=[],
                   metavar="NAME=VALUE", help="each entry of metrics.dimensions")
    p.add_argument("--alarm-arn", action="append", default=[], metavar="ARN",
                   help="a LastSuccess alarm; repeat for every host")
    a = p.parse_args(argv)
    with open(a.template, encoding="utf-8") as f:
        template = json.load(f)
    try:
        body = render(template, a.namespace, a.region, a.runbook_url, a.dimension, a.alarm_arn)
    except ValueError as e:
        print(f"render_dashboard.py: {e}", file=sys.stderr)
        return 2
    # Compact: the body is passed as one argument by the role, and CloudWatch keeps it as given.
    print(json.dumps(body, separators=(",", ":"), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
