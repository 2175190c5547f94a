#!/usr/bin/env bash
# Stop the Redis started by redis-start.sh, by the PID in its pid file.
#   REDIS_PORT / REDIS_DIR  same defaults as redis-start.sh
#   REDIS_WIPE=1            also delete REDIS_DIR
# A process on these VMs can take 1-2 s to vanish after SIGTERM, so this
# waits (up to 10 s) until the PID is gone before returning.
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" redis-stop   # REDIS_PORT REDIS_DIR
stop_pidfile "$REDIS_DIR/redis.pid" "not running (no live pid in $REDIS_DIR/redis.pid)"
await_stopped
wipe_if REDIS_WIPE "$REDIS_DIR"
