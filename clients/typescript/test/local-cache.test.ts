import assert from "node:assert/strict";
import { test } from "node:test";

import { LocalCache, LocalTtlError, type Message, step } from "../src/index.js";

function deferred<T>() {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

test("one loader per key: concurrent getOrLoad share one load", async () => {
  const cache = new LocalCache<string>({ maxEntries: 10, ttlMs: 10_000 });
  const d = deferred<string>();
  let calls = 0;
  const load = () => {
    calls += 1;
    return d.promise;
  };
  const all = Promise.all([cache.getOrLoad("c", "k", load), cache.getOrLoad("c", "k", load), cache.getOrLoad("c", "k", load)]);
  d.resolve("v");
  assert.deepEqual(await all, ["v", "v", "v"]);
  assert.equal(calls, 1);
  assert.equal(await cache.getOrLoad("c", "k", load), "v");
  assert.equal(cache.metrics.hits, 1);
  assert.equal(cache.metrics.loads, 1);
});

for (const [what, invalidate] of [
  ["its key", (c: LocalCache<string>) => c.dropKey("k")],
  ["one of its tags", (c: LocalCache<string>) => c.dropTag("t")],
  ["its cache", (c: LocalCache<string>) => c.dropCache("c")],
  ["everything", (c: LocalCache<string>) => c.clear()],
] as const) {
  test(`a load raced by an invalidation of ${what} is served but not stored`, async () => {
    const cache = new LocalCache<string>({ maxEntries: 10, ttlMs: 10_000 });
    const d = deferred<string>();
    const first = cache.getOrLoad("c", "k", () => d.promise, { tags: ["t"] });
    invalidate(cache);
    // A caller after the invalidation does not join the raced load.
    const second = cache.getOrLoad("c", "k", async () => "fresh", { tags: ["t"] });
    d.resolve("stale");
    assert.equal(await first, "stale");
    assert.equal(await second, "fresh");
    assert.equal(cache.get("k"), "fresh");
    assert.equal(cache.metrics.fillsRejected, 1);
  });
}

test("an invalidation of something else does not reject a load", async () => {
  const cache = new LocalCache<string>({ maxEntries: 10, ttlMs: 10_000 });
  const d = deferred<string>();
  const p = cache.getOrLoad("c", "k", () => d.promise, { tags: ["t"] });
  cache.dropKey("other");
  cache.dropTag("u");
  cache.dropCache("d");
  d.resolve("v");
  await p;
  assert.equal(cache.get("k"), "v");
});

test("drops by key, tag and cache remove exactly those entries", () => {
  const cache = new LocalCache<number>({ maxEntries: 10, ttlMs: 10_000 });
  cache.set("a", "a1", 1, { tags: ["x"] });
  cache.set("a", "a2", 2);
  cache.set("b", "b1", 3, { tags: ["x", "y"] });
  cache.set("b", "b2", 4);
  cache.registerTags("b2", ["z"]);
  assert.equal(cache.dropTag("x"), 2);
  assert.equal(cache.get("a1"), undefined);
  assert.equal(cache.get("b1"), undefined);
  assert.equal(cache.dropTag("z"), 1);
  assert.equal(cache.dropCache("a"), 1);
  assert.equal(cache.size, 0);
});

test("the bound evicts the least recently used entry", () => {
  const cache = new LocalCache<number>({ maxEntries: 2, ttlMs: 10_000 });
  cache.set("c", "k1", 1);
  cache.set("c", "k2", 2);
  cache.get("k1");
  cache.set("c", "k3", 3);
  assert.equal(cache.size, 2);
  assert.equal(cache.get("k2"), undefined);
  assert.equal(cache.get("k1"), 1);
});

test("TTLs are jittered within ttl..ttl+jitter and expire", () => {
  let now = 1_000;
  const cache = new LocalCache<number>({ maxEntries: 1000, ttlMs: 100, jitterMs: 50, now: () => now });
  for (let i = 0; i < 200; i += 1) cache.set("c", `k${i}`, i);
  now += 99;
  let alive = 0;
  for (let i = 0; i < 200; i += 1) if (cache.get(`k${i}`) !== undefined) alive += 1;
  assert.equal(alive, 200);
  now += 26;
  alive = 0;
  for (let i = 0; i < 200; i += 1) if (cache.get(`k${i}`) !== undefined) alive += 1;
  assert.ok(alive > 20 && alive < 180, `some but not all expired at ttl + jitter/2: ${alive}`);
  now += 30;
  for (let i = 0; i < 200; i += 1) assert.equal(cache.get(`k${i}`), undefined);
});

test("a local TTL above the Redis TTL is refused once limited (pub/sub transport)", async () => {
  const cache = new LocalCache<number>({ maxEntries: 10, ttlMs: 10_000, jitterMs: 5_000, redisTtlMs: 12_000 });
  assert.throws(() => cache.limitTtl(12_000), LocalTtlError);
  const ok = new LocalCache<number>({ maxEntries: 10, ttlMs: 10_000, jitterMs: 1_000 });
  ok.limitTtl(12_000);
  await assert.rejects(ok.getOrLoad("c", "k", async () => 1, { ttlMs: 11_500 }), LocalTtlError);
  assert.equal(await ok.getOrLoad("c", "k", async () => 1, { ttlMs: 5_000 }), 1);
});

const batch = (epoch: string, seq: bigint): Message => ({
  v: 2, kind: "batch", epoch, seq, caches: [], keys: [], tags: [], flush: [], truncated: false,
});
const heartbeat = (epoch: string, seq: bigint): Message => ({ v: 2, kind: "heartbeat", epoch, seq });

test("the subscriber's decision table of docs/broadcast.md", () => {
  const at = { epoch: "100", last: 105n };
  assert.deepEqual(step(at, batch("100", 106n)), { decision: { action: "apply" }, cursor: { epoch: "100", last: 106n } });
  assert.deepEqual(step(at, batch("100", 105n)).decision, { action: "skip" });
  assert.deepEqual(step(at, batch("100", 90n)), { decision: { action: "skip" }, cursor: at });
  assert.deepEqual(step(at, batch("100", 108n)), { decision: { action: "gap", after: 105n }, cursor: { epoch: "100", last: 108n } });
  assert.deepEqual(step(at, heartbeat("100", 106n)), { decision: { action: "gap", after: 105n }, cursor: { epoch: "100", last: 106n } });
  assert.deepEqual(step(at, heartbeat("100", 105n)).decision, { action: "skip" });
  assert.deepEqual(step(at, batch("200", 201n)), { decision: { action: "flush" }, cursor: { epoch: "200", last: 201n } });
  assert.deepEqual(step(at, heartbeat("200", 250n)).decision, { action: "flush" });
  assert.deepEqual(step(at, { kind: "other-version", v: 3 }), { decision: { action: "flush" }, cursor: at });
  assert.deepEqual(step(at, { kind: "other-kind", v: 2, found: "x" }), { decision: { action: "ignore" }, cursor: at });
  // A channel that had no sequence when the subscriber started: epoch + 1 is the first message.
  const none = { epoch: null, last: null };
  assert.deepEqual(step(none, batch("500", 501n)), { decision: { action: "apply" }, cursor: { epoch: "500", last: 501n } });
  assert.deepEqual(step(none, batch("500", 503n)).decision, { action: "gap", after: 500n });
});
