#!/usr/bin/env bash
# Stop what kafka-tls-start.sh started: stunnel, the SASL gate, then both brokers.
#   KAFKA_TLS_PORT / KAFKA_TLS_DIR  same defaults as kafka-tls-start.sh
#   KAFKA_TLS_WIPE=1                also delete $KAFKA_TLS_DIR (certificates, logs)
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" kafka-tls-stop
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PORT="${KAFKA_TLS_PORT:-19200}"
DIR="${KAFKA_TLS_DIR:-/tmp/evictd-kafka-tls-$PORT}"
stop_pidfile "$DIR/stunnel.pid" "stunnel not running ($DIR)"
stop_pidfile "$DIR/gate.pid" "SASL gate not running ($DIR)"
await_stopped
KAFKA_PORT=$((PORT + 1)) KAFKA_DIR="$DIR/ssl-broker" bash "$HERE/kafka-stop.sh"
KAFKA_PORT=$((PORT + 3)) KAFKA_DIR="$DIR/sasl-broker" bash "$HERE/kafka-stop.sh"
wipe_if KAFKA_TLS_WIPE "$DIR"
[ "${KAFKA_TLS_WIPE:-0}" = 1 ] && rm -f -- "$DIR.lock"
exit 0
