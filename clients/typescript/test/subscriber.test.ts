// The subscriber against a real Redis (and Cluster), fed by the stand-in
// publisher (test/publisher.ts) until evictd publishes format v2 itself.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import type { Cluster, Redis } from "ioredis";

import { LocalCache, LocalTtlError, type RedisClient, Subscriber, type Transport, waitApplied } from "../src/index.js";
import { StandInPublisher } from "./publisher.js";
import { connect, connectCluster, sleep, unique, waitFor } from "./support.js";

let redis: Redis;
before(async () => {
  redis = await connect();
});
after(async () => {
  await redis.quit();
});

interface Setup {
  cache: LocalCache<string>;
  sub: Subscriber;
  pub: StandInPublisher;
  name: string;
}

const open: Subscriber[] = [];
const clients: RedisClient[] = [];
after(async () => {
  for (const s of open) await s.close();
  for (const c of clients) (c as Redis).disconnect();
});

async function setup(transport: Transport, options: { heartbeatMs?: number; client?: RedisClient; redisTtlMs?: number } = {}): Promise<Setup> {
  const name = unique("ts-sub");
  const client = options.client ?? (await connect(name));
  clients.push(client);
  const cache = new LocalCache<string>({ maxEntries: 1000, ttlMs: 60_000, redisTtlMs: options.redisTtlMs ?? 300_000 });
  const pub = new StandInPublisher(redis, unique("chan"));
  // The channel exists before the subscriber (evictd has published before).
  await pub.batch({ caches: ["warmup"], keys: ["warmup"] });
  const sub = await Subscriber.start({ redis: client, cache, channel: pub.keys.channel, transport, heartbeatMs: options.heartbeatMs ?? 60_000 });
  open.push(sub);
  return { cache, sub, pub, name };
}

function fillSome(cache: LocalCache<string>): void {
  cache.set("users", "user:{1}", "u1", { tags: ["team:7"] });
  cache.set("users", "user:{2}", "u2");
  cache.set("feed", "feed:1", "f1");
  cache.set("prices", "price:1", "p1");
}

/** Kills this test's connection(s) whose last command was `cmd`, once there is one. */
async function killClient(name: string, cmd: string): Promise<void> {
  let ids: string[] = [];
  await waitFor(`a ${cmd} connection named ${name}`, async () => {
    const list = (await redis.client("LIST")) as string;
    ids = list
      .split("\n")
      .filter((l) => l.includes(` name=${name} `) && l.includes(` cmd=${cmd} `))
      .map((l) => /id=(\d+)/.exec(l)?.[1] ?? "");
    return ids.length > 0;
  });
  for (const id of ids) await redis.client("KILL", "ID", id);
}

for (const transport of ["pubsub", "stream", "both"] as const) {
  test(`${transport}: a batch drops its keys, the entries under its tags and its flushed caches, once`, async () => {
    const { cache, sub, pub } = await setup(transport);
    fillSome(cache);
    const applied = cache.metrics.invalidationsApplied;
    await pub.batch({ caches: ["users"], keys: ["user:{2}"], tags: ["team:7"], flush: ["feed"] });
    await waitFor("the batch applied", () => cache.metrics.invalidationsApplied === applied + 1);
    assert.equal(cache.get("user:{1}"), undefined);
    assert.equal(cache.get("user:{2}"), undefined);
    assert.equal(cache.get("feed:1"), undefined);
    assert.equal(cache.get("price:1"), "p1");
    await sleep(100);
    assert.equal(cache.metrics.invalidationsApplied, applied + 1, "a message seen on both transports is applied once");
    assert.equal(cache.metrics.gaps, 0);
    assert.equal(cache.metrics.flushes, 0);
    assert.equal(cache.metrics.publishToDrop.count, 1);
    assert.equal(cache.metrics.commitToDrop.count, 1, "commit → drop from the batch's committed_at_ms");
    assert.equal(sub.cursor.last, await redis.get(pub.keys.seq).then((s) => BigInt(s ?? "0")));
  });
}

test("pubsub: a lost message is a gap, repaired through `touched`: only the caches it touched are dropped", async () => {
  const { cache, pub } = await setup("pubsub");
  fillSome(cache);
  await pub.batch({ caches: ["users"], keys: ["user:{9}"] }, "lost");
  await pub.batch({ caches: ["prices"], keys: ["price:2"] });
  await waitFor("the gap repaired", () => cache.metrics.gaps === 1 && cache.metrics.invalidationsApplied >= 1);
  assert.equal(cache.get("user:{1}"), undefined, "users was touched by the lost message: dropped");
  assert.equal(cache.get("user:{2}"), undefined);
  // prices was touched after `last` too (by the message that revealed the
  // gap: `touched` is written before publishing), so the repair drops it.
  assert.equal(cache.get("price:1"), undefined);
  assert.equal(cache.get("feed:1"), "f1", "feed was not touched: kept");
  assert.equal(cache.metrics.flushes, 0);
});

