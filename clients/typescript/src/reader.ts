/**
 * Reading and filling the keys evictd invalidates without racing it
 * (`docs/redis-layout.md`; the Rust twin is `evictd::reader`).
 *
 * The order is the contract: **stamp → register → read the database →
 * fill**. The stamp ({@link read} or {@link beginFill}) is taken before the
 * database read, tags are registered ({@link register}) before it too, and
 * {@link fill} sets the value only if the stamp is unchanged: evictd replaces
 * a key's stamp before every invalidation of the key, so a fill of a value
 * read before a commit that evictd already invalidated is refused.
 *
 * Versions: a `bump` cache's rendered key is a version key ({@link readVersion}),
 * its data lives at {@link versionedKey}; every cache has a namespace version
 * ({@link namespaceVersion}) folded into values with {@link stamp}. Read both
 * **before** the database.
 *
 * Every call runs on one hash slot (the key's, or the tag's), so it works on
 * a Cluster as on a single server.
 */

import { type Bytes, guardKey, namespaceKey, parseVersion, stamp, tagKey, toBuffer, unstamp } from "./layout.js";
import { type RedisClient, runScript } from "./redis.js";
import { FILL_BEGIN_LUA, FILL_LUA, READ_LUA, REGISTER_LUA } from "./scripts.js";

/** evictd's default `fill_guard_ttl_ms`: give stamps the same TTL. */
export const DEFAULT_STAMP_TTL_MS = 60_000;

/** What {@link read} found: the value, or on a miss the stamp to pass to {@link fill}. */
export type ReadResult = { readonly hit: true; readonly value: Buffer } | { readonly hit: false; readonly stamp: Buffer };

/** A key that should hold a version holds something else. */
export class VersionError extends Error {
  override readonly name = "VersionError";
  constructor(readonly key: string) {
    super(`${key} does not hold a version (canonical decimal u64)`);
  }
}

/** Reads `key`; on a miss, also takes its fill-guard stamp, in the same round trip. */
export async function read(redis: RedisClient, key: Bytes, stampTtlMs = DEFAULT_STAMP_TTL_MS): Promise<ReadResult> {
  const reply = (await runScript(redis, READ_LUA, [toBuffer(key), guardKey(key)], [stampTtlMs])) as [number, Buffer];
  const [hit, bytes] = reply;
  return hit === 1 ? { hit: true, value: bytes } : { hit: false, stamp: bytes };
}

/** The key's current fill-guard stamp, created when there is none. Call it before reading the database. */
export async function beginFill(redis: RedisClient, key: Bytes, stampTtlMs = DEFAULT_STAMP_TTL_MS): Promise<Buffer> {
  return (await runScript(redis, FILL_BEGIN_LUA, [guardKey(key)], [stampTtlMs])) as Buffer;
}

/**
 * Sets `key` to `value` (TTL in ms; 0 for none) only if its stamp is still
 * `stampTaken`. `false`: evictd invalidated the key since the stamp was taken
 * (or the stamp expired): nothing was written; serve the value, do not cache it.
 */
export async function fill(redis: RedisClient, key: Bytes, stampTaken: Bytes, value: Bytes, ttlMs: number): Promise<boolean> {
  const reply = await runScript(redis, FILL_LUA, [toBuffer(key), guardKey(key)], [toBuffer(stampTaken), toBuffer(value), ttlMs]);
  return reply === 1;
}

/**
 * Registers `key` under each tag (registry `evictd:tag:{T}`, scored with the
 * key's expiry, now + `ttlMs`), one script per tag on the tag's slot. After
 * the stamp, **before** the database read; then {@link fill} with the same `ttlMs`.
 */
export async function register(redis: RedisClient, key: Bytes, tags: Iterable<string>, ttlMs: number): Promise<void> {
  await registerAt(redis, key, tags, Date.now() + ttlMs);
}

/** {@link register} with the key's expiry given as Unix time in ms. */
export async function registerAt(redis: RedisClient, key: Bytes, tags: Iterable<string>, expireAtMs: number): Promise<void> {
  for (const tag of tags) {
    await runScript(redis, REGISTER_LUA, [tagKey(tag)], [toBuffer(key), Math.trunc(expireAtMs)]);
  }
}

/** The version stored at `key`: a missing key is version 0; anything else throws {@link VersionError}. */
export async function readVersion(redis: RedisClient, key: string): Promise<bigint> {
  const stored = await redis.getBuffer(key);
  if (stored === null) return 0n;
  const version = parseVersion(stored);
  if (version === null) throw new VersionError(key);
  return version;
}

/** The namespace version of a cache (`evictd:ns:<cache>`, missing = 0). */
export async function namespaceVersion(redis: RedisClient, cache: string): Promise<bigint> {
  return readVersion(redis, namespaceKey(cache));
}

/** What {@link readThrough} needs. */
export interface ReadThroughOptions {
  /** The rendered key (for a `bump` cache: the data key, {@link versionedKey}). */
  readonly key: Bytes;
  /** Reads the database. Called at most once, after the stamp and the registrations. */
  readonly load: () => Promise<Bytes>;
  /** TTL of the filled value, and of its tag registrations. */
  readonly ttlMs: number;
  /** The cache's name: its namespace version is read first and stamped into the value. */
  readonly namespace?: string;
  /** Tags to register the key under (between the stamp and the database read). */
  readonly tags?: readonly string[];
  readonly stampTtlMs?: number;
}

/** What {@link readThrough} did. `cached`: a hit, or a fill the guard accepted. */
export interface ReadThroughResult {
  readonly value: Buffer;
  readonly hit: boolean;
  readonly cached: boolean;
}

/**
 * The whole documented read: namespace version, then `READ` (hit, or stamp),
 * then the tag registrations, then `load()`, then the guarded fill. A refused
 * fill still returns what was loaded (`cached: false`).
 */
export async function readThrough(redis: RedisClient, options: ReadThroughOptions): Promise<ReadThroughResult> {
  const stampTtlMs = options.stampTtlMs ?? DEFAULT_STAMP_TTL_MS;
  const ns = options.namespace === undefined ? null : await namespaceVersion(redis, options.namespace);
  const first = await read(redis, options.key, stampTtlMs);
  let taken: Buffer;
  if (first.hit) {
    if (ns === null) return { value: first.value, hit: true, cached: true };
    const payload = unstamp(first.value, ns);
    if (payload !== null) return { value: payload, hit: true, cached: true };
    // Filled under another namespace: a miss.
    taken = await beginFill(redis, options.key, stampTtlMs);
  } else {
    taken = first.stamp;
  }
  if (options.tags !== undefined && options.tags.length > 0) await register(redis, options.key, options.tags, options.ttlMs);
  const value = toBuffer(await options.load());
  const stored = ns === null ? value : stamp(ns, value);
  const cached = await fill(redis, options.key, taken, stored, options.ttlMs);
  return { value, hit: false, cached };
}
