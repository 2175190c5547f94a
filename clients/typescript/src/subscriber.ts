/**
 * The subscriber: reads evictd's broadcast (format v2, `docs/broadcast.md`)
 * and drops what it names from a {@link LocalCache}.
 *
 * Transports: `pubsub` (immediate; lost while disconnected; heartbeats),
 * `stream` (`XREAD` from the last entry ID processed: a reconnect replays what
 * it missed), or `both` (the default: pub/sub for speed, the stream for
 * repair). Every message goes through {@link step} in arrival order, one at a
 * time, so the cursor `(epoch, last)` is exact.
 *
 * Invariants:
 * - nothing is skipped silently: a higher `seq` than expected is a gap,
 *   repaired by dropping the caches the `touched` hash shows as invalidated
 *   after `last` (only those); a new epoch drops everything;
 * - on `both`, a pub/sub gap is left to the stream (which replays it) and
 *   repaired from `touched` only if the stream has not caught up by the next
 *   heartbeat; the message itself is dropped at once;
 * - pub/sub silence for 3 × `heartbeatMs` drops everything and reconnects
 *   (on `both` only when the stream is silent too: the stream still replays);
 * - on the pub/sub-only transport, a local TTL above the Redis TTL is refused.
 */

import type { Cluster, Redis } from "ioredis";

import {
  type BatchMessage,
  type ChannelKeys,
  type Cursor,
  DEFAULT_CHANNEL,
  DEFAULT_HEARTBEAT_MS,
  type HeartbeatMessage,
  type Message,
  STREAM_FIELD,
  repairPlan,
  appliedLsn,
  channelKeys,
  parseMessage,
  step,
} from "./broadcast.js";
import { type LocalCache, LocalTtlError } from "./local-cache.js";
import { parseLsn } from "./lsn.js";
import type { RedisClient } from "./redis.js";

export type Transport = "pubsub" | "stream" | "both";

export interface SubscriberOptions {
  /** A connection for commands; the subscriber duplicates it for pub/sub and for blocking stream reads. */
  readonly redis: RedisClient;
  /** The local cache to keep. */
  readonly cache: LocalCache<any>;
  /** evictd's `broadcast_channel` (default `evictd:invalidations`). */
  readonly channel?: string;
  /** Default `both`. Must be one evictd publishes (its `broadcast_transport`). */
  readonly transport?: Transport;
  /** evictd's `broadcast_heartbeat_ms` (default 1000). */
  readonly heartbeatMs?: number;
  /** Longest `XREAD BLOCK` (default `heartbeatMs`). */
  readonly streamBlockMs?: number;
  /** Entries per `XREAD` (default 1000). */
  readonly streamCount?: number;
  /** Errors the subscriber recovers from (connection loss, a malformed message). Default: ignored. */
  readonly onError?: (err: Error) => void;
}

type Via = "pubsub" | "stream";

interface Waiter {
  readonly lsn: bigint;
  readonly resolve: (applied: boolean) => void;
}

const MAX_TRACKED = 100_000;

export class Subscriber {
  readonly keys: ChannelKeys;
  readonly transport: Transport;
  readonly heartbeatMs: number;
  private cursorNow: Cursor = { epoch: null, last: null };
  private readonly redis: RedisClient;
  private readonly cache: LocalCache<any>;
  private readonly onError: (err: Error) => void;
  private readonly streamBlockMs: number;
  private readonly streamCount: number;
  private sub: RedisClient | undefined;
  private streamConn: RedisClient | undefined;
  private closed = false;
  private started = false;
  private queue: Promise<void> = Promise.resolve();
  private readonly early: [string, Via][] = [];
  private lastId = "0-0";
  private resetStream = false;
  private streamReconnected = false;
  private lastPubsubAt = Date.now();
  private lastStreamAt = Date.now();
  private pubsubMaxSeq = -1n;
  /** On `both`: a heartbeat's seq the stream had not reached yet. */
  private awaitingStream: bigint | undefined;
  private watchdog: NodeJS.Timeout | undefined;
  private streamLoop: Promise<void> | undefined;
  private appliedMax = -1n;
  private readonly waiters = new Set<Waiter>();
  private readonly trackedKeys = new Map<string, number>();
  private readonly trackedLsns: { lsn: bigint; at: number }[] = [];

