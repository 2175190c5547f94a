#!/usr/bin/env bash
# evictd against the machine's limits, in one run, side by side.
#
#   scripts/bench.sh                 every section, every target row, ≈ 25 minutes on 2 cores
#   BENCH_SECTIONS="drain restart" scripts/bench.sh
#   BENCH_SECTIONS="drain callgrind sink latency writes restart" scripts/bench.sh   the Postgres path
#   BENCH_SECTIONS="kafka newtopic" scripts/bench.sh   the Kafka path next to the Postgres one
#
# Starts its own Postgres and Redis (scripts/services/, ports below), loads
# the e-commerce example into a fresh database and prints, at the end, a
# markdown table of targets against what it measured, then one table per
# section:
#
#   drain     catch-up: RUNS pairs of slots are created at the same LSN, a
#             backlog of BENCH_BACKLOG single-row UPDATE transactions is
#             written with no consumer running, then each slot is drained,
#             interleaved and in rotating order: pg_recvlogical --endpos
#             (pgoutput, the same publication and protocol version as
#             evictd's), the same with pgoutput's binary = true,
#             pg_recvlogical with its defaults (test_decoding, every table)
#             and `evictd run` (fill guard and broadcast on, as
#             by default) until its slot's confirmed_flush_lsn reaches the
#             backlog's end; with each, the walsender's CPU time;
#   callgrind evictd's instructions per change under valgrind: a small and a
#             large drain, the slope between them;
#   sink      the sink's limit: redis-benchmark, pipelined UNLINK;
#   latency   commit → key gone (evictd-load) at BENCH_RATES, RUNS rounds,
#             with evictd's CPU time and peak RSS (VmHWM), and the same for a
#             hand-written reference (pg_recvlogical | sed | redis-cli);
#   writes    Postgres write throughput (pgbench, the same single-row
#             UPDATE, BENCH_WRITE_SECONDS each) with evictd consuming a
#             slot, with only pg_recvlogical consuming one, and with no
#             slot; interleaved, RUNS rounds;
#   restart   SIGTERM evictd, start it again, commit one change at once:
#             process start → key gone and commit → key gone.
#   kafka     the Kafka source against the Postgres one on
#             one change set: RUNS slots for evictd and Debezium's own slot
#             (Debezium 3.6 Postgres connector → a Tansu broker, topic
#             <prefix>.shop.products, 1 partition) exist before
#             BENCH_KAFKA_CHANGES single-row UPDATE transactions are written;
#             once the topic holds them all (messages counted, not end
#             offsets: the broker's high watermark is wrong), RUNS rounds,
#             alternating which goes first, drain the topic (a fresh
#             consumer group each) and a slot: time to the group's committed
#             offsets / the slot's confirmed_flush_lsn reaching the end, time
#             to the first change (the group join), CPU time, peak RSS. Then
#             commit → key gone at BENCH_KAFKA_RATE for each path, RUNS
#             rounds, alternating; Debezium stays up throughout, and the
#             Kafka path's latency includes its delay (poll interval 100 ms),
#             which is reported on its own too (record CreateTime − commit).
#   newtopic  evictd subscribed with topic_pattern at its
#             default client settings; RUNS times, a new table (in
#             Debezium's publication) gets its first row: commit → key gone,
#             Debezium creating the topic, evictd finding it and being
#             assigned it included.
#
# Knobs (environment):
#   BENCH_SECTIONS        sections to run                  drain callgrind sink latency writes restart kafka newtopic
#   BENCH_RUNS            runs per measurement (medians)   3
#   BENCH_BACKLOG         row changes in the backlog       200000
#   BENCH_RATES           changes/s, 0 = unthrottled       "1000 2000 10000 0"
#   BENCH_CALLGRIND_SMALL, BENCH_CALLGRIND_CHANGES  the two callgrind drains   2000, 20000
#   BENCH_LOAD_SECONDS    seconds per latency run          10
#   BENCH_WRITERS         writer connections (load, pgbench)  4
#   BENCH_PER_TX          rows per transaction in the latency runs  1
#   BENCH_WRITE_SECONDS   seconds per pgbench run          10
#   BENCH_ROWS            rows updated at random           100000
#   BENCH_KAFKA_CHANGES   kafka: row changes in the change set   100000
#   BENCH_KAFKA_RATE      kafka: changes/s in the latency runs   1000
#   BENCH_KAFKA_PROPERTIES  kafka: more of evictd's librdkafka properties, lines
#                         of `"name" = "value"` (to compare settings)    none
#   BENCH_NEWTOPIC_PROPERTIES  newtopic: the same for its evictd           none
#   BENCH_KAFKA_FETCH_WAIT_MS  kafka: evictd's fetch.wait.max.ms; the test
#                         broker sleeps through it (scripts/lib/bench-stack.sh)  10
#   BENCH_EVICTD          evictd binary to measure         the release build
#   BENCH_BEFORE          a second evictd binary, drained side by side in
#                         the drain section (e.g. a build of the previous
#                         commit), for before/after figures
#   BENCH_BUILD           0 = do not build (use BENCH_EVICTD/BENCH_LOAD)   1
#   BENCH_LOCK            a lock file held (flock) around each timed
#                         section and the build, so that builds do not
#                         run during a measurement; empty = none
#                                                          /tmp/evictd-cargo.lock
#   BENCH_STATUS_INTERVAL_MS  evictd's status_interval_ms while draining:
#                         confirmed_flush_lsn moves only with a status
#                         update, so this bounds the drain's timing error   100
#   PGPORT, REDIS_PORT, KAFKA_PORT   servers (own ones, stopped at exit if
#                         started here)                    55452, 6499, 19192
#
# Everything runs on 127.0.0.1; whatever it started is stopped at exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG_PREFIX=bench
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"

