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

log() { echo "redis-start: $*" >&2; }
die() { log "$*"; exit 1; }

case "$REDIS_PORT" in ''|*[!0-9]*) die "REDIS_PORT must be a number, got '$REDIS_PORT'";; esac

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  [ "$(id -u)" -eq 0 ] || die "Redis is missing; as root run: apt-get install redis-server redis-tools"
  log "installing redis-server from Debian"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >&2
fi

ping() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
ours() { [ -s "$REDIS_DIR/redis.pid" ] && kill -0 "$(cat "$REDIS_DIR/redis.pid")" 2>/dev/null; }

mkdir -p "$REDIS_DIR"
if ping; then
  ours || die "port $REDIS_PORT is served by a Redis this script did not start"
  log "already running on 127.0.0.1:$REDIS_PORT"
else
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes \
    --daemonize yes --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" \
    --dir "$REDIS_DIR" --save '' --appendonly no
  for _ in $(seq 1 100); do ping && break; sleep 0.05; done
  ping || { log "did not come up"; tail -n 20 "$REDIS_DIR/redis.log" >&2; exit 1; }
  log "started on 127.0.0.1:$REDIS_PORT (log $REDIS_DIR/redis.log)"
fi
echo "redis://127.0.0.1:$REDIS_PORT"
