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
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" redis-start   # REDIS_PORT REDIS_DIR

is_number "$REDIS_PORT" || die "REDIS_PORT must be a number, got '$REDIS_PORT'"
need_redis

mkdir -p "$REDIS_DIR"
if redis_ours "$REDIS_PORT" "$REDIS_DIR"; then
  note "already running on 127.0.0.1:$REDIS_PORT"
else
  redis_launch "$REDIS_PORT" "$REDIS_DIR"
  up_or_fail 100 "$REDIS_DIR/redis.log" "did not come up" redis_ping "$REDIS_PORT"
  note "started on 127.0.0.1:$REDIS_PORT (log $REDIS_DIR/redis.log)"
fi
echo "redis://127.0.0.1:$REDIS_PORT"