SECTIONS="${BENCH_SECTIONS:-drain callgrind sink latency writes restart kafka newtopic}"
KAFKA_CHANGES="${BENCH_KAFKA_CHANGES:-100000}"
KAFKA_RATE="${BENCH_KAFKA_RATE:-1000}"
RUNS="${BENCH_RUNS:-3}"
BACKLOG="${BENCH_BACKLOG:-200000}"
read -r -a RATES <<<"${BENCH_RATES:-1000 2000 10000 0}"
LOAD_SECONDS="${BENCH_LOAD_SECONDS:-10}"
WRITERS="${BENCH_WRITERS:-4}"
PER_TX="${BENCH_PER_TX:-1}"
WRITE_SECONDS="${BENCH_WRITE_SECONDS:-10}"
ROWS="${BENCH_ROWS:-100000}"
STATUS_MS="${BENCH_STATUS_INTERVAL_MS:-100}"
LOCK="${BENCH_LOCK-/tmp/evictd-cargo.lock}"
PGPORT="${PGPORT:-55452}"; REDIS_PORT="${REDIS_PORT:-6499}"; KAFKA_PORT="${KAFKA_PORT:-19192}"
WORK="$(mktemp -d -t evictd-bench.XXXXXX)"
RESULTS="$WORK/results.tsv"; : >"$RESULTS"
STOP=(); PIDS=()

# shellcheck source=scripts/lib/bench-stack.sh
. "$ROOT/scripts/lib/bench-stack.sh"
trap stack_cleanup EXIT

record() { local IFS=$'\t'; echo "$*" >>"$RESULTS"; }

# shellcheck source=scripts/lib/prerequisites.sh
. "$ROOT/scripts/lib/prerequisites.sh"
servers=(pg redis)
[[ " $SECTIONS " != *" kafka "* && " $SECTIONS " != *" newtopic "* ]] || servers+=(kafka)
mapfile -t extra < <(server_extras "${servers[@]}")
[[ " $SECTIONS " != *" callgrind "* ]] || extra+=(valgrind:valgrind)
ensure_packages "${extra[@]}" pg_recvlogical:postgresql-client-15 pgbench:postgresql-15 redis-benchmark:redis-tools
# shellcheck source=scripts/lib/demo-stack.sh
. "$ROOT/scripts/lib/demo-stack.sh"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
if [ "${BENCH_BUILD:-1}" = 1 ]; then
  note "building (release)"
  lock
  cargo build --release --locked --quiet --bin evictd --bin evictd-load 9>&-
  # Copies: a build elsewhere in the same target directory cannot swap them mid-run.
  cp "$BIN/evictd" "$WORK/evictd"; cp "$BIN/evictd-load" "$WORK/evictd-load"
  unlock
  EVICTD="${BENCH_EVICTD:-$WORK/evictd}"; LOAD="${BENCH_LOAD:-$WORK/evictd-load}"
