"""evictd's fault drill: a writer commits known rows, evictd replicas
invalidate their keys, and faults are injected on a seeded schedule; at
quiescence every committed row's keys are checked (see workload.py).

    scripts/drill.sh [--profile short|full] [--seed N] [--out docs-table.md]

Phases (the schedule is drawn from the seed before anything starts, and
printed, so a seed replays the same faults in the same order with the same
durations; the interleaving with evictd's own timing is not replayed):

1. kills: SIGKILL of a replica (the active one two times in three),
   one every 1–3 s;
2. every other fault once per round, in a seeded order, each under load:
   a frozen active replica (SIGSTOP, then SIGCONT) with the liveness probe on
   and with it off (only the lock's lease can end it then), a Redis primary
   killed and restarted, the Redis replica promoted without and with the
   durability wait (`wait_replicas = 1`), a Postgres restart (fast) and a
   crash (SIGKILL of the postmaster), partitions of the replication
   connection, of the session connections (the slot's lock, look-ups) and
   of Redis, and the dead-letter database unreachable while a change that
   must be dead-lettered arrives;
3. combined: faults drawn at random and overlapping, several at once;
4. (with --kafka) the Kafka source: kills, a rebalance with a batch in
   flight, broker restart and partition, the dead-letter topic unreachable
   (kafka_phase.py).

Output: one line per fault as it happens, then a Markdown table per fault
kind: injected, commits made in its windows, lost invalidations, p99 and
max staleness (commit → keys invalidated), recovery (the fault's end → every
commit made before it invalidated). Exit status 0 when no invalidation was
lost where the docs promise none, 1 otherwise.
"""

import argparse
import asyncio
import json
import os
import pathlib
import random
import shutil
import signal
import sys
import time

import psycopg

from env import ROOT, Environment
from replicas import Deployment, Replica, metric
from workload import GRAPH, Workload

PROFILES = {
    # kills, rounds of phase 2, seconds of phase 3, writer rate (commits/s), replicas
    "short": dict(kills=12, rounds=1, combined=30, rate=40, fault_seconds=6, freeze_seconds=14),
    "full": dict(kills=110, rounds=2, combined=240, rate=80, fault_seconds=12, freeze_seconds=20),
}

# Faults after which the docs promise no lost invalidation. A Redis failover
# without the durability wait can lose what the old primary confirmed and had
# not yet replicated (docs/redis-layout.md).
MAY_LOSE = {"redis-promotion (no wait)"}

SINGLE_FAULTS = [
    "freeze (probe)",
    "freeze (lease)",
    "redis-restart (no wait)",
    "redis-restart (wait)",
    "redis-promotion (no wait)",
    "redis-promotion (wait)",
    "redis-cluster node restart",
    "postgres-restart",
    "postgres-crash",
    "partition: replication (active)",
    "partition: session (active)",
    "partition: postgres (all)",
    "partition: redis",
    "dead-letter db down",
]

COMBINABLE = ["kill", "freeze (probe)", "redis-restart (no wait)", "postgres-restart",
              "partition: replication (active)", "partition: session (active)", "partition: postgres (all)",
              "partition: redis"]


def schedule(seed, profile):
    """Every fault of the run, drawn from the seed: (phase, kind, params)."""
    rng = random.Random(seed)
    p = PROFILES[profile]
    plan = []
    for _ in range(p["kills"]):
        plan.append(("kills", "kill", dict(wait=round(rng.uniform(1.0, 3.0), 2), active=rng.random() < 2 / 3)))
    for _ in range(p["rounds"]):
        kinds = SINGLE_FAULTS[:]
        rng.shuffle(kinds)
        for kind in kinds:
            # A freeze or an isolated replica lasts past the lock's lease, so
            # that a takeover can show.
            long = kind.startswith("freeze") or kind.endswith("(active)")
            seconds = p["freeze_seconds"] if long else round(
                rng.uniform(0.6, 1.0) * p["fault_seconds"], 1)
            plan.append(("single", kind, dict(seconds=seconds, node=rng.randrange(3))))
    t = 0.0
    while t < p["combined"]:
        t += round(rng.uniform(1.0, 6.0), 1)
        kind = rng.choice(COMBINABLE)
        seconds = round(rng.uniform(1.0, p["fault_seconds"]), 1)
        plan.append(("combined", kind, dict(at=t, seconds=seconds, active=rng.random() < 2 / 3)))
    return plan


