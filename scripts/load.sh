#!/usr/bin/env bash
# Load figures for evictd: Postgres → evictd → Redis on this machine.
#
#   scripts/load.sh [RATE...]        default rates: 1000 5000 0 (0 = unthrottled)
#
# Builds evictd and evictd-load in release mode, starts Postgres and Redis
# (scripts/services/), loads the e-commerce schema into a fresh database,
# starts `evictd run` with the e-commerce graph, then for each rate drives
# single-row UPDATEs of shop.products for LOAD_SECONDS (default 10) with
# evictd-load and prints commit → key-gone latency (p50/p99), the sustained
# rates, and evictd's CPU time and peak RSS over the run. Everything on
# 127.0.0.1; the servers this script started are stopped at exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG_PREFIX=load
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"
RATES=("$@"); [ "${#RATES[@]}" -gt 0 ] || RATES=(1000 5000 0)
[ "${RATES[0]}" = none ] && RATES=()
SECONDS_PER_RATE="${LOAD_SECONDS:-10}"
PGPORT="${PGPORT:-55432}"; REDIS_PORT="${REDIS_PORT:-6479}"
DB=evictd_load; SLOT=evictd_load
WORK="$(mktemp -d -t evictd-load.XXXXXX)"
STOP=(); EVICTD_PID=""
# shellcheck source=scripts/lib/demo-stack.sh
. "$ROOT/scripts/lib/demo-stack.sh"
trap stop_stack EXIT

# shellcheck source=scripts/lib/prerequisites.sh
. "$ROOT/scripts/lib/prerequisites.sh"
mapfile -t extra < <(server_extras pg redis)
ensure_packages "${extra[@]}"
note "building (release)"
cargo build --release --locked --quiet --bin evictd --bin evictd-load
start_stack
fresh_database "$DB" "$SLOT"
write_config "$WORK/evictd.toml" "$SLOT" 127.0.0.1:0 warn
target/release/evictd run --config "$WORK/evictd.toml" 2>"$WORK/evictd.log" &
EVICTD_PID=$!
for _ in $(seq 1 100); do
  [ "$(psql -X -At "$url" -c "SELECT active FROM pg_replication_slots WHERE slot_name = '$SLOT'")" = t ] && break
  kill -0 "$EVICTD_PID" 2>/dev/null || { cat "$WORK/evictd.log" >&2; die "evictd exited"; }
  sleep 0.1
done
cpu() { awk '{print $14 + $15}' "/proc/$EVICTD_PID/stat"; }   # utime + stime, clock ticks
hz="$(getconf CLK_TCK)"
printf '| target rate (changes/s) | committed/s | invalidated/s | p50 ms | p99 ms | max ms | not invalidated | evictd CPU s | evictd peak RSS MiB |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for rate in "${RATES[@]+"${RATES[@]}"}"; do
  before="$(cpu)"
  out="$(target/release/evictd-load --pg "$url" --redis "$redis_url" --rate "$rate" --seconds "$SECONDS_PER_RATE")"
  after="$(cpu)"
  rss="$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$EVICTD_PID/status")"
  python3 - "$out" "$rate" "$(( after - before ))" "$hz" "$rss" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); rate = int(sys.argv[2]); ticks = int(sys.argv[3]); hz = int(sys.argv[4])
label = "unthrottled" if rate == 0 else str(rate)
print(f"| {label} | {r['commit_rate']:.0f} | {r['invalidation_rate']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['not_invalidated']} | {ticks / hz:.2f} | {sys.argv[5]} |")
PY
done

# One large transaction: evictd's memory must not grow with it (its effects
# collapse into namespace bumps past run.max_transaction_effects).
LARGE_ROWS="${LARGE_ROWS:-200000}"
if [ "$LARGE_ROWS" -gt 0 ]; then
  rss_before="$(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$EVICTD_PID/status")"
  start=$(date +%s.%N)
  psql -X -q "$url" -c "BEGIN; INSERT INTO shop.products (id, slug, brand_id, category_id, name, description, status, updated_at)
    SELECT g, 'bulk-' || g, 1, 1 + g % 4, 'bulk ' || g, '', 'active', now() FROM generate_series(5000000, 5000000 + $LARGE_ROWS - 1) g;
    UPDATE shop.products SET name = name || '!' WHERE id >= 5000000; COMMIT;"
  target="$(psql -X -At "$url" -c 'SELECT pg_current_wal_lsn()')"
  until [ "$(psql -X -At "$url" -c "SELECT confirmed_flush_lsn >= '$target' FROM pg_replication_slots WHERE slot_name = '$SLOT'")" = t ]; do
    kill -0 "$EVICTD_PID" 2>/dev/null || die "evictd exited"
    sleep 0.1
  done
  end=$(date +%s.%N)
  rss="$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$EVICTD_PID/status")"
  printf '\none transaction of %s inserts + %s updates: evictd caught up %.1f s after the first statement; RSS before %s MiB, peak %s MiB\n' \
    "$LARGE_ROWS" "$LARGE_ROWS" "$(python3 -c "print($end - $start)")" "$rss_before" "$rss"
fi
