"""The drill's writer and its checker.

The writer commits known rows: before each commit it caches the row's keys
(a stale copy, as an application that read the row a moment earlier would),
then commits `UPDATE drill.items SET v = v + 1` and notes, inside the
transaction, `pg_current_wal_insert_lsn()` — a lower bound of the commit's
LSN. It never writes a row whose previous commit is still pending, so every
surviving key belongs to exactly one commit.

The checker polls every pending commit until each of its keys is
invalidated on both targets (the standalone primary and the Cluster):

- `drill:item:{id}` (delete) and `drill:owner:{id}` (delete, found by a
  look-up): gone, or their cache's namespace version `evictd:ns:<cache>` at
  or past the bound;
- `drill:itemv:{{id}}` (bump): a version at or past the bound (or the
  namespace's).

The time from the commit to that moment is the commit's staleness. What is
still pending at quiescence is a lost invalidation.

Rows `POISON_BASE…` have `divisor = 0`, which the look-up divides by: every
change to one is dead-lettered (a query error for its values), and the
checker counts them in `evictd.dead_letters` instead.
"""

import asyncio
import random
import time

import psycopg
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

ROWS = 2000
POISON_BASE = 1_000_000
POISON_ROWS = 10

CACHES = ("drill_item", "drill_owner", "drill_itemv")

SCHEMA = f"""
CREATE SCHEMA drill;
CREATE TABLE drill.items (id bigint PRIMARY KEY, v bigint NOT NULL, owner bigint NOT NULL,
                          divisor int NOT NULL DEFAULT 1);
ALTER TABLE drill.items REPLICA IDENTITY FULL;
INSERT INTO drill.items SELECT g, 0, g, 1 FROM generate_series(1, {ROWS}) g;
INSERT INTO drill.items SELECT g, 0, g, 0 FROM generate_series({POISON_BASE + 1}, {POISON_BASE + POISON_ROWS}) g;
CREATE PUBLICATION evictd_drill FOR TABLE drill.items;
"""

GRAPH = """
# The fault drill's graph (scripts/drill/): one table, three caches, every
# kind of effect the checker can verify.
[tables."drill.items"]
key = ["id"]
columns = ["id", "v", "owner", "divisor"]

[caches.drill_item]
key = "drill:item:{id}"
[[caches.drill_item.depends]]
table = "drill.items"

[caches.drill_itemv]
key = "drill:itemv:{{{id}}}"
action = "bump"
[[caches.drill_itemv.depends]]
table = "drill.items"

[caches.drill_owner]
key = "drill:owner:{owner}"
[[caches.drill_owner.depends]]
table = "drill.items"
[caches.drill_owner.depends.lookup]
arg = "id"
query = "SELECT owner FROM drill.items WHERE id = ANY($1) AND 1 / divisor >= 0"
"""


def lsn_int(text):
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


class Commit:
    __slots__ = ("row", "bound", "at", "done_at", "expected_v")

    def __init__(self, row, bound, at, expected_v):
        self.row = row
        self.bound = bound
        self.at = at
        self.done_at = None
        self.expected_v = expected_v


class Targets:
    """Direct connections to the current standalone primary and the Cluster."""

    def __init__(self, env):
        self.env = env
        self.port = None
        self.main = None
        self.cluster = None

    async def connect(self):
        if self.port != self.env.primary.port:
            if self.main is not None:
                await self.main.aclose()
            self.port = self.env.primary.port
            self.main = aioredis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)
        if self.cluster is None:
            self.cluster = RedisCluster(host="127.0.0.1", port=self.env.cluster_ports[0], socket_timeout=2)

    def all(self):
        return (self.main, self.cluster)


def keys_of(row):
    return (f"drill:item:{row}", f"drill:owner:{row}", f"drill:itemv:{{{row}}}")


