#!/usr/bin/env bash
# Start the TLS servers of evictd's TLS tests (tests/it/tls.rs), with a CA
# the script makes (tls-certs.sh):
#
#   Postgres 15   127.0.0.1:$TLS_PG_PORT (56600), ssl=on, wal_level=logical;
#                 the non-TLS server of the other tests is pg-start.sh's 55432
#   Redis         127.0.0.1:$TLS_REDIS_PORT (6600), TLS only (--port 0)
#   Redis Cluster 127.0.0.1:6610 6611 6612 ($TLS_CLUSTER_PORTS), TLS only,
#                 tls-cluster yes (the bus is TLS too: ports + 10000)
#
#   EVICTD_TLS_DIR   the test PKI                      default /tmp/evictd-tls
#
# Clients may present a certificate (DIR/client.crt): the servers check one
# when given (Redis tls-auth-clients optional, Postgres ssl_ca_file) but do
# not require it. Postgres users (pg_hba.conf, rewritten on every run):
#
#   postgres            trust, with or without TLS (as pg-start.sh)
#   evictd_pw           scram-sha-256, password "p+w%d@x/y z" (+ % @ / and a
#                       space: what a URL must percent-encode, and `+`,
#                       which only form-decoding turns into a space)
#   evictd_tls_only     trust over TLS, rejected without (hostnossl reject):
#                       what sslmode=allow retries with TLS
#   evictd              TLS and a client certificate only (hostssl ... cert:
#                       the certificate's CN is the user, DIR/client.crt)
#
# Idempotent, like the other start scripts. Last stdout line: the PKI
# directory (EVICTD_TEST_TLS_DIR of the tests). Stop: tls-stop.sh.
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" tls-start
here="$(dirname "${BASH_SOURCE[0]}")"
for p in "$TLS_PG_PORT" "$TLS_REDIS_PORT" "${TLS_CLUSTER_PORTS[@]}"; do
  is_number "$p" || die "ports must be numbers, got '$p'"
done
[ "${#TLS_CLUSTER_PORTS[@]}" -ge 3 ] || die "need at least 3 cluster ports (3 masters)"
need_redis

"$here/tls-certs.sh" "$TLS_DIR" >/dev/null

# --- Postgres -----------------------------------------------------------------
PG_TLS_DIR="$TLS_DIR" PGPORT="$TLS_PG_PORT" PGDATA="$TLS_PG_DATA" "$here/pg-start.sh" >/dev/null
hba="$(cat <<HBA
local     all         all                              trust
local     replication all                              trust
hostssl   all         evictd           127.0.0.1/32    cert
hostssl   replication evictd           127.0.0.1/32    cert
host      all         evictd           127.0.0.1/32    reject
host      replication evictd           127.0.0.1/32    reject
hostnossl all         evictd_tls_only  127.0.0.1/32    reject
hostnossl replication evictd_tls_only  127.0.0.1/32    reject
host      all         evictd_pw        127.0.0.1/32    scram-sha-256
host      replication evictd_pw        127.0.0.1/32    scram-sha-256
host      all         all              127.0.0.1/32    trust
host      replication all              127.0.0.1/32    trust
HBA
)"
pg_rundir="$(dirname "$TLS_PG_DATA")"
if [ "$hba" != "$(cat "$TLS_PG_DATA/pg_hba.conf")" ]; then
  printf '%s\n' "$hba" | (cd "$pg_rundir" && if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- tee "$TLS_PG_DATA/pg_hba.conf"; else tee "$TLS_PG_DATA/pg_hba.conf"; fi) >/dev/null
  psql -X -q -h 127.0.0.1 -p "$TLS_PG_PORT" -U postgres -d postgres -c 'select pg_reload_conf()' >/dev/null
