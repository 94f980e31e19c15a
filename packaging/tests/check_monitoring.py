#!/usr/bin/env python3
"""Checks on the dashboard, the Prometheus files and the failure report, one per subcommand
(monitoring.sh runs each as one test). Exit 0 when the property holds, else 1 with the reason on
stderr.

  check_monitoring.py dashboard-layout        packaging/aws/dashboard.json rendered: the six
                                              metrics of src/metrics.rs, each once, in SEARCH
                                              expressions over InstanceId in the namespace
                                              nightcopy uses; a layout CloudWatch accepts; the
                                              alarm widget and the runbook links
  check_monitoring.py dashboard-round-trip URL  PutDashboard into CloudWatch at URL (moto), no
                                              validation message, GetDashboard gives it back as put
  check_monitoring.py prometheus-names        the textfile fixture has exactly the textfile
                                              names of src/metrics.rs, gauges with HELP and TYPE;
                                              the rules use only those names
  check_monitoring.py notify-body FILE UNIT RESULT EXIT_STATUS STATUS
                                              FILE is the summary nightcopy-notify sent: JSON,
                                              with these values (RESULT and EXIT_STATUS "null"
                                              for none; STATUS a JSON file of `nightcopy status
                                              --json`, or "null:MESSAGE" for none and its error)

The names are read out of the Rust sources with regular expressions, not written here a second
time: a metric renamed there fails these checks until the dashboard and the rules follow.
round-trip needs boto3 (the packaging venv); the rest is the standard library.
"""

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
AWS_DIR = os.path.join(REPO, "packaging", "aws")
PROM_DIR = os.path.join(REPO, "packaging", "prometheus")
FIXTURE = os.path.join(HERE, "fixtures", "nightcopy.prom")
sys.path.insert(0, AWS_DIR)
import render_dashboard  # noqa: E402

# The example values of packaging/aws/README.md.
REGION = "us-east-1"
ACCOUNT = "111122223333"
RUNBOOK = "https://git.example.internal/nightcopy/-/blob/main"
DIMENSIONS = [("Environment", "prod")]
GRID = 24
SEARCH = re.compile(
    r"^SEARCH\('\{(?P<schema>[^}]*)\} MetricName=\"(?P<metric>[A-Za-z]+)\"(?P<filter>( [A-Za-z0-9_.#:/-]+=\"[^\"]*\")*)', "
    r"'(?P<stat>[A-Za-z]+)', (?P<period>[0-9]+)\)$")
STATS = {"Maximum", "Minimum", "Sum", "Average", "SampleCount"}


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def published():
    """(namespace, InstanceId dimension name, the six metric names) as nightcopy publishes them."""
    metrics_rs = read(os.path.join(REPO, "src", "metrics.rs"))
    consts = dict(re.findall(r'pub const ([A-Z_]+): &str = "([^"]+)";', metrics_rs))
    # The data points of a run are built by data(): d(NAME_CONST, "Unit", value).
    body = metrics_rs[metrics_rs.index("pub fn data("):]
    body = body[:body.index("\n}\n")]
    used = re.findall(r"\bd\(\s*([A-Z_]+),", body)
    if len(used) != 6 or any(u not in consts for u in used):
        fail(f"src/metrics.rs: expected six d(CONST, …) points in data(), found {used}")
    if "INSTANCE_ID" not in consts:
        fail("src/metrics.rs: no INSTANCE_ID constant")
    config_rs = read(os.path.join(REPO, "src", "config", "mod.rs"))
    m = re.search(r'fn default_namespace\(\) -> String \{\s*"([^"]+)"', config_rs)
    if not m:
        fail("src/config/mod.rs: no default_namespace()")
    return m.group(1), consts["INSTANCE_ID"], [consts[u] for u in used]


def textfile_names():
    """The textfile's metric names, from the textfile writer of src/metrics.rs."""
    metrics_rs = read(os.path.join(REPO, "src", "metrics.rs"))
    names = sorted(set(re.findall(r'"(nightcopy_[a-z_]+)"', metrics_rs)))
    if not names:
        fail("src/metrics.rs names no nightcopy_* textfile metric")
    return names


def alarm_arn():
    """The ARN of packaging/aws/alarm-last-success.json's alarm, in the example account."""
    name = json.loads(read(os.path.join(AWS_DIR, "alarm-last-success.json")))["AlarmName"]
    return f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{name}"


def rendered(dimensions=DIMENSIONS, arns=None, namespace=None):
    template = json.loads(read(os.path.join(AWS_DIR, "dashboard.json")))
    ns = namespace or published()[0]
    return render_dashboard.render(template, ns, REGION, RUNBOOK + "/", dimensions,
                                   [alarm_arn()] if arns is None else arns)


