#!/usr/bin/env bash
# Stop the nodes started by redis-cluster-start.sh, by their pid files.
#   REDIS_CLUSTER_PORTS / REDIS_CLUSTER_DIR  same defaults as redis-cluster-start.sh
#   REDIS_CLUSTER_WIPE=1                     also delete the directory (forgets the slot map)
# All nodes are signalled first and then awaited together: a Redis process
# can take 1-2 s to exit after SIGTERM on these VMs, so one node at a time
# would take three times as long.
set -euo pipefail
read -r -a PORTS <<<"${REDIS_CLUSTER_PORTS:-7101 7102 7103}"
DIR="${REDIS_CLUSTER_DIR:-/tmp/evictd-redis-cluster-${PORTS[0]}}"
pids=()
for p in "${PORTS[@]}"; do
  pidfile="$DIR/$p/redis.pid"
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    pid="$(cat "$pidfile")"; kill "$pid"; pids+=("$pid")
  else
    echo "redis-cluster-stop: node $p not running" >&2
  fi
done
for pid in ${pids[@]+"${pids[@]}"}; do
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "redis-cluster-stop: $pid still alive after 10 s, sending SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
  fi
done
if [ "${REDIS_CLUSTER_WIPE:-0}" = 1 ]; then rm -rf -- "$DIR"; fi
