/**
 * The names and value formats of the Redis keys evictd writes and
 * applications read (`docs/redis-layout.md`; the Rust side is
 * `src/layout.rs`). Pure: no I/O.
 *
 * - versions (version keys of `bump` caches, namespace keys) are unsigned
 *   64-bit integers in canonical decimal: they are `bigint` here, never
 *   `number` (above 2^53 a double cannot tell two versions apart);
 * - values read under a namespace are stamped `<ns>|<payload>`;
 * - a key's fill-guard stamp lives in the key's own Cluster slot
 *   (`evictd:guard:K` when `K` has a hash tag, else `evictd:guard:{K}`).
 */

/** Bytes or text; text is UTF-8. */
export type Bytes = string | Uint8Array;

export const NAMESPACE_PREFIX = "evictd:ns:";
export const TAG_PREFIX = "evictd:tag:";
export const GUARD_PREFIX = "evictd:guard:";

/** The largest version (u64::MAX). */
export const MAX_VERSION = (1n << 64n) - 1n;

export function toBuffer(bytes: Bytes): Buffer {
  if (typeof bytes === "string") return Buffer.from(bytes, "utf8");
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** The namespace version key of a cache: `evictd:ns:<cache>`. */
export function namespaceKey(cache: string): string {
  return NAMESPACE_PREFIX + cache;
}

/** The registry of a tag: `evictd:tag:{<tag>}` (the tag is its hash tag). */
export function tagKey(tag: string): string {
  return `${TAG_PREFIX}{${tag}}`;
}

/** Whether Redis Cluster hashes `key` on a hash tag: a `{`, later a `}`, something between. */
function hasHashTag(key: Buffer): boolean {
  const open = key.indexOf(0x7b);
  if (open < 0) return false;
  const close = key.indexOf(0x7d, open + 1);
  return close > open + 1;
}

/** The fill-guard stamp key of a cache key (bytes, as the key may be binary). */
export function guardKey(key: Bytes): Buffer {
  const k = toBuffer(key);
  const prefix = Buffer.from(GUARD_PREFIX);
  if (hasHashTag(k)) return Buffer.concat([prefix, k]);
  return Buffer.concat([prefix, Buffer.from("{"), k, Buffer.from("}")]);
}

/**
 * Whether {@link guardKey}`(key)` hashes to `key`'s Cluster slot. It does
 * unless `key` has no hash tag and contains a `}` (or is empty): such keys
 * cannot be guarded on a Cluster; evictd invalidates them without a stamp,
 * and readers fill them unguarded.
 */
export function guardInSlot(key: Bytes): boolean {
  const k = toBuffer(key);
  return hasHashTag(k) || (k.length > 0 && !k.includes(0x7d));
}

/** The data key of a `bump` cache's version: `<version key>:v<version>`. */
export function versionedKey(key: string, version: bigint): string {
  return `${key}:v${version.toString()}`;
}

/** Reads a stored version (ASCII digits, leading zeros tolerated, at most u64::MAX); `null` for anything else. */
export function parseVersion(stored: Bytes): bigint | null {
  const text = typeof stored === "string" ? stored : toBuffer(stored).toString("latin1");
  if (!/^[0-9]+$/.test(text)) return null;
  const v = BigInt(text);
  return v <= MAX_VERSION ? v : null;
}

/** A value stamped with the namespace version read before the database: `<ns>|<payload>`. */
export function stamp(namespace: bigint, payload: Bytes): Buffer {
  return Buffer.concat([Buffer.from(`${namespace.toString()}|`), toBuffer(payload)]);
}

/** The payload of a stamped value written under `namespace`; `null` is a miss. */
export function unstamp(value: Bytes, namespace: bigint): Buffer | null {
  const v = toBuffer(value);
  const bar = v.indexOf(0x7c);
  if (bar < 0) return null;
  const ns = parseVersion(v.subarray(0, bar));
  return ns !== null && ns === namespace ? v.subarray(bar + 1) : null;
}