  private constructor(options: SubscriberOptions) {
    this.redis = options.redis;
    this.cache = options.cache;
    this.keys = channelKeys(options.channel ?? DEFAULT_CHANNEL);
    this.transport = options.transport ?? "both";
    this.heartbeatMs = options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
    this.streamBlockMs = options.streamBlockMs ?? this.heartbeatMs;
    this.streamCount = options.streamCount ?? 1000;
    this.onError = options.onError ?? (() => {});
  }

  /**
   * Connects, subscribes, reads where the channel is (epoch, seq, the
   * stream's newest entry) and starts applying messages. On `pubsub`, refuses
   * a cache whose TTL (plus jitter) is longer than its `redisTtlMs`, or that
   * declares no `redisTtlMs`.
   */
  static async start(options: SubscriberOptions): Promise<Subscriber> {
    const s = new Subscriber(options);
    if (s.transport === "pubsub") {
      if (s.cache.redisTtlMs === undefined) {
        throw new LocalTtlError(
          "the pub/sub transport needs the cache's redisTtlMs, to refuse a local TTL longer than the Redis one",
        );
      }
      s.cache.limitTtl(s.cache.redisTtlMs);
    }
    await s.begin();
    return s;
  }

  /** The epoch and sequence of the last message applied. */
  get cursor(): Cursor {
    return this.cursorNow;
  }

  /** The highest applied Postgres position seen (hash or messages); `undefined` before any. */
  get applied(): bigint | undefined {
    return this.appliedMax < 0n ? undefined : this.appliedMax;
  }

  private async begin(): Promise<void> {
    if (this.transport !== "stream") {
      const sub = duplicate(this.redis);
      this.sub = sub;
      sub.on("message", (channel: string, text: string) => {
        if (channel !== this.keys.channel) return;
        this.lastPubsubAt = Date.now();
        if (!this.started) this.early.push([text, "pubsub"]);
        else this.enqueue(text, "pubsub");
      });
      sub.on("error", (err: Error) => this.onError(err));
      // A resubscription after a reconnect: messages in between were lost unseen.
      sub.on("ready", () => {
        if (this.started && !this.closed) this.serial(() => this.resyncAfterReconnect());
      });
      await sub.subscribe(this.keys.channel);
    }
    const at = await this.position();
    this.cursorNow = { epoch: at.epoch, last: at.seq };
    this.lastId = at.newestId ?? "0-0";
    this.lastPubsubAt = Date.now();
    this.lastStreamAt = Date.now();
    this.started = true;
    for (const [text, via] of this.early.splice(0)) this.enqueue(text, via);
    if (this.transport !== "stream") {
      this.watchdog = setInterval(() => this.checkSilence(), Math.max(10, Math.floor(this.heartbeatMs / 2)));
      this.watchdog.unref();
    }
    if (this.transport !== "pubsub") {
      this.streamConn = duplicate(this.redis);
      this.streamConn.on("error", (err: Error) => this.onError(err));
      // ioredis reconnects and sends the pending XREAD again by itself: what
      // that read returns was missed while disconnected, a replay.
      this.streamConn.on("reconnecting", () => {
        this.streamReconnected = true;
      });
      this.streamLoop = this.readStream();
    }
    const hash = await this.redis.hget(this.keys.applied, "postgres");
    if (hash !== null) this.raiseApplied(hash);
  }

