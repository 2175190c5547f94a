#!/usr/bin/env bash
# Setup of the Rust client's end-to-end agent, idempotent: builds
# src/bin/e2e_agent.rs (an application on evictd's client alone,
# default-features = false) with cargo, which rebuilds only what changed.
# scripts/test.sh runs it before the cargo tests (tests/it/clients.rs starts
# the agent) and exports what its last line prints:
#
#   EVICTD_TEST_RUST_AGENT=<the binary>
#
# cargo's output goes to stderr: stdout carries only the variable.
# CARGO_TARGET_DIR and the like are honoured (the path comes from cargo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

cargo build --locked --quiet -p evictd-rust-example --bin e2e_agent >&2
target="$(cargo metadata --locked --no-deps --format-version 1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
agent="$target/debug/e2e_agent"
[ -x "$agent" ] || { echo "clients/rust-example/setup.sh: no $agent after the build" >&2; exit 1; }
echo "EVICTD_TEST_RUST_AGENT=$agent"
