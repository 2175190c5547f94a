#!/usr/bin/env bash
# Runs evictd's container image as a container and checks it works:
#
#   scripts/image-test.sh                 builds the image (scripts/image.sh), then tests it
#   scripts/image-test.sh --image DIR     tests an OCI image layout already built
#                                         (scripts/image.sh writes target/image/oci)
#   scripts/image-test.sh --binary PATH   builds the image around that evictd
#                                         binary instead of a release build
#
# The image is unpacked into an OCI runtime bundle (umoci) and run with runc
# (Debian's), as the image says: UID 65532, its entrypoint, with a read-only
# root, /tmp a tmpfs, no capabilities, its own PID/mount/IPC/UTS namespaces
# and the host's network (the test services listen on 127.0.0.1). Checked:
#
#   1. `evictd --version` prints the Cargo.toml version;
#   2. `evictd check --config /etc/evictd/evictd.toml` on a config and graph
#      mounted in read-only, against the test Postgres (exit 0);
#   3. `evictd run` with them: the process runs as 65532:65532 on a read-only
#      root; once ready, a Redis key is written, its row updated, and the key
#      must go; SIGTERM stops the container.
#
# If runc cannot run a container here (no namespaces, no cgroups), the error
# is printed as evidence and the same checks run through
# `chroot --userspec=65532:65532` of the unpacked root instead (root only;
# the root is then writable and the namespaces are the host's), saying so.
# EVICTD_IMAGE_RUNTIME=chroot forces that.
#
# Services: EVICTD_TEST_PG_URL (default postgres://postgres@127.0.0.1:55432/evictd),
# EVICTD_TEST_REDIS_URL (default redis://127.0.0.1:6479), already running
# (scripts/services/). The test makes database, slot and publication
# evictd_image_test and Redis keys under evictd_image_test:, and removes them.
# Metrics port 19287 (EVICTD_IMAGE_TEST_PORT).
#
# Installs runc, umoci, psql, redis-cli and curl with apt-get when missing.
# (Debian's crun 1.8 was tried first and refuses hybrid cgroup hierarchies,
# "cgroups in hybrid mode not supported", as on these machines; runc runs.)
# Prints the image's sizes and "image-test: N passed, N failed"; exit 0 only
# when every check passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_PREFIX="image-test"
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"

image=""
binary=()
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image="$2"; shift 2 ;;
    --binary) binary=(--binary "$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//; /^set -euo/d'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "needs root (runc and chroot run the container as 65532)"

PG_URL="${EVICTD_TEST_PG_URL:-postgres://postgres@127.0.0.1:55432/evictd}"
REDIS_URL="${EVICTD_TEST_REDIS_URL:-redis://127.0.0.1:6479}"
PORT="${EVICTD_IMAGE_TEST_PORT:-19287}"
NAME=evictd_image_test
ID="evictd-image-test-$$"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)"

missing=()
for need in runc:runc umoci:umoci psql:postgresql-client-15 redis-cli:redis-tools curl:curl; do
  command -v "${need%%:*}" >/dev/null || missing+=("${need#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  note "installing with apt-get: ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
    --no-install-recommends "${missing[@]}" >&2
fi

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
indent() { sed "s/^/$1/"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }

WORK="$(mktemp -d -t evictd-image-test.XXXXXX)"
runtime=""
admin_url="${PG_URL%/*}/postgres"
db_url="${PG_URL%/*}/$NAME"
redis_host="$(echo "$REDIS_URL" | sed -E 's#^redis://([^:/]+):([0-9]+).*#\1#')"
redis_port="$(echo "$REDIS_URL" | sed -E 's#^redis://([^:/]+):([0-9]+).*#\2#')"
rcli() { redis-cli -h "$redis_host" -p "$redis_port" "$@"; }

cleanup() {
  set +e
  if [ "$runtime" = runc ]; then
    runc kill "$ID" KILL >/dev/null 2>&1
    runc delete -f "$ID" >/dev/null 2>&1
  elif [ -n "${chroot_pid:-}" ]; then
    kill -KILL "$chroot_pid" 2>/dev/null
  fi
  umount "$WORK/bundle/rootfs/etc/evictd" 2>/dev/null
  psql -X -q "$admin_url" -c "SELECT pg_drop_replication_slot('$NAME') FROM pg_replication_slots WHERE slot_name = '$NAME'" \
    -c "DROP DATABASE IF EXISTS $NAME WITH (FORCE)" >/dev/null 2>&1
  rcli DEL "evictd:source:$NAME" "$NAME:item:1" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "$image" ]; then
  section "building the image (scripts/image.sh)"
  bash "$ROOT/scripts/image.sh" ${binary[@]+"${binary[@]}"} --out "$WORK/image" >"$WORK/image.txt"
  cat "$WORK/image.txt"
  image="$WORK/image/oci"
fi
[ -f "$image/index.json" ] || die "$image is not an OCI image layout (no index.json)"
tag="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$image/index.json")"