  /** Epoch, seq and the stream's newest ID, read together (one slot: `{C}`). */
  private async position(): Promise<{ epoch: string | null; seq: bigint | null; newestId: string | undefined }> {
    const replies = await this.redis
      .multi()
      .get(this.keys.epoch)
      .get(this.keys.seq)
      .xrevrange(this.keys.stream, "+", "-", "COUNT", 1)
      .exec();
    if (replies === null) throw new Error("the MULTI reading the broadcast's position was aborted");
    for (const [err] of replies) if (err) throw err;
    const epoch = replies[0]?.[1] as string | null;
    const seq = replies[1]?.[1] as string | null;
    const newest = replies[2]?.[1] as [string, string[]][] | undefined;
    return { epoch, seq: seq === null ? null : BigInt(seq), newestId: newest?.[0]?.[0] };
  }

  private enqueue(text: string, via: Via): void {
    this.serial(() => this.handle(text, via));
  }

  /** Runs `work` after everything queued before it; errors go to `onError`. */
  private serial(work: () => Promise<void>): void {
    this.queue = this.queue.then(work).catch((err: unknown) => this.onError(asError(err)));
  }

  private async handle(text: string, via: Via): Promise<void> {
    if (this.closed) return;
    let message: Message;
    try {
      message = parseMessage(text);
    } catch (err) {
      this.cache.metrics.malformed += 1;
      this.onError(asError(err));
      return;
    }
    if (message.kind === "heartbeat") this.cache.metrics.heartbeats += 1;
    if (message.kind === "batch" || message.kind === "heartbeat") {
      const lsn = appliedLsn(message);
      if (lsn !== undefined) this.raiseApplied(lsn);
    }
    const { decision, cursor } = step(this.cursorNow, message);
    const both = this.transport === "both";
    if (via === "pubsub" && (message.kind === "batch" || message.kind === "heartbeat") && message.epoch === cursor.epoch) {
      if (message.seq > this.pubsubMaxSeq) this.pubsubMaxSeq = message.seq;
    }
    switch (decision.action) {
      case "ignore":
      case "skip":
        if (message.kind === "heartbeat" && both) this.heartbeatInStep(message);
        return;
      case "flush":
        this.flushAll();
        this.cursorNow = cursor;
        this.pubsubMaxSeq = -1n;
        this.awaitingStream = undefined;
        // Pub/sub saw the new epoch first: the stream may have been
        // recreated below our last ID; restart it from its newest entry
        // (anything after that and after `seq` is a gap, repaired).
        if (via === "pubsub" && message.kind !== "other-version") this.resetStream = true;
        return;
      case "apply":
        this.cursorNow = cursor;
        if (message.kind === "batch") this.apply(message, via);
        return;
      case "gap":
        if (both && via === "pubsub") {
          // The stream replays what pub/sub missed: drop this message's keys
          // now, leave the cursor to the stream.
          if (message.kind === "batch") this.drop(message);
          else if (message.kind === "heartbeat") this.heartbeatAhead(message);
          return;
        }
        this.cursorNow = cursor;
        await this.repair(decision.after);
        if (message.kind === "batch") this.apply(message, via);
        return;
    }
  }

  /** On `both`: a heartbeat ahead of the stream; a second one still ahead means the stream is not replaying. */
  private heartbeatAhead(message: HeartbeatMessage): void {
    if (this.awaitingStream !== undefined && (this.cursorNow.last ?? -1n) < this.awaitingStream) {
      const after = this.cursorNow.last ?? BigInt(message.epoch);
      this.cursorNow = { epoch: message.epoch, last: message.seq };
      this.awaitingStream = undefined;
      this.serial(() => this.repair(after));
      return;
    }
    this.awaitingStream = message.seq;
  }

  private heartbeatInStep(_message: HeartbeatMessage): void {
    this.awaitingStream = undefined;
  }

