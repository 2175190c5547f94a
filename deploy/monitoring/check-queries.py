#!/usr/bin/env python3
"""Checks the shipped dashboard and alert rules, offline and against a live
Prometheus that scrapes evictd.

    check-queries.py --offline
    check-queries.py --prometheus http://127.0.0.1:9090 [--out results.json]

Offline (no network): the dashboard has a `datasource` variable of type
Prometheus and `job`/`instance` variables, every panel has a Prometheus
datasource and at least one target with an `expr`; every alert has
`severity`, `summary`, `description` and a `runbook_url` whose anchor is a
heading of docs/alerts.md, and every heading there is an alert.

Live: every dashboard target's `expr`, with the dashboard's variables
substituted (`$job` and `$instance` as "All", `$__rate_interval` as
--rate-interval), and every alert's signals are evaluated through
Prometheus's HTTP API (`/api/v1/query`, which also parses them). An alert's
signals are its expression cut at the top-level `and`/`or`/`unless` (the
right side of `unless` is dropped: it is meant to be empty) with each
threshold comparison against a number removed; a comparison of two series
gives both. A query fails when it returns no series, or only NaN. One line
per query: status, name, series count, first value; then a summary line.
Exit status 1 when a query failed or the offline checks did.

Standard library and PyYAML only (Debian: python3-yaml).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
import urllib.parse
import urllib.request

import yaml

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DASHBOARD = HERE / "evictd-dashboard.json"
ALERTS = HERE / "alerts.yaml"
RUNBOOK = ROOT / "docs" / "alerts.md"


# -- the dashboard -------------------------------------------------------------

def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def dashboard_queries(dash, rate_interval):
    """(name, expr) of every target, variables substituted."""
    values = {
        "job": ".+", "instance": ".+",
        "__rate_interval": rate_interval, "__interval": "15s", "__range": "5m",
    }

    def subst(expr):
        def one(m):
            name = m.group(1) or m.group(2) or m.group(3)
            if name not in values:
                raise ValueError(f"unknown variable ${name} in {expr!r}")
            return values[name]
        return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", one, expr)

    for p in all_panels(dash["panels"]):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r} {t['refId']}", subst(t["expr"])


def check_dashboard(dash):
    errors = []
    if not 36 <= dash.get("schemaVersion", 0) <= 41:
        errors.append(f"schemaVersion {dash.get('schemaVersion')} is not Grafana 10/11's (36-41)")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append("no `datasource` variable of type datasource/prometheus")
    for name in ("job", "instance"):
        if name not in variables:
            errors.append(f"no `{name}` variable")
    for p in all_panels(dash["panels"]):
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"panel {p['title']!r}: datasource is not ${{datasource}}")
        targets = p.get("targets", [])
        if not targets or not all(t.get("expr") for t in targets):
            errors.append(f"panel {p['title']!r}: a target without expr")
        for t in targets:
            if "evictd_" in t["expr"] or "process_" in t["expr"]:
                if 'job=~"$job"' not in t["expr"] or 'instance=~"$instance"' not in t["expr"]:
                    errors.append(f"panel {p['title']!r} {t['refId']}: a selector without $job/$instance")
    return errors


# -- the alerts ----------------------------------------------------------------

SET_OPS = ("and", "or", "unless")
MODIFIERS = ("on", "ignoring", "group_left", "group_right", "bool")
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def top_level(expr):
    """(index, char) of the characters of `expr` outside brackets and strings."""
    depth, quote, i = 0, None, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            yield i, c
        i += 1


def skip_modifiers(expr, i):
    """The index after the vector-matching modifiers that start at `i`."""
    while True:
        m = re.match(r"\s*(on|ignoring|group_left|group_right|bool)\b\s*", expr[i:])
        if not m:
            return i
        i += m.end()
        if expr[i:i + 1] == "(":
            depth = 0
            for j in range(i, len(expr)):
                depth += {"(": 1, ")": -1}.get(expr[j], 0)
                if depth == 0:
                    i = j + 1
                    break


def strip_parens(expr):
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, c in enumerate(expr):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0 and i < len(expr) - 1:
                return expr
        expr = expr[1:-1].strip()
    return expr


def split_set_ops(expr):
    """[(operator before it or None, operand)] at the top level."""
    cuts = []
    for i, c in top_level(expr):
        for op in SET_OPS:
            if expr.startswith(op, i) and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] == "_")):
                end = i + len(op)
                if end < len(expr) and (expr[end].isalnum() or expr[end] == "_"):
                    continue
                cuts.append((i, end, op))
    parts, start, before = [], 0, None
    for i, end, op in cuts:
        if i < start:
            continue
        parts.append((before, expr[start:i]))
        start, before = skip_modifiers(expr, end), op
    parts.append((before, expr[start:]))
    return parts


def split_comparison(expr):
    """(left, right) at the first top-level comparison, or None."""
    for i, c in top_level(expr):
        for op in COMPARISONS:
            if expr.startswith(op, i):
                # `=~` and `!~` only occur inside braces; `>=`/`<=` are matched
                # before `>`/`<` by the order of COMPARISONS.
                return expr[:i], expr[skip_modifiers(expr, i + len(op)):]
    return None


def signals(expr):
    out = []
    expr = strip_parens(expr)
    parts = split_set_ops(expr)
    if len(parts) > 1:
        for before, part in parts:
            if before != "unless":
                out += signals(part)
        return out
    cmp = split_comparison(expr)
    if cmp is None:
        return [re.sub(r"\s+", " ", expr).strip()]
    left, right = (strip_parens(s) for s in cmp)
    out += signals(left)
    if not NUMBER.match(right):
        out += signals(right)
    return out


def alert_rules(doc):
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def check_alerts(rules, runbook_text):
    errors = []
    anchors = {re.sub(r"[^a-z0-9_-]", "", h.strip().lower().replace(" ", "-"))
               for h in re.findall(r"^## (.+)$", runbook_text, re.M)}
    names = set()
    for r in rules:
        name = r["alert"]
        names.add(name.lower())
        if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            errors.append(f"{name}: severity is not critical, warning or info")
        ann = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                errors.append(f"{name}: no {key}")
        url = ann.get("runbook_url", "")
        if not url.endswith(f"docs/alerts.md#{name.lower()}"):
            errors.append(f"{name}: runbook_url {url!r} is not docs/alerts.md#{name.lower()}")
        elif name.lower() not in anchors:
            errors.append(f"{name}: docs/alerts.md has no heading `## {name}`")
    for a in sorted(anchors - names):
        errors.append(f"docs/alerts.md: heading {a!r} is no alert of alerts.yaml")
    return errors


# -- Prometheus ----------------------------------------------------------------

def query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    if data["resultType"] == "vector":
        return data["result"]
    raise RuntimeError(f"unexpected result type {data['resultType']}")


def fmt(v):
    f = float(v)
    return v if math.isnan(f) or math.isinf(f) else f"{f:.6g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", help="base URL of a Prometheus that scrapes evictd")
    ap.add_argument("--offline", action="store_true", help="only the checks that need no Prometheus")
    ap.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for (default 1m)")
    ap.add_argument("--out", help="write every query and its result to this JSON file")
    args = ap.parse_args()
    if not args.offline and not args.prometheus:
        ap.error("give --prometheus URL or --offline")

    dash = json.loads(DASHBOARD.read_text())
    rules = alert_rules(yaml.safe_load(ALERTS.read_text()))
    errors = check_dashboard(dash) + check_alerts(rules, RUNBOOK.read_text() if RUNBOOK.exists() else "")
    queries = list(dashboard_queries(dash, args.rate_interval))
    for r in rules:
        for i, s in enumerate(signals(r["expr"]), 1):
            queries.append((f"alert {r['alert']} signal {i}", s))
    for e in errors:
        print(f"FAIL  {e}")
    print(f"offline: {len(errors)} problem(s); {len(queries)} queries "
          f"({sum(1 for n, _ in queries if n.startswith('panel'))} panel targets, "
          f"{sum(1 for n, _ in queries if n.startswith('alert'))} alert signals of {len(rules)} alerts)")
    if args.offline:
        return 1 if errors else 0

    results, failed = [], []
    for name, expr in queries:
        try:
            series = query(args.prometheus.rstrip("/"), expr)
            values = [s["value"][1] for s in series]
            real = [v for v in values if not math.isnan(float(v))]
            ok = bool(real)
            first = fmt(real[0]) if real else (fmt(values[0]) if values else "-")
            error = None if ok else ("no series" if not series else "only NaN")
        except Exception as e:  # a query Prometheus rejects is a failure like an empty one
            series, first, ok, error = [], "-", False, str(e)
        status = "ok  " if ok else "FAIL"
        print(f"{status}  {name}: {len(series)} series, first {first}" + (f"  ({error})" if error else ""))
        results.append({"name": name, "expr": expr, "ok": ok, "error": error, "series": len(series),
                         "first": first, "result": series[:20]})
        if not ok:
            failed.append(name)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"live: {len(queries) - len(failed)}/{len(queries)} queries returned values"
          + (f"; empty or failing: {', '.join(failed)}" if failed else ""))
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
