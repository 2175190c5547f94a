#!/usr/bin/env bash
# Checks the Kubernetes manifests of deploy/kubernetes/ the way a cluster and
# a rollout would, without a cluster:
#
#   scripts/deploy-test.sh
#
# 1. The PrometheusRule of components/monitoring has exactly the groups of
#    deploy/monitoring/alerts.yaml (deploy/monitoring/render-prometheusrule.py --check).
# 2. `kustomize build` (kubectl's built-in `kubectl kustomize`) of each overlay,
#    overlays/postgres and overlays/kafka, alone and with
#    components/monitoring, with no load-restrictor setting.
# 3. Every rendered object of a built-in kind validated by kubernetes-validate
#    --strict (unknown fields are errors) against Kubernetes 1.29, 1.32 and
#    1.37 (K8S_VERSIONS); ServiceMonitor and PrometheusRule, which it has no
#    schema for, against deploy/kubernetes/validate-crds.py's own schemas, and
#    the PrometheusRule's groups with `promtool check rules` when promtool is
#    installed (Debian's prometheus package; skipped, and said, otherwise).
# 4. deploy/check.sh on each overlay: `evictd check --offline` on the
#    rendered evictd.toml and graphs (EVICTD_BIN, default target/debug/evictd,
#    built with cargo when missing).
# 5. That these checks can fail: a Deployment with an unknown field, a
#    ServiceMonitor naming a port the Service lacks, a graph file left out of
#    the configMapGenerator, an invalid evictd.toml, and a PrometheusRule
#    that differs from alerts.yaml must each be rejected.
#
# kustomize: no standalone kustomize is packaged in the registries this
# repository installs from (Debian has none; PyPI's `kustomize` is a
# different tool), so `kubectl kustomize` it is; the script stops with a
# clear message when kubectl is missing. kubernetes-validate comes from PyPI,
# into a venv under $EVICTD_TOOLS (default /tmp/evictd-tools).
#
# Prints every validation line and "deploy-test: N passed, N failed"; exit 0
# only when every check passed. No network beyond PyPI for the first
# install; no cluster.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_PREFIX="deploy-test"
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"

K8S_VERSIONS="${K8S_VERSIONS:-1.29.0 1.32.0 1.37.0}"
TOOLS="${EVICTD_TOOLS:-/tmp/evictd-tools}"
VENV="$TOOLS/kubernetes-validate-venv"
KV_VERSION=1.37.0
K="$ROOT/deploy/kubernetes"

# kubectl's built-in kustomize renders the overlays (no standalone kustomize is
# packaged in Debian, PyPI or npm). This machine kind ships it; elsewhere the
# `kubectl` package comes from the Google Cloud or Kubernetes apt repository
# when one is configured (Debian's own kubernetes-client is 1.20: too old
# for kustomize Components).
if ! command -v kubectl >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] \
    && apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
  note "installing kubectl with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 kubectl >&2 || true
fi
command -v kubectl >/dev/null || die "kubectl not found: it renders the overlays (kubectl kustomize); install kubectl (e.g. Debian/Ubuntu's kubectl package from the Kubernetes or Google Cloud apt repository), no cluster is needed"
kubectl kustomize --help >/dev/null 2>&1 || die "this kubectl has no built-in kustomize (kubectl 1.14 or later needed)"

# kubernetes-validate, pinned, in its own venv (python3-venv from Debian).
if [ ! -x "$VENV/bin/kubernetes-validate" ] \
   || [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)" != "$KV_VERSION" ]; then
  if ! python3 -c 'import ensurepip' 2>/dev/null; then
    note "installing python3-venv with apt-get"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends python3-venv >&2
  fi
  note "installing kubernetes-validate $KV_VERSION into $VENV"
  mkdir -p "$TOOLS"
  (
    flock 9
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "kubernetes-validate==$KV_VERSION" >&2
  ) 9>"$VENV.lock"
fi
PY="$VENV/bin/python"

