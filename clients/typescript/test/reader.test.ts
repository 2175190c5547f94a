import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import type { Cluster, Redis } from "ioredis";

import {
  type RedisClient,
  VersionError,
  beginFill,
  fill,
  guardInSlot,
  guardKey,
  namespaceKey,
  namespaceVersion,
  parseVersion,
  read,
  readThrough,
  readVersion,
  register,
  stamp,
  tagKey,
  unstamp,
  versionedKey,
} from "../src/index.js";
import { connect, connectCluster, unique } from "./support.js";

test("layout names, versions and namespace stamps match the Rust layout", () => {
  assert.equal(guardKey("user:{42}:profile").toString(), "evictd:guard:user:{42}:profile");
  assert.equal(guardKey("user:42").toString(), "evictd:guard:{user:42}");
  assert.equal(tagKey("user:42"), "evictd:tag:{user:42}");
  assert.equal(namespaceKey("product_detail"), "evictd:ns:product_detail");
  assert.equal(versionedKey("product:{42}:prices", 7n), "product:{42}:prices:v7");
  for (const key of ["user:{42}:profile", "user:42:profile", "{x}", "x{", "p:{{a}}", "q?a=1&b=2", "x}{y}"]) assert.ok(guardInSlot(key), key);
  for (const key of ["product:{}:x", "a}b", "{}{a}", "m}", ""]) assert.ok(!guardInSlot(key), key);
  assert.equal(parseVersion("18446744073709551615"), 18446744073709551615n);
  assert.equal(parseVersion("0042"), 42n);
  assert.equal(parseVersion("18446744073709551616"), null);
  assert.equal(parseVersion("-1"), null);
  assert.equal(parseVersion(""), null);
  const value = stamp(17n, '{"a":1|2}');
  assert.equal(value.toString(), '17|{"a":1|2}');
  assert.equal(unstamp(value, 17n)?.toString(), '{"a":1|2}');
  assert.equal(unstamp(value, 18n), null);
  assert.equal(unstamp("no stamp", 0n), null);
  assert.equal(unstamp("018446744073709551615|x", 18446744073709551615n)?.toString(), "x");
});

