/**
 * The broadcast, format version 2 (`docs/broadcast.md`): key names,
 * message parsing, and the pure decision a subscriber takes for each
 * message from its last `(epoch, seq)`. No I/O here; `subscriber.ts` does it.
 *
 * Invariants of {@link step}: a repeat is never applied twice as new; `last`
 * only grows within an epoch; a new epoch always flushes (what the old
 * sequence said after `last` is unknown); a gap is repaired (never silently
 * skipped) before `last` moves past it.
 */

import { parseLsn } from "./lsn.js";

export const DEFAULT_CHANNEL = "evictd:invalidations";
export const DEFAULT_HEARTBEAT_MS = 1_000;

/** The Redis keys of channel `C`; all share the hash tag `{C}`. */
export interface ChannelKeys {
  readonly channel: string;
  readonly seq: string;
  readonly epoch: string;
  readonly stream: string;
  readonly applied: string;
  readonly touched: string;
}

export function channelKeys(channel: string = DEFAULT_CHANNEL): ChannelKeys {
  const base = `evictd:bc:{${channel}}`;
  return {
    channel,
    seq: `${base}:seq`,
    epoch: `${base}:epoch`,
    stream: `${base}:stream`,
    applied: `${base}:applied`,
    touched: `${base}:touched`,
  };
}

/** The field of the `touched` hash that names the last message with tags. */
export const TAGS_FIELD = "*tags";
/** The field of a stream entry that holds the message. */
export const STREAM_FIELD = "m";

/** A source position as evictd publishes it. */
export type Position =
  | { readonly kind: "postgres"; readonly commit_lsn: string; readonly lsn: string }
  | { readonly kind: "kafka"; readonly topic: string; readonly partition: number; readonly offset: number }
  | { readonly kind: string; readonly [field: string]: unknown };

/** The applied position (Postgres only). */
export interface Applied {
  readonly kind: string;
  readonly lsn?: string;
}

export interface BatchMessage {
  readonly v: 2;
  readonly kind: "batch";
  readonly epoch: string;
  readonly seq: bigint;
  readonly batch?: number;
  readonly position?: Position;
  readonly applied?: Applied;
  readonly caches: readonly string[];
  readonly keys: readonly string[];
  readonly tags: readonly string[];
  readonly flush: readonly string[];
  readonly truncated: boolean;
  /** The source's commit time of the batch's last transaction, when the source gives one. */
  readonly committed_at_ms?: number;
  readonly published_at_ms?: number;
}

export interface HeartbeatMessage {
  readonly v: 2;
  readonly kind: "heartbeat";
  readonly epoch: string;
  readonly seq: bigint;
  readonly applied?: Applied;
  readonly published_at_ms?: number;
}

/** What a message parsed to. `other-version`: flush everything, keep reading. `other-kind`: ignore. */
export type Message =
  | BatchMessage
  | HeartbeatMessage
  | { readonly kind: "other-version"; readonly v: unknown }
  | { readonly kind: "other-kind"; readonly v: 2; readonly found: unknown };

/** A message that is not a JSON object, or a v2 message missing its epoch or seq. */
export class MessageError extends Error {
  override readonly name = "MessageError";
  constructor(
    readonly text: string,
    why: string,
  ) {
    super(`broadcast message ${why}: ${text.slice(0, 200)}`);
  }
}

function strings(value: unknown): string[] {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === "string") : [];
}

/** Parses one message (pub/sub payload or stream field `m`). */
export function parseMessage(text: string): Message {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new MessageError(text, "is not JSON");
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) throw new MessageError(text, "is not an object");
  const o = json as Record<string, unknown>;
  if (o.v !== 2) return { kind: "other-version", v: o.v };
  if (o.kind !== "batch" && o.kind !== "heartbeat") return { kind: "other-kind", v: 2, found: o.kind };
  if (typeof o.epoch !== "string" || !/^[0-9]+$/.test(o.epoch)) throw new MessageError(text, "has no epoch");
  if (typeof o.seq !== "number" || !Number.isInteger(o.seq) || o.seq < 0) throw new MessageError(text, "has no seq");
  // A double holds the µs clock exactly until the year 2255; beyond 2^53 the
  // text is authoritative.
  let seq = BigInt(o.seq);
  if (!Number.isSafeInteger(o.seq)) {
    const m = /"seq"\s*:\s*([0-9]+)/.exec(text);
    if (m?.[1] !== undefined) seq = BigInt(m[1]);
  }
  const applied = typeof o.applied === "object" && o.applied !== null ? (o.applied as Applied) : undefined;
  const published = typeof o.published_at_ms === "number" ? o.published_at_ms : undefined;
  if (o.kind === "heartbeat") {
    return { v: 2, kind: "heartbeat", epoch: o.epoch, seq, applied, published_at_ms: published };
  }
  return {
    v: 2,
    kind: "batch",
    epoch: o.epoch,
    seq,
    batch: typeof o.batch === "number" ? o.batch : undefined,
    position: typeof o.position === "object" && o.position !== null ? (o.position as Position) : undefined,
    applied,
    caches: strings(o.caches),
    keys: strings(o.keys),
    tags: strings(o.tags),
    flush: strings(o.flush),
    truncated: o.truncated === true,
    committed_at_ms: typeof o.committed_at_ms === "number" ? o.committed_at_ms : undefined,
    published_at_ms: published,
  };
}

