#!/usr/bin/env bash
# Setup of the TypeScript client's tests, idempotent: Node 20 or later
# (apt-get on a fresh Debian machine, as root), then the locked packages
# (`npm ci`, only when package-lock.json changed since the last one).
# scripts/test.sh runs it before the cargo tests (the end-to-end agent,
# tests/it/clients.rs, runs `node --import tsx test/e2e_agent.ts` from this
# directory) and exports what its last line prints:
#
#   EVICTD_TEST_NODE=<node>
#
# test.sh runs it too, so that the client's tests run on their own. npm's
# output goes to stderr: stdout carries only the variable.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; } >&2
  else
    echo "clients/typescript/setup.sh: node and npm are missing (install Node.js 20 or later)" >&2
    exit 1
  fi
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 20 ]; then
  echo "clients/typescript/setup.sh: Node $(node --version) is too old (20 or later)" >&2
  exit 1
fi

# npm ci deletes node_modules first: run it only when the lock changed.
stamp=node_modules/.evictd-package-lock.sha256
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -e node_modules/tsx/package.json ]; then
  npm ci --no-audit --no-fund --loglevel=error >&2
  echo "$want" >"$stamp"
fi
echo "EVICTD_TEST_NODE=$(command -v node)"
