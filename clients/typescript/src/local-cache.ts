/**
 * An in-process cache of values whose Redis keys evictd invalidates, kept
 * fresh by a {@link Subscriber} (`docs/broadcast.md`).
 *
 * Entries are named by their **Redis key** (for a `bump` cache: the version
 * key, which is what evictd's messages name) and belong to a **cache** (the
 * graph's cache name, what `flush` names); an entry may be registered under
 * tags (the local tag index).
 *
 * Invariants:
 * - one loader per key at a time (single flight): concurrent `getOrLoad`s of
 *   a key share one load;
 * - a load's result is **not stored** when an invalidation of its key, of one
 *   of its tags, or of its cache (or of everything) arrived after the load
 *   started (the local twin of the fill guard); callers still get the value;
 *   a caller arriving after that invalidation starts a new load;
 * - at most `maxEntries` entries (least recently used go first); every entry
 *   expires after its TTL plus a uniform random jitter.
 */

import { Metrics } from "./metrics.js";

export interface LocalCacheOptions {
  /** The bound, in entries. */
  readonly maxEntries: number;
  /** Default time to live of an entry. */
  readonly ttlMs: number;
  /** Added to every TTL: uniform in `0..=jitterMs` (default 0), so entries of a burst do not expire together. */
  readonly jitterMs?: number;
  /**
   * The TTL of the Redis keys behind this cache. On the pub/sub-only
   * transport a subscriber refuses a local TTL (plus jitter) longer than it:
   * a lost message must not keep a local value past the Redis one.
   */
  readonly redisTtlMs?: number;
  /** The clock (ms); for tests. */
  readonly now?: () => number;
  readonly metrics?: Metrics;
}

export interface LoadOptions {
  /** Tags the key is registered under (in Redis with `register`, and here). */
  readonly tags?: Iterable<string>;
  /** This entry's TTL (default: the cache's `ttlMs`). */
  readonly ttlMs?: number;
}

interface Entry<V> {
  readonly cache: string;
  readonly value: V;
  readonly expiresAt: number;
  readonly tags: readonly string[];
}

interface Flight<V> {
  readonly key: string;
  readonly cache: string;
  readonly tags: ReadonlySet<string>;
  invalidated: boolean;
  promise?: Promise<V>;
}

/** A local TTL the subscriber's transport cannot keep safe. */
export class LocalTtlError extends Error {
  override readonly name = "LocalTtlError";
}

export class LocalCache<V = unknown> {
  readonly metrics: Metrics;
  readonly maxEntries: number;
  readonly ttlMs: number;
  readonly jitterMs: number;
  readonly redisTtlMs: number | undefined;
  private readonly now: () => number;
  private readonly entries = new Map<string, Entry<V>>();
  private readonly byCache = new Map<string, Set<string>>();
  private readonly byTag = new Map<string, Set<string>>();
  /** Loads that callers may still join, by key. */
  private readonly joinable = new Map<string, Flight<V>>();
  /** Every load in progress. */
  private readonly flights = new Set<Flight<V>>();
  /** Set when a pub/sub-only subscriber attaches: TTLs above `redisTtlMs` are refused. */
  private ttlLimitMs: number | undefined;

  constructor(options: LocalCacheOptions) {
    if (!(options.maxEntries > 0)) throw new RangeError("maxEntries must be positive");
    if (!(options.ttlMs > 0)) throw new RangeError("ttlMs must be positive");
    this.maxEntries = options.maxEntries;
    this.ttlMs = options.ttlMs;
    this.jitterMs = options.jitterMs ?? 0;
    this.redisTtlMs = options.redisTtlMs;
    this.now = options.now ?? Date.now;
    this.metrics = options.metrics ?? new Metrics();
  }

  /** Number of entries (expired ones included until touched). */
  get size(): number {
    return this.entries.size;
  }

  /**
   * Called by a pub/sub-only subscriber: from now on, a TTL (plus jitter)
   * above `limitMs` is refused with {@link LocalTtlError}.
   */
  limitTtl(limitMs: number): void {
    if (this.ttlMs + this.jitterMs > limitMs) {
      throw new LocalTtlError(
        `local TTL ${this.ttlMs} ms + jitter ${this.jitterMs} ms is longer than the Redis TTL ${limitMs} ms: refused on the pub/sub transport (a lost message would outlive the Redis value); use the stream transport or a shorter local TTL`,
      );
    }
    this.ttlLimitMs = limitMs;
  }

  /** Whether `key` has a live entry; unlike {@link get}, counts nothing and keeps the LRU order. */
  has(key: string): boolean {
    const entry = this.entries.get(key);
    return entry !== undefined && entry.expiresAt > this.now();
  }

  /** The value of `key`, if present and not expired. */
  get(key: string): V | undefined {
    const entry = this.entries.get(key);
    if (entry === undefined || entry.expiresAt <= this.now()) {
      if (entry !== undefined) this.remove(key);
      this.metrics.misses += 1;
      return undefined;
    }
    // Least recently used goes first: move to the end.
    this.entries.delete(key);
    this.entries.set(key, entry);
    this.metrics.hits += 1;
    return entry.value;
  }

