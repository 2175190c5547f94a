# shellcheck shell=bash disable=SC2034,SC2154  # sets and reads the caller's variables
# Sourced by scripts/bench.sh and scripts/profile.sh: Postgres and Redis
# (scripts/lib/demo-stack.sh), a fresh database with the e-commerce example
# and rows to update, and helpers to drive evictd and its slots.
#
#   bench_stack              starts the servers, makes the database: sets
#                            url, admin_url, redis_url; WORK/update.sql is
#                            one single-row UPDATE for pgbench
#   write_backlog N          N single-row UPDATE transactions (pgbench, no
#                            consumer); sets BACKLOG_START, BACKLOG_END (LSNs),
#                            BACKLOG_CHANGES
#   start_evictd BIN SLOT [STATUS_MS]   sets EPID, EPID_START (ns)
#   kafka_stack              the broker (KAFKA_PORT) and Debezium streaming the
#                            database into it from a slot of its own
#                            (DBZ_SLOT), created now, no snapshot: sets
#                            kafka_brokers, KPY (the venv's python), DBZ_TOPIC
#   start_evictd_kafka BIN GROUP RESET [COMMIT_MS]   evictd on DBZ_TOPIC as
#                            consumer group GROUP (auto.offset.reset RESET);
#                            sets EPID, EPID_START
#   kafka_tool ARGS          scripts/services/kafka_tool.py against the broker
#   metric_sum PORT NAME [LABELS]   a metric of evictd's, summed over its
#                            series (those whose labels contain LABELS)
#   first_change_ms PID T0   waits for evictd's first change; ms since T0 (ns)
#   q SQL                    one query on a long-lived session, one line out
#   lock / unlock            BENCH_LOCK (flock) on fd 9, which children never
#                            inherit (9>&-)
#   stack_cleanup            the EXIT trap: stops PIDS, drops the bench slots,
#                            runs the stop scripts in STOP, last added first
#                            (Debezium before the broker and Postgres),
#                            removes WORK
#
# Needs ROOT, WORK, PGPORT, REDIS_PORT, ROWS, WRITERS, LOCK, STOP=(),
# PIDS=() and LOG_PREFIX from the caller; kafka_stack also KAFKA_PORT.

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # note, die, port_open, ...

DB=evictd_bench; PUB=evictd_bench; FIRST_ID=1000000
METRICS_PORT=$((PGPORT + 1000))
# Debezium's slot is a bench slot too: the cleanup drops it if its runner is gone.
DBZ_SLOT=evictd_bench_debezium; DBZ_STATE_DIR="$WORK/debezium"