if [ -z "${EVICTD_BIN:-}" ]; then
  EVICTD_BIN="$ROOT/target/debug/evictd"
  if [ ! -x "$EVICTD_BIN" ]; then
    section "building evictd (debug) for deploy/check.sh"
    lock=()
    [ -z "${EVICTD_CARGO_LOCK:-}" ] || lock=(flock "$EVICTD_CARGO_LOCK")
    (cd "$ROOT" && ${lock[@]+"${lock[@]}"} cargo build --locked --bin evictd)
  fi
fi
export EVICTD_BIN

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
indent() { sed 's/^/  /'; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
WORK="$(mktemp -d -t evictd-deploy-test.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# Renders overlay $1, with components/monitoring when $2 = monitoring, into $3:
# the monitoring variant is rendered from a copy of deploy/kubernetes in
# which the overlay's commented `components:` lines are enabled, which is
# what a user does.
render() {
  local overlay="$1" variant="$2" out="$3" copy="$WORK/with-monitoring"
  if [ "$variant" = monitoring ]; then
    [ -d "$copy" ] || cp -r "$K" "$copy"
    overlay="$copy/overlays/$(basename "$overlay")"
    sed -i 's|^# components:$|components:|; s|^#   - ../../components/monitoring$|  - ../../components/monitoring|' "$overlay/kustomization.yaml"
    grep -q '^  - ../../components/monitoring$' "$overlay/kustomization.yaml" \
      || { echo "$overlay/kustomization.yaml: no commented components/monitoring lines to enable" >&2; return 1; }
  fi
  kubectl kustomize "$overlay" >"$out"
}

# Validates rendered manifests $1 (label $2): built-in kinds with
# kubernetes-validate per version, the Operator's kinds with validate-crds.py
# and promtool.
validate() {
  local rendered="$1" label="$2" v out rc
  if out="$("$PY" "$K/validate-crds.py" "$rendered" "$rendered.builtin" "$rendered.groups" 2>&1)"; then rc=0; else rc=$?; fi
  [ -z "$out" ] || indent <<<"$out"
  if [ "$rc" -eq 0 ]; then
    pass "$label: custom resources valid (own schemas)"
  else
    fail "$label: custom resources"
  fi
  for v in $K8S_VERSIONS; do
    if out="$("$VENV/bin/kubernetes-validate" --strict -k "$v" "$rendered.builtin" 2>&1)"; then rc=0; else rc=$?; fi
    indent <<<"${out//"$rendered.builtin"/$label}"
    if [ "$rc" -eq 0 ] && ! echo "$out" | grep -qv '^INFO'; then
      pass "$label: kubernetes-validate --strict -k $v: $(echo "$out" | grep -c passed) objects"
    else
      fail "$label: kubernetes-validate --strict -k $v (exit $rc)"
    fi
  done
  if [ -s "$rendered.groups" ]; then
    if ! command -v promtool >/dev/null; then
      echo "  promtool not installed: the PrometheusRule's groups are not checked by promtool (Debian: prometheus)"
    elif out="$(promtool check rules "$rendered.groups" 2>&1)"; then
      indent <<<"${out//"$rendered.groups"/$label PrometheusRule}"
      pass "$label: promtool check rules on the PrometheusRule's groups"
    else
      indent <<<"$out"
      fail "$label: promtool check rules"
    fi
  fi
}

section "1. the PrometheusRule against deploy/monitoring/alerts.yaml"
if out="$("$PY" "$ROOT/deploy/monitoring/render-prometheusrule.py" --check 2>&1)"; then
  pass "${out#"$ROOT/"}"
else
  fail "$out"
fi

for overlay in postgres kafka; do
  for variant in plain monitoring; do
    label="overlays/$overlay${variant/plain/}"
    [ "$variant" = plain ] || label="overlays/$overlay + components/monitoring"
    section "2-3. $label: kustomize build and validation"
    rendered="$WORK/$overlay-$variant.yaml"
    if render "$K/overlays/$overlay" "$variant" "$rendered" 2>"$WORK/err"; then
      pass "$label: kubectl kustomize: $(grep -c '^kind:' "$rendered") objects ($(grep '^kind:' "$rendered" | awk '{print $2}' | paste -sd, -))"
      validate "$rendered" "$label"
    else
      sed 's/^/  /' "$WORK/err"
      fail "$label: kubectl kustomize"
    fi
  done
  section "4. deploy/check.sh overlays/$overlay"
  if out="$("$ROOT/deploy/check.sh" "$K/overlays/$overlay" 2>&1)"; then
    indent <<<"$out"
    pass "deploy/check.sh overlays/$overlay"
  else
    indent <<<"$out"
    fail "deploy/check.sh overlays/$overlay"
  fi
done

section "5. the checks reject what they must"
# A Deployment with a field Kubernetes does not know.
bad="$WORK/bad-deployment.yaml"
"$PY" - "$WORK/postgres-plain.yaml" "$bad" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    if d["kind"] == "Deployment":
        d["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = d["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
yaml.safe_dump_all([d for d in docs if d["kind"] == "Deployment"], open(sys.argv[2], "w"))
EOF
if "$VENV/bin/kubernetes-validate" --strict --quiet -k "${K8S_VERSIONS%% *}" "$bad" >"$WORK/out" 2>&1; then
  fail "kubernetes-validate accepted a Deployment with an unknown field (readinessProbes)"
else
  pass "kubernetes-validate rejects a Deployment with an unknown field: $(grep -m1 -o "Additional properties.*" "$WORK/out" || head -n1 "$WORK/out")"
fi
# A ServiceMonitor scraping a port the Service does not have.
"$PY" - "$WORK/postgres-monitoring.yaml" "$WORK/bad-sm.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    if d["kind"] == "ServiceMonitor":
        d["spec"]["endpoints"][0]["port"] = "http-metrics"
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
EOF
if "$PY" "$K/validate-crds.py" "$WORK/bad-sm.yaml" "$WORK/x" "$WORK/y" >"$WORK/out" 2>&1; then
  fail "validate-crds.py accepted a ServiceMonitor on a port the Service lacks"
else
  pass "validate-crds.py rejects a ServiceMonitor on a port the Service lacks: $(grep -m1 FAIL "$WORK/out" | sed 's/^FAIL //')"
fi
# A graph file left out of the configMapGenerator, then an invalid evictd.toml.
cp -r "$K" "$WORK/k"
cp "$WORK/k/overlays/postgres/dependency-graphs/app.toml" "$WORK/k/overlays/postgres/dependency-graphs/orders.toml"
if "$ROOT/deploy/check.sh" "$WORK/k/overlays/postgres" >"$WORK/out" 2>&1; then rc=0; else rc=$?; fi
if [ "$rc" -eq 2 ] && grep -q 'dependency-graphs/orders.toml' "$WORK/out"; then
  pass "deploy/check.sh exits 2 on a graph file missing from the configMapGenerator"
else
  sed 's/^/  /' "$WORK/out"; fail "deploy/check.sh on an unlisted graph file: exit $rc"
fi
rm "$WORK/k/overlays/postgres/dependency-graphs/orders.toml"
sed -i 's/^max_effects = 1000$/max_effects = "many"/' "$WORK/k/overlays/postgres/evictd.toml"
if "$ROOT/deploy/check.sh" "$WORK/k/overlays/postgres" >"$WORK/out" 2>&1; then rc=0; else rc=$?; fi
if [ "$rc" -eq 2 ] && grep -q 'max_effects' "$WORK/out"; then
  pass "deploy/check.sh exits 2 on an invalid evictd.toml: $(grep -m1 max_effects "$WORK/out" | sed 's#^.*evictd.toml#evictd.toml#')"
else
  sed 's/^/  /' "$WORK/out"; fail "deploy/check.sh on an invalid evictd.toml: exit $rc"
fi
# A PrometheusRule that no longer matches alerts.yaml.
mkdir -p "$WORK/d"
cp -r "$ROOT/deploy/monitoring" "$ROOT/deploy/kubernetes" "$WORK/d/"
sed -i '0,/severity: critical/s//severity: page/' "$WORK/d/monitoring/alerts.yaml"
if "$PY" "$WORK/d/monitoring/render-prometheusrule.py" --check >"$WORK/out" 2>&1; then
  fail "render-prometheusrule.py --check accepted a PrometheusRule that differs from alerts.yaml"
else
  pass "render-prometheusrule.py --check rejects a PrometheusRule that differs from alerts.yaml"
fi

echo
echo "deploy-test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