else
  EVICTD="${BENCH_EVICTD:-$BIN/evictd}"; LOAD="${BENCH_LOAD:-$BIN/evictd-load}"
fi
BEFORE="${BENCH_BEFORE:-}"
for b in "$EVICTD" "$LOAD" ${BEFORE:+"$BEFORE"}; do [ -x "$b" ] || die "$b is not an executable"; done

bench_stack

# ---------------------------------------------------------------- drain
section_drain() {
  local r kinds=(recv recvdefault recvbinary evictd) order kind slot start end wal t0 ms pid e0 w0
  [ -n "$BEFORE" ] && kinds+=(before)
  for r in $(seq 1 "$RUNS"); do for kind in "${kinds[@]}"; do
    # pg_recvlogical's own default plugin for its defaults' row
    create_slot "evictd_bench_${kind}_$r" "$([ "$kind" = recvdefault ] && echo test_decoding || echo pgoutput)"
  done; done
  note "drain: writing a backlog of $BACKLOG single-row UPDATE transactions (no consumer running)"
  write_backlog "$BACKLOG"
  start=$BACKLOG_START; end=$BACKLOG_END
  wal="$(q "SELECT pg_wal_lsn_diff('$end', '$start')::bigint")"
  local changes=$BACKLOG_CHANGES
  record drain_backlog "$changes" "$wal"
  lock
  for r in $(seq 1 "$RUNS"); do
    # Rotate the order each round so that neither always goes first.
    order=("${kinds[@]:$(( (r - 1) % ${#kinds[@]} ))}" "${kinds[@]:0:$(( (r - 1) % ${#kinds[@]} ))}")
    for kind in "${order[@]}"; do
      slot="evictd_bench_${kind}_$r"
      w0="$(walsenders_cpu_s)"   # the reference's walsender exits with it: its CPU lands here
      if [ "$kind" = recv ] || [ "$kind" = recvbinary ]; then
        local binary=(); [ "$kind" = recvbinary ] && binary=(-o binary=true)
        t0=$(now_ns)
        pg_recvlogical -d "$url" --slot "$slot" --start --endpos "$end" --plugin pgoutput \
          -o proto_version=1 -o "publication_names=$PUB" "${binary[@]}" -F 0 -f /dev/null 9>&- \
          || die "pg_recvlogical failed"
        ms=$(ms_since "$t0")
        record drain "$kind" "$ms" "" "" "" "" "$(walsender_cpu_since "$w0")"
      elif [ "$kind" = recvdefault ]; then
        t0=$(now_ns)
        pg_recvlogical -d "$url" --slot "$slot" --start --endpos "$end" -F 0 -f /dev/null 9>&- \
          || die "pg_recvlogical (test_decoding) failed"
        ms=$(ms_since "$t0")
        record drain recvdefault "$ms" "" "" "" "" "$(walsender_cpu_since "$w0")"
      else
        local bin="$EVICTD" r0; [ "$kind" = before ] && bin="$BEFORE"
        r0="$(redis_cpu_s)"
        start_evictd "$bin" "$slot" "$STATUS_MS"; pid=$EPID; t0=$EPID_START
        until slot_reached "$slot" "$end"; do
          kill -0 "$pid" 2>/dev/null || { cat "$WORK/$slot.log" >&2; die "evictd exited while draining"; }
          sleep 0.02
        done
        ms=$(ms_since "$t0")
        e0="$(metric_sum "$METRICS_PORT" evictd_effects_resolved_total)"
        local redis_s; redis_s="$(python3 -c "print(round($(redis_cpu_s) - $r0, 3))")"
        local cpu hwm ws; cpu="$(cpu_s "$pid")"; hwm="$(hwm_mib "$pid")"
        # evictd's walsender lives on until evictd stops: read its own CPU.
        ws="$(q "SELECT pid FROM pg_stat_replication WHERE application_name = 'evictd' LIMIT 1")"
        [ -n "$ws" ] && ws="$(cpu_s "$ws")"
        stop_pid "$pid"
        record drain "$kind" "$ms" "$cpu" "$hwm" "$e0" "$redis_s" "$ws"
      fi
      note "drain: $kind round $r: $changes changes in $ms ms"
      drop_slot_now "$slot"
    done
  done
  unlock
}