  /** Drops the caches invalidated after `after` (the `touched` hash), and every tagged entry if tags were. */
  private async repair(after: bigint): Promise<void> {
    const m = this.cache.metrics;
    m.gaps += 1;
    const plan = repairPlan(await this.redis.hgetall(this.keys.touched), after);
    if (plan.allTags) m.entriesDropped += this.cache.dropTagged();
    for (const name of plan.caches) {
      m.entriesDropped += this.cache.dropCache(name);
      m.cacheFlushes += 1;
    }
  }

  private flushAll(): void {
    this.cache.metrics.flushes += 1;
    this.cache.clear();
  }

  private apply(message: BatchMessage, via: Via): void {
    const m = this.cache.metrics;
    if (via === "stream" && this.isReplay(message)) m.replays += 1;
    this.drop(message);
    m.invalidationsApplied += 1;
  }

  private replayBelow: bigint | undefined;

  private isReplay(message: BatchMessage): boolean {
    // Pub/sub had not delivered it (a duplicate is skipped before this):
    // it missed it, or saw a later one.
    if (this.transport === "both") return true;
    return this.replayBelow !== undefined && message.seq <= this.replayBelow;
  }

  /** Drops what a batch names and records the latencies. */
  private drop(message: BatchMessage): void {
    const m = this.cache.metrics;
    let dropped = 0;
    for (const key of message.keys) dropped += this.cache.dropKey(key);
    for (const tag of message.tags) dropped += this.cache.dropTag(tag);
    for (const cache of message.flush) {
      dropped += this.cache.dropCache(cache);
      m.cacheFlushes += 1;
    }
    m.entriesDropped += dropped;
    const now = Date.now();
    if (message.published_at_ms !== undefined) m.publishToDrop.observe(now - message.published_at_ms);
    // The source's commit time, when evictd has it: one observation per
    // batch (docs/broadcast.md); commits passed to `trackCommit` add theirs.
    if (message.committed_at_ms !== undefined) m.commitToDrop.observe(now - message.committed_at_ms);
    if (this.trackedKeys.size > 0) {
      for (const key of message.keys) {
        const at = this.trackedKeys.get(key);
        if (at === undefined) continue;
        m.commitToDrop.observe(now - at);
        this.trackedKeys.delete(key);
      }
    }
  }

  /**
   * Measures commit → local drop for a commit of the application: for a key,
   * when a message drops it; for an LSN, when evictd reports it applied.
   */
  trackCommit(target: { key: string } | { lsn: string | bigint }, committedAtMs: number = Date.now()): void {
    if ("key" in target) {
      if (this.trackedKeys.size >= MAX_TRACKED) {
        const oldest = this.trackedKeys.keys().next();
        if (oldest.done !== true) this.trackedKeys.delete(oldest.value);
      }
      this.trackedKeys.set(target.key, committedAtMs);
      return;
    }
    const lsn = parseLsn(target.lsn);
    if (lsn <= this.appliedMax) {
      this.cache.metrics.commitToDrop.observe(Date.now() - committedAtMs);
      return;
    }
    if (this.trackedLsns.length >= MAX_TRACKED) this.trackedLsns.shift();
    this.trackedLsns.push({ lsn, at: committedAtMs });
  }

  private raiseApplied(lsn: bigint | string): void {
    let value: bigint;
    try {
      value = parseLsn(lsn);
    } catch (err) {
      this.onError(asError(err));
      return;
    }
    if (value <= this.appliedMax) return;
    this.appliedMax = value;
    for (const w of this.waiters) {
      if (w.lsn <= value) {
        this.waiters.delete(w);
        w.resolve(true);
      }
    }
    if (this.trackedLsns.length > 0) {
      const now = Date.now();
      for (let i = this.trackedLsns.length - 1; i >= 0; i -= 1) {
        const t = this.trackedLsns[i];
        if (t !== undefined && t.lsn <= value) {
          this.cache.metrics.commitToDrop.observe(now - t.at);
          this.trackedLsns.splice(i, 1);
        }
      }
    }
  }

