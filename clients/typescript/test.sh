#!/usr/bin/env bash
# The TypeScript client's test command: install the locked dependencies,
# type-check and build (tsc → dist/ with declarations), then run every test
# with Node's test runner against the real servers named by
#
#   EVICTD_TEST_REDIS_URL           redis://127.0.0.1:6479
#   EVICTD_TEST_REDIS_CLUSTER_URLS  redis://127.0.0.1:7101,redis://127.0.0.1:7102,...
#
# Nothing is skipped: an unset variable or an unreachable server fails the
# tests that need it. Needs Node 20 or later; on a fresh Debian machine, as
# root, it installs nodejs and npm with apt-get when `node` is missing.
# Extra arguments are test files to run instead of all (test/key.test.ts).
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "clients/typescript/test.sh: node and npm are missing (install Node.js 20 or later)" >&2
    exit 1
  fi
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 20 ]; then
  echo "clients/typescript/test.sh: Node $(node --version) is too old (20 or later)" >&2
  exit 1
fi

for var in EVICTD_TEST_REDIS_URL EVICTD_TEST_REDIS_CLUSTER_URLS; do
  if [ -z "${!var:-}" ]; then
    echo "clients/typescript/test.sh: $var is not set; the tests need a real server (scripts/test.sh sets it)" >&2
    exit 1
  fi
done

npm ci --no-audit --no-fund --loglevel=error
npx tsc -p tsconfig.json --noEmit
npm run --silent build
if [ "$#" -gt 0 ]; then files=("$@"); else files=(test/*.test.ts); fi
exec node --import tsx --test --test-concurrency=1 "${files[@]}"
