#!/usr/bin/env bash
# Validates what an overlay of deploy/kubernetes/ would deploy, before it is
# rolled out: renders the overlay (`kubectl kustomize`, no load-restrictor
# setting), writes its two generated ConfigMaps out in the layout the pod
# sees (evictd.toml next to dependency-graphs/), and runs
# `evictd check --offline --config` on them, with the keys of the overlay's
# secret.example.yaml standing in for the Secret (offline: nothing is
# contacted). Also fails when a graph file of the overlay's
# dependency-graphs/ is missing from its configMapGenerator (kustomize has no
# globs), or when the Deployment does not mount what was rendered.
#
#   deploy/check.sh [OVERLAY]             default deploy/kubernetes/overlays/postgres
#   EVICTD_BIN=target/release/evictd deploy/check.sh deploy/kubernetes/overlays/kafka
#
# OVERLAY is a directory (absolute, relative to the current directory, or
# relative to deploy/kubernetes/, e.g. `overlays/kafka`). Variables already
# set in the environment win over secret.example.yaml's placeholders.
#
# Needs kubectl (for `kubectl kustomize`, no cluster access), python3 with
# PyYAML, and an evictd binary (EVICTD_BIN, default `evictd` on PATH).
# Exit status: 0 valid, 2 invalid config or graph, 1 anything else.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EVICTD_BIN="${EVICTD_BIN:-evictd}"
overlay="${1:-$ROOT/deploy/kubernetes/overlays/postgres}"
[ -d "$overlay" ] || overlay="$ROOT/deploy/kubernetes/$overlay"
[ -f "$overlay/kustomization.yaml" ] || { echo "check.sh: ${1:-}: not an overlay directory (no kustomization.yaml)" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "check.sh: kubectl not found (its built-in kustomize renders the overlay)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

kubectl kustomize "$overlay" >"$tmp/rendered.yaml"

# Writes the ConfigMaps out, and the placeholders of the Secret as a file of
# NAME=VALUE lines; checks that the Deployment mounts the rendered ConfigMaps.
python3 - "$tmp" "$overlay" <<'EOF'
import os, sys, yaml
tmp, overlay = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(f"{tmp}/rendered.yaml")) if d]
rendered = {}
for doc in docs:
    if doc.get("kind") != "ConfigMap":
        continue
    name = doc["metadata"]["name"]
    if name.startswith("evictd-dependency-graphs"):
        what, out = "evictd-dependency-graphs", os.path.join(tmp, "dependency-graphs")
    elif name.startswith("evictd-config"):
        what, out = "evictd-config", tmp
    else:
        continue
    rendered[what] = name
    os.makedirs(out, exist_ok=True)
    for key, text in (doc.get("data") or {}).items():
        with open(os.path.join(out, key), "w") as g:
            g.write(text)
missing = {"evictd-config", "evictd-dependency-graphs"} - set(rendered)
if missing:
    sys.exit(f"check.sh: the rendered manifests have no ConfigMap {', '.join(sorted(missing))}")
if not os.path.exists(os.path.join(tmp, "evictd.toml")):
    sys.exit("check.sh: ConfigMap evictd-config has no key evictd.toml")

deployments = [d for d in docs if d.get("kind") == "Deployment" and d["metadata"]["name"] == "evictd"]
if len(deployments) != 1:
    sys.exit("check.sh: the rendered manifests have no Deployment evictd")
mounted = {v["configMap"]["name"] for v in deployments[0]["spec"]["template"]["spec"].get("volumes", []) if "configMap" in v}
for what, name in rendered.items():
    if name not in mounted:
        sys.exit(f"check.sh: the Deployment does not mount ConfigMap {name} (mounts {sorted(mounted)})")

# The Secret's placeholders: secret.example.yaml's stringData.
env = {}
example = os.path.join(overlay, "secret.example.yaml")
if os.path.exists(example):
    for doc in yaml.safe_load_all(open(example)):
        if doc and doc.get("kind") == "Secret":
            env.update((doc.get("stringData") or {}))
with open(os.path.join(tmp, "secret.env"), "w") as f:
    for k, v in env.items():
        f.write(f"{k}={v}\n")
EOF

# Every graph file of the overlay's dependency-graphs/ must be deployed.
if [ -d "$overlay/dependency-graphs" ]; then
  graphs() { find "$1" -maxdepth 1 -name '*.toml' -printf '%f\n' | sort; }
  missing="$(comm -23 <(graphs "$overlay/dependency-graphs") <(graphs "$tmp/dependency-graphs"))"
  if [ -n "$missing" ]; then
    echo "check.sh: not in the configMapGenerator of $overlay/kustomization.yaml:" >&2
    echo "$missing" | sed 's/^/  dependency-graphs\//' >&2
    exit 2
  fi
fi

# Placeholders for the values the Secret provides (never contacted); what the
# environment already sets wins.
while IFS= read -r line; do
  name="${line%%=*}"
  [ -n "${!name:-}" ] || export "${line?}"
done <"$tmp/secret.env"
echo "check.sh: $(basename "$overlay"): evictd check --offline on the rendered evictd-config and evictd-dependency-graphs" >&2
"$EVICTD_BIN" check --offline --config "$tmp/evictd.toml"
