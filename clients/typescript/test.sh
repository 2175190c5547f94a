#!/usr/bin/env bash
# The TypeScript client's test command: setup.sh (Node, the locked
# dependencies; idempotent), then type-check and build (tsc → dist/ with
# declarations), then run every test with Node's test runner against the
# real servers named by
#
#   EVICTD_TEST_REDIS_URL           redis://127.0.0.1:6479
#   EVICTD_TEST_REDIS_CLUSTER_URLS  redis://127.0.0.1:7101,redis://127.0.0.1:7102,...
#
# Nothing is skipped: an unset variable or an unreachable server fails the
# tests that need it. Needs Node 20 or later (setup.sh installs nodejs and
# npm with apt-get on a fresh Debian machine, as root). The end-to-end tests
# through evictd are tests/it/clients.rs (test/e2e_agent.ts), in cargo's run.
# Extra arguments are test files to run instead of all (test/key.test.ts).
set -euo pipefail
cd "$(dirname "$0")"

node="$(bash ./setup.sh | sed -n 's/^EVICTD_TEST_NODE=//p' | tail -n 1)"
[ -x "$node" ] || { echo "clients/typescript/test.sh: setup.sh printed no node" >&2; exit 1; }

for var in EVICTD_TEST_REDIS_URL EVICTD_TEST_REDIS_CLUSTER_URLS; do
  if [ -z "${!var:-}" ]; then
    echo "clients/typescript/test.sh: $var is not set; the tests need a real server (scripts/test.sh sets it)" >&2
    exit 1
  fi
done

npx tsc -p tsconfig.json --noEmit
npm run --silent build
if [ "$#" -gt 0 ]; then files=("$@"); else files=(test/*.test.ts); fi
exec "$node" --import tsx --test --test-concurrency=1 "${files[@]}"
