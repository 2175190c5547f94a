#!/usr/bin/env bash
# Tests of the Python client: a venv under ${EVICTD_TOOLS:-/tmp/evictd-tools},
# the package installed editable with its test extras, then pytest against
# the real Redis servers of EVICTD_TEST_REDIS_URL and
# EVICTD_TEST_REDIS_CLUSTER_URLS. Nothing is skipped: a missing variable or
# server fails the run.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="${EVICTD_TOOLS:-/tmp/evictd-tools}"
venv="$tools/python-venv"

: "${EVICTD_TEST_REDIS_URL:?EVICTD_TEST_REDIS_URL must name a Redis (e.g. redis://127.0.0.1:6479)}"
: "${EVICTD_TEST_REDIS_CLUSTER_URLS:?EVICTD_TEST_REDIS_CLUSTER_URLS must name a Redis Cluster}"

mkdir -p "$tools"
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv"; then
        rm -rf "$venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get install -y python3-venv
            python3 -m venv "$venv"
        else
            echo "python3 -m venv failed: install python3-venv" >&2
            exit 1
        fi
    fi
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e "$here[test]"
cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider -q "$@"