# ----------------------------------------------------------------- sink
section_sink() {
  local n=$(( ${BENCH_SINK_OPS:-2000000} )) c out rps
  note "sink: redis-benchmark, pipelined UNLINK of cached keys"
  lock
  for c in 1 4; do
    # Cache the keys first: deleting a present key is the real work.
    redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$c" -P 64 -n "$n" -r "$n" -q \
      SET "bench:__rand_int__" cached >/dev/null 9>&-
    out="$(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$c" -P 64 -n "$n" -r "$n" -q \
      UNLINK "bench:__rand_int__" 2>&1 9>&- | tr '\r' '\n' | grep 'requests per second' | tail -n 1)"
    rps="$(sed -n 's/.*: \([0-9.]*\) requests per second.*/\1/p' <<<"$out")"
    [ -n "$rps" ] || die "redis-benchmark said: $out"
    record sink "$c" "$rps"
  done
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --scan --pattern 'bench:*' | xargs -r -n 1000 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" UNLINK >/dev/null
  unlock
}

# -------------------------------------------------------------- latency
LIVE_SLOT=evictd_bench_live
# The hand-written reference a team assembles in an afternoon: pg_recvlogical
# with test_decoding, sed picking each changed product's id (the new tuple's
# under REPLICA IDENTITY FULL, which prints the old row first), redis-cli
# deleting its key, one command and one round trip at a time. It deletes only
# the key evictd-load watches (evictd resolves every cache of the graph), and
# reports its position every second (-s 1) so that evictd-load's settling,
# which waits for every slot, does not wait 10 s. START_SCRIPT SLOT: sets EPID
# (a process group: stop it with stop_group).
start_script() {
  create_slot "$1" test_decoding
  setsid bash -c "pg_recvlogical -d '$url' --slot '$1' --start -F 0 -s 1 -f - \
    | sed -u -n 's/^table shop\\.products: [A-Z]*:.* id\\[bigint\\]:\\([0-9]*\\).*/UNLINK product:{\\1}:detail/p' \
    | redis-cli -h 127.0.0.1 -p $REDIS_PORT >/dev/null" 9>&- &
  EPID=$!; PIDS+=("$EPID")
}
stop_group() { kill -TERM -- "-$1" 2>/dev/null; wait "$1" 2>/dev/null || true; }

