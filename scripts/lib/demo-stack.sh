# shellcheck shell=bash
# Sourced by scripts/quickstart.sh and scripts/load.sh: Postgres and Redis
# on 127.0.0.1, a fresh database with the e-commerce example, and an evictd
# config for it.
#
#   start_stack                   sets admin_url, redis_url; appends to STOP
#                                 the stop scripts of servers it started
#   fresh_database DB SLOT        drops SLOT, recreates DB with the e-commerce
#                                 schema and rows; sets url
#   write_config FILE SLOT LISTEN LOG_LEVEL
#                                 an evictd.toml for `url`, `redis_url` and
#                                 dependency-graphs/ecommerce.toml
#   drop_slot SLOT                and its source record in Redis (also what
#                                 cleanups call)
#
# Needs ROOT, PGPORT, REDIS_PORT, STOP=() and LOG_PREFIX from the caller.

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # note, die, port_open, ...

start_stack() {
  port_open "$PGPORT" || STOP+=(pg-stop.sh)
  admin_url="$(PGPORT="$PGPORT" bash "$ROOT/scripts/services/pg-start.sh" | tail -n 1)"
  port_open "$REDIS_PORT" || STOP+=(redis-stop.sh)
  redis_url="$(REDIS_PORT="$REDIS_PORT" bash "$ROOT/scripts/services/redis-start.sh" | tail -n 1)"
}

# At exit (`trap stop_stack EXIT`): stops evictd ($EVICTD_PID), drops the
# slot ($SLOT) once Postgres is known ($admin_url), stops the servers
# start_stack started ($STOP) and removes the work directory ($WORK).
stop_stack() {
  set +e
  [ -n "${EVICTD_PID:-}" ] && kill -TERM "$EVICTD_PID" 2>/dev/null && wait "$EVICTD_PID" 2>/dev/null
  [ -n "${admin_url:-}" ] && drop_slot "${SLOT:-}" 2>/dev/null
  for s in "${STOP[@]+"${STOP[@]}"}"; do bash "$ROOT/scripts/services/$s" >/dev/null 2>&1; done
  rm -rf "${WORK:?}"
}

# The demo's slot goes with its database: its source record in Redis too,
# or the next start would (rightly) refuse a lost slot it streamed from.
drop_slot() {
  psql -X -q "$admin_url" \
    -c "SELECT pg_drop_replication_slot('$1') FROM pg_replication_slots WHERE slot_name = '$1'" >/dev/null
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" DEL "evictd:source:$1" >/dev/null
}

fresh_database() {
  local db="$1" slot="$2"
  drop_slot "$slot"
  psql -X -q -v ON_ERROR_STOP=1 "$admin_url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  url="${admin_url%/*}/$db"
  psql -X -q -v ON_ERROR_STOP=1 "$url" -f "$ROOT/examples/schema/ecommerce.sql" >/dev/null 2>&1
  note "loaded examples/schema/ecommerce.sql into $url"
}

write_config() {
  local file="$1" slot="$2" listen="$3" level="$4"
  cat >"$file" <<TOML
[graph]
paths = ["$ROOT/dependency-graphs/ecommerce.toml"]
[source]
kind = "postgres"
[source.postgres]
url = "$url"
slot = "$slot"
publication = "$slot"
create_slot = true
create_publication = true
[redis.primary]
url = "$redis_url"
[server]
listen = "$listen"
[log]
level = "$level"
TOML
}