class Workload:
    def __init__(self, env, rate, seed, log):
        self.env = env
        self.rate = rate
        self.rng = random.Random(seed)
        self.log = log
        self.targets = Targets(env)
        self.pending = {}  # row -> Commit
        self.done = []  # Commit
        self.commits = 0
        self.ambiguous = 0
        self.poison_commits = 0
        self.write_errors = 0
        self.running = False
        self._tasks = []
        # How a commit's bound is taken: "lsn" (the Postgres source versions
        # by commit LSN) or "time" (the Kafka source versions by commit time
        # in µs: the bound is the wall clock before COMMIT, in whole ms, as
        # Debezium's `ts_ms` truncates it).
        self.bound_mode = "lsn"

    async def setup(self):
        async with await psycopg.AsyncConnection.connect(self.env.pg_url(), autocommit=True) as conn:
            await conn.execute(SCHEMA)

    def start(self):
        self.running = True
        self._tasks = [asyncio.create_task(self._write_loop()), asyncio.create_task(self._check_loop())]

    async def stop_writing(self):
        self.running = False
        await asyncio.gather(self._tasks[0], return_exceptions=True)

    async def close(self):
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- writer ------------------------------------------------------------
    async def _connect_pg(self):
        while True:
            try:
                return await psycopg.AsyncConnection.connect(self.env.pg_url(), connect_timeout=2)
            except psycopg.Error:
                await asyncio.sleep(0.2)

    async def _write_loop(self):
        conn = await self._connect_pg()
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while self.running:
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = time.monotonic()
            row = self.rng.randint(1, ROWS)
            if row in self.pending:
                continue
            try:
                await self.targets.connect()
                await self._cache_stale_copies(row)
            except Exception:  # noqa: BLE001 - a Redis outage: no stale copy, still commit
                self.write_errors += 1
            try:
                await self._commit(conn, row)
            except psycopg.Error:
                self.write_errors += 1
                conn = await self._reconnect_and_settle(conn, row)

    async def _cache_stale_copies(self, row):
        for client in self.targets.all():
            for key in keys_of(row)[:2]:
                await client.set(key, "stale")

    async def _commit(self, conn, row):
        async with conn.transaction():
            cur = await conn.execute("UPDATE drill.items SET v = v + 1 WHERE id = %s RETURNING v", (row,))
            (v,) = await cur.fetchone()
            cur = await conn.execute("SELECT pg_current_wal_insert_lsn()::text")
            (lsn,) = await cur.fetchone()
            bound = lsn_int(lsn) if self.bound_mode == "lsn" else int(time.time() * 1000) * 1000
            commit = Commit(row, bound, time.monotonic(), v)
            self.pending[row] = commit  # before COMMIT: an ambiguous end is settled below
        self.commits += 1

    async def _reconnect_and_settle(self, conn, row):
        """After an error the commit may or may not have happened: read the
        row back and keep the commit pending only if it did."""
        try:
            await conn.close()
        except Exception:  # noqa: BLE001
            pass
        conn = await self._connect_pg()
        commit = self.pending.get(row)
        if commit is not None and commit.done_at is None:
            try:
                cur = await conn.execute("SELECT v FROM drill.items WHERE id = %s", (row,))
                (v,) = await cur.fetchone()
                await conn.commit()
                if v >= commit.expected_v:
                    self.commits += 1
                    self.ambiguous += 1
                else:
                    del self.pending[row]
            except psycopg.Error:
                pass
        return conn

    async def poison(self):
        """One change the look-up fails on: it must be dead-lettered."""
        row = POISON_BASE + self.rng.randint(1, POISON_ROWS)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.env.pg_url(), autocommit=True) as conn:
                    await conn.execute("UPDATE drill.items SET v = v + 1 WHERE id = %s", (row,))
                self.poison_commits += 1
                return
            except psycopg.Error:
                await asyncio.sleep(0.2)

    async def dead_letters(self):
        try:
            async with await psycopg.AsyncConnection.connect(self.env.pg_url(), autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT count(DISTINCT position) FROM evictd.dead_letters WHERE table_name = 'drill.items'")
                (n,) = await cur.fetchone()
                return n
        except psycopg.Error as e:
            self.log(f"dead letters: {e}")
            return -1

    # -- checker -----------------------------------------------------------
    async def _check_loop(self):
        while True:
            await asyncio.sleep(0.02)
            if not self.pending:
                continue
            try:
                await self.targets.connect()
                await self._check_once()
            except Exception:  # noqa: BLE001 - a Redis outage: look again later
                await asyncio.sleep(0.2)

    async def _invalidated(self, commits):
        """The commits among `commits` whose keys are invalidated on every target."""
        ok = {c.row: True for c in commits}
        for client in self.targets.all():
            pipe = client.pipeline(transaction=False)
            for cache in CACHES:
                pipe.get(f"evictd:ns:{cache}")
            for commit in commits:
                item, owner, version = keys_of(commit.row)
                pipe.exists(item)
                pipe.exists(owner)
                pipe.get(version)
            answers = await pipe.execute()
            ns = {c: int(v) if v else 0 for c, v in zip(CACHES, answers[: len(CACHES)])}
            answers = answers[len(CACHES):]
            for i, commit in enumerate(commits):
                has_item, has_owner, v = answers[3 * i: 3 * i + 3]
                v = int(v) if v else 0
                if has_item and ns["drill_item"] < commit.bound:
                    ok[commit.row] = False
                elif has_owner and ns["drill_owner"] < commit.bound:
                    ok[commit.row] = False
                elif v < commit.bound and ns["drill_itemv"] < commit.bound:
                    ok[commit.row] = False
        return [c for c in commits if ok[c.row]]

    async def _check_once(self):
        commits = list(self.pending.values())
        now = time.monotonic()
        for commit in await self._invalidated(commits):
            commit.done_at = now
            if self.pending.get(commit.row) is commit:
                del self.pending[commit.row]
                self.done.append(commit)

    async def self_test(self):
        """The checker must see a lost invalidation: a stale copy of a row with
        no commit behind it (as if evictd had skipped one) stays pending."""
        row = next(r for r in range(1, ROWS + 1) if r not in self.pending)
        await self.targets.connect()
        await self._cache_stale_copies(row)
        # A bound no version reaches: only the keys' absence could satisfy it.
        planted = Commit(row, 2**63, time.monotonic(), 0)
        self.pending[row] = planted
        await asyncio.sleep(2.0)
        seen = self.pending.get(row) is planted and planted.done_at is None
        del self.pending[row]
        for client in self.targets.all():
            for key in keys_of(row)[:2]:
                await client.delete(key)
        return seen

    async def describe(self, commit):
        """What each target holds for a commit still pending: for a report."""
        item, owner, version = keys_of(commit.row)
        parts = []
        try:
            await self.targets.connect()
            for name, client in zip(("main", "cluster"), self.targets.all()):
                values = [await client.exists(item), await client.exists(owner), await client.get(version)]
                values += [await client.get(f"evictd:ns:{c}") for c in CACHES]
                parts.append(f"{name}: item {values[0]}, owner {values[1]}, version {values[2]}, "
                             f"namespaces {values[3:]}")
        except Exception as e:  # noqa: BLE001 - a report must not fail
            parts.append(f"cannot read: {e}")
        return "; ".join(parts)

    async def quiesce(self, limit):
        """Waits until nothing is pending or `limit` s passed; returns what is left."""
        deadline = time.monotonic() + limit
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return list(self.pending.values())
