#!/usr/bin/env python3
"""Splits rendered manifests for validation, and validates the Prometheus
Operator objects that kubernetes-validate has no schema for.

    validate-crds.py RENDERED BUILTIN_OUT GROUPS_OUT

- BUILTIN_OUT gets every object of a built-in Kubernetes kind (for
  kubernetes-validate, which scripts/deploy-test.sh runs against several
  Kubernetes versions).
- ServiceMonitor and PrometheusRule (monitoring.coreos.com/v1) are checked
  against the schemas below: the fields evictd's manifests may use, with
  their types, and no others (a typo is an error, as with --strict), plus
  what a schema cannot say: the ServiceMonitor selects a rendered Service and
  names one of its ports, and every rule's `for` is a Prometheus duration.
- GROUPS_OUT gets the PrometheusRule's spec as a plain rule file
  (`groups:`), for `promtool check rules`; empty when there is none.

Any other custom kind is an error: nothing would validate it. Prints one
line per object; exit 1 on any failure. Needs PyYAML and jsonschema (both in
kubernetes-validate's venv).
"""

import sys

import jsonschema
import yaml

BUILTIN_GROUPS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1", "rbac.authorization.k8s.io/v1", "batch/v1"}
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}

SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                            "tlsConfig": {"type": "object"},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

RULE = {
    "type": "object",
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "expr": {"type": ["string", "integer"], "minLength": 1},
        "for": {"type": "string", "pattern": DURATION},
        "keep_firing_for": {"type": "string", "pattern": DURATION},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": DURATION},
                            "limit": {"type": "integer"},
                            "rules": {"type": "array", "minItems": 1, "items": RULE},
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def name_of(doc) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('namespace', '-')}/{meta.get('name')}"


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def main() -> int:
    rendered, builtin_out, groups_out = sys.argv[1:4]
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    failures = 0
    builtin, groups = [], []
    services = [d for d in docs if d.get("kind") == "Service"]
    for doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        if api in BUILTIN_GROUPS:
            builtin.append(doc)
            continue
        schema = SCHEMAS.get(kind)
        if schema is None:
            print(f"FAIL {name_of(doc)}: {api} {kind} has no schema here (neither built-in nor known)")
            failures += 1
            continue
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        if kind == "ServiceMonitor" and not errors:
            matched = [s for s in services if selects(doc["spec"]["selector"], s["metadata"].get("labels") or {})]
            if not matched:
                errors.append("its selector matches no rendered Service")
            for ep in doc["spec"]["endpoints"]:
                ports = {p.get("name") for s in matched for p in s["spec"].get("ports", [])}
                if matched and ep["port"] not in ports:
                    errors.append(f"endpoint port {ep['port']!r} is not a port of {[s['metadata']['name'] for s in matched]}")
        if kind == "PrometheusRule" and not errors:
            groups.extend(doc["spec"]["groups"])
        if errors:
            failures += 1
            for e in errors:
                where = "/".join(str(p) for p in getattr(e, "path", [])) or "."
                print(f"FAIL {name_of(doc)} (own schema): {where}: {getattr(e, 'message', e)}")
        else:
            detail = ""
            if kind == "PrometheusRule":
                n = sum(len(g["rules"]) for g in doc["spec"]["groups"])
                detail = f", {len(doc['spec']['groups'])} group(s), {n} rule(s)"
            print(f"ok   {name_of(doc)} (own schema{detail})")
    with open(builtin_out, "w") as f:
        yaml.safe_dump_all(builtin, f, sort_keys=False)
    with open(groups_out, "w") as f:
        if groups:
            yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
