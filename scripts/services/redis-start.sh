#!/usr/bin/env bash
# Start a standalone, non-persistent Redis for evictd's integration tests.
#
#   REDIS_PORT  TCP port, bound on 127.0.0.1 only           default 6479
#   REDIS_DIR   pid file, log and working directory         default /tmp/evictd-redis-$REDIS_PORT
#
# Idempotent: a Redis this script started earlier is reused. Progress goes to
# stderr; the last line of stdout is the URL, e.g. redis://127.0.0.1:6479
#
# Notes:
# - No config file: everything is on the command line, and persistence is
#   off (no RDB snapshots, no AOF), so a restart starts empty.
# - The server is tracked by its pid file and stopped by that PID only
#   (redis-stop.sh). If the port already answers but not from our pid file,
#   the script refuses rather than hand out someone else's Redis.
set -euo pipefail
REDIS_PORT="${REDIS_PORT:-6479}"
REDIS_DIR="${REDIS_DIR:-/tmp/evictd-redis-$REDIS_PORT}"

LOG_PREFIX=redis-start; LOG_ERROR=""
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

case "$REDIS_PORT" in ''|*[!0-9]*) die "REDIS_PORT must be a number, got '$REDIS_PORT'";; esac

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  apt_as_root "Redis is missing; as root run: apt-get install redis-server redis-tools" \
    "installing redis-server from Debian" redis-server redis-tools
fi

ping() { redis_ping "$REDIS_PORT"; }

mkdir -p "$REDIS_DIR"
if ping; then
  live_pid "$REDIS_DIR/redis.pid" >/dev/null || die "port $REDIS_PORT is served by a Redis this script did not start"
  note "already running on 127.0.0.1:$REDIS_PORT"
else
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes \
    --daemonize yes --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" \
    --dir "$REDIS_DIR" --save '' --appendonly no
  for _ in $(seq 1 100); do ping && break; sleep 0.05; done
  ping || { note "did not come up"; tail -n 20 "$REDIS_DIR/redis.log" >&2; exit 1; }
  note "started on 127.0.0.1:$REDIS_PORT (log $REDIS_DIR/redis.log)"
fi
echo "redis://127.0.0.1:$REDIS_PORT"
