#!/usr/bin/env bash
# Runs one fuzz target (fuzz/, cargo-fuzz + libFuzzer) for a given time and
# prints its executions and findings.
#
#   scripts/fuzz.sh TARGET SECONDS      e.g. scripts/fuzz.sh pgoutput 60
#   scripts/fuzz.sh --list              the targets
#
# Installs what it needs: the nightly toolchain (rustup) and cargo-fuzz.
# Builds without a sanitizer (the code under test is safe Rust) and with
# debug assertions (an integer overflow is a finding). The run starts from
# fuzz/corpus/TARGET and writes the inputs it finds to a scratch copy
# (FUZZ_WORK, default /tmp/evictd-fuzz/TARGET/corpus), so the committed
# seeds stay small; crashes go to FUZZ_WORK/.. as crash-*, timeout-*, oom-*.
# A finding is an input to commit under fuzz/regressions/TARGET/ with a
# fix (fuzz/README.md).
#
#   FUZZ_LOCK      a lock file held (flock) around the build, as BENCH_LOCK
#                  in scripts/bench.sh ("" for none)   /tmp/evictd-cargo.lock
#   FUZZ_JOBS      parallel fuzzing processes (libFuzzer -fork)          1
#   FUZZ_ARGS      more libFuzzer flags
# Limits: a run over 1 s (-timeout=1) is a hang, over 2 GB (-rss_limit_mb)
# out of memory; inputs up to 64 KiB (-max_len).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^evictd-fuzz$'; }
if [ "${1-}" = --list ]; then targets; exit 0; fi
if [ $# -ne 2 ] || ! targets | grep -qx "$1" || ! [[ $2 =~ ^[0-9]+$ ]]; then
    echo "usage: scripts/fuzz.sh TARGET SECONDS (targets: $(targets | tr '\n' ' '))" >&2
    exit 2
fi
TARGET=$1 SECONDS_TO_RUN=$2

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked
fi

LOCK="${FUZZ_LOCK-/tmp/evictd-cargo.lock}"
BUILD=(cargo +nightly fuzz build --sanitizer none --debug-assertions "$TARGET")
if [ -n "$LOCK" ]; then flock "$LOCK" "${BUILD[@]}"; else "${BUILD[@]}"; fi

WORK="${FUZZ_WORK-/tmp/evictd-fuzz/$TARGET/corpus}"
mkdir -p "$WORK"
ARTIFACTS="$(dirname "$WORK")/"
LOG="$(dirname "$WORK")/fuzz.log"
BIN="target/x86_64-unknown-linux-gnu/release/$TARGET"
FLAGS=(-max_total_time="$SECONDS_TO_RUN" -timeout=1 -rss_limit_mb=2048 -max_len=65536
       -artifact_prefix="$ARTIFACTS" -print_final_stats=1)
if [ "${FUZZ_JOBS-1}" -gt 1 ]; then FLAGS+=(-fork="$FUZZ_JOBS" -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1); fi
# debezium_value has no seeds (arbitrary bytes): it starts from nothing.
SEEDS=()
if [ -d "corpus/$TARGET" ]; then SEEDS=("corpus/$TARGET"); fi
STAMP="$(dirname "$WORK")/.started"
touch "$STAMP"
# shellcheck disable=SC2086
set +e
"$BIN" "${FLAGS[@]}" ${FUZZ_ARGS-} "$WORK" "${SEEDS[@]}" 2>&1 | tee "$LOG" | grep -E '^(#[0-9]+.*(DONE|pulse)|==|SUMMARY|stat::)' 
STATUS=${PIPESTATUS[0]}
set -e

EXECS=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG" | tail -1)
RATE=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$LOG" | tail -1)
FOUND=$(find "$ARTIFACTS" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) -newer "$STAMP" | sort)
echo "target $TARGET: ${EXECS:-?} executions in ${SECONDS_TO_RUN} s (${RATE:-?}/s), corpus $(find "$WORK" -type f | wc -l) inputs, exit $STATUS"
if [ -n "$FOUND" ]; then
    echo "findings ($(echo "$FOUND" | wc -l)):"
    echo "$FOUND"
    exit 1
fi
echo "findings: none"
exit "$STATUS"
