#!/usr/bin/env bash
# The monitoring that ships in deploy/monitoring/, checked for real:
#
#   1. promtool check rules deploy/monitoring/alerts.yaml
#   2. promtool test rules deploy/monitoring/alerts.test.yaml   (each alert fires
#      when it should and stays silent when it should not)
#   3. deploy/monitoring/check-queries.py --offline   (dashboard variables and
#      datasources, every alert's severity/summary/description/runbook_url,
#      each runbook_url a heading of docs/alerts.md)
#   4. live: a Prometheus of its own (Debian's, scrape interval 1 s, the alert
#      rules loaded) scrapes two `evictd run` of their own under load:
#        - a Postgres source (a database, slot and publication of its own), two
#          Redis targets: the test Redis and a redis-server of its own that is
#          stopped for 3 s mid-load (sink errors, retries, sink_up 0); a
#          look-up that divides by zero for one owner (a dead letter);
#        - a Kafka source on the test broker, fed Debezium-shaped JSON by a
#          producer in Debezium's venv (confluent_kafka), one message of it
#          not JSON (a dead letter on the topic);
#      ~300 row changes/s on each for LOAD_SECS; then every dashboard
#      panel's query and every alert's signal is evaluated through
#      Prometheus's HTTP API: each must return series with values.
#
#   scripts/monitoring-test.sh
#
# Needs the test services (scripts/test.sh starts them):
#   EVICTD_TEST_PG_URL, EVICTD_TEST_REDIS_URL, EVICTD_TEST_KAFKA_BROKERS,
#   EVICTD_TEST_DEBEZIUM_VENV (its python has confluent_kafka)
# and:
#   EVICTD_BIN          default target/debug/evictd (built when missing)
#   EVICTD_MONITORING_OUT   where the query results go, default
#                       target/monitoring/ (results.json: every query, its
#                       series and values; results.txt: the printed lines)
#   LOAD_SECS           default 20
#   MONITORING_NO_KAFKA=1   no Kafka replica: its panels and alerts then fail
#                       as empty (for a machine without the broker)
#   MONITORING_PNG=1    also render the panels over the run into
#                       dashboard.png there (matplotlib, pip-installed once
#                       into a venv under EVICTD_TOOLS, default /tmp/evictd-tools)
# Ports: Prometheus and the own Redis in 9600-9649, evictd's metrics in
# 9650-9699 (the first free ones). Everything it starts is stopped at exit,
# its database, slot, keys and work directory removed.
# Installs with apt-get when missing: prometheus (promtool), python3-yaml,
# redis-server, psql. Prints one line per query and a summary; exit 1 on any
# failure. Takes about 60 s.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MON="$ROOT/deploy/monitoring"
LOG_PREFIX=monitoring-test
# shellcheck source=scripts/lib/prerequisites.sh
. "$ROOT/scripts/lib/prerequisites.sh"

LOAD_SECS="${LOAD_SECS:-20}"
OUT="${EVICTD_MONITORING_OUT:-$ROOT/target/monitoring}"
BIN="${EVICTD_BIN:-$ROOT/target/debug/evictd}"
NO_KAFKA="${MONITORING_NO_KAFKA:-0}"
PNG="${MONITORING_PNG:-0}"
TOOLS="${EVICTD_TOOLS:-/tmp/evictd-tools}"

section "prerequisites"
ensure_packages promtool:prometheus prometheus:prometheus python3-yaml \
  redis-server:redis-server redis-cli:redis-tools psql:postgresql-client-15

section "promtool check rules"
promtool check rules "$MON/alerts.yaml"
section "promtool test rules"
(cd "$MON" && promtool test rules alerts.test.yaml)
section "dashboard and alerts, offline"
python3 "$MON/check-queries.py" --offline

# --- the live part --------------------------------------------------------------
: "${EVICTD_TEST_PG_URL:?not set: run through scripts/test.sh or start scripts/services/pg-start.sh}"
: "${EVICTD_TEST_REDIS_URL:?not set: run through scripts/test.sh or start scripts/services/redis-start.sh}"
if [ "$NO_KAFKA" != 1 ]; then
  : "${EVICTD_TEST_KAFKA_BROKERS:?not set (or MONITORING_NO_KAFKA=1)}"
  : "${EVICTD_TEST_DEBEZIUM_VENV:?not set: its python produces the Kafka events (or MONITORING_NO_KAFKA=1)}"
  KPY="$EVICTD_TEST_DEBEZIUM_VENV/bin/python"
  "$KPY" -c 'import confluent_kafka' 2>/dev/null || die "$KPY has no confluent_kafka"