fi
psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$TLS_PG_PORT" -U postgres -d postgres >/dev/null <<'SQL'
SET password_encryption = 'scram-sha-256';
SELECT 'CREATE ROLE evictd_pw' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'evictd_pw') \gexec
SELECT 'CREATE ROLE evictd_tls_only' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'evictd_tls_only') \gexec
ALTER ROLE evictd_pw WITH LOGIN SUPERUSER REPLICATION PASSWORD 'p+w%d@x/y z';
ALTER ROLE evictd_tls_only WITH LOGIN SUPERUSER REPLICATION;
SELECT 'CREATE ROLE evictd' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'evictd') \gexec
ALTER ROLE evictd WITH LOGIN SUPERUSER REPLICATION;
SQL
note "postgres with TLS on 127.0.0.1:$TLS_PG_PORT"

# --- Redis --------------------------------------------------------------------
tls_args=(--port 0 --tls-cert-file "$TLS_DIR/server.crt" --tls-key-file "$TLS_DIR/server.key"
  --tls-ca-cert-file "$TLS_DIR/ca.crt" --tls-auth-clients optional)
tls_ping() {
  [ "$(redis-cli --tls --cacert "$TLS_DIR/ca.crt" -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]
}
tls_ours() { # PORT DIR: ours and up, not up, or someone else's (dies)
  tls_ping "$1" || return 1
  our_pid "$2/redis.pid" "$1" "a Redis" >/dev/null
}
mkdir -p "$TLS_REDIS_DIR"
if ! tls_ours "$TLS_REDIS_PORT" "$TLS_REDIS_DIR"; then
  redis_launch 0 "$TLS_REDIS_DIR" "${tls_args[@]}" --tls-port "$TLS_REDIS_PORT"
  up_or_fail 100 "$TLS_REDIS_DIR/redis.log" "TLS Redis did not come up" tls_ping "$TLS_REDIS_PORT"
fi
note "redis with TLS on 127.0.0.1:$TLS_REDIS_PORT"

# --- Redis Cluster --------------------------------------------------------------
ccli() { redis-cli --tls --cacert "$TLS_DIR/ca.crt" "$@"; }
state() { ccli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"; }
cluster_ok() { [ "$(state "$1" cluster_state)" = ok ]; }
for p in "${TLS_CLUSTER_PORTS[@]}"; do
  mkdir -p "$TLS_CLUSTER_DIR/$p"
  tls_ours "$p" "$TLS_CLUSTER_DIR/$p" && continue
  redis_launch 0 "$TLS_CLUSTER_DIR/$p" "${tls_args[@]}" --tls-port "$p" --tls-cluster yes \
    --cluster-enabled yes --cluster-config-file "$TLS_CLUSTER_DIR/$p/nodes.conf" --cluster-node-timeout 5000
done
for p in "${TLS_CLUSTER_PORTS[@]}"; do
  up_or_fail 100 "$TLS_CLUSTER_DIR/$p/redis.log" "TLS cluster node $p did not come up" tls_ping "$p"
done
if ! cluster_ok "${TLS_CLUSTER_PORTS[0]}" && [ "$(state "${TLS_CLUSTER_PORTS[0]}" cluster_known_nodes)" = 1 ]; then
  seeds=(); for p in "${TLS_CLUSTER_PORTS[@]}"; do seeds+=("127.0.0.1:$p"); done
  note "creating TLS cluster ${seeds[*]}"
  ccli --cluster create "${seeds[@]}" --cluster-replicas 0 --cluster-yes >"$TLS_CLUSTER_DIR/create.log" 2>&1 \
    || { cat "$TLS_CLUSTER_DIR/create.log" >&2; exit 1; }
fi
for p in "${TLS_CLUSTER_PORTS[@]}"; do
  wait_until 200 0.05 cluster_ok "$p" \
    || die "TLS node $p: cluster_state is not ok after 10 s (try TLS_WIPE=1 tls-stop.sh)"
done
note "redis cluster with TLS on 127.0.0.1:${TLS_CLUSTER_PORTS[*]}"
echo "$TLS_DIR"