stack_cleanup() {
  set +e
  local pid i
  # A process group's leader (bench.sh's reference script) takes its group along.
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM -- "-$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$pid" 2>/dev/null; done
  # Not Debezium's while it runs (one active slot would fail the whole
  # statement): debezium-stop.sh below drops it.
  [ -n "${url:-}" ] && psql -X -q "$url" -c \
    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'evictd_bench%' AND NOT active" \
    >/dev/null 2>&1
  # Their source records too, for a Redis that outlives this run.
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --scan --pattern 'evictd:source:evictd_bench*' 2>/dev/null \
    | xargs -r redis-cli -h 127.0.0.1 -p "$REDIS_PORT" DEL >/dev/null 2>&1
  # The stop scripts default to the test ports and state: name this run's.
  # Last started, first stopped: Debezium needs Postgres to drop its slot.
  for ((i = ${#STOP[@]} - 1; i >= 0; i--)); do
    PGPORT="$PGPORT" REDIS_PORT="$REDIS_PORT" KAFKA_PORT="${KAFKA_PORT:-}" \
      PGHOST=127.0.0.1 PGDATABASE="$DB" DBZ_STATE_DIR="$DBZ_STATE_DIR" DBZ_SLOT="$DBZ_SLOT" DBZ_RESET=1 \
      bash "scripts/services/${STOP[i]}" >/dev/null 2>&1
  done
  rm -rf "$WORK"
}

lock() { [ -z "$LOCK" ] || { exec 9>>"$LOCK"; flock 9; }; }
unlock() { [ -z "$LOCK" ] || { flock -u 9; exec 9>&-; }; }

bench_stack() {
  start_stack 9>&-
  psql -X -q -v ON_ERROR_STOP=1 "$admin_url" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
  url="${admin_url%/*}/$DB"
  psql -X -q -v ON_ERROR_STOP=1 "$url" -f "$ROOT/examples/schema/ecommerce.sql" >/dev/null 2>&1
  psql -X -q -v ON_ERROR_STOP=1 "$url" >/dev/null <<SQL
INSERT INTO shop.products (id, slug, brand_id, category_id, name, description, status, updated_at)
  SELECT g, 'load-' || g, 1, 1 + g % 4, 'load ' || g, '', 'active', now()
  FROM generate_series($FIRST_ID, $FIRST_ID + $ROWS - 1) g;
CREATE PUBLICATION $PUB FOR TABLES IN SCHEMA shop;
VACUUM ANALYZE;
SQL
  note "fresh database $url: the e-commerce example, $ROWS rows to update, publication $PUB"
  # The same single-row UPDATE as evictd-load's, one per transaction.
  cat >"$WORK/update.sql" <<SQL
\\set id random($FIRST_ID, $((FIRST_ID + ROWS - 1)))
UPDATE shop.products SET name = name || '.', updated_at = now() WHERE id = :id;
SQL
  # One psql session for the many small queries (a psql per poll costs more
  # CPU than the polling is worth).
  coproc PSQLQ { exec psql -X -At -q -v ON_ERROR_STOP=0 "$url" 2>&1 9>&-; }
  PIDS+=("$PSQLQ_PID")
}

# q SQL: runs SQL (which must print exactly one line) on that session.
q() {
  printf '%s;\n' "$1" >&"${PSQLQ[1]}"
  IFS= read -r -t 30 REPLY <&"${PSQLQ[0]}" || die "no answer to: $1"
  case "$REPLY" in ERROR:*|FATAL:*) die "$REPLY ($1)";; esac
  printf '%s' "$REPLY"
}

# write_backlog N: N single-row UPDATE transactions, with no consumer running.
write_backlog() {
  BACKLOG_START="$(q "SELECT pg_current_wal_lsn()")"
  pgbench -n -f "$WORK/update.sql" -c "$WRITERS" -j 2 -t $(( ($1 + WRITERS - 1) / WRITERS )) "$url" >"$WORK/backlog.log" 2>&1 9>&- \
    || { cat "$WORK/backlog.log" >&2; die "pgbench failed"; }
  BACKLOG_END="$(q "SELECT pg_current_wal_lsn()")"
  BACKLOG_CHANGES=$(( ($1 + WRITERS - 1) / WRITERS * WRITERS ))
}

now_ns() { date +%s%N; }
ms_since() { echo $(( ($(now_ns) - $1) / 1000000 )); }
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
# The CPU seconds of Postgres's exited backends: the postmaster's reaped
# children (cutime + cstime). A drain's walsender exits when its consumer
# disconnects, so the difference across a drain, read once it is reaped, is
# that walsender's CPU (plus any other backend that ended meanwhile).
postmaster_pid() {
  awk '/^PPid:/ {print $2}' "/proc/$(q "SELECT pg_backend_pid()")/status"
}
walsenders_cpu_s() {
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($16 + $17) / hz}' "/proc/$(postmaster_pid)/stat"
}
walsender_cpu_since() {   # S0: waits until no walsender runs, then prints the CPU s since S0
  for _ in $(seq 1 100); do
    [ "$(q "SELECT count(*) FROM pg_stat_replication")" = 0 ] && break
    sleep 0.05
  done
  sleep 0.1
  python3 -c "print(round($(walsenders_cpu_s) - $1, 2))"
}
redis_cpu_s() {   # Redis's own CPU seconds (user + system, all its threads)
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" INFO cpu \
    | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.3f", s}'
}
hwm_mib() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
slot_reached() {   # SLOT LSN
  [ "$(q "SELECT coalesce((SELECT confirmed_flush_lsn >= '$2' FROM pg_replication_slots WHERE slot_name = '$1'), false)")" = t ]
}
streaming() {      # SLOT: a walsender streams from it
  [ "$(q "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = '$1' AND r.state = 'streaming'")" -ge 1 ]
}
create_slot() { q "SELECT lsn FROM pg_create_logical_replication_slot('$1', '${2:-pgoutput}')" >/dev/null; }   # SLOT [PLUGIN]
drop_slot_now() {
  for _ in $(seq 1 100); do   # a walsender may take a moment to let go
    [ "$(q "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$1' AND active")" = 0 ] && break
    sleep 0.05
  done
  q "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name = '$1'" >/dev/null
  # And its source record: a slot dropped on purpose is not a lost one.
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" DEL "evictd:source:$1" >/dev/null
}
metric_sum() {     # PORT NAME [LABELS]: the sum of a metric's series (0 while evictd does not answer)
  # curl and awk, not python: first_change_ms polls this every 10 ms.
  curl -sf --max-time 5 "http://127.0.0.1:$1/metrics" 2>/dev/null \
    | awk -v n="$2" -v l="${3:-}" 'index($0, n "{") == 1 || index($0, n " ") == 1 { if (index($0, l)) s += $NF }
                                   END { printf "%.15g\n", s }'
}
first_change_ms() {  # PID T0: waits until evictd received a change; ms from T0 (ns)
  for _ in $(seq 1 6000); do
    [ "$(metric_sum "$METRICS_PORT" evictd_changes_received_total)" = 0 ] || { ms_since "$2"; return 0; }
    kill -0 "$1" 2>/dev/null || die "evictd exited before its first change"
    sleep 0.01
  done
  die "evictd received no change in 60 s"
}

# evictd.toml for the e-commerce graph, with the source section on stdin: FILE
write_evictd_toml() {
  { cat <<TOML
[graph]
paths = ["${BENCH_GRAPH:-$ROOT/dependency-graphs/ecommerce.toml}"]
TOML
    cat
    cat <<TOML
[redis.primary]
url = "$redis_url"
[server]
listen = "127.0.0.1:$METRICS_PORT"
[log]
level = "warn"
TOML
  } >"$1"
}
# config SLOT FILE [STATUS_MS]: evictd.toml for the e-commerce graph.
config() {
  write_evictd_toml "$2" <<TOML
[source]
kind = "postgres"
[source.postgres]
url = "$url"
slot = "$1"
publication = "$PUB"
create_slot = true
create_publication = false
${3:+status_interval_ms = $3}
TOML
}
# config_kafka GROUP FILE RESET [COMMIT_MS]: the same graph, Debezium's topic
# as the source. The group joins in about half of session.timeout.ms on the
# test broker (scripts/services/README.md), hence 2 s; COMMIT_MS, like
# STATUS_MS, bounds how late a drain's end shows in the committed offsets.
# fetch.wait.max.ms (BENCH_KAFKA_FETCH_WAIT_MS, 10): the test broker (Tansu
# 0.6) sleeps through part of it on every fetch, data or not (its
# broker/fetch.rs: half of what is left when that is 250 ms or more, else all
# of it), so librdkafka's default of 500 adds about 250 ms to each fetch; a
# Kafka broker answers as soon as there is data.
config_kafka() {
  local commit=""
  [ -z "${4:-}" ] || commit="\"auto.commit.interval.ms\" = \"$4\""
  write_evictd_toml "$2" <<TOML
[source]
kind = "kafka"
[source.kafka]
brokers = "$kafka_brokers"
group_id = "$1"
topics = ["$DBZ_TOPIC"]
[source.kafka.properties]
"session.timeout.ms" = "2000"
"heartbeat.interval.ms" = "500"
"fetch.wait.max.ms" = "${BENCH_KAFKA_FETCH_WAIT_MS:-10}"
$commit
${BENCH_KAFKA_PROPERTIES:-}
[lookup]
url = "$url"
[dead_letter]
topic = "$DBZ_PREFIX.dead-letters"
TOML
}
# start_evictd BIN SLOT [STATUS_MS]: sets EPID (and EPID_START, ns).
start_evictd() {
  config "$2" "$WORK/$2.toml" "${3:-}"
  launch_evictd "$1" "$2"
}
# start_evictd_kafka BIN GROUP RESET [COMMIT_MS]: sets EPID (and EPID_START, ns).
# RESET: earliest (a new group: evictd starts at the beginning) or latest
# (the group's offsets committed at the topic's end first; evictd refuses
# auto.offset.reset).
start_evictd_kafka() {
  [ "$3" = earliest ] || kafka_tool commit-end "$2" "$DBZ_TOPIC" >/dev/null || die "cannot commit $2 at the end of $DBZ_TOPIC"
  config_kafka "$2" "$WORK/$2.toml" "$3" "${4:-}"
  launch_evictd "$1" "$2"
}
launch_evictd() {    # BIN NAME: runs WORK/NAME.toml, logs to WORK/NAME.log
  EPID_START=$(now_ns)
  "$1" run --config "$WORK/$2.toml" 2>>"$WORK/$2.log" 9>&- &
  EPID=$!; PIDS+=("$EPID")
}

kafka_stack() {
  port_open "$KAFKA_PORT" || STOP+=(kafka-stop.sh)
  kafka_brokers="$(KAFKA_PORT="$KAFKA_PORT" bash "$ROOT/scripts/services/kafka-start.sh" 9>&- | tail -n 1)"
  KPY="$(bash "$ROOT/scripts/services/debezium-install.sh" 9>&- | tail -n 1)"
  # A topic prefix of this run's own: a broker left running keeps old topics.
  DBZ_PREFIX="evictd_bench_$(date +%s)"; DBZ_TOPIC="$DBZ_PREFIX.shop.products"
  STOP+=(debezium-stop.sh)
  note "starting Debezium (slot $DBZ_SLOT, no snapshot) -> $kafka_brokers topic $DBZ_TOPIC"
  # Debezium confirms in its slot only the LSN of its last event, so WAL
  # written after it (vacuum, a checkpoint) leaves the slot behind, and
  # evictd-load, which waits for every slot to catch up before it measures,
  # would wait its full minute. A heartbeat that writes a row (outside
  # evictd's publication) every 500 ms gives Debezium an event past any WAL.
  psql -X -q -v ON_ERROR_STOP=1 "$url" -c "CREATE TABLE IF NOT EXISTS public.bench_heartbeat (id int PRIMARY KEY, at timestamptz)"
  PGHOST=127.0.0.1 PGPORT="$PGPORT" PGDATABASE="$DB" KAFKA_BOOTSTRAP="$kafka_brokers" \
    DBZ_STATE_DIR="$DBZ_STATE_DIR" DBZ_SLOT="$DBZ_SLOT" DBZ_TOPIC_PREFIX="$DBZ_PREFIX" DBZ_SNAPSHOT_MODE=no_data \
    DBZ_EXTRA="heartbeat.interval.ms=500;heartbeat.action.query=INSERT INTO public.bench_heartbeat VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET at = now()" \
    DBZ_BACKGROUND=1 \
    bash "$ROOT/scripts/services/debezium-run.sh" >/dev/null 9>&- \
    || die "Debezium did not start (log: $DBZ_STATE_DIR/debezium.log)"
}
kafka_tool() { "$KPY" "$ROOT/scripts/services/kafka_tool.py" -b "$kafka_brokers" "$@" 9>&-; }
stop_pid() { kill -TERM "$1" 2>/dev/null; wait "$1" 2>/dev/null || true; }
wait_streaming() {   # PID SLOT LOG
  for _ in $(seq 1 400); do
    streaming "$2" && return 0
    kill -0 "$1" 2>/dev/null || { cat "$3" >&2 2>/dev/null; die "the consumer of $2 exited"; }
    sleep 0.025
  done
  die "nothing streams from $2"
}

