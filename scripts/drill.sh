#!/usr/bin/env bash
# evictd's fault drill (docs/fault-drill.md): a writer, evictd replicas, real
# Postgres, Redis (a primary with a replica, and a Cluster) and, with --kafka,
# the broker with real Debezium; faults on a seeded schedule; a check of every
# committed row's keys at the end.
#
#   scripts/drill.sh                          the short drill (a few minutes; part of scripts/test.sh)
#   scripts/drill.sh --profile full --kafka --seed 7 --out /tmp/drill.md
#
#   EVICTD_BIN     the evictd binary     default target/debug/evictd (built when missing)
#   EVICTD_TOOLS   tool cache            default /tmp/evictd-tools (the drill's venv: psycopg, redis)
#
# Every other argument goes to scripts/drill/drill.py (--help lists them).
# Exit status: 0 when nothing was lost where the docs promise nothing is.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
tools="${EVICTD_TOOLS:-/tmp/evictd-tools}"
venv="$tools/drill-venv"

mkdir -p "$tools"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import psycopg, redis" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet "psycopg[binary]==3.2.*" "redis==5.2.*" >&2
fi
bin="${EVICTD_BIN:-$root/target/debug/evictd}"
if [ ! -x "$bin" ]; then
  (cd "$root" && cargo build --locked --bin evictd >&2)
fi
exec "$venv/bin/python" "$here/drill/drill.py" --evictd "$bin" "$@"