SLOT = "evictd_drill"


class Drill:
    def __init__(self, args):
        self.args = args
        self.profile = PROFILES[args.profile]
        self.work = pathlib.Path(args.work)
        self.t0 = time.monotonic()
        self.events = []
        self.windows = []  # (kind, phase, start, end)
        self.notes = []
        self.failures = []

    def log(self, text):
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    # -- set-up ------------------------------------------------------------
    def config(self):
        graph = self.work / "graph"
        graph.mkdir(parents=True, exist_ok=True)
        (graph / "drill.toml").write_text(GRAPH)
        env = self.env
        path = self.work / "evictd.toml"
        path.write_text(f"""
[graph]
paths = ["{graph}"]

[source]
kind = "postgres"

[source.postgres]
url = "{env.evictd_pg_url(0)}"
slot = "{SLOT}"
publication = "evictd_drill"
status_interval_ms = 1000
standby_retry_ms = 500

[dead_letter]
url = "{env.evictd_dead_letter_url()}"
{self.targets_toml()}""")
        return path

    def targets_toml(self):
        """What both sources' replicas share: the run's retry bound, the two
        Redis targets, the server (its port comes from the environment)."""
        env = self.env
        return f"""
[run]
retry_max_ms = 1000

[redis.main]
url = "{env.evictd_redis_url()}"

[redis.cluster]
url = "{env.cluster_url()}"
cluster = true

[server]
listen = "127.0.0.1:0"
heartbeat_timeout_ms = 10000
"""

    def replica_env(self, index, wait_replicas=0):
        return {
            "EVICTD__SERVER__LISTEN": f"127.0.0.1:{self.env.replica_port(index)}",
            "EVICTD__SOURCE__POSTGRES__URL": self.env.evictd_pg_url(index),
            "EVICTD__REDIS__MAIN__WAIT_REPLICAS": str(wait_replicas),
        }

    async def set_wait(self, wait_replicas):
        for r in self.deployment.replicas:
            self.deployment.paused.add(r.index)
            r.stop()
            r.env = self.replica_env(r.index, wait_replicas)
            r.start()
            self.deployment.paused.discard(r.index)
            await asyncio.sleep(1.0)
        await self.deployment.active()

    # -- faults ------------------------------------------------------------
    async def inject(self, phase, kind, params):
        """Injects one fault and records its window. A kind ending in
        `(wait)` runs with the durability wait on (`wait_replicas = 1` on the
        standalone target: a rolling restart before, and one after)."""
        if kind.endswith("(wait)"):
            await self.set_wait(1)
            try:
                await self._inject(phase, kind, params)
            finally:
                await asyncio.sleep(3)
                await self.set_wait(0)
        else:
            await self._inject(phase, kind, params)

    async def _inject(self, phase, kind, params):
        start = time.monotonic()
        detail = ""
        seconds = params.get("seconds", 0)
        if kind == "kill":
            victim = await self.victim(params.get("active", True))
            if victim is None:
                return
            self.deployment.kill(victim)
            detail = victim.name
        elif kind.startswith("freeze"):
            detail = await self.freeze(kind, seconds)
        elif kind.startswith("redis-restart"):
            await asyncio.to_thread(self.env.redis_restart, min(seconds, 3.0))
        elif kind.startswith("redis-promotion"):
            await asyncio.to_thread(self.env.redis_promote, min(seconds, 3.0))
            detail = f"primary now {self.env.primary.port}"
        elif kind == "redis-cluster node restart":
            node = params.get("node", 0)
            await asyncio.to_thread(self.env.cluster_node_restart, node, min(seconds, 3.0))
            detail = f"node {self.env.cluster_ports[node]}"
        elif kind == "postgres-restart":
            await asyncio.to_thread(self.env.pg_stop)
            await asyncio.sleep(min(seconds, 3.0))
            await asyncio.to_thread(self.env.pg_start)
        elif kind == "postgres-crash":
            await asyncio.to_thread(self.env.pg_crash)
            await asyncio.sleep(min(seconds, 2.0))
            await asyncio.to_thread(self.env.pg_start)
        elif kind.startswith("partition: "):
            what = kind.split(": ")[1]
            if what.endswith("(active)"):
                active = await self.deployment.active(limit=10)
                index = active.index if active else 0
                proxies = [self.env.proxies[f"pg-{index}"]]
                cls = what.split()[0]
                detail = f"evictd-{index}"
            elif what == "postgres (all)":
                proxies = [p for name, p in self.env.proxies.items() if name.startswith("pg-")]
                cls = "replication,session"
            else:
                proxies, cls = [self.env.proxies["redis"]], "all"
            for proxy in proxies:
                proxy.command(f"partition {cls}")
            await asyncio.sleep(seconds)
            for proxy in proxies:
                proxy.command("heal")
        elif kind == "dead-letter db down":
            proxy = self.env.proxies["dead_letter"]
            proxy.command("refuse on")
            proxy.command("reset")
            await self.workload.poison()
            await asyncio.sleep(seconds)
            proxy.command("refuse off")
            detail = "one change to dead-letter committed while down"
        end = time.monotonic()
        self.windows.append((kind, phase, start, end))
        self.log(f"{phase}: {kind} {detail} ({end - start:.1f} s)")

    async def victim(self, active):
        if active:
            r = await self.deployment.active(limit=10)
            if r is not None:
                return r
        alive = [r for r in self.deployment.replicas if r.alive()]
        return random.Random(len(self.windows)).choice(alive) if alive else None

    async def slot_walsender(self):
        """The pid of the walsender holding the drill's slot, read on the
        server (not through a replica's proxy); None when none holds it or
        the server cannot be reached."""
        try:
            async with await psycopg.AsyncConnection.connect(
                    self.env.pg_url(), autocommit=True, connect_timeout=2) as conn:
                row = await (await conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                    (SLOT,))).fetchone()
                return row[0] if row else None
        except psycopg.Error:
            return None

    async def freeze(self, kind, seconds):
        """Freezes the active replica (SIGSTOP) for `seconds`, then wakes it.

        What a takeover must guarantee is judged on the server: once another
        replica holds the slot, the woken one must not stream or acknowledge
        on it again, so the slot's walsender after the wake must be the one
        the new holder started. The woken process may still read what its
        walsender had sent into the socket before the new holder ended it,
        apply those changes (again: the new holder applies them too, and the
        effects are idempotent) and count them as acknowledged locally
        (`evictd_position_acknowledged_bytes`); that status update goes to
        the ended walsender's closed connection, so it never reaches the
        server. The note reports that local figure; it is not the
        criterion."""
        probe = kind == "freeze (probe)"
        active = await self.deployment.active(limit=20)
        if active is None:
            return "no active replica"
        self.deployment.probing = probe
        probe_kills = self.deployment.liveness_kills
        process = active.proc
        acknowledged = await metric(active.port, "evictd_position_acknowledged_bytes")
        frozen_at = time.monotonic()
        active.freeze()
        takeover = None
        holder = None
        while time.monotonic() - frozen_at < seconds:
            await asyncio.sleep(0.2)
            if takeover is None:
                roles = await self.deployment.roles()
                if any(role == "active" for i, role in roles.items() if i != active.index):
                    takeover = time.monotonic() - frozen_at
            else:
                # The last holder seen before the wake: the new active's
                # walsender, once it has ended the frozen one's.
                holder = await self.slot_walsender() or holder
        # The same process wakes up, unless the probe (or, in the combined
        # phase, another fault) killed it meanwhile.
        woke = self.deployment.liveness_kills == probe_kills and active.proc is process and active.alive()
        active.thaw()
        self.deployment.probing = True
        role_after = None
        acknowledged_after = None
        holder_after = None
        if woke:
            await asyncio.sleep(3)
            if active.proc is process:
                role_after = (await self.deployment.roles()).get(active.index)
                acknowledged_after = await metric(active.port, "evictd_position_acknowledged_bytes")
                holder_after = await self.slot_walsender()
        how = ("the liveness probe killed it" if self.deployment.liveness_kills != probe_kills
               else "another fault killed it") if not woke else (
            "another replica took over (the lock's lease)" if takeover else "nothing until SIGCONT")
        note = (f"{kind}: {active.name} frozen {seconds:.0f} s; standby active after "
                f"{takeover:.1f} s" if takeover else f"{kind}: {active.name} frozen {seconds:.0f} s; no takeover")
        note += f"; ended by: {how}"
        if woke:
            note += f"; 3 s after SIGCONT it reports {role_after or 'nothing (restarting)'}"
            if acknowledged is not None and acknowledged_after is not None:
                moved = acknowledged_after - acknowledged
                note += (", acknowledged nothing since the freeze" if moved == 0 else
                         f", counted {moved:.0f} bytes more as acknowledged locally (what its walsender sent before it was ended)")
            if takeover:
                note += f"; the slot's walsender: pid {holder} after the takeover, pid {holder_after} after the wake"
                if role_after == "active":
                    self.failures.append(f"{kind}: the woken replica reports active after a takeover")
                if holder is not None and holder_after != holder:
                    self.failures.append(
                        f"{kind}: the slot's walsender changed after the woken replica resumed "
                        f"(pid {holder} -> {holder_after}): the woken replica streamed on the slot again")
        self.notes.append(note)
        return note

    # -- run ---------------------------------------------------------------
    async def run(self):
        plan = schedule(self.args.seed, self.args.profile)
        self.log(f"seed {self.args.seed}, profile {self.args.profile}: {len(plan)} faults")
        for phase, kind, params in plan:
            if phase != "kills":
                self.log(f"  plan: {phase} {kind} {json.dumps(params)}")
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.env = Environment(self.work, self.args.base, self.log)
        try:
            self.env.start()
            return await self._run(plan)
        finally:
            if hasattr(self, "deployment"):
                await self.deployment.stop()
            if hasattr(self, "workload"):
                await self.workload.close()
            if hasattr(self, "kafka_env") and not self.args.keep:
                await asyncio.to_thread(self.kafka_env.stop)
            if not self.args.keep:
                self.env.stop()

    async def _run(self, plan):
        self.workload = Workload(self.env, self.profile["rate"], self.args.seed, self.log)
        await self.workload.setup()
        config = self.config()
        replicas = [Replica(i, self.args.evictd, config, self.env.replica_port(i), self.work, self.replica_env(i))
                    for i in range(2)]
        self.deployment = Deployment(replicas, self.events)
        self.deployment.start()
        if await self.deployment.active(limit=60) is None:
            raise RuntimeError(f"no replica became active; see {self.work}/evictd-*.log")
        self.workload.start()
        await asyncio.sleep(3)
        self.log("phase 1: kills")
        for phase, kind, params in plan:
            if phase == "kills":
                await asyncio.sleep(params["wait"])
                await self.inject(phase, kind, params)
        self.log("phase 2: each fault alone")
        for phase, kind, params in plan:
            if phase == "single":
                await asyncio.sleep(3)
                await self.inject(phase, kind, params)
        self.log("phase 3: combined")
        begin = time.monotonic()
        tasks = []
        for phase, kind, params in plan:
            if phase == "combined":
                delay = begin + params["at"] - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self.inject(phase, kind, params)))
        await asyncio.gather(*tasks)
        await asyncio.sleep(3)
        if self.args.kafka:
            from kafka_phase import run_kafka_phase
            await run_kafka_phase(self)
        self.log("quiescence: writer stopped, waiting for every pending commit")
        await self.workload.stop_writing()
        lost = await self.workload.quiesce(limit=120)
        # Dead letters: (source, found, expected).
        if hasattr(self, "kafka_env"):
            kafka_expected = self.workload.poison_commits - self.pg_poison + getattr(self, "kafka_bad_messages", 0)
            dead = [("postgres", self.pg_dead_letters, self.pg_poison),
                    ("kafka", await asyncio.to_thread(self.kafka_env.dead_letters), kafka_expected)]
        else:
            dead = [("postgres", await self.workload.dead_letters(), self.workload.poison_commits)]
        self.lost_details = {c.row: await self.workload.describe(c) for c in lost[:20]}
        checker_sees_a_loss = await self.workload.self_test()
        self.log(f"checker self-test: a planted stale copy is {'reported' if checker_sees_a_loss else 'MISSED'}")
        return self.report(lost, dead) if checker_sees_a_loss else 1

    # -- report ------------------------------------------------------------
    def deployments(self):
        return [d for d in (getattr(self, "pg_deployment", None), self.deployment) if d is not None]

    def kills(self):
        return sum(d.kills for d in self.deployments())

    def liveness_kills(self):
        return sum(d.liveness_kills for d in self.deployments())

    def restarts(self):
        return sum(d.restarts for d in self.deployments())

    def report(self, lost, dead_letters):
        w = self.workload
        commits = w.done + lost
        rows = []
        kinds = []
        for kind, *_ in self.windows:
            if kind not in kinds:
                kinds.append(kind)
        failed = False
        for kind in kinds:
            for phase in ("kills", "single", "combined", "kafka"):
                windows = [(s, e) for k, p, s, e in self.windows if k == kind and p == phase]
                if not windows:
                    continue
                inside = [c for c in commits if any(s <= c.at <= e + 1.0 for s, e in windows)]
                stale = sorted(c.done_at - c.at for c in inside if c.done_at is not None)
                lost_here = [c for c in inside if c.done_at is None]
                recovery = []
                for s, e in windows:
                    before = [c for c in commits if c.at <= e]
                    if any(c.done_at is None for c in before):
                        continue
                    last = max((c.done_at for c in before), default=e)
                    recovery.append(max(0.0, last - e))
                rows.append((kind, phase, len(windows), len(inside), len(lost_here), pct(stale, 0.99),
                             max(stale, default=0.0), pct(sorted(recovery), 0.5), max(recovery, default=0.0)))
        stale_all = sorted(c.done_at - c.at for c in w.done)
        lines = [
            f"Seed {self.args.seed}, profile `{self.args.profile}`: {w.commits} commits "
            f"({w.ambiguous} with an ambiguous end, settled by reading the row back), "
            f"{len(lost)} lost, staleness p50 {fmt(pct(stale_all, 0.5))} p99 {fmt(pct(stale_all, 0.99))} "
            f"max {fmt(max(stale_all, default=0.0))}; {self.kills()} SIGKILLs by the drill, "
            f"{self.liveness_kills()} by the liveness probe, {self.restarts()} restarts; "
            "dead letters " + ", ".join(f"{src} {found} of {expected}" for src, found, expected in dead_letters)
            + " that must be dead-lettered; "
            f"{time.monotonic() - self.t0:.0f} s in all.",
            "",
            "| fault | phase | injected | commits in its windows | lost | p99 staleness | max staleness "
            "| recovery p50 | recovery max |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for kind, phase, n, inside, lost_n, p99, mx, r50, rmax in rows:
            mark = " (allowed)" if lost_n and kind in MAY_LOSE else ""
            if lost_n and kind not in MAY_LOSE:
                failed = True
            lines.append(f"| {kind} | {phase} | {n} | {inside} | {lost_n}{mark} | {fmt(p99)} | {fmt(mx)} "
                         f"| {fmt(r50)} | {fmt(rmax)} |")
        if lost and any(not any(s <= c.at <= e + 1.0 for k, _, s, e in self.windows if k in MAY_LOSE) for c in lost):
            failed = True
        if self.failures:
            failed = True
            lines.append("")
            lines.extend(f"FAILED: {f}" for f in self.failures)
        for src, found, expected in dead_letters:
            if found < expected:
                failed = True
                lines.append(f"\nMISSING DEAD LETTERS ({src}): {found} of {expected}")
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        for c in lost[:20]:
            lines.append(f"- LOST: row {c.row}, commit at {c.at - self.t0:.1f} s, bound {c.bound:X}: "
                         f"{self.lost_details.get(c.row, '')}")
        text = "\n".join(lines)
        print("\n" + text, flush=True)
        if self.args.out:
            pathlib.Path(self.args.out).write_text(text + "\n")
        return 1 if failed else 0


def pct(sorted_values, q):
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def fmt(seconds):
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def main():
    parser = argparse.ArgumentParser(description="evictd's fault drill")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--work", default="/tmp/evictd-drill")
    # Below the kernel's ephemeral range (32768-60999 by default), so that no
    # client socket holds one of them when a server needs it.
    parser.add_argument("--base", type=int, default=26000,
                        help="first of the 40 ports used; the Cluster uses base-11000… (and its bus +10000)")
    parser.add_argument("--evictd", default=str(ROOT / "target" / "debug" / "evictd"))
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--kafka", action="store_true", help="also drill the Kafka source")
    parser.add_argument("--kafka-storage", choices=["memory", "s3"], default="memory",
                        help="the broker's storage: memory (a broker restart is emulated at its proxy) or s3 "
                             "(a real restart; moto's S3 server falls behind at the drill's rate)")
    parser.add_argument("--keep", action="store_true", help="leave the services running")
    args = parser.parse_args()
    # SIGTERM (a CI timeout) stops the drill as Ctrl-C does: through the
    # `finally` that stops every service it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    drill = Drill(args)
    loop_status = asyncio.run(drill.run())
    sys.exit(loop_status)


if __name__ == "__main__":
    main()
