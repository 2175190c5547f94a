#!/usr/bin/env bash
# Where evictd spends its time while it catches up with a backlog.
#
#   scripts/profile.sh                  perf, ≈ 1-2 minutes
#   PROFILE_CALLGRIND=1 scripts/profile.sh   also callgrind on a short drain
#
# The same stack and workload as scripts/bench.sh's drain section: a fresh
# database with the e-commerce example, slots created at the same LSN, a
# backlog of PROFILE_BACKLOG single-row UPDATE transactions written with no
# consumer running. Then, each from its own slot:
#
#   1. `evictd run` under `perf record --call-graph dwarf`: the top symbols
#      by self time (`perf report --no-children`), by shared object, and
#      evictd's own functions by inclusive time;
#   2. `evictd run` again, with a system-wide `perf record` (no call
#      graphs): the CPU split between evictd, the walsender and Redis;
#   3. `pg_recvlogical` the same way, as the reference;
#   4. with PROFILE_CALLGRIND=1, `evictd run` under
#      `valgrind --tool=callgrind` on the first PROFILE_CALLGRIND_BACKLOG
#      changes (valgrind is ≈ 50 times slower): `callgrind_annotate`.
#
# Knobs: PROFILE_BACKLOG (200000), PROFILE_CALLGRIND_BACKLOG (20000),
# PROFILE_OUT (a directory to keep perf.data and callgrind.out in; default:
# a temporary one, removed), PROFILE_FREQ (perf's sampling rate, 499 Hz),
# BENCH_EVICTD, BENCH_BUILD, BENCH_LOCK, PGPORT, REDIS_PORT as for
# scripts/bench.sh. evictd's release profile keeps line tables (debug = 1),
# which is what `--call-graph dwarf` needs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG_PREFIX=profile
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"

BACKLOG="${PROFILE_BACKLOG:-200000}"
CG_BACKLOG="${PROFILE_CALLGRIND_BACKLOG:-20000}"
FREQ="${PROFILE_FREQ:-499}"
ROWS="${BENCH_ROWS:-100000}"; WRITERS="${BENCH_WRITERS:-4}"
LOCK="${BENCH_LOCK-/tmp/evictd-cargo.lock}"
PGPORT="${PGPORT:-55452}"; REDIS_PORT="${REDIS_PORT:-6499}"
WORK="$(mktemp -d -t evictd-profile.XXXXXX)"
OUT="${PROFILE_OUT:-$WORK}"; mkdir -p "$OUT"
STOP=(); PIDS=()
# shellcheck source=scripts/lib/bench-stack.sh
. "$ROOT/scripts/lib/bench-stack.sh"
trap stack_cleanup EXIT

# shellcheck source=scripts/lib/prerequisites.sh
. "$ROOT/scripts/lib/prerequisites.sh"
mapfile -t extra < <(server_extras pg redis)
extra+=(pg_recvlogical:postgresql-client-15 pgbench:postgresql-15 perf:linux-perf)
[ "${PROFILE_CALLGRIND:-0}" = 1 ] && extra+=(valgrind:valgrind)
ensure_packages "${extra[@]}"
# shellcheck source=scripts/lib/demo-stack.sh
. "$ROOT/scripts/lib/demo-stack.sh"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
if [ "${BENCH_BUILD:-1}" = 1 ]; then
  note "building (release)"
  lock
  cargo build --release --locked --quiet --bin evictd 9>&-
  cp "$BIN/evictd" "$WORK/evictd"
  unlock
fi
EVICTD="${BENCH_EVICTD:-$WORK/evictd}"
[ -x "$EVICTD" ] || die "$EVICTD is not an executable"
bench_stack

for s in perf system recv; do create_slot "evictd_bench_$s"; done
[ "${PROFILE_CALLGRIND:-0}" = 1 ] && create_slot evictd_bench_callgrind
note "writing a backlog of $BACKLOG single-row UPDATE transactions (no consumer running)"
if [ "${PROFILE_CALLGRIND:-0}" = 1 ]; then
  write_backlog "$CG_BACKLOG"; CG_END=$BACKLOG_END
  write_backlog "$((BACKLOG - CG_BACKLOG))"
else
  write_backlog "$BACKLOG"
fi
END=$BACKLOG_END

# drain SLOT LSN PID: waits until the slot reached LSN; sets DRAIN_MS (since
# EPID_START). Not in a $(…): q's session is not available in a subshell.
drain() {
  until slot_reached "$1" "$2"; do
    kill -0 "$3" 2>/dev/null || die "the consumer of $1 exited"
    sleep 0.02
  done
  DRAIN_MS=$(( ($(now_ns) - EPID_START) / 1000000 ))
}

