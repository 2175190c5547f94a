#!/usr/bin/env bash
# Stop the nodes started by redis-cluster-start.sh, by their pid files.
#   REDIS_CLUSTER_PORTS / REDIS_CLUSTER_DIR  same defaults as redis-cluster-start.sh
#   REDIS_CLUSTER_WIPE=1                     also delete the directory (forgets the slot map)
# All nodes are signalled first and then awaited together: a Redis process
# can take 1-2 s to exit after SIGTERM on these VMs, so one node at a time
# would take three times as long.
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" redis-cluster-stop   # PORTS DIR
for p in "${PORTS[@]}"; do
  stop_pidfile "$DIR/$p/redis.pid" "node $p not running"
done
await_stopped
wipe_if REDIS_CLUSTER_WIPE "$DIR"
