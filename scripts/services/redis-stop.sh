#!/usr/bin/env bash
# Stop the Redis started by redis-start.sh, by the PID in its pid file.
#   REDIS_PORT / REDIS_DIR  same defaults as redis-start.sh
#   REDIS_WIPE=1            also delete REDIS_DIR
# A process on these VMs can take 1-2 s to vanish after SIGTERM, so this
# waits (up to 10 s) until the PID is gone before returning.
set -euo pipefail
REDIS_PORT="${REDIS_PORT:-6479}"
REDIS_DIR="${REDIS_DIR:-/tmp/evictd-redis-$REDIS_PORT}"
pidfile="$REDIS_DIR/redis.pid"
if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  pid="$(cat "$pidfile")"
  kill "$pid"
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "redis-stop: $pid still alive after 10 s, sending SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
  fi
else
  echo "redis-stop: not running (no live pid in $pidfile)" >&2
fi
if [ "${REDIS_WIPE:-0}" = 1 ]; then rm -rf -- "$REDIS_DIR"; fi