archive="$(dirname "$image")/evictd-$tag.oci.tar"
if [ -f "$archive" ]; then
  mkdir -p "$WORK/archive"
  tar -xf "$archive" -C "$WORK/archive"
  if [ "$(umoci ls --layout "$WORK/archive")" = "$tag" ] && cmp -s "$WORK/archive/index.json" "$image/index.json"; then
    pass "the oci-archive $(basename "$archive") is the same image (umoci reads reference $tag)"
  else
    fail "the oci-archive $(basename "$archive") is not the layout's image"
  fi
fi

section "unpacking $image:$tag (umoci)"
umoci unpack --image "$image:$tag" "$WORK/bundle" >/dev/null
rootfs="$WORK/bundle/rootfs"
python3 - "$image" <<'EOF'
import json, os, sys
layout = sys.argv[1]
blob = lambda d: os.path.join(layout, "blobs", *d.split(":"))
index = json.load(open(os.path.join(layout, "index.json")))
manifest = json.load(open(blob(index["manifests"][0]["digest"])))
config = json.load(open(blob(manifest["config"]["digest"])))["config"]
print("image config: User", config["User"], "Entrypoint", config["Entrypoint"])
for k, v in sorted(config["Labels"].items()):
    print(f"  label {k}={v}")
layer = sum(l["size"] for l in manifest["layers"])
print(f"size: compressed layer {layer} bytes ({layer / 1048576:.1f} MiB)")
EOF
echo "size: unpacked $(du -sb "$rootfs" | cut -f1) bytes ($(du -sm "$rootfs" | cut -f1) MiB)"
echo "files: $(cd "$rootfs" && find . -type f | sort | tr '\n' ' ')"
if [ ! -e "$rootfs/bin/sh" ] && [ ! -e "$rootfs/usr/bin/sh" ]; then
  pass "the image has no shell"
else
  fail "the image has a shell"
fi

# The config and graph, mounted read-only at /etc/evictd.
mkdir -p "$WORK/etc-evictd/dependency-graphs"
cat >"$WORK/etc-evictd/dependency-graphs/items.toml" <<EOF
[tables."app.items"]
key = ["id"]
columns = ["id", "name"]

[caches.image_test_item]
key = "$NAME:item:{id}"
[[caches.image_test_item.depends]]
table = "app.items"
EOF
cat >"$WORK/etc-evictd/evictd.toml" <<EOF
[graph]
paths = ["dependency-graphs"]
[source]
kind = "postgres"
[source.postgres]
url = "$db_url"
slot = "$NAME"
publication = "$NAME"
create_slot = true
create_publication = true
status_interval_ms = 100
[batch]
max_delay_ms = 5
[redis.primary]
url = "$REDIS_URL"
[server]
listen = "127.0.0.1:$PORT"
[log]
format = "json"
level = "info"
EOF
chmod -R a+rX "$WORK/etc-evictd"

section "a fresh database $NAME"
psql -X -q -v ON_ERROR_STOP=1 "$admin_url" \
  -c "SELECT pg_drop_replication_slot('$NAME') FROM pg_replication_slots WHERE slot_name = '$NAME'" \
  -c "DROP DATABASE IF EXISTS $NAME WITH (FORCE)" -c "CREATE DATABASE $NAME" >/dev/null
psql -X -q -v ON_ERROR_STOP=1 "$db_url" \
  -c "CREATE SCHEMA app" -c "CREATE TABLE app.items (id bigint PRIMARY KEY, name text NOT NULL)" \
  -c "ALTER TABLE app.items REPLICA IDENTITY FULL" -c "INSERT INTO app.items VALUES (1, 'a')" >/dev/null
rcli DEL "evictd:source:$NAME" "$NAME:item:1" >/dev/null
port_open "$PORT" && die "port $PORT is in use (EVICTD_IMAGE_TEST_PORT)"

# A runc bundle: the image's process (user, entrypoint, env) as umoci wrote
# it, with a read-only root, /tmp a tmpfs, no capabilities, the host's network.
bundle_for() {   # ARGS... → config.json for evictd ARGS
  python3 - "$WORK/bundle/config.json" "$WORK/etc-evictd" "$@" <<'EOF'
import json, sys
path, etc, args = sys.argv[1], sys.argv[2], sys.argv[3:]
c = json.load(open(path))
if "entrypoint" not in c.setdefault("annotations", {}):
    c["annotations"]["entrypoint"] = json.dumps(c["process"]["args"])
c["process"]["args"] = json.loads(c["annotations"]["entrypoint"]) + args
c["process"]["terminal"] = False
c["process"]["capabilities"] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
c["root"]["readonly"] = True
c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
c["mounts"] = [m for m in c["mounts"] if m["destination"] not in ("/tmp", "/etc/evictd")] + [
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=16m"]},
    {"destination": "/etc/evictd", "type": "bind", "source": etc, "options": ["rbind", "ro"]},
]
json.dump(c, open(path, "w"), indent=1)
EOF
}

