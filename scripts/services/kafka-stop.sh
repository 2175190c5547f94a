#!/usr/bin/env bash
# Stop the broker started by kafka-start.sh (by the PID in its pid file).
# Memory storage: every topic and message is gone afterwards.
#   KAFKA_WIPE=1  also delete $KAFKA_DIR (pid file, log)
set -euo pipefail
LOG_PREFIX=kafka-stop; LOG_ERROR=""
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_DIR="${KAFKA_DIR:-/tmp/evictd-kafka-$KAFKA_PORT}"
pidfile="$KAFKA_DIR/broker.pid"
if pid="$(live_pid "$pidfile")"; then
  # A process on a small VM can take 1-2 s to disappear.
  terminate_pid "$pid" 200 0.05 "still alive after 10 s, SIGKILL"
  rm -f "$pidfile"
else
  note "not running ($KAFKA_DIR)"
fi
if [ "${KAFKA_WIPE:-0}" = 1 ]; then
  rm -rf -- "$KAFKA_DIR"
fi