# Each round runs every rate with evictd, then with the script (alternating
# which goes first), each on a slot of its own created for the round: the
# two are measured on the same machine minutes apart, never at once. The
# script does not run unthrottled (rate 0): its rate there is its own.
section_latency() {
  local r rate before after out kinds=(evictd script) order kind slot pid cpu hwm
  lock
  for r in $(seq 1 "$RUNS"); do
    order=("${kinds[@]:$(( (r - 1) % 2 ))}" "${kinds[@]:0:$(( (r - 1) % 2 ))}")
    for kind in "${order[@]}"; do
      slot="${LIVE_SLOT}_${kind}_$r"
      if [ "$kind" = evictd ]; then
        start_evictd "$EVICTD" "$slot"; pid=$EPID
        wait_streaming "$pid" "$slot" "$WORK/$slot.log"
      else
        start_script "$slot"; pid=$EPID
        wait_streaming "$pid" "$slot" /dev/null
      fi
      for rate in "${RATES[@]}"; do
        [ "$kind" = script ] && [ "$rate" = 0 ] && continue
        before="$(cpu_s "$pid")"
        out="$("$LOAD" --pg "$url" --redis "$redis_url" --rate "$rate" --seconds "$LOAD_SECONDS" \
          --writers "$WRITERS" --per-tx "$PER_TX" --rows "$ROWS" 9>&-)"
        cpu=""; hwm=""
        if [ "$kind" = evictd ]; then
          after="$(cpu_s "$pid")"; cpu="$(python3 -c "print(round($after - $before, 2))")"; hwm="$(hwm_mib "$pid")"
        fi
        record latency "$rate" "$out" "$cpu" "$hwm" "$kind"
        note "latency: round $r, $kind, rate $rate: $out"
      done
      if [ "$kind" = evictd ]; then stop_pid "$pid"; else stop_group "$pid"; fi
      # Nothing else may consume (or keep WAL for) the next runs.
      drop_slot_now "$slot"
    done
  done
  unlock
}

# --------------------------------------------------------------- writes
section_writes() {
  local r kinds=(evictd recv none) order kind slot pid tps lag
  note "writes: pgbench ${WRITE_SECONDS}s each: evictd / pg_recvlogical / no slot, $RUNS rounds"
  lock
  for r in $(seq 1 "$RUNS"); do
    order=("${kinds[@]:$(( (r - 1) % 3 ))}" "${kinds[@]:0:$(( (r - 1) % 3 ))}")
    for kind in "${order[@]}"; do
      slot="evictd_bench_w${kind}_$r"; pid=""
      psql -X -q "$url" -c CHECKPOINT 9>&-   # no checkpoint in the middle of one run only
      case "$kind" in
        evictd)
          start_evictd "$EVICTD" "$slot"; pid=$EPID
          wait_streaming "$pid" "$slot" "$WORK/$slot.log" ;;
        recv)
          create_slot "$slot"
          pg_recvlogical -d "$url" --slot "$slot" --start --plugin pgoutput \
            -o proto_version=1 -o "publication_names=$PUB" -F 0 -f /dev/null 9>&- &
          pid=$!; PIDS+=("$pid")
          wait_streaming "$pid" "$slot" /dev/null ;;
      esac
      tps="$(pgbench -n -f "$WORK/update.sql" -c "$WRITERS" -j 2 -T "$WRITE_SECONDS" "$url" 2>&1 9>&- \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p')"
      [ -n "$tps" ] || die "pgbench printed no tps"
      lag=""
      if [ "$kind" = evictd ]; then   # how far behind the writes evictd ended, and when it caught up
        local endw t0; endw="$(q "SELECT pg_current_wal_lsn()")"; t0=$(now_ns)
        until slot_reached "$slot" "$endw"; do sleep 0.02; done
        lag=$(ms_since "$t0")
      fi
      [ -n "$pid" ] && stop_pid "$pid"
      [ "$kind" = none ] || drop_slot_now "$slot"
      record writes "$kind" "$tps" "$lag"
      note "writes: round $r, $kind: $tps tps${lag:+ (evictd caught up $lag ms after the writes stopped)}"
    done
  done
  unlock
}

# -------------------------------------------------------------- restart
section_restart() {
  local r out t0 pid
  lock
  start_evictd "$EVICTD" "$LIVE_SLOT"; LIVE_PID=$EPID
  wait_streaming "$LIVE_PID" "$LIVE_SLOT" "$WORK/$LIVE_SLOT.log"
  for r in $(seq 1 "$RUNS"); do
    stop_pid "$LIVE_PID"
    start_evictd "$EVICTD" "$LIVE_SLOT"; LIVE_PID=$EPID; t0=$EPID_START
    out="$("$LOAD" --pg "$url" --redis "$redis_url" --once --drain-seconds 30 9>&-)"
    record restart "$t0" "$out" "$(hwm_mib "$LIVE_PID")"
    note "restart: round $r: $out (process start at $t0 ns)"
    wait_streaming "$LIVE_PID" "$LIVE_SLOT" "$WORK/$LIVE_SLOT.log"
  done
  stop_pid "$LIVE_PID"; LIVE_PID=""
  drop_slot_now "$LIVE_SLOT"
  unlock
}

