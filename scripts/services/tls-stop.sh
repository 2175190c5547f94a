#!/usr/bin/env bash
# Stop what tls-start.sh started (by its pid files and pg_ctl, never by
# name). TLS_WIPE=1 also deletes their state and the test PKI.
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" tls-stop
here="$(dirname "${BASH_SOURCE[0]}")"
stop_pidfile "$TLS_REDIS_DIR/redis.pid" "TLS Redis not running"
for p in "${TLS_CLUSTER_PORTS[@]}"; do
  stop_pidfile "$TLS_CLUSTER_DIR/$p/redis.pid" "TLS cluster node $p not running"
done
await_stopped
PG_WIPE="${TLS_WIPE:-0}" PGPORT="$TLS_PG_PORT" PGDATA="$TLS_PG_DATA" "$here/pg-stop.sh"
wipe_if TLS_WIPE "$TLS_REDIS_DIR"
wipe_if TLS_WIPE "$TLS_CLUSTER_DIR"
wipe_if TLS_WIPE "$TLS_DIR"
