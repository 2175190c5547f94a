# shellcheck shell=bash
# What the service scripts share, sourced first thing with the script's name:
#
#   # shellcheck source=scripts/services/lib.sh
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh" pg-start
#
# It sets LOG_PREFIX to that name (no "error: " in die's messages: these
# scripts print only their own lines), sources scripts/lib/common.sh (note,
# die, port_open, live_pid, wait_gone, wait_until, terminate_pid) and sets the
# defaults of the service the name starts with. A start script and its stop
# script therefore cannot disagree on a port, a directory or a pid file:
#
#   pg             PGPORT PGDATA PGBIN, RUNDIR (PGDATA's parent: socket, logs)
#   redis          REDIS_PORT REDIS_DIR
#   redis-cluster  PORTS (array, from REDIS_CLUSTER_PORTS), DIR (one sub-directory per node)
#   kafka          KAFKA_PORT KAFKA_DIR, pidfile
#   debezium       PGHOST PGPORT PGDATABASE PGUSER KAFKA_BOOTSTRAP DBZ_STATE_DIR
#                  (exported: the runner reads them), DBZ_SLOT DBZ_VENV, pidfile
#   tls            TLS_DIR (the test PKI, tls-certs.sh), TLS_PG_PORT TLS_PG_DATA,
#                  TLS_REDIS_PORT TLS_REDIS_DIR, TLS_CLUSTER_PORTS (array) TLS_CLUSTER_DIR
#   all            EVICTD_TOOLS (downloaded broker binary, Debezium venv)
#
# Only defaults live here: validating a value (a port that is not a number)
# is the start script's job, so a stop script still runs with whatever it is
# given, as it always did.
#
# Helpers (all about servers this machine runs on 127.0.0.1):
#   is_number VALUE          VALUE is a non-empty string of digits
#   apt_as_root MISSING_MSG INSTALL_NOTE PACKAGE...   the server is missing:
#                            dies with MISSING_MSG unless root, else notes
#                            INSTALL_NOTE and installs the packages with
#                            apt-get (its output on stderr). Run alone, a
#                            service script installs its own server; the
#                            top-level scripts install it beforehand through
#                            scripts/lib/prerequisites.sh.
#   need_redis               redis-server and redis-cli, installed if missing
#   as_pg CMD...             CMD in RUNDIR, as the postgres OS user when root
#                            (Postgres refuses to run as root)
#   our_pid PIDFILE PORT WHAT  prints the live PID in PIDFILE; dies "port PORT
#                            is served by WHAT this script did not start" if none
#   up_or_fail TRIES LOG FAIL_NOTE CMD...   waits (TRIES x 0.05 s) for CMD to
#                            succeed; if it never does: FAIL_NOTE, the last 20
#                            lines of LOG, exit 1
#   redis_ping PORT          a Redis on PORT answers PONG
#   redis_ours PORT DIR      true if a Redis started with DIR answers on PORT,
#                            false if nothing answers; dies if another one does
#   redis_launch PORT DIR [ARG...]   a daemonized redis-server, non-persistent unless ARGs say otherwise
#                            with its pid file, log and working directory in DIR
#   stop_pidfile PIDFILE NOT_RUNNING_NOTE   SIGTERM the live PID in PIDFILE,
#                            or note NOT_RUNNING_NOTE; then await_stopped
#   await_stopped            waits for every PID stop_pidfile signalled (all at
#                            once: a process on these VMs can take 1-2 s to go
#                            after SIGTERM), SIGKILL after 10 s, then removes
#                            their pid files
#   wipe_if VAR DIR          deletes DIR if the variable named VAR is 1

# shellcheck disable=SC2034  # LOG_PREFIX, LOG_ERROR: read by common.sh
LOG_PREFIX="$1" LOG_ERROR=""
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

is_number() { case "$1" in '' | *[!0-9]*) return 1 ;; esac; }

apt_as_root() {
  local missing="$1" install="$2"
  shift 2
  [ "$(id -u)" -eq 0 ] || die "$missing"
  note "$install"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

need_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  apt_as_root "Redis is missing; as root run: apt-get install redis-server redis-tools" \
    "installing redis-server from Debian" redis-server redis-tools
}

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd "$RUNDIR" && runuser -u postgres -- "$@")
  else
    (cd "$RUNDIR" && "$@")
  fi
}

our_pid() { live_pid "$1" || die "port $2 is served by $3 this script did not start"; }

up_or_fail() {
  local tries="$1" log="$2" fail="$3"
  shift 3
  wait_until "$tries" 0.05 "$@" && return 0
  note "$fail"
  tail -n 20 "$log" >&2
  exit 1
}