# ------------------------------------------------------------- callgrind
# Instructions per change, the repeatable figure (valgrind counts them; the
# machine's noise does not move it): evictd under callgrind drains a small
# backlog, then a large one, each from a slot of its own created just before
# its backlog is written (so that each sees only its own); the difference of
# the totals over the difference of the changes is the per-change cost, with
# start-up and connection set-up cancelled out.
section_callgrind() {
  local n small=${BENCH_CALLGRIND_SMALL:-2000} large=${BENCH_CALLGRIND_CHANGES:-20000} slot pid ir changes
  lock
  for n in "$small" "$large"; do
    slot="evictd_bench_callgrind_$n"
    create_slot "$slot"
    write_backlog "$n"; changes=$BACKLOG_CHANGES
    config "$slot" "$WORK/$slot.toml" "$STATUS_MS"
    EPID_START=$(now_ns)
    valgrind --tool=callgrind --callgrind-out-file="$WORK/$slot.callgrind" \
      "$EVICTD" run --config "$WORK/$slot.toml" 2>"$WORK/$slot.log" 9>&- &
    pid=$!; PIDS+=("$pid")
    until slot_reached "$slot" "$BACKLOG_END"; do
      kill -0 "$pid" 2>/dev/null || { cat "$WORK/$slot.log" >&2; die "evictd under callgrind exited"; }
      sleep 0.05
    done
    stop_pid "$pid"
    ir="$(sed -n 's/^\(summary\|totals\): \([0-9]*\).*/\2/p' "$WORK/$slot.callgrind" | head -n 1)"
    [ -n "$ir" ] || die "no instruction total in $WORK/$slot.callgrind"
    record callgrind "$changes" "$ir" "$(ms_since "$EPID_START")"
    note "callgrind: $changes changes: $ir instructions"
    drop_slot_now "$slot"
  done
  unlock
}