test("pubsub: a lost message with tags drops every tagged entry on repair", async () => {
  const { cache, pub } = await setup("pubsub");
  fillSome(cache);
  await pub.batch({ tags: ["team:9"] }, "lost");
  await pub.heartbeat();
  await waitFor("the heartbeat revealed the gap", () => cache.metrics.gaps === 1);
  assert.equal(cache.get("user:{1}"), undefined);
  assert.equal(cache.get("user:{2}"), "u2");
  assert.equal(cache.get("feed:1"), "f1");
});

test("stream: a dropped connection replays what it missed, with no gap and no flush", async () => {
  const { cache, pub, name } = await setup("stream", { heartbeatMs: 200 });
  fillSome(cache);
  await killClient(name, "xread");
  await pub.batch({ caches: ["users"], keys: ["user:{1}"] });
  await pub.batch({ caches: ["feed"], flush: ["feed"] });
  await waitFor("both replayed", () => cache.get("feed:1") === undefined && cache.metrics.invalidationsApplied >= 2, 10_000);
  assert.equal(cache.get("user:{1}"), undefined);
  assert.equal(cache.get("user:{2}"), "u2");
  assert.equal(cache.metrics.gaps, 0);
  assert.equal(cache.metrics.flushes, 0);
});

test("both: a message pub/sub lost is replayed by the stream, not repaired wholesale", async () => {
  const { cache, pub } = await setup("both");
  fillSome(cache);
  await pub.batch({ caches: ["users"], keys: ["user:{1}"] }, "stream");
  await pub.batch({ caches: ["prices"], keys: ["price:1"] });
  await waitFor("both applied", () => cache.get("price:1") === undefined && cache.get("user:{1}") === undefined);
  assert.equal(cache.get("user:{2}"), "u2");
  assert.equal(cache.metrics.gaps, 0);
});

test("a new epoch (Redis lost the sequence) flushes the whole local cache; a restart of evictd does not", async () => {
  const { cache, sub, pub } = await setup("both");
  fillSome(cache);
  const epoch = sub.cursor.epoch;
  // An evictd restart: same keys, the sequence continues.
  await pub.batch({ caches: ["prices"], keys: ["price:9"] });
  await waitFor("applied", () => sub.cursor.last === BigInt((sub.cursor.epoch ?? "0")) + 2n || cache.metrics.invalidationsApplied >= 1);
  assert.equal(cache.metrics.flushes, 0);
  assert.equal(cache.get("user:{2}"), "u2");
  await pub.loseSequence();
  await sleep(2); // the Redis clock moves on: a new epoch
  await pub.batch({ caches: ["prices"], keys: ["price:9"] });
  await waitFor("flushed", () => cache.metrics.flushes === 1);
  assert.equal(cache.size, 0);
  assert.notEqual(sub.cursor.epoch, epoch);
  // The stream's entries of the old epoch are not read again as new.
  fillSome(cache);
  await pub.batch({ caches: ["prices"], keys: ["price:1"] });
  await waitFor("applied in the new epoch", () => cache.get("price:1") === undefined);
  assert.equal(cache.metrics.flushes, 1);
  assert.equal(cache.get("user:{2}"), "u2");
});

test("an unknown format version flushes everything and keeps reading", async () => {
  const { cache, pub } = await setup("pubsub");
  fillSome(cache);
  await redis.publish(pub.keys.channel, '{"v":3,"whatever":true}');
  await waitFor("flushed", () => cache.metrics.flushes === 1);
  cache.set("prices", "price:1", "p1");
  await pub.batch({ caches: ["prices"], keys: ["price:1"] });
  await waitFor("applied after", () => cache.get("price:1") === undefined);
});

test("pubsub: 3 heartbeats of silence reconnect; they flush only while Redis does not answer", async () => {
  const { cache, pub } = await setup("pubsub", { heartbeatMs: 100 });
  fillSome(cache);
  for (let i = 0; i < 6; i += 1) {
    await pub.heartbeat();
    await sleep(80);
  }
  assert.equal(cache.metrics.flushes, 0);
  // A quiet (or restarting) evictd: Redis answers, nothing was missed.
  await sleep(700);
  assert.equal(cache.metrics.flushes, 0, "silence with Redis answering is no loss");
  assert.equal(cache.get("user:{2}"), "u2");
  // Redis gone: what is missed is unknowable.
  const gone = await connect("evictd-ts-gone");
  const silent = new LocalCache<string>({ maxEntries: 100, ttlMs: 1_000, redisTtlMs: 60_000 });
  open.push(await Subscriber.start({ redis: gone, cache: silent, channel: pub.keys.channel, transport: "pubsub", heartbeatMs: 100 }));
  silent.set("users", "user:{1}", "u1");
  gone.disconnect();
  await waitFor("silence flushed", () => silent.metrics.flushes >= 1, 2_000);
  assert.equal(silent.size, 0);
});

