#!/usr/bin/env bash
# Start a 3-master Redis Cluster (no replicas, no persistence by default) for evictd's
# integration tests.
#
#   REDIS_CLUSTER_PORTS  node ports, 127.0.0.1 only             default "7101 7102 7103"
#   REDIS_CLUSTER_DIR    one sub-directory per node             default /tmp/evictd-redis-cluster-<first port>
#   REDIS_CLUSTER_AOF    1 = append-only file, fsync always     default 0 (no persistence)
#
# Idempotent: nodes this script started are reused; the cluster is created
# only once. Progress goes to stderr; the last line of stdout is a
# comma-separated seed list, e.g.
#   redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103
#
# Notes:
# - Every node also listens on its port + 10000 (the cluster bus), so
#   17101-17103 must be free as well.
# - Each node's nodes.conf keeps the slot map, so stopping and starting the
#   nodes again brings the same cluster back (with no data).
# - `redis-cli --cluster create` refuses nodes that already hold slots or
#   keys; it is only run when the first node knows no other node. To start
#   from scratch: REDIS_CLUSTER_WIPE=1 redis-cluster-stop.sh.
# - After the create, the nodes reach cluster_state:ok one or two seconds
#   apart: this waits for every node, not only the one that was asked.
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" redis-cluster-start   # PORTS DIR
[ "${#PORTS[@]}" -ge 3 ] || die "need at least 3 ports (3 masters)"
for p in "${PORTS[@]}"; do
  is_number "$p" || die "REDIS_CLUSTER_PORTS must be numbers, got '$p'"
done
need_redis

state() { redis-cli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"; }
cluster_ok() { [ "$(state "$1" cluster_state)" = ok ]; }

persistence=()
if [ "${REDIS_CLUSTER_AOF:-0}" = 1 ]; then
  persistence=(--appendonly yes --appendfsync always)
fi
for p in "${PORTS[@]}"; do
  mkdir -p "$DIR/$p"
  redis_ours "$p" "$DIR/$p" && continue
  redis_launch "$p" "$DIR/$p" --cluster-enabled yes \
    --cluster-config-file "$DIR/$p/nodes.conf" --cluster-node-timeout 5000 "${persistence[@]}"
done
for p in "${PORTS[@]}"; do
  up_or_fail 100 "$DIR/$p/redis.log" "node $p did not come up" redis_ping "$p"
done

if ! cluster_ok "${PORTS[0]}" && [ "$(state "${PORTS[0]}" cluster_known_nodes)" = 1 ]; then
  seeds=(); for p in "${PORTS[@]}"; do seeds+=("127.0.0.1:$p"); done
  note "creating cluster ${seeds[*]}"
  redis-cli --cluster create "${seeds[@]}" --cluster-replicas 0 --cluster-yes >"$DIR/create.log" 2>&1 \
    || { cat "$DIR/create.log" >&2; exit 1; }
fi

# Clients must not be pointed at the cluster before every node agrees.
for p in "${PORTS[@]}"; do
  wait_until 200 0.05 cluster_ok "$p" \
    || die "node $p: cluster_state is not ok after 10 s (stale slot map? try REDIS_CLUSTER_WIPE=1 redis-cluster-stop.sh)"
done

out=""; for p in "${PORTS[@]}"; do out="${out:+$out,}redis://127.0.0.1:$p"; done
echo "$out"
