"""The drill's Kafka phase: the same writer and checker, with the rows'
changes now reaching evictd through the real Debezium connector and the
Kafka-protocol broker (kafka_env.py), consumed by a group of evictd replicas.

The switch from the Postgres source is done without a gap: Debezium streams
first; the Postgres replicas stop only once every commit made before
Debezium's slot existed is invalidated; from then on the writer takes its
bounds from the clock (the Kafka source versions by commit time), so the
versions also cross from LSNs to microseconds, upwards, as the docs promise.

Faults: SIGKILL of a consumer (its partitions move after
`session.timeout.ms`), a rebalance with batches in flight (a third replica
joins under load, later leaves with SIGTERM), the broker partitioned away,
a broker restart, and the dead-letter destination down while a message that
must be dead-lettered (an undecodable record, and a change whose look-up
fails) arrives.
"""

import asyncio
import random
import time

from kafka_env import KafkaEnv
from replicas import Deployment, Replica

KAFKA_FAULTS = ["rebalance: join", "rebalance: leave", "partition: broker", "broker restart",
                "dead-letter topic down"]


def kafka_plan(seed, profile):
    rng = random.Random(seed * 7919 + 17)
    kills = 4 if profile == "short" else 20
    # Kills further apart than a rebalance takes (session.timeout.ms 6 s,
    # then the join): closer kills keep the group rebalancing and measure
    # the broker's group protocol, not evictd.
    plan = [("kafka", "kill", dict(wait=round(rng.uniform(8.0, 12.0), 1))) for _ in range(kills)]
    rest = KAFKA_FAULTS[2:]
    rng.shuffle(rest)
    seconds = 6 if profile == "short" else 12
    # A join comes before its leave; the others in a seeded order around them.
    order = ["rebalance: join"] + rest[:1] + ["rebalance: leave"] + rest[1:]
    plan += [("kafka", kind, dict(seconds=round(rng.uniform(0.6, 1.0) * seconds, 1))) for kind in order]
    return plan


async def run_kafka_phase(drill):
    log = drill.log
    log("phase 4: the Kafka source (Debezium → broker → evictd group)")
    base = drill.args.base
    kenv = KafkaEnv(drill.work / "kafka", drill.env.pg_url(), [base + 30, base + 31, base + 32, base + 33], log,
                    storage=drill.args.kafka_storage)
    drill.kafka_env = kenv
    await asyncio.to_thread(kenv.start)

    # Every commit made before Debezium streamed must be done by the
    # Postgres replicas before they stop.
    cutoff = time.monotonic()
    deadline = cutoff + 120
    while any(c.at <= cutoff for c in drill.workload.pending.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    stuck = [c for c in drill.workload.pending.values() if c.at <= cutoff]
    if stuck:
        # Reported as lost at the end unless the Kafka replicas still get
        # them: said here, where it happened.
        log(f"kafka: {len(stuck)} commit(s) made before Debezium streamed still pending after 120 s "
            f"(rows {sorted(c.row for c in stuck)[:10]})")
    drill.workload.bound_mode = "time"
    await asyncio.sleep(1.0)  # commits in flight under the old bound end
    await drill.deployment.stop()
    drill.pg_deployment = drill.deployment
    drill.pg_dead_letters = await drill.workload.dead_letters()
    drill.pg_poison = drill.workload.poison_commits

    config = drill.work / "evictd-kafka.toml"
    config.write_text(kafka_config(drill, kenv))
    replicas = [Replica(2 + i, drill.args.evictd, config, drill.env.replica_port(2 + i), drill.work,
                        {"EVICTD__SERVER__LISTEN": f"127.0.0.1:{drill.env.replica_port(2 + i)}"})
                for i in range(3)]
    deployment = Deployment(replicas, drill.events)
    deployment.paused.add(replicas[2].index)  # joins later: the rebalance
    drill.deployment = deployment
    deployment.start()
    # The group's first assignment: wait until the pending commits drain.
    started = time.monotonic()
    stuck_rows = {c.row for c in stuck}
    while time.monotonic() - started < 120:
        waiting = [c for c in drill.workload.pending.values() if c.at <= started and c.row not in stuck_rows]
        if not waiting:
            break
        await asyncio.sleep(0.5)
    log(f"kafka: consuming ({time.monotonic() - started:.1f} s after the replicas started)")

    for phase, kind, params in kafka_plan(drill.args.seed, drill.args.profile):
        if kind == "kill":
            await asyncio.sleep(params["wait"])
        else:
            await asyncio.sleep(3)
        await inject(drill, kenv, deployment, replicas, kind, params)
    await asyncio.sleep(3)


async def inject(drill, kenv, deployment, replicas, kind, params):
    start = time.monotonic()
    seconds = params.get("seconds", 0)
    detail = ""
    if kind == "kill":
        alive = [r for r in replicas if r.alive()]
        victim = random.Random(len(drill.windows)).choice(alive)
        deployment.kill(victim)
        detail = victim.name
    elif kind == "rebalance: join":
        deployment.paused.discard(replicas[2].index)
        replicas[2].start()
        detail = f"{replicas[2].name} joins"
    elif kind == "rebalance: leave":
        deployment.paused.add(replicas[2].index)
        await asyncio.to_thread(replicas[2].stop)
        detail = f"{replicas[2].name} leaves (SIGTERM)"
    elif kind == "partition: broker":
        kenv.partition()
        await asyncio.sleep(seconds)
        kenv.heal()
    elif kind == "broker restart":
        detail = await asyncio.to_thread(kenv.restart_broker, min(seconds, 5.0))
    elif kind == "dead-letter topic down":
        kenv.dead_letter_down()
        await asyncio.to_thread(kenv.inject_bad_message)
        drill.kafka_bad_messages = getattr(drill, "kafka_bad_messages", 0) + 1
        await drill.workload.poison()
        await asyncio.sleep(seconds)
        kenv.dead_letter_up()
        detail = "an undecodable record and a failing look-up arrived while down"
    end = time.monotonic()
    drill.windows.append((kind if kind != "kill" else "kill (kafka consumer)", "kafka", start, end))
    drill.log(f"kafka: {kind} {detail} ({end - start:.1f} s)")


def kafka_config(drill, kenv):
    return f"""
[graph]
paths = ["{drill.work / 'graph'}"]

{kenv.source_toml("evictd-drill")}

[lookup]
url = "{drill.env.pg_url()}"
{drill.targets_toml()}"""