test("both: silence on pub/sub alone does not flush while the stream answers", async () => {
  const { cache } = await setup("both", { heartbeatMs: 100 });
  fillSome(cache);
  await sleep(600);
  assert.equal(cache.metrics.flushes, 0);
  assert.equal(cache.get("user:{2}"), "u2");
});

test("pubsub: a reconnection reads the sequence and repairs what it missed", async () => {
  const { cache, pub, name } = await setup("pubsub");
  fillSome(cache);
  await killClient(name, "subscribe");
  await pub.batch({ caches: ["feed"], flush: ["feed"] }, "lost");
  await waitFor("the gap found after the reconnect", () => cache.metrics.gaps === 1, 10_000);
  assert.equal(cache.get("feed:1"), undefined);
  assert.equal(cache.get("user:{2}"), "u2");
});

test("the pub/sub-only transport refuses a local TTL longer than the Redis TTL", async () => {
  const cache = new LocalCache<string>({ maxEntries: 10, ttlMs: 20_000, redisTtlMs: 10_000 });
  await assert.rejects(Subscriber.start({ redis, cache, channel: unique("chan"), transport: "pubsub" }), LocalTtlError);
  const undeclared = new LocalCache<string>({ maxEntries: 10, ttlMs: 20_000 });
  await assert.rejects(Subscriber.start({ redis, cache: undeclared, channel: unique("chan"), transport: "pubsub" }), LocalTtlError);
});

test("getOrLoad through the subscriber: a load raced by a broadcast invalidation is not kept", async () => {
  const { cache, pub } = await setup("both");
  let release!: () => void;
  const gate = new Promise<void>((r) => {
    release = r;
  });
  const loading = cache.getOrLoad("users", "user:{5}", async () => {
    await gate;
    return "stale";
  });
  await pub.batch({ caches: ["users"], keys: ["user:{5}"] });
  await waitFor("applied", () => cache.metrics.invalidationsApplied >= 1);
  release();
  assert.equal(await loading, "stale");
  assert.equal(cache.get("user:{5}"), undefined);
  assert.equal(cache.metrics.fillsRejected, 1);
});

test("read your writes: the applied hash first, then heartbeats; a timeout says false", async () => {
  const { sub, pub, cache } = await setup("both", { heartbeatMs: 100 });
  await pub.heartbeat("0/100");
  assert.equal(await sub.waitApplied("0/100", 1_000), true);
  const waiting = sub.waitApplied("1/0", 5_000);
  await pub.heartbeat("0/FFFFFFFF");
  await pub.batch({ caches: ["users"], keys: ["user:{1}"], appliedLsn: "1/10", commitLsn: "1/8" });
  assert.equal(await waiting, true);
  assert.equal(await sub.waitApplied("2/0", 150), false);
  assert.equal(await waitApplied(redis, "1/10", 100, { channel: pub.keys.channel }), true);
  assert.equal(await waitApplied(redis, "1/11", 100, { channel: pub.keys.channel }), false);
  // commit → drop, for a commit the application tracks by key (besides
  // the batch's own committed_at_ms)
  const counted = cache.metrics.commitToDrop.count;
  sub.trackCommit({ key: "user:{3}" }, Date.now() - 5);
  await pub.batch({ caches: ["users"], keys: ["user:{3}"] });
  await waitFor("commit → drop recorded", () => cache.metrics.commitToDrop.count === counted + 2);
  assert.ok(cache.metrics.commitToDrop.maxMs >= 5);
});

test("on a Redis Cluster: both transports, a gap repaired, read your writes", async () => {
  const cluster: Cluster = await connectCluster();
  const cpub = new StandInPublisher(cluster, unique("chan"));
  await cpub.batch({ caches: ["warmup"] });
  const cache = new LocalCache<string>({ maxEntries: 100, ttlMs: 60_000 });
  const sub = await Subscriber.start({ redis: cluster, cache, channel: cpub.keys.channel, transport: "both", heartbeatMs: 60_000 });
  try {
    fillSome(cache);
    await cpub.batch({ caches: ["users"], keys: ["user:{2}"] });
    await waitFor("applied on the Cluster", () => cache.get("user:{2}") === undefined);
    await cpub.batch({ caches: ["feed"], flush: ["feed"], appliedLsn: "0/50" }, "stream");
    await waitFor("replayed from the stream", () => cache.get("feed:1") === undefined);
    assert.equal(cache.get("price:1"), "p1");
    assert.equal(await sub.waitApplied("0/50", 1_000), true);
  } finally {
    await sub.close();
    await cluster.quit();
  }
});