  /**
   * Read your writes: resolves `true` once evictd has applied the source up
   * to `lsn` (the hash first, then heartbeats and batch messages, and the
   * hash again every heartbeat), `false` after `timeoutMs`: then read from
   * the database directly.
   */
  async waitApplied(lsn: string | bigint, timeoutMs: number): Promise<boolean> {
    const target = parseLsn(lsn);
    if (target <= this.appliedMax) return true;
    const poll = async () => {
      const hash = await this.redis.hget(this.keys.applied, "postgres");
      if (hash !== null) this.raiseApplied(hash);
    };
    await poll();
    if (target <= this.appliedMax) return true;
    return new Promise<boolean>((resolve) => {
      const timer = setInterval(() => {
        poll().catch((err: unknown) => this.onError(asError(err)));
      }, this.heartbeatMs);
      const deadline = setTimeout(() => finish(false), timeoutMs);
      const finish = (applied: boolean) => {
        clearInterval(timer);
        clearTimeout(deadline);
        this.waiters.delete(waiter);
        resolve(applied);
      };
      const waiter: Waiter = { lsn: target, resolve: finish };
      this.waiters.add(waiter);
    });
  }

  /**
   * Pub/sub heard nothing for 3 heartbeats: reconnect, and check the
   * channel. A Redis that answers tells what was missed (the reconnection
   * reads `:epoch`/`:seq`: a new epoch flushes, a higher seq is a gap,
   * neither is an evictd that was merely quiet or restarting); only a Redis
   * that does not answer within a heartbeat flushes everything.
   */
  private checkSilence(): void {
    if (this.closed) return;
    const now = Date.now();
    const limit = 3 * this.heartbeatMs;
    if (now - this.lastPubsubAt <= limit) return;
    if (this.transport === "both" && now - this.lastStreamAt <= limit) return;
    this.lastPubsubAt = now;
    this.serial(async () => {
      if (!(await this.answers())) {
        // The cursor stays: after the reconnect, what was published
        // meanwhile is a gap, repaired from `touched` (entries loaded since
        // this flush may be stale too).
        this.flushAll();
        this.onError(new Error(`no broadcast for ${limit} ms on ${this.keys.channel} and Redis does not answer: local cache flushed, reconnecting`));
      }
      this.sub?.disconnect(true);
    });
  }