def slug(heading):
    """The anchor GitHub and GitLab give a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def check_layout(body, dimensions, arns):
    namespace, instance_dim, six = published()
    if set(body) - {"start", "end", "periodOverride", "widgets"}:
        fail(f"unknown top-level keys {sorted(set(body) - {'start', 'end', 'periodOverride', 'widgets'})}")
    if body.get("start") != "-P30D" or body.get("periodOverride") != "inherit":
        fail("the dashboard must open on the last 30 days (start -P30D) and keep each widget's "
             "period (periodOverride inherit)")
    if len(json.dumps(body)) > 1024 * 1024:
        fail("the body exceeds CloudWatch's 1 MB")
    cells = {}
    seen = []
    for i, w in enumerate(body["widgets"]):
        where = f"widget {i} ({w.get('type')})"
        for k in ("x", "y", "width", "height"):
            if not isinstance(w.get(k), int):
                fail(f"{where}: {k} must be an integer")
        if not (0 <= w["x"] and 1 <= w["width"] and w["x"] + w["width"] <= GRID and 0 <= w["y"]
                and 1 <= w["height"] <= 1000):
            fail(f"{where}: outside the {GRID}-column grid")
        for x in range(w["x"], w["x"] + w["width"]):
            for y in range(w["y"], w["y"] + w["height"]):
                if (x, y) in cells:
                    fail(f"{where} overlaps widget {cells[(x, y)]}")
                cells[(x, y)] = i
        p = w.get("properties", {})
        if w["type"] == "text":
            md = p.get("markdown", "")
            links = re.findall(r"\]\(([^)]+)\)", md)
            if not links:
                fail(f"{where}: no link to the runbook")
            for link in links:
                if not link.startswith(RUNBOOK + "/"):
                    fail(f"{where}: link {link} is not below the runbook URL")
                path, _, anchor = link[len(RUNBOOK) + 1:].partition("#")
                if not os.path.isfile(os.path.join(REPO, path)):
                    fail(f"{where}: link to {path}, which does not exist")
                if anchor:
                    heads = [slug(h) for h in re.findall(r"^#+ (.+)$", read(os.path.join(REPO, path)), re.M)]
                    if anchor not in heads:
                        fail(f"{where}: {path} has no heading for #{anchor}")
        elif w["type"] == "alarm":
            if p.get("alarms") != arns or not arns:
                fail(f"{where}: alarms {p.get('alarms')}, expected {arns}")
        elif w["type"] == "metric":
            if p.get("region") != REGION or p.get("period") != 86400:
                fail(f"{where}: region {p.get('region')}, period {p.get('period')}: want {REGION}, 86400 (a day)")
            entries = p.get("metrics", [])
            if len(entries) != 1 or len(entries[0]) != 1 or not isinstance(entries[0][0], dict):
                fail(f"{where}: expected one expression, got {entries}")
            e = entries[0][0]
            if not re.match(r"^[a-z][A-Za-z0-9_]*$", e.get("id", "")):
                fail(f"{where}: id {e.get('id')!r} must start with a lower-case letter")
            m = SEARCH.match(e.get("expression", ""))
            if not m:
                fail(f"{where}: {e.get('expression')!r} is not SEARCH('{{…}} MetricName=\"…\"', 'Stat', period)")
            schema = [s.strip() for s in m.group("schema").split(",")]
            want_schema = [namespace] + [n for n, _ in dimensions] + [instance_dim]
            if schema != want_schema:
                fail(f"{where}: schema {schema}, but nightcopy publishes to {namespace} with "
                     f"dimensions {want_schema[1:]} (a SEARCH schema must name exactly those)")
            want_filter = "".join(f' {n}="{v}"' for n, v in dimensions)
            if m.group("filter") != want_filter:
                fail(f"{where}: filter {m.group('filter')!r}, want {want_filter!r}")
            if m.group("metric") not in six:
                fail(f"{where}: {m.group('metric')} is not one of the metrics nightcopy publishes, {six}")
            if m.group("stat") not in STATS or m.group("stat") != p.get("stat") or m.group("period") != "86400":
                fail(f"{where}: statistic {m.group('stat')} period {m.group('period')} (widget: {p.get('stat')})")
            if "InstanceId" not in e.get("label", ""):
                fail(f"{where}: the label must name the host (InstanceId)")
            seen.append(m.group("metric"))
        else:
            fail(f"{where}: unexpected widget type")
    if sorted(seen) != sorted(six):
        fail(f"the metric widgets show {sorted(seen)}, nightcopy publishes {sorted(six)}")
    return body


def check_dashboard_layout():
    arns = [alarm_arn()]
    check_layout(rendered(), DIMENSIONS, arns)
    # One host without extra dimensions: the schema of the plain example, {Nightcopy,InstanceId}.
    plain = check_layout(rendered(dimensions=[]), [], arns)
    expr = plain["widgets"][2]["properties"]["metrics"][0][0]["expression"]
    namespace, instance_dim, _ = published()
    if not expr.startswith(f"SEARCH('{{{namespace},{instance_dim}}} MetricName="):
        fail(f"without dimensions the schema must be {{{namespace},{instance_dim}}}: {expr}")
    # No alarm (beta): the widget goes, the text takes the row, the rest stays.
    bare = rendered(arns=[])
    if any(w["type"] == "alarm" for w in bare["widgets"]):
        fail("without alarm ARNs the alarm widget must be left out (CloudWatch refuses it empty)")
    check_layout(bare, DIMENSIONS, [])
    text = [w for w in bare["widgets"] if w["type"] == "text"][0]
    if text["width"] != GRID:
        fail("without the alarm widget the text widget should take the whole row")
    # Another namespace goes everywhere the template says ${Namespace}.
    other = json.dumps(rendered(namespace="Backups/Prod"))
    if "{Backups/Prod,Environment,InstanceId}" not in other or "**Backups/Prod**" not in other:
        fail("--namespace does not reach every SEARCH and the text")
    # Nothing unresolved, and bad input refused.
    if re.search(r"\$\{[A-Za-z]+\}", json.dumps(rendered())):
        fail("a placeholder is left in the rendered body")
    for bad in ([("Environment", "pr'od")], [("InstanceId", "x")]):
        try:
            rendered(dimensions=bad)
        except ValueError:
            continue
        fail(f"dimensions {bad} must be refused")


def check_dashboard_round_trip(url):
    import boto3
    body = rendered()
    cw = boto3.client("cloudwatch", endpoint_url=url, region_name=REGION)
    text = json.dumps(body, separators=(",", ":"))
    answer = cw.put_dashboard(DashboardName="nightcopy-pkgtest", DashboardBody=text)
    if answer.get("DashboardValidationMessages"):
        fail(f"PutDashboard: {answer['DashboardValidationMessages']}")
    got = cw.get_dashboard(DashboardName="nightcopy-pkgtest")
    if got.get("DashboardName") != "nightcopy-pkgtest" or "DashboardArn" not in got:
        fail(f"GetDashboard: {got}")
    if json.loads(got["DashboardBody"]) != body or got["DashboardBody"] != text:
        fail("GetDashboard gave back another body than was put")
    names = [d["DashboardName"] for d in cw.list_dashboards()["DashboardEntries"]]
    if "nightcopy-pkgtest" not in names:
        fail(f"ListDashboards: {names}")
    # What the body carries is what nightcopy publishes (checked on the body as read back).
    check_layout(json.loads(got["DashboardBody"]), DIMENSIONS, [alarm_arn()])


def check_prometheus_names():
    want = textfile_names()
    if len(want) != 9:
        fail(f"src/metrics.rs writes {len(want)} textfile metrics, expected nine: {want}")
    helps, types, samples = {}, {}, {}
    for line in read(FIXTURE).splitlines():
        if line.startswith("# HELP "):
            name, _, text = line[7:].partition(" ")
            helps[name] = text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            if "{" in name:
                fail(f"fixture: {name} carries labels; nightcopy writes none")
            float(value)
            samples[name] = value
    if sorted(samples) != want:
        fail(f"fixture has {sorted(samples)}, src/metrics.rs writes {want}")
    for name in want:
        if types.get(name) != "gauge" or not helps.get(name):
            fail(f"fixture: {name} needs a HELP line and TYPE gauge")
    rules = read(os.path.join(PROM_DIR, "nightcopy.rules.yml"))
    tests = read(os.path.join(PROM_DIR, "nightcopy.rules.test.yml"))
    for where, text in (("nightcopy.rules.yml", rules), ("nightcopy.rules.test.yml", tests)):
        used = set(re.findall(r"\b(nightcopy_[a-z_]+)\b", text))
        if not used:
            fail(f"{where} uses no nightcopy metric")
        if used - set(want):
            fail(f"{where} uses {sorted(used - set(want))}, which nightcopy does not write")


def check_notify_body(path, unit, result, exit_status, status):
    body = json.loads(read(path))
    want_status = None
    want_error = None
    if status.startswith("null:"):
        want_error = status[5:]
    else:
        want_status = json.loads(read(status))
    want = {
        "unit": unit,
        "host": os.uname().nodename,
        "result": None if result == "null" else result,
        "exit_status": None if exit_status == "null" else int(exit_status),
        "status": want_status,
        "status_error": want_error,
    }
    text = f"nightcopy: {unit} failed on {want['host']}"
    if want["result"]:
        text += f" (Result={result}" + (f", exit status {exit_status}" if want["exit_status"] is not None else "") + ")"
    want["text"] = text
    if body != want:
        fail(f"summary:\n{json.dumps(body, indent=2, sort_keys=True)}\nexpected:\n{json.dumps(want, indent=2, sort_keys=True)}")


if __name__ == "__main__":
    cmd, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd == "dashboard-layout" and not args:
        check_dashboard_layout()
    elif cmd == "dashboard-round-trip" and len(args) == 1:
        check_dashboard_round_trip(args[0])
    elif cmd == "prometheus-names" and not args:
        check_prometheus_names()
    elif cmd == "notify-body" and len(args) == 5:
        check_notify_body(*args)
    else:
        fail(f"usage: {sys.argv[0]} dashboard-layout | dashboard-round-trip URL | prometheus-names"
             " | notify-body FILE UNIT RESULT EXIT_STATUS STATUS")
