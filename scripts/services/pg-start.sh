#!/usr/bin/env bash
# Start a disposable PostgreSQL 15 cluster for evictd's integration tests.
#
#   PGPORT                 TCP port, bound on 127.0.0.1 only           default 55432
#   PGDATA                 data directory                              default /tmp/evictd-pg-$PGPORT/data
#   PGDATABASE             database created for the tests              default evictd
#   PG_FAST                1 = fsync and full_page_writes off          default 1
#   PG_WAL_SENDER_TIMEOUT  wal_sender_timeout (e.g. 60s, 5s, 500ms)    default 60s
#   PGBIN                  PostgreSQL server binaries                  default /usr/lib/postgresql/15/bin
#   PG_TLS_DIR             ssl=on with DIR/pg-server.{crt,key}, CA DIR/ca.crt  default: no TLS
#                          (tls-certs.sh makes DIR; tls-start.sh uses this)
#
# Idempotent: a second run with the same PGPORT/PGDATA reuses the cluster,
# running or stopped. Progress goes to stderr; the last line of stdout is the
# connection URL, e.g. postgres://postgres@127.0.0.1:55432/evictd
#
# Notes:
# - synchronous_commit is deliberately left ON. Logical decoding (the SQL
#   peek/get functions as well as a walsender) only hands out WAL that has
#   been flushed; with synchronous_commit=off a committed change can stay
#   invisible to a replication client for up to 3 x wal_writer_delay, which
#   makes change-stream tests flaky. fsync=off is harmless for that purpose
#   (a write counts as flushed).
# - Postgres will not run as root. When run as root this script does every
#   server-side step as the `postgres` OS user (created by the Debian
#   package) via runuser, from inside the run directory so that an
#   unreadable current directory (e.g. /root) does not trip initdb/pg_ctl.
# - The Debian socket directory /var/run/postgresql may be absent or not
#   writable, so the socket lives next to the data directory and clients
#   connect over TCP.
# - Settings live in $PGDATA/evictd.conf, included from postgresql.conf and
#   rewritten on every run; if it changed, a running server is reloaded (or
#   restarted when a start-only setting such as port or wal_level changed).
#   A data directory without that file was not made by this script and is
#   refused rather than modified.
# - Port 55432 rather than 5432/5433: the machine may already run another
#   Postgres there (installing the Debian package may itself start one on
#   5432; this script neither uses nor stops it).
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" pg-start   # PGPORT PGDATA PGBIN RUNDIR, as_pg
PGDATABASE="${PGDATABASE:-evictd}"
PG_FAST="${PG_FAST:-1}"
PG_WAL_SENDER_TIMEOUT="${PG_WAL_SENDER_TIMEOUT:-60s}"
PGHOST=127.0.0.1
LOG="$RUNDIR/postgres.log"

is_number "$PGPORT" || die "PGPORT must be a number, got '$PGPORT'"
[[ "$PG_WAL_SENDER_TIMEOUT" =~ ^[0-9]+(us|ms|s|min|h|d)?$ ]] \
  || die "PG_WAL_SENDER_TIMEOUT must look like 60s, 5000ms or 0, got '$PG_WAL_SENDER_TIMEOUT'"

if [ ! -x "$PGBIN/postgres" ] || ! command -v psql >/dev/null; then
  apt_as_root "PostgreSQL 15 is missing; as root run: apt-get install postgresql-15 postgresql-client-15" \
    "installing postgresql-15 from Debian" postgresql-15 postgresql-client-15
fi

mkdir -p "$RUNDIR"
[ "$(id -u)" -ne 0 ] || chown postgres: "$RUNDIR"

conf() {
  cat <<CONF
# Written by evictd's scripts/services/pg-start.sh on every run; edits are lost.
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$RUNDIR'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
max_connections = 100
wal_sender_timeout = '$PG_WAL_SENDER_TIMEOUT'
log_min_messages = warning
log_connections = off
CONF
  if [ -n "${PG_TLS_DIR:-}" ]; then
    # The key is copied into the data directory: Postgres must own it (0600).
    cat <<CONF
ssl = on
ssl_cert_file = '$PG_TLS_DIR/pg-server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = '$PG_TLS_DIR/ca.crt'
CONF
  fi
  if [ "$PG_FAST" = 1 ]; then
    cat <<CONF
# Test-only shortcuts: a crash of this machine may corrupt the cluster.
fsync = off
full_page_writes = off
CONF
  fi
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  note "initdb $PGDATA"
  as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust \
      --encoding=UTF8 --locale=C.UTF-8 --no-instructions >"$RUNDIR/initdb.log" 2>&1 \
    || { cat "$RUNDIR/initdb.log" >&2; exit 1; }
  conf | as_pg tee "$PGDATA/evictd.conf" >/dev/null
  echo "include 'evictd.conf'" | as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null
  as_pg tee "$PGDATA/pg_hba.conf" >/dev/null <<HBA
local all         all                  trust
local replication all                  trust
host  all         all   127.0.0.1/32   trust
host  replication all   127.0.0.1/32   trust
HBA
  changed=0
elif [ ! -f "$PGDATA/evictd.conf" ]; then
  die "$PGDATA holds a cluster this script did not create; refusing to touch it (set PGDATA/PGPORT elsewhere)"
elif [ "$(conf)" != "$(cat "$PGDATA/evictd.conf")" ]; then
  note "settings changed, rewriting $PGDATA/evictd.conf"
  # These only take effect at server start; the others on a reload.
  restart_only='^(listen_addresses|port|unix_socket_directories|wal_level|max_replication_slots|max_wal_senders|max_connections) '
  if [ "$(conf | grep -E "$restart_only")" != "$(grep -E "$restart_only" "$PGDATA/evictd.conf")" ]; then
    changed=restart
  else
    changed=reload
  fi
  conf | as_pg tee "$PGDATA/evictd.conf" >/dev/null
else
  changed=0
fi

if [ -n "${PG_TLS_DIR:-}" ]; then
  # shellcheck disable=SC2016 # $1 is expanded by the inner sh
  as_pg sh -c 'umask 077 && cat >"$1"' sh "$PGDATA/server.key" <"$PG_TLS_DIR/pg-server.key"
fi

PSQL=(psql -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres)

if as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
  case "$changed" in
    reload)
      note "already running ($PGDATA), reloading its settings"
      as_pg "$PGBIN/pg_ctl" -D "$PGDATA" reload >/dev/null ;;
    restart)
      note "already running ($PGDATA), restarting it for the new settings (log $LOG)"
      as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$LOG" -m fast -w -t 60 restart >&2 \
        || { tail -n 30 "$LOG" >&2; exit 1; } ;;
    *)
      note "already running ($PGDATA)" ;;
  esac
else
  note "starting on $PGHOST:$PGPORT (log $LOG)"
  as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$LOG" -w -t 60 start >&2 \
    || { tail -n 30 "$LOG" >&2; exit 1; }
fi

if ! "${PSQL[@]}" -d postgres -tAc "select 1 from pg_database where datname = '$PGDATABASE'" | grep -q 1; then
  "${PSQL[@]}" -d postgres -c "CREATE DATABASE \"$PGDATABASE\"" >&2
fi

echo "postgres://postgres@$PGHOST:$PGPORT/$PGDATABASE"