lock
# 1. evictd under perf, with call graphs.
config evictd_bench_perf "$WORK/perf.toml" 100
EPID_START=$(now_ns)
perf record -q -F "$FREQ" --call-graph dwarf,16384 -o "$OUT/perf.data" -- \
  "$EVICTD" run --config "$WORK/perf.toml" 2>"$WORK/perf.log" 9>&- &
PERF_PID=$!; PIDS+=("$PERF_PID")
drain evictd_bench_perf "$END" "$PERF_PID"; ms=$DRAIN_MS
EVICTD_PID="$(pgrep -P "$PERF_PID" || true)"
[ -n "$EVICTD_PID" ] && kill -TERM "$EVICTD_PID"
wait "$PERF_PID" || true
note "evictd under perf drained $BACKLOG changes in $ms ms"

# 2. and 3. system-wide, no call graphs: evictd, then pg_recvlogical.
perf record -q -a -F "$FREQ" -o "$OUT/system-evictd.data" 9>&- 2>/dev/null &
SYS_PID=$!; PIDS+=("$SYS_PID")
start_evictd "$EVICTD" evictd_bench_system 100
drain evictd_bench_system "$END" "$EPID"; ms_system=$DRAIN_MS
kill -INT "$SYS_PID"; wait "$SYS_PID" || true
stop_pid "$EPID"
perf record -q -a -F "$FREQ" -o "$OUT/system-recv.data" 9>&- 2>/dev/null &
SYS_PID=$!; PIDS+=("$SYS_PID")
t0=$(now_ns)
pg_recvlogical -d "$url" --slot evictd_bench_recv --start --endpos "$END" \
  -o proto_version=1 -o "publication_names=$PUB" -F 0 -f /dev/null 9>&-
ms_recv=$(ms_since "$t0")
kill -INT "$SYS_PID"; wait "$SYS_PID" || true
unlock

# From here on output is cut short with head: a reader that stops early is fine.
set +o pipefail
report() { perf report -i "$1" --stdio --no-header "${@:2}" 2>/dev/null | grep -v '^#' | grep -v '^$' || true; }
echo
echo "## evictd catching up with $BACKLOG changes"
echo
echo "Under perf: $ms ms. Without call graphs: evictd $ms_system ms, pg_recvlogical $ms_recv ms."
echo
echo "### Top symbols, self time (perf report --no-children), evictd"
echo '```'
report "$OUT/perf.data" --no-children -g none --percent-limit 0.7 --sort dso,symbol | cut -c1-150 | head -40
echo '```'
echo '### By shared object'
echo '```'
report "$OUT/perf.data" --no-children -g none --sort dso | head -12
echo '```'
echo "### evictd's own functions, inclusive time (\`perf report --children\`)"
echo '```'
report "$OUT/perf.data" --children -g none --percent-limit 2 --sort symbol \
  | grep -E 'evictd::|pgwire_replication::|redis::|sqlx' | cut -c1-170 | head -40
echo '```'
for what in evictd recv; do
  echo "### System-wide while $([ $what = evictd ] && echo 'evictd' || echo 'pg_recvlogical') drains (by command)"
  echo '```'
  report "$OUT/system-$what.data" --no-children -g none --sort comm | head -10
  echo '```'
done

if [ "${PROFILE_CALLGRIND:-0}" = 1 ]; then
  lock
  config evictd_bench_callgrind "$WORK/callgrind.toml" 100
  EPID_START=$(now_ns)
  valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
    "$EVICTD" run --config "$WORK/callgrind.toml" 2>"$WORK/callgrind.log" 9>&- &
  CG_PID=$!; PIDS+=("$CG_PID")
  drain evictd_bench_callgrind "$CG_END" "$CG_PID"; ms_cg=$DRAIN_MS
  kill -TERM "$CG_PID"; wait "$CG_PID" || true
  unlock
  echo "### callgrind: the first $CG_BACKLOG changes ($ms_cg ms under valgrind), instructions by function"
  echo '```'
  callgrind_annotate --inclusive=no "$OUT/callgrind.out" 2>/dev/null | sed -n '/^-----/,$p' | head -40 | cut -c1-170
  echo '```'
fi
[ "$OUT" = "$WORK" ] || note "perf.data and the rest are in $OUT"
