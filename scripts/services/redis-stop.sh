#!/usr/bin/env bash
# Stop the Redis started by redis-start.sh, by the PID in its pid file.
#   REDIS_PORT / REDIS_DIR  same defaults as redis-start.sh
#   REDIS_WIPE=1            also delete REDIS_DIR
# A process on these VMs can take 1-2 s to vanish after SIGTERM, so this
# waits (up to 10 s) until the PID is gone before returning.
set -euo pipefail
LOG_PREFIX=redis-stop; LOG_ERROR=""
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
REDIS_PORT="${REDIS_PORT:-6479}"
REDIS_DIR="${REDIS_DIR:-/tmp/evictd-redis-$REDIS_PORT}"
pidfile="$REDIS_DIR/redis.pid"
if pid="$(live_pid "$pidfile")"; then
  terminate_pid "$pid" 200 0.05 "$pid still alive after 10 s, sending SIGKILL"
else
  note "not running (no live pid in $pidfile)"
fi
if [ "${REDIS_WIPE:-0}" = 1 ]; then rm -rf -- "$REDIS_DIR"; fi