/** The applied Postgres LSN a message carries, if any. */
export function appliedLsn(message: BatchMessage | HeartbeatMessage): bigint | undefined {
  const a = message.applied;
  if (a === undefined || a.kind !== "postgres" || typeof a.lsn !== "string") return undefined;
  try {
    return parseLsn(a.lsn);
  } catch {
    return undefined;
  }
}

/** The commit LSN of a batch's position (Postgres), if any. */
export function commitLsn(message: BatchMessage): bigint | undefined {
  const p = message.position;
  if (p === undefined || p.kind !== "postgres" || typeof p.commit_lsn !== "string") return undefined;
  try {
    return parseLsn(p.commit_lsn);
  } catch {
    return undefined;
  }
}

/** Where a subscriber is: the epoch and sequence of the last message it applied; `null` before it knows. */
export interface Cursor {
  readonly epoch: string | null;
  readonly last: bigint | null;
}

/**
 * What to do with a message:
 * - `apply`: in step; drop what a batch names.
 * - `skip`: a repeat, or a heartbeat in step.
 * - `gap`: messages after `after` were missed: repair from the `touched`
 *   hash (drop caches whose seq there is above `after`), then apply a batch.
 * - `flush`: a new epoch, or a format this client does not know: drop everything.
 * - `ignore`: an unknown kind.
 */
export type Decision =
  | { readonly action: "apply" }
  | { readonly action: "skip" }
  | { readonly action: "gap"; readonly after: bigint }
  | { readonly action: "flush" }
  | { readonly action: "ignore" };

/**
 * The decision for `message` at `cursor` and the cursor after it (the table
 * "What a subscriber does" in `docs/broadcast.md`). A cursor that knows no
 * epoch yet (the keys did not exist when the subscriber started) takes the
 * message's: the sequence starts at the epoch, so `seq` = epoch + 1 is the
 * first message and anything higher is a gap.
 */
export function step(cursor: Cursor, message: Message): { decision: Decision; cursor: Cursor } {
  if (message.kind === "other-version") return { decision: { action: "flush" }, cursor };
  if (message.kind === "other-kind") return { decision: { action: "ignore" }, cursor };
  let { epoch, last } = cursor;
  if (epoch === null) {
    epoch = message.epoch;
    last = BigInt(message.epoch);
  }
  if (epoch !== message.epoch) {
    return { decision: { action: "flush" }, cursor: { epoch: message.epoch, last: message.seq } };
  }
  const at = last ?? BigInt(epoch);
  if (message.seq <= at) return { decision: { action: "skip" }, cursor: { epoch, last: at } };
  const next = { epoch, last: message.seq };
  if (message.kind === "batch" && message.seq === at + 1n) return { decision: { action: "apply" }, cursor: next };
  return { decision: { action: "gap", after: at }, cursor: next };
}

/**
 * What a gap costs: the caches whose `touched` seq is above `after` (the
 * last message applied) and whether any tagged entry must go (`*tags`
 * above it). Every other cache was untouched since: it is kept.
 */
export function repairPlan(touched: Readonly<Record<string, string>>, after: bigint): { caches: string[]; allTags: boolean } {
  const caches: string[] = [];
  let allTags = false;
  for (const [name, seq] of Object.entries(touched)) {
    if (!/^[0-9]+$/.test(seq) || BigInt(seq) <= after) continue;
    if (name === TAGS_FIELD) allTags = true;
    else caches.push(name);
  }
  caches.sort();
  return { caches, allTags };
}
