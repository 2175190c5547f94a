#!/usr/bin/env bash
# Tests of the Python client: setup.sh (the venv, idempotent), then pytest
# against the real Redis servers of EVICTD_TEST_REDIS_URL and
# EVICTD_TEST_REDIS_CLUSTER_URLS. Nothing is skipped: a missing variable or
# server fails the run. The end-to-end tests through evictd are
# tests/it/clients.rs, in cargo's run.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

: "${EVICTD_TEST_REDIS_URL:?EVICTD_TEST_REDIS_URL must name a Redis (e.g. redis://127.0.0.1:6479)}"
: "${EVICTD_TEST_REDIS_CLUSTER_URLS:?EVICTD_TEST_REDIS_CLUSTER_URLS must name a Redis Cluster}"

python="$(bash "$here/setup.sh" | sed -n 's/^EVICTD_TEST_PYTHON=//p' | tail -n 1)"
[ -x "$python" ] || { echo "setup.sh printed no python" >&2; exit 1; }
cd "$here"
exec "$python" -m pytest -p no:cacheprovider -q "$@"
