#!/usr/bin/env bash
# evictd quickstart: Postgres → evictd → Redis on this machine, in one command.
#
#   scripts/quickstart.sh
#
# 1. installs what the build and the services need (apt-get, once) and builds evictd;
# 2. starts Postgres 15 (wal_level=logical) on 127.0.0.1:55432 and Redis on
#    127.0.0.1:6479 (scripts/services/), and loads the e-commerce demo schema
#    and rows (examples/schema/ecommerce.sql) into a fresh database;
# 3. starts `evictd run` with the e-commerce graph (dependency-graphs/ecommerce.toml),
#    its metrics on http://127.0.0.1:9187/metrics;
# 4. caches a few keys in Redis, writes to Postgres, and shows which keys
#    evictd invalidated and why.
#
# Then it keeps evictd running for you to try more (the commands are printed)
# until Ctrl-C, which stops evictd, drops the demo slot and stops the servers
# this script started. Without a terminal (or with QUICKSTART_EXIT=1) it
# cleans up right after the demo. Everything binds to 127.0.0.1 only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG_PREFIX=quickstart
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

PGPORT="${PGPORT:-55432}"
REDIS_PORT="${REDIS_PORT:-6479}"
METRICS="127.0.0.1:${EVICTD_METRICS_PORT:-9187}"
DB=evictd_quickstart
SLOT=evictd_quickstart
WORK="$(mktemp -d -t evictd-quickstart.XXXXXX)"
STOP=()
EVICTD_PID=""

cleanup() {
  trap - EXIT INT TERM
  set +e
  if [ -n "$EVICTD_PID" ] && kill -0 "$EVICTD_PID" 2>/dev/null; then
    note "stopping evictd"
    kill -TERM "$EVICTD_PID"; wait "$EVICTD_PID" 2>/dev/null
  fi
  [ -n "${admin_url:-}" ] && drop_slot "$SLOT" 2>/dev/null
  for s in "${STOP[@]+"${STOP[@]}"}"; do
    note "stopping ($s)"
    bash "scripts/services/$s" >/dev/null 2>&1
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=scripts/lib/demo-stack.sh
. "$ROOT/scripts/lib/demo-stack.sh"

step "installing prerequisites and building evictd"
# shellcheck source=scripts/lib/prerequisites.sh
. "$ROOT/scripts/lib/prerequisites.sh"
mapfile -t extra < <(server_extras pg redis)
ensure_packages "${extra[@]}" curl:curl
cargo build --locked --quiet
EVICTD="$ROOT/target/debug/evictd"

step "starting Postgres 15 (wal_level=logical) and Redis on 127.0.0.1"
start_stack
fresh_database "$DB" "$SLOT"

step "starting evictd run (graph: dependency-graphs/ecommerce.toml)"
write_config "$WORK/evictd.toml" "$SLOT" "$METRICS" info
"$EVICTD" run --config "$WORK/evictd.toml" 2>"$WORK/evictd.log" &
EVICTD_PID=$!
for _ in $(seq 1 150); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$METRICS/readyz")" = 200 ] && break
  kill -0 "$EVICTD_PID" 2>/dev/null || { cat "$WORK/evictd.log" >&2; die "evictd exited"; }
  sleep 0.1
done
note "evictd is ready (log: $WORK/evictd.log)"

rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
show() {  # show KEY...: which of the keys are still cached
  for key in "$@"; do
    if [ "$(rcli EXISTS "$key")" = 1 ]; then printf '    %-28s still cached\n' "$key"
    else printf '    %-28s invalidated\n' "$key"; fi
  done
}
demo() {  # demo "title" "SQL" KEY...: cache the keys, run the SQL, show what went
  local title="$1" sql="$2"; shift 2
  printf '\n  %s\n    $ psql -c "%s"\n' "$title" "$sql"
  for key in "$@"; do rcli SET "$key" cached >/dev/null; done
  psql -X -q "$url" -c "$sql"
  for _ in $(seq 1 50); do [ "$(rcli EXISTS "$@")" = 0 ] && break; sleep 0.05; done
  show "$@"
}

step "writes to Postgres, invalidations in Redis"
demo "a product is renamed: its detail, and the page that embeds it" \
  "UPDATE shop.products SET name = name || ' (new)' WHERE id = 1" \
  'product:{1}:detail' 'product:{1}:page'
demo "a product moves from category 3 to 4: both listings" \
  "UPDATE shop.products SET category_id = 4 WHERE id = 2" \
  'category:3:listing' 'category:4:listing'
demo "stock changes: the SKU's stock and, through a look-up, its product page" \
  "UPDATE shop.inventory SET on_hand = on_hand - 1 WHERE sku_id = 101" \
  'sku:{101}:stock' 'product:{1}:page'
printf '\n  an update that touches no watched column invalidates nothing:\n'
rcli SET 'product:{3}:detail' cached >/dev/null
psql -X -q "$url" -c "UPDATE shop.products SET updated_at = now() WHERE id = 3"
psql -X -q "$url" -c "UPDATE shop.products SET name = name WHERE id = 1"
sleep 0.5
show 'product:{3}:detail'

step "metrics"
curl -s "http://$METRICS/metrics" | grep -E '^evictd_(changes_received_total|effects_resolved_total|position_acknowledged_bytes|source_lag_bytes)' | head -12
echo "  (all of them: curl http://$METRICS/metrics; probes: /healthz, /readyz)"

if [ "${QUICKSTART_EXIT:-0}" = 1 ] || [ ! -t 0 ]; then
  step "done"
  exit 0
fi
step "evictd is running: try your own writes, Ctrl-C to stop and clean up"
cat <<TXT
  psql $url -c "UPDATE shop.products SET status = 'archived' WHERE id = 3"
  redis-cli -p $REDIS_PORT SET 'product:{3}:detail' cached     # before the write
  redis-cli -p $REDIS_PORT EXISTS 'product:{3}:detail'         # after it: 0
  $EVICTD explain --graph dependency-graphs/ecommerce.toml --table shop.products --op update --before '{"id":3,"status":"active"}' --after '{"id":3,"status":"archived"}'
  tail -f $WORK/evictd.log
TXT
wait "$EVICTD_PID"
