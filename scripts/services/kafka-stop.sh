#!/usr/bin/env bash
# Stop the broker started by kafka-start.sh (by the PID in its pid file).
# Memory storage: every topic and message is gone afterwards.
#   KAFKA_WIPE=1  also delete $KAFKA_DIR (pid file, log)
set -euo pipefail
KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_DIR="${KAFKA_DIR:-/tmp/evictd-kafka-$KAFKA_PORT}"
pidfile="$KAFKA_DIR/broker.pid"
if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  pid="$(cat "$pidfile")"; kill -TERM "$pid"
  # A process on a small VM can take 1-2 s to disappear.
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then echo "kafka-stop: still alive after 10 s, SIGKILL" >&2; kill -KILL "$pid"; fi
  rm -f "$pidfile"
else
  echo "kafka-stop: not running ($KAFKA_DIR)" >&2
fi
if [ "${KAFKA_WIPE:-0}" = 1 ]; then
  rm -rf -- "$KAFKA_DIR"
fi