fi
if [ ! -x "$BIN" ]; then
  section "building evictd"
  (cd "$ROOT" && cargo build --locked --bin evictd >&2)
fi

# free_port VAR FROM TO: sets VAR to the first port in FROM..TO that nothing
# listens on and no earlier call took (no subshell: TAKEN must persist).
TAKEN=" "
free_port() {
  local p
  for ((p = $2; p <= $3; p++)); do
    case "$TAKEN" in *" $p "*) continue ;; esac
    port_open "$p" && continue
    TAKEN+="$p "
    printf -v "$1" %s "$p"
    return 0
  done
  die "no free port in $2-$3"
}

ID="mon$$"
WORK="$(mktemp -d /tmp/evictd-monitoring.XXXXXX)"
DB="evictd_$ID"
DB_URL="${EVICTD_TEST_PG_URL%/*}/$DB"
SLOT="evictd_$ID"
PIDS=()          # processes to stop at exit, in start order
DB_CREATED=0

# shellcheck disable=SC2317  # called through the trap
cleanup() {
  local status=$? i
  trap - EXIT INT TERM
  set +e
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -0 "${PIDS[i]}" 2>/dev/null && terminate_pid "${PIDS[i]}" 50 0.2 "pid ${PIDS[i]} ignored SIGTERM: SIGKILL"
  done
  if [ "$DB_CREATED" = 1 ]; then
    psql -qX "$EVICTD_TEST_PG_URL" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$SLOT'" >/dev/null 2>&1
    psql -qX "$EVICTD_TEST_PG_URL" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
  fi
  redis-cli -u "$EVICTD_TEST_REDIS_URL" --scan --pattern "*$ID*" 2>/dev/null \
    | xargs -r -n 500 redis-cli -u "$EVICTD_TEST_REDIS_URL" UNLINK >/dev/null 2>&1
  if [ "$status" -ne 0 ] && [ -d "$WORK" ]; then
    for f in "$WORK"/*.log; do
      [ -s "$f" ] || continue
      echo "--- tail of $f" >&2
      tail -n 20 "$f" >&2
    done
  fi
  rm -rf -- "$WORK"
  if [ "$status" -eq 0 ]; then section "monitoring test passed"; else section "monitoring test FAILED (exit $status)"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port PROM_PORT 9600 9649
free_port FLAKY_PORT 9600 9649
free_port PG_METRICS 9650 9699
free_port KAFKA_METRICS 9650 9699

http_get() {   # URL: prints the body of a 200 answer, fails otherwise
  python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1" 2>/dev/null
}

section "services of its own: Redis :$FLAKY_PORT, database $DB"
start_flaky() {
  redis-server --bind 127.0.0.1 --port "$FLAKY_PORT" --save "" --appendonly no \
    --logfile "$WORK/redis-flaky.log" >/dev/null 2>&1 &
  FLAKY_PID=$!
  PIDS+=("$FLAKY_PID")
  wait_until 50 0.1 redis-cli -p "$FLAKY_PORT" PING >/dev/null 2>&1 || die "own redis-server on $FLAKY_PORT did not start"
}
start_flaky

psql -qX "$EVICTD_TEST_PG_URL" -c "CREATE DATABASE $DB" >/dev/null
DB_CREATED=1
psql -qX "$DB_URL" -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, owner_id bigint NOT NULL, name text NOT NULL);
ALTER TABLE app.items REPLICA IDENTITY FULL;
SQL

# The graph: an item's key, and its owner's page through a look-up that
# divides by zero for owner 13 (the dead letter).
cat >"$WORK/graph-pg.toml" <<EOF
[tables."app.items"]
key = ["id"]
columns = ["id", "owner_id", "name"]

[caches.${ID}_item]
key = "${ID}:item:{id}"
[[caches.${ID}_item.depends]]
table = "app.items"

[caches.${ID}_owner]
key = "${ID}:owner:{id}"
[[caches.${ID}_owner.depends]]
table = "app.items"
lookup = { query = "SELECT o AS id FROM unnest(\$1::bigint[]) AS o WHERE 1 / (o - 13) IS NOT NULL", arg = "owner_id" }
EOF
cat >"$WORK/evictd-pg.toml" <<EOF
[graph]
paths = ["graph-pg.toml"]
[source]
kind = "postgres"
[source.postgres]
url = "$DB_URL"
slot = "$SLOT"
publication = "$SLOT"
create_slot = true
create_publication = true
status_interval_ms = 200
[batch]
max_delay_ms = 5
[run]
retry_max_ms = 200
shutdown_grace_ms = 5000
[redis.primary]
url = "$EVICTD_TEST_REDIS_URL"
broadcast = true
broadcast_transport = "both"
broadcast_channel = "$ID:invalidations"
[redis.flaky]
url = "redis://127.0.0.1:$FLAKY_PORT"
broadcast = false
[server]
listen = "127.0.0.1:$PG_METRICS"
[log]
level = "info"
EOF

TOPIC="$ID.app.items"
if [ "$NO_KAFKA" != 1 ]; then
  cat >"$WORK/graph-kafka.toml" <<EOF
[tables."app.items"]
key = ["id"]
columns = ["id", "owner_id", "name"]

[caches.${ID}_kitem]
key = "${ID}:kitem:{id}"
[[caches.${ID}_kitem.depends]]
table = "app.items"

[caches.${ID}_kowner]
key = "${ID}:kowner:{owner_id}"
[[caches.${ID}_kowner.depends]]
table = "app.items"
EOF
  cat >"$WORK/evictd-kafka.toml" <<EOF
[graph]
paths = ["graph-kafka.toml"]
[source]
kind = "kafka"
[source.kafka]
brokers = "$EVICTD_TEST_KAFKA_BROKERS"
group_id = "evictd-$ID"
topics = ["$TOPIC"]
properties = { "statistics.interval.ms" = "1000" }
[dead_letter]
topic = "$ID.dead-letters"
[batch]
max_delay_ms = 5
[run]
retry_max_ms = 200
shutdown_grace_ms = 5000
[redis.primary]
url = "$EVICTD_TEST_REDIS_URL"
broadcast = true
broadcast_transport = "both"
broadcast_channel = "$ID:kinvalidations"
[server]
listen = "127.0.0.1:$KAFKA_METRICS"
[log]
level = "info,librdkafka=warn,rdkafka=warn"
EOF
  # The Kafka side's producer: topics first, then Debezium-shaped events
  # (no embedded schema, as tests/it/kafka.rs writes them) at a rate.
  cat >"$WORK/produce.py" <<'EOF'
import json, sys, time
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

brokers, topic, dead_letters, mode = sys.argv[1:5]
if mode == "topics":
    admin = AdminClient({"bootstrap.servers": brokers})
    for f in admin.create_topics([NewTopic(topic, 3, 1), NewTopic(dead_letters, 1, 1)]).values():
        f.result(timeout=30)
    sys.exit(0)
secs, rate = float(mode), 300
p = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
start, n = time.monotonic(), 0
while time.monotonic() - start < secs:
    for _ in range(rate // 10):
        n += 1
        now_us = int(time.time() * 1e6)
        row = {"id": n % 500, "owner_id": 100 + n % 50, "name": f"item {n}"}
        event = {"before": row if n > 500 else None, "after": row, "op": "u" if n > 500 else "c",
                 "source": {"connector": "postgresql", "schema": "app", "table": "items", "txId": n,
                            "ts_ms": now_us // 1000, "ts_us": now_us}, "ts_ms": now_us // 1000}
        p.produce(topic, key=json.dumps({"id": row["id"]}), value=json.dumps(event))
        if n == 1000:  # one message evictd cannot decode: to the dead-letter topic
            p.produce(topic, key=json.dumps({"id": 1}), value=b"not a Debezium event")
    p.poll(0)
    time.sleep(0.1)
p.flush(30)
print(n)
EOF
  "$KPY" "$WORK/produce.py" "$EVICTD_TEST_KAFKA_BROKERS" "$TOPIC" "$ID.dead-letters" topics
fi

section "Prometheus on :$PROM_PORT (scrape interval 1 s)"
cp "$MON/alerts.yaml" "$WORK/alerts.yaml"
{
  echo "global: {scrape_interval: 1s, evaluation_interval: 1s}"
  echo "rule_files: [alerts.yaml]"
  echo "scrape_configs:"
  echo "  - job_name: evictd"
  echo "    static_configs: [{targets: ['127.0.0.1:$PG_METRICS']}]"
  if [ "$NO_KAFKA" != 1 ]; then
    echo "  - job_name: evictd-kafka"
    echo "    static_configs: [{targets: ['127.0.0.1:$KAFKA_METRICS']}]"
  fi
} >"$WORK/prometheus.yml"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prometheus-data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
PROM="http://127.0.0.1:$PROM_PORT"
wait_until 100 0.2 http_get "$PROM/-/ready" >/dev/null || die "Prometheus did not become ready"
rules="$(http_get "$PROM/api/v1/rules")"
python3 - "$rules" "$MON/alerts.yaml" <<'EOF' || die "Prometheus did not load every rule of alerts.yaml"
import json, sys, yaml
loaded = {r["name"]: r["health"] for g in json.loads(sys.argv[1])["data"]["groups"] for r in g["rules"]}
want = [r["alert"] for g in yaml.safe_load(open(sys.argv[2]))["groups"] for r in g["rules"]]
bad = [w for w in want if loaded.get(w) not in ("ok", "unknown")]
print(f"monitoring-test: Prometheus loaded {len(loaded)} rules of {len(want)}", file=sys.stderr)
sys.exit(1 if bad or len(loaded) != len(want) else 0)
EOF

RUN_START="$(date +%s)"
section "evictd run: Postgres on :$PG_METRICS$([ "$NO_KAFKA" = 1 ] || echo ", Kafka on :$KAFKA_METRICS")"
"$BIN" run --config "$WORK/evictd-pg.toml" >"$WORK/evictd-pg.log" 2>&1 &
PIDS+=($!)
if [ "$NO_KAFKA" != 1 ]; then
  "$BIN" run --config "$WORK/evictd-kafka.toml" >"$WORK/evictd-kafka.log" 2>&1 &
  PIDS+=($!)
fi
wait_until 150 0.2 http_get "http://127.0.0.1:$PG_METRICS/readyz" >/dev/null \
  || die "the Postgres evictd never became ready"
if [ "$NO_KAFKA" != 1 ]; then
  wait_until 150 0.2 http_get "http://127.0.0.1:$KAFKA_METRICS/readyz" >/dev/null \
    || die "the Kafka evictd never became ready"
  # Ready is not assigned: the group's first rebalance can take ~20 s.
  # shellcheck disable=SC2317  # called through wait_until
  kafka_assigned() {
    grep -q '^evictd_kafka_rebalances_total{kind="assign"} [1-9]' <<<"$(http_get "http://127.0.0.1:$KAFKA_METRICS/metrics")"
  }
  wait_until 300 0.2 kafka_assigned || die "the Kafka evictd was never assigned its partitions"
fi

section "load: ~300 changes/s for ${LOAD_SECS}s on each source; Redis :$FLAKY_PORT down for 3 s"
ticks=$((LOAD_SECS * 10))
psql -qX "$DB_URL" -v ON_ERROR_STOP=1 >"$WORK/load.log" 2>&1 <<SQL &
INSERT INTO app.items SELECT g, 100 + g % 50, 'item ' || g FROM generate_series(1, 1000) g;
DO \$\$
BEGIN
  FOR i IN 1..$ticks LOOP
    -- 10 updates and 20 inserts, committed together: 30 changes per 0.1 s
    UPDATE app.items SET name = 'item ' || id || ' v' || i WHERE id BETWEEN (i % 90) * 10 + 1 AND (i % 90) * 10 + 10;
    INSERT INTO app.items SELECT 1000000 + i * 100 + g, 100 + g % 50, 'new' FROM generate_series(1, 20) g;
    IF i = $((ticks / 2)) THEN
      INSERT INTO app.items VALUES (5000000, 13, 'the owner whose look-up fails');
    END IF;
    COMMIT;
    PERFORM pg_sleep(0.1);
  END LOOP;
END
\$\$;
SQL
LOAD_PIDS=($!)
PIDS+=($!)
if [ "$NO_KAFKA" != 1 ]; then
  "$KPY" "$WORK/produce.py" "$EVICTD_TEST_KAFKA_BROKERS" "$TOPIC" "$ID.dead-letters" "$LOAD_SECS" \
    >"$WORK/produce.log" 2>&1 &
  LOAD_PIDS+=($!)
  PIDS+=($!)
fi
sleep $((LOAD_SECS / 3))
note "stopping the own Redis (pid $FLAKY_PID) for 3 s"
terminate_pid "$FLAKY_PID" 50 0.1 "redis-server $FLAKY_PID ignored SIGTERM: SIGKILL"
sleep 3
start_flaky
for pid in "${LOAD_PIDS[@]}"; do
  wait "$pid" || die "a load generator failed (see $WORK/load.log, $WORK/produce.log)"
done
note "load done: $(cat "$WORK/produce.log" 2>/dev/null || echo 0) Kafka messages"
# Let the daemons catch up and Prometheus scrape the result (a few 1 s scrapes).
sleep 5

section "every dashboard panel query and alert signal, through Prometheus"
mkdir -p "$OUT"
status=0
python3 "$MON/check-queries.py" --prometheus "$PROM" --out "$OUT/results.json" | tee "$OUT/results.txt" || status=$?
note "query results: $OUT/results.json, $OUT/results.txt"

if [ "$PNG" = 1 ]; then
  section "the dashboard as a PNG"
  venv="$TOOLS/monitoring-venv"
  if ! "$venv/bin/python" -c 'import matplotlib, yaml' 2>/dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet "matplotlib==3.*" "pyyaml==6.*" >&2
  fi
  if "$venv/bin/python" "$MON/render-dashboard.py" --prometheus "$PROM" --start "$RUN_START" \
    --end "$(date +%s)" --out "$OUT/dashboard.png"; then
    note "dashboard: $OUT/dashboard.png"
  else
    note "rendering the dashboard failed"
    status=1
  fi
fi

section "alerts in Prometheus: every rule healthy, the dead letters fire, nothing else does"
# The provoked dead letters fire at once (no `for`); every other alert needs
# minutes of trouble, so none may be firing after this short, healthy run.
expected="EvictdDeadLetters"
[ "$NO_KAFKA" = 1 ] || expected+=" EvictdKafkaDeadLetters"
http_get "$PROM/api/v1/alerts" >"$WORK/alerts.json" || die "cannot read $PROM/api/v1/alerts"
http_get "$PROM/api/v1/rules" >"$WORK/rules.json" || die "cannot read $PROM/api/v1/rules"
python3 - "$WORK/alerts.json" "$expected" "$WORK/rules.json" <<'EOF' | tee -a "$OUT/results.txt" || status=1
import json, sys
rules = [r for g in json.load(open(sys.argv[3]))["data"]["groups"] for r in g["rules"]]
unhealthy = [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in rules if r["health"] != "ok"]
print(f"rules evaluated by Prometheus: {len(rules) - len(unhealthy)}/{len(rules)} healthy")
for u in unhealthy:
    print(f"FAIL  rule {u}")
alerts = json.load(open(sys.argv[1]))["data"]["alerts"]
firing = sorted({a["labels"]["alertname"] for a in alerts if a["state"] == "firing"})
pending = sorted({a["labels"]["alertname"] for a in alerts if a["state"] == "pending"})
expected = sorted(sys.argv[2].split())
print(f"alerts firing: {', '.join(firing) or 'none'}; pending: {', '.join(pending) or 'none'}")
missing, extra = sorted(set(expected) - set(firing)), sorted(set(firing) - set(expected))
for name in missing:
    print(f"FAIL  {name} is not firing")
for name in extra:
    print(f"FAIL  {name} fires on a healthy run")
sys.exit(1 if missing or extra or unhealthy else 0)
EOF
exit "$status"
