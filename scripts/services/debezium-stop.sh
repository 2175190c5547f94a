#!/usr/bin/env bash
# Stop the runner started by debezium-run.sh (by the PID it recorded in
# $DBZ_STATE_DIR/runner.pid, checked to be a debezium_to_kafka.py process).
#   DBZ_STATE_DIR  default /tmp/evictd-debezium; one runner per state dir, so
#                  DBZ_STATE_DIR=<dir> stops exactly the runner started with it
#   DBZ_RESET=1    also drop its replication slot DBZ_SLOT (default
#                  debezium_evictd) and delete DBZ_STATE_DIR; otherwise the
#                  slot keeps retaining WAL in Postgres. PGHOST/PGPORT/
#                  PGDATABASE/PGUSER as for debezium-run.sh.
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" debezium-stop   # PG* DBZ_STATE_DIR DBZ_SLOT pidfile
# A pid file left by a runner that died (machine reboot, SIGKILL) may name a
# process that reused the PID: only a debezium_to_kafka.py process is stopped.
runner_alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ -r "/proc/$1/cmdline" ] || return 0
  tr '\0' ' ' <"/proc/$1/cmdline" | grep -F debezium_to_kafka.py >/dev/null
}
if [ -s "$pidfile" ] && ! runner_alive "$(cat "$pidfile")"; then
  if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    note "stale pid file (pid $(cat "$pidfile") is not a Debezium runner), removing it"
  fi
  rm -f "$pidfile"
fi
if [ -s "$pidfile" ]; then
  # The engine commits its offsets on a clean stop; the JVM takes a few seconds.
  terminate_pid "$(cat "$pidfile")" 300 0.1 "still alive after 30 s, SIGKILL"
  rm -f "$pidfile"
else
  note "not running ($DBZ_STATE_DIR)"
fi
if [ "${DBZ_RESET:-0}" = 1 ]; then
  url="postgres://$PGUSER@$PGHOST:$PGPORT/$PGDATABASE"
  slots() { psql -X -qtA "$url" -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$DBZ_SLOT'"; }
  # The walsender may need a moment to release the slot after the runner exits.
  for _ in $(seq 1 50); do
    [ "$(slots)" = 0 ] && break
    psql -X -qtA "$url" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$DBZ_SLOT' AND NOT active" >/dev/null 2>&1 || true
    sleep 0.2
  done
  [ "$(slots)" = 0 ] || note "could not drop slot $DBZ_SLOT (still active, or Postgres unreachable)"
  rm -rf -- "$DBZ_STATE_DIR"
fi
