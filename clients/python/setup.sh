#!/usr/bin/env bash
# Setup of the Python client's tests, idempotent: a venv under
# ${EVICTD_TOOLS:-/tmp/evictd-tools}/python-venv with the package installed
# editable with its test extras. scripts/test.sh runs it before the cargo
# tests (the end-to-end agent, tests/it/clients.rs, runs in this venv) and
# exports what its last line prints:
#
#   EVICTD_TEST_PYTHON=<the venv's python>
#
# test.sh runs it too, so that the client's tests run on their own.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="${EVICTD_TOOLS:-/tmp/evictd-tools}"
venv="$tools/python-venv"

mkdir -p "$tools"
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" >&2; then
        rm -rf "$venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get install -y python3-venv >&2
            python3 -m venv "$venv" >&2
        else
            echo "python3 -m venv failed: install python3-venv" >&2
            exit 1
        fi
    fi
fi
# pip's output goes to stderr: stdout carries only the variable.
"$venv/bin/python" -m pip install --quiet --upgrade pip >&2
"$venv/bin/python" -m pip install --quiet -e "$here[test]" >&2
echo "EVICTD_TEST_PYTHON=$venv/bin/python"
