#!/usr/bin/env bash
# evictd quickstart: from a fresh Debian machine to seeing what a row change
# invalidates, with real look-ups against a real Postgres.
#
#   scripts/quickstart.sh
#
# 1. installs what the build needs (apt-get, once) and builds evictd;
# 2. starts Postgres 15 on 127.0.0.1:55432 (scripts/services/pg-start.sh) and
#    loads the example schemas and rows (examples/schema/*.sql) into a fresh
#    database `evictd_quickstart`;
# 3. validates the example graphs (`evictd check`) and explains a few changes,
#    running their look-ups against that database (`evictd explain`).
#
# Until `evictd run` (the replication daemon) lands, this is the daemon's
# resolution step on its own: what would be invalidated, and why.
# Everything binds to 127.0.0.1. At exit (or Ctrl-C) the Postgres this script
# started is stopped; EVICTD_KEEP_SERVICES=1 leaves it running.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
note() { echo "quickstart: $*" >&2; }
die() { echo "quickstart: error: $*" >&2; exit 1; }
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

PGPORT="${PGPORT:-55432}"
DB=evictd_quickstart
STOP_PG=0
cleanup() {
  if [ "$STOP_PG" = 1 ] && [ "${EVICTD_KEEP_SERVICES:-0}" != 1 ]; then
    note "stopping the Postgres this script started"
    bash scripts/services/pg-stop.sh >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "installing prerequisites and building evictd"
# shellcheck source=scripts/lib/prerequisites.sh
. "$ROOT/scripts/lib/prerequisites.sh"
ensure_packages
cargo build --locked --quiet
EVICTD="$ROOT/target/debug/evictd"

step "starting Postgres 15 (wal_level=logical) on 127.0.0.1:$PGPORT"
(exec 3<>"/dev/tcp/127.0.0.1/$PGPORT") 2>/dev/null || STOP_PG=1
admin_url="$(PGPORT="$PGPORT" bash scripts/services/pg-start.sh | tail -n 1)"
psql_admin=(psql -X -q -v ON_ERROR_STOP=1 "$admin_url")
"${psql_admin[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
url="${admin_url%/*}/$DB"
for schema in examples/schema/ecommerce.sql examples/schema/social.sql; do
  psql -X -q -v ON_ERROR_STOP=1 "$url" -f "$schema" >/dev/null
  note "loaded $schema"
done

step "evictd check dependency-graphs/"
"$EVICTD" check dependency-graphs/

explain() {
  printf '\n$ evictd explain %s\n' "$*"
  "$EVICTD" explain --graph dependency-graphs --lookup-url "$url" "$@"
}

step "a product is renamed and moves to another category"
explain --table shop.products --op update \
  --before '{"id":1,"slug":"trail-runner-2","brand_id":10,"category_id":3,"name":"Trail Runner 2","description":"Grippy.","status":"active","updated_at":"2026-11-20 10:00:00+00"}' \
  --after '{"id":1,"slug":"trail-runner-2","brand_id":10,"category_id":4,"name":"Trail Runner 2 GTX","description":"Grippy.","status":"active","updated_at":"2026-11-23 10:00:00+00"}'

step "stock of one SKU changes: look-ups find its product page and category"
sku="$(psql -X -At "$url" -c 'SELECT sku_id FROM shop.inventory ORDER BY 1 LIMIT 1')"
explain --table shop.inventory --op update \
  --before "{\"sku_id\":$sku,\"warehouse_id\":1,\"on_hand\":5,\"reserved\":0}" \
  --after "{\"sku_id\":$sku,\"warehouse_id\":1,\"on_hand\":4,\"reserved\":1}"

step "an author changes their display name: every article embedding it goes stale"
explain --table content.users --op update \
  --before '{"id":1,"handle":"ann","display_name":"Ann Example","avatar_url":null,"bio":"","email":"ann@example.com"}' \
  --after '{"id":1,"handle":"ann","display_name":"Ann E.","avatar_url":null,"bio":"","email":"ann@example.com"}'

step "done"
cat <<TXT
The example graphs are in dependency-graphs/ (format: dependency-graphs/README.md).
Try your own change (start with EVICTD_KEEP_SERVICES=1 to keep Postgres up for it):
  $EVICTD explain --graph dependency-graphs --lookup-url $url \\
      --table content.comments --op insert --after '{"id":7,"article_id":10,"author_id":2,"body":"hi","created_at":"2026-11-23"}'
Print the graph:   $EVICTD graph --format dot | dot -Tsvg > graph.svg
TXT