redis_ping() { [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]; }

redis_ours() {
  redis_ping "$1" || return 1
  our_pid "$2/redis.pid" "$1" "a Redis" >/dev/null
}

redis_launch() {
  local port="$1" dir="$2"
  shift 2
  # The caller's arguments come last: they override these defaults (a
  # later directive wins), e.g. --appendonly yes.
  redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    --dir "$dir" --save '' --appendonly no "$@"
}

STOPPING_PIDS=() STOPPING_PIDFILES=()
stop_pidfile() {
  local pid
  if pid="$(live_pid "$1")"; then
    kill -TERM "$pid"
    STOPPING_PIDS+=("$pid") STOPPING_PIDFILES+=("$1")
  else
    note "$2"
  fi
}

await_stopped() {
  local pid
  for pid in ${STOPPING_PIDS[@]+"${STOPPING_PIDS[@]}"}; do
    wait_gone "$pid" 200 0.05 && continue
    note "$pid still alive after 10 s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Redis removes its own on a clean exit; the broker does not.
  rm -f -- ${STOPPING_PIDFILES[@]+"${STOPPING_PIDFILES[@]}"}
}

wipe_if() { [ "${!1:-0}" = 1 ] || return 0; rm -rf -- "$2"; }

# --- the defaults, one place per service ------------------------------------
EVICTD_TOOLS="${EVICTD_TOOLS:-/tmp/evictd-tools}"
PG_DEFAULT_PORT=55432 # pg-start's, and the one debezium-run reads from
case "$LOG_PREFIX" in
  pg-*)
    PGPORT="${PGPORT:-$PG_DEFAULT_PORT}"
    PGDATA="${PGDATA:-/tmp/evictd-pg-$PGPORT/data}"
    PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
    RUNDIR="$(dirname "$PGDATA")" # socket, logs and initdb output, next to the data
    ;;
  redis-cluster-*)
    read -r -a PORTS <<<"${REDIS_CLUSTER_PORTS:-7101 7102 7103}"
    [ "${#PORTS[@]}" -gt 0 ] || die "need at least 3 ports (3 masters)"
    DIR="${REDIS_CLUSTER_DIR:-/tmp/evictd-redis-cluster-${PORTS[0]}}"
    ;;
  redis-*)
    REDIS_PORT="${REDIS_PORT:-6479}"
    REDIS_DIR="${REDIS_DIR:-/tmp/evictd-redis-$REDIS_PORT}"
    ;;
  kafka-*)
    KAFKA_PORT="${KAFKA_PORT:-19092}"
    KAFKA_DIR="${KAFKA_DIR:-/tmp/evictd-kafka-$KAFKA_PORT}"
    pidfile="$KAFKA_DIR/broker.pid"
    ;;
  debezium-*)
    export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-$PG_DEFAULT_PORT}" PGDATABASE="${PGDATABASE:-evictd}" PGUSER="${PGUSER:-postgres}"
    # Empty = no broker (DBZ_CAPTURE only), hence "-" and not ":-".
    export KAFKA_BOOTSTRAP="${KAFKA_BOOTSTRAP-127.0.0.1:19092}"
    export DBZ_STATE_DIR="${DBZ_STATE_DIR:-/tmp/evictd-debezium}"
    DBZ_SLOT="${DBZ_SLOT:-debezium_evictd}"
    DBZ_VENV="${DBZ_VENV:-$EVICTD_TOOLS/debezium-venv}"
    pidfile="$DBZ_STATE_DIR/runner.pid"
    ;;
  tls-*)
    TLS_DIR="${EVICTD_TLS_DIR:-/tmp/evictd-tls}"
    TLS_PG_PORT="${TLS_PG_PORT:-56600}"
    TLS_PG_DATA="${TLS_PG_DATA:-/tmp/evictd-pg-tls-$TLS_PG_PORT/data}"
    TLS_REDIS_PORT="${TLS_REDIS_PORT:-6600}"
    TLS_REDIS_DIR="${TLS_REDIS_DIR:-/tmp/evictd-redis-tls-$TLS_REDIS_PORT}"
    read -r -a TLS_CLUSTER_PORTS <<<"${TLS_CLUSTER_PORTS:-6610 6611 6612}"
    TLS_CLUSTER_DIR="${TLS_CLUSTER_DIR:-/tmp/evictd-redis-tls-cluster-${TLS_CLUSTER_PORTS[0]}}"
    ;;
  *) die "lib.sh: unknown service script '$LOG_PREFIX'" ;;
esac
