#!/usr/bin/env bash
# Subscriber figures (docs/performance.md, "Subscribers"): commit → local
# entry dropped, per client, with 1 and with 50 subscriber processes of one
# language at a time, and each subscriber's CPU time and peak RSS.
#
#   scripts/subscribers-bench.sh [LANGUAGE...]    default: python typescript rust
#
# Postgres → `evictd run` (the e-commerce graph, broadcast on) → Redis →
# N agents (the end-to-end agents of tests/it/clients.rs: each holds its
# client's local cache kept by its subscriber) while evictd-load commits
# single-row UPDATEs at SUB_RATE (default 1000/s) for SUB_SECONDS (default
# 5). Each agent reports its client's own commit → local drop histogram,
# measured from the batch messages' committed_at_ms (one observation per
# batch message, from its last commit); CPU time (utime + stime, from just
# before the load to its end, drain included: the percentage divides it by
# the load's SUB_SECONDS) and VmHWM come from /proc. Everything on 127.0.0.1; Postgres and Redis as in
# scripts/load.sh (PGPORT, REDIS_PORT: used if up, else started and stopped).
#
#   SUB_COUNTS      "1 50"     subscriber processes per point
#   SUB_TRANSPORT   stream     the agents' transport (evictd publishes both)
#   SUB_RATE, SUB_SECONDS      the load
#   BENCH_LOCK      a lock file held (flock) around the builds and each
#                   timed point, as in scripts/bench.sh ("" for none)
#   SUB_BUILD=0     use target/release/{evictd,evictd-load,e2e_agent} as built
#   SUB_EVICTD, SUB_LOAD, SUB_RUST_AGENT   other binaries (with SUB_BUILD=0)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG_PREFIX=subscribers-bench
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"
LANGS=("$@"); [ "${#LANGS[@]}" -gt 0 ] || LANGS=(python typescript rust)
read -r -a COUNTS <<<"${SUB_COUNTS:-1 50}"
TRANSPORT="${SUB_TRANSPORT:-stream}"
RATE="${SUB_RATE:-1000}"; LOAD_SECONDS="${SUB_SECONDS:-5}"
LOCK="${BENCH_LOCK-/tmp/evictd-cargo.lock}"
PGPORT="${PGPORT:-55432}"; REDIS_PORT="${REDIS_PORT:-6479}"
DB=evictd_subbench; SLOT=evictd_subbench; HEARTBEAT_MS=1000
WORK="$(mktemp -d -t evictd-subbench.XXXXXX)"
STOP=(); EVICTD_PID=""
lock() { [ -z "$LOCK" ] || { exec 9>>"$LOCK"; flock 9; }; }
unlock() { [ -z "$LOCK" ] || { flock -u 9; exec 9>&-; }; }
# shellcheck source=scripts/lib/demo-stack.sh
. "$ROOT/scripts/lib/demo-stack.sh"
trap stop_stack EXIT

# shellcheck source=scripts/lib/prerequisites.sh
. "$ROOT/scripts/lib/prerequisites.sh"
mapfile -t extra < <(server_extras pg redis)
ensure_packages "${extra[@]}"

BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
if [ "${SUB_BUILD:-1}" = 1 ]; then
  note "building (release): evictd, evictd-load, the Rust agent"
  lock
  cargo build --release --locked --quiet --bin evictd --bin evictd-load 9>&-
  cargo build --release --locked --quiet -p evictd-rust-example --bin e2e_agent 9>&-
  unlock
fi
EVICTD="${SUB_EVICTD:-$BIN/evictd}"; LOAD="${SUB_LOAD:-$BIN/evictd-load}"; RUST_AGENT="${SUB_RUST_AGENT:-$BIN/e2e_agent}"
for b in "$EVICTD" "$LOAD" "$RUST_AGENT"; do [ -x "$b" ] || die "$b is not built"; done
# The interpreters and packages of the other agents (idempotent).
PY="$(bash clients/python/setup.sh | sed -n 's/^EVICTD_TEST_PYTHON=//p' | tail -n 1)"
NODE="$(bash clients/typescript/setup.sh | sed -n 's/^EVICTD_TEST_NODE=//p' | tail -n 1)"

agent_json() {
  case "$1" in
    python) printf '["%s", "%s"]' "$PY" "$ROOT/clients/python/tests/e2e_agent.py" ;;
    typescript) printf '["%s", "--import", "tsx", "test/e2e_agent.ts"]' "$NODE" ;;
    rust) printf '["%s"]' "$RUST_AGENT" ;;
    *) die "unknown language $1 (python typescript rust)" ;;
  esac
}

start_stack
fresh_database "$DB" "$SLOT"
write_config "$WORK/evictd.toml" "$SLOT" 127.0.0.1:0 warn
# The broadcast, on both transports (the default), under [redis.primary].
sed -i "/^\[redis.primary\]/a broadcast_channel = \"evictd:subbench\"\nbroadcast_heartbeat_ms = $HEARTBEAT_MS" "$WORK/evictd.toml"
"$EVICTD" run --config "$WORK/evictd.toml" 2>"$WORK/evictd.log" &
EVICTD_PID=$!
for _ in $(seq 1 100); do
  [ "$(psql -X -At "$url" -c "SELECT active FROM pg_replication_slots WHERE slot_name = '$SLOT'")" = t ] && break
  kill -0 "$EVICTD_PID" 2>/dev/null || { cat "$WORK/evictd.log" >&2; die "evictd exited"; }
  sleep 0.1
done

printf '| client | subscribers | committed/s | commit → Redis key gone p50 / p99 ms | commit → local drop p50 / p99 ms | batch messages per subscriber | gaps / flushes | CPU s per subscriber (%% of a core during the load) | peak RSS per subscriber MiB |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for lang in "${LANGS[@]}"; do
  for n in "${COUNTS[@]}"; do
    lock
    out="$(python3 scripts/lib/subscribers-bench.py --language "$lang" --n "$n" --agent-json "$(agent_json "$lang")" \
      --cwd "$ROOT/clients/typescript" --redis "$redis_url" --channel evictd:subbench --transport "$TRANSPORT" \
      --heartbeat-ms "$HEARTBEAT_MS" -- "$LOAD" --pg "$url" --redis "$redis_url" --rate "$RATE" \
      --seconds "$LOAD_SECONDS" --drain-seconds 3 9>&-)"
    unlock
    python3 - "$out" "$LOAD_SECONDS" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); busy = float(sys.argv[2])
f = lambda v: "–" if v is None else f"{v:.1f}"
print(f"| {r['language']} ({r['transport']}) | {r['subscribers']} | {r['commit_rate']:.0f} | {r['redis_p50_ms']:.1f} / {r['redis_p99_ms']:.1f} "
      f"| {f(r['local_p50_ms'])} / {f(r['local_p99_ms'])} | {r['batches_per_agent']:.0f} | {r['gaps']} / {r['flushes']} "
      f"| {r['cpu_s_per_agent']:.2f} s ({100 * r['cpu_s_per_agent'] / busy:.1f} %) | {r['peak_rss_mib_max']:.1f} |")
PY
  done
done