  /** Whether Redis answers a `PING` within a heartbeat. */
  private async answers(): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), this.heartbeatMs);
    });
    try {
      return await Promise.race([this.redis.ping().then(() => true), timeout]);
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  /** After pub/sub reconnected: a new epoch flushes; a higher seq is a gap (on `both`, the stream replays it). */
  private async resyncAfterReconnect(): Promise<void> {
    if (this.closed || this.sub === undefined) return;
    await this.sub.subscribe(this.keys.channel);
    this.lastPubsubAt = Date.now();
    const at = await this.position();
    const cur = this.cursorNow;
    if (cur.epoch === null) {
      // The channel had no sequence when we started: anything since is new.
      if (at.epoch !== null && at.seq !== null) {
        this.cursorNow = { epoch: at.epoch, last: at.seq };
        if (this.transport === "pubsub") await this.repair(BigInt(at.epoch));
      }
      return;
    }
    if (at.epoch !== cur.epoch) {
      this.flushAll();
      this.cursorNow = { epoch: at.epoch, last: at.seq };
      this.resetStream = true;
      return;
    }
    if (at.seq === null || cur.last === null || at.seq <= cur.last) return;
    if (this.transport === "both") {
      this.pubsubMaxSeq = at.seq;
      return;
    }
    this.cursorNow = { epoch: cur.epoch, last: at.seq };
    await this.repair(cur.last);
  }

  private async readStream(): Promise<void> {
    const conn = this.streamConn;
    if (conn === undefined) return;
    let failed = false;
    while (!this.closed) {
      try {
        if (this.resetStream) {
          this.resetStream = false;
          const newest = (await this.redis.xrevrange(this.keys.stream, "+", "-", "COUNT", 1))[0];
          this.lastId = newest?.[0] ?? "0-0";
        }
        const reply = (await conn.xread("COUNT", this.streamCount, "BLOCK", this.streamBlockMs, "STREAMS", this.keys.stream, this.lastId)) as
          | [string, [string, string[]][]][]
          | null;
        this.lastStreamAt = Date.now();
        if (failed || this.streamReconnected) {
          // Caught up after a reconnect: what this read returns is a replay.
          failed = false;
          this.streamReconnected = false;
          const high = this.highestSeqIn(reply);
          if (high !== undefined) this.replayBelow = high;
        }
        if (reply === null && this.transport === "stream") {
          // A quiet stream: a Redis that lost its data (a new epoch) shows
          // only in `:epoch` until the next batch (docs/broadcast.md).
          const at = await this.position();
          this.serial(async () => this.epochCheck(at.epoch, at.seq));
        }
        for (const [, entries] of reply ?? []) {
          for (const [id, fields] of entries) {
            const text = fieldValue(fields, STREAM_FIELD);
            if (text !== undefined) this.enqueue(text, "stream");
            this.lastId = id;
          }
        }
        await this.queue;
      } catch (err) {
        if (this.closed) return;
        failed = true;
        this.onError(asError(err));
        await sleep(Math.min(1000, this.heartbeatMs));
      }
    }
  }

  /** Stream only: a new epoch seen in `:epoch` flushes and restarts the stream from its newest entry. */
  private epochCheck(epoch: string | null, seq: bigint | null): void {
    const cur = this.cursorNow;
    if (epoch === null || epoch === cur.epoch) return;
    if (cur.epoch !== null) {
      this.flushAll();
      this.resetStream = true;
    }
    this.cursorNow = { epoch, last: seq };
  }

  private highestSeqIn(reply: [string, [string, string[]][]][] | null): bigint | undefined {
    let high: bigint | undefined;
    for (const [, entries] of reply ?? []) {
      for (const [, fields] of entries) {
        const text = fieldValue(fields, STREAM_FIELD);
        const m = text === undefined ? null : /"seq"\s*:\s*([0-9]+)/.exec(text);
        if (m?.[1] !== undefined) high = BigInt(m[1]);
      }
    }
    return high;
  }

  /** Stops reading; the local cache stays as it is (no longer kept). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.watchdog !== undefined) clearInterval(this.watchdog);
    for (const w of [...this.waiters]) w.resolve(false);
    this.sub?.disconnect();
    this.streamConn?.disconnect();
    await this.streamLoop;
    await this.queue;
  }
}

/**
 * Read your writes without a subscriber: polls `evictd:bc:{C}:applied`
 * every `pollMs` until it reaches `lsn` (`true`) or `timeoutMs` passes (`false`).
 */
export async function waitApplied(
  redis: RedisClient,
  lsn: string | bigint,
  timeoutMs: number,
  options: { channel?: string; pollMs?: number } = {},
): Promise<boolean> {
  const target = parseLsn(lsn);
  const keys = channelKeys(options.channel ?? DEFAULT_CHANNEL);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const hash = await redis.hget(keys.applied, "postgres");
    if (hash !== null && parseLsn(hash) >= target) return true;
    const left = deadline - Date.now();
    if (left <= 0) return false;
    await sleep(Math.min(options.pollMs ?? 50, left));
  }
}

function duplicate(redis: RedisClient): RedisClient {
  return (redis as Redis | Cluster).duplicate() as RedisClient;
}

function fieldValue(fields: string[], name: string): string | undefined {
  for (let i = 0; i + 1 < fields.length; i += 2) if (fields[i] === name) return fields[i + 1];
  return undefined;
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