  /**
   * The value of `key` in `cache`; on a miss, `load()` runs (once for all
   * concurrent callers of the key) and its value is stored unless an
   * invalidation of the key, its tags or its cache arrived meanwhile.
   */
  async getOrLoad(cache: string, key: string, load: () => Promise<V>, options: LoadOptions = {}): Promise<V> {
    const ttl = options.ttlMs ?? this.ttlMs;
    this.checkTtl(ttl);
    const cached = this.get(key);
    if (cached !== undefined) return cached;
    const joined = this.joinable.get(key);
    if (joined?.promise !== undefined) return joined.promise;
    const flight: Flight<V> = {
      key,
      cache,
      tags: new Set(options.tags ?? []),
      invalidated: false,
    };
    this.joinable.set(key, flight);
    this.flights.add(flight);
    this.metrics.loads += 1;
    flight.promise = (async () => {
      try {
        const value = await load();
        if (flight.invalidated) this.metrics.fillsRejected += 1;
        else this.put(cache, key, value, ttl, flight.tags);
        return value;
      } finally {
        this.flights.delete(flight);
        if (this.joinable.get(key) === flight) this.joinable.delete(key);
      }
    })();
    return flight.promise;
  }

  /** Stores `value` (no invalidation check: for values the caller knows are fresh). */
  set(cache: string, key: string, value: V, options: { tags?: Iterable<string>; ttlMs?: number } = {}): void {
    const ttl = options.ttlMs ?? this.ttlMs;
    this.checkTtl(ttl);
    this.put(cache, key, value, ttl, new Set(options.tags ?? []));
  }

  /** Adds `tags` to the local tag index of an existing entry (the application registered them in Redis). */
  registerTags(key: string, tags: Iterable<string>): void {
    const entry = this.entries.get(key);
    if (entry === undefined) return;
    const all = new Set(entry.tags);
    for (const tag of tags) all.add(tag);
    this.entries.set(key, { ...entry, tags: [...all] });
    for (const tag of all) index(this.byTag, tag, key);
  }

  /** Drops `key`; rejects a load of it in progress. Returns the entries dropped. */
  dropKey(key: string): number {
    const flight = this.joinable.get(key);
    if (flight !== undefined) this.invalidate(flight);
    return this.remove(key) ? 1 : 0;
  }

  /** Drops every entry registered under `tag`; rejects loads under it. */
  dropTag(tag: string): number {
    for (const flight of this.flights) if (flight.tags.has(tag)) this.invalidate(flight);
    return this.removeAll(this.byTag.get(tag));
  }

  /** Drops every entry registered under any tag; rejects loads with tags. */
  dropTagged(): number {
    for (const flight of this.flights) if (flight.tags.size > 0) this.invalidate(flight);
    let n = 0;
    for (const keys of [...this.byTag.values()]) n += this.removeAll(keys);
    return n;
  }

  /** Drops every entry of `cache`; rejects its loads. */
  dropCache(cache: string): number {
    for (const flight of this.flights) if (flight.cache === cache) this.invalidate(flight);
    return this.removeAll(this.byCache.get(cache));
  }

  /** Drops everything; rejects every load in progress. */
  clear(): number {
    for (const flight of this.flights) this.invalidate(flight);
    const n = this.entries.size;
    this.entries.clear();
    this.byCache.clear();
    this.byTag.clear();
    return n;
  }

  private checkTtl(ttl: number): void {
    if (this.ttlLimitMs !== undefined && ttl + this.jitterMs > this.ttlLimitMs) {
      throw new LocalTtlError(`local TTL ${ttl} ms + jitter ${this.jitterMs} ms is longer than the Redis TTL ${this.ttlLimitMs} ms (pub/sub transport)`);
    }
  }

  private invalidate(flight: Flight<V>): void {
    flight.invalidated = true;
    if (this.joinable.get(flight.key) === flight) this.joinable.delete(flight.key);
  }

  private put(cache: string, key: string, value: V, ttl: number, tags: ReadonlySet<string>): void {
    this.remove(key);
    const jitter = this.jitterMs > 0 ? Math.random() * this.jitterMs : 0;
    this.entries.set(key, { cache, value, expiresAt: this.now() + ttl + jitter, tags: [...tags] });
    index(this.byCache, cache, key);
    for (const tag of tags) index(this.byTag, tag, key);
    while (this.entries.size > this.maxEntries) {
      const oldest = this.entries.keys().next();
      if (oldest.done === true) break;
      this.remove(oldest.value);
    }
  }

  private removeAll(keys: Set<string> | undefined): number {
    if (keys === undefined) return 0;
    let n = 0;
    for (const key of [...keys]) if (this.remove(key)) n += 1;
    return n;
  }

  private remove(key: string): boolean {
    const entry = this.entries.get(key);
    if (entry === undefined) return false;
    this.entries.delete(key);
    unindex(this.byCache, entry.cache, key);
    for (const tag of entry.tags) unindex(this.byTag, tag, key);
    return true;
  }
}

function index(map: Map<string, Set<string>>, name: string, key: string): void {
  let keys = map.get(name);
  if (keys === undefined) {
    keys = new Set();
    map.set(name, keys);
  }
  keys.add(key);
}

function unindex(map: Map<string, Set<string>>, name: string, key: string): void {
  const keys = map.get(name);
  if (keys === undefined) return;
  keys.delete(key);
  if (keys.size === 0) map.delete(name);
}
