#!/usr/bin/env bash
# Runs one fuzz target for a given time (or number of executions) and prints
# its executions and findings. docs/fuzzing.md has what each target reads,
# the figures of the last full runs and how findings are kept.
#
#   scripts/fuzz.sh TARGET SECONDS      e.g. scripts/fuzz.sh pgoutput 60
#   scripts/fuzz.sh --list              the targets
#
# The daemon's parsers (fuzz/, cargo-fuzz + libFuzzer): installs what it
# needs (the nightly toolchain, cargo-fuzz); builds without a sanitizer (the
# code under test is safe Rust) and with debug assertions (an integer
# overflow is a finding). Each client's broadcast reader: python-broadcast
# (Atheris, in a venv under EVICTD_TOOLS) and typescript-broadcast (Jazzer.js,
# clients/typescript/fuzz/setup-jazzer.sh). All three are libFuzzer engines:
# same flags, same statistics.
#
# A run starts from the target's committed seeds and writes the inputs it
# finds to a scratch copy (FUZZ_WORK, default /tmp/evictd-fuzz/TARGET/corpus),
# so the committed seeds stay small; crashes go to FUZZ_WORK/.. as crash-*,
# timeout-*, oom-*. A finding is an input to commit under the target's
# regressions/ directory with a fix (docs/fuzzing.md).
#
#   FUZZ_LOCK      a lock file held (flock) around the build, as BENCH_LOCK
#                  in scripts/bench.sh ("" for none)   /tmp/evictd-cargo.lock
#   FUZZ_RUNS      stop after this many executions too (libFuzzer -runs)  none
#   FUZZ_JOBS      parallel fuzzing processes (libFuzzer -fork; Rust only) 1
#   FUZZ_ARGS      more libFuzzer flags
#   FUZZ_BUILD     0: run the Rust target as last built, without cargo     1
#   EVICTD_TOOLS   where the clients' fuzzers are installed  /tmp/evictd-tools
# Limits: a run over 1 s (-timeout=1) is a hang, over 2 GB (-rss_limit_mb)
# out of memory; inputs up to 64 KiB (-max_len).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"

targets() {
    sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^evictd-fuzz$'
    printf '%s\n' python-broadcast typescript-broadcast
}
if [ "${1-}" = --list ]; then targets; exit 0; fi
# (grep without -q: an early exit would fail the pipe under pipefail)
if [ $# -ne 2 ] || ! targets | grep -x -- "$1" >/dev/null || ! [[ $2 =~ ^[0-9]+$ ]]; then
    echo "usage: scripts/fuzz.sh TARGET SECONDS (targets: $(targets | tr '\n' ' '))" >&2
    exit 2
fi
TARGET=$1 SECONDS_TO_RUN=$2

WORK="${FUZZ_WORK-/tmp/evictd-fuzz/$TARGET/corpus}"
mkdir -p "$WORK"
ARTIFACTS="$(dirname "$WORK")/"
LOG="$(dirname "$WORK")/fuzz.log"
SUMMARY="$LOG.summary"   # the lines printed; the figures are read from it
FLAGS=(-max_total_time="$SECONDS_TO_RUN" -timeout=1 -rss_limit_mb=2048 -max_len=65536
       -artifact_prefix="$ARTIFACTS" -print_final_stats=1)
if [ -n "${FUZZ_RUNS-}" ]; then FLAGS+=(-runs="$FUZZ_RUNS"); fi
TOOLS="${EVICTD_TOOLS:-/tmp/evictd-tools}"

case "$TARGET" in
python-broadcast)
    # Atheris, in a venv of its own (the client's test venv stays without it).
    VENV="$TOOLS/atheris-venv"
    if ! "$VENV/bin/python" -c 'import atheris, redis' 2>/dev/null; then
        python3 -m venv "$VENV" >&2
        "$VENV/bin/python" -m pip install --quiet atheris 'redis>=5.0' >&2
    fi
    SEEDS=("$ROOT/clients/python/fuzz/corpus")
    RUN=("$VENV/bin/python" "$ROOT/clients/python/fuzz/broadcast_fuzz.py" "${FLAGS[@]}")
    ;;
