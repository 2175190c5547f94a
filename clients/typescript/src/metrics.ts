/**
 * The subscriber's and local cache's counters and latency histograms,
 * plain numbers an application exports to its own metrics system (names
 * follow evictd's: see `toPrometheus`).
 */

/** Upper bounds of the latency buckets, in milliseconds. */
export const LATENCY_BUCKETS_MS: readonly number[] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000];

/** A latency histogram: cumulative-style buckets, plus the last samples for exact percentiles. */
export class Histogram {
  readonly buckets: number[] = LATENCY_BUCKETS_MS.map(() => 0);
  count = 0;
  sumMs = 0;
  maxMs = 0;
  private readonly recent: number[] = [];
  private next = 0;

  constructor(private readonly keep = 10_000) {}

  observe(ms: number): void {
    const v = Math.max(0, ms);
    this.count += 1;
    this.sumMs += v;
    this.maxMs = Math.max(this.maxMs, v);
    LATENCY_BUCKETS_MS.forEach((bound, i) => {
      if (v <= bound) this.buckets[i] = (this.buckets[i] ?? 0) + 1;
    });
    if (this.recent.length < this.keep) this.recent.push(v);
    else this.recent[this.next] = v;
    this.next = (this.next + 1) % this.keep;
  }

  /** The `q` quantile (0..1) of the last samples kept; `undefined` with none. */
  quantile(q: number): number | undefined {
    if (this.recent.length === 0) return undefined;
    const sorted = [...this.recent].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
  }
}

export class Metrics {
  /** `getOrLoad`/`get` served locally. */
  hits = 0;
  /** `getOrLoad`/`get` that found nothing usable locally. */
  misses = 0;
  /** Loader calls (one per key at a time: single flight). */
  loads = 0;
  /** Loaded values not stored because an invalidation of the key, a tag of it, or its cache arrived during the load. */
  fillsRejected = 0;
  /** Batch messages applied. */
  invalidationsApplied = 0;
  /** Local entries dropped by the broadcast. */
  entriesDropped = 0;
  /** Batch messages read from the stream that pub/sub had not delivered (or read on catching up after a reconnect). */
  replays = 0;
  /** Gaps detected (each repaired through the `touched` hash). */
  gaps = 0;
  /** Whole local caches dropped: a new epoch, an unknown format, heartbeat silence. */
  flushes = 0;
  /** Caches dropped by name: `flush` in a message, or a gap repair. */
  cacheFlushes = 0;
  /** Heartbeats received. */
  heartbeats = 0;
  /** Messages that did not parse (logged through `onError`, then skipped). */
  malformed = 0;
  /** evictd's publication → local drop. */
  readonly publishToDrop = new Histogram();
  /** Commit → local drop: from a batch's `committed_at_ms` (one per batch), and for commits passed to `trackCommit`. */
  readonly commitToDrop = new Histogram();

  /** The counters in Prometheus's text format. */
  toPrometheus(prefix = "evictd_client"): string {
    const lines: string[] = [];
    const counter = (name: string, value: number) => lines.push(`# TYPE ${prefix}_${name}_total counter`, `${prefix}_${name}_total ${value}`);
    counter("hits", this.hits);
    counter("misses", this.misses);
    counter("loads", this.loads);
    counter("fills_rejected", this.fillsRejected);
    counter("invalidations_applied", this.invalidationsApplied);
    counter("entries_dropped", this.entriesDropped);
    counter("replays", this.replays);
    counter("gaps", this.gaps);
    counter("flushes", this.flushes);
    counter("cache_flushes", this.cacheFlushes);
    for (const [name, h] of [["publish_to_drop_seconds", this.publishToDrop], ["commit_to_drop_seconds", this.commitToDrop]] as const) {
      lines.push(`# TYPE ${prefix}_${name} histogram`);
      LATENCY_BUCKETS_MS.forEach((bound, i) => lines.push(`${prefix}_${name}_bucket{le="${bound / 1000}"} ${h.buckets[i] ?? 0}`));
      lines.push(`${prefix}_${name}_bucket{le="+Inf"} ${h.count}`, `${prefix}_${name}_sum ${h.sumMs / 1000}`, `${prefix}_${name}_count ${h.count}`);
    }
    return `${lines.join("\n")}\n`;
  }
}
