#!/usr/bin/env bash
# Stop the nodes started by redis-cluster-start.sh, by their pid files.
#   REDIS_CLUSTER_PORTS / REDIS_CLUSTER_DIR  same defaults as redis-cluster-start.sh
#   REDIS_CLUSTER_WIPE=1                     also delete the directory (forgets the slot map)
# All nodes are signalled first and then awaited together: a Redis process
# can take 1-2 s to exit after SIGTERM on these VMs, so one node at a time
# would take three times as long.
set -euo pipefail
LOG_PREFIX=redis-cluster-stop; LOG_ERROR=""
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
read -r -a PORTS <<<"${REDIS_CLUSTER_PORTS:-7101 7102 7103}"
DIR="${REDIS_CLUSTER_DIR:-/tmp/evictd-redis-cluster-${PORTS[0]}}"
pids=()
for p in "${PORTS[@]}"; do
  if pid="$(live_pid "$DIR/$p/redis.pid")"; then
    kill "$pid"; pids+=("$pid")
  else
    note "node $p not running"
  fi
done
for pid in ${pids[@]+"${pids[@]}"}; do
  wait_gone "$pid" 200 0.05 || { note "$pid still alive after 10 s, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
done
if [ "${REDIS_CLUSTER_WIPE:-0}" = 1 ]; then rm -rf -- "$DIR"; fi
