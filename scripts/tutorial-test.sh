#!/usr/bin/env bash
# Runs docs/tutorial.md, so that the tutorial cannot rot.
#
#   scripts/tutorial-test.sh
#
# Extracts, in order, every fenced block of docs/tutorial.md opened with
# "```sh tutorial" (the reader's commands) or "```sh tutorial-check" (the
# assertions, kept in HTML comments so that readers do not see them) and runs
# them as one bash script with `set -euo pipefail`, in a fresh directory,
# against the test services:
#
#   EVICTD_TEST_PG_URL     Postgres with wal_level=logical   default postgres://postgres@127.0.0.1:55432/evictd
#   EVICTD_TEST_REDIS_URL  Redis 7                           default redis://127.0.0.1:6479
#   EVICTD_BIN             the binary under test              default target/debug/evictd
#
# The blocks the reader types before those (apt-get, wal_level, the exports of
# DB_URL and REDIS_URL) are not run; this script provides what they would:
# DB_URL is a fresh database on the test Postgres (dropped at the end),
# REDIS_URL the test Redis's database 11 (only the tutorial's keys are
# deleted at the end), `evictd` on PATH. Three names are made unique so that
# runs of other tests and sessions cannot collide with this one: the slot
# (evictd_tutorial → evictd_t_tutorial_<pid>, a name scripts/test.sh drops
# after an interrupted run), the metrics address (127.0.0.1:9187 → a free
# port) and the broadcast channel (through its environment override: pub/sub
# channels are shared by every Redis database).
#
# Exits non-zero on the first failing command or check, naming the block.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_PREFIX=tutorial-test
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"   # note, die

PG_URL="${EVICTD_TEST_PG_URL:-postgres://postgres@127.0.0.1:55432/evictd}"
REDIS_BASE="${EVICTD_TEST_REDIS_URL:-redis://127.0.0.1:6479}"
EVICTD_BIN="${EVICTD_BIN:-$ROOT/target/debug/evictd}"
DOC="$ROOT/docs/tutorial.md"
[ -x "$EVICTD_BIN" ] || die "no evictd binary at $EVICTD_BIN (cargo build, or set EVICTD_BIN)"
EVICTD_BIN="$(readlink -f -- "$EVICTD_BIN")"   # the symlink below must not depend on the working directory
for c in psql redis-cli curl python3; do command -v "$c" >/dev/null || die "$c is missing"; done

ID="$$"
DB="evictd_tutorial_$ID"
SLOT="evictd_t_tutorial_$ID"   # evictd_t_%: scripts/test.sh drops those an interrupted run left
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
ADMIN_URL="$PG_URL"
DB_URL="${PG_URL%/*}/$DB"
REDIS_URL="${REDIS_BASE%/}/11"
WORK="$(mktemp -d -t evictd-tutorial.XXXXXX)"
BIN_DIR="$WORK/bin"
mkdir -p "$BIN_DIR" "$WORK/run"
ln -s "$EVICTD_BIN" "$BIN_DIR/evictd"

cleanup() {
  local rc=$?
  set +e
  # evictd is the generated script's child: it is stopped by the script's
  # own trap; wait for the slot to be free before dropping it.
  psql -X -q "$ADMIN_URL" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$SLOT' AND NOT active" >/dev/null 2>&1
  psql -X -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1
  for pattern in 'book:*' 'author:*' 'evictd:*'; do
    redis-cli -u "$REDIS_URL" --scan --pattern "$pattern" | xargs -r redis-cli -u "$REDIS_URL" UNLINK >/dev/null 2>&1
  done
  if [ "$rc" -ne 0 ]; then
    note "evictd's log:"; tail -n 30 "$WORK/run/evictd.log" >&2 2>/dev/null
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

psql -X -q -v ON_ERROR_STOP=1 "$ADMIN_URL" -c "CREATE DATABASE \"$DB\"" >/dev/null

# The blocks, in order, each announced so that a failure names its block.
script="$WORK/tutorial.sh"
{
  cat <<'PRELUDE'
set -euo pipefail
EVICTD_PID=""
trap '[ -n "$EVICTD_PID" ] && kill -TERM "$EVICTD_PID" 2>/dev/null && wait "$EVICTD_PID" 2>/dev/null' EXIT
# Checks: a key invalidated is gone within 10 s (evictd takes milliseconds;
# the deadline is for a loaded CI machine); a key that must stay is looked at
# once the ones that must go are gone (one transaction's effects are applied
# together, in one batch).
expect_gone() {
  local k i
  for k in "$@"; do
    for i in $(seq 1 100); do
      [ "$(redis-cli -u "$REDIS_URL" EXISTS "$k")" = 0 ] && break
      [ "$i" = 100 ] && { echo "FAIL: $k is still cached" >&2; exit 1; }
      sleep 0.1
    done
  done
}
expect_cached() {
  local k
  for k in "$@"; do
    [ "$(redis-cli -u "$REDIS_URL" EXISTS "$k")" = 1 ] || { echo "FAIL: $k is not cached" >&2; exit 1; }
  done
}
PRELUDE
  awk -v slot="$SLOT" -v port="$PORT" '
    /^```sh tutorial(-check)?$/ { inblock = 1; n++; printf "echo \"--- block %d (line %d)\" >&2\n", n, NR; next }
    inblock && /^```$/          { inblock = 0; next }
    inblock {
      gsub(/evictd_tutorial/, slot)
      gsub(/127\.0\.0\.1:9187/, "127.0.0.1:" port)
      print
    }
  ' "$DOC"
} > "$script"
blocks="$(grep -c '^```sh tutorial' "$DOC")"
[ "$blocks" -ge 10 ] || die "found only $blocks tutorial blocks in $DOC"

note "running $blocks blocks of docs/tutorial.md (database $DB, slot $SLOT, metrics 127.0.0.1:$PORT)"
start=$(date +%s)
cd "$WORK/run"
if ! PATH="$BIN_DIR:$PATH" DB_URL="$DB_URL" REDIS_URL="$REDIS_URL" \
     EVICTD__REDIS__PRIMARY__BROADCAST_CHANNEL="evictd:tutorial:$ID" \
     timeout 180 bash "$script" > "$WORK/output.txt" 2> "$WORK/stderr.txt"; then
  tail -n 40 "$WORK/output.txt" >&2
  grep -v "may not be safe" "$WORK/stderr.txt" | tail -n 20 >&2
  die "the tutorial failed (above: its last output)"
fi
note "ok: $blocks blocks of docs/tutorial.md ran, every check passed ($(( $(date +%s) - start )) s)"