typescript-broadcast)
    (cd "$ROOT/clients/typescript" && bash setup.sh >/dev/null)
    SETUP="$(bash "$ROOT/clients/typescript/fuzz/setup-jazzer.sh" "$(dirname "$WORK")" | tail -n 1)"
    JAZZER="$(sed -n 's/^JAZZER=\([^ ]*\).*/\1/p' <<<"$SETUP")"
    HARNESS="$(sed -n 's/.*JAZZER_HARNESS=\([^ ]*\).*/\1/p' <<<"$SETUP")"
    LD_PRELOAD="$(sed -n 's/.*JAZZER_PRELOAD=\([^ ]*\) .*/\1/p' <<<"$SETUP")"
    export LD_PRELOAD
    export NODE_PATH="$ROOT/clients/typescript/node_modules"
    SEEDS=("$ROOT/clients/typescript/fuzz/corpus")
    # Jazzer.js's own timeout (ms) is the same 1 s; the flags after -- are libFuzzer's.
    RUN=("$JAZZER" "$HARNESS" --sync --timeout=1000 "$WORK" "${SEEDS[@]}" -- "${FLAGS[@]}")
    SEEDS=()
    ;;
*)
    if ! rustup toolchain list | grep -q '^nightly'; then
        rustup toolchain install nightly --profile minimal
    fi
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        cargo +nightly install cargo-fuzz --locked
    fi
    LOCK="${FUZZ_LOCK-/tmp/evictd-cargo.lock}"
    BUILD=(cargo +nightly fuzz build --sanitizer none --debug-assertions "$TARGET")
    if [ "${FUZZ_BUILD-1}" = 0 ]; then :
    elif [ -n "$LOCK" ]; then flock "$LOCK" "${BUILD[@]}"; else "${BUILD[@]}"; fi
    if [ "${FUZZ_JOBS-1}" -gt 1 ]; then FLAGS+=(-fork="$FUZZ_JOBS" -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1); fi
    # debezium_value has no seeds of its own: it starts from nothing.
    SEEDS=()
    if [ -d "corpus/$TARGET" ]; then SEEDS=("corpus/$TARGET"); fi
    RUN=("target/x86_64-unknown-linux-gnu/release/$TARGET" "${FLAGS[@]}")
    ;;
esac

STAMP="$(dirname "$WORK")/.started"
touch "$STAMP"
set +e
# shellcheck disable=SC2086  # FUZZ_ARGS is a list of flags
if [ "$TARGET" = typescript-broadcast ]; then
    "${RUN[@]}" ${FUZZ_ARGS-} 2>&1 | tee "$LOG" | grep -E '^(#[0-9]+.*(DONE|pulse)|==|SUMMARY|stat::)' | tee "$SUMMARY"
else
    "${RUN[@]}" ${FUZZ_ARGS-} "$WORK" "${SEEDS[@]}" 2>&1 | tee "$LOG" | grep -E '^(#[0-9]+.*(DONE|pulse)|==|SUMMARY|stat::)' | tee "$SUMMARY"
fi
STATUS=${PIPESTATUS[0]}
set -e

EXECS=$(sed -n 's/^stat::number_of_executed_units: *//p' "$SUMMARY" | tail -1)
RATE=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$SUMMARY" | tail -1)
FOUND=$(find "$ARTIFACTS" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) -newer "$STAMP" | sort)
PEAK=$(sed -n 's/^stat::peak_rss_mb: *//p' "$SUMMARY" | tail -1)
echo "target $TARGET: ${EXECS:-?} executions in $(( $(date +%s) - $(stat -c %Y "$STAMP") )) s (${RATE:-?}/s), peak RSS ${PEAK:-?} MB, corpus $(find "$WORK" -type f | wc -l) inputs, exit $STATUS"
if [ -n "$FOUND" ]; then
    echo "findings ($(echo "$FOUND" | wc -l)):"
    echo "$FOUND"
    exit 1
fi
echo "findings: none"
exit "$STATUS"