# Runs `evictd ARGS` in the container to completion; its output on stdout.
run_once() {
  if [ "$runtime" = runc ]; then
    bundle_for "$@"
    runc run --bundle "$WORK/bundle" "$ID-once" </dev/null
  else
    (cd / && chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/evictd "$@" </dev/null)
  fi
}

section "choosing the container runtime"
if [ "${EVICTD_IMAGE_RUNTIME:-runc}" = runc ]; then
  runtime=runc
  if out="$(run_once --version 2>&1)"; then
    note "runc $(runc --version | head -n1 | awk '{print $3}'): runs the bundle"
  else
    note "runc cannot run a container here; the evidence:"
    indent "  runc: " <<<"$out" >&2
    for f in /proc/sys/user/max_user_namespaces /sys/fs/cgroup/cgroup.controllers; do
      [ -r "$f" ] && echo "  $f: $(cat "$f")" >&2
    done
    runtime=chroot
  fi
else
  runtime=chroot
fi
if [ "$runtime" = chroot ]; then
  note "FALLBACK: chroot --userspec=65532:65532 of the unpacked root (no namespaces, root not read-only)"
  mkdir -p "$rootfs/etc/evictd"
  mount --bind -o ro "$WORK/etc-evictd" "$rootfs/etc/evictd"
fi
echo "runtime: $runtime"

section "1. evictd --version"
out="$(run_once --version 2>&1)" || true
if [ "$out" = "evictd $version" ]; then
  pass "--version prints 'evictd $version'"
else
  fail "--version printed: $out"
fi

section "2. evictd check on the mounted config and graph"
if out="$(run_once check --config /etc/evictd/evictd.toml 2>&1)"; then
  pass "check --config /etc/evictd/evictd.toml exits 0"
else
  fail "check exited non-zero"
fi
indent "  | " <<<"$out"

section "3. evictd run: one change invalidates a key"
log="$WORK/run.log"
if [ "$runtime" = runc ]; then
  bundle_for run --config /etc/evictd/evictd.toml
  runc run -d --bundle "$WORK/bundle" "$ID" </dev/null >"$log" 2>&1
  pid="$(runc state "$ID" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')"
else
  (cd / && exec chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/evictd run --config /etc/evictd/evictd.toml) \
    </dev/null >"$log" 2>&1 &
  chroot_pid=$!
  pid=$chroot_pid
  sleep 0.2
  # chroot execs evictd: the same PID.
fi
ready() { curl -fsS "http://127.0.0.1:$PORT/readyz" 2>/dev/null | grep -q '^ready'; }
if wait_until 60 0.5 ready; then
  pass "evictd run is ready ($(curl -fsS "http://127.0.0.1:$PORT/readyz"))"
else
  fail "evictd run never became ready"
  tail -n 20 "$log" | sed 's/^/  | /'
fi
uids="$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status" 2>/dev/null || echo gone)"
gids="$(awk '/^Gid:/ {print $2, $3, $4, $5}' "/proc/$pid/status" 2>/dev/null || echo gone)"
if [ "$uids" = "65532 65532 65532 65532" ] && [ "$gids" = "65532 65532 65532 65532" ]; then
  pass "the process runs as 65532:65532"
else
  fail "the process's Uid: $uids, Gid: $gids"
fi
if [ "$runtime" = runc ]; then
  root_opts="$(awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | tail -n1)"
  case ",$root_opts," in
    *,ro,*) pass "its root filesystem is read-only ($root_opts)" ;;
    *) fail "its root filesystem is mounted $root_opts" ;;
  esac
  caps="$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")"
  if [ "$caps" = 0000000000000000 ]; then pass "it has no capabilities"; else fail "CapEff $caps"; fi
fi
rcli SET "$NAME:item:1" cached >/dev/null
psql -X -q "$db_url" -c "UPDATE app.items SET name = 'b' WHERE id = 1" >/dev/null
gone() { [ "$(rcli EXISTS "$NAME:item:1")" = 0 ]; }
if wait_until 60 0.25 gone; then
  pass "the update invalidated $NAME:item:1 in Redis"
else
  fail "$NAME:item:1 is still in Redis 15 s after the update"
  tail -n 20 "$log" | sed 's/^/  | /'
fi

if [ "$runtime" = runc ]; then
  runc kill "$ID" TERM
  stopped() { [ "$(runc state "$ID" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])' 2>/dev/null)" != running ]; }
else
  kill -TERM "$pid"
  stopped() { ! kill -0 "$pid" 2>/dev/null; }
fi
if wait_until 40 0.25 stopped; then
  pass "SIGTERM stopped it"
else
  fail "it was still running 10 s after SIGTERM"
fi
grep -c '"level":"WARN"\|"level":"ERROR"' "$log" >/dev/null && {
  echo "  warnings and errors it logged:"
  grep '"level":"WARN"\|"level":"ERROR"' "$log" | head -n 5 | sed 's/^/  | /'
}

echo
echo "image-test ($runtime): $passed passed, $failed failed"
[ "$failed" -eq 0 ]
