#!/usr/bin/env bash
# Validates what deploy/kubernetes/ would deploy, before it is rolled out:
# renders the kustomization, writes the two ConfigMaps out in the layout the
# pod sees (evictd.toml next to dependency-graphs/), and runs
# `evictd check --offline --config` on them, with placeholder connection
# URLs standing in for the Secret (offline: no database is contacted). Also
# fails when a graph file of dependency-graphs/ is missing from the
# configMapGenerator list.
#
#   deploy/check.sh                       from the repository root
#   EVICTD_BIN=target/release/evictd deploy/check.sh
#
# Needs kubectl (for `kubectl kustomize`, no cluster access), python3 with
# PyYAML, and an evictd binary (EVICTD_BIN, default `evictd` on PATH).
# Exit status: 0 valid, 2 invalid config or graph, 1 anything else.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EVICTD_BIN="${EVICTD_BIN:-evictd}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

kubectl kustomize --load-restrictor LoadRestrictionsNone "$ROOT/deploy/kubernetes" >"$tmp/rendered.yaml"

python3 - "$tmp" <<'EOF'
import os, sys, yaml
tmp = sys.argv[1]
found = set()
with open(f"{tmp}/rendered.yaml") as f:
    for doc in yaml.safe_load_all(f):
        if not doc or doc.get("kind") != "ConfigMap":
            continue
        name = doc["metadata"]["name"]
        if name == "evictd-config":
            out, what = tmp, "evictd-config"
        elif name.startswith("evictd-dependency-graphs"):
            out, what = os.path.join(tmp, "dependency-graphs"), "evictd-dependency-graphs"
        else:
            continue
        found.add(what)
        os.makedirs(out, exist_ok=True)
        for key, text in (doc.get("data") or {}).items():
            with open(os.path.join(out, key), "w") as g:
                g.write(text)
missing = {"evictd-config", "evictd-dependency-graphs"} - found
if missing:
    sys.exit(f"check.sh: the rendered manifests have no ConfigMap {', '.join(sorted(missing))}")
EOF

# Every graph file of the repository must be deployed.
missing="$(comm -23 <(cd "$ROOT/dependency-graphs" && ls -1 -- *.toml | sort) \
                    <(cd "$tmp/dependency-graphs" && ls -1 -- *.toml | sort))"
if [ -n "$missing" ]; then
  echo "check.sh: not in the configMapGenerator of deploy/kubernetes/kustomization.yaml:" >&2
  echo "$missing" | sed 's/^/  dependency-graphs\//' >&2
  exit 2
fi

# Placeholders for the values the Secret provides (never contacted).
export EVICTD__SOURCE__POSTGRES__URL="${EVICTD__SOURCE__POSTGRES__URL:-postgres://evictd@postgres.invalid:5432/app}"
export EVICTD__REDIS__PRIMARY__URL="${EVICTD__REDIS__PRIMARY__URL:-redis://redis.invalid:6379}"
exec "$EVICTD_BIN" check --offline --config "$tmp/evictd.toml"
