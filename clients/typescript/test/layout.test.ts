// tests/vectors/layout.json, the language-neutral specification of the Redis
// names and encodings (stamp keys, namespace stamps, version keys, tag keys),
// run whole from the repository root.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { guardInSlot, guardKey, namespaceKey, parseVersion, stamp, tagKey, unstamp, versionedKey } from "../src/layout.js";
import { type Exact, parseExact } from "./json-exact.js";
import { REPO_ROOT } from "./support.js";

type Case = Record<string, Exact>;
const doc = parseExact(readFileSync(join(REPO_ROOT, "tests/vectors/layout.json"), "utf8")) as Record<string, Case[]>;
const big = (x: Exact | undefined): bigint => BigInt(String(x));
const buf = (x: Exact | undefined): Buffer => Buffer.from(x as string, "utf8");
const show = (c: Case): string => JSON.stringify(c, (_, v: unknown) => (typeof v === "bigint" ? v.toString() : v));

test("guard keys and whether they share the key's slot", () => {
  for (const c of doc.guard ?? []) {
    assert.deepEqual(guardKey(buf(c.key)), buf(c.stamp_key), show(c));
    assert.equal(guardInSlot(buf(c.key)), c.in_slot, show(c));
  }
});

test("namespace stamps and their misses", () => {
  for (const c of doc.stamp ?? []) {
    assert.deepEqual(stamp(big(c.namespace), buf(c.payload)), buf(c.value), show(c));
  }
  for (const c of doc.unstamp ?? []) {
    const want = c.payload === null ? null : buf(c.payload);
    assert.deepEqual(unstamp(buf(c.value), big(c.namespace)), want, show(c));
  }
});

test("version keys as readers parse them", () => {
  for (const c of doc.version ?? []) {
    const want = c.version === null ? null : big(c.version);
    assert.equal(parseVersion(buf(c.stored)), want, show(c));
  }
  for (const c of doc.versioned ?? []) {
    assert.equal(versionedKey(c.key as string, big(c.version)), c.data_key, show(c));
  }
});

test("namespace and tag keys", () => {
  for (const c of doc.namespace ?? []) assert.equal(namespaceKey(c.cache as string), c.key);
  for (const c of doc.tag ?? []) assert.equal(tagKey(c.tag as string), c.key);
});