function readerSuite(name: string, open: () => Promise<RedisClient>, keyOf: (base: string) => string): void {
  describe(name, () => {
    let redis: RedisClient;
    before(async () => {
      redis = await open();
    });
    after(async () => {
      await (redis as Redis | Cluster).quit();
    });

    test("a miss takes a stamp, a fill with it is stored, a read then hits", async () => {
      const key = keyOf(unique("rd"));
      const first = await read(redis, key, 60_000);
      assert.equal(first.hit, false);
      assert.ok(!first.hit && /^r[0-9]+\.[0-9]+$/.test(first.stamp.toString()), "a reader's stamp is r<secs>.<usecs>");
      // The same stamp until someone changes it.
      assert.equal((await beginFill(redis, key)).toString(), !first.hit ? first.stamp.toString() : "");
      assert.equal(await fill(redis, key, !first.hit ? first.stamp : "", Buffer.from([0, 255, 1]), 60_000), true);
      const second = await read(redis, key);
      assert.ok(second.hit && second.value.equals(Buffer.from([0, 255, 1])));
      const pttl = await redis.pttl(key);
      assert.ok(pttl > 0 && pttl <= 60_000, `ttl ${pttl}`);
    });

    test("a fill is refused once evictd replaced the stamp (an invalidation after the stamp)", async () => {
      const key = keyOf(unique("inv"));
      const taken = await beginFill(redis, key);
      // What evictd does before invalidating the key: SET <guard> i<version>.<nonce> XX PX.
      assert.equal(await redis.set(guardKey(key), "i17.00000000000000ab", "PX", 60_000, "XX"), "OK");
      await redis.unlink(key);
      assert.equal(await fill(redis, key, taken, "old", 60_000), false);
      assert.equal(await redis.exists(key), 0);
      // A reader that starts after the invalidation takes evictd's stamp and fills.
      const fresh = await read(redis, key);
      assert.ok(!fresh.hit && fresh.stamp.toString() === "i17.00000000000000ab");
      assert.equal(await fill(redis, key, fresh.stamp, "new", 0), true);
      assert.equal(await redis.pttl(key), -1);
    });

    test("a stamp that expired fails the fill, never passes it", async () => {
      const key = keyOf(unique("exp"));
      const taken = await beginFill(redis, key, 20);
      await new Promise((r) => setTimeout(r, 60));
      assert.equal(await fill(redis, key, taken, "v", 1_000), false);
    });

    test("register scores the key with its expiry and gives the registry one; a second one changes the score", async () => {
      const key = keyOf(unique("tagged"));
      const tags = [unique("t1"), unique("t2")];
      const before = Date.now();
      await register(redis, key, tags, 30_000);
      for (const tag of tags) {
        const score = Number(await redis.zscore(tagKey(tag), key));
        assert.ok(score >= before + 30_000 && score <= Date.now() + 30_000, `score ${score}`);
        const pttl = await redis.pttl(tagKey(tag));
        assert.ok(pttl > 29_000 && pttl <= 30_001, `registry ttl ${pttl}`);
      }
      const first = await redis.zscore(tagKey(tags[0] ?? ""), key);
      await register(redis, key, tags.slice(0, 1), 1_000);
      const again = await redis.zscore(tagKey(tags[0] ?? ""), key);
      assert.notEqual(again, first, "every registration changes the score");
      assert.ok(Number(again) > Number(first));
    });

    test("versions: missing is 0, canonical decimal is read exactly, anything else is an error", async () => {
      const key = keyOf(unique("ver"));
      assert.equal(await readVersion(redis, key), 0n);
      await redis.set(key, "18446744073709551615");
      assert.equal(await readVersion(redis, key), 18446744073709551615n);
      await redis.set(key, "not a version");
      await assert.rejects(readVersion(redis, key), VersionError);
    });

    test("readThrough: stamp, register, load, fill under the namespace; a namespace bump makes it a miss", async () => {
      const cache = unique("cache");
      const key = keyOf(unique("rt"));
      const tag = unique("tag");
      let loads = 0;
      const load = async () => {
        loads += 1;
        // The registration happened before the database read.
        assert.notEqual(await redis.zscore(tagKey(tag), key), null);
        return `value ${loads}`;
      };
      const one = await readThrough(redis, { key, load, ttlMs: 10_000, namespace: cache, tags: [tag] });
      assert.deepEqual([one.value.toString(), one.hit, one.cached], ["value 1", false, true]);
      assert.equal((await redis.get(key)) ?? "", "0|value 1");
      const two = await readThrough(redis, { key, load, ttlMs: 10_000, namespace: cache, tags: [tag] });
      assert.deepEqual([two.value.toString(), two.hit], ["value 1", true]);
      await redis.set(namespaceKey(cache), "5");
      assert.equal(await namespaceVersion(redis, cache), 5n);
      const three = await readThrough(redis, { key, load, ttlMs: 10_000, namespace: cache, tags: [tag] });
      assert.deepEqual([three.value.toString(), three.hit, three.cached], ["value 2", false, true]);
      assert.equal((await redis.get(key)) ?? "", "5|value 2");
      await redis.unlink(namespaceKey(cache));
    });

    test("readThrough serves but does not cache what an invalidation raced", async () => {
      const key = keyOf(unique("race"));
      const out = await readThrough(redis, {
        key,
        ttlMs: 10_000,
        load: async () => {
          await redis.set(guardKey(key), "i99.0000000000000001", "PX", 60_000, "XX");
          return "stale";
        },
      });
      assert.deepEqual([out.value.toString(), out.cached], ["stale", false]);
      assert.equal(await redis.exists(key), 0);
    });
  });
}

readerSuite("reader helpers on a standalone Redis", () => connect(), (base) => `${base}:profile`);
readerSuite("reader helpers on a Redis Cluster", () => connectCluster(), (base) => `user:{${base}}:profile`);

test("on a Cluster, a guard key hashes to its key's slot", async () => {
  const cluster = await connectCluster();
  try {
    for (const key of ["user:{42}:profile", "user:42:profile", "x{", "p:{{a}}", "q?a=1&b=2"]) {
      const [a, b] = await Promise.all([cluster.cluster("KEYSLOT", key), cluster.cluster("KEYSLOT", guardKey(key).toString())]);
      assert.equal(a, b, key);
    }
  } finally {
    await cluster.quit();
  }
});
