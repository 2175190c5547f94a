#!/usr/bin/env bash
# Stop the broker started by kafka-start.sh (by the PID in its pid file).
# Memory storage: every topic and message is gone afterwards.
#   KAFKA_PORT / KAFKA_DIR  same defaults as kafka-start.sh
#   KAFKA_WIPE=1            also delete $KAFKA_DIR (pid file, log)
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" kafka-stop   # KAFKA_PORT KAFKA_DIR pidfile
stop_pidfile "$pidfile" "not running ($KAFKA_DIR)"
await_stopped
wipe_if KAFKA_WIPE "$KAFKA_DIR"