# ---------------------------------------------------------------- kafka
section_kafka() {
  local r kinds=(postgres kafka) order kind t0 first end pid n count kafka_end name out before written watcher windows=() bytes
  kafka_stack
  for r in $(seq 1 "$RUNS"); do create_slot "evictd_bench_kpg_$r"; done
  lock
  note "kafka: writing $KAFKA_CHANGES single-row UPDATE transactions; Debezium streams them into $DBZ_TOPIC"
  t0=$(now_ns)
  write_backlog "$KAFKA_CHANGES"
  n=$BACKLOG_CHANGES; written=$(ms_since "$t0")
  read -r count kafka_end bytes < <(kafka_tool count "$DBZ_TOPIC" --at-least "$n" --timeout-s 400) \
    || die "the topic did not get the $n changes (Debezium log: $DBZ_STATE_DIR/debezium.log)"
  record kafka_set "$n" "$count" "$written" "$(ms_since "$t0")" "$bytes"
  note "kafka: $count messages in $DBZ_TOPIC (offsets end at $kafka_end) $(ms_since "$t0") ms after the writes began"

  for r in $(seq 1 "$RUNS"); do
    order=("${kinds[@]:$(( (r - 1) % 2 ))}" "${kinds[@]:0:$(( (r - 1) % 2 ))}")
    for kind in "${order[@]}"; do
      if [ "$kind" = postgres ]; then
        name="evictd_bench_kpg_$r"
        start_evictd "$EVICTD" "$name" "$STATUS_MS"; pid=$EPID; t0=$EPID_START
        first=$(first_change_ms "$pid" "$t0")
        until slot_reached "$name" "$BACKLOG_END"; do
          kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "evictd exited while draining"; }
          sleep 0.02
        done
        end=$(now_ns)
      else
        name="evictd_bench_kafka_drain_$r"
        # The watcher (a python start-up) first, so that it does not run
        # during the drain; it prints "watching" once it is ready.
        kafka_tool committed "$name" "$DBZ_TOPIC" --at-least "$kafka_end" --timeout-s 300 >"$WORK/$name.done" &
        watcher=$!; PIDS+=("$watcher")
        until [ -s "$WORK/$name.done" ]; do kill -0 "$watcher" 2>/dev/null || die "kafka_tool committed failed"; sleep 0.02; done
        start_evictd_kafka "$EVICTD" "$name" earliest "$STATUS_MS"; pid=$EPID; t0=$EPID_START
        first=$(first_change_ms "$pid" "$t0")
        wait "$watcher" || { cat "$WORK/$name.log" >&2; die "the group $name did not commit the end of $DBZ_TOPIC"; }
        end=$(sed -n 2p "$WORK/$name.done")
      fi
      record kafka_drain "$kind" "$(( (end - t0) / 1000000 ))" "$first" "$(cpu_s "$pid")" "$(hwm_mib "$pid")" \
        "$(metric_sum "$METRICS_PORT" evictd_changes_received_total)"
      note "kafka: drain round $r, $kind: $n changes in $(( (end - t0) / 1000000 )) ms, the first after $first ms"
      stop_pid "$pid"
      [ "$kind" = postgres ] && drop_slot_now "$name"
    done
  done

  for r in $(seq 1 "$RUNS"); do
    order=("${kinds[@]:$(( r % 2 ))}" "${kinds[@]:0:$(( r % 2 ))}")
    for kind in "${order[@]}"; do
      if [ "$kind" = postgres ]; then
        name="evictd_bench_kpg_live_$r"
        start_evictd "$EVICTD" "$name"; pid=$EPID
        wait_streaming "$pid" "$name" "$WORK/$name.log"
      else
        # From the end of the topic: what the Postgres rounds left there is not ours.
        name="evictd_bench_kafka_live_$r"
        start_evictd_kafka "$EVICTD" "$name" latest; pid=$EPID
        wait_kafka_settled "$pid" "$WORK/$name.log"
      fi
      before="$(cpu_s "$pid")"; t0=$(now_ns)
      out="$("$LOAD" --pg "$url" --redis "$redis_url" --rate "$KAFKA_RATE" --seconds "$LOAD_SECONDS" \
        --writers "$WRITERS" --rows "$ROWS" 9>&-)"
      [ "$kind" = kafka ] && windows+=(--window "$((t0 / 1000000)):$(($(now_ns) / 1000000))")
      record kafka_latency "$kind" "$KAFKA_RATE" "$out" "$(python3 -c "print(round($(cpu_s "$pid") - $before, 2))")" "$(hwm_mib "$pid")"
      note "kafka: latency round $r, $kind: $out"
      stop_pid "$pid"
      [ "$kind" = postgres ] && drop_slot_now "$name"
    done
  done
  unlock
  # Debezium's share of the Kafka path's latency, from the records themselves.
  record kafka_debezium_delay "$(kafka_tool delay "$DBZ_TOPIC" "${windows[@]}")"
}
# newtopic: a table's first change, on a topic that did not exist when
# evictd subscribed with topic_pattern, at evictd's default client
# settings: Debezium creates the topic with the table's first event, evictd
# has to discover it (a metadata refresh) and be assigned it (a rebalance).
# Each round creates a new table in Debezium's publication (FOR ALL TABLES),
# fills its row's key in Redis and inserts the row; the figure is commit →
# key gone. BENCH_NEWTOPIC_PROPERTIES adds librdkafka properties (lines of
# `"name" = "value"`) to compare settings.
section_newtopic() {
  local r pid t0 key graph="$WORK/newtopic-graph.toml" name="evictd_bench_newtopic" gone
  [ -n "${kafka_brokers:-}" ] || kafka_stack
  : >"$graph"
  for r in $(seq 1 "$RUNS"); do
    psql -X -q -v ON_ERROR_STOP=1 "$url" -c "DROP TABLE IF EXISTS shop.bench_newtopic_$r" 9>&- 2>/dev/null
    cat >>"$graph" <<TOML
[tables."shop.bench_newtopic_$r"]
key = ["id"]
columns = ["id", "v"]
[caches.bench_newtopic_$r]
key = "bench:newtopic:$r:{id}"
[[caches.bench_newtopic_$r.depends]]
table = "shop.bench_newtopic_$r"
TOML
  done
  # A topic under the pattern exists before evictd starts: it joins and is assigned.
  q "UPDATE shop.products SET name = name WHERE id = 1 RETURNING 1" >/dev/null
  kafka_tool count "$DBZ_TOPIC" --at-least 1 --timeout-s 120 >/dev/null || die "no event on $DBZ_TOPIC"
  BENCH_GRAPH="$graph" write_evictd_toml "$WORK/$name.toml" <<TOML
[source]
kind = "kafka"
[source.kafka]
brokers = "$kafka_brokers"
group_id = "$name"
topic_pattern = '^$DBZ_PREFIX\.shop\..*'
[source.kafka.properties]
"fetch.wait.max.ms" = "${BENCH_KAFKA_FETCH_WAIT_MS:-10}"
${BENCH_NEWTOPIC_PROPERTIES:-}
[dead_letter]
topic = "$DBZ_PREFIX.dead-letters"
TOML
  kafka_tool commit-end "$name" "$DBZ_TOPIC" >/dev/null || die "cannot commit $name at the end of $DBZ_TOPIC"
  launch_evictd "$EVICTD" "$name"; pid=$EPID
  wait_kafka_settled "$pid" "$WORK/$name.log"
  lock
  for r in $(seq 1 "$RUNS"); do
    key="bench:newtopic:$r:1"
    psql -X -q -v ON_ERROR_STOP=1 "$url" 9>&- \
      -c "CREATE TABLE shop.bench_newtopic_$r (id bigint PRIMARY KEY, v text)" \
      -c "ALTER TABLE shop.bench_newtopic_$r REPLICA IDENTITY FULL"
    redis-cli -p "$REDIS_PORT" SET "$key" filled >/dev/null
    t0=$(now_ns)
    q "INSERT INTO shop.bench_newtopic_$r VALUES (1, 'first') RETURNING 1" >/dev/null
    gone=""
    for _ in $(seq 1 12000); do
      [ "$(redis-cli -p "$REDIS_PORT" EXISTS "$key")" = 0 ] && { gone=$(ms_since "$t0"); break; }
      kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "evictd (kafka) exited"; }
      sleep 0.01
    done
    [ -n "$gone" ] || die "the first change of shop.bench_newtopic_$r was not invalidated within 120 s (log: $WORK/$name.log)"
    record newtopic "$r" "$gone"
    note "newtopic: round $r: a new table's first change invalidated $gone ms after its commit"
  done
  unlock
  stop_pid "$pid"
}
# wait_kafka_settled PID LOG: partitions assigned, and nothing read for 0.5 s
# ("latest" is the broker's high watermark, which can be short of the end).
wait_kafka_settled() {
  local seen last=-1
  for _ in $(seq 1 600); do
    kill -0 "$1" 2>/dev/null || { cat "$2" >&2; die "evictd (kafka) exited"; }
    if [ "$(metric_sum "$METRICS_PORT" evictd_kafka_rebalances_total 'kind="assign"')" != 0 ]; then
      seen="$(metric_sum "$METRICS_PORT" evictd_kafka_messages_total)"
      [ "$seen" = "$last" ] && return 0
      last=$seen
    fi
    sleep 0.5
  done
  die "evictd (kafka) got no partition in 300 s"
}

for s in $SECTIONS; do
  case "$s" in
    drain|callgrind|sink|latency|writes|restart|kafka|newtopic) "section_$s" ;;
    *) die "unknown section $s (drain callgrind sink latency writes restart kafka newtopic)" ;;
  esac
  psql -X -q "$url" -c "VACUUM shop.products" 9>&-
done

python3 "$ROOT/scripts/lib/bench-report.py" "$RESULTS" "$RUNS" "$WRITERS" "$PER_TX" "$LOAD_SECONDS" "$WRITE_SECONDS" \
  "$(nproc)" "${BEFORE:+before}"
