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
#   q SQL                    one query on a long-lived session, one line out
#   lock / unlock            BENCH_LOCK (flock) on fd 9, which children never
#                            inherit (9>&-)
#   stack_cleanup            the EXIT trap: stops PIDS, drops the bench slots,
#                            stops the servers in STOP, removes WORK
#
# Needs ROOT, WORK, PGPORT, REDIS_PORT, ROWS, WRITERS, LOCK, STOP=(),
# PIDS=() and `note`, `die` from the caller.

DB=evictd_bench; PUB=evictd_bench; FIRST_ID=1000000
METRICS_PORT=$((PGPORT + 1000))

stack_cleanup() {
  set +e
  local pid
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$pid" 2>/dev/null; done
  [ -n "${url:-}" ] && psql -X -q "$url" -c \
    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'evictd_bench%'" \
    >/dev/null 2>&1
  # The stop scripts default to the test ports: name this run's.
  for s in "${STOP[@]+"${STOP[@]}"}"; do
    PGPORT="$PGPORT" REDIS_PORT="$REDIS_PORT" bash "scripts/services/$s" >/dev/null 2>&1
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
hwm_mib() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
slot_reached() {   # SLOT LSN
  [ "$(q "SELECT coalesce((SELECT confirmed_flush_lsn >= '$2' FROM pg_replication_slots WHERE slot_name = '$1'), false)")" = t ]
}
streaming() {      # SLOT: a walsender streams from it
  [ "$(q "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = '$1' AND r.state = 'streaming'")" -ge 1 ]
}
create_slot() { q "SELECT lsn FROM pg_create_logical_replication_slot('$1', 'pgoutput')" >/dev/null; }
drop_slot_now() {
  for _ in $(seq 1 100); do   # a walsender may take a moment to let go
    [ "$(q "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$1' AND active")" = 0 ] && break
    sleep 0.05
  done
  q "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name = '$1'" >/dev/null
}
metric_sum() {     # PORT NAME: the sum of a metric's series
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(sys.argv[2] + "{") or l.startswith(sys.argv[2] + " ")))
PY
}

# config SLOT FILE [STATUS_MS]: evictd.toml for the e-commerce graph.
config() {
  cat >"$2" <<TOML
[graph]
paths = ["${BENCH_GRAPH:-$ROOT/dependency-graphs/ecommerce.toml}"]
[source]
kind = "postgres"
[source.postgres]
url = "$url"
slot = "$1"
publication = "$PUB"
create_slot = true
create_publication = false
${3:+status_interval_ms = $3}
[redis.primary]
url = "$redis_url"
[server]
listen = "127.0.0.1:$METRICS_PORT"
[log]
level = "warn"
TOML
}
# start_evictd BIN SLOT [STATUS_MS]: sets EPID (and EPID_START, ns).
start_evictd() {
  config "$2" "$WORK/$2.toml" "${3:-}"
  EPID_START=$(now_ns)
  "$1" run --config "$WORK/$2.toml" 2>>"$WORK/$2.log" 9>&- &
  EPID=$!; PIDS+=("$EPID")
}
stop_pid() { kill -TERM "$1" 2>/dev/null; wait "$1" 2>/dev/null || true; }
wait_streaming() {   # PID SLOT LOG
  for _ in $(seq 1 400); do
    streaming "$2" && return 0
    kill -0 "$1" 2>/dev/null || { cat "$3" >&2 2>/dev/null; die "the consumer of $2 exited"; }
    sleep 0.025
  done
  die "nothing streams from $2"
}

